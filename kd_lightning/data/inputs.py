"""Named inputs: each network of a run reads its own input of a sample (a modality, a view, a resolution).

A data module's samples carry one or more *sources* (`KDDataModule.sources`: `image` for an image data set;
`pixels`, `zernike`, ... for UCI Multiple Features). The run's `inputs.views` config derives further named
inputs from them, each an `InputView`:

- `source`: the source it is made from (default: the data's `default_source`);
- `draw`: which augmentation view it sees. `shared` is the sample's own draw, the same crop and flip for every
  input that shares it (so two sources of one scene keep their geometry paired); `own` is an independent draw
  (the mean teacher's second view, KDCL's per-peer distortion, MLKD's strong view); `none` is the identity view
  (Noisy Student's clean teacher);
- `pad`, `flip`: another pad-crop/flip augmentation for an `own` draw (a stronger one, e.g. MLKD's strong view);
- `size`: an input size the view is resized to, on the training device (cross-resolution: a 14×14 student of
  a 28×28 teacher, or a foundation-model teacher at a larger size than its student).

Each network carries the name of the input it reads (`kd_input`, set from `inputs.teacher`, `inputs.student`,
`inputs.peers`, `inputs.ema_teacher`, ...; the data's default source otherwise), and a forward pre-hook picks
that input out of a batch of named inputs: the schemes call `network(images)` as before, whatever the inputs.
Without named inputs (one source, no views, no role set) nothing of this is active and batches are the
plain `(images, targets, indices, views)` of before, so today's runs are unchanged bit for bit.

A view is a named draw (`CropFlipViews`), so a teacher-output cache keys on (sample, the teacher's view) and a
resumed epoch replays every input's draws; a resize is deterministic, so it needs no name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.data.views import CropFlipViews
from kd_lightning.errors import ConfigError

DRAWS = ("shared", "own", "none")
# The roles `inputs.<role>` names; each scheme reads the ones it has (see `RoleInputs`).
ROLES = ("teacher", "student", "teachers", "peers", "ema_teacher", "strong")


@dataclass(frozen=True)
class InputView:
    """How a named input is made from a source: which draw of the augmentation it sees, and its size."""

    name: str
    source: str
    draw: str = "shared"
    pad: int | None = None
    flip: bool | None = None
    size: tuple[int, int] | None = None

    def augmentation(self, data_views: CropFlipViews | None) -> CropFlipViews | None:
        """The pad-crop/flip this input is drawn from: its own (`pad`/`flip`) or the data's."""
        if data_views is None or (self.pad is None and self.flip is None):
            return data_views
        return CropFlipViews(pad=data_views.pad if self.pad is None else int(self.pad),
                             flip=data_views.flip if self.flip is None else bool(self.flip), fill=data_views.fill)


def parse_views(views: Mapping[str, Any] | None, sources: Mapping[str, tuple[int, ...]],
                default_source: str) -> dict[str, InputView]:
    """`inputs.views` as `InputView`s, checked against the data's sources; every source is an input of its own."""
    parsed = {name: InputView(name, name) for name in sources}
    for name, options in (views or {}).items():
        options = dict(options or {})
        unknown = sorted(set(options) - {"source", "draw", "pad", "flip", "size"})
        if unknown:
            raise ConfigError(f"inputs.views.{name} has no option {unknown}. A view takes source (one of "
                              f"{sorted(sources)}), draw ({'|'.join(DRAWS)}), pad and flip (its own crop/flip for "
                              f"draw=own) and size (an input size it is resized to on the device).")
        if name in sources:
            raise ConfigError(f"inputs.views.{name} redefines the data's own input {name!r}; give the view another "
                              f"name (the data's inputs: {sorted(sources)}).")
        source = str(options.get("source") or default_source)
        if source not in sources:
            raise ConfigError(f"inputs.views.{name}.source={source!r} is not an input of the data; it has "
                              f"{sorted(sources)}.")
        draw = str(options.get("draw", "shared"))
        if draw not in DRAWS:
            raise ConfigError(f"inputs.views.{name}.draw={draw!r}: use shared (the sample's own augmentation "
                              f"draw, paired geometry), own (an independent draw) or none (the unaugmented input).")
        if draw != "own" and (options.get("pad") is not None or options.get("flip") is not None):
            raise ConfigError(f"inputs.views.{name} sets pad/flip with draw={draw}: its own augmentation needs its own "
                              f"draw. Set inputs.views.{name}.draw=own.")
        size = options.get("size")
        if size is not None:
            size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
            if len(sources[source]) != 3:
                raise ConfigError(f"inputs.views.{name}.size: its source {source!r} is a vector of shape "
                                  f"{sources[source]}, not an image; only image inputs are resized.")
            if len(size) != 2 or min(size) < 1:
                raise ConfigError(f"inputs.views.{name}.size must be a positive int or [height, width], got {size}.")
        pad = options.get("pad")
        if pad is not None and int(pad) < 0:
            raise ConfigError(f"inputs.views.{name}.pad must be >= 0, got {pad}.")
        parsed[name] = InputView(name, source, draw, None if pad is None else int(pad),
                                 None if options.get("flip") is None else bool(options["flip"]), size)
    return parsed


