"""Composed terms get their published CE weight or a clear error, and every run states the loss it trains."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms import AT, CRD, KD
from kd_lightning.models import build_model
from kd_lightning.pipeline import build_terms, run
from kd_lightning.schemes import Offline, Supervised
from kd_lightning.teachers import FrozenTeacher
from kd_lightning.validate import check_settings


def offline(terms: dict, **options) -> Offline:
    torch.manual_seed(0)
    return Offline(student=build_model("convnet_tiny", num_classes=10, in_channels=1),
                   teacher=FrozenTeacher(build_model("convnet_small", num_classes=10, in_channels=1)), terms=terms,
                   num_classes=10, example_input=torch.randn(2, 1, 8, 8), train_size=32,
                   optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **options)


def test_kd_with_crd_without_a_ce_weight_is_refused_not_trained_at_kds_ce_weight(make_cfg):
    # distill=kd alone is CE 0.1 + KD 0.9; CRD's recipe is CE 1. Before, [kd,crd] silently trained CE 0.1.
    with pytest.raises(ConfigError, match=r"kd: 0\.1, crd: 1\.0.*scheme\.ce_weight=.*distill=crd_kd"):
        run(make_cfg("baseline=false", "distill=[kd,crd]", "distill.crd.nce_k=4"))


def test_an_explicit_ce_weight_settles_a_composition(make_cfg):
    cfg = make_cfg("distill=[kd,at]", "scheme.ce_weight=0.5")
    module = offline(build_terms(cfg), ce_weight=cfg.scheme.ce_weight)
    assert module.ce_weight == 0.5


def test_terms_that_agree_take_their_common_recipe_ce_weight():
    assert offline({"kd": KD()}).ce_weight == 0.1  # Hinton's recipe, CE 0.1 + KD 0.9
    assert offline({"at": AT(), "crd": CRD(nce_k=4, negatives="uniform")}).ce_weight == 1.0
    assert offline({}).ce_weight == 1.0


def test_named_crd_kd_is_the_published_combination(make_cfg):
    # RepDistiller scripts/run_cifar_distill.sh, "CRD+KD": -r 1 (CE) -a 1 (KD, --kd_T 4) -b 0.8 (CRD).
    cfg = make_cfg("distill=crd_kd", "distill.crd.nce_k=4", "distill.crd.negatives=uniform")
    terms = build_terms(cfg)
    assert sorted(terms) == ["crd", "kd"]
    module = offline(terms, ce_weight=cfg.scheme.ce_weight)
    assert (module.ce_weight, terms["kd"].weight, terms["kd"].temperature, terms["crd"].weight) == (1.0, 1.0, 4.0, 0.8)
    assert module.loss_summary() == "loss = 1.0·CE + 1.0·kd(T=4.0) + 0.8·crd"


def test_every_run_logs_and_stores_the_loss_it_trains(make_cfg, caplog):
    caplog.set_level(logging.INFO, logger="kd_lightning")
    results = run(make_cfg("distill=[kd]"))
    summary = "loss = 0.1·CE + 0.9·kd(T=4.0)"
    assert results["loss"] == summary
    stored = json.loads((Path(make_cfg().paths.output_dir) / "results.json").read_text())
    assert stored["loss"] == summary
    messages = [record.getMessage() for record in caplog.records if record.name.startswith("kd_lightning")]
    # teacher and baseline (plain CE), then the student: each fit announces its loss first.
    assert messages.count("loss = 1.0·CE") == 2 and messages.count(summary) == 1


def test_init_stages_and_supervised_runs_describe_their_loss():
    from kd_lightning.losses.terms import FT

    module = offline({"ft": FT(init_lr=0.02)})
    module.set_init_stage(True)
    assert module.loss_summary() == "init stage loss = ft_init (lr 0.02, 30 epochs)"
    module.set_init_stage(False)
    assert module.loss_summary() == "loss = 1.0·CE + 200.0·ft"
    smoothed = Supervised(build_model("convnet_tiny", num_classes=10, in_channels=1), num_classes=10,
                          label_smoothing=0.1, optimizer=torch.optim.SGD)
    assert smoothed.loss_summary() == "loss = 1.0·CE(label_smoothing=0.1)"


@pytest.mark.parametrize("overrides", [["scheme=tf_kd_self"], ["distill=[tf_kd]"]])
def test_tf_kd_trains_the_reference_loss_kd_self_ce_weight(make_cfg, overrides):
    # yuanli2333/Teacher-Free-Knowledge-Distillation my_loss_function.py loss_kd_self: (1 - alpha)·CE + alpha·KL,
    # alpha 0.95 (resnet18_self_teacher/params.json). Before, both configs trained 1.0·CE + 0.95·tf_kd.
    cfg = make_cfg(*overrides)
    terms = build_terms(cfg)
    module = offline(terms, ce_weight=cfg.scheme.ce_weight)
    assert module.ce_weight == pytest.approx(1 - 0.95)
    assert module.loss_summary() == "loss = 0.05·CE + 0.95·tf_kd(T=6.0)"


def test_tf_kd_ce_weight_is_fixed_and_set_beside_a_changed_weight(make_cfg):
    # The CE weight does not follow distill.tf_kd.weight: α 0.9 keeps CE 0.05 unless ce_weight is set to 1 − α
    # (reference loss_kd_self would use 0.1), and that key is overridable without Hydra's `+`.
    changed = build_terms(make_cfg("distill=[tf_kd]", "distill.tf_kd.weight=0.9"))
    assert offline(changed).ce_weight == pytest.approx(0.05)
    both = build_terms(make_cfg("distill=[tf_kd]", "distill.tf_kd.weight=0.9", "distill.tf_kd.ce_weight=0.1"))
    check_settings(make_cfg("distill=[tf_kd]"))  # null (the class's value) is a valid setting
    with pytest.raises(ConfigError, match=r"distill\.tf_kd\.ce_weight=-1"):
        check_settings(make_cfg("distill=[tf_kd]", "distill.tf_kd.ce_weight=-1"))
    assert offline(both).loss_summary() == "loss = 0.1·CE + 0.9·tf_kd(T=6.0)"


def test_the_loss_line_states_the_consistency_ramp_up():
    # Mean teacher's consistency weight follows its own sigmoid ramp-up (Consistency.weight_at); before, the
    # line read `100.0·consistency` as if the weight were constant from the first epoch.
    from kd_lightning.losses.terms import Consistency

    assert offline({"consistency": Consistency(rampup_epochs=5)}).loss_summary() == \
        "loss = 1.0·CE + 100.0·consistency(sigmoid ramp-up 5 epochs)"
