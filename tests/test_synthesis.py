"""The synthesis package against independent float64 references and the invariants data-free KD needs.

References are written from the authors' reference code (NVlabs/DeepInversion, zju-vipa/Fast-Datafree)
with NumPy loops; they share no code with `kd_lightning.synthesis`.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.synthesis import (BatchNormStatistics, DeepInversionSynthesizer, FastMetaSynthesizer,
                                    SyntheticPool)
from kd_lightning.synthesis import losses as L
from kd_lightning.synthesis.augment import crop_flip


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def tiny_teacher(num_classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, num_classes))
    for bn in (net[1], net[4]):  # statistics of a "training set" that is not N(0, 1)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    net.eval().requires_grad_(False)
    return net


def tiny_student(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


class TinyGenerator(nn.Module):
    def __init__(self, latent_dim: int = 8, size: int = 8) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.size = size
        self.project = nn.Linear(latent_dim, 4 * (size // 2) ** 2)
        self.body = nn.Sequential(nn.BatchNorm2d(4), nn.Upsample(scale_factor=2), nn.Conv2d(4, 3, 3, padding=1),
                                  nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(len(z), 4, self.size // 2, self.size // 2))


# ----------------------------------------------------------------------------- float64 references

def reference_bn_prior(features: list[np.ndarray], running: list[tuple[np.ndarray, np.ndarray]],
                       averages: list[tuple[np.ndarray, np.ndarray]] | None = None, momentum: float = 0.0,
                       first_multiplier: float = 1.0) -> float:
    total = 0.0
    for k, (feature, (running_mean, running_var)) in enumerate(zip(features, running)):
        channels = feature.shape[1]
        values = [feature[:, c].reshape(-1) for c in range(channels)]
        mean = np.array([v.sum() / v.size for v in values])
        var = np.array([((v - v.sum() / v.size) ** 2).sum() / v.size for v in values])  # biased
        if averages is not None:
            mean = (1 - momentum) * mean + momentum * averages[k][0]
            var = (1 - momentum) * var + momentum * averages[k][1]
        layer = math.sqrt(((running_var - var) ** 2).sum()) + math.sqrt(((running_mean - mean) ** 2).sum())
        total += (first_multiplier if k == 0 else 1.0) * layer
    return total


def bn_inputs(net: nn.Sequential, x: torch.Tensor) -> list[np.ndarray]:
    """The inputs of the two BN layers, computed in float64 with the network's own conv weights."""
    net64 = copy.deepcopy(net).double()
    first = net64[0](x.double())
    second = net64[3](net64[2](net64[1](first)))
    return [first.numpy(), second.numpy()]


def running_stats(net: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np64(bn.running_mean), np64(bn.running_var)) for bn in (net[1], net[4])]


def reference_tv(x: np.ndarray) -> tuple[float, float]:
    n, c, h, w = x.shape
    pairs = [((0, 0), (0, 1)), ((0, 0), (1, 0)), ((1, 0), (0, 1)), ((0, 0), (1, 1))]  # (a offset), (b offset)
    l1 = l2 = 0.0
    for (ai, aj), (bi, bj) in pairs:
        rows, cols = h - 1 if (ai or bi) else h, w - 1 if (aj or bj) else w
        diffs = [x[b, ch, i + ai, j + aj] - x[b, ch, i + bi, j + bj]
                 for b in range(n) for ch in range(c) for i in range(rows) for j in range(cols)]
        l1 += sum(abs(d) for d in diffs) / len(diffs)
        l2 += math.sqrt(sum(d * d for d in diffs))
    return l1, l2


def softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def reference_adi(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p, q = softmax(s_row / temperature), softmax(t_row / temperature)
        m = np.clip((p + q) / 2, 0.01, 0.99)
        p, q = np.clip(p, 0.01, 0.99), np.clip(q, 0.01, 0.99)
        total += 0.5 * (m * (np.log(m) - np.log(p))).sum() + 0.5 * (m * (np.log(m) - np.log(q))).sum()
    return 1.0 - min(max(total / len(student), 0.0), 1.0)


# ----------------------------------------------------------------------------- objectives

def test_bn_prior_is_the_sum_of_norms_of_mean_and_biased_variance_gaps() -> None:
    net = tiny_teacher()
    x = torch.randn(3, 3, 6, 6) * 2 + 0.3
    stats = BatchNormStatistics(net)
    with stats:
        net(x)
    expected = reference_bn_prior(bn_inputs(net, x), running_stats(net), first_multiplier=3.0)
    torch.testing.assert_close(stats.loss(first_multiplier=3.0).double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    assert not net[1]._forward_hooks, "hooks must be removed when the block ends"


def test_bn_prior_momentum_blends_the_previous_rounds_statistics() -> None:
    net, momentum = tiny_teacher(), 0.9
    stats = BatchNormStatistics(net, momentum=momentum)
    first, second, third = (torch.randn(4, 3, 6, 6) + shift for shift in (0.0, 1.0, -0.5))
    with stats:
        net(first)
        stats.end_round()  # the first round seeds the average with its own statistics
        net(second)
        stats.end_round()
        net(third)
    def stat(feature: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return feature.mean(axis=(0, 2, 3)), feature.var(axis=(0, 2, 3))
    f1, f2, f3 = bn_inputs(net, first), bn_inputs(net, second), bn_inputs(net, third)
    averages = []
    for k in range(2):
        (m1, v1), (m2, v2) = stat(f1[k]), stat(f2[k])
        averages.append((momentum * m1 + (1 - momentum) * m2, momentum * v1 + (1 - momentum) * v2))
    expected = reference_bn_prior(f3, running_stats(net), averages, momentum)
    torch.testing.assert_close(stats.loss().double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_a_teacher_without_batch_norm_is_refused_with_the_fix() -> None:
    lenet_like = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 10))
    with pytest.raises(ConfigError, match="no BatchNorm"):
        DeepInversionSynthesizer(lenet_like, num_classes=10, image_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="no BatchNorm"):
        FastMetaSynthesizer(lenet_like, TinyGenerator(), num_classes=10, latent_dim=8)


def test_total_variation_matches_the_four_neighbour_reference() -> None:
    x = torch.randn(2, 3, 5, 4)
    tv_l1, tv_l2 = L.total_variation(x)
    ref_l1, ref_l2 = reference_tv(np64(x))
    torch.testing.assert_close(tv_l1.double(), torch.tensor(ref_l1, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tv_l2.double(), torch.tensor(ref_l2, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_input_l2_is_the_batch_mean_of_image_norms() -> None:
    x = torch.randn(3, 2, 4, 4)
    expected = np.mean([math.sqrt((np64(img) ** 2).sum()) for img in x])
    torch.testing.assert_close(L.input_l2(x).double(), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("scale", [0.5, 4.0, 30.0])
def test_adi_competition_matches_the_clamped_reference(scale: float) -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 5) * scale, torch.randn(6, 5) * scale
    expected = reference_adi(np64(student), np64(teacher), 3.0)
    torch.testing.assert_close(L.adi_competition(student, teacher, 3.0).double(),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_agreement_adversarial_counts_only_agreeing_samples_over_the_whole_batch() -> None:
    # sample 0: both argmax 0; sample 1: student 1, teacher 0 (masked out)
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    p = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    q = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    kl0 = float((p * np.log(p / q)).sum())
    torch.testing.assert_close(L.agreement_adversarial(student, teacher).double(),
                               torch.tensor(-kl0 / 2, dtype=torch.float64))


def test_crop_flip_moves_each_sample_by_its_own_offset() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    rng = torch.Generator().manual_seed(5)
    offsets = torch.randint(0, 3, (2, 2), generator=rng)
    flips = torch.rand(2, generator=rng) < 0.5
    view = crop_flip(x, 1, torch.Generator().manual_seed(5))
    padded = np.pad(np64(x), ((0, 0), (0, 0), (1, 1), (1, 1)))
    for b in range(2):
        i, j = offsets[b].tolist()
        expected = padded[b, :, i:i + 4, j:j + 4]
        if flips[b]:
            expected = expected[:, :, ::-1]
        np.testing.assert_array_equal(np64(view[b]), expected)


# ----------------------------------------------------------------------------- pool

def test_pool_keeps_the_newest_images_and_samples_reproducibly() -> None:
    pool = SyntheticPool(capacity=5)
    for start in (0, 3, 6):  # 9 images into 5 slots: 4..8 remain
        pool.add(torch.arange(start, start + 3).float().view(3, 1, 1, 1), torch.arange(start, start + 3))
    assert len(pool) == 5
    assert sorted(pool.images.flatten().tolist()) == [4.0, 5.0, 6.0, 7.0, 8.0]
    images, labels = pool.sample(20, torch.Generator().manual_seed(0))
    assert torch.equal(images.flatten().long(), labels)
    restored = SyntheticPool(capacity=5)
    restored.load_state_dict(copy.deepcopy(pool.state_dict()))
    for p in (pool, restored):
        p.add(torch.full((1, 1, 1, 1), 9.0), torch.tensor([9]))
    again = restored.sample(20, torch.Generator().manual_seed(1))
    assert torch.equal(pool.sample(20, torch.Generator().manual_seed(1))[0], again[0])
    with pytest.raises(ConfigError, match="capacity"):
        SyntheticPool(capacity=4).load_state_dict(pool.state_dict())


def test_pool_saves_only_when_asked(tmp_path) -> None:
    pool = SyntheticPool(capacity=4)
    pool.add(torch.randn(2, 3, 2, 2))
    assert not list(tmp_path.iterdir())
    pool.save(tmp_path / "pool.pt")
    saved = torch.load(tmp_path / "pool.pt")
    torch.testing.assert_close(saved["images"], pool.images[:2])


# ----------------------------------------------------------------------------- synthesizers

def frozen_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_unchanged(net: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed during synthesis"


def deep_inversion(teacher: nn.Module, **overrides) -> DeepInversionSynthesizer:
    options = dict(num_classes=5, image_shape=(3, 8, 8), batch_size=8, iterations=6, lr=0.1, tv_l1=1e-3,
                   l2=1e-4, adi_weight=0.5, flip=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), seed=11)
    options.update(overrides)
    return DeepInversionSynthesizer(teacher, **options)


def test_deep_inversion_trains_through_a_frozen_teacher_without_touching_it() -> None:
    teacher, student = tiny_teacher(), tiny_student()
    student.train()
    before_teacher, before_student = frozen_state(teacher), frozen_state(student)
    synth = deep_inversion(teacher, iterations=30)
    images, labels, parts = synth.synthesize(student)
    assert_unchanged(teacher, before_teacher)   # BN running statistics included
    assert_unchanged(student, before_student)   # the student's BN ran in eval mode
    assert not teacher.training and all(m.training for m in student.modules())
    assert all(p.grad is None for p in list(teacher.parameters()) + list(student.parameters()))
    assert all(p.requires_grad for p in student.parameters())
    assert not any(m._forward_hooks for m in teacher.modules())
    assert labels.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert set(parts) == {"ce", "bn", "tv_l1", "tv_l2", "l2", "adi"}
    low, high = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert images.min() >= low and images.max() <= high  # clipped to the pixel range
    # the optimisation works: the kept batch has a lower objective than the Gaussian start
    stats = BatchNormStatistics(teacher)
    def prior(x: torch.Tensor) -> float:
        with stats:
            teacher(x)
        return stats.loss().item()
    start = torch.randn((8, 3, 8, 8), generator=torch.Generator().manual_seed(11))
    assert prior(images) < prior(start)


def test_deep_inversion_resumes_with_identical_batches() -> None:
    teacher, student = tiny_teacher(), tiny_student()
    straight = deep_inversion(teacher)
    straight.synthesize(student)
    state = copy.deepcopy(straight.state_dict())
    expected = straight.synthesize(student)[0]
    resumed = deep_inversion(teacher, seed=999)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.synthesize(student)[0], expected, rtol=0, atol=0)
    other_seed = deep_inversion(teacher, seed=12).synthesize(student)[0]
    assert not torch.equal(other_seed, expected)


def fast(teacher: nn.Module, generator: nn.Module, **overrides) -> FastMetaSynthesizer:
    options = dict(num_classes=5, latent_dim=8, batch_size=8, steps=2, warmup_rounds=1, crop_padding=1,
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), seed=4)
    options.update(overrides)
    return FastMetaSynthesizer(teacher, generator, **options)


def test_fast_meta_keeps_teacher_frozen_and_adds_the_adversarial_term_from_the_last_warmup_round() -> None:
    # fast_meta.py: `self.ep += 1` runs before `if self.adv > 0 and self.ep >= self.ep_start`, so with
    # warm-up 2 the first round has no adversarial term and the second (the last warm-up round) has it.
    teacher, student, generator = tiny_teacher(), tiny_student(), TinyGenerator()
    before_teacher, before_student = frozen_state(teacher), frozen_state(student)
    synth = fast(teacher, generator, warmup_rounds=2)
    images, labels, parts = synth.synthesize(student)
    assert set(parts) == {"bn", "ce"}
    images, labels, parts = synth.synthesize(student)
    assert set(parts) == {"bn", "ce", "adv"}
    assert_unchanged(teacher, before_teacher)
    assert_unchanged(student, before_student)
    assert images.shape == (8, 3, 8, 8) and labels.shape == (8,)
    assert images.min() >= -2.0 and images.max() <= 2.0  # a sigmoid's pixels, normalised


@pytest.mark.parametrize("meta_update", ["fomaml", "reptile"])
def test_one_step_meta_update_lands_on_the_fast_generator(meta_update: str) -> None:
    """With one fast step both meta rules reduce to the fast step itself: Adam's first step is
    lr·g/(|g|+ε) for fomaml's g and for Reptile's 67·(θ − θ') = 67·lr·g/(|g|+ε) alike (up to ε where
    |g| is tiny, hence Reptile's looser tolerance; the step itself is lr = 5e-3)."""
    teacher, generator = tiny_teacher(), TinyGenerator()
    synth = fast(teacher, generator, steps=1, meta_update=meta_update)
    copies = []
    original = synth._fast_copy
    synth._fast_copy = lambda: copies.append(original()) or copies[-1]
    initial = [p.detach().clone() for p in generator.parameters()]
    synth.synthesize(None)
    moved = 0
    for meta, fast_p, start in zip(generator.parameters(), copies[0].parameters(), initial):
        torch.testing.assert_close(meta, fast_p, rtol=0, atol=1e-7 if meta_update == "fomaml" else 2e-5)
        moved += int(not torch.equal(meta, start))
    assert moved == len(initial)


def test_fast_meta_resumes_generator_optimizer_statistics_and_rng_exactly() -> None:
    teacher, student = tiny_teacher(), tiny_student()
    generator = TinyGenerator()
    straight = fast(teacher, generator)
    straight.synthesize(student)
    generator_state, state = copy.deepcopy(generator.state_dict()), copy.deepcopy(straight.state_dict())
    expected, _, expected_parts = straight.synthesize(student)
    restored_generator = TinyGenerator()
    restored_generator.load_state_dict(generator_state)
    resumed = fast(teacher, restored_generator, seed=0)
    resumed.load_state_dict(state)
    images, _, parts = resumed.synthesize(student)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    for key in expected_parts:
        torch.testing.assert_close(parts[key], expected_parts[key], rtol=0, atol=0)
    for a, b in zip(generator.parameters(), restored_generator.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class RecordingOptimizer:
    """Stands in for the meta optimizer: records the meta gradient it is asked to apply."""

    def __init__(self, parameters) -> None:
        self.parameters = list(parameters)
        self.gradients: list[torch.Tensor] = []

    def step(self) -> None:
        self.gradients = [p.grad.clone() for p in self.parameters]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters:
            p.grad = None


@pytest.mark.parametrize("meta_update", ["fomaml", "reptile"])
def test_meta_gradient_is_the_sum_of_fast_gradients_or_the_reptile_difference(monkeypatch, meta_update: str) -> None:
    teacher, generator = tiny_teacher(), TinyGenerator()
    synth = fast(teacher, generator, steps=3, meta_update=meta_update)
    copies, step_gradients = [], []
    original_copy, original_grad = synth._fast_copy, torch.autograd.grad
    synth._fast_copy = lambda: copies.append(original_copy()) or copies[-1]

    def recording_grad(outputs, inputs, *args, **kwargs):
        gradients = original_grad(outputs, inputs, *args, **kwargs)
        step_gradients.append([g.clone() for g in gradients])
        return gradients

    monkeypatch.setattr(torch.autograd, "grad", recording_grad)
    meta = RecordingOptimizer(generator.parameters())
    start = [p.detach().clone() for p in generator.parameters()]
    synth.synthesize(None, meta)
    assert len(step_gradients) == 3
    n = len(start)
    for k, (recorded, begin, after_fast) in enumerate(zip(meta.gradients, start, copies[0].parameters())):
        if meta_update == "fomaml":
            expected = step_gradients[0][k] + step_gradients[1][k] + step_gradients[2][k]
        else:
            expected = 67.0 * (begin - after_fast.detach())
        torch.testing.assert_close(recorded, expected, rtol=1e-6, atol=1e-7)
    assert all(len(g) == n + 1 for g in step_gradients)  # the latent codes are optimised too, not meta-updated


@pytest.mark.parametrize("reset_l0", [True, False])
def test_reset_l0_reinitialises_the_input_layers_before_round_120_after_the_warmup(reset_l0: bool) -> None:
    # fast_meta.py `reset_l0`: at `ep == 120 + ep_start` (1-based) `l1.0` and `conv_blocks.0` get weights
    # N(0, 0.02) and zero biases; here the generator's first Linear and first BatchNorm.
    teacher, generator = tiny_teacher(), TinyGenerator()
    with torch.no_grad():
        generator.body[0].weight.fill_(1.5)
        generator.body[0].bias.fill_(0.3)
    synth = fast(teacher, generator, warmup_rounds=3, reset_l0=reset_l0)
    recorder = RecordingOptimizer(generator.parameters())  # records the meta gradient, moves nothing
    before = {name: p.detach().clone() for name, p in generator.named_parameters()}
    synth.rounds = 121  # the 122nd round: not yet
    synth.synthesize(None, recorder)
    assert all(torch.equal(p, before[name]) for name, p in generator.named_parameters())
    synth.synthesize(None, recorder)  # the 123rd = 120 + 3
    linear, norm = generator.project, generator.body[0]
    if not reset_l0:
        assert all(torch.equal(p, before[name]) for name, p in generator.named_parameters())
        return
    for module in (linear, norm):
        assert torch.count_nonzero(module.bias) == 0
        assert 0.01 < module.weight.std().item() < 0.03 and abs(module.weight.mean().item()) < 0.01
    conv = generator.body[2]
    assert torch.equal(conv.weight, before["body.2.weight"]) and torch.equal(conv.bias, before["body.2.bias"])
    reset = {name: p.detach().clone() for name, p in generator.named_parameters()}
    synth.synthesize(None, recorder)  # once only
    assert all(torch.equal(p, reset[name]) for name, p in generator.named_parameters())


@pytest.mark.parametrize("keep_best", [False, True])
def test_deep_inversion_returns_the_final_iterate_as_nvlabs_cifar_or_the_best_as_their_imagenet(monkeypatch,
                                                                                                 keep_best) -> None:
    # deepinversion_cifar10.py: `best_inputs = inputs.data` aliases the optimised tensor, so the batch returned is
    # the one after the last Adam step; imagenet's deepinversion.py:349-357 steps, clips, and only then keeps
    # `inputs.data.clone()` when that iteration's loss is the lowest so far — the post-step, post-clip iterate of
    # the argmin, which is what the next iteration starts from. A constant added to the loss (no gradient) puts
    # the argmin mid-run, and mean/std make the clip bite, so pre-step, pre-clip and post-clip copies all differ.
    teacher, student = tiny_teacher(), tiny_student()
    before, after = [], []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        before.append(self.param_groups[0]["params"][0].detach().clone())
        result = step(self, *args, **kwargs)
        after.append(self.param_groups[0]["params"][0].detach().clone())
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    synth = deep_inversion(teacher, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), iterations=8, keep_best=keep_best)
    original, best, calls = synth._loss_parts, 3, []

    def scripted_parts(*args):
        parts = original(*args)
        parts["offset"] = torch.tensor(-1e3 if len(calls) == best else 0.0)
        calls.append(len(calls))
        return parts

    synth._loss_parts = scripted_parts
    images = synth.synthesize(student)[0]
    assert len(before) == len(after) == 8
    clipped = [a.clamp(-2.0, 2.0) for a in after]  # pixel range [0, 1] under mean 0.5, std 0.25
    assert torch.equal(clipped[best], before[best + 1])
    assert not torch.equal(clipped[best], after[best]) and not torch.equal(clipped[best], before[best])
    expected = clipped[best] if keep_best else clipped[-1]
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
