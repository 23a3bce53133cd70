"""Pure distillation formulas: tensors in, scalar loss out, paper defaults as keyword defaults.

Each function reproduces its authors' reference code, so published loss weights apply unchanged; the
docstring says where that code departs from the paper's text. No Lightning, no state, no parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

    T² · KL(softmax(teacher/T) ‖ softmax(student/T)), summed over classes and averaged over the batch.
    The T² factor keeps gradient magnitudes comparable across temperatures (paper, section 2). Computed
    in float32 so that large logits under bf16 autocast do not lose the small probabilities.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


def kd_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """`kd` before the batch mean: one T²·KL(teacher ‖ student) per sample, shape (B,).

    What schemes that weight each sample's loss need (CA-MKD's per-teacher confidence, DistillKL with
    `is_ca=True` in Rorozhl/CA-MKD); its mean is `kd`.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1) * temperature**2


def fitnet_hint(student_regressed: Tensor, teacher_feature: Tensor) -> Tensor:
    """Romero et al., "FitNets: Hints for Thin Deep Nets" (2015): ‖W_r(student) − teacher‖².

    The paper writes ½‖·‖² summed; the reference code (RepDistiller `HintLoss`) uses the element mean
    of the squared error, which is what the published weight (100 on CIFAR-100) was tuned for.
    """
    return F.mse_loss(student_regressed.float(), teacher_feature.float())


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention of Zagoruyko & Komodakis: mean over channels of |A|^p, flattened, L2-normalised."""
    attention = feature.float().pow(p).mean(dim=1).flatten(1)
    return F.normalize(attention, dim=1)


def attention_transfer(student_feature: Tensor, teacher_feature: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017), for one feature pair.

    mean over batch and positions of (Q_s − Q_t)², with Q = normalize(mean_c |A|^p). The paper writes
    β/2 · ‖Q_s − Q_t‖_p summed over pairs; the authors' code (and RepDistiller, whose β=1000 is the
    published CIFAR-100 weight) uses the squared difference averaged over batch and positions, and mean
    rather than sum over channels (identical after normalisation). Spatial sizes must match; a model
    pair with different resolutions is resized by the term, not here. Uses A^p like the reference code,
    which equals |A|^p for the even p and non-negative (post-ReLU) features AT is applied to.
    """
    return (attention_map(student_feature, p) - attention_map(teacher_feature, p)).pow(2).mean()


def _kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ over dim 1 of p·(log p − log q) for log-probabilities; entries with p = 0 contribute 0 (xlogy)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=1)


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, name: str, min_classes: int = 1) -> None:
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{name} expects student and teacher logits of the same shape (batch, classes); got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
        )
    if student_logits.shape[1] < min_classes:
        raise ValueError(
            f"{name} needs at least {min_classes} classes; got logits of shape {tuple(student_logits.shape)}."
        )


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
              temperature: float = 4.0) -> tuple[Tensor, Tensor]:
    """Unweighted (TCKD, NCKD) of Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).

    TCKD = T² · mean_i KL(b_t ‖ b_s), b = [p_gt, 1 − p_gt] the binary target/non-target split of
    softmax(z/T); NCKD = T² · mean_i KL(p̂_t ‖ p̂_s), p̂ = softmax(z/T − 1000·onehot(gt)). See `dkd` for
    where this (the authors' mdistiller `dkd_loss`) departs from the paper's text. `target` holds class
    indices, any shape with `batch` elements.
    """
    _check_logits(student_logits, teacher_logits, "dkd", min_classes=2)
    batch, num_classes = student_logits.shape
    index = target.reshape(-1, 1).long()
    if index.shape[0] != batch:
        raise ValueError(f"dkd: target has {index.shape[0]} labels for a batch of {batch} logits.")
    gt_mask = torch.zeros((batch, num_classes), dtype=torch.bool, device=student_logits.device)
    gt_mask.scatter_(1, index, True)

    def scaled(logits: Tensor) -> Tensor:
        return logits.float() / temperature

    def binary_log_probs(z: Tensor) -> Tensor:
        # log [p_gt, Σ_{k≠gt} p_k] in log space: the reference's log(sum of probabilities) underflows to
        # log 0 = −inf (and a NaN KL) for large logits; this is the same value wherever the reference is finite.
        log_norm = torch.logsumexp(z, dim=1)
        log_gt = z.gather(1, index).squeeze(1) - log_norm
        log_other = torch.logsumexp(z.masked_fill(gt_mask, float("-inf")), dim=1) - log_norm
        return torch.stack([log_gt, log_other], dim=1)

    z_s, z_t = scaled(student_logits), scaled(teacher_logits)
    tckd = _kl_from_log_probs(binary_log_probs(z_t), binary_log_probs(z_s)).mean() * temperature**2

    # NCKD: the reference masks the target class by subtracting 1000 from z/T, rather than dropping it.
    mask_shift = 1000.0 * gt_mask.float()
    log_p_teacher = F.log_softmax(z_t - mask_shift, dim=1)
    log_p_student = F.log_softmax(z_s - mask_shift, dim=1)
    nckd = _kl_from_log_probs(log_p_teacher, log_p_student).mean() * temperature**2
    return tckd, nckd