def view_shape(view: InputView, sources: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    shape = tuple(sources[view.source])
    return (shape[0], *view.size) if view.size is not None else shape


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased when shrinking (as PIL and torchvision's Resize), on the images' device."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrinking = images.shape[-2] > size[0] or images.shape[-1] > size[1]
    return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False,
                         antialias=shrinking).to(images.dtype)


class NamedSamples:
    """Makes a sample's named inputs and their views (the DataLoader path; `device.ResidentSplit` is the device's).

    `views` are the run's inputs, `default_source` names a single-source sample, `augmentation` is the data's
    pad-crop/flip (used when the split's transform is not a `ViewedTransform`, e.g. digits without augmentation,
    whose `fill` is already that of a stored pixel). For a training split with a `ViewedTransform` every input is
    `to_tensor`'d once per source, seen through its view and finished with the transform's `after`; a split with
    any other transform (evaluation) applies it once per source and every input takes the split's fixed view.
    The draws come from torch's global generator as `ViewedTransform`'s do: the shared one first, then each
    `own` input's in the order the inputs are listed.
    """

    def __init__(self, views: Mapping[str, InputView], default_source: str, augmentation: CropFlipViews | None,
                 train: bool) -> None:
        self.views, self.default_source, self.augmentation, self.train = dict(views), default_source, augmentation, train

    def __call__(self, raw: Any, transform: Any, fixed_view: int) -> tuple[dict[str, Tensor], dict[str, int]]:
        from kd_lightning.data.views import ViewedTransform

        sources = raw if isinstance(raw, Mapping) else {self.default_source: raw}
        viewed = isinstance(transform, ViewedTransform)
        if not self.train or (not viewed and transform is not None):
            def apply(value: Any) -> Tensor:
                return transform(value) if transform is not None else torch.as_tensor(value)

            made = {name: apply(value) for name, value in sources.items()}
            # An augmentation without named views (ImageNet's) still gives an `own` input its own random draw.
            return ({name: apply(sources[view.source]) if self.train and view.draw == "own" else made[view.source]
                     for name, view in self.views.items()}, {name: fixed_view for name in self.views})
        augmentation = transform.views if viewed else self.augmentation
        to_tensor = transform.to_tensor if viewed else None
        after = transform.after if viewed else None
        shared = int(augmentation.draw(1)[0]) if augmentation is not None and augmentation.count > 1 else fixed_view
        tensors: dict[str, Tensor] = {}
        inputs, views = {}, {}
        for name, view in self.views.items():
            if view.source not in tensors:
                value = sources[view.source]
                tensors[view.source] = to_tensor(value) if to_tensor is not None else torch.as_tensor(value)
            own = view.augmentation(augmentation)
            if own is None or len(tensors[view.source].shape) != 3:
                inputs[name], views[name] = tensors[view.source], fixed_view
                continue
            if view.draw == "own" and own.count > 1:
                index = int(own.draw(1)[0])
            else:  # one view only (no augmentation): nothing to draw, and the global generator stays untouched
                index = shared if view.draw == "shared" else own.identity
            seen = own.crop_flip(tensors[view.source].unsqueeze(0), torch.tensor([index]))[0]
            inputs[name], views[name] = (after(seen) if after is not None else seen), index
        return inputs, views


# --- networks read their own input -------------------------------------------------------------------------
def _read_own_input(module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], Mapping):
        inputs = args[0]
        name = module.kd_input
        if name not in inputs:
            raise ConfigError(f"{type(module).__name__} reads input {name!r}, but the batch holds {sorted(inputs)}. "
                              f"Name one of those in inputs.<role>, or define {name!r} in inputs.views.")
        return (inputs[name], *args[1:])
    return None


