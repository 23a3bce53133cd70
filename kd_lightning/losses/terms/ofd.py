from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.ab import bn_connector
from kd_lightning.losses.terms.base import STAGES_PRE, BuildContext, DistillInputs, DistillTerm, as_tap_list
from kd_lightning.losses.terms.stage_taps import match_resolution, stage_pairs
from kd_lightning.taps import resolve_tap

# Projection shortcuts carry their own BN; the margin comes from the residual branch, as the authors'
# get_bn_before_relu (bn2/bn3 of the last block), so BNs under these module names are never chosen.
_SHORTCUT_NAMES = ("shortcut", "downsample")


class OFD(DistillTerm):
    """Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation" (ICCV).

    Student pre-ReLU features → 1×1 conv + BN connector; teacher pre-ReLU features clamped from below by a
    per-channel margin m = E[x | x < 0], x ~ N(β, γ²) of the teacher BN that produced them
    (`functional.ofd_margin`); loss = Σ_i 2^−(n−1−i)·partial_L2_i / batch, partial_L2 = Σ (s − max(t, m))²
    over positions with s > max(t, m) or max(t, m) > 0 (`functional.ofd_partial_l2`), on every
    `stageK_pre` pair. The authors' CIFAR-100 code adds this sum / batch / 1000, hence weight 0.001 (also
    mdistiller's FEAT_WEIGHT). A pair differing in resolution has its larger map average-pooled (mdistiller
    pools the teacher). Departure: the authors' CIFAR code runs the teacher in train mode (batch BN
    statistics); here the teacher is frozen in eval mode, as for every term.

    The BN of a teacher tap is found by a dry forward in `build`: the last BatchNorm2d to finish before the
    tapped tensor exists (before the module whose `:input` is tapped starts, or before a tapped module
    returns), skipping BNs under modules named *shortcut*/*downsample*. Its width must equal the tap's.
    """

    def __init__(self, weight: float = 0.001, student_taps: str | list[str] = STAGES_PRE,
                 teacher_taps: str | list[str] = STAGES_PRE, warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        self.student_taps = as_tap_list(student_taps)
        self.teacher_taps = as_tap_list(teacher_taps)
        self.connectors = nn.ModuleList()

    def build(self, context: BuildContext) -> None:
        pairs = stage_pairs("ofd", self.student_taps, self.teacher_taps, context)
        if context.teacher is None:
            raise ConfigError("ofd reads its margins from the teacher's BatchNorm layers, but no teacher was given.")
        if getattr(context.teacher, "kd_token_layout", None) is not None:
            raise ConfigError(
                "ofd cannot distil from a vision-transformer teacher: its margin is the expected negative response "
                "of the BatchNorm before each pre-ReLU teacher feature, and a transformer's residual stream has "
                "LayerNorms and no ReLU, so there is no margin and no rectification to respect. Use fitnet (a "
                "regressor on the teacher's block tokens read as maps), at or nst for feature maps, or rkd/pkt/crd on "
                "the penultimate embedding; ofd works with a ViT student and a convolutional teacher.")
        self.connectors = nn.ModuleList(bn_connector(s_shape[1], t_shape[1]) for _, _, s_shape, t_shape in pairs)
        bns = batchnorm_before(context.teacher, self.teacher_taps, context.teacher_shapes)
        for i, t_tap in enumerate(self.teacher_taps):
            name, bn = bns[t_tap]
            if bn.num_features != context.teacher_shapes[t_tap][1]:
                raise ConfigError(
                    f"ofd takes the margin of teacher tap {t_tap!r} ({context.teacher_shapes[t_tap][1]} channels) "
                    f"from the BatchNorm2d that produced it, but the last one before it is {name!r} with "
                    f"{bn.num_features} channels (e.g. a concatenation follows it). Tap a pre-ReLU feature that a "
                    f"BatchNorm2d outputs directly or adds to a shortcut, like the zoo's stageK_pre taps."
                )
            self.register_buffer(f"margin{i}", functional.ofd_margin(bn.weight, bn.bias))

    def loss(self, inputs: DistillInputs) -> Tensor:
        count = len(self.connectors)
        total = inputs.student_logits.new_zeros((), dtype=torch.float32)
        for i, (connect, s_tap, t_tap) in enumerate(zip(self.connectors, self.student_taps, self.teacher_taps)):
            student, teacher = match_resolution(connect(inputs.student_features[s_tap]), inputs.teacher_features[t_tap])
            stage = functional.ofd_partial_l2(student, teacher, getattr(self, f"margin{i}"))
            total = total + stage / 2.0 ** (count - 1 - i)
        return total / inputs.student_logits.shape[0]


def batchnorm_before(model: nn.Module, taps: list[str],
                     shapes: Mapping[str, torch.Size]) -> dict[str, tuple[str, nn.BatchNorm2d]]:
    """tap → (name, module) of the last BatchNorm2d, outside shortcuts, to run before the tapped tensor.

    Execution order comes from a dry forward with temporary hooks. `build` gets no input batch, so the
    input is rebuilt from the first tap's shape: its H×W scaled by 1, 2, 4, … until a forward reproduces
    every tapped shape (the order does not depend on the size, only a forward that runs is needed).
    """
    modules = dict(model.named_modules())
    finished: list[str] = []
    reached: dict[str, tuple[int, torch.Size]] = {}
    handles = []

    def on_bn(name: str):
        return lambda *_: finished.append(name)

    def on_tap(tap: str, capture_input: bool):
        def record(module: nn.Module, args: tuple, output=None) -> None:
            tensor = args[0] if capture_input else output
            reached[tap] = (len(finished), tensor[0].shape if isinstance(tensor, (tuple, list)) else tensor.shape)
        return record

    for name, module in modules.items():
        if isinstance(module, nn.BatchNorm2d) and not any(part in name.lower() for part in _SHORTCUT_NAMES):
            handles.append(module.register_forward_hook(on_bn(name)))
    for tap in taps:
        path, capture_input = resolve_tap(model, tap, getattr(model, "kd_spec", {}).get("name", "teacher"))
        register = modules[path].register_forward_pre_hook if capture_input else modules[path].register_forward_hook
        handles.append(register(on_tap(tap, capture_input)))
    try:
        _dry_forward(model, taps, shapes, finished, reached)
    finally:
        for handle in handles:
            handle.remove()

    found = {}
    for tap in taps:
        position = reached[tap][0]
        if position == 0:
            raise ConfigError(
                f"ofd needs the teacher's BatchNorm2d before its pre-ReLU tap {tap!r} to compute the margin, but no "
                f"BatchNorm2d runs before it. Use a teacher with batch norm (every kd_lightning zoo model has it)."
            )
        found[tap] = (finished[position - 1], modules[finished[position - 1]])
    return found


def _dry_forward(model: nn.Module, taps: list[str], shapes: Mapping[str, torch.Size], finished: list[str],
                 reached: dict[str, tuple[int, torch.Size]]) -> None:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    parameter = next(model.parameters(), None)
    if first_conv is None or parameter is None:
        raise ConfigError("ofd needs a convolutional teacher with batch norm; the teacher has no Conv2d layer.")
    height, width = shapes[taps[0]][-2:]
    was_training = model.training
    model.eval()  # no BN statistics may move: the teacher is frozen
    try:
        with torch.no_grad():
            for scale in (1, 2, 4, 8, 16, 32):
                finished.clear()
                reached.clear()
                probe = torch.zeros(2, first_conv.in_channels, height * scale, width * scale,
                                    device=parameter.device, dtype=parameter.dtype)
                try:
                    model(probe)
                except (RuntimeError, ValueError, AssertionError):  # timm asserts on input sizes it was not built for
                    continue
                if all(tap in reached and reached[tap][1][1:] == shapes[tap][1:] for tap in taps):
                    return
    finally:
        model.train(was_training)
    raise ConfigError(
        f"ofd could not rerun the teacher at an input size that reproduces its taps {taps} (to find the BatchNorm "
        f"before each). Tap pre-ReLU features of a plain convolutional teacher, e.g. the zoo's stageK_pre taps."
    )
