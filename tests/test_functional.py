"""Every formula in `kd_lightning.losses.functional` against an independent float64 reference.

The references below are written from the papers' equations and the authors' reference code with NumPy
and plain loops; they share no code with the implementation. Where the authors' code departs from the
paper, the reference follows the code (those are the losses the published weights were tuned for), and a
separate test pins the departure.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_lightning.losses import functional as Fn

LOGIT_SHAPES = [(2, 10), (5, 10), (5, 100), (16, 100)]
FEATURE_SHAPES = [  # (batch, student C, teacher C, H, W)
    (2, 4, 8, 4, 4),
    (5, 16, 32, 8, 8),
    (16, 8, 8, 6, 3),
]



def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def close(actual: torch.Tensor, expected: float, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert actual.dtype == torch.float32, actual.dtype
    assert actual.ndim == 0, actual.shape
    expected_tensor = torch.tensor(float(expected), dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected_tensor, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- float64 references


def log_softmax_row(z: np.ndarray) -> np.ndarray:
    m = z.max()
    return z - (m + math.log(np.exp(z - m).sum()))


def logsumexp_values(values) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def kl_row(log_p: np.ndarray, log_q: np.ndarray) -> float:
    total = 0.0
    for lp, lq in zip(log_p, log_q):
        p = math.exp(lp)
        if p > 0.0:
            total += p * (lp - lq)
    return total


def ref_kd(s, t, temperature):
    s, t = np64(s), np64(t)
    per_sample = [
        kl_row(log_softmax_row(t[i] / temperature), log_softmax_row(s[i] / temperature)) for i in range(len(s))
    ]
    return temperature**2 * sum(per_sample) / len(s)


def ref_fitnet(s, t):
    s, t = np64(s).ravel(), np64(t).ravel()
    return sum((a - b) ** 2 for a, b in zip(s, t)) / len(s)


def ref_attention_map(f, p):
    f = np64(f)
    b, c = f.shape[:2]
    out = []
    for i in range(b):
        a = sum(f[i, k] ** p for k in range(c)) / c
        a = a.ravel()
        out.append(a / max(math.sqrt((a * a).sum()), 1e-12))
    return np.stack(out)


def ref_attention_transfer(s, t, p):
    q_s, q_t = ref_attention_map(s, p), ref_attention_map(t, p)
    return ((q_s - q_t) ** 2).sum() / q_s.size


def ref_dkd_parts(s, t, target, temperature, mask_value=1000.0):
    """TCKD on [p_gt, Σ_{k≠gt} p_k] and NCKD on softmax(z/T − mask·onehot), per mdistiller, T²·batch mean.

    mask_value=None gives the paper's NCKD: a softmax over the non-target classes only.
    """
    s, t, target = np64(s), np64(t), target.tolist()
    tckd = nckd = 0.0
    for i, g in enumerate(target):
        zs, zt = s[i] / temperature, t[i] / temperature
        others = [k for k in range(len(zs)) if k != g]

        def binary(z):
            norm = logsumexp_values(list(z))
            return np.array([z[g] - norm, logsumexp_values([z[k] for k in others]) - norm])

        tckd += kl_row(binary(zt), binary(zs))
        if mask_value is None:
            nckd += kl_row(log_softmax_row(zt[others]), log_softmax_row(zs[others]))
        else:
            shift = np.zeros_like(zs)
            shift[g] = mask_value
            nckd += kl_row(log_softmax_row(zt - shift), log_softmax_row(zs - shift))
    n = len(target)
    return temperature**2 * tckd / n, temperature**2 * nckd / n


def ref_dkd(s, t, target, alpha, beta, temperature):
    tckd, nckd = ref_dkd_parts(s, t, target, temperature)
    return alpha * tckd + beta * nckd


def pearson_eps(x: np.ndarray, y: np.ndarray, eps: float = 1e-8) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc * yc).sum() / (math.sqrt((xc * xc).sum()) * math.sqrt((yc * yc).sum()) + eps))


def ref_dist(s, t, beta, gamma, temperature):
    s, t = np64(s), np64(t)
    y_s = np.stack([np.exp(log_softmax_row(r / temperature)) for r in s])
    y_t = np.stack([np.exp(log_softmax_row(r / temperature)) for r in t])
    b, c = y_s.shape
    inter = 1.0 - sum(pearson_eps(y_s[i], y_t[i]) for i in range(b)) / b
    intra = 1.0 - sum(pearson_eps(y_s[:, j], y_t[:, j]) for j in range(c)) / c
    return temperature**2 * (beta * inter + gamma * intra)


def ref_kd_standardized(s, t, temperature):
    def zscore(z):
        mean = z.sum() / len(z)
        std = math.sqrt(((z - mean) ** 2).sum() / (len(z) - 1))  # Bessel-corrected, as the authors' torch.std
        return (z - mean) / (std + 1e-7)

    s, t = np64(s), np64(t)
    per_sample = [
        kl_row(log_softmax_row(zscore(t[i]) / temperature), log_softmax_row(zscore(s[i]) / temperature))
        for i in range(len(s))
    ]
    return temperature**2 * sum(per_sample) / len(s)


def ref_similarity_preserving(s, t):
    def gram(f):
        f = np64(f).reshape(f.shape[0], -1)
        b = len(f)
        g = np.array([[float(np.dot(f[i], f[j])) for j in range(b)] for i in range(b)])
        return np.stack([row / max(math.sqrt((row * row).sum()), 1e-12) for row in g])

    g_s, g_t = gram(s), gram(t)
    b = len(g_s)
    return sum((g_t[i, j] - g_s[i, j]) ** 2 for i in range(b) for j in range(b)) / b**2


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def unit(v: np.ndarray) -> np.ndarray:
    n = math.sqrt((v * v).sum())
    return v / max(n, 1e-12)


def ref_rkd(s, t, distance_weight, angle_weight):
    s, t = np64(s).reshape(s.shape[0], -1), np64(t).reshape(t.shape[0], -1)
    b = len(s)

    def psi_d(e):
        d = np.array([[math.sqrt(((e[i] - e[j]) ** 2).sum()) if i != j else 0.0 for j in range(b)] for i in range(b)])
        mu = d.sum() / (b * (b - 1))
        return d / mu

    def psi_a(e):
        out = np.zeros((b, b, b))
        for i in range(b):
            for j in range(b):
                u = unit(e[j] - e[i])
                for k in range(b):
                    out[i, j, k] = float(np.dot(u, unit(e[k] - e[i])))
        return out

    d_s, d_t = psi_d(s), psi_d(t)
    loss_d = sum(huber(d_s[i, j] - d_t[i, j]) for i in range(b) for j in range(b)) / b**2
    a_s, a_t = psi_a(s), psi_a(t)
    loss_a = sum(huber(x - y) for x, y in zip(a_s.ravel(), a_t.ravel())) / b**3
    return distance_weight * loss_d + angle_weight * loss_a


def ref_pkt(s, t, eps):
    def conditional(e):
        e = np64(e).reshape(e.shape[0], -1)
        b = len(e)
        normed = [row / (math.sqrt((row * row).sum()) + eps) for row in e]
        k = np.array([[(float(np.dot(normed[i], normed[j])) + 1.0) / 2.0 for j in range(b)] for i in range(b)])
        return k / k.sum(axis=1, keepdims=True)

    p_s, p_t = conditional(s), conditional(t)
    b = len(p_s)
    return sum(p_t[i, j] * math.log((p_t[i, j] + eps) / (p_s[i, j] + eps)) for i in range(b) for j in range(b)) / b**2


def ref_nst(s, t):
    s, t = np64(s), np64(t)
    total = 0.0
    for n in range(len(s)):
        fs = [unit(ch.ravel()) for ch in s[n]]
        ft = [unit(ch.ravel()) for ch in t[n]]

        def mean_k(a, b):
            return sum(float(np.dot(x, y)) ** 2 for x in a for y in b) / (len(a) * len(b))

        total += mean_k(ft, ft) + mean_k(fs, fs) - 2.0 * mean_k(fs, ft)
    return total / len(s)


# ----------------------------------------------------------------------------- random inputs


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits(shape, seed, scale=3.0):
    g = gen(seed)
    return torch.randn(*shape, generator=g) * scale, torch.randn(*shape, generator=g) * scale


def labels(batch, classes, seed):
    return torch.randint(0, classes, (batch,), generator=gen(seed + 1000))


def features(b, cs, ct, h, w, seed, relu=True):
    g = gen(seed)
    s, t = torch.randn(b, cs, h, w, generator=g), torch.randn(b, ct, h, w, generator=g)
    return (s.relu(), t.relu()) if relu else (s, t)


# ----------------------------------------------------------------------------- existing formulas


@pytest.mark.parametrize("shape", LOGIT_SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_reference(shape, temperature):
    s, t = logits(shape, seed=1)
    close(Fn.kd(s, t, temperature), ref_kd(s, t, temperature))


@pytest.mark.parametrize("shape", [(2, 7), (5, 16, 4, 4), (16, 3, 8, 8)])
def test_fitnet_hint_matches_reference(shape):
    g = gen(2)
    s, t = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    close(Fn.fitnet_hint(s, t), ref_fitnet(s, t))


@pytest.mark.parametrize("b,cs,ct,h,w", FEATURE_SHAPES)
@pytest.mark.parametrize("p", [2.0, 4.0])
def test_attention_map_and_transfer_match_reference(b, cs, ct, h, w, p):
    s, t = features(b, cs, ct, h, w, seed=3)
    expected_map = torch.from_numpy(ref_attention_map(s, p))
    torch.testing.assert_close(Fn.attention_map(s, p).double(), expected_map, rtol=1e-5, atol=1e-6)
    close(Fn.attention_transfer(s, t, p), ref_attention_transfer(s, t, p))


# ----------------------------------------------------------------------------- logit formulas


@pytest.mark.parametrize("shape", LOGIT_SHAPES)
@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 0.5, 1.0)])
def test_dkd_matches_reference(shape, alpha, beta, temperature):
    s, t = logits(shape, seed=4)
    y = labels(shape[0], shape[1], seed=4)
    close(Fn.dkd(s, t, y, alpha, beta, temperature), ref_dkd(s, t, y, alpha, beta, temperature))
    tckd, nckd = Fn.dkd_parts(s, t, y, temperature)
    ref_tckd, ref_nckd = ref_dkd_parts(s, t, y, temperature)
    close(tckd, ref_tckd)
    close(nckd, ref_nckd)


def test_dkd_defaults_are_the_cifar_ones():
    s, t = logits((5, 10), seed=5)
    y = labels(5, 10, seed=5)
    close(Fn.dkd(s, t, y), ref_dkd(s, t, y, 1.0, 8.0, 4.0))


@pytest.mark.parametrize("shape", LOGIT_SHAPES)
def test_dkd_equals_paper_decomposition_for_ordinary_logits(shape):
    """The −1000 mask of the reference equals the paper's softmax over non-target classes here, and
    KD = TCKD + (1 − p_gt^t)·NCKD holds per sample (checked on the batch by weighting NCKD per sample)."""
    s, t = logits(shape, seed=6)
    y = labels(shape[0], shape[1], seed=6)
    _, nckd = Fn.dkd_parts(s, t, y, 4.0)
    _, paper_nckd = ref_dkd_parts(s, t, y, 4.0, mask_value=None)
    close(nckd, paper_nckd)
    # Per-sample identity of the paper, Eq. (1): KD_i = TCKD_i + (1 − p_gt,i^t)·NCKD_i.
    for i in range(shape[0]):
        si, ti, yi = s[i : i + 1], t[i : i + 1], y[i : i + 1]
        tckd_i, nckd_i = Fn.dkd_parts(si, ti, yi, 4.0)
        p_gt_teacher = torch.softmax(ti.double() / 4.0, dim=1)[0, yi].item()
        close(Fn.kd(si, ti, 4.0), tckd_i.item() + (1.0 - p_gt_teacher) * nckd_i.item(), rtol=1e-4, atol=1e-5)


def test_dkd_mask_leaks_for_huge_logit_gaps_like_the_reference():
    """At gaps ≳ 1000·T the reference's −1000 mask no longer removes the target class; we keep that."""
    s = torch.tensor([[0.0, 0.0, 0.0]])
    t = torch.tensor([[8000.0, 0.0, 10.0]])  # target 0: z/T = 2000 survives the −1000 shift
    y = torch.tensor([0])
    _, nckd = Fn.dkd_parts(s, t, y, 4.0)
    _, ref_nckd = ref_dkd_parts(s, t, y, 4.0)
    _, paper_nckd = ref_dkd_parts(s, t, y, 4.0, mask_value=None)
    close(nckd, ref_nckd, rtol=1e-4)
    assert abs(ref_nckd - paper_nckd) > 1.0


