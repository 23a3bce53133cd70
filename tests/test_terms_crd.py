"""CRD: the NCE loss and memory updates against float64 references, the queue, DDP, checkpoints, errors.

The references follow RepDistiller's `crd/memory.py` (ContrastMemory) and `crd/criterion.py`
(ContrastLoss) with plain loops in float64; they share no code with the implementation.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms import CRD, BuildContext, DistillInputs
from kd_lightning.losses.terms import crd as crd_module

EPS = 1e-7  # the reference's eps in ContrastLoss


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def built(memory: str = "bank", train_size: int | None = 20, feat_dim: int = 8, nce_k: int = 6,
          queue_size: int = 12, seed: int = 0, s_dim: int = 5, t_dim: int = 7, negatives: str = "uniform",
          train_targets: torch.Tensor | None = None, **options) -> CRD:
    torch.manual_seed(seed)
    term = CRD(feat_dim=feat_dim, nce_k=nce_k, memory=memory, queue_size=queue_size, negatives=negatives, **options)
    term.build(BuildContext(student_shapes={"penultimate": torch.Size([2, s_dim])},
                            teacher_shapes={"penultimate": torch.Size([2, t_dim])}, train_size=train_size,
                            train_targets=train_targets))
    return term


def batch(indices: torch.Tensor | None, generator: torch.Generator, size: int | None = None, s_dim: int = 5,
          t_dim: int = 7) -> DistillInputs:
    n = len(indices) if size is None else size
    return DistillInputs(student_logits=torch.zeros(n, 3), targets=torch.zeros(n, dtype=torch.long), indices=indices,
                         teacher_logits=torch.zeros(n, 3),
                         student_features={"penultimate": torch.randn(n, s_dim, generator=generator)},
                         teacher_features={"penultimate": torch.randn(n, t_dim, generator=generator)})


def unit(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    vectors = torch.randn(rows, dim, generator=generator)
    return vectors / vectors.norm(dim=1, keepdim=True)


def reference_embedding(linear: torch.nn.Linear, features: torch.Tensor) -> list[list[float]]:
    weight, bias = linear.weight.detach().double().tolist(), linear.bias.detach().double().tolist()
    rows = []
    for x in features.double().tolist():
        y = [sum(w * xi for w, xi in zip(w_row, x)) + b for w_row, b in zip(weight, bias)]
        norm = math.sqrt(sum(v * v for v in y))
        rows.append([v / norm for v in y])
    return rows


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def reference_nce(p: list[list[float]], noise_size: int) -> float:
    """ContrastLoss: −(Σ_b log(P0/(P0 + K/M + eps)) + Σ_b Σ_k log((K/M)/(Pk + K/M + eps))) / B."""
    total = 0.0
    for row in p:
        c = (len(row) - 1) / noise_size
        total += math.log(row[0] / (row[0] + c + EPS))
        total += sum(math.log(c / (pk + c + EPS)) for pk in row[1:])
    return -total / len(p)


def momentum_row(old: list[float], new: list[float], m: float) -> list[float]:
    mixed = [m * o + (1 - m) * n for o, n in zip(old, new)]
    norm = math.sqrt(sum(v * v for v in mixed))
    return [v / norm for v in mixed]


@pytest.mark.parametrize("shape", [(3, 5, 10), (6, 40, 7)])  # (B, K, M)
def test_contrastive_nce_matches_the_reference_formula(shape):
    b, k, m = shape
    p = torch.rand(b, k + 1, generator=torch.Generator().manual_seed(b)) * 3
    expected = reference_nce(p.double().tolist(), m)
    assert functional.contrastive_nce(p, m).item() == pytest.approx(expected, rel=1e-5)


# With K=6 the scores come from the whole table (M <= 32·(K+1)), with the ratio lowered from gathered rows.
@pytest.mark.parametrize("nce_k, whole_table", [(6, True), (6, False)])
def test_bank_loss_matches_the_reference_over_two_batches_with_fixed_negatives(monkeypatch, nce_k, whole_table):
    monkeypatch.setattr(crd_module, "WHOLE_TABLE_MAX_RATIO", 32 if whole_table else 2)
    term = built(train_size=20, nce_k=nce_k, feat_dim=8)
    gen = torch.Generator().manual_seed(1)
    memory = term.memory.double().tolist()  # [side][row][dim]: 0 = student embeddings, 1 = teacher ones
    z = None
    for step, indices in enumerate([torch.tensor([3, 11, 0, 19]), torch.tensor([11, 5, 7])]):
        inputs = batch(indices, gen)
        rows = torch.randint(0, 20, (len(indices), nce_k + 1), generator=gen)
        rows[:, 0] = indices
        monkeypatch.setattr(term, "sample_contrast_indices", lambda idx, rows=rows: rows.clone())
        losses = term.loss(inputs)

        v_s = reference_embedding(term.student_embed, inputs.student_features["penultimate"])
        v_t = reference_embedding(term.teacher_embed, inputs.teacher_features["penultimate"])
        e_s = [[math.exp(dot(memory[1][r], v) / 0.07) for r in row] for row, v in zip(rows.tolist(), v_s)]
        e_t = [[math.exp(dot(memory[0][r], v) / 0.07) for r in row] for row, v in zip(rows.tolist(), v_t)]
        if z is None:  # Z is estimated once, from the first batch: mean(exp) · n_data
            z = [sum(map(sum, e)) / (len(e) * len(e[0])) * 20 for e in (e_s, e_t)]
        expected_s = reference_nce([[x / z[0] for x in row] for row in e_s], 20)
        expected_t = reference_nce([[x / z[1] for x in row] for row in e_t], 20)
        assert losses["student"].item() == pytest.approx(expected_s, rel=1e-4), step
        assert losses["teacher"].item() == pytest.approx(expected_t, rel=1e-4), step
        for i, index in enumerate(indices.tolist()):
            memory[0][index] = momentum_row(memory[0][index], v_s[i], 0.5)
            memory[1][index] = momentum_row(memory[1][index], v_t[i], 0.5)
    torch.testing.assert_close(term.memory, torch.tensor(memory, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(term.normalizers, torch.tensor(z, dtype=torch.float32), rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("whole_table", [True, False])
def test_gradients_see_the_memory_as_scored_not_as_updated_by_the_same_step(monkeypatch, whole_table):
    monkeypatch.setattr(crd_module, "WHOLE_TABLE_MAX_RATIO", 32 if whole_table else 2)
    nce_k = 6
    term = built(train_size=20, nce_k=nce_k, feat_dim=8)
    gen = torch.Generator().manual_seed(12)
    term.loss(batch(torch.tensor([2, 9]), gen))  # sets Z and leaves an update of rows 2 and 9 to write
    indices = torch.tensor([9, 4, 2])  # rows updated by the last step and again by this one
    rows = torch.randint(0, 20, (3, nce_k + 1), generator=gen)
    rows[:, 0], rows[0, -1] = indices, 4
    monkeypatch.setattr(term, "sample_contrast_indices", lambda idx: rows.clone())
    inputs = batch(indices, gen)
    scored = term.memory.double().clone()  # as this step scores it: the last step's update written
    losses = term.loss(inputs)
    (losses["student"] + 2 * losses["teacher"]).backward()

    heads = {name: module.double() for name, module in (("s", term.student_embed), ("t", term.teacher_embed))}
    reference = {name: [p.detach().clone().requires_grad_(True) for p in head.parameters()]
                 for name, head in heads.items()}
    z = term.normalizers.double()
    total = 0.0
    for side, (name, features) in enumerate((("s", "penultimate"), ("t", "penultimate"))):
        weight, bias = reference[name]
        raw = (inputs.student_features if name == "s" else inputs.teacher_features)[features].double()
        anchor = torch.nn.functional.normalize(raw @ weight.t() + bias, dim=1)
        table = scored[1 - side]  # the student anchor meets past teacher embeddings and vice versa
        p = torch.exp(torch.einsum("bkd,bd->bk", table[rows], anchor) / 0.07) / z[side]
        total = total + (1 + side) * functional.contrastive_nce(p, 20)
    total.backward()
    for name, head in heads.items():
        for got, want in zip(head.parameters(), reference[name]):
            torch.testing.assert_close(got.grad, want.grad.to(got.grad.dtype), rtol=1e-4, atol=1e-7)


def test_bank_scores_keep_no_gathered_rows_for_the_backward_pass():
    # RepDistiller gathers B×(K+1)×D rows per side, which bmm keeps for the backward pass: 1.07 GB at B=64,
    # K=16384, D=128. Scored against the whole table, nothing of that size is saved.
    term = built(train_size=200, nce_k=150, feat_dim=16)
    inputs = batch(torch.arange(8), torch.Generator().manual_seed(13))
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        term.loss(inputs)
    assert saved and max(saved) < 8 * 151 * 16 / 4, sorted(saved)[-3:]


def test_queue_loss_matches_the_reference_whole_queue_as_negatives():
    term = built("queue", train_size=None, queue_size=9, feat_dim=6)
    gen = torch.Generator().manual_seed(2)
    queue = term.memory.double().tolist()
    inputs = batch(torch.arange(4), gen)
    losses = term.loss(inputs)
    v_s = reference_embedding(term.student_embed, inputs.student_features["penultimate"])
    v_t = reference_embedding(term.teacher_embed, inputs.teacher_features["penultimate"])
    # Positive: the other network's current embedding; negatives: every queue row (K = M = queue_size).
    e_s = [[math.exp(dot(s, t) / 0.07)] + [math.exp(dot(s, q) / 0.07) for q in queue[1]] for s, t in zip(v_s, v_t)]
    e_t = [[math.exp(dot(t, s) / 0.07)] + [math.exp(dot(t, q) / 0.07) for q in queue[0]] for s, t in zip(v_s, v_t)]
    z = [sum(map(sum, e)) / (len(e) * len(e[0])) * 9 for e in (e_s, e_t)]
    assert losses["student"].item() == pytest.approx(reference_nce([[x / z[0] for x in r] for r in e_s], 9), rel=1e-4)
    assert losses["teacher"].item() == pytest.approx(reference_nce([[x / z[1] for x in r] for r in e_t], 9), rel=1e-4)


@pytest.mark.parametrize("memory", ["bank", "queue"])
def test_each_direction_trains_only_its_own_head(memory):
    term = built(memory)
    losses = term.loss(batch(torch.tensor([1, 2, 3]), torch.Generator().manual_seed(3)))
    losses["student"].backward(retain_graph=True)
    assert term.student_embed.weight.grad.abs().sum() > 0 and term.teacher_embed.weight.grad is None
    term.student_embed.weight.grad = None
    losses["teacher"].backward()
    assert term.teacher_embed.weight.grad.abs().sum() > 0 and term.student_embed.weight.grad is None


def test_bank_update_mixes_and_renormalises_exactly_the_batch_rows():
    term = built(train_size=10, feat_dim=4, nce_m=0.3)
    gen = torch.Generator().manual_seed(4)
    before = term.memory.clone()
    student, teacher = unit(4, 4, gen), unit(4, 4, gen)
    indices = torch.tensor([7, 2, 7, 5])  # a repeated sample: its last occurrence is the one kept
    term.contrast(student, teacher, indices)
    for side, new in ((0, student), (1, teacher)):
        for row in range(10):
            if row in (2, 5, 7):
                last = max(i for i, index in enumerate(indices.tolist()) if index == row)
                expected = momentum_row(before[side, row].double().tolist(), new[last].double().tolist(), 0.3)
                torch.testing.assert_close(term.memory[side, row], torch.tensor(expected, dtype=torch.float32))
                assert term.memory[side, row].norm().item() == pytest.approx(1.0, abs=1e-6)
            else:
                assert torch.equal(term.memory[side, row], before[side, row]), (side, row)


def test_queue_is_first_in_first_out_and_never_grows():
    term = built("queue", train_size=None, queue_size=5, feat_dim=3)
    gen = torch.Generator().manual_seed(5)
    initial = term.memory.clone()
    pushed_s, pushed_t = [], []
    for size in (3, 3, 7, 2):  # wraps around, and one batch is larger than the queue
        student, teacher = unit(size, 3, gen), unit(size, 3, gen)
        term.contrast(student, teacher, None)
        pushed_s += list(student)
        pushed_t += list(teacher)
        assert term.memory.shape == (2, 5, 3)
        total = len(pushed_s)
        assert int(term.queue_pointer) == total % 5
        for slot in range(5):  # slot j holds the latest item pushed at position ≡ j (mod 5), if any
            owners = [n for n in range(total) if n % 5 == slot]
            want_s = pushed_s[owners[-1]] if owners else initial[0, slot]
            want_t = pushed_t[owners[-1]] if owners else initial[1, slot]
            assert torch.equal(term.memory[0, slot], want_s) and torch.equal(term.memory[1, slot], want_t)


def _ddp_worker(rank: int, world: int, store: str, out: str, steps: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for memory in ("bank", "queue"):
            # Rank 1 starts from a different memory: the first update must replace it by rank 0's.
            term = built(memory, train_size=16, queue_size=6, seed=rank)
            for student, teacher, indices, rows, split in steps:
                part = slice(0, split) if rank == 0 else slice(split, None)
                term.contrast(student[part], teacher[part], indices[part],
                              rows[part] if memory == "bank" else None)
            state = {"memory": term.memory, "normalizers": term.normalizers}
            torch.save(state, f"{out}/{memory}_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_keep_identical_memories_equal_to_one_process_on_the_global_batch(tmp_path):
    gen = torch.Generator().manual_seed(6)
    steps = []
    for global_indices, split in (([0, 5, 9, 12, 3, 15, 8, 1], 4), ([3, 7, 3, 10, 2, 14], 2), ([4, 11, 6], 1)):
        indices = torch.tensor(global_indices)  # the second step has sample 3 on both ranks
        rows = torch.randint(0, 16, (len(indices), 7), generator=gen)
        rows[:, 0] = indices
        steps.append((unit(len(indices), 8, gen), unit(len(indices), 8, gen), indices, rows, split))
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path), steps), nprocs=2, join=True)

    for memory in ("bank", "queue"):
        single = built(memory, train_size=16, queue_size=6, seed=0)
        for student, teacher, indices, rows, _ in steps:
            single.contrast(student, teacher, indices, rows if memory == "bank" else None)
        rank0, rank1 = (torch.load(tmp_path / f"{memory}_{rank}.pt") for rank in (0, 1))
        assert torch.equal(rank0["memory"], rank1["memory"]), memory
        assert torch.equal(rank0["normalizers"], rank1["normalizers"]), memory
        torch.testing.assert_close(rank0["memory"], single.memory, rtol=1e-6, atol=1e-6)
        # The first step splits 4 + 4, so the mean of the ranks' Z estimates is the global batch's.
        torch.testing.assert_close(rank0["normalizers"], single.normalizers, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("memory", ["bank", "queue"])
def test_checkpoint_round_trip_restores_memory_normalizers_and_queue_pointer(memory):
    trained = built(memory, seed=0)
    gen = torch.Generator().manual_seed(7)
    for indices in (torch.tensor([1, 4, 9]), torch.tensor([2, 4, 17, 6, 0])):
        trained.loss(batch(indices, gen))
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    restored = built(memory, seed=1)
    assert not torch.equal(restored.memory, trained.memory)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.memory, trained.memory)
    assert torch.equal(restored.normalizers, trained.normalizers)
    if memory == "queue":
        assert int(restored.queue_pointer) == 8 % 12
    # Both continue identically: same fixed Z, same memory, same heads.
    indices, rows = torch.tensor([3, 4]), torch.tensor([[3, 0, 5, 5, 9, 1, 2], [4, 4, 8, 19, 0, 1, 7]])
    student, teacher = unit(2, 8, gen), unit(2, 8, gen)
    a = trained.contrast(student, teacher, indices, rows if memory == "bank" else None)
    b = restored.contrast(student, teacher, indices, rows if memory == "bank" else None)
    assert torch.equal(a["student"], b["student"]) and torch.equal(restored.memory, trained.memory)


def test_memory_is_no_buffer_follows_device_moves_and_stays_float32():
    term = built()
    assert "memory" not in dict(term.named_buffers()) and "_extra_state" in term.state_dict()
    term.to(torch.float64)
    assert term.student_embed.weight.dtype == torch.float64
    assert term.memory.dtype == torch.float32 and term.normalizers.dtype == torch.float32
    term.to("meta")
    assert term.memory.device.type == "meta" and term.normalizers.device.type == "meta"


def test_bank_more_negatives_than_rows_samples_with_replacement():
    term = built(train_size=4, nce_k=50)
    losses = term.loss(batch(torch.tensor([0, 3]), torch.Generator().manual_seed(8)))
    assert all(torch.isfinite(value) for value in losses.values())
    rows = term.sample_contrast_indices(torch.tensor([2, 1]))
    assert rows.shape == (2, 51) and rows[:, 0].tolist() == [2, 1] and 0 <= int(rows.min()) <= int(rows.max()) < 4


def draw_counts(labels: list[int], nce_k: int, rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Negatives of every bank row drawn `rounds` times, and the (positive, negative) pair counts."""
    n = len(labels)
    term = built(train_size=n, nce_k=nce_k, negatives="other_class", train_targets=torch.tensor(labels))
    torch.manual_seed(10)
    positives = torch.arange(n).repeat(rounds)
    rows = term.sample_contrast_indices(positives)
    assert rows.shape == (n * rounds, nce_k + 1) and torch.equal(rows[:, 0], positives)
    pairs = torch.zeros(n, n, dtype=torch.long)
    pairs.index_put_((positives.repeat_interleave(nce_k), rows[:, 1:].flatten()), torch.tensor(1), accumulate=True)
    return rows, pairs