def dkd(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0,
        temperature: float = 4.0) -> Tensor:
    """Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022): α·TCKD + β·NCKD.

    The paper rewrites KD = TCKD + (1 − p_gt^T)·NCKD and decouples the weights: TCKD = KL(b_t ‖ b_s) on the
    binary target/non-target probabilities b = [p_gt, 1 − p_gt], NCKD = KL(p̂_t ‖ p̂_s) on the softmax over
    the non-target classes only. Defaults α=1, β=8, T=4 are the CIFAR-100 ones of the authors' mdistiller
    (β=6 for some pairs; ImageNet uses β=0.5, T=1). Reproduces mdistiller's `dkd_loss`, which departs from
    the paper's text in that:

    - both terms are multiplied by T² (as in KD) and summed over classes, averaged over the batch; the
      paper's equations are per-sample and carry no T²;
    - NCKD does not drop the target class: it subtracts 1000 from the target's z/T and takes the softmax
      over all classes. This equals the paper's p̂ unless logit gaps reach about 1000·T, where the target
      class leaks into NCKD; kept so the published β applies;
    - mdistiller multiplies the whole loss by min(epoch / warmup, 1) (warmup 20 epochs on CIFAR-100),
      which the paper does not write; that ramp belongs to the distillation term, not to this formula.

    TCKD is evaluated in log space (logsumexp) rather than as the log of summed probabilities, which gives
    the reference's value wherever that is finite and stays finite for large (e.g. bf16 ±1e4) logits.
    Computed in float32.
    """
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, temperature)
    return alpha * tckd + beta * nckd


