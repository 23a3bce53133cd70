"""The frozen teacher's outputs per (training sample, augmentation view), computed once and read back.

"Consistent teaching" (Beyer et al., "Knowledge distillation: A good teacher is patient and consistent",
CVPR 2022): the student must see the teacher's output for the very view it trains on; outputs precomputed
for one fixed view overfit. The data modules name every view (`KDDataModule.train_views`: CIFAR's pad-4
crop and flip, 162 views; augmented digits' one-pixel shifts, 9), so the cache keys on (index, view) and
returns exactly what the teacher computed for that input. A frozen, eval-mode teacher gives the same
output for the same input, so an entry never goes stale.

What it holds: the logits, plus every teacher tap that is one vector per sample (CRD's `penultimate`),
in `dtype` (float16 halves the size and rounds each value to 11 significant bits; float32 stores the
forward's values bit for bit). Terms that read spatial teacher features (FitNet, AT, ...) would need
C×H×W per entry, so the cache refuses them. Size: train_size × views × width × bytes, e.g. CIFAR-100 with
all 162 views, float16: 50,000 × 162 × 100 × 2 B = 1.62 GB.

How it fills: the host batch's (index, view) pairs are looked up before the batch moves to the device
(`lookup`, from `Offline.on_before_batch_transfer`), the teacher runs on the misses only, and their rows
are written. `precompute` fills every view of every sample before training. `storage="mmap"` keeps the
table in `<directory>/<teacher>-<key>.bin`, keyed by the teacher's weights, the data split, the views, the
stored outputs and the precision, so every job of a sweep with that teacher reuses it. The file is a
header (what it holds, as JSON), a filled flag per entry, then the table; it is created under a temporary
name and linked into place, so a job never maps half a header. A file whose header or size is not what
this run expects (truncated, or of an older layout) is replaced by an empty one, with a one-line warning:
a cache heals itself. Jobs that fill one file at once are safe on one machine: an entry's flag is set after
its row, and two writers of an entry write the same teacher output.

Exactness: a miss returns what a later hit of that entry will: the teacher's output rounded to `dtype`
(float16 rounds to 11 significant bits; float32 is the forward's values bit for bit). So whether an entry
was filled when a run reached it does not change the run: a job on an empty shared file and the same job
on the file it filled train bit for bit alike. In float32, a step whose samples are all misses runs the
teacher on the whole batch, as without the cache, so the first epoch's losses are those of an uncached run.
What remains is which forward filled an entry: one in a batch of another size (another job's misses,
`precompute`'s batches of 256) can differ in the last bits, because on CPU oneDNN picks convolution
kernels by batch size (up to 3e-6 on resnet20 logits for batches under 17, none measured between 17 and
64). float32 later epochs therefore match a run without the cache to that rounding, not bit for bit, as
does a run resumed with `storage=memory` (which starts empty: the cache is derived state, not
checkpointed); float16 rounding hides such differences except for a value that sits at a rounding boundary.

On a GPU each step with misses copies their outputs to the host (one device sync), and the lookup needs
the indices and views in host memory (a loader that yields them on the device costs one more).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

import numpy as np
import torch
from torch import Tensor

from kd_lightning.data.views import ViewedTransform
from kd_lightning.errors import ConfigError

log = logging.getLogger(__name__)

STORAGES = ("memory", "mmap")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32}
LOGITS = "logits"
PRECOMPUTE_BATCH = 256
OFF_SWITCH = "teacher_cache=none"
FILE_FORMAT = "kd_lightning.teacher_outputs/2"
HEADER_BYTES = 4096  # the JSON header, zero-padded; the flags and the table start on page boundaries

TeacherForward = Callable[[Tensor], dict[str, Tensor]]


@dataclass(frozen=True)
class TeacherCacheOptions:
    """The `teacher_cache` config: where the table lives, in which dtype, whether to fill it before training,
    and the most host memory an in-memory table may take."""

    storage: str
    directory: Path
    dtype: str = "float16"
    precompute: bool = False
    max_memory_gb: float = 8.0

    def __post_init__(self) -> None:
        if self.storage not in STORAGES:
            raise ConfigError(f"teacher_cache.storage={self.storage!r} is not one of {list(STORAGES)}. Choose "
                              f"teacher_cache=memory, teacher_cache=mmap (a file under paths.cache_dir that the jobs "
                              f"of a sweep share), or {OFF_SWITCH}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"teacher_cache.dtype={self.dtype!r} is not one of {list(DTYPES)}: float16 halves the "
                              f"table, float32 stores the teacher's outputs exactly.")
        if not float(self.max_memory_gb) > 0:
            raise ConfigError(f"teacher_cache.max_memory_gb={self.max_memory_gb} must be > 0 (GB of host memory an "
                              f"in-memory table may take).")

    @property
    def lossless(self) -> bool:
        return self.dtype == "float32"


def cache_options(cfg: Mapping[str, Any]) -> TeacherCacheOptions | None:
    """Options from a run config's `teacher_cache` node (its file under `paths.cache_dir`); None when it is
    off (no node or `storage: null`)."""
    node = cfg.get("teacher_cache")
    if not node or node.get("storage") is None:
        return None
    cache_dir = cfg["paths"]["cache_dir"]
    known = {"storage", "dtype", "precompute", "max_memory_gb"}
    unknown = sorted(set(node) - known)
    if unknown:
        raise ConfigError(f"teacher_cache has no option {unknown}; its options are {sorted(known)}.")
    return TeacherCacheOptions(storage=str(node["storage"]), directory=Path(cache_dir) / "teacher_outputs",
                               dtype=str(node.get("dtype", "float16")), precompute=bool(node.get("precompute", False)),
                               max_memory_gb=float(node.get("max_memory_gb", 8.0)))


def check_cacheable(teacher_shapes: Mapping[str, torch.Size], term_taps: Mapping[str, list[str]]) -> list[str]:
    """The teacher taps the cache stores (vectors per sample); refuses terms that tap spatial features."""
    spatial = {tap for tap, shape in teacher_shapes.items() if len(shape) != 2}
    refused = sorted(name for name, taps in term_taps.items() if spatial & set(taps))
    if refused:
        raise ConfigError(f"The teacher cache stores the teacher's logits and per-sample vector features, but the "
                          f"terms {refused} read spatial teacher features ({sorted(spatial)}), which would take "
                          f"C×H×W values per sample and view. Train them with {OFF_SWITCH}, or cache only terms "
                          f"that read logits or pooled embeddings (kd, dkd, dist, crd, ...).")
    return sorted(set(teacher_shapes) - spatial)


@dataclass
class _Lookup:
    indices: Tensor
    views: Tensor
    hits: Tensor  # positions in the batch
    misses: Tensor
    rows: Tensor  # stored rows of the hits, in batch order of `hits`


class TeacherOutputCache:
    """A table `train_size × views × width` of teacher outputs with a filled flag per (index, view).

    `widths` names the stored outputs in order (`logits` first, then vector taps) with their widths.
    `open` sizes the table from the data module once the trainer has it; `lookup` (host batch) then
    `outputs` (device batch) serve one training step.
    """

    def __init__(self, options: TeacherCacheOptions, widths: Mapping[str, int]) -> None:
        self.options = options
        self.slices: dict[str, slice] = {}
        start = 0
        for name, width in widths.items():
            self.slices[name] = slice(start, start + int(width))
            start += int(width)
        self.width = start
        self.table: Tensor | None = None
        self.filled: Tensor | None = None
        self.key: str | None = None
        self.teacher_input: Any = None
        self.dtypes: dict[str, torch.dtype] = {}
        self._pending: _Lookup | None = None
        self.hits = self.misses = 0
        self.pin = False

    # --- opening -----------------------------------------------------------------------------------------
    def open(self, datamodule: Any, teacher: torch.nn.Module, forward: TeacherForward, device: torch.device,
             precision: str, forward_context: Callable[[], ContextManager] = nullcontext, rank: int = 0,
             world_size: int = 1, barrier: Callable[[], None] = lambda: None) -> None:
        """Size (or map) the table for this data and teacher; precompute it if asked. Idempotent per key."""
        views = getattr(datamodule, "train_views", None) if datamodule is not None else None
        if views is None:
            name = type(datamodule).__name__ if datamodule is not None else "no data module"
            raise ConfigError(f"The teacher cache keys on each sample's augmentation view, but {name} has no named "
                              f"views (train_views is None: e.g. ImageNet's RandomResizedCrop draws continuous "
                              f"scales). Train with {OFF_SWITCH}, or use a data module whose augmentation is a "
                              f"pad-crop/flip (CIFAR, digits) or none.")
        # With named inputs the entry is keyed by the teacher's own input: its view (its augmentation when it draws
        # its own) and its definition (source, size) in the file's key.
        named = getattr(datamodule, "input_views", None)
        teacher_input = getattr(teacher, "kd_input", None)
        self.teacher_input = None if named is None or teacher_input is None else named[teacher_input]
        if self.teacher_input is not None:
            views = self.teacher_input.augmentation(views)
            if self.options.precompute:
                raise ConfigError(f"teacher_cache.precompute fills the table from the stored training images, but "
                                  f"this run's teacher reads the named input {teacher_input!r}, which precompute "
                                  f"does not make. Set teacher_cache.precompute=false: the table fills as training "
                                  f"reaches each (sample, view), with the same values.")
        self.views = views
        self.pin = device.type == "cuda"  # pinned rows copy to the device without waiting for it
        count, size = int(datamodule.train_size), views.count
        key = self._key(datamodule, teacher, device, precision)
        if key == self.key:
            return
        itemsize = DTYPES[self.options.dtype].itemsize
        nbytes = count * size * self.width * itemsize
        described = " + ".join(f"{s.stop - s.start} {name}" for name, s in self.slices.items())
        where = self.options.storage
        if self.options.storage == "memory":
            if nbytes > self.options.max_memory_gb * 1e9:
                raise ConfigError(f"The teacher cache would take {nbytes / 1e9:.2f} GB of host memory ({count} samples "
                                  f"× {size} views × {described} × {itemsize} B), over teacher_cache.max_memory_gb="
                                  f"{self.options.max_memory_gb:g}. Use teacher_cache=mmap (a file under "
                                  f"paths.cache_dir, paged in as read), teacher_cache.dtype=float16, or raise "
                                  f"teacher_cache.max_memory_gb.")
            # Zero pages are not resident until written, so an empty table costs nothing yet.
            self.table = torch.zeros(count, size, self.width, dtype=DTYPES[self.options.dtype])
            self.filled = torch.zeros(count, size, dtype=torch.uint8)
        else:
            path = self.options.directory / f"{key}.bin"
            where = f"mmap {path}"
            self.filled, self.table = map_table(path, {"format": FILE_FORMAT, "key": key, "samples": count,
                                                       "views": size, "width": self.width,
                                                       "dtype": self.options.dtype})
        self.key = key
        if rank == 0:
            log.info(f"teacher cache: {count} × {size} views × {described} {self.options.dtype} = "
                     f"{nbytes / 1e9:.2f} GB, {where} ({int(self.filled.sum())} of {count * size} entries filled)")
        # Zeros, not `example_input`: drawing from the global RNG would move the run's augmentation stream.
        with torch.no_grad(), forward_context():
            shape = datamodule.input_shape if self.teacher_input is None else datamodule.input_shape_of(teacher_input)
            probe = forward(torch.zeros(2, *shape, device=device))
        self.dtypes = {name: probe[name].dtype for name in self.slices}
        if self.options.precompute:
            self.precompute(datamodule.train_set, forward, device, forward_context, rank, world_size)
            barrier()

    def _key(self, datamodule: Any, teacher: torch.nn.Module, device: torch.device, precision: str) -> str:
        """What decides the stored values: the teacher's weights, the training split and its views, the
        stored outputs and dtype, and where and in which precision the teacher runs."""
        weights = hashlib.sha256()
        for name, tensor in teacher.state_dict().items():
            weights.update(name.encode())
            weights.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        loader_only = {"batch_size", "num_workers", "pin_memory", "root", "system_dir", "download"}
        data = {key: value for key, value in dict(getattr(datamodule, "hparams", {})).items() if key not in loader_only}
        labels = datamodule.train_targets.contiguous().numpy().tobytes()
        recipe = {"teacher": weights.hexdigest(), "data": [type(datamodule).__name__, data, int(datamodule.train_size),
                                                          hashlib.sha256(labels).hexdigest()],
                  "views": repr(self.views), **({"input": repr(self.teacher_input)} if self.teacher_input else {}),
                  "outputs": {n: [s.start, s.stop] for n, s in self.slices.items()},
                  "dtype": self.options.dtype, "device": device.type, "precision": str(precision)}
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
        name = getattr(teacher, "kd_spec", {}).get("name", type(teacher).__name__)
        return f"{name}-{digest}"

    # --- one training step -------------------------------------------------------------------------------
    def lookup(self, indices: Tensor | None, views: Tensor | None) -> None:
        """Find the host batch's entries (before it moves to the device); `outputs` serves them."""
        if self.table is None or self.filled is None:
            raise RuntimeError("TeacherOutputCache.open must run before the first training batch.")
        if indices is None or views is None:
            raise ConfigError(f"The teacher cache needs each training sample's index and augmentation view, but the "
                              f"batches carry {'no indices' if indices is None else 'no views'}. Use a kd_lightning "
                              f"data module (batches (images, targets, indices, views)), or {OFF_SWITCH}.")
        indices, views = indices.cpu().long(), views.cpu().long()
        count, size = self.filled.shape
        if len(views) and (int(views.min()) < 0 or int(views.max()) >= size):
            raise ConfigError(f"Training views must lie in [0, {size}) for the teacher cache, got "
                              f"[{int(views.min())}, {int(views.max())}]: the training augmentation is not the one "
                              f"the data module names (train_views). Use its own train_transform, or {OFF_SWITCH}.")
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= count):
            raise ConfigError(f"Sample indices must lie in [0, {count}) (the training split) for the teacher cache, "
                              f"got [{int(indices.min())}, {int(indices.max())}].")
        hit = self.filled[indices, views].bool()
        hits, misses = hit.nonzero().flatten(), (~hit).nonzero().flatten()
        rows = self.table[indices[hits], views[hits]]
        if self.pin:
            rows = rows.pin_memory()
        self._pending = _Lookup(indices, views, hits, misses, rows)
        self.hits += len(hits)
        self.misses += len(misses)

    def outputs(self, forward: TeacherForward, images: Tensor) -> dict[str, Tensor]:
        """The teacher's outputs for the batch `lookup` saw: stored rows for hits, a forward of the misses."""
        lookup, self._pending = self._pending, None
        if lookup is None or len(lookup.indices) != len(images):
            raise RuntimeError("TeacherOutputCache.outputs needs the lookup of this batch first (Offline does it in "
                               "on_before_batch_transfer).")
        if len(lookup.misses) == len(images):
            computed = self._as_stored(forward(images))  # the whole batch, as without the cache
            self._store(lookup, computed)
            return computed
        device = images.device
        rows = lookup.rows.to(device, non_blocking=True)
        if not len(lookup.misses):  # a warm cache: the rows are the batch, in order; no scatter needed
            return {name: rows[:, columns].to(self.dtypes[name]).contiguous() for name, columns in self.slices.items()}
        hits = lookup.hits.to(device, non_blocking=True)
        fresh = None
        if len(lookup.misses):
            misses = lookup.misses.to(device, non_blocking=True)
            fresh = self._as_stored(forward(images[misses]))
            self._store(lookup, fresh)
        result = {}
        for name, columns in self.slices.items():
            dtype = fresh[name].dtype if fresh is not None else self.dtypes[name]
            out = torch.empty(len(images), columns.stop - columns.start, dtype=dtype, device=device)
            out[hits] = rows[:, columns].to(dtype)
            if fresh is not None:
                out[misses] = fresh[name]
            result[name] = out
        return result

    def _as_stored(self, computed: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The outputs as a later hit will return them: rounded to the table's dtype, in the forward's dtype.
        Without this a float16 cache trained a run on exact outputs for its misses and rounded ones for its
        hits, so the result depended on how full a shared file was."""
        if self.options.lossless:
            return {name: computed[name] for name in self.slices}
        dtype = DTYPES[self.options.dtype]
        return {name: computed[name].to(dtype).to(computed[name].dtype) for name in self.slices}

    def _store(self, lookup: _Lookup, computed: Mapping[str, Tensor]) -> None:
        assert self.table is not None and self.filled is not None
        values = torch.cat([computed[name].detach().flatten(1).to(self.table.dtype) for name in self.slices], 1).cpu()
        rows, views = lookup.indices[lookup.misses], lookup.views[lookup.misses]
        self.table[rows, views] = values
        self.filled[rows, views] = 1  # after the row: a reader that sees the flag sees the row

    # --- filling before training -------------------------------------------------------------------------
    def precompute(self, train_set: Any, forward: TeacherForward, device: torch.device,
                   forward_context: Callable[[], ContextManager] = nullcontext, rank: int = 0,
                   world_size: int = 1) -> None:
        """Fill every missing (index, view) entry, in batches of `PRECOMPUTE_BATCH` samples of one view.
        With a shared file each rank fills every `world_size`-th sample; in memory each rank fills all."""
        assert self.table is not None and self.filled is not None
        count, size = self.filled.shape
        mine = range(rank, count, world_size) if self.options.storage == "mmap" else range(count)
        positions = torch.tensor(list(mine), dtype=torch.long)
        with torch.no_grad(), forward_context():
            for chunk in positions.split(PRECOMPUTE_BATCH):
                todo = [view for view in range(size) if not self.filled[chunk, view].all()]
                if not todo:
                    continue
                images = stored_inputs(train_set, chunk.tolist())
                for view in todo:
                    empty = self.filled[chunk, view] == 0
                    missing = chunk[empty]
                    computed = forward(training_inputs(train_set, images[empty], view).to(device))
                    self._store(_Lookup(missing, torch.full_like(missing, view), torch.empty(0, dtype=torch.long),
                                        torch.arange(len(missing)), torch.empty(0)), computed)


def map_table(path: Path, header: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The (filled flags, table) of the shared file at `path`, created empty if missing and replaced by an
    empty one (with a warning) if its header or size is not `header`'s."""
    count, size, width = header["samples"], header["views"], header["width"]
    dtype = DTYPES[header["dtype"]]
    table_at = HEADER_BYTES + -(-count * size // HEADER_BYTES) * HEADER_BYTES
    nbytes = table_at + count * size * width * dtype.itemsize
    encoded = json.dumps(header, sort_keys=True).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    problem = _file_problem(path, encoded, nbytes)
    if problem is not None:
        fresh = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with open(fresh, "wb") as file:
            file.write(encoded)
            file.truncate(nbytes)  # sparse: the flags read as 0 (not filled) and cost no disk until written
        if problem == "missing":
            try:
                os.link(fresh, path)  # fails if another job created it meanwhile: then that file is the one
            except FileExistsError:
                pass
            problem = _file_problem(path, encoded, nbytes)
        if problem is None:
            os.unlink(fresh)
        else:
            log.warning(f"teacher cache: {path} is damaged ({problem}); replacing it with an empty table")
            os.replace(fresh, path)
            path.with_suffix(".filled").unlink(missing_ok=True)  # an older layout's flags, beside the table
    elements = count * size * width
    flags = np.memmap(path, dtype=np.uint8, mode="r+", offset=HEADER_BYTES, shape=(count * size,))
    table = np.memmap(path, dtype=NUMPY_DTYPES[header["dtype"]], mode="r+", offset=table_at, shape=(elements,))
    return torch.from_numpy(flags).view(count, size), torch.from_numpy(table).view(count, size, width)


def _file_problem(path: Path, header: bytes, nbytes: int) -> str | None:
    """Why the file at `path` is not a table of this layout: "missing", a size or a header mismatch; None if it is."""
    try:
        with open(path, "rb") as file:
            found = file.read(HEADER_BYTES)
            actual = os.fstat(file.fileno()).st_size
    except FileNotFoundError:
        return "missing"
    if actual != nbytes:
        return f"{actual} bytes, expected {nbytes}"
    if found.rstrip(b"\0") != header:
        return "its header does not describe this table"
    return None


def stored_inputs(train_set: Any, positions: list[int]) -> Tensor:
    """The samples as tensors before their view: the transform's `to_tensor` of each stored image."""
    transform = train_set.transform
    to_tensor = transform.to_tensor if isinstance(transform, ViewedTransform) else None
    images = [train_set.raw(position)[0] for position in positions]
    return torch.stack([to_tensor(image) if to_tensor is not None else torch.as_tensor(image) for image in images])


def training_inputs(train_set: Any, images: Tensor, view: int) -> Tensor:
    """What the training transform makes of `images` (from `stored_inputs`) seen through `view`."""
    transform = train_set.transform
    if transform is None:
        return images
    if not isinstance(transform, ViewedTransform):
        raise ConfigError(f"teacher_cache.precompute needs a training transform with named views (ViewedTransform), "
                          f"got {type(transform).__name__}. Set teacher_cache.precompute=false or {OFF_SWITCH}.")
    seen = transform.views.crop_flip(images, torch.full((len(images),), view, dtype=torch.long))
    return transform.after(seen) if transform.after is not None else seen


__all__ = ["TeacherCacheOptions", "TeacherOutputCache", "cache_options", "check_cacheable"]