@pytest.mark.parametrize(("labels", "nce_k"), [
    ([0, 2, 1, 1, 0, 2, 2, 0, 1, 0, 1, 2], 5),    # 8 other-class samples per row: drawn without replacement
    ([0, 2, 1, 1, 0, 2, 2, 0, 1, 0, 1, 2], 20),   # more negatives than the pool: with replacement
    ([1, 2, 0, 1, 2, 1, 2, 0, 1, 2, 1, 2], 8),    # pools 10 (class 0) and 7: per row, both ways in one batch
])
def test_other_class_negatives_are_uniform_over_the_other_classes(labels, nce_k):
    rounds = 400
    rows, pairs = draw_counts(labels, nce_k, rounds)
    label = torch.tensor(labels)
    assert not bool((label[rows[:, 1:]] == label[rows[:, :1]]).any()), "a negative shares the positive's class"
    for i, own in enumerate(labels):
        pool = [j for j, other in enumerate(labels) if other != own]
        mine = rows[rows[:, 0] == i, 1:]
        if nce_k <= len(pool):  # RepDistiller: np.random.choice(pool, k, replace=k > len(pool))
            assert all(len(set(row)) == nce_k for row in mine.tolist()), (i, "repeated negative")
        expected = rounds * nce_k / len(pool)
        counts = pairs[i, pool].double()
        assert counts.sum().item() == rounds * nce_k
        assert expected * 0.7 < counts.min().item() and counts.max().item() < expected * 1.3, (i, counts.tolist())


