"""Self-distillation schemes: BYOT, CS-KD, Tf-KD (self, reg), mean teacher, and the label-smoothing baseline."""

from __future__ import annotations

import copy
import inspect
import io
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kd_lightning.data import DigitsDataModule
from kd_lightning.data.pairs import ClassPairBatchSampler, EpochPermutation
from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms import FT, Consistency
from kd_lightning.models import build_model
from kd_lightning.pipeline import run
from kd_lightning.schemes import BYOT, CSKD, MeanTeacher

ROOT = Path(__file__).resolve().parents[1]
# Overrides that select each scheme, for the generic every-scheme resume test.
SCHEMES = {
    "byot": ["scheme=byot"],
    "cs_kd": ["scheme=cs_kd"],
    "tf_kd_reg": ["scheme=tf_kd_reg"],
    "tf_kd_self": ["scheme=tf_kd_self"],
    "mean_teacher": ["scheme=mean_teacher"],
}
SGD = partial(torch.optim.SGD, lr=0.1, momentum=0.9)


def logits_pair(seed: int = 0, n: int = 6, k: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=generator) * 3, torch.randn(n, k, generator=generator) * 3,
            torch.randint(0, k, (n,), generator=generator))


# --- reference arithmetic (float64, written out as the authors' code computes it) -------------------------

def test_byot_soft_cross_entropy_and_hint_match_the_reference_arithmetic():
    student, teacher, _ = logits_pair()
    s, t, T = student.double(), teacher.double(), 3.0
    expected = 0.0
    for row in range(len(s)):
        q = torch.exp(t[row] / T) / torch.exp(t[row] / T).sum()
        log_p = s[row] / T - torch.log(torch.exp(s[row] / T).sum())
        expected += -(q * log_p).sum().item()
    expected = expected / len(s) * T * T
    assert functional.soft_cross_entropy(student, teacher, T).item() == pytest.approx(expected, rel=1e-5)
    f, g = student - 1, teacher - 1  # both signs, so the mask matters
    mask = [[1.0 if (a > 0 or b > 0) else 0.0 for a, b in zip(x, y)] for x, y in zip(f.tolist(), g.tolist())]
    hint = sum((a - b) ** 2 * m for x, y, ms in zip(f.tolist(), g.tolist(), mask) for a, b, m in zip(x, y, ms))
    assert functional.byot_feature_hint(f, g).item() == pytest.approx(hint, rel=1e-5)
    assert hint != pytest.approx(((f - g) ** 2).sum().item())


def test_tf_kd_losses_match_the_reference_kldivloss_mean_and_teacher_only_temperature():
    student, teacher, targets = logits_pair()
    n, k = student.shape
    s, t = student.double(), teacher.double()

    def kldiv_mean(log_input, target):  # nn.KLDivLoss() default: elementwise mean over N·K
        return (target * (target.log() - log_input)).sum().item() / (n * k)

    T, multiplier = 6.0, 50.0
    self_expected = kldiv_mean(torch.log_softmax(s / T, 1), torch.softmax(t / T, 1)) * T * T * multiplier
    assert functional.tf_kd_self(student, teacher, T, multiplier).item() == pytest.approx(self_expected, rel=1e-5)
    T, multiplier = 20.0, 100.0
    teacher_soft = torch.full((n, k), 0.01 / (k - 1), dtype=torch.float64)
    for row in range(n):
        teacher_soft[row, targets[row]] = 0.99
    reg_expected = kldiv_mean(torch.log_softmax(s, 1), torch.softmax(teacher_soft / T, 1)) * multiplier
    assert functional.tf_kd_reg(student, targets, T, multiplier).item() == pytest.approx(reg_expected, rel=1e-5)
    tempered = kldiv_mean(torch.log_softmax(s / T, 1), torch.softmax(teacher_soft / T, 1)) * multiplier
    assert functional.tf_kd_reg(student, targets, T, multiplier, temper_student=True).item() == pytest.approx(
        tempered, rel=1e-5)


