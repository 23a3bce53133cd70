"""Response- and relation-based terms (DKD, KD/DKD + logit standardization, DIST, SP, RKD, PKT, CC, NST).

The formulas themselves are pinned in test_functional.py; here each TERM is checked against independent
float64 arithmetic written from the papers and the authors' reference code (NumPy, plain loops): that it
reads the right logits and taps, splits and scales its parts, standardises logits, embeds with its own
weights, ramps in, and refuses taps of the wrong kind with an error that names the fix.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms import CC, DIST, DKD, KD, NST, PKT, RKD, SP, BuildContext, DistillInputs
from kd_lightning.models import build_model
from kd_lightning.pipeline import build_terms
from kd_lightning.schemes import Offline
from kd_lightning.teachers import FrozenTeacher



def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def close(actual: torch.Tensor, expected: float, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert actual.ndim == 0, actual.shape
    expected_tensor = torch.tensor(float(expected), dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected_tensor, rtol=rtol, atol=atol)


def logits_inputs(batch: int, classes: int, seed: int, scale: float = 3.0) -> DistillInputs:
    g = torch.Generator().manual_seed(seed)
    return DistillInputs(student_logits=scale * torch.randn(batch, classes, generator=g),
                         teacher_logits=scale * torch.randn(batch, classes, generator=g),
                         targets=torch.randint(0, classes, (batch,), generator=g),
                         indices=torch.arange(batch))


def feature_inputs(student: dict[str, tuple[int, ...]], teacher: dict[str, tuple[int, ...]], seed: int,
                   batch: int) -> tuple[DistillInputs, BuildContext]:
    g = torch.Generator().manual_seed(seed)
    s_feats = {tap: torch.rand(batch, *shape, generator=g) for tap, shape in student.items()}
    t_feats = {tap: torch.rand(batch, *shape, generator=g) for tap, shape in teacher.items()}
    inputs = DistillInputs(student_logits=torch.randn(batch, 10, generator=g),
                           teacher_logits=torch.randn(batch, 10, generator=g),
                           targets=torch.zeros(batch, dtype=torch.long), indices=torch.arange(batch),
                           student_features=s_feats, teacher_features=t_feats)
    context = BuildContext(student_shapes={k: v.shape for k, v in s_feats.items()},
                           teacher_shapes={k: v.shape for k, v in t_feats.items()}, num_classes=10)
    return inputs, context


# ----------------------------------------------------------------------------- float64 references


def softmax_rows(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def zscore_rows(z: np.ndarray) -> np.ndarray:
    # Sun et al.'s `normalize`: torch's Bessel-corrected std, 1e-7 added to it.
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)


def kd_reference(z_s: np.ndarray, z_t: np.ndarray, T: float) -> float:
    p_s, p_t = softmax_rows(z_s / T), softmax_rows(z_t / T)
    return T * T * float(np.mean([kl(p_t[i], p_s[i]) for i in range(len(z_s))]))


def dkd_reference(z_s: np.ndarray, z_t: np.ndarray, target: np.ndarray, T: float) -> tuple[float, float]:
    """(TCKD, NCKD) per Zhao et al. with mdistiller's T² and batch mean; NCKD over the non-target classes."""
    tckd, nckd = [], []
    for i, gt in enumerate(target):
        p_s, p_t = softmax_rows(z_s[i:i + 1] / T)[0], softmax_rows(z_t[i:i + 1] / T)[0]
        tckd.append(kl(np.array([p_t[gt], 1 - p_t[gt]]), np.array([p_s[gt], 1 - p_s[gt]])))
        others = [k for k in range(z_s.shape[1]) if k != gt]
        q_s = softmax_rows(z_s[i:i + 1, others] / T)[0]
        q_t = softmax_rows(z_t[i:i + 1, others] / T)[0]
        nckd.append(kl(q_t, q_s))
    return T * T * float(np.mean(tckd)), T * T * float(np.mean(nckd))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def sp_reference(f_s: np.ndarray, f_t: np.ndarray) -> float:
    b = f_s.shape[0]

    def gram(f: np.ndarray) -> np.ndarray:
        q = f.reshape(b, -1)
        g = q @ q.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    return float(((gram(f_t) - gram(f_s)) ** 2).sum() / (b * b))


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def rkd_reference(e_s: np.ndarray, e_t: np.ndarray, w_d: float, w_a: float) -> float:
    b = len(e_s)

    def distances(e: np.ndarray) -> np.ndarray:
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(b)] for i in range(b)])
        return d / (d.sum() / (b * (b - 1)))

    def unit(v: np.ndarray) -> np.ndarray:
        n = np.linalg.norm(v)
        return v / n if n > 1e-12 else np.zeros_like(v)

    def angles(e: np.ndarray) -> np.ndarray:
        return np.array([[[unit(e[j] - e[i]) @ unit(e[k] - e[i]) for k in range(b)] for j in range(b)]
                         for i in range(b)])

    d_loss = np.mean([huber(x) for x in (distances(e_s) - distances(e_t)).ravel()])
    a_loss = np.mean([huber(x) for x in (angles(e_s) - angles(e_t)).ravel()])
    return w_d * float(d_loss) + w_a * float(a_loss)