def _mean_pearson_rows(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    return ((x * y).sum(dim=1) / (x.norm(dim=1) * y.norm(dim=1) + eps)).mean()


def dist(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0,
         temperature: float = 1.0) -> Tensor:
    """Huang et al., "Knowledge Distillation from A Stronger Teacher" (DIST, NeurIPS 2022).

    With Y = softmax(Z/T) per row: inter-class = 1 − mean over rows (samples) of Pearson(Y_s[i,:], Y_t[i,:]),
    intra-class = 1 − mean over columns (classes) of Pearson(Y_s[:,j], Y_t[:,j]); loss =
    T²·(β·inter + γ·intra). Defaults β=γ=T=1 are the `DIST` module defaults of the authors' code
    (hunto/image_classification_sota, `lib/models/losses/dist_kd.py`); the paper's ImageNet recipe uses
    β=γ=2 with T=1 (the loss weight is applied outside this function).

    As in the authors' code, Pearson is the cosine of the mean-centred vectors with 1e-8 added to the
    product of norms (the paper writes the plain correlation coefficient), so a constant vector has
    correlation 0 instead of an undefined one. In particular, for a batch of one the intra-class term is
    the constant T²·γ (each class column has a single entry) and carries no gradient; the inter-class term
    is still defined. The T² factor is in the released code (`DIST(tau=...)`); its first public release had
    no temperature (T=1, where the factor is 1). Computed in float32.
    """
    inter, intra = dist_parts(student_logits, teacher_logits, temperature)
    return temperature**2 * (beta * inter + gamma * intra)


def dist_parts(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Unweighted (inter-class, intra-class) relation losses of `dist`, without the T² factor."""
    _check_logits(student_logits, teacher_logits, "dist")
    y_s = F.softmax(student_logits.float() / temperature, dim=1)
    y_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return 1.0 - _mean_pearson_rows(y_s, y_t), 1.0 - _mean_pearson_rows(y_s.t(), y_t.t())


def _standardize_logits(logits: Tensor) -> Tensor:
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)  # Bessel-corrected (1/(K−1)), as torch's default in the authors' code
    return (logits - mean) / (std + 1e-7)


def kd_standardized(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024), applied to KD.

    Each logit vector is z-scored over its classes, Z(z) = (z − mean(z)) / (std(z) + 1e-7), and then
    `kd` is applied at the base temperature T: T²·KL(softmax(Z(z_t)/T) ‖ softmax(Z(z_s)/T)), summed over
    classes and averaged over the batch. T=2 is the authors' CIFAR-100 base temperature for KD (their KD
    weight there is 9 with CE 0.1, applied outside this function).

    Matches `normalize` + `kd_loss` of the authors' code (sunshangquan/logit-standardization-KD,
    mdistiller/distillers/KD.py): the standard deviation is torch's Bessel-corrected one (1/(K−1)) where
    the paper's Algorithm 1 writes the 1/K population deviation, the 1e-7 is added to the deviation (not
    in the paper; it makes a constant logit vector standardise to 0, i.e. a uniform distribution), and the
    T² factor of KD is kept although the standardised logits already have unit scale. Needs at least two
    classes. Computed in float32.
    """
    _check_logits(student_logits, teacher_logits, "kd_standardized", min_classes=2)
    return kd(_standardize_logits(student_logits.float()), _standardize_logits(teacher_logits.float()), temperature)


def _batch_gram_normalized(feature: Tensor) -> Tensor:
    flat = feature.float().reshape(feature.shape[0], -1)
    return F.normalize(flat @ flat.t(), dim=1)


def similarity_preserving(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019), for one feature pair.

    G = row-L2-normalised (f fᵀ) with f the (b, −1)-flattened activations; loss = ‖G_t − G_s‖_F² / b².
    Matches the paper's equations for one layer pair and RepDistiller's `Similarity.similarity_loss`
    (whose β=3000 is the published CIFAR-100 weight; the paper's γ); the sum over layer pairs and the
    weight are the term's. The reference returns a 1-element tensor; this returns a scalar. Student and
    teacher may differ in channels and resolution but not in batch size. A batch of one gives 0 (G = [[1]]).
    Computed in float32.
    """
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ValueError(
            f"similarity_preserving needs the same batch size for student and teacher; got "
            f"{student_feature.shape[0]} and {teacher_feature.shape[0]}."
        )
    batch = student_feature.shape[0]
    difference = _batch_gram_normalized(teacher_feature) - _batch_gram_normalized(student_feature)
    return difference.pow(2).sum() / (batch * batch)


def _rkd_pairwise_distances(embedding: Tensor) -> Tensor:
    # As RepDistiller's RKDLoss.pdist: squared distances via the Gram expansion, clamped at 1e-12 before
    # the square root (so duplicate samples give a small positive distance and a finite gradient), and a
    # zeroed diagonal.
    squared_norms = embedding.pow(2).sum(dim=1)
    squared = squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0) - 2.0 * embedding @ embedding.t()
    distances = squared.clamp(min=1e-12).sqrt()
    eye = torch.eye(embedding.shape[0], dtype=torch.bool, device=embedding.device)
    return distances.masked_fill(eye, 0.0)


def _rkd_normalized_distances(embedding: Tensor) -> Tensor:
    distances = _rkd_pairwise_distances(embedding)
    batch = embedding.shape[0]
    # The reference divides by the mean of the positive entries; after the clamp every off-diagonal entry
    # is ≥ 1e-6 > 0, so that is the mean over the b(b−1) off-diagonal pairs (no data-dependent indexing).
    return distances / (distances.sum() / (batch * (batch - 1)))


def _rkd_angles(embedding: Tensor) -> Tensor:
    # angles[i, j, k] = <normalize(e_j − e_i), normalize(e_k − e_i)>, all b³ triplets, degenerate ones included.
    directions = F.normalize(embedding.unsqueeze(0) - embedding.unsqueeze(1), p=2, dim=2)
    return torch.bmm(directions, directions.transpose(1, 2))


def rkd(student_embedding: Tensor, teacher_embedding: Tensor, distance_weight: float = 25.0,
        angle_weight: float = 50.0) -> Tensor:
    """Park et al., "Relational Knowledge Distillation" (CVPR 2019): distance-wise + angle-wise terms.

    Distance: ψ_D(i, j) = ‖e_i − e_j‖ / μ with μ the mean distance over the batch's pairs; Huber (smooth L1,
    δ=1) between student and teacher ψ_D. Angle: ψ_A(i, j, k) = cos of the angle at e_i between e_j and e_k;
    smooth L1 between student and teacher ψ_A. Loss = 25·distance + 50·angle, the weights of the paper's
    classification experiments and RepDistiller. Inputs are flattened to (b, −1); the two embeddings may
    differ in width.

    Matches RepDistiller's `RKDLoss`, which departs from the paper's text in that: the smooth L1 is
    averaged (over the b² distance entries including the zero diagonal, and over all b³ angle triplets
    including the degenerate ones with a repeated index, whose cosine is 0 or 1 on both sides) where the
    paper sums over distinct pairs and triplets; distances come from the Gram expansion with squared
    distances clamped at 1e-12 (so near-duplicate samples get a small positive distance, not 0); and the
    teacher's relations are computed without gradient. Not defined for a batch of one (no pair to average
    the distance over, the reference returns NaN): raises ValueError. A batch of two gives 0 (its one pair
    normalises to 1 on both sides and all its triplets are degenerate). The angle tensor is b×b×b.
    Computed in float32.
    """
    batch = student_embedding.shape[0]
    if teacher_embedding.shape[0] != batch:
        raise ValueError(
            f"rkd needs the same batch size for student and teacher; got {batch} and {teacher_embedding.shape[0]}."
        )
    if batch < 2:
        raise ValueError(
            f"rkd is undefined for a batch of {batch}: the distance term normalises by the mean distance "
            f"over pairs of samples, and there are none. Use batches of at least 2 (drop_last=True)."
        )
    student = student_embedding.float().reshape(batch, -1)
    teacher = teacher_embedding.detach().float().reshape(batch, -1)
    distance_loss = F.smooth_l1_loss(_rkd_normalized_distances(student), _rkd_normalized_distances(teacher))
    angle_loss = F.smooth_l1_loss(_rkd_angles(student).reshape(-1), _rkd_angles(teacher).reshape(-1))
    return distance_weight * distance_loss + angle_weight * angle_loss


def _pkt_conditional_probabilities(embedding: Tensor, eps: float) -> Tensor:
    flat = embedding.float().reshape(embedding.shape[0], -1)
    flat = flat / (flat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    flat = torch.where(torch.isnan(flat), torch.zeros_like(flat), flat)
    kernel = (flat @ flat.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt(student_embedding: Tensor, teacher_embedding: Tensor, eps: float = 1e-7) -> Tensor:
    """Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer" (ECCV 2018).

    Cosine-similarity kernel mapped to [0, 1], K(a, b) = (cos(a, b) + 1) / 2, normalised per row into
    conditional probabilities P[i, j] = K(i, j) / Σ_k K(i, k); loss = KL(P_t ‖ P_s) as
    mean_{i,j} P_t[i, j] · log((P_t[i, j] + eps) / (P_s[i, j] + eps)). Inputs are flattened to (b, −1).

    Matches RepDistiller's `PKT.cosine_similarity_loss` (code from the paper's author; its weight on
    CIFAR-100 is 30000), which departs from the paper's text in that: the row sums include the sample
    itself (K(i, i) = 1), where the paper's conditional probabilities sum over k ≠ i; the divergence is
    the mean over all b² entries rather than the sum; and eps is added to the norms and inside the log
    ratio. A batch of one gives 0. Computed in float32.
    """
    if student_embedding.shape[0] != teacher_embedding.shape[0]:
        raise ValueError(
            f"pkt needs the same batch size for student and teacher; got {student_embedding.shape[0]} and "
            f"{teacher_embedding.shape[0]}."
        )
    p_student = _pkt_conditional_probabilities(student_embedding, eps)
    p_teacher = _pkt_conditional_probabilities(teacher_embedding, eps)
    return (p_teacher * torch.log((p_teacher + eps) / (p_student + eps))).mean()


def nst(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (2017).

    Squared MMD between the sets of channel activation maps, with the polynomial kernel k(x, y) = (xᵀy)²
    (d=2, c=0) on each channel's flattened map L2-normalised over positions:
    MMD² = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') − 2·mean_{i,j} k(s_j, t_i), averaged over
    the batch. This is RepDistiller's `NSTLoss.nst_loss` in its `full_loss=True` variant (its weight on
    CIFAR-100 is 50), which keeps the teacher–teacher term (constant for the student, computed without
    gradient) so that the loss is the MMD² itself: ≥ 0 and 0 for identical features. The paper's weight is
    λ/2 on this MMD². Student and teacher may differ in channels but must have the same number of spatial
    positions; RepDistiller average-pools the larger map first, which is the term's job here, not this
    function's. Computed in float32.
    """
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ValueError(
            f"nst needs the same batch size for student and teacher; got {student_feature.shape[0]} and "
            f"{teacher_feature.shape[0]}."
        )
    student = F.normalize(student_feature.float().flatten(2), dim=2)
    teacher = F.normalize(teacher_feature.float().flatten(2), dim=2)
    if student.shape[2] != teacher.shape[2]:
        raise ValueError(
            f"nst needs feature maps with the same spatial size; got student {tuple(student_feature.shape)} "
            f"and teacher {tuple(teacher_feature.shape)}. Pool the larger one to the smaller first."
        )

    def mean_kernel(a: Tensor, b: Tensor) -> Tensor:
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()

    return mean_kernel(teacher, teacher).detach() + mean_kernel(student, student) - 2.0 * mean_kernel(student, teacher)