@pytest.mark.parametrize("shape", LOGIT_SHAPES)
@pytest.mark.parametrize("beta,gamma,temperature", [(1.0, 1.0, 1.0), (2.0, 2.0, 1.0), (1.0, 3.0, 4.0)])
def test_dist_matches_reference(shape, beta, gamma, temperature):
    s, t = logits(shape, seed=7)
    close(Fn.dist(s, t, beta, gamma, temperature), ref_dist(s, t, beta, gamma, temperature))


@pytest.mark.parametrize("shape", LOGIT_SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_standardized_matches_reference(shape, temperature):
    s, t = logits(shape, seed=8)
    close(Fn.kd_standardized(s, t, temperature), ref_kd_standardized(s, t, temperature))


def test_kd_standardized_is_invariant_to_per_sample_shift_and_scale():
    s, t = logits((5, 100), seed=9)
    scale = torch.rand(5, 1, generator=gen(9)) * 10 + 0.1
    shift = torch.randn(5, 1, generator=gen(10)) * 50
    torch.testing.assert_close(Fn.kd_standardized(s * scale + shift, t), Fn.kd_standardized(s, t), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- feature / embedding formulas


@pytest.mark.parametrize("b,cs,ct,h,w", FEATURE_SHAPES)
def test_similarity_preserving_matches_reference(b, cs, ct, h, w):
    s, t = features(b, cs, ct, h, w, seed=11)
    close(Fn.similarity_preserving(s, t), ref_similarity_preserving(s, t))
    # Different resolutions are allowed: only the b×b similarity matrices are compared.
    t_small = t[:, :, : max(1, h // 2)]
    close(Fn.similarity_preserving(s, t_small), ref_similarity_preserving(s, t_small))


@pytest.mark.parametrize(
    "b,ds,dt,weights",
    [(2, 8, 8, (25.0, 50.0)), (5, 16, 32, (25.0, 50.0)), (5, 16, 32, (1.0, 2.0)), (16, 64, 128, (25.0, 50.0))],
)
def test_rkd_matches_reference(b, ds, dt, weights):
    g = gen(12)
    s, t = torch.randn(b, ds, generator=g), torch.randn(b, dt, generator=g) * 3
    close(Fn.rkd(s, t, *weights), ref_rkd(s, t, *weights), rtol=1e-5, atol=1e-5)


def test_rkd_defaults_and_feature_maps_are_flattened():
    s, t = features(5, 4, 8, 3, 3, seed=13, relu=False)
    close(Fn.rkd(s, t), ref_rkd(s, t, 25.0, 50.0), rtol=1e-5, atol=1e-5)


def test_rkd_duplicate_samples_stay_finite():
    g = gen(14)
    s, t = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    s[3] = s[1]
    s.requires_grad_(True)
    loss = Fn.rkd(s, t)
    loss.backward()
    # The 1e-12 clamp gives the duplicate pair a tiny distance instead of 0: the value barely moves.
    close(loss.detach(), ref_rkd(s, t, 25.0, 50.0), rtol=1e-4, atol=1e-3)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("b,ds,dt", [(2, 8, 8), (5, 16, 32), (16, 64, 128)])
@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_pkt_matches_reference(b, ds, dt, eps):
    g = gen(15)
    s, t = torch.randn(b, ds, generator=g), torch.randn(b, dt, generator=g)
    close(Fn.pkt(s, t, eps), ref_pkt(s, t, eps))


def test_pkt_zero_embedding_row_is_handled():
    g = gen(16)
    s, t = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    s[2] = 0.0
    close(Fn.pkt(s, t), ref_pkt(s, t, 1e-7))


@pytest.mark.parametrize("b,cs,ct,h,w", FEATURE_SHAPES)
def test_nst_matches_reference(b, cs, ct, h, w):
    s, t = features(b, cs, ct, h, w, seed=17)
    close(Fn.nst(s, t), ref_nst(s, t))


def test_nst_rejects_different_spatial_sizes():
    s, t = features(2, 4, 4, 4, 4, seed=18)
    with pytest.raises(ValueError, match="spatial"):
        Fn.nst(s, t[:, :, :2, :2])


# ----------------------------------------------------------------------------- edge cases

LOGIT_LOSSES = {
    "kd": lambda s, t, y: Fn.kd(s, t),
    "dkd": lambda s, t, y: Fn.dkd(s, t, y),
    "dist": lambda s, t, y: Fn.dist(s, t),
    "dist_T4": lambda s, t, y: Fn.dist(s, t, temperature=4.0),
    "kd_standardized": lambda s, t, y: Fn.kd_standardized(s, t),
}
LOGIT_REFS = {
    "kd": lambda s, t, y: ref_kd(s, t, 4.0),
    "dkd": lambda s, t, y: ref_dkd(s, t, y, 1.0, 8.0, 4.0),
    "dist": lambda s, t, y: ref_dist(s, t, 1.0, 1.0, 1.0),
    "dist_T4": lambda s, t, y: ref_dist(s, t, 1.0, 1.0, 4.0),
    "kd_standardized": lambda s, t, y: ref_kd_standardized(s, t, 2.0),
}
EMBEDDING_LOSSES = {
    "fitnet_hint": Fn.fitnet_hint,
    "similarity_preserving": Fn.similarity_preserving,
    "rkd": Fn.rkd,
    "pkt": Fn.pkt,
}
EMBEDDING_REFS = {
    "fitnet_hint": ref_fitnet,
    "similarity_preserving": ref_similarity_preserving,
    "rkd": lambda s, t: ref_rkd(s, t, 25.0, 50.0),
    "pkt": lambda s, t: ref_pkt(s, t, 1e-7),
}
MAP_LOSSES = {
    "attention_transfer": Fn.attention_transfer,
    "similarity_preserving": Fn.similarity_preserving,
    "nst": Fn.nst,
    "fitnet_hint": Fn.fitnet_hint,
}
MAP_REFS = {
    "attention_transfer": lambda s, t: ref_attention_transfer(s, t, 2.0),
    "similarity_preserving": ref_similarity_preserving,
    "nst": ref_nst,
    "fitnet_hint": ref_fitnet,
}


@pytest.mark.parametrize("name", LOGIT_LOSSES)
@pytest.mark.parametrize("batch", [1, 2])
def test_logit_losses_small_batches(name, batch):
    s, t = logits((batch, 10), seed=20)
    y = labels(batch, 10, seed=20)
    close(LOGIT_LOSSES[name](s, t, y), LOGIT_REFS[name](s, t, y))


def test_dist_batch_of_one_has_constant_intra_term():
    s, t = logits((1, 10), seed=21)
    # One sample: each class column has a single entry, its centred vector is 0, correlation 0 by the eps.
    close(Fn.dist(s, t, beta=0.0, gamma=1.0, temperature=2.0), 4.0)
    close(Fn.dist(s, s, beta=1.0, gamma=1.0), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", EMBEDDING_LOSSES)
@pytest.mark.parametrize("batch", [1, 2])
def test_embedding_losses_small_batches(name, batch):
    g = gen(22)
    s, t = torch.randn(batch, 12, generator=g), torch.randn(batch, 12, generator=g)
    if name == "rkd" and batch == 1:
        with pytest.raises(ValueError, match="batch of 1"):
            Fn.rkd(s, t)
        return
    close(EMBEDDING_LOSSES[name](s, t), EMBEDDING_REFS[name](s, t), atol=1e-5)


@pytest.mark.parametrize("name", MAP_LOSSES)
def test_map_losses_batch_of_one(name):
    s, t = features(1, 6, 6, 4, 4, seed=23)
    close(MAP_LOSSES[name](s, t), MAP_REFS[name](s, t))


def test_batch_of_one_and_two_known_constants():
    g = gen(24)
    s, t = torch.randn(1, 12, generator=g), torch.randn(1, 12, generator=g)
    close(Fn.similarity_preserving(s, t), 0.0)  # G = [[1]] on both sides
    close(Fn.pkt(s, t), 0.0)  # P = [[1]] on both sides
    s2, t2 = torch.randn(2, 12, generator=g), torch.randn(2, 12, generator=g)
    close(Fn.rkd(s2, t2), 0.0)  # one pair normalises to 1, every triplet is degenerate


@pytest.mark.parametrize("name", LOGIT_LOSSES)
@pytest.mark.parametrize("shape", [(2, 10), (16, 100)])
def test_logit_losses_vanish_for_identical_inputs(name, shape):
    s, _ = logits(shape, seed=25)
    y = labels(shape[0], shape[1], seed=25)
    loss = LOGIT_LOSSES[name](s, s.clone(), y)
    if name.startswith("dist"):
        # Not exactly 0: the reference's 1e-8 in the Pearson denominator leaves Σ eps/(‖y‖² + eps) per
        # row/column, which matters for the low-variance columns of small probabilities.
        # At T=4 and batch 2 this is 0.06: the known constant, not a bug.
        close(loss, LOGIT_REFS[name](s, s, y), rtol=1e-3, atol=1e-6)
    else:
        close(loss, 0.0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(set(EMBEDDING_LOSSES) | set(MAP_LOSSES)))
def test_feature_losses_vanish_for_identical_inputs(name):
    s, _ = features(5, 8, 8, 4, 4, seed=26)
    loss = (MAP_LOSSES.get(name) or EMBEDDING_LOSSES[name])(s, s.clone())
    close(loss, 0.0, atol=1e-5)


def large_logits(shape, seed, kind):
    g = gen(seed)
    if kind == "300randn":
        s, t = torch.randn(*shape, generator=g) * 300, torch.randn(*shape, generator=g) * 300
    else:  # ±1e4 with random signs and a little jitter so there are no exact ties
        s = torch.where(torch.rand(*shape, generator=g) < 0.5, -1e4, 1e4) + torch.randn(*shape, generator=g) * 100
        t = torch.where(torch.rand(*shape, generator=g) < 0.5, -1e4, 1e4) + torch.randn(*shape, generator=g) * 100
    return s.bfloat16(), t.bfloat16()


@pytest.mark.parametrize("name", LOGIT_LOSSES)
@pytest.mark.parametrize("kind", ["300randn", "1e4"])
@pytest.mark.parametrize("shape", [(5, 10), (16, 100)])
def test_logit_losses_bf16_large_logits(name, kind, shape):
    s, t = large_logits(shape, seed=27, kind=kind)
    y = labels(shape[0], shape[1], seed=27)
    loss = LOGIT_LOSSES[name](s, t, y)
    assert torch.isfinite(loss)
    close(loss, LOGIT_REFS[name](s, t, y), rtol=1e-4, atol=1e-4)  # reference on the same upcast values


@pytest.mark.parametrize("name", MAP_LOSSES)
def test_map_losses_bf16_large_values(name):
    g = gen(28)
    s = (torch.randn(4, 8, 6, 6, generator=g) * 300).bfloat16()
    t = (torch.randn(4, 8, 6, 6, generator=g) * 300).bfloat16()
    loss = MAP_LOSSES[name](s, t)
    assert torch.isfinite(loss)
    close(loss, MAP_REFS[name](s, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", EMBEDDING_LOSSES)
def test_embedding_losses_bf16_large_values(name):
    g = gen(29)
    s = (torch.randn(8, 32, generator=g) * 300).bfloat16()
    t = (torch.randn(8, 32, generator=g) * 1e4).bfloat16()
    loss = EMBEDDING_LOSSES[name](s, t)
    assert torch.isfinite(loss)
    close(loss, EMBEDDING_REFS[name](s, t), rtol=1e-4, atol=1e-4)


def test_losses_reject_undefined_shapes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        Fn.dkd(torch.randn(3, 1), torch.randn(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 classes"):
        Fn.kd_standardized(torch.randn(3, 1), torch.randn(3, 1))
    with pytest.raises(ValueError, match="same shape"):
        Fn.dist(torch.randn(3, 10), torch.randn(4, 10))
    with pytest.raises(ValueError, match="labels"):
        Fn.dkd(torch.randn(3, 10), torch.randn(3, 10), torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------- gradients

GRADIENT_CASES = {
    "kd": (lambda s, t: Fn.kd(s, t), "logits"),
    "dkd": (lambda s, t: Fn.dkd(s, t, torch.tensor([0, 3, 9, 3, 1])), "logits"),
    "dkd_parts": (lambda s, t: sum(Fn.dkd_parts(s, t, torch.tensor([0, 3, 9, 3, 1]))), "logits"),
    "dist": (lambda s, t: Fn.dist(s, t), "logits"),
    "kd_standardized": (lambda s, t: Fn.kd_standardized(s, t), "logits"),
    "fitnet_hint": (Fn.fitnet_hint, "maps"),
    "attention_transfer": (Fn.attention_transfer, "maps"),
    "similarity_preserving": (Fn.similarity_preserving, "maps"),
    "nst": (Fn.nst, "maps"),
    "rkd": (Fn.rkd, "embeddings"),
    "pkt": (Fn.pkt, "embeddings"),
}


@pytest.mark.parametrize("name", GRADIENT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_reaches_student_only(name, dtype):
    fn, kind = GRADIENT_CASES[name]
    g = gen(30)
    shape = {"logits": (5, 10), "maps": (5, 4, 3, 3), "embeddings": (5, 16)}[kind]
    s = torch.randn(*shape, generator=g)
    t = torch.randn(*shape, generator=g)
    if kind == "maps":
        s, t = s.relu() + 0.1, t.relu() + 0.1
    s = s.to(dtype).requires_grad_(True)
    t = t.to(dtype)
    loss = fn(s, t)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and s.grad.dtype == dtype
    assert torch.isfinite(s.grad.float()).all()
    assert s.grad.float().abs().sum() > 0
    assert t.grad is None and not t.requires_grad


@pytest.mark.parametrize("name", ["rkd", "nst"])
def test_teacher_gets_no_gradient_even_if_it_requires_grad(name):
    """RKD and NST compute the teacher-only parts without gradient, as their reference code does."""
    g = gen(31)
    if name == "rkd":
        s, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    else:
        s, t = torch.randn(3, 4, 3, 3, generator=g), torch.randn(3, 4, 3, 3, generator=g)
    s.requires_grad_(True)
    t.requires_grad_(True)
    getattr(Fn, name)(s, t).backward()
    assert torch.isfinite(s.grad).all()
    if name == "rkd":
        assert t.grad is None
    else:  # NST's cross term depends on the teacher (as in RepDistiller); only the t–t term is detached.
        assert t.grad is not None


@pytest.mark.parametrize("batch", [1, 2])
def test_small_batch_gradients_are_finite(batch):
    g = gen(32)
    s = torch.randn(batch, 10, generator=g).requires_grad_(True)
    t = torch.randn(batch, 10, generator=g)
    y = torch.zeros(batch, dtype=torch.long)
    total = Fn.dist(s, t) + Fn.dkd(s, t, y) + Fn.kd_standardized(s, t) + Fn.pkt(s, t) + Fn.similarity_preserving(s, t)
    if batch > 1:
        total = total + Fn.rkd(s, t)
    total.backward()
    assert torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------- OFA-KD


def ref_ofa(s, t, y, eps, temperature, form="code"):
    """Hao et al. NeurIPS 2023. form="code": Hao840/OFAKD `ofa_loss`, weights (p_t + onehot)^eps − onehot;
    form="paper": the paper's −(1 + p_t,y)^γ log p_s,y − Σ_{c≠y} p_t,c log p_s,c. Batch mean, no T²."""
    s, t, y = np64(s), np64(t), y.tolist()
    total = 0.0
    for i in range(len(s)):
        log_p_s = log_softmax_row(s[i] / temperature)
        p_t = np.exp(log_softmax_row(t[i] / temperature))
        for c in range(len(p_t)):
            if c == y[i]:
                weight = (1.0 + p_t[c]) ** eps - (1.0 if form == "code" else 0.0)
            else:
                weight = p_t[c] ** eps if form == "code" else p_t[c]
            total -= weight * log_p_s[c]
    return total / len(s)


@pytest.mark.parametrize("shape", LOGIT_SHAPES)
@pytest.mark.parametrize("eps,temperature", [(1.0, 1.0), (1.5, 1.0), (2.0, 4.0), (0.5, 2.0)])
def test_ofa_target_enhanced_matches_the_reference_code(shape, eps, temperature):
    s, t = logits(shape, seed=31)
    y = labels(shape[0], shape[1], seed=31)
    close(Fn.ofa_target_enhanced(s, t, y, eps, temperature), ref_ofa(s, t, y, eps, temperature))


def test_ofa_target_enhanced_departs_from_the_paper_equation_as_documented():
    """At eps=1 the code's loss is the soft-target cross-entropy and the paper's is that plus hard-label CE;
    for eps≠1 they differ beyond that CE, in the exponentiated non-target weights."""
    s, t = logits((16, 100), seed=32)
    y = labels(16, 100, seed=32)
    hard_ce = float(-np.mean([log_softmax_row(row)[label] for row, label in zip(np64(s), y.tolist())]))
    close(Fn.ofa_target_enhanced(s, t, y, 1.0), ref_ofa(s, t, y, 1.0, 1.0, form="paper") - hard_ce)
    close(Fn.ofa_target_enhanced(s, t, y, 1.0), Fn.soft_cross_entropy(s, t, temperature=1.0).item())
    code, paper = ref_ofa(s, t, y, 1.5, 1.0), ref_ofa(s, t, y, 1.5, 1.0, form="paper")
    assert abs((paper - hard_ce) - code) > 1e-2


def test_ofa_target_enhanced_stays_finite_where_the_student_probability_underflows():
    # log(softmax) of the reference code would be −inf here and the loss +inf; log_softmax keeps it finite.
    s = torch.tensor([[200.0, -200.0, 0.0]])
    t = torch.tensor([[0.0, 5.0, 0.0]])
    loss = Fn.ofa_target_enhanced(s, t, torch.tensor([1]), 1.5)
    assert torch.isfinite(loss)
    close(loss, ref_ofa(s, t, torch.tensor([1]), 1.5, 1.0), rtol=1e-6)
# ----------------------------------------------------------------------------- cross-modal / two-view methods


def ref_supervision_transfer(s, t):
    # Gupta et al. 2016's f = L2 between the teacher's and the transformed student's features, reduced as the
    # element mean (the convention the implementation documents).
    s, t = np64(s).ravel(), np64(t).ravel()
    return sum((a - b) ** 2 for a, b in zip(s, t)) / len(s)


@pytest.mark.parametrize("shape", [(2, 7), (5, 16, 4, 4), (3, 8, 2, 5)])
def test_supervision_transfer_matches_reference(shape):
    g = gen(3)
    s, t = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    close(Fn.supervision_transfer(s, t), ref_supervision_transfer(s, t))


def test_supervision_transfer_refuses_unmatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        Fn.supervision_transfer(torch.zeros(2, 4, 3, 3), torch.zeros(2, 8, 3, 3))


def ref_probabilities(z: np.ndarray, temperature: float) -> np.ndarray:
    return np.array([np.exp(log_softmax_row(row / temperature)) for row in z])


def ref_kd64(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    rows = [kl_row(log_softmax_row(t[i] / temperature), log_softmax_row(s[i] / temperature)) for i in range(len(s))]
    return temperature**2 * sum(rows) / len(s)


def ref_cc(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    # KD_ours.py cc_loss: ((Pt^T Pt - Ps^T Ps)^2).sum() / class_num, written out entry by entry.
    ps, pt = ref_probabilities(s, temperature), ref_probabilities(t, temperature)
    batch, classes = s.shape
    total = 0.0
    for a in range(classes):
        for b in range(classes):
            gap = sum(pt[i, a] * pt[i, b] for i in range(batch)) - sum(ps[i, a] * ps[i, b] for i in range(batch))
            total += gap**2
    return total / classes


def ref_bc(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    # KD_ours.py bc_loss: ((Pt Pt^T - Ps Ps^T)^2).sum() / batch_size.
    ps, pt = ref_probabilities(s, temperature), ref_probabilities(t, temperature)
    batch, classes = s.shape
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            gap = sum(pt[i, k] * pt[j, k] for k in range(classes)) - sum(ps[i, k] * ps[j, k] for k in range(classes))
            total += gap**2
    return total / batch


def ref_mlkd(sw, ss, tw, ts, temperature, percentile):
    """Jin-Ying/Multi-Level-Logit-Distillation KD_ours.forward_train, line by line, without the KD weight."""
    sw, ss, tw, ts = np64(sw), np64(ss), np64(tw), np64(ts)
    p_teacher = ref_probabilities(tw, 1.0)
    confidence = p_teacher.max(axis=1)
    mask = confidence <= np.percentile(confidence, percentile)
    class_confidence = p_teacher.sum(axis=0)
    class_mask = class_confidence <= np.percentile(class_confidence, percentile)
    temperatures = [temperature, 3.0, 5.0, 2.0, 6.0]
    # `kd_loss(...) * mask` multiplies an already batch-averaged scalar by the mask, then `.mean()`.
    kd_weak = sum(np.mean(ref_kd64(sw, tw, T) * mask) for T in temperatures)
    kd_strong = (ref_kd64(ss, ts, temperature) + ref_kd64(ss, ts, 3.0) + ref_kd64(ss, ts, 5.0)
                 + ref_kd64(sw, tw, 2.0) + ref_kd64(sw, tw, 6.0))
    cc_weak = sum(np.mean(ref_cc(sw, tw, T) * class_mask) for T in temperatures)
    bc_weak = sum(np.mean(ref_bc(sw, tw, T) * mask) for T in temperatures)
    return {"instance": kd_weak + kd_strong, "class": cc_weak, "batch": bc_weak}


def four_logits(shape, seed):
    g = gen(seed)
    return [torch.randn(*shape, generator=g) * 3.0 for _ in range(4)]


@pytest.mark.parametrize("shape", [(2, 10), (5, 10), (8, 17)])
@pytest.mark.parametrize("temperature, percentile", [(4.0, 50.0), (1.0, 30.0)])
def test_mlkd_matches_the_reference_code(shape, temperature, percentile):
    sw, ss, tw, ts = four_logits(shape, seed=5)
    actual = Fn.mlkd_loss(sw, ss, tw, ts, temperature=temperature, percentile=percentile)
    expected = ref_mlkd(sw, ss, tw, ts, temperature, percentile)
    assert sorted(actual) == sorted(expected)
    for part in expected:
        close(actual[part], expected[part], rtol=1e-5, atol=1e-6)


def test_mlkd_class_and_batch_levels_read_the_weak_view_only_and_masks_enter_as_shares():
    # The reference returns only the weak view's class and batch terms; its masks scale reduced losses.
    sw, ss, tw, ts = four_logits((8, 10), seed=6)
    base = Fn.mlkd_loss(sw, ss, tw, ts)
    moved = Fn.mlkd_loss(sw, ss * 2 + 1, tw, ts * 0.5)
    torch.testing.assert_close(moved["class"], base["class"])
    torch.testing.assert_close(moved["batch"], base["batch"])
    everything = Fn.mlkd_loss(sw, ss, tw, ts, percentile=100.0)  # every sample and class kept: share 1
    half_samples = base["batch"] / everything["batch"]
    torch.testing.assert_close(half_samples, torch.tensor(0.5))  # 4 of 8 distinct confidences ≤ the median