def pkt_reference(e_s: np.ndarray, e_t: np.ndarray, eps: float = 1e-7) -> float:
    def probabilities(e: np.ndarray) -> np.ndarray:
        u = e / (np.linalg.norm(e, axis=1, keepdims=True) + eps)
        k = (u @ u.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    p_s, p_t = probabilities(e_s), probabilities(e_t)
    return float(np.mean(p_t * np.log((p_t + eps) / (p_s + eps))))


def nst_reference(f_s: np.ndarray, f_t: np.ndarray) -> float:
    """Squared MMD with k(x, y) = (xᵀy)² over L2-normalised channel maps, averaged over the batch."""
    total = 0.0
    for s, t in zip(f_s, f_t):
        s = s.reshape(s.shape[0], -1)
        t = t.reshape(t.shape[0], -1)
        s = s / np.linalg.norm(s, axis=1, keepdims=True)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        total += ((t @ t.T) ** 2).mean() + ((s @ s.T) ** 2).mean() - 2 * ((s @ t.T) ** 2).mean()
    return total / len(f_s)


def avg_pool(f: np.ndarray, k: int) -> np.ndarray:
    n, c, h, w = f.shape
    return f.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5))


# ----------------------------------------------------------------------------- response-based


@pytest.mark.parametrize("batch, classes, alpha, beta, T", [(2, 10, 1.0, 8.0, 4.0), (6, 100, 0.5, 3.0, 2.0)])
def test_dkd_returns_both_parts_scaled_by_alpha_and_beta(batch, classes, alpha, beta, T):
    inputs = logits_inputs(batch, classes, seed=batch)
    parts = DKD(alpha=alpha, beta=beta, temperature=T).loss(inputs)
    assert set(parts) == {"tckd", "nckd"}
    tckd, nckd = dkd_reference(np64(inputs.student_logits), np64(inputs.teacher_logits), inputs.targets.numpy(), T)
    close(parts["tckd"], alpha * tckd)
    close(parts["nckd"], beta * nckd)


def test_dkd_reads_the_targets():
    inputs = logits_inputs(5, 10, seed=1)
    moved = DistillInputs(**{**vars(inputs), "targets": (inputs.targets + 1) % 10})
    assert not torch.allclose(DKD().loss(inputs)["nckd"], DKD().loss(moved)["nckd"])


@pytest.mark.parametrize("batch, classes", [(3, 10), (8, 100)])
def test_dkd_logit_standardization_z_scores_both_logits_first(batch, classes):
    inputs = logits_inputs(batch, classes, seed=7, scale=5.0)
    parts = DKD(alpha=9.0, beta=72.0, temperature=2.0, logit_standardization=True).loss(inputs)
    tckd, nckd = dkd_reference(zscore_rows(np64(inputs.student_logits)), zscore_rows(np64(inputs.teacher_logits)),
                               inputs.targets.numpy(), 2.0)
    close(parts["tckd"], 9.0 * tckd, rtol=1e-4)
    close(parts["nckd"], 72.0 * nckd, rtol=1e-4)
    # Standardised DKD ignores each vector's own scale and shift; plain DKD does not.
    rescaled = DistillInputs(**{**vars(inputs), "student_logits": 4.0 * inputs.student_logits - 2.0,
                                "teacher_logits": 0.5 * inputs.teacher_logits + 1.0})
    standardized = DKD(logit_standardization=True)
    for part in ("tckd", "nckd"):
        torch.testing.assert_close(standardized.loss(rescaled)[part], standardized.loss(inputs)[part],
                                   rtol=1e-4, atol=1e-5)
    assert not torch.allclose(DKD().loss(rescaled)["nckd"], DKD().loss(inputs)["nckd"], rtol=1e-3)