def attach_input(network: nn.Module, name: str) -> nn.Module:
    """Make `network` read input `name` when it is called with named inputs (a mapping); a tensor passes as is."""
    network.kd_input = name
    if not getattr(network, "_kd_input_hook", False):
        network.register_forward_pre_hook(_read_own_input)
        network._kd_input_hook = True
    spec = getattr(network, "kd_spec", None)
    if isinstance(spec, dict):
        spec["input"] = name
    return network


def input_name(network: nn.Module) -> str | None:
    """The input `network` reads (None: it reads whatever tensor it is given)."""
    model = getattr(network, "model", network)  # a FrozenTeacher reads its model's input
    return getattr(model, "kd_input", None)


def pick(inputs: Tensor | Mapping[str, Tensor], network: nn.Module | str | None) -> Tensor:
    """The tensor `network` (or the input named so) reads out of a batch's inputs."""
    if not isinstance(inputs, Mapping):
        return inputs
    name = network if isinstance(network, str) or network is None else input_name(network)
    if name is None:
        raise ConfigError(f"A network without a named input was given named inputs {sorted(inputs)}; networks built "
                          f"by the runner get one (inputs.<role>, or the data's default source).")
    return inputs[name]


def batch_size_of(inputs: Tensor | Mapping[str, Tensor]) -> int:
    return len(next(iter(inputs.values()))) if isinstance(inputs, Mapping) else len(inputs)


def select(inputs: Tensor | Mapping[str, Tensor], rows: Any) -> Tensor | Mapping[str, Tensor]:
    """`inputs[rows]` for every named input (a slice, a mask or an index tensor)."""
    if isinstance(inputs, Mapping):
        return {name: value[rows] for name, value in inputs.items()}
    return inputs[rows]


@dataclass(frozen=True)
class RoleInputs:
    """`inputs.<role>`: the input each role reads (None: the network's own, else the data's default)."""

    teacher: str | None = None
    student: str | None = None
    teachers: tuple[str, ...] | None = None
    peers: tuple[str, ...] | None = None
    ema_teacher: str | None = None
    strong: str | None = None

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> "RoleInputs":
        node = dict(node or {})
        unknown = sorted(set(node) - set(ROLES) - {"views"})
        if unknown:
            raise ConfigError(f"inputs has no role {unknown}; the roles are {list(ROLES)} (plus inputs.views, the "
                              f"named views).")

        def names(value: Any) -> tuple[str, ...] | None:
            if value is None:
                return None
            return (str(value),) if isinstance(value, str) else tuple(str(v) for v in value)

        return cls(teacher=node.get("teacher"), student=node.get("student"), teachers=names(node.get("teachers")),
                   peers=names(node.get("peers")), ema_teacher=node.get("ema_teacher"), strong=node.get("strong"))

    def named(self) -> list[str]:
        found: list[str] = []
        for value in (self.teacher, self.student, self.ema_teacher, self.strong, *(self.teachers or ()),
                      *(self.peers or ())):
            if value is not None:
                found.append(value)
        return found

    @property
    def any(self) -> bool:
        return bool(self.named())


def check_named(roles: RoleInputs, available: Iterable[str]) -> None:
    available = sorted(available)
    for name in roles.named():
        if name not in available:
            raise ConfigError(f"An inputs.<role> names input {name!r}, which the data does not have. Its inputs: "
                              f"{available}. Define a view of one of them with inputs.views.{name}="
                              f"{{source: <input>, draw: own|shared|none, size: <pixels>}}, or name an existing one.")


__all__ = ["DRAWS", "ROLES", "InputView", "NamedSamples", "RoleInputs", "attach_input", "batch_size_of", "check_named", "input_name",
           "parse_views", "pick", "resize", "select", "view_shape"]