def test_mean_teacher_consistency_and_its_sigmoid_rampup_match_the_reference():
    student, teacher, _ = logits_pair()
    n, k = student.shape
    expected = ((torch.softmax(student.double(), 1) - torch.softmax(teacher.double(), 1)) ** 2).sum().item() / k / n
    assert functional.softmax_mse(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert [functional.sigmoid_rampup(e, 5) for e in (0, 2, 5, 9)] == pytest.approx(
        [math.exp(-5.0), math.exp(-5.0 * 0.36), 1.0, 1.0])
    assert Consistency(weight=100.0, rampup_epochs=5).weight_at(0) == pytest.approx(100.0 * math.exp(-5.0))


def test_byot_total_is_the_reference_combination_of_its_heads():
    torch.manual_seed(0)
    module = BYOT(build_model("convnet_small", 10, 1), num_classes=10, example_input=torch.randn(2, 1, 8, 8),
                  optimizer=SGD)
    assert list(module.heads) == ["stage1"]  # every declared stage but the deepest
    images, targets = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    module.train()
    losses = module.training_losses(images, targets, None)
    module = module.double()
    captured = {}
    hooks = [module.student.stage1.register_forward_hook(lambda m, i, o: captured.__setitem__("stage1", o)),
             module.student.fc.register_forward_hook(lambda m, i, o: captured.__setitem__("deep", i[0]))]
    deep = module.student(images.double())
    head_logits, head_feature = module.heads["stage1"](captured["stage1"])
    for hook in hooks:
        hook.remove()
    ce = F.cross_entropy(deep, targets) + F.cross_entropy(head_logits, targets)
    q = torch.softmax(deep / 3.0, 1)
    kd = -(q * torch.log_softmax(head_logits / 3.0, 1)).sum(1).mean() * 9.0
    hint = ((head_feature - captured["deep"]) ** 2 * ((head_feature > 0) | (captured["deep"] > 0))).sum()
    expected = 0.9 * ce + 0.1 * kd + 1e-6 * hint
    assert sum(value.item() for value in losses.values()) == pytest.approx(expected.item(), rel=1e-4)


# --- CS-KD pairs -----------------------------------------------------------------------------------------

def test_pair_batches_hold_anchors_then_same_class_partners_replayed_per_epoch():
    targets = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(1))
    sampler = ClassPairBatchSampler(EpochPermutation(50, seed=3), 8, False, targets, seed=3)
    batches = list(sampler)
    assert len(batches) == math.ceil(50 / 4) and sorted(i for b in batches for i in b[: len(b) // 2]) == list(range(50))
    for batch in batches:
        anchors, partners = batch[: len(batch) // 2], batch[len(batch) // 2:]
        assert torch.equal(targets[anchors], targets[partners]) and all(a != p for a, p in zip(anchors, partners))
    assert list(sampler) == batches  # a resumed epoch draws the same batches
    sampler.sampler.set_epoch(1)  # Lightning sets the epoch on the anchor sampler
    assert list(sampler) != batches


def test_cs_kd_refuses_a_batch_size_that_cannot_hold_pairs_before_training(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="cannot hold class-wise pairs"):
        run(make_cfg("scheme=cs_kd", "data.batch_size=7"))
    assert not (tmp_path / "cache").exists()  # nothing trained


def test_cs_kd_loss_is_ce_on_anchors_plus_kd_to_partners():
    torch.manual_seed(0)
    module = CSKD(build_model("convnet_tiny", 10, 1), num_classes=10, optimizer=SGD).eval()
    with torch.no_grad():  # logits far enough apart that float32 resolves their KL
        module.student.fc.weight.mul_(30)
    images, targets = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    losses = module.training_losses(images, targets, torch.arange(8))
    anchor, partner = module.student(images[:4]).double(), module.student(images[4:]).double()
    expected_kd = (torch.softmax(partner / 4, 1) * (torch.log_softmax(partner / 4, 1) - torch.log_softmax(anchor / 4, 1))
                   ).sum() / 4 * 16
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(anchor, targets[:4]).item(), rel=1e-5)
    assert losses["cs_kd"].item() == pytest.approx(expected_kd.item(), rel=1e-4)
    # Gradients flow through the anchors only: the partners' forward ran under no_grad.
    assert losses["cs_kd"].grad_fn is not None


# --- BYOT and mean-teacher bad input, the EMA teacher contract -----------------------------------------------

def test_byot_on_a_model_that_declares_no_stages_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ConfigError, match="declares no stages"):
        BYOT(model, num_classes=10, example_input=torch.randn(2, 1, 8, 8), optimizer=SGD)


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_mean_teacher_refuses_an_ema_decay_outside_the_open_unit_interval(make_cfg, decay):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        run(make_cfg("scheme=mean_teacher", f"scheme.ema_decay={decay}"))


def make_mean_teacher(decay: float = 0.5, **options) -> MeanTeacher:
    torch.manual_seed(0)
    return MeanTeacher(build_model("convnet_tiny", 10, 1), {"consistency": Consistency(rampup_epochs=0)},
                       num_classes=10, example_input=torch.randn(2, 1, 8, 8), ema_decay=decay, optimizer=SGD,
                       **options)


def test_ema_teacher_is_frozen_eval_pinned_and_outside_optimizer_and_state_dict():
    module = make_mean_teacher()
    module.train()
    teacher_ids = {id(p) for p in module.teacher.parameters()}
    optimized = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert teacher_ids and not optimized & teacher_ids
    assert not teacher_ids & {id(p) for p in module.parameters()}
    assert not any(key.startswith(("teacher", "ema")) for key in module.state_dict())
    assert not module.teacher.training and not any(p.requires_grad for p in module.ema.parameters())
    assert not module.teacher(torch.randn(2, 1, 8, 8)).requires_grad


def digits_trainer(**options) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, **options)


