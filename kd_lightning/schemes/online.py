"""Online distillation: peers trained from scratch together, each learning from the others' predictions.

No pre-trained teacher: the soft targets come from the peers themselves, detached, so peer i's mimicry
loss moves peer i only. All peers update from one forward each under one optimizer whose loss is the sum
of the per-peer losses; with detached targets that sum has, for every peer, exactly that peer's own
gradient, so one step equals the reference codes' separate per-peer updates (one SGD optimizer per
network, Knowledge-Distillation-Zoo train_dml.py) and DDP synchronises every peer in one all-reduce.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import BuildContext, DistillInputs, DistillTerm
from kd_lightning.schemes.base import DistillationModule, accuracy_metrics, unpack_batch
from kd_lightning.schemes.composition import describe_loss
from kd_lightning.teachers import CHECKPOINT_KEY


class MutualLearning(DistillationModule):
    """Peers `peer1..N` (any architectures), each trained with ce_weight·CE + weight·mimicry + terms.

    Subclasses say what each peer learns from (`partner_logits`, always detached) and how strongly at an
    epoch (`mimicry_weight`); the mimicry loss is T²·KL(softmax(partner/T) ‖ softmax(peer/T)) averaged over
    the partners. Catalogue terms that read logits only (`distill=[dist]`, `[dkd]`) are added per peer
    with the same partners as their teacher logits. Every peer is evaluated (`val/<role>/acc`,
    `test/<role>/acc`); the first one is also `self.student`, so `val/acc`, `test/acc` and the checkpoint's
    exported student are peer1.
    """

    mimicry_name = "mimicry"

    def __init__(self, peers: Sequence[nn.Module], num_classes: int, terms: Mapping[str, DistillTerm] | None = None,
                 weight: float = 1.0, temperature: float = 1.0, ce_weight: float = 1.0,
                 max_epochs: int | None = None, **base: Any) -> None:
        peers = list(peers) if isinstance(peers, (list, tuple, nn.ModuleList)) else [peers]
        if len(peers) < 2:
            raise ConfigError(
                f"{type(self).__name__} trains peers that teach each other, but got {len(peers)} network. Give at "
                f"least two, e.g. scheme.peers=[convnet_tiny,convnet_tiny] (or leave scheme.peers=null for two "
                f"copies of `student`); to train one network alone use scheme=supervised.")
        if temperature <= 0:
            raise ConfigError(f"scheme.temperature must be > 0, got {temperature}.")
        super().__init__(peers[0], num_classes, **base)
        # peer1 is `self.student`; registering it twice would store its weights twice in every checkpoint.
        self.other_peers = nn.ModuleList(peers[1:])
        self.roles = [f"peer{index + 1}" for index in range(len(peers))]
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.terms = nn.ModuleDict(dict(terms or {}))
        self._check_terms(num_classes, max_epochs)
        self.peer_val_metrics = nn.ModuleDict({role: accuracy_metrics(num_classes, f"val/{role}/")
                                               for role in self.roles})
        self.peer_test_metrics = nn.ModuleDict({role: accuracy_metrics(num_classes, f"test/{role}/")
                                                for role in self.roles})

    def _check_terms(self, num_classes: int, max_epochs: int | None) -> None:
        for name, term in self.terms.items():
            if not isinstance(term, DistillTerm):
                raise ConfigError(f"distill.{name} built a {type(term).__name__}, not a DistillTerm; check its "
                                  f"_target_ in conf/distill/{name}.yaml.")
            if term.student_taps or term.teacher_taps or term.needs_indices or term.init_epochs:
                raise ConfigError(
                    f"distill.{name} reads features, sample indices or has an init stage, but {type(self).__name__} "
                    f"hands terms only the peers' logits (the partner's detached logits as the teacher's). Use a "
                    f"logit term (kd, dkd, dist, kd_ls, dkd_ls) or distill=[].")
            context = BuildContext(student_shapes={}, teacher_shapes={}, num_classes=num_classes, max_epochs=max_epochs)
            term.build(context)
            term.check(name, context)

    @property
    def peers(self) -> list[nn.Module]:
        return [self.student, *self.other_peers]

    def products(self) -> dict[str, nn.Module]:
        return dict(zip(self.roles, self.peers))

    def partner_logits(self, logits: list[Tensor], targets: Tensor) -> list[list[Tensor]]:
        """For each peer, the detached logits it learns from."""
        raise NotImplementedError(f"{type(self).__name__} must implement partner_logits()")

    def mimicry_weight(self, epoch: int) -> float:
        return self.weight

    def mimicry_details(self) -> list[str]:
        return [f"T={self.temperature}"]

    def loss_summary(self) -> str:
        """What every peer trains, e.g. `loss = Σ over 2 peers of (1.0·CE + 1.0·dml(T=1.0))`; the mimicry
        and term losses are means over the peer's partners."""
        parts = [f"{self.ce_weight}·CE", f"{self.weight}·{self.mimicry_name}({', '.join(self.mimicry_details())})"]
        parts += describe_loss(self.ce_weight, self.terms).split(" + ")[1:]
        return f"loss = Σ over {len(self.roles)} peers of ({' + '.join(parts)})"

    def training_losses(self, images: Tensor, targets: Tensor, indices: Tensor | None) -> dict[str, Tensor]:
        logits = [peer(images) for peer in self.peers]
        partners = self.partner_logits(logits, targets)
        factor = self.mimicry_weight(self.current_epoch)
        losses: dict[str, Tensor] = {}
        for role, own, own_partners in zip(self.roles, logits, partners):
            losses[f"{role}_ce"] = self.ce_weight * F.cross_entropy(own.float(), targets)
            mimicry = torch.stack([functional.kd(own, partner, self.temperature) for partner in own_partners])
            losses[f"{role}_{self.mimicry_name}"] = factor * mimicry.mean()
            for name, term in self.terms.items():
                values = [term(DistillInputs(student_logits=own, targets=targets, indices=indices,
                                             teacher_logits=partner, epoch=self.current_epoch))
                          for partner in own_partners]
                term_factor = term.weight_at(self.current_epoch)
                for part in values[0] if isinstance(values[0], Mapping) else [""]:
                    parts = [value[part] if part else value for value in values]
                    losses[f"{role}_{name}_{part}" if part else f"{role}_{name}"] = term_factor * torch.stack(parts).mean()
        return losses

    def _evaluate(self, batch: Any, metrics: Any, stage: str) -> None:
        images, targets, _ = unpack_batch(batch)
        peer_metrics = self.peer_val_metrics if stage == "val" else self.peer_test_metrics
        for role, peer in zip(self.roles, self.peers):
            logits = peer(images)
            peer_metrics[role].update(logits, targets)
            if peer is self.student:
                self.log(f"{stage}/loss", F.cross_entropy(logits.float(), targets), batch_size=len(targets))
                metrics.update(logits, targets)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        for metrics in self.peer_val_metrics.values():
            self.log_dict(metrics.compute())
            metrics.reset()

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        for metrics in self.peer_test_metrics.values():
            self.log_dict(metrics.compute())
            metrics.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["peers"] = {role: dict(getattr(peer, "kd_spec", {}))
                                               for role, peer in self.products().items()}