def test_dkd_warm_up_is_mdistillers_ramp():
    term = DKD(weight=9.0, warmup_epochs=20)
    # mdistiller: min(epoch / 20, 1) over 1-based epochs; the scheme counts epochs from 0.
    for epoch in (0, 4, 9, 18, 19, 20, 100):
        assert term.weight_at(epoch) == pytest.approx(9.0 * min((epoch + 1) / 20, 1.0))
    assert DKD(warmup_epochs=0).weight_at(0) == 1.0


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_without_standardization_is_unchanged(T):
    inputs = logits_inputs(4, 10, seed=3)
    close(KD(temperature=T).loss(inputs), kd_reference(np64(inputs.student_logits), np64(inputs.teacher_logits), T))


@pytest.mark.parametrize("batch, classes", [(2, 10), (6, 100)])
def test_kd_logit_standardization(batch, classes):
    inputs = logits_inputs(batch, classes, seed=11, scale=4.0)
    term = KD(weight=9.0, temperature=2.0, logit_standardization=True)
    expected = kd_reference(zscore_rows(np64(inputs.student_logits)), zscore_rows(np64(inputs.teacher_logits)), 2.0)
    close(term.loss(inputs), expected)
    rescaled = DistillInputs(**{**vars(inputs), "student_logits": 3.0 * inputs.student_logits + 5.0})
    torch.testing.assert_close(term.loss(rescaled), term.loss(inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch, classes, beta, gamma, T", [(4, 10, 1.0, 1.0, 4.0), (16, 100, 2.0, 0.5, 1.0)])
def test_dist_parts_are_inter_and_intra_class_relations(batch, classes, beta, gamma, T):
    inputs = logits_inputs(batch, classes, seed=5)
    parts = DIST(beta=beta, gamma=gamma, temperature=T).loss(inputs)
    assert set(parts) == {"inter", "intra"}
    y_s, y_t = softmax_rows(np64(inputs.student_logits) / T), softmax_rows(np64(inputs.teacher_logits) / T)
    inter = 1 - np.mean([pearson(y_s[i], y_t[i]) for i in range(batch)])
    intra = 1 - np.mean([pearson(y_s[:, j], y_t[:, j]) for j in range(classes)])
    close(parts["inter"], T * T * beta * inter, rtol=1e-4)
    close(parts["intra"], T * T * gamma * intra, rtol=1e-4)


def test_dist_computes_the_softmaxes_once_for_both_parts(monkeypatch):
    calls = []
    softmax = torch.nn.functional.softmax
    monkeypatch.setattr(torch.nn.functional, "softmax", lambda *args, **kwargs: calls.append(1) or softmax(*args, **kwargs))
    DIST().loss(logits_inputs(4, 10, seed=6))
    assert len(calls) == 2  # one per network, not one per network per logged part


# ----------------------------------------------------------------------------- relation-based


def test_sp_last_stage_alias_expands_to_each_models_deepest_stage():
    term = SP()
    term.expand_taps(["stage1", "stage2", "stage3"], ["stage1", "stage2", "stage3", "stage4"])
    assert (term.student_taps, term.teacher_taps) == (["stage3"], ["stage4"])
    explicit = SP(student_taps=["stage1", "last_stage"], teacher_taps=["stages"])
    explicit.expand_taps(["stage1", "stage2"], ["stage1", "stage2"])
    assert (explicit.student_taps, explicit.teacher_taps) == (["stage1", "stage2"], ["stage1", "stage2"])


def test_sp_last_stage_needs_declared_stages():
    with pytest.raises(ConfigError, match="declares no stages"):
        SP().expand_taps([], ["stage1"])


@pytest.mark.parametrize("batch", [3, 8])
def test_sp_sums_the_tap_pairs_it_names(batch):
    student = {"stage1": (4, 8, 8), "stage2": (8, 4, 4), "penultimate": (8,)}
    teacher = {"stage1": (6, 8, 8), "stage2": (16, 2, 2), "penultimate": (16,)}
    inputs, context = feature_inputs(student, teacher, seed=batch, batch=batch)
    term = SP(student_taps=["stage1", "stage2"], teacher_taps=["stage1", "stage2"])
    term.check("sp", context)
    s, t = inputs.student_features, inputs.teacher_features
    expected = sp_reference(np64(s["stage1"]), np64(t["stage1"])) + sp_reference(np64(s["stage2"]), np64(t["stage2"]))
    close(term.loss(inputs), expected)
    one = SP(student_taps="stage2", teacher_taps="stage2").loss(inputs)
    close(one, sp_reference(np64(s["stage2"]), np64(t["stage2"])))


def test_sp_refuses_unpaired_taps():
    _, context = feature_inputs({"stage1": (4, 4, 4), "stage2": (4, 2, 2)}, {"stage2": (4, 2, 2)}, seed=0, batch=2)
    with pytest.raises(ConfigError, match=r"distill\.sp\.student_taps"):
        SP(student_taps=["stage1", "stage2"], teacher_taps=["stage2"]).check("sp", context)


@pytest.mark.parametrize("batch, w_d, w_a", [(3, 25.0, 50.0), (6, 1.0, 2.0)])
def test_rkd_uses_the_penultimate_embeddings(batch, w_d, w_a):
    inputs, context = feature_inputs({"penultimate": (5,), "stage2": (4, 2, 2)}, {"penultimate": (7,)}, seed=batch,
                                     batch=batch)
    term = RKD(distance_weight=w_d, angle_weight=w_a)
    term.check("rkd", context)
    expected = rkd_reference(np64(inputs.student_features["penultimate"]),
                             np64(inputs.teacher_features["penultimate"]), w_d, w_a)
    close(term.loss(inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [2, 9])
def test_pkt_uses_the_penultimate_embeddings(batch):
    inputs, context = feature_inputs({"penultimate": (12,)}, {"penultimate": (20,)}, seed=batch, batch=batch)
    term = PKT()
    term.check("pkt", context)
    expected = pkt_reference(np64(inputs.student_features["penultimate"]), np64(inputs.teacher_features["penultimate"]))
    close(term.loss(inputs), expected, rtol=1e-3, atol=1e-8)  # float32 log-ratios of near-equal probabilities


@pytest.mark.parametrize("term, name", [(RKD(student_tap="stage2"), "rkd"), (PKT(student_tap="stage2"), "pkt"),
                                        (CC(student_tap="stage2"), "cc")])
def test_embedding_terms_refuse_spatial_maps(term, name):
    _, context = feature_inputs({"stage2": (4, 2, 2)}, {"penultimate": (8,)}, seed=0, batch=2)
    term.build(context)
    with pytest.raises(ConfigError, match=rf"distill\.{name}\.student_tap=penultimate"):
        term.check(name, context)


@pytest.mark.parametrize("batch, feat_dim", [(2, 3), (7, 128)])
def test_cc_embeds_both_sides_with_its_own_linear_maps(batch, feat_dim):
    inputs, context = feature_inputs({"penultimate": (6,)}, {"penultimate": (9,)}, seed=batch, batch=batch)
    term = CC(feat_dim=feat_dim)
    term.build(context)
    term.check("cc", context)
    rng = np.random.default_rng(batch)
    w_s, b_s = rng.normal(size=(feat_dim, 6)), rng.normal(size=feat_dim)
    w_t, b_t = rng.normal(size=(feat_dim, 9)), rng.normal(size=feat_dim)
    with torch.no_grad():
        for layer, w, b in ((term.embed_student, w_s, b_s), (term.embed_teacher, w_t, b_t)):
            layer.weight.copy_(torch.from_numpy(w))
            layer.bias.copy_(torch.from_numpy(b))
    e_s = np64(inputs.student_features["penultimate"]) @ w_s.T + b_s
    e_t = np64(inputs.teacher_features["penultimate"]) @ w_t.T + b_t
    gap = np.abs(e_s - e_t)
    expected = np.mean([gap[i] @ gap[i + 1] for i in range(batch - 1)])
    value = term.loss(inputs)
    close(value, expected, rtol=1e-4)
    value.backward()
    assert term.embed_student.weight.grad.abs().sum() > 0 and term.embed_teacher.weight.grad.abs().sum() > 0


def test_cc_needs_a_batch_of_two():
    inputs, context = feature_inputs({"penultimate": (6,)}, {"penultimate": (6,)}, seed=0, batch=1)
    term = CC(feat_dim=4)
    term.build(context)
    with pytest.raises(ValueError, match="at least 2"):
        term.loss(inputs)


@pytest.mark.parametrize("batch", [2, 5])
def test_nst_pools_the_larger_map_and_sums_stage_pairs(batch):
    student = {"stage1": (4, 8, 8), "stage2": (8, 4, 4)}
    teacher = {"stage1": (6, 4, 4), "stage2": (12, 4, 4)}
    inputs, context = feature_inputs(student, teacher, seed=batch, batch=batch)
    term = NST(student_taps=["stage1", "stage2"], teacher_taps=["stage1", "stage2"])
    term.check("nst", context)
    s, t = inputs.student_features, inputs.teacher_features
    expected = (nst_reference(avg_pool(np64(s["stage1"]), 2), np64(t["stage1"]))
                + nst_reference(np64(s["stage2"]), np64(t["stage2"])))
    close(term.loss(inputs), expected, rtol=1e-4, atol=1e-6)


def test_nst_refuses_embeddings_and_unpaired_stages():
    _, context = feature_inputs({"stage1": (4, 4, 4), "penultimate": (8,)}, {"stage1": (4, 4, 4)}, seed=0, batch=2)
    with pytest.raises(ConfigError, match=r"a map and a vector.*penultimate"):
        NST(student_taps="penultimate", teacher_taps="stage1").check("nst", context)
    _, vectors = feature_inputs({"penultimate": (8,)}, {"penultimate": (8,)}, seed=0, batch=2)
    with pytest.raises(ConfigError, match=r"distill\.nst\.student_taps=stages"):
        NST(student_taps="penultimate", teacher_taps="penultimate").check("nst", vectors)
    with pytest.raises(ConfigError, match="counts differ"):
        NST(student_taps=["stage1", "stage1"], teacher_taps=["stage1"]).check("nst", context)


# ----------------------------------------------------------------------------- inside the scheme


def offline(terms: dict) -> Offline:
    torch.manual_seed(0)
    return Offline(student=build_model("convnet_small", num_classes=10, in_channels=1),
                   teacher=FrozenTeacher(build_model("convnet_large", num_classes=10, in_channels=1)), terms=terms,
                   num_classes=10, example_input=torch.randn(2, 1, 8, 8),
                   optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def test_scheme_logs_dkd_parts_with_the_warm_up_factor():
    module = offline({"dkd": DKD(weight=2.0, alpha=0.5, beta=4.0, warmup_epochs=20)})
    images, targets = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    losses = module.training_losses(images, targets, torch.arange(6))
    with torch.no_grad():
        z_s, z_t = module.student(images), module.teacher(images)
    tckd, nckd = dkd_reference(np64(z_s), np64(z_t), targets.numpy(), 4.0)
    factor = 2.0 * (0 + 1) / 20  # epoch 0 of a 20-epoch ramp
    close(losses["dkd_tckd"], factor * 0.5 * tckd, rtol=1e-4)
    close(losses["dkd_nckd"], factor * 4.0 * nckd, rtol=1e-4)


def test_scheme_expands_last_stage_and_refuses_maps_for_embedding_terms():
    module = offline({"sp": SP()})
    assert (module.terms["sp"].student_taps, module.terms["sp"].teacher_taps) == (["stage2"], ["stage2"])
    with pytest.raises(ConfigError, match=r"distill\.cc\.teacher_tap=penultimate"):
        offline({"cc": CC(teacher_tap="stage1")})


# ----------------------------------------------------------------------------- published settings


@pytest.mark.parametrize("name, cls, settings, ce_weight", [
    ("dkd", DKD, {"weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20,
                  "logit_standardization": False}, 1.0),
    ("dkd_ls", DKD, {"weight": 9.0, "alpha": 1.0, "beta": 8.0, "temperature": 2.0, "warmup_epochs": 20,
                     "logit_standardization": True}, 1.0),
    ("kd_ls", KD, {"weight": 9.0, "temperature": 2.0, "logit_standardization": True}, 0.1),
    ("dist", DIST, {"weight": 2.0, "beta": 1.0, "gamma": 1.0, "temperature": 4.0}, 1.0),
    ("sp", SP, {"weight": 3000.0, "student_taps": ["last_stage"], "teacher_taps": ["last_stage"]}, 1.0),
    ("rkd", RKD, {"weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0, "student_taps": ["penultimate"]}, 1.0),
    ("pkt", PKT, {"weight": 30000.0, "student_taps": ["penultimate"], "teacher_taps": ["penultimate"]}, 1.0),
    ("cc", CC, {"weight": 0.02, "feat_dim": 128, "student_taps": ["penultimate"]}, 1.0),
    ("nst", NST, {"weight": 50.0, "student_taps": ["stages"], "teacher_taps": ["stages"]}, 1.0),
])
def test_configs_carry_the_published_cifar100_settings(make_cfg, name, cls, settings, ce_weight):
    cfg = make_cfg(f"distill=[{name}]")
    term = build_terms(cfg)[name]
    assert type(term) is cls
    for key, value in settings.items():
        assert getattr(term, key) == value, key
    assert term.recipe_ce_weight == ce_weight and cfg.scheme.ce_weight is None