def test_ema_updates_after_each_optimizer_step_with_the_references_warm_up():
    # CuriousAI main.py update_ema_variables after its n-th step: α = min(1 − 1/(n + 1), ema_decay), over the
    # parameters. Before, the first update copied the student and every later one used the decay.
    module, decay = make_mean_teacher(decay=0.7), 0.7
    initial = module.student.fc.weight.detach().clone()
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % 2 == 0:  # accumulation: an optimizer step every second batch
                snapshots.append({k: v.clone() for k, v in pl_module.student.state_dict().items()})

    loader = DataLoader(_digits_train(), batch_size=16)
    digits_trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[Snapshot()]).fit(module, loader)
    assert int(module.ema.n_averaged) == 3 == len(snapshots)
    expected = initial.double()
    for step, snapshot in enumerate(snapshots, start=1):
        alpha = min(1 - 1 / (step + 1), decay)  # .5, .667, then the decay .7
        expected = alpha * expected + (1 - alpha) * snapshot["fc.weight"].double()
    torch.testing.assert_close(module.teacher.model.fc.weight.double(), expected)
    assert not torch.equal(module.teacher.model.fc.weight, module.student.fc.weight)


def test_ema_teacher_forwards_in_train_mode_with_its_own_batchnorm_statistics():
    # CuriousAI main.py: ema_model.train() before its forward; the EMA averages parameters, not BN buffers.
    module = make_mean_teacher(logit_distance_cost=None)
    module.train()
    images, targets = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    reference = copy.deepcopy(module.ema.module).train()
    with torch.no_grad():
        expected = reference(images)
    stats = {k: v.clone() for k, v in module.ema.module.state_dict().items() if k.endswith("running_mean")}
    seen = {}
    original = module.teacher_logits_and_features
    module.teacher_logits_and_features = lambda x: seen.setdefault("teacher", original(x))
    module.training_losses(images, targets, None)
    torch.testing.assert_close(seen["teacher"][0], expected)
    moved = module.ema.module.state_dict()
    assert stats and all(not torch.equal(stats[k], moved[k]) for k in stats), "its own running statistics move"
    assert not module.teacher.training and not module.teacher.model.training  # pinned again after the forward
    assert not any(p.requires_grad for p in module.ema.parameters())