def dkd_standardized_parts(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                           temperature: float = 2.0) -> tuple[Tensor, Tensor]:
    """Unweighted (TCKD, NCKD) of DKD on z-scored logits: Sun et al., "Logit Standardization in Knowledge
    Distillation" (CVPR 2024) applied to `dkd_parts`.

    Each logit vector is standardised exactly as in `kd_standardized` (Bessel-corrected deviation, 1e-7
    added to it) and `dkd_parts` is applied at the base temperature. This is the authors' DKD code
    (sunshangquan/logit-standardization-KD, mdistiller/distillers/DKD.py), whose CIFAR-100 recipe is
    α=9, β=72 (DKD's α=1, β=8 times their KD weight 9) at T=2. Needs at least two classes.
    """
    _check_logits(student_logits, teacher_logits, "dkd_standardized_parts", min_classes=2)
    return dkd_parts(_standardize_logits(student_logits.float()), _standardize_logits(teacher_logits.float()),
                     target, temperature)


def correlation_congruence(student_embedded: Tensor, teacher_embedded: Tensor) -> Tensor:
    """Peng et al., "Correlation Congruence for Knowledge Distillation" (ICCV 2019), as benchmarked.

    With δ = |e_s − e_t| the element-wise gap between the (already embedded, same-width) student and teacher
    vectors of a batch, loss = mean over consecutive samples i = 0..b−2 of Σ_d δ[i, d]·δ[i+1, d]. This is
    RepDistiller's `Correlation` ("code emailed to me by the original author"), whose weight on CIFAR-100
    is 0.02. It is NOT the paper's formula: the paper matches b×b instance-correlation matrices,
    ‖ψ(F_t) − ψ(F_s)‖²/b², with ψ a Gaussian RBF kernel approximated by a P=2 Taylor series (γ=0.4), and
    samples class-balanced batches; the benchmarked code instead couples the embedding gaps of neighbouring
    samples in the batch order. Needs a batch of at least two. Computed in float32.
    """
    if student_embedded.ndim != 2 or student_embedded.shape != teacher_embedded.shape:
        raise ValueError(
            f"correlation_congruence expects student and teacher embeddings of the same shape (batch, dim); got "
            f"{tuple(student_embedded.shape)} and {tuple(teacher_embedded.shape)}."
        )
    if student_embedded.shape[0] < 2:
        raise ValueError(
            "correlation_congruence pairs each sample with the next one in the batch and needs a batch of at "
            f"least 2; got {student_embedded.shape[0]}. Use drop_last=True."
        )
    gap = (student_embedded.float() - teacher_embedded.float()).abs()
    return (gap[:-1] * gap[1:]).sum(dim=1).mean()


def contrastive_nce(probabilities: Tensor, noise_size: int, eps: float = 1e-7) -> Tensor:
    """The NCE loss of Tian et al., "Contrastive Representation Distillation" (ICLR 2020), Eq. 18.

    `probabilities` is (B, 1 + K): column 0 the positive's critic value P = exp(<v, m>/τ)/Z, the others
    those of K noise samples drawn uniformly from `noise_size` = M memory rows (Pn = 1/M). With
    D(P) = P / (P + K·Pn), the probability that a pair came from the data rather than the noise:
    loss = −(Σ_b log D(P_b0) + Σ_b Σ_k log(1 − D(P_bk))) / B, summed over negatives and averaged over the
    batch. Matches RepDistiller's `ContrastLoss`, including the eps added to the denominators (not in the
    paper). Computed in float32.
    """
    batch, negatives = probabilities.shape[0], probabilities.shape[1] - 1
    noise = negatives / noise_size
    p = probabilities.float()
    positive = torch.log(p[:, 0] / (p[:, 0] + noise + eps))
    negative = torch.log(noise / (p[:, 1:] + noise + eps))
    return -(positive.sum() + negative.sum()) / batch


