from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import BuildContext, DistillInputs, DistillTerm

MEMORIES = ("bank", "queue")
NEGATIVES = ("other_class", "uniform")
STUDENT, TEACHER = 0, 1  # the two halves of `memory`: past student embeddings, past teacher embeddings


class CRD(DistillTerm):
    """Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation" (ICLR 2020).

    Linear heads + L2 norm map the student's and teacher's `penultimate` features to unit vectors of
    `feat_dim`. Each is contrasted against memorised embeddings of the other network with the critic
    P = exp(<v, m>/τ)/Z and the NCE loss of the paper's Eq. 18 (`functional.contrastive_nce`, noise
    Pn = 1/M): the student anchor against the teacher memory plus the teacher anchor against the
    student memory, returned as the parts `student` and `teacher` (the second trains only the teacher's
    head). Defaults are RepDistiller's CIFAR-100 ones: weight 0.8 with CE 1, feat_dim 128, 16384
    negatives, τ 0.07, memory momentum 0.5.

    Follows RepDistiller (`crd/memory.py`, `crd/criterion.py`) rather than the paper's text, so the
    weight 0.8 applies: the paper's critic is e/(e + N/M) with e = exp(<v, m>/τ); the code divides e by a
    constant Z instead, estimated once from the first batch as mean(e)·M and never updated (kept in
    checkpoints; averaged over ranks under DDP). The positive is the memory row of the sample itself,
    i.e. the other network's momentum-averaged embedding from the sample's previous visits, not its
    current one.

    negatives="other_class" (bank only; RepDistiller's CIFAR-100 script, whose `CIFAR100InstanceSample`
    with mode='exact' hands the memory its negatives): each sample's `nce_k` negatives are drawn uniformly
    from the training samples of the other classes, without replacement unless `nce_k` exceeds that pool
    (the script's `np.random.choice(..., replace=k > pool)`). Needs the training labels by sample index
    (`BuildContext.train_targets`; kd-train passes `datamodule.train_targets`). Drawn on the device: the
    `nce_k` smallest of B×M uniform keys with the own class masked out (B·M·5 transient bytes: 16 MB at
    B=64 on CIFAR-100, 410 MB at B=64 on ImageNet), or, with replacement, uniform offsets into the other-class
    pool mapped through a class-sorted index table that skips the positive's class. negatives="uniform":
    the reference memory's own sampler (used when the dataset supplies no negatives), uniform over the
    whole bank with replacement, the positive's own row and its class included; it needs no labels.

    memory="bank" (the reference): two tables of M = context.train_size rows, initialised uniformly in
    [−1/√(feat_dim/3), 1/√(feat_dim/3)]; after each batch the rows of its sample indices become
    normalize(nce_m·row + (1 − nce_m)·embedding). Needs sample indices in [0, M). Size
    2·M·feat_dim·4 bytes: CIFAR-100 (50k) 51 MB, ImageNet (1.28M) 1.3 GB. While M <= 32·(nce_k + 1)
    (CIFAR-100 with the defaults) the scores come from the B×M products with the whole table, of which the
    drawn (B, nce_k + 1) are kept: 2·B·M·4 transient bytes (25.6 MB at B=64 on CIFAR-100) instead of the
    reference's 2·B·(nce_k + 1)·feat_dim·4 bytes of gathered rows kept for the backward pass (1.07 GB at
    B=64), and faster; larger banks (ImageNet) gather the rows as the reference does. The update of a
    batch's rows is written when the memory is next read (the next step, a checkpoint), after this step's
    backward pass, which reads the table as it was scored.
    memory="queue" (not in the paper; MoCo-style, He et al. 2020): the `queue_size` most recent embeddings
    of each network, first in first out; every anchor is contrasted against the whole other queue
    (K = queue_size, M = queue_size) and its positive is the other network's current embedding of the same
    sample (detached). Size 2·queue_size·feat_dim·4 bytes (16.8 MB with the defaults), whatever the
    dataset, hence meant for ImageNet-scale data. It ignores nce_k, nce_m and negatives, and does not read
    the indices.

    Nothing in a step waits for the device (no host reads of device values); the range of the sample
    indices is checked on the host, before the batch moves (`check_batch`, called by the scheme).
    Under DDP every rank updates its memory with the embeddings and indices of all ranks (all_gather, the
    per-rank batch sizes exchanged on the host through a CPU group), starting from rank 0's initial
    memory, so the memories stay identical; each rank's loss uses its
    own batch and its own random negatives, drawn independently on each rank. The memory (and the class
    table of other_class) is a plain attribute (not a buffer, which DDP would broadcast every step),
    moved by `_apply`, kept in float32 under dtype casts, and checkpointed through `get_extra_state`
    (the class table is not: it is rebuilt from the labels).
    """

    needs_indices = True

    def __init__(self, weight: float = 0.8, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07,
                 nce_m: float = 0.5, memory: str = "bank", queue_size: int = 16384, negatives: str = "other_class",
                 student_tap: str = "penultimate", teacher_tap: str = "penultimate", warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        if memory not in MEMORIES:
            raise ConfigError(f"distill.crd.memory must be one of {list(MEMORIES)}, got {memory!r}. Use 'bank' "
                              f"(per-sample memory, the paper's) or 'queue' (fixed size, for large datasets).")
        if negatives not in NEGATIVES:
            raise ConfigError(f"distill.crd.negatives must be one of {list(NEGATIVES)}, got {negatives!r}. Use "
                              f"'other_class' (RepDistiller's CIFAR-100 recipe) or 'uniform' (whole bank, no labels).")
        for name, value in (("feat_dim", feat_dim), ("nce_k", nce_k), ("queue_size", queue_size)):
            if value < 1:
                raise ConfigError(f"distill.crd.{name} must be a positive integer, got {value}.")
        if nce_t <= 0 or not 0 <= nce_m < 1:
            raise ConfigError(f"distill.crd needs nce_t > 0 and 0 <= nce_m < 1, got nce_t={nce_t}, nce_m={nce_m}. "
                              f"RepDistiller's defaults are nce_t=0.07, nce_m=0.5.")
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = int(feat_dim), int(nce_k), float(nce_t), float(nce_m)
        self.memory_kind, self.queue_size, self.negatives = memory, int(queue_size), negatives
        self.student_taps, self.teacher_taps = [student_tap], [teacher_tap]
        self.student_embed: nn.Module = nn.Identity()
        self.teacher_embed: nn.Module = nn.Identity()
        self.memory = torch.empty(2, 0, self.feat_dim)
        # other_class negatives: per-row class, rows sorted by class, each class's start and size in that order.
        self.class_table: tuple[Tensor, ...] = ()
        self._draw_distinct = self._draw_repeated = False
        # Z for the student anchor and the teacher anchor; negative until the first batch sets it.
        self.register_buffer("normalizers", torch.full((2,), -1.0))
        if memory == "queue":
            self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self._normalizers_set = False
        self._memory_shared = False

    @property
    def memory(self) -> Tensor:
        """(2, M, feat_dim): past student embeddings, past teacher embeddings, current to the last batch."""
        self._write_pending_update()
        return self._memory

    @memory.setter
    def memory(self, value: Tensor) -> None:
        self._memory = value
        self._pending_update: tuple[Tensor, Tensor] | None = None

    def _write_pending_update(self) -> None:
        if self._pending_update is not None:
            rows, values = self._pending_update
            self._pending_update = None
            # A repeated row gets the same value from each of its entries, so the order does not matter.
            self._memory.index_copy_(1, rows, values)

    @property
    def noise_size(self) -> int:
        """M: the number of memory rows the noise distribution is uniform over."""
        return self._memory.shape[1]

    def build(self, context: BuildContext) -> None:
        s_shape, t_shape = context.student_shapes[self.student_taps[0]], context.teacher_shapes[self.teacher_taps[0]]
        self.student_embed = nn.Linear(math.prod(s_shape[1:]), self.feat_dim)
        self.teacher_embed = nn.Linear(math.prod(t_shape[1:]), self.feat_dim)
        if self.memory_kind == "queue":
            rows = self.queue_size
        elif context.train_size is None:
            raise ConfigError(
                "distill.crd keeps one memory row per training sample, but the training-set size is unknown "
                "(BuildContext.train_size is None). Pass train_size=datamodule.train_size to the scheme (kd-train "
                "does), or use the fixed-size queue: distill=[crd_queue]."
            )
        else:
            rows = int(context.train_size)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        self.memory = torch.rand(2, rows, self.feat_dim).mul_(2 * stdv).sub_(stdv).to(self.normalizers.device)
        if self.memory_kind == "bank" and self.negatives == "other_class":
            table = self._class_table(context.train_targets, rows)
            pools = rows - table[3]
            self._draw_distinct = bool((pools >= self.nce_k).any())
            self._draw_repeated = bool((pools < self.nce_k).any())
            self.class_table = tuple(t.to(self.normalizers.device) for t in table)

    def _class_table(self, targets: Tensor | None, rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if targets is None:
            raise ConfigError(
                "distill.crd.negatives=other_class draws each sample's negatives from the other classes, as "
                "RepDistiller's CIFAR-100 script does, so it needs the training labels, but BuildContext.train_targets "
                "is None. Pass train_targets=datamodule.train_targets to the scheme (kd-train does), or set "
                "distill.crd.negatives=uniform to draw from the whole bank without labels."
            )
        labels = torch.as_tensor(targets).detach().cpu().long().flatten()
        if labels.numel() != rows:
            raise ConfigError(f"distill.crd got {labels.numel()} training labels for a memory bank of {rows} rows "
                              f"(train_size). Pass the labels of the same training split, in sample-index order "
                              f"(datamodule.train_targets).")
        _, labels, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if counts.numel() < 2:
            raise ConfigError("distill.crd.negatives=other_class needs at least two classes in the training split, "
                              "which has one. Set distill.crd.negatives=uniform.")
        return labels, torch.argsort(labels, stable=True), counts.cumsum(0) - counts, counts

    def check_batch(self, name: str, indices: Tensor | None) -> None:
        super().check_batch(name, indices)
        if self.memory_kind != "bank":
            return
        if bool(((indices < 0) | (indices >= self.noise_size)).any()):
            raise ConfigError(
                f"distill.{name} got sample index {int(indices.max())} (min {int(indices.min())}), but its memory "
                f"bank has {self.noise_size} rows, sized by train_size. Pass the training split's size as "
                f"train_size, with indices counted within the training split."
            )

    def embed(self, inputs: DistillInputs) -> tuple[Tensor, Tensor]:
        student = self.student_embed(inputs.student_features[self.student_taps[0]].flatten(1))
        teacher = self.teacher_embed(inputs.teacher_features[self.teacher_taps[0]].flatten(1))
        return F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)

    def loss(self, inputs: DistillInputs) -> dict[str, Tensor]:
        student, teacher = self.embed(inputs)
        return self.contrast(student, teacher, inputs.indices)

    def sample_contrast_indices(self, indices: Tensor) -> Tensor:
        """(B, 1 + nce_k) memory rows: the sample's own row, then its negatives (see `negatives`)."""
        if self.negatives == "uniform":
            drawn = torch.randint(0, self.noise_size, (indices.shape[0], self.nce_k + 1), device=self.memory.device)
            drawn[:, 0] = indices
            return drawn
        return torch.cat([indices.unsqueeze(1), self._other_class_negatives(indices)], dim=1)

    def _other_class_negatives(self, indices: Tensor) -> Tensor:
        labels, by_class, starts, counts = self.class_table
        own = labels[indices]
        pool = self.noise_size - counts[own]
        shape, device = (indices.shape[0], self.nce_k), self.memory.device
        negatives = None
        if self._draw_distinct:
            keys = torch.rand(shape[0], self.noise_size, device=device)
            # 2 exceeds every key, so the own class is never among the k smallest.
            keys.masked_fill_(labels.unsqueeze(0) == own.unsqueeze(1), 2.0)
            negatives = keys.topk(self.nce_k, dim=1, largest=False, sorted=False).indices
        if self._draw_repeated:
            # Modulo bias of a 62-bit draw is below 2^-40 for any bank size.
            offsets = torch.randint(0, 2**62, shape, device=device) % pool.unsqueeze(1)
            start, count = starts[own].unsqueeze(1), counts[own].unsqueeze(1)
            repeated = by_class[offsets + (offsets >= start) * count]
            negatives = repeated if negatives is None else torch.where((pool < self.nce_k).unsqueeze(1), repeated,
                                                                       negatives)
        assert negatives is not None
        return negatives

    def contrast(self, student: Tensor, teacher: Tensor, indices: Tensor | None,
                 contrast_indices: Tensor | None = None) -> dict[str, Tensor]:
        """NCE losses of unit embeddings (B, feat_dim) against the memory, then the memory update.

        `contrast_indices` (bank only) replaces the random draw, e.g. to recompute a loss exactly.
        """
        self._share_initial_memory()
        memory = self.memory
        with torch.autocast(student.device.type, enabled=False):  # exp(1/τ) and Z need float32
            student, teacher = student.float(), teacher.float()
            if self.memory_kind == "bank":
                indices = self._checked_indices(indices)
                rows = self.sample_contrast_indices(indices) if contrast_indices is None else contrast_indices
                student_scores = _scores_at(student, memory[TEACHER], rows)
                teacher_scores = _scores_at(teacher, memory[STUDENT], rows)
            else:
                student_scores = torch.cat([(student * teacher.detach()).sum(1, keepdim=True),
                                            student @ memory[TEACHER].t()], dim=1)
                teacher_scores = torch.cat([(teacher * student.detach()).sum(1, keepdim=True),
                                            teacher @ memory[STUDENT].t()], dim=1)
            student_p, teacher_p = torch.exp(student_scores / self.nce_t), torch.exp(teacher_scores / self.nce_t)
            normalizers = self._normalizers_from(student_p, teacher_p).clone()
            losses = {"student": functional.contrastive_nce(student_p / normalizers[0], self.noise_size),
                      "teacher": functional.contrastive_nce(teacher_p / normalizers[1], self.noise_size)}
            self._update(student.detach(), teacher.detach(), indices)
        return losses

    def _checked_indices(self, indices: Tensor | None) -> Tensor:
        if indices is None:
            raise ConfigError("distill.crd needs the sample index of every training image to address its memory "
                              "bank, but the batch has none. Use a kd_lightning data module (they yield indices) "
                              "or memory: queue.")
        return indices

    def _normalizers_from(self, student_p: Tensor, teacher_p: Tensor) -> Tensor:
        if not self._normalizers_set:
            # Set once, from the first batch; a Z restored from a checkpoint stays (where, not `if`: no host read).
            estimate = torch.stack([student_p.mean(), teacher_p.mean()]).detach() * self.noise_size
            if _distributed():
                dist.all_reduce(estimate)
                estimate /= dist.get_world_size()
            self.normalizers.copy_(torch.where(self.normalizers < 0, estimate, self.normalizers))
            self._normalizers_set = True
        return self.normalizers

    @torch.no_grad()
    def _update(self, student: Tensor, teacher: Tensor, indices: Tensor | None) -> None:
        embeddings = torch.stack([student, teacher], dim=1)  # (B, 2, feat_dim)
        if self.memory_kind == "queue":
            self._enqueue(_all_ranks(embeddings)[0].transpose(0, 1))
            return
        assert indices is not None
        embeddings, rows = _all_ranks(embeddings, indices)
        latest = embeddings[_last_occurrence(rows, self.noise_size)].transpose(0, 1)  # (2, global B, feat_dim)
        mixed = self._memory.index_select(1, rows) * self.nce_m + latest * (1 - self.nce_m)
        # Written at the next read: this step's backward pass still needs the table as it was scored.
        self._pending_update = (rows, F.normalize(mixed, dim=2))

    def _enqueue(self, keys: Tensor) -> None:
        pushed = keys.shape[1]
        kept = keys[:, -self.queue_size:]
        start = self.queue_pointer + (pushed - kept.shape[1])
        positions = (start + torch.arange(kept.shape[1], device=keys.device)) % self.queue_size
        # Out of place: this step's scores saved the old queue for the backward pass.
        self.memory = self.memory.index_copy(1, positions, kept)
        self.queue_pointer.copy_((self.queue_pointer + pushed) % self.queue_size)

    def _share_initial_memory(self) -> None:
        if not self._memory_shared and _distributed():
            dist.broadcast(self.memory, src=0)
        self._memory_shared = True

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "CRD":
        # Device moves must reach the unregistered memory; dtype casts must not reach it or Z
        # (float16 overflows at Z ~ 1e5, and momentum updates need float32).
        memory, normalizers = self.memory, self.normalizers  # reading the memory writes a pending update
        super()._apply(fn, *args, **kwargs)
        device = self.normalizers.device
        self.memory = memory.to(device)
        self.normalizers = normalizers.to(device)
        self.class_table = tuple(t.to(device) for t in self.class_table)
        return self

    def get_extra_state(self) -> Tensor:
        return self.memory

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Tensor) or state.shape != self.memory.shape:
            shape = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise ConfigError(
                f"The checkpoint's CRD memory has shape {shape}, this term's {tuple(self.memory.shape)} "
                f"(2 × rows × feat_dim). Resume with the same dataset split (train_size), memory kind, queue_size "
                f"and feat_dim."
            )
        self.memory = state.detach().to(device=self.memory.device, dtype=torch.float32, copy=True)
        self._normalizers_set = False


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# A score from the product with the whole table costs a GEMM's share, one from gathered rows a memory-bound
# read of D floats: measured on CPU (scripts/crd_step.py, K=16384) the whole table is 22x faster at
# M = 3(K+1) and 4.8x at 16(K+1), slower at 78(K+1) (an ImageNet bank), so it is used up to 32(K+1).
WHOLE_TABLE_MAX_RATIO = 32


