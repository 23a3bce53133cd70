"""Data-free schemes (DAFL, DFAD, ZSKT, the N(0,1) floor): the generator losses against independent float64
arithmetic, no training image ever reaching the student, the teacher frozen while the generator trains
through it, student-step counting, the image grid, and bad configurations. Resume, bf16 and the
frozen-teacher walk run through tests/scheme_cases.py; DDP in test_data_free_ddp below."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_lightning.data import DigitsDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms import AT, KD, L1Logits
from kd_lightning.models import build_model
from kd_lightning.pipeline import run
from kd_lightning.schemes import DAFL, DFAD, ZSKT
from kd_lightning.losses.terms.base import DistillInputs
from kd_lightning.schemes.data_free_methods import (check_unused_parameter_detection, dafl_generator_losses,
                                                    zskt_divergence)
from kd_lightning.teachers import export_student

SMALL = ["scheme.batch_size=16", "scheme.generator.width=8", "scheme.steps_per_epoch=3", "baseline=false"]


def small(scheme: str) -> list[str]:
    return [f"scheme={scheme}", *(o for o in SMALL if scheme != "datafree_noise" or ".generator." not in o)]


def softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_dafl_generator_losses_match_the_papers_formulas_in_float64():
    rng = np.random.default_rng(0)
    logits, features = rng.normal(size=(6, 5)) * 3, rng.normal(size=(6, 7))
    parts = dafl_generator_losses(torch.tensor(logits, dtype=torch.float32), torch.tensor(features))
    p = softmax64(logits)
    labels = logits.argmax(1)
    one_hot = -np.mean([math.log(p[i, labels[i]]) for i in range(6)])
    mean_p = p.mean(0)
    entropy = sum(q * math.log10(q) for q in mean_p)
    activation = -np.abs(features).mean()
    assert parts["one_hot"].item() == pytest.approx(one_hot, rel=1e-5)
    assert parts["information_entropy"].item() == pytest.approx(entropy, rel=1e-5)
    assert parts["activation"].item() == pytest.approx(activation, rel=1e-6)


def test_dfad_l1_and_zskt_divergence_match_the_references_reductions_in_float64():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(4, 10)) * 2, rng.normal(size=(4, 10)) * 2
    student, teacher = torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
    inputs = DistillInputs(student_logits=student, targets=teacher.argmax(1), indices=None, teacher_logits=teacher)
    # DFAD: F.l1_loss, the mean over batch and classes, as the student's term and the generator's (negated) loss.
    assert functional.l1_logits(student, teacher).item() == pytest.approx(np.abs(s - t).mean(), rel=1e-6)
    assert L1Logits()(inputs).item() == pytest.approx(np.abs(s - t).mean(), rel=1e-6)
    # ZSKT: F.kl_div(log_softmax(s/T), softmax(t/T)) with its default reduction, the mean over batch and classes.
    for temperature in (1.0, 2.0):
        ps, pt = softmax64(s / temperature), softmax64(t / temperature)
        reference = (pt * (np.log(pt) - np.log(ps))).sum() / s.size
        assert zskt_divergence(student, teacher, temperature).item() == pytest.approx(reference, rel=1e-5)
    # The kd weight ZSKT derives, 1/(T²·K) = 0.1 at T=1 for 10 classes, gives the student the same divergence.
    ps, pt = softmax64(s), softmax64(t)
    kd = KD(weight=0.1, temperature=1.0)
    assert (kd.weight * kd(inputs)).item() == pytest.approx((pt * (np.log(pt) - np.log(ps))).sum() / s.size, rel=1e-5)


class TrainPoolTrap(torch.utils.data.Dataset):
    """The real training pool, except that reading a sample fails the test."""

    def __init__(self, pool) -> None:
        self.pool, self.targets = pool, pool.targets

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, index: int):
        raise AssertionError(f"training sample {index} was read")


def trapped_run(make_cfg, tmp_path, monkeypatch, *overrides: str) -> dict:
    teacher = export_student(build_model("convnet_large", num_classes=10, in_channels=1), tmp_path / "teacher.pt")
    original = DigitsDataModule.load_train_pool
    monkeypatch.setattr(DigitsDataModule, "load_train_pool", lambda self: TrainPoolTrap(original(self)))
    # Validation on the test split: held-out training samples would be read (for evaluation) otherwise.
    return run(make_cfg(*overrides, f"teacher.checkpoint={teacher}", "data.val_fraction=0", "baseline=false"))


@pytest.mark.parametrize("scheme", ["dafl", "dfad", "zskt", "datafree_noise"])
def test_a_data_free_student_never_reads_a_training_sample(make_cfg, tmp_path, monkeypatch, scheme):
    results = trapped_run(make_cfg, tmp_path, monkeypatch, *small(scheme))
    assert "test/acc" in results["student_metrics"]


def test_the_training_sample_trap_catches_a_scheme_that_reads_data(make_cfg, tmp_path, monkeypatch):
    with pytest.raises(AssertionError, match="training sample"):
        trapped_run(make_cfg, tmp_path, monkeypatch, "scheme=offline")


def tiny_module(cls, datamodule, **options):
    kwargs = {"steps_per_epoch": 4, "batch_size": 8, "generator": {"width": 4},
              "optimizer": lambda params: torch.optim.SGD(params, lr=0.05)}
    kwargs.update(options)
    return cls(student=build_model("convnet_tiny", 10, 1), teacher=build_model("convnet_large", 10, 1),
               terms={"kd": KD(weight=1.0, temperature=1.0)}, num_classes=10,
               example_input=datamodule.example_input(), **kwargs)


def fit(module, datamodule, ckpt_path=None, **trainer_options) -> L.Trainer:
    options = {"max_epochs": 1, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    trainer = L.Trainer(**{**options, **trainer_options})
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("cls", [DAFL, DFAD], ids=["dafl", "dfad"])
def test_the_teacher_stays_frozen_and_in_eval_mode_while_the_generator_trains_through_it(cls):
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=8)
    module = tiny_module(cls, datamodule, **({"student_steps": 1} if cls is DFAD else {}))
    teacher_before = {k: v.clone() for k, v in module.teacher.model.state_dict().items()}
    generator_before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    fit(module, datamodule, max_steps=3)
    teacher_after = module.teacher.model.state_dict()
    assert any("running_mean" in key for key in teacher_before)  # BN statistics are part of what is compared
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    assert not any(m.training for m in module.teacher.modules())
    assert not any(p.requires_grad for p in module.teacher.parameters())
    changed = [k for k, v in module.generator.state_dict().items() if "weight" in k and not torch.equal(v, generator_before[k])]
    assert changed, "the generator did not train"


def test_global_step_counts_student_steps_and_step_schedules_follow_them():
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=8)
    module = tiny_module(DFAD, datamodule, student_steps=2,
                         student_optimizer={"_target_": "torch.optim.Adam", "lr": 0.01},
                         generator_optimizer={"_target_": "torch.optim.Adam", "lr": 0.001},
                         scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
                         scheduler_interval="step")
    trainer = fit(module, datamodule, max_steps=6, max_epochs=5)
    student_opt, generator_opt = (opt.optimizer for opt in module.optimizers())
    assert trainer.global_step == 6
    assert next(iter(student_opt.state.values()))["step"].item() == 6
    assert next(iter(generator_opt.state.values()))["step"].item() == 3  # one generator step per two student steps
    assert student_opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 6)
    assert generator_opt.param_groups[0]["lr"] == pytest.approx(0.001 * 0.5 ** 6)


def test_an_epoch_is_steps_per_epoch_student_steps():
    datamodule = DigitsDataModule(batch_size=8)
    module = tiny_module(DAFL, datamodule, steps_per_epoch=3)
    trainer = fit(module, datamodule, max_epochs=2)
    assert trainer.num_training_batches == 3 and trainer.global_step == 6


def test_image_grids_are_saved_as_png_and_recorded_by_wandb_offline(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "out"))
    run(make_cfg("scheme=dafl", *SMALL, "scheme.steps_per_epoch=4", "trainer.limit_train_batches=4", "scheme.log_images_every_n_steps=2",
                 "logger=wandb", "logger.wandb.offline=true"))
    assert sorted(p.name for p in (tmp_path / "out" / "student" / "synthetic").glob("*.png")) == \
        ["step_2.png", "step_4.png"]
    student_run = max((tmp_path / "out" / "wandb").glob("offline-run-*"), key=lambda path: path.stat().st_mtime)
    assert list(student_run.rglob("media/images/synthetic_*.png"))
    assert b"synthetic" in next(student_run.glob("run-*.wandb")).read_bytes()


@pytest.mark.parametrize(("overrides", "message"), [
    (["scheme.generator.image_size=12"], r"makes images of shape \(1, 12, 12\).*teacher's input.*\(1, 8, 8\)"),
    (["scheme.generator.channels=3"], r"makes images of shape \(3, 8, 8\)"),
    (["scheme.generator.image_size=10"], "multiples of 4"),
    (["distill=[crd]"], r"crd \(needs sample indices\).*distill=\[kd\]"),
    (["distill=[ft]"], r"ft \(needs an initialisation stage"),
    (["distill=[]"], "names none"),
    (["scheme.generator.width=0"], r"scheme.generator.width=0 must be a whole number >= 1"),
    (["scheme.generator.width=2.5"], r"scheme.generator.width=2.5 must be a whole number"),
    (["scheme.generator.latent_dim=-3"], r"scheme.generator.latent_dim=-3 must be"),
    (["scheme.generator.channels=0"], r"scheme.generator.channels=0 must be"),
    (["scheme.generator.bn_eps=0"], r"scheme.generator.bn_eps=0 must be a number > 0"),
    (["scheme.scheduled=true", "+scheme.schedule={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,eta_min:0}"],
     r"scheme.schedule=.* is not a scheduler config .*T_max"),
    # dafl.yaml trains at constant rates: a schedule beside scheduled=false would be dropped without a word.
    (["+scheme.schedule={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,T_max:10}"],
     r"scheme.schedule is set but scheme.scheduled=false.*scheme.schedule=null"),
    # The schedule's T_max counts epochs: per step, the cosine would restart every 2·max_epochs steps.
    (["scheme.scheduled=true", "+scheme.schedule={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,T_max:10}",
      "+scheme.scheduler_interval=step"], r"stepped once per epoch.*scheduler_interval='step'"),
])
def test_bad_data_free_configs_are_refused_with_the_fix(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(make_cfg("scheme=dafl", *SMALL, *overrides))


@pytest.mark.slow  # two gloo processes
@pytest.mark.parametrize("scheme", ["dafl", "dfad"])
def test_ddp_ranks_draw_their_own_noise_and_keep_generator_and_student_identical(tmp_path, scheme):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(root / "tests" / "_ddp_data_free.py"), scheme, str(tmp_path)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert rank0["global_step"] == rank1["global_step"] == 3  # 3 student steps per rank, not 3 shared
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"]), "both ranks drew the same noise"
    trained = [k for k in rank0["state_dict"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert any(k.startswith("generator.") for k in trained) and any(k.startswith("student.") for k in trained)
    for key in trained:
        assert torch.equal(rank0["state_dict"][key], rank1["state_dict"][key]), f"ranks disagree on {key}"
    moved = [k for k in trained if k.startswith("generator.") and not torch.equal(rank0["state_dict"][k], rank0["initial"][k])]
    assert moved, "the generator did not train"


def test_separate_generator_steps_under_ddp_need_unused_parameter_detection():
    from lightning.pytorch.strategies import DDPStrategy

    with pytest.raises(ConfigError, match="trainer.strategy=ddp_find_unused_parameters_true"):
        check_unused_parameter_detection(DDPStrategy(), 2, "DFAD")
    check_unused_parameter_detection(DDPStrategy(find_unused_parameters=True), 2, "DFAD")
    check_unused_parameter_detection(DDPStrategy(), 1, "DFAD")


def test_class_priors_add_dafls_one_hot_and_entropy_to_the_adversarial_generator_loss():
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=8)
    module = tiny_module(DFAD, datamodule, student_steps=1, class_priors={"one_hot": 0.5, "information_entropy": 3.0})
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    student_forward = module.student.forward
    # The generator step's own forward of the student and the teacher on the same images (the last of the step).
    def recording_forward(x):
        logits = student_forward(x)
        calls.append((x.detach().clone(), logits.detach().clone()))
        return logits

    module.student.forward = recording_forward
    trainer = fit(module, datamodule, max_steps=1)
    images, student_logits = calls[-1]
    with torch.no_grad():
        teacher_logits = module.teacher.model(images).double().numpy()
    s, t = student_logits.double().numpy(), teacher_logits
    p = softmax64(t)
    one_hot = -np.mean([math.log(p[i, t[i].argmax()]) for i in range(len(t))])
    entropy = sum(q * math.log10(q) for q in p.mean(0))
    metrics = trainer.callback_metrics
    assert metrics["train/generator_adversarial"].item() == pytest.approx(-np.abs(s - t).mean(), rel=1e-4)
    assert metrics["train/generator_one_hot"].item() == pytest.approx(0.5 * one_hot, rel=1e-4)
    assert metrics["train/generator_information_entropy"].item() == pytest.approx(3.0 * entropy, rel=1e-4)
    # Off by default (the references): the generator's loss is the adversarial term alone.
    reference = tiny_module(DFAD, datamodule, student_steps=1)
    assert "train/generator_one_hot" not in fit(reference, datamodule, max_steps=1).callback_metrics
    with pytest.raises(ConfigError, match=r"class_priors takes non-negative weights.*'balance'"):
        tiny_module(DFAD, datamodule, class_priors={"balance": 1.0})
    for bad in ({"one_hot": -1.0}, {"one_hot": "abc"}, {"information_entropy": float("nan")}):
        with pytest.raises(ConfigError, match="class_priors takes non-negative weights"):
            tiny_module(DFAD, datamodule, class_priors=bad)


def test_the_untrained_generator_floor_keeps_its_initial_weights_while_the_student_trains():
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=8)
    module = tiny_module(DAFL, datamodule, train_generator=False)
    generator_before = {k: v.clone() for k, v in module.generator.named_parameters()}
    student_before = {k: v.clone() for k, v in module.student.named_parameters()}
    fit(module, datamodule, max_steps=3)
    assert all(torch.equal(v, generator_before[k]) for k, v in module.generator.named_parameters())
    assert not all(torch.equal(v, student_before[k]) for k, v in module.student.named_parameters())


def student_batches(module, steps: int) -> list[torch.Tensor]:
    """The images each student step of a short fit distilled on."""
    seen: list[torch.Tensor] = []
    losses = module.student_losses
    module.student_losses = lambda images, *rest: (seen.append(images.detach().clone()), losses(images, *rest))[1]
    fit(module, DigitsDataModule(batch_size=8), max_steps=steps, max_epochs=5)
    return seen


def test_zskt_reuses_one_pseudo_batch_per_round_as_its_reference_and_dfad_draws_fresh_ones():
    # ZSKT's LearnableLoader keeps z for n_repeat_batch = 1 G + n S calls; the generator does not move during
    # the student steps, so the round's student batches are identical, and the next round's differ.
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=8)
    zskt = tiny_module(ZSKT, datamodule, student_steps=3, steps_per_epoch=4)
    latents: list[torch.Tensor] = []
    zskt.generator.register_forward_pre_hook(lambda _, args: latents.append(args[0].clone()))
    batches = student_batches(zskt, 6)
    assert len(batches) == 6
    assert all(torch.equal(batches[0], b) for b in batches[1:3])
    assert all(torch.equal(batches[3], b) for b in batches[4:6])
    assert not torch.allclose(batches[0], batches[3])
    # The generator's step of a round (before its student steps) maximises the divergence on the same z.
    assert len({tuple(z.flatten()[:4].tolist()) for z in latents[:4]}) == 1
    L.seed_everything(0)
    dfad = tiny_module(DFAD, datamodule, student_steps=3, steps_per_epoch=4)
    batches = student_batches(dfad, 3)
    assert not torch.allclose(batches[0], batches[1]) and not torch.allclose(batches[1], batches[2])


def test_replay_appends_earlier_generated_images_to_each_student_batch():
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=8)
    module = tiny_module(DFAD, datamodule, student_steps=1,
                         replay={"capacity": 64, "push_every_n_steps": 2, "push_images": 4, "batch_size": 3})
    batches = student_batches(module, 5)
    # Step 0 has nothing to replay; steps 0, 2, 4 push their first 4 fresh images (the generator moves in between).
    assert [len(b) for b in batches] == [8, 11, 11, 11, 11]
    pushed = {0: batches[0][:4], 2: batches[2][:4]}
    for step, batch in enumerate(batches[1:], start=1):
        earlier = torch.cat([images for pushed_at, images in pushed.items() if pushed_at < step])
        for image in batch[8:]:  # each replayed image is one pushed before this step, unchanged
            assert any(torch.equal(image, old) for old in earlier)
        assert not any(torch.equal(batch[0], old) for old in earlier)  # the fresh part is new
    assert len(module.replay_pool) == 12
    L.seed_everything(0)
    assert [len(b) for b in student_batches(tiny_module(DFAD, datamodule, student_steps=1), 3)] == [8, 8, 8]
    # Null sizes: an eighth of the fresh batch (MB-DFKD's memory slices).
    assert tiny_module(DFAD, datamodule, batch_size=64, replay={"capacity": 8}).replay.batch_size == 8
    for bad in ({"capacity": -1}, {"capacity": 8, "push_images": 0}, {"capacity": 8, "every": 3},
                {"capacity": "many"}, {"capacity": 8, "batch_size": 2.5}):
        with pytest.raises(ConfigError, match=r"not a replay config.*scheme.replay.capacity=8192"):
            tiny_module(ZSKT, datamodule, replay=bad)


def test_a_resume_from_the_epochs_last_step_continues_the_epoch_schedule(tmp_path, monkeypatch):
    # Lightning resumes from a checkpoint of an epoch's last batch without re-running the epoch-end hooks, so an
    # epoch schedule stepped there would be lost: the ×0.1 after epoch 0 must already be in that checkpoint.
    from test_resume import resume_at_an_epoch_end

    whole, resumed = resume_at_an_epoch_end(tmp_path, monkeypatch, "scheme=dfad", "scheme.batch_size=16",
                                            "scheme.generator.width=8", "scheme.student_steps=2",
                                            "scheme.scheduled=true", "scheduler=multistep", "scheduler.milestones=[1]")
    assert resumed == whole


def test_a_resume_from_a_checkpoint_with_another_scheduler_count_is_refused(tmp_path):
    # Lightning zips saved scheduler states with the configured ones: the generator's state in a Fast-Datafree or
    # scheduled DAFL checkpoint from before only the student was scheduled would be dropped without a word.
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=8)

    def module():
        return tiny_module(DAFL, datamodule, scheduled=True,
                           scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))

    trainer = fit(module(), datamodule, max_steps=2, default_root_dir=tmp_path)
    trainer.save_checkpoint(tmp_path / "now.ckpt")
    checkpoint = torch.load(tmp_path / "now.ckpt", weights_only=False)
    assert len(checkpoint["lr_schedulers"]) == 1  # DAFL-train.py anneals the student alone
    checkpoint["lr_schedulers"] = checkpoint["lr_schedulers"] * 2  # the layout before: student and generator
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match=r"holds 2 learning-rate scheduler state\(s\).*schedules 1.*ckpt_path"):
        fit(module(), datamodule, max_steps=4, default_root_dir=tmp_path, ckpt_path=tmp_path / "old.ckpt")
    fit(module(), datamodule, max_steps=4, default_root_dir=tmp_path, ckpt_path=tmp_path / "now.ckpt")


def build_last_stage(cfg):
    """The run's last stage as the pipeline builds it (untrained networks), with the config's scheme options."""
    from kd_lightning import pipeline
    from kd_lightning.stages import plan_stages

    datamodule = pipeline.construct(cfg.data)
    built, module = {}, None
    for stage in plan_stages(cfg):
        given = pipeline.teacher_arguments(stage, built)
        module = pipeline.build_stage_module(pipeline.stage_config(cfg, stage), stage, datamodule, given)
        built[stage.name] = module.products()
    return module


@pytest.mark.parametrize("teacher, tap", [("lenet5", "stage3"), ("resnet56", "penultimate")])
def test_dafls_activation_loss_reads_the_feature_the_references_teacher_returns(make_cfg, teacher, tap):
    # DAFL's lenet.py returns relu3's output, `output.view(-1, 120)`, as `feature`; its resnet.py the pooled
    # feature the classifier reads. conf/scheme/dafl.yaml leaves the tap to the teacher's family.
    module = build_last_stage(make_cfg("scheme=dafl", f"teacher={teacher}", "student=lenet5_half",
                                       "scheme.batch_size=4", "scheme.generator.width=4", "baseline=false"))
    assert module.activation_tap == tap
    network = module.teacher.model
    images = torch.randn(3, *module.input_shape)
    module.teacher(images)
    read = module.activation_taps.features[tap]
    module.activation_taps.clear()
    if teacher == "lenet5":
        x = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
        x = network.pool2(network.relu2(network.conv2(network.pool1(network.relu1(network.conv1(x))))))
        expected = F.relu(network.conv3(x))
        assert read.flatten(1).shape[1] == 120
    else:  # the average pool's output, read by another hook than the tap's
        captured = {}
        handle = network.avgpool.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
        module.teacher(images)
        handle.remove()
        expected = captured["x"]
    assert torch.allclose(read.flatten(1), expected.flatten(1), atol=1e-6)


POOL_SMALL = ["scheme.steps_per_round=3", "scheme.batch_size=8", "scheme.pool_size=20", "scheme.synthesis.batch_size=8"]


@pytest.mark.parametrize("scheme, scheduled", [
    ("dafl", ["student"]),  # DAFL-train.py: adjust_learning_rate(optimizer_S) only, the generator's Adam constant
    ("dfad", ["student", "generator"]),  # DFAD_cifar.py/DFAD_mnist.py --scheduler: scheduler_S and scheduler_G
    ("zskt", ["student", "generator"]),  # solver.py: both Adams cosine-annealed
    ("datafree_noise", ["student"]),
    ("deep_inversion", ["student"]),  # datafree_kd.py: the student's SGD alone
    ("fast_datafree", ["student"]),  # datafree_kd.py schedules the student; fast_meta.py's meta Adam is constant
])
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_the_schedule_reaches_the_optimizers_the_reference_schedules(make_cfg, scheme, scheduled):
    overrides = POOL_SMALL if scheme in ("deep_inversion", "fast_datafree") else small(scheme)[1:]
    module = build_last_stage(make_cfg(f"scheme={scheme}", "++scheme.scheduled=true", "baseline=false",
                                       "trainer.max_epochs=10", *overrides))
    optimizers, schedulers = module.configure_optimizers()
    players = dict(zip(("student", "generator"), optimizers))
    assert [config["scheduler"].optimizer for config in schedulers] == [players[name] for name in scheduled]
    for config in schedulers:
        for _ in range(10):
            config["scheduler"].step()
    if scheme in ("deep_inversion", "fast_datafree"):  # datafree_kd.py: CosineAnnealingLR(T_max=epochs, eta_min=2e-4)
        assert players["student"].param_groups[0]["lr"] == pytest.approx(2e-4)
    if "generator" in players and "generator" not in scheduled:
        initial = players["generator"].defaults["lr"]
        assert players["generator"].param_groups[0]["lr"] == initial > 0


@pytest.mark.parametrize("scheme", ["deep_inversion", "fast_datafree"])
def test_an_epoch_counted_schedule_is_refused_per_step_and_its_switch_off_must_drop_it(make_cfg, scheme):
    # T_max: ${trainer.max_epochs} in these recipes; a per-step cosine would restart after max_epochs steps.
    with pytest.raises(ConfigError, match=r"stepped once per epoch.*scheduler_interval='step'"):
        build_last_stage(make_cfg(f"scheme={scheme}", "baseline=false", *POOL_SMALL, "+scheme.scheduler_interval=step"))
    with pytest.raises(ConfigError, match=r"scheme.scheduled=false.*scheme.schedule=null"):
        build_last_stage(make_cfg(f"scheme={scheme}", "baseline=false", *POOL_SMALL, "++scheme.scheduled=false"))
    module = build_last_stage(make_cfg(f"scheme={scheme}", "baseline=false", *POOL_SMALL, "++scheme.scheduled=false",
                                       "scheme.schedule=null"))
    assert module.configure_optimizers()[1] == []


def zskt_module(num_classes: int, temperature: float, kd_weight: float = 1.0) -> ZSKT:
    return ZSKT(student=build_model("convnet_tiny", num_classes, 1), teacher=build_model("convnet_large", num_classes, 1),
                terms={"kd": KD(weight=kd_weight, temperature=temperature)}, num_classes=num_classes,
                example_input=torch.randn(2, 1, 8, 8), steps_per_epoch=2, batch_size=4, generator={"width": 4},
                temperature=temperature, optimizer=lambda params: torch.optim.SGD(params, lr=0.05))


@pytest.mark.parametrize("num_classes, temperature", [(10, 1.0), (100, 1.0), (100, 4.0)])
def test_zskts_student_kl_is_its_generators_divergence_for_any_class_count(num_classes, temperature):
    # solver.py: one `divergence` (F.kl_div at KL_temperature, mean over batch and classes) for both players.
    module = zskt_module(num_classes, temperature)
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(5, num_classes)) * 2, rng.normal(size=(5, num_classes)) * 2
    ps, pt = softmax64(s / temperature), softmax64(t / temperature)
    reference = (pt * (np.log(pt) - np.log(ps))).sum() / s.size
    student, teacher = torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
    inputs = DistillInputs(student_logits=student, targets=teacher.argmax(1), indices=None, teacher_logits=teacher)
    kd = module.terms["kd"]
    assert kd.temperature == temperature
    assert (kd.weight * kd(inputs)).item() == pytest.approx(reference, rel=1e-5)
    assert module.disagreement(student, teacher).item() == pytest.approx(reference, rel=1e-5)
    # A chosen weight multiplies the reference's divergence.
    halved = zskt_module(num_classes, temperature, kd_weight=0.5).terms["kd"]
    assert (halved.weight * halved(inputs)).item() == pytest.approx(0.5 * reference, rel=1e-5)


def test_zskts_temperature_reaches_the_students_kd_term_through_its_config(make_cfg):
    module = build_last_stage(make_cfg(*small("zskt"), "scheme.temperature=2.0"))
    assert module.temperature == 2.0 and module.terms["kd"].temperature == 2.0
    assert module.terms["kd"].weight == pytest.approx(1.0 / (2.0 ** 2 * 10))
    assert module.terms["at"].weight == 250.0
    # models/generator.py of the reference ends in nn.BatchNorm2d(3, affine=True), DAFL's and DFAD's in affine=False.
    assert module.generator.block2[-1].affine
    assert not build_last_stage(make_cfg(*small("dfad"))).generator.block2[-1].affine


def test_zskt_refuses_a_kd_temperature_other_than_its_generators(make_cfg):
    # solver.py has one KL_temperature; distill.kd.temperature on the command line would split the two players.
    with pytest.raises(ConfigError, match="scheme.temperature"):
        build_last_stage(make_cfg(*small("zskt"), "distill.kd.temperature=4"))
    module = build_last_stage(make_cfg(*small("zskt"), "distill.kd.temperature=4", "scheme.temperature=4"))
    assert module.temperature == module.terms["kd"].temperature == 4.0