FT_FACTORS = ("repdistiller", "paper")


def factor_transfer(student_factor: Tensor, teacher_factor: Tensor, factor: str = "repdistiller") -> Tensor:
    """Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer" (NeurIPS 2018).

    Mean absolute difference of per-sample L2-normalised factor vectors (the paper's p=1), averaged over
    batch and vector entries. factor="repdistiller" (RepDistiller's `FactorTransfer`, p1=2, p2=1): the
    vector is normalize(mean_c F²), a spatial map of the factor flattened to (b, h·w); factor="paper" (the
    paper and its authors' code, `F.normalize(x.view(b, −1))` under `nn.L1Loss`): the whole factor
    flattened to (b, c·h·w). Factors must share batch and spatial size (and, for "paper", channels).
    Computed in float32.
    """
    if factor not in FT_FACTORS:
        raise ValueError(f"factor_transfer's factor must be one of {list(FT_FACTORS)}, got {factor!r}.")
    s_shape, t_shape = tuple(student_factor.shape), tuple(teacher_factor.shape)
    compared = (lambda shape: shape) if factor == "paper" else (lambda shape: shape[:1] + shape[2:])  # drop channels
    if compared(s_shape) != compared(t_shape):
        raise ValueError(f"factor_transfer ({factor}) needs factors of the same "
                         f"{'shape' if factor == 'paper' else 'batch and spatial size'}; got {s_shape} and {t_shape}.")

    def vector(x: Tensor) -> Tensor:
        x = x.float()
        return F.normalize((x.pow(2).mean(1) if factor == "repdistiller" else x).flatten(1), dim=1)

    return (vector(student_factor) - vector(teacher_factor)).abs().mean()


def activation_boundary(student_preact: Tensor, teacher_preact: Tensor, margin: float = 1.0) -> Tensor:
    """Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons"
    (AAAI 2019), for one layer pair: the alternative (hinge-squared) loss on pre-activations.

    Σ (s + μ)²·[s > −μ ∧ t ≤ 0] + (s − μ)²·[s ≤ μ ∧ t > 0] over batch, channels and positions, with s the
    connected student pre-activation and t the teacher's, so a student neuron is pushed past the margin μ
    on the side where the teacher's neuron is active or not. Unnormalised, as RepDistiller's
    `criterion_alternative_l2`; the batch division and scaling belong to the term. Computed in float32.
    """
    if student_preact.shape != teacher_preact.shape:
        raise ValueError(f"activation_boundary needs features of the same shape; got {tuple(student_preact.shape)} "
                         f"and {tuple(teacher_preact.shape)}.")
    s, t = student_preact.float(), teacher_preact.float()
    active = t > 0
    push_down = (s + margin).pow(2) * ((s > -margin) & ~active)
    push_up = (s - margin).pow(2) * ((s <= margin) & active)
    return (push_down + push_up).sum()


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """Yim et al., "A Gift from Knowledge Distillation" (CVPR 2017): the (b, C_top, C_bottom) "flow"
    G[i, j] = mean over positions of top_i · bottom_j between the input and the output of a section.

    When the two maps differ in resolution the larger is average-pooled to the smaller, as RepDistiller's
    `FSP.compute_fsp` (the paper's sections keep the resolution). Computed in float32.
    """
    bottom, top = bottom.float(), top.float()
    if bottom.shape[-2:] != top.shape[-2:]:
        smaller = min(bottom.shape[-2:], top.shape[-2:], key=lambda size: size[0] * size[1])
        bottom, top = F.adaptive_avg_pool2d(bottom, smaller), F.adaptive_avg_pool2d(top, smaller)
    return torch.einsum("bip,bjp->bij", top.flatten(2), bottom.flatten(2)) / top[0, 0].numel()


def variational_information(predicted_mean: Tensor, target: Tensor, variance: Tensor) -> Tensor:
    """Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019).

    The negative log-likelihood of the teacher feature t under N(μ(s), σ²) per channel, without the
    constant: mean of ½·((μ − t)²/σ² + log σ²) over batch, channels and positions (the paper sums over
    channels and positions; the authors' code, via RepDistiller's `VIDLoss`, averages, which is what the
    published weight 1 assumes). `variance` is per channel (C,) and positive. Computed in float32.
    """
    variance = variance.float().view(1, -1, *([1] * (target.ndim - 2)))
    return (0.5 * ((predicted_mean.float() - target.float()).pow(2) / variance + variance.log())).mean()


def ofd_margin(bn_weight: Tensor, bn_bias: Tensor) -> Tensor:
    """The per-channel margin of Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019):
    E[x | x < 0] for x ~ N(β, γ²), the expected negative response of a teacher channel whose pre-ReLU
    feature a BatchNorm2d with weight γ and bias β produced.

    E[x | x < 0] = β − |γ|·φ(β/|γ|)/Φ(−β/|γ|); where Φ(−β/|γ|) ≤ 0.001 (the channel is almost never
    negative) it is −3|γ| instead, as the authors' `get_margin_from_BN`. Computed in float64, returned
    in float32.
    """
    scale, mean = bn_weight.detach().double().abs(), bn_bias.detach().double()
    ratio = mean / scale
    negative_mass = torch.special.ndtr(-ratio)
    density = torch.exp(-ratio.pow(2) / 2) / (2 * torch.pi) ** 0.5
    return torch.where(negative_mass > 0.001, mean - scale * density / negative_mass, -3 * scale).float()


