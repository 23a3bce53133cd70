"""The overrides every scheme is exercised under by the tests that walk all schemes (resume, precision,
the frozen-teacher contract). A new `conf/scheme/<name>.yaml` needs an entry here, which
tests/test_schemes.py checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from _pytest.mark.structures import ParameterSet

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TERMS = sorted(path.stem for path in (CONF_DIR / "distill").glob("*.yaml"))
# Recipes cut to the tests' size: init stages of one epoch, warm-ups that end within two epochs, CRD with
# 64 negatives instead of 16384, FSP between networks of equal widths.
TERM_OVERRIDES = {
    "ab": ["distill.ab.init_epochs=1"], "ft": ["distill.ft.init_epochs=1"],
    "fsp": ["distill.fsp.init_epochs=1", "student=convnet_large"],
    "dkd": ["distill.dkd.warmup_epochs=2"], "dkd_ls": ["distill.dkd_ls.warmup_epochs=2"],
    "reviewkd": ["distill.reviewkd.warmup_epochs=2"], "crd": ["distill.crd.nce_k=64"],
}
DATA_FREE = ["scheme.batch_size=16", "scheme.generator.width=8"]
POOL = ["scheme.steps_per_epoch=4", "scheme.steps_per_round=3", "scheme.batch_size=8", "scheme.pool_size=20",
        "scheme.student_crop_padding=1", "scheme.synthesis.batch_size=8"]
# scheme → the override lists it is run under (the first is the one the cheaper walks use).
SCHEME_CASES: dict[str, list[list[str]]] = {
    "supervised": [["distill=[]"]],
    "offline": [[f"distill=[{term}]", *TERM_OVERRIDES.get(term, [])] for term in TERMS],
    "multi_teacher": [["distill=[kd,fitnet]", "scheme.ce_weight=0.1", f"scheme.aggregation={aggregation}"]
                      for aggregation in ("average", "confidence", "random")],
    "takd": [["distill=[kd]"]],
    "born_again": [["distill=[kd]", "plan.generations=2"]],
    "dml": [["scheme.peers=[convnet_small,convnet_tiny]"]],
    "kdcl": [["scheme.rampup_epochs=1"]],
    "byot": [[]], "cs_kd": [[]], "tf_kd_reg": [[]], "tf_kd_self": [[]], "mean_teacher": [[]],
    # Two discriminator steps per student step, a step-interval schedule: both must resume exactly.
    "adversarial": [["distill=[kd]", "scheme.discriminator_steps=2", "+scheme.scheduler_interval=step"]],
    # Data-free: small generators and batches; generator rounds short enough that a resume lands inside one.
    # DFAD with its generator's class priors on (ZSKT runs without: both generator losses resume exactly);
    # ZSKT with a replay pool small enough to wrap before the resume point.
    "dafl": [DATA_FREE], "dfad": [[*DATA_FREE, "scheme.student_steps=2", "scheme.class_priors.one_hot=1",
                                   "scheme.class_priors.information_entropy=5"]],
    "zskt": [[*DATA_FREE, "scheme.student_steps=2", "scheme.replay.capacity=6", "scheme.replay.push_every_n_steps=1",
              "scheme.replay.push_images=4", "scheme.replay.batch_size=3"]], "datafree_noise": [["scheme.batch_size=16"]],
    # Pool schemes: a synthesis round at steps 0, 3, 6 (one at the resume point), a pool that wraps, every
    # synthesis part switched on.
    "deep_inversion": [[*POOL, "scheme.synthesis.iterations=3", "scheme.synthesis.adi_weight=1.0",
                        "scheme.synthesis.tv_l1=1e-3", "scheme.synthesis.l2=1e-4", "scheme.synthesis.flip=true",
                        "scheme.normalize_mean=[0.5]", "scheme.normalize_std=[0.25]"]],
    "fast_datafree": [[*POOL, "scheme.generator.latent_dim=8", "scheme.generator.width=4", "scheme.synthesis.steps=2",
                       "scheme.synthesis.warmup_rounds=1", "scheme.synthesis.crop_padding=1"]],
    # needs named inputs: enabled by the lead
    "mlkd": [pytest.param([], marks=pytest.mark.skip(reason="MLKD needs a strong view: named inputs come with the "
                                                            "data side"))],
}


def case_overrides(case: list[str] | ParameterSet) -> list[str]:
    """A case's override list, whether it is a plain list or a `pytest.param` carrying marks."""
    return list(case.values[0]) if isinstance(case, ParameterSet) else case


def case_marks(case: list[str] | ParameterSet) -> tuple:
    return tuple(case.marks) if isinstance(case, ParameterSet) else ()


def scheme_params() -> list[ParameterSet]:
    """Every scheme as a test parameter, with the marks (skips) of its first case."""
    return [pytest.param(scheme, marks=case_marks(SCHEME_CASES[scheme][0]), id=scheme) for scheme in sorted(SCHEME_CASES)]