def test_other_class_bank_loss_trains_with_labels():
    labels = torch.arange(20) % 4
    term = built(train_size=20, nce_k=12, negatives="other_class", train_targets=labels)
    losses = term.loss(batch(torch.tensor([0, 5, 19]), torch.Generator().manual_seed(11)))
    assert all(torch.isfinite(value) for value in losses.values())
    (losses["student"] + losses["teacher"]).backward()
    assert term.student_embed.weight.grad.abs().sum() > 0


def test_other_class_errors_name_the_fix():
    with pytest.raises(ConfigError, match="train_targets"):
        built(negatives="other_class")
    with pytest.raises(ConfigError, match="train_targets"):
        built(train_size=20, negatives="other_class", train_targets=torch.arange(19) % 3)
    with pytest.raises(ConfigError, match="negatives=uniform"):
        built(train_size=20, negatives="other_class", train_targets=torch.zeros(20, dtype=torch.long))
    with pytest.raises(ConfigError, match="negatives"):
        CRD(negatives="hard")
    built("queue", train_size=None, negatives="other_class")  # the queue ignores it, so needs no labels
    assert CRD().negatives == "other_class"


def test_errors_name_the_fix():
    with pytest.raises(ConfigError, match="train_size"):
        built(train_size=None)
    built("queue", train_size=None)  # the queue needs no dataset size
    term = built(train_size=10)
    gen = torch.Generator().manual_seed(9)
    with pytest.raises(ConfigError, match=r"index 10 \(min 1\).*10 rows.*train_size"):
        term.check_batch("crd", torch.tensor([1, 10]))
    with pytest.raises(ConfigError, match="index 3 \\(min -1\\)"):
        term.check_batch("crd", torch.tensor([3, -1]))
    term.check_batch("crd", torch.tensor([0, 9]))
    built("queue", train_size=None).check_batch("crd", torch.tensor([10**6]))  # the queue reads no indices
    with pytest.raises(ConfigError, match="data module"):
        term.loss(batch(None, gen, size=2))
    with pytest.raises(ConfigError, match="queue"):
        CRD(memory="ring")
    with pytest.raises(ConfigError, match="nce_m"):
        CRD(nce_m=1.0)
    with pytest.raises(ConfigError, match="train_size"):
        built(train_size=12).load_state_dict(term.state_dict())