def ofd_partial_l2(student_preact: Tensor, teacher_preact: Tensor, margin: Tensor) -> Tensor:
    """The partial L2 distance of Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019).

    With the teacher's pre-ReLU t clamped from below by its per-channel margin m, t' = max(t, m):
    Σ (s − t')² over the positions where s > t' or t' > 0 (a student response below a negative teacher
    response is not penalised: after the ReLU both are 0). Summed over batch, channels and positions like
    the authors' `distillation_loss`; the division by the batch size and their 1/1000 belong to the term.
    `margin` is per channel (C,). Computed in float32.
    """
    if student_preact.shape != teacher_preact.shape:
        raise ValueError(f"ofd_partial_l2 needs features of the same shape; got {tuple(student_preact.shape)} and "
                         f"{tuple(teacher_preact.shape)}.")
    s = student_preact.float()
    t = torch.maximum(teacher_preact.float(), margin.float().view(1, -1, *([1] * (s.ndim - 2))))
    return ((s - t).pow(2) * ((s > t) | (t > 0))).sum()


def hierarchical_context(student_feature: Tensor, teacher_feature: Tensor,
                         levels: tuple[int, ...] = (4, 2, 1)) -> Tensor:
    """HCL of Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021), for one feature pair.

    MSE at full resolution plus the MSE of the features average-pooled to each level l×l of the pyramid
    (only levels l smaller than the map's height), the k-th used level weighted 2^−k, all divided by the
    sum of the weights: the authors' `hcl` (dvlab-research/ReviewKD, also mdistiller). An 8×8 map thus gets
    (MSE + ½·MSE₄ + ¼·MSE₂ + ⅛·MSE₁)/1.875; a 1×1 map plain MSE. Computed in float32.
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(f"hierarchical_context needs features of the same shape; got "
                         f"{tuple(student_feature.shape)} and {tuple(teacher_feature.shape)}.")
    student, teacher = student_feature.float(), teacher_feature.float()
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for level in levels:
        if level >= student.shape[2]:
            continue
        weight /= 2.0
        pooled = F.adaptive_avg_pool2d(student, level), F.adaptive_avg_pool2d(teacher, level)
        loss = loss + weight * F.mse_loss(*pooled)
        total += weight
    return loss / total


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """BYOT's distillation of a shallow head by the deepest one (Zhang et al., "Be Your Own Teacher", ICCV 2019).

    T² · mean_i −Σ_k softmax(teacher/T)_k · log softmax(student/T)_k: the cross-entropy form of the
    reference code (luanyunteng/pytorch-be-your-own-teacher `kd_loss_function` times T²), which exceeds
    KL by the teacher's entropy — a constant for the student, so the gradients equal KD's. Float32.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    return -(p_teacher * log_p_student).sum(dim=1).mean() * temperature**2


def byot_feature_hint(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """BYOT's feature hint: Σ (f_s − f_t)² over the entries where either is positive, summed (not averaged)
    over batch and channels as in the reference `feature_loss_function`, which is why its weight is 1e-6."""
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(f"byot_feature_hint needs features of the same shape; got {tuple(student_feature.shape)} "
                         f"and {tuple(teacher_feature.shape)}.")
    s, t = student_feature.float(), teacher_feature.float()
    return ((s - t).pow(2) * ((s > 0) | (t > 0))).sum()


def tf_kd_self(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 6.0,
               multiplier: float = 50.0) -> Tensor:
    """Tf-KD_self of Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization" (CVPR 2020).

    multiplier · T² · KL(softmax(t/T) ‖ softmax(s/T)) averaged over batch AND classes: the reference
    `loss_kd_self` uses `nn.KLDivLoss()`, whose default reduction divides by N·K, and its published
    multipliers (50 for ResNet-18 on CIFAR-100) were tuned with that division.
    """
    _check_logits(student_logits, teacher_logits, "tf_kd_self")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return _kl_from_log_probs(log_p_teacher, log_p_student).sum() / student_logits.numel() * temperature**2 * multiplier


def virtual_teacher(targets: Tensor, num_classes: int, correct_prob: float = 0.99) -> Tensor:
    """Tf-KD_reg's hand-made teacher distribution: `correct_prob` on the true class, the rest spread evenly."""
    probs = torch.full((len(targets), num_classes), (1.0 - correct_prob) / (num_classes - 1), device=targets.device)
    return probs.scatter_(1, targets.view(-1, 1), correct_prob)


def tf_kd_reg(student_logits: Tensor, targets: Tensor, temperature: float = 20.0, multiplier: float = 100.0,
              correct_prob: float = 0.99, temper_student: bool = False) -> Tensor:
    """Tf-KD_reg of Yuan et al. (CVPR 2020): KL from a virtual teacher, as the reference `loss_kd_regularization`.

    multiplier · mean over batch and classes of KL(softmax(p_d/T) ‖ softmax(s)), p_d = `virtual_teacher`.
    Two departures of the reference code from the paper's Eq. 9 are kept because the published T=20 and
    multiplier=100 were tuned with them: the temperature divides the teacher's *probabilities* (not
    logits) and is not applied to the student (TF-KD issues #3, #19, #24), and `nn.KLDivLoss()`'s default
    reduction divides by N·K. `temper_student=True` divides the student's logits by T as Eq. 9 writes.
    """
    if student_logits.ndim != 2 or student_logits.shape[1] < 2:
        raise ValueError(f"tf_kd_reg expects logits of shape (batch, classes >= 2); got {tuple(student_logits.shape)}.")
    log_p_teacher = F.log_softmax(virtual_teacher(targets, student_logits.shape[1], correct_prob) / temperature, dim=1)
    student = student_logits.float() / (temperature if temper_student else 1.0)
    log_p_student = F.log_softmax(student, dim=1)
    return _kl_from_log_probs(log_p_teacher, log_p_student).sum() / student_logits.numel() * multiplier


def softmax_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean teacher's consistency cost (Tarvainen & Valpola, NeurIPS 2017): Σ (softmax(s) − softmax(t))²
    divided by classes and batch, as CuriousAI/mean-teacher `softmax_mse_loss` / minibatch size."""
    _check_logits(student_logits, teacher_logits, "softmax_mse")
    difference = F.softmax(student_logits.float(), dim=1) - F.softmax(teacher_logits.float(), dim=1)
    return difference.pow(2).sum() / student_logits.numel()


def sigmoid_rampup(epoch: int, rampup_epochs: int) -> float:
    """exp(−5 (1 − t)²), t = clip(epoch / rampup_epochs, 0, 1): mean teacher's consistency ramp-up (1 if 0 epochs)."""
    if rampup_epochs == 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0), rampup_epochs) / rampup_epochs
    return float(math.exp(-5.0 * phase * phase))