def test_consistency_head_reads_the_terms_and_is_tied_to_the_class_head_as_the_reference():
    # experiments/cifar10_test.py logit_distance_cost .01: CE on the class logits, the consistency cost on a
    # second head's logits, .01·symmetric_mse_loss(class, consistency) / minibatch_size.
    module = make_mean_teacher(logit_distance_cost=0.01)
    module.train()
    images, targets = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    captured = {}
    hook = module.student.fc.register_forward_hook(lambda m, i, o: captured.update(feature=i[0], logits=o))
    losses = module.training_losses(images, targets, None)
    hook.remove()
    assert sorted(losses) == ["ce", "consistency", "residual"]
    head = module.consistency_head
    with torch.no_grad():
        class_logits = captured["logits"].double()
        consistency = captured["feature"].double() @ head.weight.double().T + head.bias.double()
        nn.Module.train(module.teacher.model, True)
        teacher = module.teacher.model.double()(images.double())
        module.teacher.model.float().eval()
    b, k = class_logits.shape
    expected_residual = 0.01 * ((class_logits - consistency) ** 2).sum() / k / b
    expected_consistency = 100.0 * ((consistency.softmax(1) - teacher.softmax(1)) ** 2).sum() / k / b
    torch.testing.assert_close(losses["residual"].double(), expected_residual, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(losses["consistency"].double(), expected_consistency, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(losses["ce"].double(), F.cross_entropy(class_logits, targets), rtol=1e-5, atol=1e-6)
    optimized = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert {id(p) for p in head.parameters()} <= optimized
    assert list(module.products()) == ["student"]  # the head trains, is checkpointed, not exported
    assert module.loss_summary().endswith("0.01·residual (class ↔ consistency head; the terms read the consistency head)")


def test_scheme_mean_teacher_builds_the_cited_cifar10_recipe_with_its_consistency_head(make_cfg):
    # experiments/cifar10_test.py: decay .97, consistency 100 ramped over 5 epochs, logit_distance_cost .01.
    from kd_lightning import pipeline

    cfg = make_cfg("scheme=mean_teacher")
    options = {key: value for key, value in cfg.scheme.items() if key != "_target_"}
    torch.manual_seed(0)
    module = MeanTeacher(build_model("convnet_tiny", 10, 1), pipeline.build_terms(cfg), num_classes=10,
                         example_input=torch.randn(2, 1, 8, 8), optimizer=SGD, **options)
    assert isinstance(module.consistency_head, nn.Linear) and module.ema_decay == 0.97
    module.train()
    losses = module.training_losses(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)), None)
    assert sorted(losses) == ["ce", "consistency", "residual"]
    assert module.loss_summary() == ("loss = 1.0·CE + 100.0·consistency(sigmoid ramp-up 5 epochs) + 0.01·residual "
                                     "(class ↔ consistency head; the terms read the consistency head)")
    # The class's default is the config's, so a MeanTeacher built in code trains the same recipe.
    assert inspect.signature(MeanTeacher).parameters["logit_distance_cost"].default == cfg.scheme.logit_distance_cost


def lightning_round_trip(module: MeanTeacher) -> dict:
    """The checkpoint as Lightning writes and reads it: state dict plus on_save_checkpoint, through torch.save."""
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def lightning_restore(module: MeanTeacher, checkpoint: dict) -> None:
    module.on_load_checkpoint(checkpoint)  # Lightning calls the hook before loading the state dict
    module.load_state_dict(checkpoint["state_dict"])