class DML(MutualLearning):
    """Deep Mutual Learning, Zhang et al., CVPR 2018.

    Peer k minimises CE + 1/(K−1)·Σ_{l≠k} KL(p_l ‖ p_k) (paper, Eq. 10), with every p_l detached. Follows
    Knowledge-Distillation-Zoo's train_dml.py (AberHu; the authors' own code is TensorFlow for
    Market-1501 only): T=1, λ=1, KL with batch mean, one forward per network, each net's loss on the
    other's detached logits. Its CIFAR recipe (SGD 0.1, Nesterov, momentum 0.9, wd 1e-4, batch 128, 200
    epochs, ×0.1 at 100 and 150) is `experiment=schemes/dml_cifar100`; `scheme=dml` alone trains with the
    run's optimizer and schedule. Unlike KD_Lib's DML (one zero_grad before the peer loop, peer logits not
    detached), no gradient of peer k's loss reaches another peer.
    """

    trains_on_mixed_batches = True  # its CE takes class probabilities; KDCL's min-logit ensemble needs labels

    mimicry_name = "dml"

    def partner_logits(self, logits: list[Tensor], targets: Tensor) -> list[list[Tensor]]:
        detached = [value.detach() for value in logits]
        return [[other for index, other in enumerate(detached) if index != own] for own in range(len(logits))]


def min_logit_ensemble(logits: Sequence[Tensor], targets: Tensor) -> Tensor:
    """KDCL-MinLogit: shift each peer's logits so its target-class logit is 0, then take the class-wise
    minimum over peers (the ensemble of least cross-entropy among such combinations, KDCL Sec. 3.2)."""
    stacked = torch.stack([value.float() for value in logits])
    target_logit = stacked.gather(2, targets.view(1, -1, 1).expand(len(logits), -1, 1))
    return (stacked - target_logit).amin(dim=0)