def l1_logits(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean absolute difference of the logits over batch and classes: DFAD's student loss, and (negated) its
    generator's (Fang et al., "Data-Free Adversarial Distillation", 2019; `F.l1_loss(s_logit, t_logit)`)."""
    return (student_logits.float() - teacher_logits.float()).abs().mean()


def ofa_target_enhanced(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, eps: float = 1.0,
                        temperature: float = 1.0) -> Tensor:
    """OFA-KD's adaptive target-enhanced loss (Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous
    Architectures in Knowledge Distillation", NeurIPS 2023), as the authors' code computes it
    (Hao840/OFAKD `distillers/ofa.py`, `ofa_loss`):

        mean_i −Σ_c w_ic · log softmax(z_s/T)_ic,  w_ic = (p_t,ic + 1[c = y_i])^eps − 1[c = y_i],

    p_t = softmax(z_t/T). The target class gets (1 + p_t,y)^eps − 1, every other class p_t,c^eps; no T²
    factor. The paper writes −(1 + p_t,y)^γ·log p_s,y − Σ_{c≠y} p_t,c·log p_s,c instead: one hard-label
    cross-entropy more on the target and unexponentiated non-target weights. At eps = 1 the code's loss is
    the plain soft-target cross-entropy (KD at T without T², plus the teacher's entropy) and the paper's is
    that plus CE. The code's weights are kept because the published eps and loss weights were tuned with
    them. log_softmax replaces the code's log(softmax(·)), which is −inf once a probability underflows
    (the same value wherever that one is finite). Float32.
    """
    _check_logits(student_logits, teacher_logits, "ofa_target_enhanced")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    target_mask = F.one_hot(target, num_classes=student_logits.shape[1]).to(p_teacher.dtype)
    weights = (p_teacher + target_mask).pow(eps) - target_mask
    return -(weights * log_p_student).sum(dim=1).mean()
def self_attention_relation(first: Tensor, second: Tensor, heads: int) -> Tensor:
    """MiniLMv2's relation logits (Wang et al. 2021, eq. 2 before the softmax): the token vectors (B, N, C) of
    all attention heads, concatenated, are split again into `heads` relation heads of C/heads channels, and
    each head's scaled dot products first_a · second_aᵀ / √(C/heads) give (B, heads, N, N). With `heads` the
    model's own head count, (q, k) is the model's attention logits and (v, v) MiniLM v1's value relation."""
    batch, tokens, channels = first.shape
    if channels % heads:
        raise ValueError(f"{heads} relation heads do not divide {channels} channels")
    width = channels // heads
    first = first.float().reshape(batch, tokens, heads, width).transpose(1, 2)
    second = second.float().reshape(batch, tokens, heads, width).transpose(1, 2)
    return first @ second.transpose(-1, -2) / math.sqrt(width)


def relation_kl(student_relation_logits: Tensor, teacher_relation_logits: Tensor) -> Tensor:
    """KL(softmax(teacher row) ‖ softmax(student row)) for every relation row (B, heads, N, N), averaged over
    batch, heads and rows: MiniLM's 1/(A_h·|x|) Σ_a Σ_t D_KL. In float32: bf16 logits lose the small
    probabilities that the KL weighs."""
    log_student = F.log_softmax(student_relation_logits.float(), dim=-1)
    log_teacher = F.log_softmax(teacher_relation_logits.float(), dim=-1)
    return _row_kl(log_teacher, log_student).mean()


def attention_probability_kl(student_probabilities: Tensor, teacher_probabilities: Tensor) -> Tensor:
    """MiniLM v1's attention transfer on the probabilities a model computed (B, heads, N, N after the
    softmax): KL(teacher row ‖ student row) averaged over batch, heads and rows. A probability that
    underflowed to zero is clamped to the smallest normal float32 before the log, so the loss stays finite."""
    tiny = torch.finfo(torch.float32).tiny
    log_student = student_probabilities.float().clamp_min(tiny).log()
    log_teacher = teacher_probabilities.float().clamp_min(tiny).log()
    return _row_kl(log_teacher, log_student).mean()


def hidden_relation_mse(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """MiniViT's hidden-state relation loss (microsoft/Cream MiniViT/Mini-Swin main.py
    `cal_hidden_relation_loss`): the cosine similarities between a sample's tokens (B, N, N), squared error to
    the teacher's, averaged over entries and multiplied by the token count N (the reference's ×49 is its 7×7
    window), i.e. summed over one axis and averaged over the other two."""
    student = F.normalize(student_hidden.float(), dim=-1)
    teacher = F.normalize(teacher_hidden.float(), dim=-1)
    student_relation = student @ student.transpose(-1, -2)
    teacher_relation = teacher @ teacher.transpose(-1, -2)
    return (student_relation - teacher_relation).pow(2).mean() * student_hidden.shape[1]


def _row_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ over the last dim of p·(log p − log q); entries with p = 0 contribute 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)
def supervision_transfer(student_transformed: Tensor, teacher_feature: Tensor) -> Tensor:
    """Gupta, Hoffman & Malik, "Cross Modal Distillation for Supervision Transfer" (CVPR 2016), eq. 1:
    f(t(I), φ(g(J))) with f the L2 loss, between the teacher's mid-level feature on the labelled modality
    and the (transformed) student's on the paired new one.

    Reduced as the element mean of the squared error (FitNet's `HintLoss` convention), not the sum over the
    feature that the paper's L2 (Caffe's EuclideanLoss, ½·Σ/N) writes: the mean keeps the published
    weight 1 meaningful whatever the tap's size. The two differ by the constant factor 2/(C·H·W), which an
    optimizer's learning rate absorbs when this is the only loss, as in the paper's recipe.
    """
    if student_transformed.shape != teacher_feature.shape:
        raise ValueError(f"supervision_transfer compares features of one shape, got {tuple(student_transformed.shape)} "
                         f"and {tuple(teacher_feature.shape)}")
    return (student_transformed.float() - teacher_feature.float()).pow(2).mean()


# MLKD's temperatures after the configured one, hard-coded in the reference (KD_ours.py: T, 3, 5, 2, 6).
MLKD_EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)


