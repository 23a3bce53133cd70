"""Multi-teacher distillation, teacher-assistant chains (TAKD) and Born-Again generations."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

import kd_lightning.pipeline as pipeline
from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms import FT, KD, RKD, Consistency, DistillInputs, FitNet
from kd_lightning.models import build_model
from kd_lightning.pipeline import run
from kd_lightning.schemes import MultiTeacher
from kd_lightning.stages import plan_stages
from kd_lightning.teachers import read_weights

# (scheme, overrides) for the generic resume test: each selects one of this file's schemes.
T = 4.0
WIDTHS = ("convnet_large", "convnet_small", "convnet_tiny")


def teachers_of_three_widths() -> list[torch.nn.Module]:
    return [build_model(name, num_classes=10, in_channels=1) for name in WIDTHS]


def make_module(aggregation: str = "average", terms=None, teachers=None, seed: int = 0,
                ce_weight: float = 0.1) -> MultiTeacher:
    torch.manual_seed(seed)
    teachers = teachers_of_three_widths() if teachers is None else teachers
    return MultiTeacher(student=build_model("convnet_tiny", 10, 1), teachers=teachers,
                        terms=terms if terms is not None else {"kd": KD(weight=0.9, temperature=T)}, num_classes=10,
                        example_input=torch.randn(2, 1, 8, 8), aggregation=aggregation, ce_weight=ce_weight,
                        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4))


def reference_kd_per_sample(student_logits, teacher_logits):
    s, t = student_logits.double(), teacher_logits.double()
    p_t = torch.softmax(t / T, dim=1)
    return (p_t * (p_t.log() - torch.log_softmax(s / T, dim=1))).sum(dim=1) * T * T


def reference_ce_per_sample(logits, targets):
    return -torch.log_softmax(logits.double(), dim=1)[torch.arange(len(targets)), targets]


def batch(size: int = 16):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 1, 8, 8, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def outputs(module: MultiTeacher, images):
    with torch.no_grad():
        return module.student(images), [teacher(images) for teacher in module.all_teachers]


# --- the losses against float64 arithmetic -----------------------------------------------------------------

def test_average_is_the_mean_over_teachers_of_each_teachers_kd():
    module = make_module("average").eval()
    images, targets = batch()
    losses = module.training_losses(images, targets, None)
    student_logits, teacher_logits = outputs(module, images)
    expected = 0.9 * torch.stack([reference_kd_per_sample(student_logits, t).mean() for t in teacher_logits]).mean()
    torch.testing.assert_close(losses["kd"].double(), expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(losses["ce"].double(), 0.1 * reference_ce_per_sample(student_logits, targets).mean(),
                               rtol=1e-4, atol=0)


def test_confidence_weights_each_sample_by_the_teachers_cross_entropy_as_ca_mkd_does():
    module = make_module("confidence").eval()
    images, targets = batch()
    losses = module.training_losses(images, targets, None)
    student_logits, teacher_logits = outputs(module, images)
    ce = torch.stack([reference_ce_per_sample(t, targets) for t in teacher_logits])  # (K, B)
    share = ce.exp() / ce.exp().sum(dim=0)
    weights = (1 - share) / (len(teacher_logits) - 1)  # Rorozhl/CA-MKD helper/loops.py, ensemble_method CAMKD
    kd = torch.stack([reference_kd_per_sample(student_logits, t) for t in teacher_logits])
    expected = 0.9 * (weights * kd).sum() / (len(targets) * len(teacher_logits))
    torch.testing.assert_close(losses["kd"].double(), expected, rtol=1e-4, atol=0)
    # A uniform weighting gives another number: the test sees the confidence.
    assert not torch.isclose(losses["kd"].double(), 0.9 * kd.mean() / len(teacher_logits), rtol=1e-3)


def test_random_runs_only_the_drawn_teacher_and_distils_from_it():
    module = make_module("random").eval()
    ran = []
    for index, teacher in enumerate(module.all_teachers):
        teacher.model.register_forward_hook(lambda *_, index=index: ran.append(index))
    images, targets = batch()
    chosen = module.chosen_teacher()
    losses = module.training_losses(images, targets, None)
    assert ran == [chosen]
    student_logits, teacher_logits = outputs(module, images)
    expected = 0.9 * reference_kd_per_sample(student_logits, teacher_logits[chosen]).mean()
    torch.testing.assert_close(losses["kd"].double(), expected, rtol=1e-4, atol=0)


def test_feature_terms_get_one_adapter_per_teacher_sized_to_it():
    module = make_module("average", terms={"fitnet": FitNet(weight=100.0)})
    widths = [module.terms[key].regressor[0].out_channels for key in ("fitnet", "fitnet_teacher2", "fitnet_teacher3")]
    assert widths == [64, 32, 8]  # stage2 channels of convnet_large, convnet_small, convnet_tiny
    optimized = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    for key in ("fitnet", "fitnet_teacher2", "fitnet_teacher3"):
        assert {id(p) for p in module.terms[key].parameters()} <= optimized


def test_sample_losses_average_to_the_terms_batch_loss():
    module = make_module("average", terms={"kd": KD(), "kd_ls": KD(temperature=2.0, logit_standardization=True),
                                           "fitnet": FitNet()}).eval()
    images, targets = batch()
    inputs = DistillInputs(student_logits=module.student(images), targets=targets, indices=None,
                           teacher_logits=module.teacher(images), student_features=module.student_taps.features,
                           teacher_features=module.teacher_taps.features)
    for name in ("kd", "kd_ls", "fitnet"):
        term = module.terms[name]
        torch.testing.assert_close(term.sample_losses(inputs).mean(), term(inputs), rtol=1e-5, atol=1e-7)


def test_init_stage_terms_train_one_paraphraser_per_teacher_and_freeze_all_of_them_after():
    module = make_module("average", terms={"ft": FT(init_epochs=1)}).eval()
    images, targets = batch()
    module.set_init_stage(True)
    assert set(module.training_losses(images, targets, None)) == {"ft_init", "ft_teacher2_init", "ft_teacher3_init"}
    assert all(p.requires_grad for key in ("ft", "ft_teacher2", "ft_teacher3")
               for p in module.terms[key].init_only_parameters())
    module.set_init_stage(False)
    assert not any(p.requires_grad for key in ("ft", "ft_teacher2", "ft_teacher3")
                   for p in module.terms[key].init_only_parameters())
    assert set(module.training_losses(images, targets, None)) == {"ce", "ft"}


def test_every_teacher_is_frozen_pinned_to_eval_and_outside_optimizer_and_checkpoint():
    module = make_module("average", terms={"kd": KD(), "fitnet": FitNet()})
    module.train()
    teacher_ids = {id(p) for teacher in module.all_teachers for p in teacher.parameters()}
    assert len(module.all_teachers) == 3
    assert all(not m.training for teacher in module.all_teachers for m in teacher.modules())
    assert not any(p.requires_grad for teacher in module.all_teachers for p in teacher.parameters())
    optimized = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert optimized and not optimized & teacher_ids
    assert not teacher_ids & {id(p) for p in module.parameters()}
    assert not any(key.startswith(("teacher", "other_teachers")) for key in module.state_dict())
    module.to(torch.float64)
    assert all(next(teacher.parameters()).dtype == torch.float64 for teacher in module.all_teachers)


# --- bad input ------------------------------------------------------------------------------------------------

def test_a_teacher_of_another_class_count_is_refused_naming_it():
    teachers = [build_model("convnet_large", 10, 1), build_model("convnet_small", 7, 1)]
    with pytest.raises(ConfigError, match=r"Teacher 2 \(convnet_small\) predicts \(7,\) outputs.*10 classes"):
        make_module("average", teachers=teachers)


def test_a_teacher_file_of_another_class_count_in_the_teacher_list_is_refused(make_cfg, tmp_path):
    torch.save(build_model("convnet_small", 7, 1).state_dict(), tmp_path / "seven.pt")
    cfg = make_cfg("scheme=multi_teacher", "baseline=false")
    entry = {"name": "convnet_small", "checkpoint": str(tmp_path / "seven.pt")}
    OmegaConf.update(cfg, "teachers", ["convnet_large", entry], merge=False)
    with pytest.raises(ConfigError, match="does not fit model 'convnet_small'"):
        run(cfg)


def test_a_takd_chain_whose_teacher_has_another_class_count_or_input_channels_is_refused(make_cfg, tmp_path):
    # Chain members are built for the data (its classes and channels); a teacher file must fit them too.
    torch.save(build_model("convnet_large", 7, 1).state_dict(), tmp_path / "seven.pt")
    torch.save(build_model("convnet_large", 10, 3).state_dict(), tmp_path / "rgb.pt")
    for teacher_file in ("seven.pt", "rgb.pt"):
        cfg = make_cfg("scheme=takd", "baseline=false")
        OmegaConf.update(cfg, "plan.chain", [{"name": "convnet_large", "checkpoint": str(tmp_path / teacher_file)},
                                             "convnet_small", "convnet_tiny"], merge=False)
        with pytest.raises(ConfigError, match="does not fit model 'convnet_large'"):
            run(cfg)
    assert not (tmp_path / "cache").exists(), "refused before any stage trained"


@pytest.mark.parametrize(("overrides", "message"), [
    (["scheme=multi_teacher", "teachers=[convnet_large]"], "at least two"),
    (["scheme=multi_teacher", "teachers=[convnet_large,convnet_huge]"], r"teachers\[1\]='convnet_huge' is not a model"),
    (["scheme=takd", "plan.chain=[convnet_large]"], "a chain is a teacher"),
    (["scheme=takd", "plan.chain=[convnet_large,resnet_20,convnet_tiny]"], r"plan.chain\[1\]='resnet_20'.*resnet20"),
    (["scheme=born_again", "plan.generations=0"], "at least one generation"),
])
def test_plans_refuse_bad_lists_with_the_fix(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_stages(make_cfg(*overrides))


def test_confidence_refuses_terms_that_do_not_split_over_samples_and_unknown_aggregations():
    with pytest.raises(ConfigError, match=r"terms \['rkd'\] do not split over samples"):
        make_module("confidence", terms={"kd": KD(), "rkd": RKD()})
    with pytest.raises(ConfigError, match="not one of"):
        make_module("mean")


# --- plans ------------------------------------------------------------------------------------------------------

def test_takd_chain_is_teacher_then_assistants_then_student_each_taught_by_the_one_before(make_cfg):
    stages = plan_stages(make_cfg("scheme=takd", "plan.chain=[convnet_large,convnet_small,convnet_tiny,convnet_tiny]"))
    assert [stage.name for stage in stages] == ["teacher", "assistant1", "assistant2", "baseline", "student"]
    assert [stage.teachers for stage in stages] == [{}, {"teacher": "teacher"}, {"teacher": "assistant1"}, {},
                                                   {"teacher": "assistant2"}]
    assert [stage.model_names() for stage in stages] == ["convnet_large", "convnet_small", "convnet_tiny",
                                                         "convnet_tiny", "convnet_tiny"]
    assert [stage.cache for stage in stages] == [True, True, True, True, False]


def test_born_again_generations_are_one_architecture_each_re_initialised_and_taught_by_the_last(make_cfg):
    stages = plan_stages(make_cfg("scheme=born_again", "plan.generations=3", "seed=5"))
    assert [stage.name for stage in stages] == ["baseline", "generation1", "generation2", "student"]
    assert stages[0].scheme["_target_"].endswith("Supervised") and not stages[0].teachers
    assert [stage.teachers for stage in stages[1:]] == [{"teacher": "baseline"}, {"teacher": "generation1"},
                                                       {"teacher": "generation2"}]
    assert {stage.model_names() for stage in stages} == {"convnet_tiny"}
    assert [stage.seed for stage in stages] == [5, 6, 7, 8]


# --- real training through pipeline.run ------------------------------------------------------------------------

class CaptureStudentModule(L.Callback):
    def __init__(self, store: dict) -> None:
        self.store = store

    def on_train_start(self, trainer, module) -> None:
        self.store[Path(trainer.default_root_dir).name] = module


def test_multi_teacher_run_distils_from_each_trained_cached_teacher(make_cfg, tmp_path, monkeypatch, capsys):
    modules: dict = {}
    original = pipeline.build_callbacks
    monkeypatch.setattr("kd_lightning.trainer_setup.build_callbacks",
                        lambda cfg, has_logger: [*original(cfg, has_logger), CaptureStudentModule(modules)])
    results = run(make_cfg("scheme=multi_teacher", "teachers=[convnet_large,convnet_large,convnet_small]",
                           "distill=[kd,fitnet]", "scheme.ce_weight=0.1"))
    table = capsys.readouterr().out
    for label in ("teacher 1", "teacher 2", "teacher 3", "student baseline", "student + kd+fitnet (3 teachers)"):
        assert label in table
    files = [Path(results["stages"][f"teacher{k}"]["source"].split("cached at ")[1]) for k in (1, 2, 3)]
    module = modules["student"]
    for teacher, file in zip(module.all_teachers, files):  # the trained products, not the fail-fast build's
        weights, _ = read_weights(file)
        assert all(torch.equal(weights[key], value) for key, value in teacher.model.state_dict().items())
    # Two entries of one architecture are two teachers (seeds teacher.seed + position), not one cached twice.
    first, second = (read_weights(file)[0] for file in files[:2])
    assert not torch.equal(first["fc.weight"], second["fc.weight"])
    again = run(make_cfg("scheme=multi_teacher", "teachers=[convnet_large,convnet_large,convnet_small]",
                         "distill=[kd,fitnet]", "scheme.ce_weight=0.1", "baseline=false"))
    assert all(again["stages"][f"teacher{k}"]["source"].startswith("cache") for k in (1, 2, 3))


def test_takd_assistant_is_cached_under_a_key_that_includes_its_teachers(make_cfg, tmp_path, capsys):
    first = run(make_cfg("scheme=takd", "baseline=false"))
    assert "assistant 1 + kd" in capsys.readouterr().out
    assert first["stages"]["assistant1"]["source"].startswith("trained, cached")
    other_teacher = run(make_cfg("scheme=takd", "baseline=false", "teacher.lr=0.2"))
    assert other_teacher["stages"]["teacher"]["source"].startswith("trained")
    assert other_teacher["stages"]["assistant1"]["source"].startswith("trained")  # its teacher changed
    again = run(make_cfg("scheme=takd", "baseline=false"))
    assert again["stages"]["assistant1"]["source"] == f"cache {first['stages']['assistant1']['source'].split('at ')[1]}"


def test_born_again_run_lists_every_generation_and_each_learns_from_the_previous_product(make_cfg, monkeypatch,
                                                                                        capsys):
    modules: dict = {}
    original = pipeline.build_callbacks
    monkeypatch.setattr("kd_lightning.trainer_setup.build_callbacks",
                        lambda cfg, has_logger: [*original(cfg, has_logger), CaptureStudentModule(modules)])
    results = run(make_cfg("scheme=born_again", "plan.generations=2"))
    table = capsys.readouterr().out
    for label in ("generation 0 (labels)", "generation 1 + kd", "generation 2 + kd"):
        assert label in table
    generation1 = modules["generation1"].student.state_dict()
    taught_by = modules["student"].teacher.model.state_dict()
    assert all(torch.equal(generation1[key], taught_by[key]) for key in generation1)
    assert results["stages"]["generation1"]["source"].startswith("trained, cached")


def test_default_recipe_is_the_cited_references_and_the_loss_line_states_the_aggregation(make_cfg):
    # Rorozhl/CA-MKD scripts/run.sh trains every multi-teacher row with -r 1 (CE) -a 1 (KL), --kd_T 4.
    # Before: Hinton's CE 0.1 / KD 0.9, and a loss line `0.9·kd + 0.9·kd_teacher2 ...` for a mean over teachers.
    cfg = make_cfg("scheme=multi_teacher")
    terms = pipeline.build_terms(cfg)
    assert (terms["kd"].recipe_ce_weight, terms["kd"].weight, terms["kd"].temperature) == (1.0, 1.0, 4.0)
    options = {key: value for key, value in cfg.scheme.items() if key in ("aggregation", "ce_weight")}
    module = make_module(terms=terms, **options)
    assert module.loss_summary() == "loss = 1.0·CE + 1.0·mean over 3 teachers of kd(T=4.0)"
    losses = module.training_losses(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), None)
    assert sorted(losses) == ["ce", "kd"]  # one aggregated loss per term, as the line says
    confident = make_module("confidence", terms={"kd": KD(weight=1.0, temperature=T)})
    assert confident.loss_summary() == ("loss = 0.1·CE + 1.0·Σ_k w_k·kd(T=4.0)_k / 3 "
                                        "(CA-MKD confidence w over 3 teachers)")
    drawn = make_module("random", terms={"kd": KD(weight=1.0, temperature=T)})
    assert drawn.loss_summary() == "loss = 0.1·CE + 1.0·kd(T=4.0) of one teacher drawn per step (of 3)"


@pytest.mark.parametrize("overrides, recipe", [
    ((), (1.0, 1.0, 4.0)),  # CA-MKD run.sh -r 1 -a 1, --kd_T 4
    (("experiment=imagenet/resnet34_resnet18",), (0.5, 0.5, 1.0)),  # mdistiller r34_r18 kd.yaml
    (("experiment=cifar100/vgg13_vgg8",), (1.0, 1.0, 4.0)),  # sets no recipe.kd_*: the scheme's stays whole
])
def test_multi_teacher_trains_one_recipes_ce_kd_and_temperature_whichever_config_sets_it(make_cfg, overrides, recipe):
    # `experiment` is composed after `scheme`, so its recipe.kd_* replaced the scheme's KD and T while the CE stayed
    # scheme.ce_weight 1.0: the ImageNet experiment trained CE 1 + KD 0.5 at T 1, a mix of two recipes.
    cfg = make_cfg("scheme=multi_teacher", *overrides)
    terms = pipeline.build_terms(cfg)
    module = make_module(terms=terms, ce_weight=cfg.scheme.ce_weight, teachers=teachers_of_three_widths()[:2])
    assert (module.ce_weight, module.terms["kd"].weight, module.terms["kd"].temperature) == recipe


def test_the_multi_teacher_loss_line_names_a_terms_ramp_up_as_every_scheme_does():
    # Before, loss_summary kept its own copy of the per-term detail and left out what composition adds (the
    # consistency term's sigmoid ramp-up), though weight_at applies it.
    module = make_module(terms={"consistency": Consistency(weight=100.0, rampup_epochs=5)})
    assert module.loss_summary() == ("loss = 0.1·CE + 100.0·mean over 3 teachers of "
                                     "consistency(sigmoid ramp-up 5 epochs)")