def test_a_resumed_mean_teacher_continues_the_ema_warm_up_where_it_stopped():
    # α = min(1 − 1/(n + 1), decay) at the n-th update: after k updates and a resume, the next is the (k+1)-th.
    decay, k = 0.99, 3
    module = make_mean_teacher(decay=decay)
    for _ in range(k):
        with torch.no_grad():
            module.student.fc.weight.add_(0.1)
        module.update_teacher()
    checkpoint = lightning_round_trip(module)
    resumed = make_mean_teacher(decay=decay)
    lightning_restore(resumed, checkpoint)
    with torch.no_grad():
        resumed.student.fc.weight.add_(0.1)
    before = resumed.teacher.model.fc.weight.detach().double().clone()
    current = resumed.student.fc.weight.detach().double().clone()
    resumed.update_teacher()
    alpha = min(1 - 1 / (k + 2), decay)  # 0.8; a counter restarted at 0 would use 0.5
    torch.testing.assert_close(resumed.teacher.model.fc.weight.double(), alpha * before + (1 - alpha) * current)


def test_resuming_a_mean_teacher_checkpoint_without_the_consistency_head_names_the_setting():
    # Checkpoints written before the head existed (or with logit_distance_cost=null) have no consistency_head.*;
    # before, the resume stopped on PyTorch's `Missing key(s) "consistency_head.weight"`.
    checkpoint = lightning_round_trip(make_mean_teacher(logit_distance_cost=None))
    with pytest.raises(ConfigError, match=r"scheme\.logit_distance_cost=null"):
        lightning_restore(make_mean_teacher(logit_distance_cost=0.01), checkpoint)
    lightning_restore(make_mean_teacher(logit_distance_cost=None), checkpoint)  # the suggested setting resumes


def test_init_stage_runs_the_ema_teacher_in_eval_mode_and_the_main_stage_in_train_mode():
    # RepDistiller's init stages (FT's paraphraser, AB's connector) read an eval-mode teacher; only the mean
    # teacher's own training follows CuriousAI main.py's ema_model.train().
    torch.manual_seed(0)
    module = MeanTeacher(build_model("convnet_tiny", 10, 1), {"ft": FT(init_epochs=1)}, num_classes=10,
                         example_input=torch.randn(2, 1, 8, 8), optimizer=SGD)
    module.train()
    modes = []
    module.teacher.model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    stats = {k: v.clone() for k, v in module.ema.module.state_dict().items() if k.endswith("running_mean")}
    images, targets = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    module.set_init_stage(True)
    assert list(module.training_losses(images, targets, None)) == ["ft_init"]
    unmoved = module.ema.module.state_dict()
    assert stats and all(torch.equal(stats[k], unmoved[k]) for k in stats)
    module.set_init_stage(False)
    module.training_losses(images, targets, None)
    assert modes == [False, True]


def _digits_train():
    datamodule = DigitsDataModule(batch_size=16)
    datamodule.setup("fit")
    return datamodule.train_set


# --- real steps through the pipeline: the table holds baseline, label smoothing and the method ------------------

@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_scheme_trains_through_the_pipeline_next_to_both_baselines(make_cfg, recorded_losses, scheme):
    results = run(make_cfg(*SCHEMES[scheme]))
    stages = list(results["stages"])
    assert stages[-3:] == ["baseline", "label_smoothing", "student"]
    assert (scheme == "tf_kd_self") == ("teacher" in stages)
    first = {name: losses[0] for name, losses in recorded_losses.items()}
    # Same seed, same initial network: only the loss differs between the three rows.
    assert first["label_smoothing"] != first["baseline"] and first["student"] != first["baseline"]
    assert all(math.isfinite(loss) for losses in recorded_losses.values() for loss in losses)


def test_label_smoothing_baseline_is_cached_like_the_baseline(make_cfg):
    run(make_cfg("scheme=tf_kd_reg"))
    again = run(make_cfg("scheme=byot"))
    assert again["stages"]["label_smoothing"]["source"].startswith("cache")
    assert again["stages"]["baseline"]["source"].startswith("cache")


