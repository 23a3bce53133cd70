"""How a run's loss is composed: the CE weight of a list of terms, and the one line that states it.

Each term carries the CE weight its published recipe trains with (`recipe_ce_weight`: KD's CE 0.1 + KD 0.9,
1 for the feature and relation methods, as RepDistiller's scripts). Composing terms whose recipes disagree
has no published answer, so the user must give one.
"""

from __future__ import annotations

from typing import Mapping

from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms.base import DistillTerm


def resolve_ce_weight(explicit: float | None, terms: Mapping[str, DistillTerm]) -> float:
    """`explicit` when given, else the terms' common recipe CE weight (1 without terms)."""
    if explicit is not None:
        return float(explicit)
    recipes = {name: float(term.recipe_ce_weight) for name, term in terms.items()}
    if len(set(recipes.values())) > 1:
        listed = ", ".join(f"{name}: {value}" for name, value in recipes.items())
        raise ConfigError(
            f"distill=[{','.join(recipes)}] combines terms whose published recipes train with different "
            f"cross-entropy weights ({listed}), so the CE weight of this combination is not defined by any of "
            f"them. Choose it explicitly with scheme.ce_weight=<value> (e.g. scheme.ce_weight=1.0), or use a "
            f"named combination with its published weights, e.g. distill=crd_kd (CRD+KD: CE 1, KD 1 at T=4, "
            f"CRD 0.8)."
        )
    return next(iter(recipes.values()), 1.0)


def describe_term(name: str, term: DistillTerm) -> str:
    """`kd(T=4.0)`, `consistency(sigmoid ramp-up 5 epochs)`: a term and what shapes it, without its weight.
    Every scheme's loss line names its terms through this, so none of them leaves a schedule out."""
    details = [f"T={float(term.temperature)}"] if hasattr(term, "temperature") else []
    if term.warmup_epochs:
        details.append(f"warm-up {term.warmup_epochs} epochs")
    if getattr(term, "rampup_epochs", 0):  # mean teacher's consistency: its own sigmoid schedule
        details.append(f"sigmoid ramp-up {term.rampup_epochs} epochs")
    return name + (f"({', '.join(details)})" if details else "")


def describe_loss(ce_weight: float, terms: Mapping[str, DistillTerm]) -> str:
    """`loss = 1.0·CE + 1.0·kd(T=4.0) + 0.8·crd`: the weights the main training uses. A zero CE weight
    (supervision transfer, data-free and L1 recipes) says so, since `train/ce` then logs 0 whatever the labels."""
    parts = [f"{float(ce_weight)}·CE" + (" (labels unused)" if float(ce_weight) == 0.0 else "")]
    for name, term in terms.items():
        if not term.main_stage_loss:
            parts.append(f"{name}(init stage only)")
            continue
        parts.append(f"{term.weight}·{describe_term(name, term)}")
    return "loss = " + " + ".join(parts)


def describe_init_loss(terms: Mapping[str, DistillTerm]) -> str:
    """`init stage loss = ft_init (lr 0.01, 30 epochs)`: what the initialisation stage trains, and how fast."""
    parts = [f"{name}_init (lr {'optimizer.lr' if term.init_lr is None else term.init_lr}, {term.init_epochs} epochs)"
             for name, term in terms.items()]
    return "init stage loss = " + " + ".join(parts)