def mlkd_class_alignment(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """MLKD's class level: ‖PₛᵀPₛ − PₜᵀPₜ‖²_F / K, P the B×K predictions at T (reference `cc_loss`)."""
    p_student = F.softmax(student_logits.float() / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    gap = p_teacher.t() @ p_teacher - p_student.t() @ p_student
    return gap.pow(2).sum() / student_logits.shape[1]


def mlkd_batch_alignment(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """MLKD's batch level: ‖PₛPₛᵀ − PₜPₜᵀ‖²_F / B, P the B×K predictions at T (reference `bc_loss`)."""
    p_student = F.softmax(student_logits.float() / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    gap = p_teacher @ p_teacher.t() - p_student @ p_student.t()
    return gap.pow(2).sum() / student_logits.shape[0]


def mlkd_loss(student_weak: Tensor, student_strong: Tensor, teacher_weak: Tensor, teacher_strong: Tensor,
              temperature: float = 4.0, percentile: float = 50.0) -> dict[str, Tensor]:
    """Jin, Wang & Lin, "Multi-level Logit Distillation" (CVPR 2023), as its reference code computes it
    (Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/distillers/KD_ours.py, `forward_train`).

    Returns the three levels unweighted (the reference multiplies each by its KD weight, 0.9 on CIFAR-100),
    each summed over the temperatures Ts = (T, 3, 5, 2, 6) (T: 4 on CIFAR-100, 1 on ImageNet):

    - instance: r·Σ_Ts KD(s_w, t_w, T) + Σ_{T, 3, 5} KD(s_s, t_s, T) + Σ_{2, 6} KD(s_w, t_w, T);
    - class:    r_c·Σ_Ts class_alignment(s_w, t_w, T);
    - batch:    r·Σ_Ts batch_alignment(s_w, t_w, T);

    with KD the batch-mean T²·KL and r, r_c the confidence masks of the teacher's weak-view predictions p:
    r the share of samples whose max_k p ≤ its `percentile` (linear interpolation, as np.percentile), r_c the
    share of classes whose Σ_batch p ≤ its percentile. Three departures of the code from the paper are kept,
    because the published results were trained with them: the masks multiply losses that are already
    reduced to scalars (the `reduce=False` arguments are commented out), so a mask enters only as the share
    r of kept samples (≈ ½), not sample by sample; the strong view's instance term reads the weak logits at
    T = 2 and 6; and the class- and batch-level terms of the strong view are computed but never returned,
    so only the weak view's count. The thresholds are taken on the device (`torch.quantile`), not on the host.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    temperatures = (float(temperature), *MLKD_EXTRA_TEMPERATURES)
    p_teacher = F.softmax(teacher_weak.detach().float(), dim=1)
    confidence = p_teacher.max(dim=1).values
    sample_share = (confidence <= torch.quantile(confidence, percentile / 100.0)).float().mean()
    class_confidence = p_teacher.sum(dim=0)
    class_share = (class_confidence <= torch.quantile(class_confidence, percentile / 100.0)).float().mean()
    weak_instance = sum(kd(student_weak, teacher_weak, t) for t in temperatures)
    strong_instance = (sum(kd(student_strong, teacher_strong, t) for t in temperatures[:3])
                       + sum(kd(student_weak, teacher_weak, t) for t in temperatures[3:]))
    return {
        "instance": sample_share * weak_instance + strong_instance,
        "class": class_share * sum(mlkd_class_alignment(student_weak, teacher_weak, t) for t in temperatures),
        "batch": sample_share * sum(mlkd_batch_alignment(student_weak, teacher_weak, t) for t in temperatures),
    }
