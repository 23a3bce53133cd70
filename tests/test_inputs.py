"""Named inputs per role (kd_lightning/data/inputs.py): each network reads its own input of a sample."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_lightning.data.base import KDDataModule, TensorImageDataset
from kd_lightning.data.device import DeviceBatches, ResidentSplit
from kd_lightning.data.inputs import InputView, NamedSamples, RoleInputs, attach_input, parse_views
from kd_lightning.data.resumable import EpochPermutationSampler
from kd_lightning.data.views import CropFlipViews, ViewedTransform
from kd_lightning.errors import ConfigError
from kd_lightning.pipeline import construct, run
from kd_lightning.stage_build import configure_inputs


def _student_losses(recorded_losses: dict[str, list[float]]) -> list[float]:
    return recorded_losses["student"]


def test_every_role_named_on_the_one_input_trains_bit_for_bit_as_without_names(make_cfg, recorded_losses):
    # The named path (dict batches, networks picking their input by a pre-hook) must not move a number.
    plain = run(make_cfg("trainer.limit_train_batches=4"))
    plain_losses = dict(recorded_losses)
    recorded_losses.clear()
    named = run(make_cfg("trainer.limit_train_batches=4", "inputs.teacher=image", "inputs.student=image"))
    assert recorded_losses == plain_losses
    assert named["student_metrics"] == plain["student_metrics"]
    assert named["teacher"]["metrics"] == plain["teacher"]["metrics"]


def test_a_student_on_a_downsampled_view_reads_it_and_its_teacher_the_full_image(make_cfg):
    cfg = make_cfg("+inputs.views.low={size:4}", "inputs.student=low")
    datamodule = construct(cfg.data)
    configure_inputs(cfg, datamodule)
    datamodule.setup("fit")
    seen: dict[str, tuple[int, ...]] = {}
    from kd_lightning.stage_build import build_model

    teacher, student = build_model(cfg.teacher.model, datamodule), build_model(cfg.student, datamodule)
    teacher.register_forward_pre_hook(lambda m, args: seen.__setitem__("teacher", tuple(args[0].shape)))
    student.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", tuple(args[0].shape)))
    inputs, targets, indices, views = next(iter(datamodule.sample_loader()))
    inputs = datamodule.on_after_batch_transfer((inputs, targets, indices, views), 0)[0]
    teacher(inputs), student(inputs)
    assert seen == {"teacher": (64, 1, 8, 8), "student": (64, 1, 4, 4)}
    expected = torch.nn.functional.interpolate(inputs["image"], size=(4, 4), mode="bilinear", antialias=True)
    torch.testing.assert_close(inputs["low"], expected)
    assert cfg.student.input == "low" and student.kd_spec["input"] == "low" and teacher.kd_spec["input"] == "image"


def test_cross_resolution_run_trains_and_reports(make_cfg):
    results = run(make_cfg("+inputs.views.low={size:4}", "inputs.student=low"))
    assert results["stages"]["student"]["size"]["student"]["flops"] < results["stages"]["teacher"]["size"]["student"]["flops"]
    assert results["student"]["input"] == "low"


class _Paired(KDDataModule):
    """Two sources of one scene: `rgb` and `depth` = 2·rgb + 1, so shared geometry shows as depth == 2·rgb + 1."""

    num_classes, in_channels, image_size = 3, 1, (6, 6)

    def __init__(self) -> None:
        super().__init__(batch_size=8, val_fraction=0.0)

    @property
    def sources(self):
        return {"rgb": (1, 6, 6), "depth": (1, 6, 6)}

    @property
    def default_source(self) -> str:
        return "rgb"

    @property
    def train_views(self) -> CropFlipViews:
        return CropFlipViews(pad=2, flip=True)

    def train_transform(self):
        return ViewedTransform(self.train_views)

    def load_train_pool(self):
        images = torch.rand(12, 1, 6, 6)
        return [({"rgb": image, "depth": 2 * image + 1}, index % 3) for index, image in enumerate(images)]

    def load_test(self):
        return self.load_train_pool()


def test_paired_sources_share_the_crop_and_flip_and_an_own_view_draws_its_own():
    datamodule = _Paired()
    datamodule.use_inputs({"rgb_b": {"source": "rgb", "draw": "own"}})
    datamodule.setup("fit")
    torch.manual_seed(0)
    differs = 0
    for index in range(len(datamodule.train_set)):
        inputs, _, _, views = datamodule.train_set[index]
        padded = torch.nn.functional.pad(inputs["rgb"], (0, 0))
        assert views["rgb"] == views["depth"]
        # Paired geometry: the crop padded rgb with 0 and depth with 0, so compare inside the image only.
        inside = inputs["rgb"] != 0
        torch.testing.assert_close(inputs["depth"][inside], 2 * padded[inside] + 1)
        differs += int(views["rgb_b"] != views["rgb"])
    assert differs >= 8  # 50 views: an independent draw rarely repeats the shared one


def test_device_batches_replay_every_own_view_after_a_mid_epoch_resume():
    views = CropFlipViews(pad=1, flip=False)
    named = {"image": InputView("image", "image"), "second": InputView("second", "image", "own"),
             "clean": InputView("clean", "image", "none")}
    split = ResidentSplit(torch.rand(20, 1, 5, 5), torch.arange(20) % 4, views=views, named=named)
    dataset = list(range(20))

    def batches(skip: int = 0):
        sampler = EpochPermutationSampler(dataset, num_replicas=1, rank=0, seed=3)
        loader = DeviceBatches(split, 4, sampler=sampler, seed=3)
        if skip:
            loader.load_state_dict({"epoch": 0, "batches_delivered": skip})
        return list(loader)

    whole, resumed = batches(), batches(skip=2)
    assert len(resumed) == len(whole) - 2
    for (inputs, _, indices, drawn), (again, _, again_indices, again_drawn) in zip(whole[2:], resumed):
        assert torch.equal(indices, again_indices)
        for name in named:
            assert torch.equal(drawn[name], again_drawn[name]) and torch.equal(inputs[name], again[name])
    everything = {name: torch.cat([batch[3][name] for batch in whole]) for name in named}
    assert torch.all(everything["clean"] == views.identity)
    assert not torch.equal(everything["second"], everything["image"])


def test_named_samples_of_an_evaluation_split_are_unaugmented():
    make = NamedSamples({"image": InputView("image", "image"), "b": InputView("b", "image", "own")}, "image",
                        CropFlipViews(pad=1), train=False)
    image = torch.rand(1, 4, 4)
    inputs, views = make(image, None, -1)
    assert torch.equal(inputs["image"], image) and torch.equal(inputs["b"], image) and views == {"image": -1, "b": -1}


def test_a_network_reads_its_own_input_and_a_tensor_passes_through():
    network = attach_input(nn.Flatten(), "b")
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.equal(network({"a": a, "b": b}), b) and torch.equal(network(a), a)
    with pytest.raises(ConfigError, match=r"reads input 'c'.*\['a', 'b'\]"):
        attach_input(nn.Flatten(), "c")({"a": a, "b": b})


# --- bad input: one paragraph, exit 2 -----------------------------------------------------------------------
def test_a_role_reading_an_input_the_data_does_not_have_lists_the_ones_it_has(make_cfg):
    with pytest.raises(ConfigError, match=r"names input 'zernike'.*Its inputs: \['image'\]"):
        run(make_cfg("inputs.student=zernike"))


@pytest.mark.parametrize("views, message", [
    ({"low": {"size": 4, "sharpness": 2}}, r"has no option \['sharpness'\]"),
    ({"low": {"source": "depth"}}, r"source='depth' is not an input of the data; it has \['image'\]"),
    ({"low": {"draw": "twice"}}, r"draw='twice'"),
    ({"low": {"pad": 2}}, r"sets pad/flip with draw=shared"),
    ({"image": {"size": 4}}, r"redefines the data's own input 'image'"),
])
def test_a_bad_view_is_refused_with_the_fix(views, message):
    with pytest.raises(ConfigError, match=message):
        parse_views(views, {"image": (1, 8, 8)}, "image")


def test_a_vector_input_cannot_be_resized():
    with pytest.raises(ConfigError, match="only image inputs are resized"):
        parse_views({"small": {"source": "zernike", "size": 4}}, {"zernike": (47,)}, "zernike")


def test_an_unknown_role_is_refused():
    with pytest.raises(ConfigError, match=r"inputs has no role \['teachr'\]"):
        RoleInputs.from_config({"teachr": "image"})


def test_a_teacher_checkpoint_of_another_input_shape_is_refused_with_the_fix(make_cfg, tmp_path):
    from kd_lightning.models import build_model as zoo_model
    from kd_lightning.teachers import export_student

    trained_on = zoo_model("convnet_large", num_classes=10, in_channels=3)
    trained_on.kd_spec["input"] = "rgb"
    path = export_student(trained_on, tmp_path / "rgb_teacher.pt")
    with pytest.raises(ConfigError, match=r"trained on input 'rgb' \(3 channels or features\).*reads 'image' \(1\)"):
        run(make_cfg(f"teacher.checkpoint={path}", "inputs.teacher=image"))


def test_a_data_free_scheme_given_a_named_input_is_refused(make_cfg):
    with pytest.raises(ConfigError, match="data-free"):
        run(make_cfg("scheme=dafl", "scheme.batch_size=8", "scheme.generator.width=8", "inputs.student=image"))


# --- schemes that need a second view ------------------------------------------------------------------------
def test_the_mean_teacher_reads_an_independent_view_when_named(make_cfg):
    cfg = make_cfg("scheme=mean_teacher", "data.augment=true")  # the scheme's default: the reference's own view
    from kd_lightning.stages import plan_stages
    from kd_lightning.stage_build import build_stage_module, stage_config

    datamodule = construct(cfg.data)
    configure_inputs(cfg, datamodule)
    datamodule.setup("fit")
    stage = plan_stages(cfg)[-1]
    module = build_stage_module(stage_config(cfg, stage), stage, datamodule, {})
    seen = {}
    module.teacher.model.register_forward_pre_hook(lambda m, args: seen.__setitem__("teacher", args[0]))
    module.student.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", args[0]))
    inputs, targets, indices, views = next(iter(datamodule.sample_loader()))
    module.training_losses(inputs, targets, indices)
    assert seen["teacher"] is inputs["ema_view"] and seen["student"] is inputs["image"]
    assert not torch.equal(views["ema_view"], views["image"])


def test_kdcl_peers_each_read_their_own_distortion_and_share_one_baseline(make_cfg):
    results = run(make_cfg("scheme=kdcl", "data.augment=true"))
    assert [model["input"] for model in results["stages"]["peers"]["models"]["peers"]] == ["peer1_view", "peer2_view"]
    # Two draws of one augmentation: the peers of one architecture compare with one baseline, on the data's input.
    assert [name for name in results["stages"] if name.startswith("baseline")] == ["baseline"]
    assert "input" not in results["stages"]["baseline"]["models"]["student"]


def test_a_third_peer_needs_a_third_view(make_cfg):
    with pytest.raises(ConfigError, match=r"inputs.peers names 2 inputs.*position 2"):
        run(make_cfg("scheme=kdcl", "scheme.peers=[convnet_tiny,convnet_tiny,convnet_small]"))


def test_the_teacher_cache_serves_the_teachers_own_view(make_cfg, recorded_losses, tmp_path):
    # The teacher reads an `own` draw, the student the shared one: served by the teacher's view, a cached run
    # trains as the uncached one (to the float32 rounding of test_teacher_cache's own comparison); served by the
    # student's view it would not.
    common = ("data.augment=true", "+inputs.views.teacher_view={draw:own}", "inputs.teacher=teacher_view",
              "trainer.limit_train_batches=3", "trainer.max_epochs=2")
    run(make_cfg(*common))
    uncached = list(recorded_losses["student"])
    recorded_losses.clear()
    run(make_cfg(*common, "teacher_cache=mmap"))
    assert recorded_losses["student"] == pytest.approx(uncached, rel=1e-5, abs=1e-6)
    files = list((tmp_path / "cache").rglob("*.bin"))
    assert len(files) == 1
    header = files[0].read_bytes()[:4096].rstrip(b"\0")
    assert b'"views": 9' in header  # digits' one-pixel shifts, as the teacher's own draw sees them


# --- hidden labels: supervision transfer's setting ------------------------------------------------------------
def test_the_labeled_subset_keeps_a_fraction_of_every_class_and_is_seeded():
    from kd_lightning.schemes.base import labeled_subset

    targets = torch.arange(200) % 4
    mask = labeled_subset(targets, 0.1, seed=3)
    assert [int(mask[targets == label].sum()) for label in range(4)] == [5, 5, 5, 5]
    assert torch.equal(mask, labeled_subset(targets, 0.1, seed=3))
    assert not torch.equal(mask, labeled_subset(targets, 0.1, seed=4))


def test_hidden_labels_leave_their_samples_out_of_the_cross_entropy_only():
    from functools import partial

    from kd_lightning.models import build_model
    from kd_lightning.schemes import Supervised

    torch.manual_seed(0)
    labeled = torch.tensor([True, False, True, False])
    module = Supervised(build_model("convnet_tiny", num_classes=10, in_channels=1), num_classes=10,
                        optimizer=partial(torch.optim.SGD, lr=0.1), labeled=labeled)
    images, targets, indices = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]), torch.arange(4)
    module.log = lambda *args, **kwargs: None
    module.training_values_read = lambda: False  # no trainer attached: nothing reads the logged values
    loss = module.training_step((images, targets, indices, torch.zeros(4, dtype=torch.long)), 0)
    # The same train-mode forward (BatchNorm statistics of the whole batch), its labeled rows' CE.
    expected = torch.nn.functional.cross_entropy(module.student(images)[labeled], targets[labeled])
    torch.testing.assert_close(loss, expected)
    # A batch without a labeled sample is skipped by a scheme that learns from labels alone (no step that moves
    # the weights by momentum and weight decay only), and costs no CE (rather than NaN) in one that distils.
    assert module.training_step((images[[1, 3]], targets[[1, 3]], indices[[1, 3]], torch.zeros(2)), 0) is None
    module.learns_without_labels = True
    none = module.training_step((images[[1, 3]], targets[[1, 3]], indices[[1, 3]], torch.zeros(2)), 0)
    assert float(none) == 0.0


def test_labels_hidden_from_the_student_leave_its_teacher_trained_on_all(make_cfg, tmp_path):
    full = run(make_cfg())
    scarce = run(make_cfg("labeled_fraction=0.1"))
    assert scarce["stages"]["teacher"]["key"] == full["stages"]["teacher"]["key"]
    assert scarce["stages"]["baseline"]["key"] != full["stages"]["baseline"]["key"]
    assert len(list((tmp_path / "cache" / "stages").glob("teacher-*.pt"))) == 1


@pytest.mark.parametrize("overrides, message", [
    (("scheme=dml",), r"labeled_fraction=0.1 hides most training labels, but scheme DML"),
    (("distill=[dkd]",), r"distill=\['dkd'\] read every sample's label"),
])
def test_hidden_labels_are_refused_where_a_loss_needs_them(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(make_cfg("labeled_fraction=0.1", *overrides))


def test_noisy_student_generations_teach_from_the_clean_view_and_learn_on_the_augmented_one(make_cfg):
    from kd_lightning.stage_build import build_stage_module, stage_config, teacher_arguments
    from kd_lightning.stages import plan_stages

    cfg = make_cfg("experiment=schemes/noisy_student", "data.augment=true")
    datamodule = construct(cfg.data)
    configure_inputs(cfg, datamodule)
    datamodule.setup("fit")
    built: dict = {}
    for stage in plan_stages(cfg):
        given = teacher_arguments(stage, built, cfg.inputs.teacher)
        module = build_stage_module(stage_config(cfg, stage), stage, datamodule, given)
        built[stage.name] = module.products()
        if stage.teachers:
            assert module.teacher.model.kd_input == "clean" and module.student.kd_input == "image"
    inputs, targets, indices, views = next(iter(datamodule.sample_loader()))
    assert torch.all(views["clean"] == datamodule.train_views.identity)
    assert not torch.equal(views["image"], views["clean"])
    results = run(make_cfg("experiment=schemes/noisy_student", "data.augment=true"))
    assert results["stages"]["generation1"]["metrics"]["test/acc"] > 0 and "student" in results["stages"]


def test_supervision_transfer_pretrains_without_labels_then_fine_tunes_the_same_network(make_cfg):
    # The fine-tuning stage starts from the transfer stage's weights: a changed start changes its result.
    results = run(make_cfg("scheme=supervision_transfer", "trainer.max_epochs=1"))
    assert list(results["stages"]) == ["teacher", "baseline", "transfer", "student"]
    assert "warning" not in results["stages"]["transfer"]  # no classifier trained there, by design
    assert results["stages"]["transfer"]["loss"] == "loss = 0.0·CE (labels unused) + 1.0·supervision_transfer"
    from kd_lightning.stages import plan_stages

    stage = plan_stages(make_cfg("scheme=supervision_transfer"))[-1]
    assert stage.init_from == "transfer" and "transfer" in stage.teacher_names()
    other = run(make_cfg("scheme=supervision_transfer", "trainer.max_epochs=1", "distill.supervision_transfer.weight=5"))
    assert other["stages"]["student"]["key"] != results["stages"]["student"]["key"]
    assert other["student_metrics"] != results["student_metrics"]


def test_a_views_definition_enters_the_keys_of_the_stages_that_read_it_only(make_cfg):
    from kd_lightning.stage_cache import stage_recipe
    from kd_lightning.stage_build import stage_config
    from kd_lightning.stages import plan_stages
    from kd_lightning.teachers import recipe_key

    def keys(*overrides):
        cfg = make_cfg(*overrides)
        configure_inputs(cfg, construct(cfg.data))
        found: dict[str, str] = {}
        for stage in plan_stages(cfg):
            found[stage.name] = recipe_key(stage_recipe(stage_config(cfg, stage), stage, found))
        return found

    plain, low4, low6 = keys(), keys("+inputs.views.low={size:4}", "inputs.student=low"), keys(
        "+inputs.views.low={size:6}", "inputs.student=low")
    assert plain["teacher"] == low4["teacher"] == low6["teacher"]  # the teacher reads the image in all three
    assert len({plain["baseline"], low4["baseline"], low6["baseline"]}) == 3