# --- DDP: two gloo ranks end on identical weights -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["cs_kd", "mean_teacher"])
def test_two_ddp_ranks_end_on_identical_weights(tmp_path, scheme):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "_ddp_self.py"), scheme, str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"{scheme}-rank{r}.pt", weights_only=True) for r in (0, 1))
    trained = [key for key in rank0["state_dict"] if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    if scheme == "mean_teacher":  # the consistency head trained on both ranks (compared with the rest below)
        assert {"consistency_head.weight", "consistency_head.bias"} <= set(trained)
    for key in trained:
        assert torch.equal(rank0["state_dict"][key], rank1["state_dict"][key]), f"ranks disagree on {key}"
    for key in rank0["ema"]:
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(rank0["ema"][key], rank1["ema"][key]), f"EMA teachers disagree on {key}"
    # Each rank drew its own anchors: the distributed sampler reached the pair batches.
    assert len(rank0["anchors"]) == 4 * 8 and not set(rank0["anchors"]) & set(rank1["anchors"])


def test_cs_kd_experiment_is_the_recipe_the_cs_kd_docstring_cites(make_cfg):
    from hydra.utils import instantiate

    # alinlab/cs-kd README/train.py: --lr 0.1 --epoch 200 --decay 1e-4, SGD momentum 0.9, 128 anchors (+128
    # partners), T 4, lamda 1; adjust_learning_rate(optimizer, epoch) runs after each epoch and sets the rate
    # of the next one: lr / 10 once epoch >= 0.5·200, / 10 again once epoch >= 0.75·200.
    cfg = make_cfg("experiment=schemes/cs_kd_cifar100", fast=False)
    assert cfg.scheme._target_ == "kd_lightning.schemes.CSKD" and cfg.plan._target_.endswith("cs_kd_plan")
    assert (cfg.data.batch_size, cfg.trainer.max_epochs) == (2 * 128, 200)
    assert (cfg.scheme.temperature, cfg.scheme.lambda_cls, cfg.scheme.ce_weight) == (4.0, 1.0, 1.0)
    module = CSKD(build_model("convnet_tiny", 10, 1), num_classes=10, optimizer=instantiate(cfg.optimizer),
                  scheduler=instantiate(cfg.scheduler))
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert {key: optimizer.defaults[key] for key in ("lr", "momentum", "weight_decay", "nesterov")} == \
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False}
    reference, lr = [], 0.1
    for epoch in range(200):
        reference.append(lr)
        lr = 0.1 / (10 if epoch >= 0.5 * 200 else 1) / (10 if epoch >= 0.75 * 200 else 1)
    rates = []
    for _ in range(200):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx(reference)


def test_self_distillation_loss_lines_state_what_is_trained():
    # Before, BYOT, CS-KD and Tf-KD_reg logged `loss = 1.0·CE` whatever they trained.
    from kd_lightning.schemes.self_distill import TfKDReg

    def student():
        return build_model("convnet_tiny", 10, 1)

    byot = BYOT(student(), num_classes=10, example_input=torch.randn(2, 1, 8, 8), optimizer=SGD)
    assert byot.loss_summary() == ("loss = 0.9·(CE + Σ over 1 heads of CE) + 0.1·Σ over 1 heads of "
                                   "T²·softCE(deepest → head, T=3.0) + 1e-06·Σ over 1 heads of hint")
    assert CSKD(student(), num_classes=10, optimizer=SGD).loss_summary() == \
        "loss = 1.0·CE(anchors) + 1.0·cs_kd(T=4.0, partner → anchor)"
    assert TfKDReg(student(), num_classes=10, optimizer=SGD).loss_summary() == \
        "loss = 0.9·CE + 0.1·tf_kd_reg(T=20.0, multiplier 100, correct_prob 0.99)"
