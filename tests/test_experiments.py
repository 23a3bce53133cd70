"""Every experiment config composes with its published recipe and trains: one step of every distillation
method on each teacher → student pair, one supervised step for the teacher-training configs.

Real data and weights files are not needed: the networks are built from the configs (pretrained torchvision
teachers with random weights) and fed synthetic batches of the data set's shape.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, open_dict

from kd_lightning.data import SyntheticDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.pipeline import build_terms
from kd_lightning.schemes import Offline, Supervised
from kd_lightning.schemes.base import unpack_batch
from kd_lightning.taps import declared_taps
from kd_lightning.teachers import FrozenTeacher
from scheme_cases import TRANSFORMER_TERMS

CONF = Path(__file__).resolve().parents[1] / "conf"
# schemes/: a scheme's reference recipe (optimizer, schedule, data), not a teacher → student pair; tested with
# its scheme (tests/test_scheme_online.py, tests/test_scheme_self.py).
EXPERIMENTS = sorted(p.relative_to(CONF / "experiment").with_suffix("").as_posix()
                     for p in (CONF / "experiment").rglob("*.yaml") if not p.parent.name == "schemes")
TEACHER_CONFIGS = [e for e in EXPERIMENTS if Path(e).name.startswith("teacher_")]
PAIR_CONFIGS = [e for e in EXPERIMENTS if e not in TEACHER_CONFIGS]
# Named combinations (a defaults list of other terms, e.g. crd_kd) are tested on their own: composed with
# their members they would overwrite the members' settings.
COMBINATIONS = sorted(p.stem for p in (CONF / "distill").glob("*.yaml") if "defaults:" in p.read_text())
METHODS = sorted(p.stem for p in (CONF / "distill").glob("*.yaml") if p.stem not in COMBINATIONS)
SMALL_LR_STUDENTS = {"MobileNetV2", "ShuffleNetV1", "ShuffleNetV2"}  # RepDistiller's lr 0.01 students
BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Hundreds of tiny steps: a second intra-op thread only adds synchronisation (and contention under xdist).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ImageNet pairs step on 112×112 batches: every stage keeps a map (ResNets end at 4×4) and the terms read their
# shapes from the example input, while 224×224 made the two ImageNet pairs a third of this file's time.
MAX_IMAGE_SIZE = 112


def shrunk(size):
    """An image size (an int or a (height, width) pair) capped at MAX_IMAGE_SIZE."""
    return min(size, MAX_IMAGE_SIZE) if isinstance(size, int) else tuple(min(side, MAX_IMAGE_SIZE) for side in size)


def _data_like(cfg: DictConfig) -> SyntheticDataModule:
    real = instantiate(cfg.data)  # builds without touching files; only its shape is used
    return SyntheticDataModule(num_classes=real.num_classes, in_channels=real.in_channels,
                               image_size=shrunk(real.image_size),
                               train_size=2 * BATCH, val_size=BATCH, test_size=BATCH, batch_size=BATCH)


def _batch(data: SyntheticDataModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    data.setup("fit")
    return next(iter(data.train_dataloader()))


_PREPARED: dict[str, tuple[DictConfig, torch.nn.Module, torch.nn.Module, SyntheticDataModule]] = {}


def prepared(experiment: str, make_cfg: Callable[..., DictConfig]):
    """The experiment composed with every method at once, and its teacher and student, built once and shared
    by all of the pair's cases (they are listed grouped by experiment, so only the current pair is kept).

    One composition per pair instead of one per method: Hydra takes ~0.25 s a composition, which would be
    most of this file's time. Each method's yaml is a separate key (`distill.<name>`, its recipe CE weight
    included), so its settings are the ones `distill=[<name>]` gives; test_pair_recipes_reach_the_method_configs
    composes methods one by one.
    Not FAST: warm-up checks compare against the experiment's own trainer.max_epochs.
    """
    if experiment not in _PREPARED:
        _PREPARED.clear()
        cfg = make_cfg(f"experiment={experiment}", f"distill=[{','.join(METHODS)}]", fast=False)
        data = _data_like(cfg)
        teacher_cfg = copy.deepcopy(cfg.teacher.model)
        if teacher_cfg.get("weights"):
            teacher_cfg.weights = None  # no weights file on test machines; the architecture is what is tested
        torch.manual_seed(0)
        teacher = instantiate(teacher_cfg, num_classes=data.num_classes, in_channels=data.in_channels)
        student = instantiate(cfg.student, num_classes=data.num_classes, in_channels=data.in_channels)
        _PREPARED[experiment] = (cfg, teacher, student, data)
    return _PREPARED[experiment]


def only(cfg: DictConfig, method: str) -> DictConfig:
    """`cfg` with `distill` reduced to one method (interpolations still resolve against the whole config)."""
    single = copy.deepcopy(cfg)
    with open_dict(single):
        for other in [name for name in single.distill if name != method]:
            del single.distill[other]
    return single


def _finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


def _check_terms(losses: Mapping[str, torch.Tensor], names: list[str]) -> None:
    for name in names:
        own = {key: value for key, value in losses.items() if key == name or key.startswith(f"{name}_")}
        assert own, f"term {name!r} produced no loss (got {sorted(losses)})"
        bad = [key for key, value in own.items() if not _finite(value)]
        assert not bad, f"non-finite losses {bad}"


def _step(module: Any, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    losses = module.training_losses(*unpack_batch(batch))
    total = torch.stack([value.float() for value in losses.values()]).sum()
    assert _finite(total)
    module.zero_grad(set_to_none=True)
    total.backward()
    return losses


def _grads_reached(parameters) -> bool:
    return any(p.grad is not None and _finite(p.grad) and bool(p.grad.abs().sum() > 0) for p in parameters)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_sets_its_published_recipe(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}", fast=False)
    optimizer, scheduler = cfg.optimizer, cfg.scheduler
    if experiment.startswith("cifar100/"):
        # RepDistiller / mdistiller: 240 epochs, batch 64, SGD momentum 0.9, wd 5e-4, ×0.1 at 150/180/210.
        assert cfg.data._target_.endswith("CIFAR100DataModule") and cfg.data.batch_size == 64
        assert cfg.trainer.max_epochs == 240
        assert (optimizer.momentum, optimizer.weight_decay) == (0.9, 5e-4)
        assert list(scheduler.milestones) == [150, 180, 210] and scheduler.gamma == 0.1
        assert optimizer.lr == (0.01 if cfg.student.name in SMALL_LR_STUDENTS else 0.05)
    if experiment in TEACHER_CONFIGS:
        assert cfg.scheme._target_.endswith("Supervised") and not cfg.get("distill")
        assert f"teacher_{cfg.student.name}" == Path(experiment).name
    elif experiment.startswith("cifar100/"):
        assert f"{cfg.teacher.model.name}_{cfg.student.name}" == Path(experiment).name
        assert "override /distill" not in (CONF / "experiment" / f"{experiment}.yaml").read_text(), \
            "pair configs leave the method to the command line"
    if experiment.startswith("imagenet/"):
        assert cfg.trainer.max_epochs == 100 and cfg.data.num_classes == 1000
        assert (optimizer.lr, optimizer.momentum, optimizer.weight_decay) == (0.1, 0.9, 1e-4)
        assert list(scheduler.milestones) == [30, 60, 90] and scheduler.gamma == 0.1
        assert cfg.teacher.model.weights == "IMAGENET1K_V1"


# (experiment, distill, dotted key, expected): the per-pair settings of the references, through `recipe:`.
RECIPE_CASES = [
    ("cifar100/resnet56_resnet20", "dkd", "distill.dkd.beta", 2.0),  # mdistiller res56_res20.yaml
    ("cifar100/vgg13_vgg8", "dkd", "distill.dkd.beta", 6.0),  # mdistiller vgg13_vgg8.yaml
    ("cifar100/resnet32x4_resnet8x4", "dkd", "distill.dkd.beta", 8.0),
    ("cifar100/ResNet50_vgg8", "dkd", "distill.dkd.beta", 8.0),  # no published β: the distill default
    ("cifar100/resnet56_resnet20", "reviewkd", "distill.reviewkd.weight", 0.6),  # ReviewKD reviewKD.sh
    ("cifar100/resnet32x4_ShuffleNetV2", "reviewkd", "distill.reviewkd.weight", 8.0),
    ("cifar100/ResNet50_MobileNetV2", "kd_ls", "distill.kd_ls.weight", 1.0),  # Sun et al.'s log name
    ("cifar100/vgg13_vgg8", "kd_ls", "distill.kd_ls.temperature", 3.0),
    ("cifar100/vgg13_vgg8", "dkd_ls", "distill.dkd_ls.weight", 15.0),  # Sun et al. log dkd,vgg13,vgg8,2,15,2.0
    ("cifar100/vgg13_vgg8", "dkd_ls", "distill.dkd_ls.beta", 2.0),
    ("cifar100/resnet56_resnet20", "dkd_ls", "distill.dkd_ls.temperature", 3.0),  # log dkd,resnet56,...,3,12,2.0
    ("cifar100/resnet56_resnet20", "dkd_ls", "distill.dkd_ls.weight", 12.0),
    ("cifar100/resnet32x4_resnet8x4", "dkd_ls", "distill.dkd_ls.beta", 8.0),  # log dkd,...,2,9: mdistiller's β
    ("cifar100/ResNet50_vgg8", "dkd_ls", "distill.dkd_ls.weight", 9.0),  # no log for this pair: the default
    ("cifar100/resnet32x4_resnet8x4", "kd", "distill.kd.ce_weight", 0.1),
    ("imagenet/resnet34_resnet18", "kd", "distill.kd.temperature", 1.0),  # mdistiller r34_r18/kd.yaml
    ("imagenet/resnet34_resnet18", "kd", "distill.kd.ce_weight", 0.5),
    ("imagenet/resnet34_resnet18", "dkd", "distill.dkd.beta", 0.5),  # mdistiller r34_r18/dkd.yaml
    ("imagenet/resnet34_resnet18", "dkd", "distill.dkd.warmup_epochs", 1),
    ("imagenet/resnet50_mobilenetv1", "dkd", "distill.dkd.beta", 2.0),  # mdistiller r50_mv1/dkd.yaml
    ("imagenet/resnet50_mobilenetv1", "reviewkd", "distill.reviewkd.max_mid_channels", 256),
    ("imagenet/resnet50_mobilenetv1", "ofd", "distill.ofd.weight", 1e-4),
]


@pytest.mark.parametrize(("experiment", "method", "key", "expected"), RECIPE_CASES)
def test_pair_recipes_reach_the_method_configs(make_cfg, experiment, method, key, expected):
    cfg = make_cfg(f"experiment={experiment}", f"distill=[{method}]", fast=False)
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    assert node == pytest.approx(expected)
    # The command line still wins over the pair's recipe.
    if key.startswith("distill."):
        overridden = make_cfg(f"experiment={experiment}", f"distill=[{method}]", f"{key}=123", fast=False)
        assert overridden.distill[method][key.rsplit(".", 1)[1]] == 123


@pytest.mark.parametrize("experiment", [e for e in PAIR_CONFIGS if e.startswith("cifar100/")])
def test_init_stages_run_at_repdistillers_learning_rates(make_cfg, experiment):
    # helper/pretrain.py: 0.01 for FT ('factor') with a ResNet/WRN student, else (and for AB, FSP) the main rate.
    cfg = make_cfg(f"experiment={experiment}", "distill=[ft,ab,fsp]", fast=False)
    resnet_or_wrn = cfg.student.name.startswith(("resnet", "wrn_"))
    assert cfg.distill.ft.init_lr == (0.01 if resnet_or_wrn or cfg.optimizer.lr == 0.01 else None)
    assert cfg.distill.ab.init_lr is None and cfg.distill.fsp.init_lr is None
    assert "init_lr" not in cfg.scheme


# FSP compares C×C' matrices of consecutive stages, so it needs equal channel counts in every student/teacher
# stage pair: it refuses these pairs, for which the CRD paper reports no FSP either (Table 2; "N/A" for
# WRN-40-2 → WRN-40-1 in RepDistiller's README); the fashion_mnist demo's convnets differ in width too.
FSP_REFUSES = {"cifar100/wrn_40_2_wrn_40_1", "cifar100/vgg13_MobileNetV2", "cifar100/ResNet50_MobileNetV2",
               "cifar100/ResNet50_vgg8", "cifar100/resnet32x4_ShuffleNetV1", "cifar100/resnet32x4_ShuffleNetV2",
               "cifar100/wrn_40_2_ShuffleNetV1", "imagenet/resnet50_mobilenetv1", "fashion_mnist"}
# torchvision ResNets declare no pre-ReLU (`stageK_pre`) taps: their blocks reuse one in-place ReLU, so the
# pre-activation sum cannot be tapped. AB, OFD and ReviewKD distil pre-ReLU teacher features.


# Terms that pair the student's declared stages with the teacher's one by one: a pair of networks with different
# stage counts (experiment=vit_digits: the 3-block ViT's three stages, convnet_large's two) is refused up front.
STAGEWISE = {"ab", "at", "fsp", "nst", "ofd", "reviewkd", "vid"}


def expected_refusal(cfg: DictConfig, experiment: str, method: str, student: torch.nn.Module,
                     teacher: torch.nn.Module) -> str | None:
    """The ConfigError a method must raise for this experiment, or None when it must train."""
    if method in TRANSFORMER_TERMS and not all(any(hasattr(module, "qkv") for module in network.modules())
                                               for network in (student, teacher)):
        return "no transformer blocks"
    if method in STAGEWISE and len(declared_taps(student).stages) != len(declared_taps(teacher).stages):
        return "counts differ"
    if cfg.distill[method].get("warmup_epochs", 0) > cfg.trainer.max_epochs:  # e.g. 20-epoch ramps, 10-epoch demo
        return "longer than training"
    if method == "fsp" and experiment in FSP_REFUSES:
        return "equal channel counts"
    return None


# Grouped by experiment so each pair's networks are built once (see `prepared`).
DISTILL_CASES = [(experiment, method) for experiment in PAIR_CONFIGS for method in METHODS]


@pytest.mark.parametrize(("experiment", "method"), DISTILL_CASES)
def test_pair_trains_one_step_with_every_method(make_cfg, experiment, method):
    cfg, teacher, student, data = prepared(experiment, make_cfg)
    refused = expected_refusal(cfg, experiment, method, student, teacher)
    if refused:
        teacher = copy.deepcopy(teacher)  # a refused build leaves its hooks behind: keep them off the shared one
    terms = build_terms(only(cfg, method))
    context = {"student": copy.deepcopy(student), "teacher": FrozenTeacher(teacher), "terms": terms,
               "num_classes": data.num_classes, "example_input": data.example_input(), "train_size": data.train_size,
               "train_targets": data.train_targets, "max_epochs": cfg.trainer.max_epochs,
               "ce_weight": cfg.scheme.ce_weight, "optimizer": instantiate(cfg.optimizer)}
    torch.manual_seed(0)
    if refused:
        with pytest.raises(ConfigError, match=refused):
            Offline(**context)
        return
    module = Offline(**context)
    try:
        batch = _batch(data)
        if module.init_terms:
            module.set_init_stage(True)
            _check_terms(_step(module, batch), [f"{name}_init" for name in module.init_terms])
            assert _grads_reached(module.trainable_parameters())
            module.set_init_stage(False)
        losses = _step(module, batch)
        _check_terms(losses, ["ce", *module.terms])
        assert _grads_reached(module.student.parameters())
        assert not any(p.requires_grad for p in teacher.parameters())
    finally:
        # The teacher is shared with the pair's next case: its hooks must not pile up.
        module.student_taps.remove()
        module.teacher_taps.remove()


@pytest.mark.parametrize("experiment", TEACHER_CONFIGS)
def test_teacher_config_trains_one_supervised_step(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}", fast=False)
    data = _data_like(cfg)
    scheme_class = get_class(cfg.scheme._target_)
    assert issubclass(scheme_class, Supervised)
    options = {key: value for key, value in cfg.scheme.items() if key != "_target_"}
    torch.manual_seed(0)
    module = scheme_class(student=instantiate(cfg.student, num_classes=data.num_classes,
                                              in_channels=data.in_channels),
                          num_classes=data.num_classes, optimizer=instantiate(cfg.optimizer),
                          scheduler=instantiate(cfg.scheduler), **options)
    losses = _step(module, _batch(data))
    assert list(losses) == ["ce"]
    assert _grads_reached(module.student.parameters())