def _scores_at(anchors: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """(B, K+1) dot products of each anchor with its `rows` of `table` (M, D): from the B×M products with
    the whole table (transient B·M floats, nothing kept for the backward pass but the table itself) while
    M <= 32·(K+1), else by RepDistiller's gather of the rows (B·(K+1)·D floats, kept for the backward)."""
    if table.shape[0] <= WHOLE_TABLE_MAX_RATIO * rows.shape[1]:
        return (anchors @ table.t()).gather(1, rows)
    return torch.bmm(table[rows], anchors.unsqueeze(2)).squeeze(2)


def _all_ranks(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor concatenated over ranks, in rank order (lengths may differ between ranks, not between
    the tensors)."""
    if not _distributed():
        return tensors
    counts = _host_all_gather(tensors[0].shape[0])
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, counts)]))
    return tuple(gathered)


def _host_all_gather(value: int) -> list[int]:
    """Every rank's `value`, exchanged between hosts (CPU tensors over gloo): no rank waits for its device."""
    values = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    # A backend that already carries CPU tensors (gloo, or "cpu:gloo,cuda:nccl") needs no second group.
    group = None if "gloo" in str(dist.get_backend()) else _gloo_group()
    dist.all_gather(values, torch.tensor([value]), group=group)
    return [int(v) for v in values]


@functools.lru_cache(maxsize=None)
def _gloo_group() -> Any:
    # Created once beside an NCCL default group. Not keyed by the default group: a cache holding that
    # object keeps it alive past destroy_process_group, and its destructor then runs at interpreter exit,
    # where gloo aborts the process ("terminate called without an active exception").
    return dist.new_group(backend="gloo")


def _last_occurrence(indices: Tensor, rows: int) -> Tensor:
    """For each entry, the position of the last entry with the same index: a deterministic bank update when
    a sample appears twice (DistributedSampler pads the last batches with repeats), found without
    `torch.unique`, whose output size the host would have to wait for."""
    order = torch.arange(indices.shape[0], device=indices.device)
    latest = torch.full((rows,), -1, dtype=order.dtype, device=indices.device)
    return latest.scatter_reduce_(0, indices, order, reduce="amax")[indices]