def mean_ensemble(logits: Sequence[Tensor], targets: Tensor) -> Tensor:
    return torch.stack([value.float() for value in logits]).mean(dim=0)


ENSEMBLES = {"min_logit": min_logit_ensemble, "mean": mean_ensemble}


def sigmoid_rampup(epoch: int, rampup_epochs: float) -> float:
    """exp(−5(1 − t)²), t = epoch / rampup_epochs clipped to [0, 1] (Laine & Aila 2017; ONE's utils/ramps, whose
    length is a float too)."""
    if rampup_epochs == 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0), rampup_epochs) / rampup_epochs
    return math.exp(-5.0 * phase * phase)


# ONE's CIFAR recipe ramps its KL weight up over 80 of its 300 epochs (scripts/ONE_ResNet32.sh).
REFERENCE_RAMPUP_FRACTION = 80 / 300


class KDCL(MutualLearning):
    """Knowledge Distillation via Collaborative Learning, Guo et al., CVPR 2020.

    Every peer distils from one soft target built from all peers' detached logits: `ensemble="min_logit"`
    (KDCL-MinLogit) or `"mean"` (averaged logits); loss per peer CE + w(epoch)·T²·KL(p_ens ‖ p_peer) with the
    sigmoid ramp-up w = weight·exp(−5(1−epoch/R)²). KDCL has no official code; the defaults T=3, weight 1
    and the ramp-up are those of the online-ensemble reference it compares with (ONE,
    Lan1991Xu/ONE_NeurIPS2018: loss/kl_loss.py, cifar_one.py, scripts/ONE_ResNet32.sh), whose R is 80 of its
    300 epochs. R is `rampup_fraction` of `max_epochs` (default 80/300, so any epoch count keeps the
    reference's shape), or `rampup_epochs` when given.
    Not included: KDCL's differently distorted input per peer (one batch is shared by all peers here).
    """

    mimicry_name = "kdcl"

    def __init__(self, peers: Sequence[nn.Module], num_classes: int, ensemble: str = "min_logit",
                 weight: float = 1.0, temperature: float = 3.0, rampup_fraction: float = REFERENCE_RAMPUP_FRACTION,
                 rampup_epochs: int | None = None, max_epochs: int | None = None, **base: Any) -> None:
        if ensemble not in ENSEMBLES:
            raise ConfigError(f"scheme.ensemble={ensemble!r} is not a KDCL ensemble; choose one of {sorted(ENSEMBLES)}.")
        rampup_length = kdcl_rampup_length(rampup_fraction, rampup_epochs, max_epochs)
        super().__init__(peers, num_classes, weight=weight, temperature=temperature, max_epochs=max_epochs, **base)
        self.ensemble = ensemble
        self.rampup_length = rampup_length

    def mimicry_details(self) -> list[str]:
        return [*super().mimicry_details(), f"{self.ensemble} ensemble",
                f"sigmoid ramp-up {self.rampup_length:g} epochs"]

    def partner_logits(self, logits: list[Tensor], targets: Tensor) -> list[list[Tensor]]:
        target = ENSEMBLES[self.ensemble]([value.detach() for value in logits], targets)
        return [[target] for _ in logits]

    def mimicry_weight(self, epoch: int) -> float:
        return self.weight * sigmoid_rampup(epoch, self.rampup_length)


def kdcl_rampup_length(fraction: float, epochs: int | None, max_epochs: int | None) -> float:
    """The ramp-up length R in epochs: `epochs` when given, else `fraction` of `max_epochs`."""
    known = max_epochs is not None and max_epochs > 0
    if epochs is not None:
        if epochs < 0 or (known and epochs > max_epochs):
            raise ConfigError(
                f"scheme.rampup_epochs={epochs} must be between 0 and trainer.max_epochs={max_epochs}, or the KL weight "
                f"never reaches scheme.weight. Lower it, or set scheme.rampup_epochs=null to ramp over "
                f"scheme.rampup_fraction of the epochs (the reference: 80 of 300).")
        return float(epochs)
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"scheme.rampup_fraction={fraction} must be in [0, 1]: the share of trainer.max_epochs over "
                          f"which the KL weight ramps up (the reference: 80 of 300 epochs, 0.267).")
    if fraction == 0.0:
        return 0.0
    if not known:
        raise ConfigError(f"scheme.rampup_fraction={fraction} is a share of trainer.max_epochs, which is "
                          f"{max_epochs}: give the run a number of epochs, or the ramp-up in epochs with "
                          f"scheme.rampup_epochs=<n>.")
    return float(fraction) * float(max_epochs)
