"""Adversarial distillation: the losses against hand arithmetic, the alternation (no gradient crosses from one
player's step to the other), student-step counting (max_steps, step schedules, EMA), bad input, DDP.
Resume, bf16 and the frozen-teacher walk run through tests/scheme_cases.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms import KD
from kd_lightning.models import build_model
from kd_lightning.pipeline import run
from kd_lightning.schemes import Adversarial
from kd_lightning.schemes.adversarial import discriminator_loss, fooling_loss
from kd_lightning.schemes.watch import NonFiniteWatch
from kd_lightning.stages import plan_stages

ROOT = Path(__file__).resolve().parents[1]
SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9)
ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-2}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_discriminator_and_student_losses_match_hand_arithmetic():
    generator = torch.Generator().manual_seed(0)
    teacher_scores, student_scores = torch.randn(7, generator=generator) * 3, torch.randn(7, generator=generator) * 3
    # D: teacher labelled 1, student 0; −[y log σ(s) + (1 − y) log(1 − σ(s))], each half averaged, then halved.
    real = sum(-math.log(sigmoid(s)) for s in teacher_scores.tolist()) / 7
    fake = sum(-math.log(1.0 - sigmoid(s)) for s in student_scores.tolist()) / 7
    assert discriminator_loss(teacher_scores, student_scores).item() == pytest.approx(0.5 * (real + fake), rel=1e-6)
    # Student: rewarded for being taken for the teacher, −log σ(D(student)).
    fooled = sum(-math.log(sigmoid(s)) for s in student_scores.tolist()) / 7
    assert fooling_loss(student_scores).item() == pytest.approx(fooled, rel=1e-6)


def digits_module(teacher: str = "convnet_small", **options) -> Adversarial:
    L.seed_everything(0)
    return Adversarial(student=build_model("convnet_tiny", num_classes=10, in_channels=1),
                       teacher=build_model(teacher, num_classes=10, in_channels=1), num_classes=10,
                       example_input=torch.randn(2, 1, 8, 8), terms={"kd": KD(weight=0.9, temperature=4.0)},
                       ce_weight=0.1, optimizer=SGD, discriminator_optimizer=ADAM, **options)


def loader(batches: int = 4, batch_size: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batches * batch_size, 1, 8, 8, generator=generator)
    return DataLoader(TensorDataset(images, torch.randint(0, 10, (len(images),), generator=generator)),
                      batch_size=batch_size)


def fit(module: Adversarial, callbacks=(), **trainer) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks), **{"max_epochs": 1, **trainer})
    trainer.fit(module, train_dataloaders=loader())
    return trainer


class WatchSteps(L.Callback):
    """Hooks on both raw optimizers: counts their steps and checks, at each step, that the other player's
    weights and gradients are what its own last step left (None before it first stepped)."""

    def __init__(self) -> None:
        self.steps = {"student": 0, "discriminator": 0}
        self.leaks: list[str] = []

    def on_train_start(self, trainer, module) -> None:
        players = {"student": module.student, "discriminator": module.discriminators}
        left: dict[str, list] = {role: [None] * len(list(net.parameters())) for role, net in players.items()}

        def state(role: str) -> list:
            return [None if p.grad is None else (p.detach().clone(), p.grad.clone())
                    for p in players[role].parameters()]

        def same(a: list, b: list) -> bool:
            return all((x is None and y is None) or (x is not None and y is not None and all(map(torch.equal, x, y)))
                       for x, y in zip(a, b))

        for role, optimizer in zip(("student", "discriminator"), trainer.optimizers):
            other = "discriminator" if role == "student" else "student"

            def before(optimizer, args, kwargs, role=role, other=other) -> None:
                if not same(state(other), left[other]):
                    self.leaks.append(f"{role} step {self.steps[role] + 1}: {other} changed since its own step")

            def after(optimizer, args, kwargs, role=role) -> None:
                self.steps[role] += 1
                left[role] = state(role)

            optimizer.register_step_pre_hook(before)
            optimizer.register_step_post_hook(after)


def test_each_players_step_leaves_the_other_untouched_and_both_move():
    module = digits_module(discriminator_steps=2)
    student_before = [p.detach().clone() for p in module.student.parameters()]
    discriminator_before = [p.detach().clone() for p in module.discriminators.parameters()]
    watch = WatchSteps()
    fit(module, [watch], max_steps=3)
    assert watch.leaks == []
    assert watch.steps == {"student": 3, "discriminator": 6}
    assert not any(torch.equal(a, b) for a, b in zip(student_before, module.student.parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(discriminator_before, module.discriminators.parameters()))


def test_the_adversarial_term_moves_the_student_through_the_discriminator():
    # Same seed, same batches: only the adversarial weight differs, so any change is that term's gradient.
    weights = {}
    for weight in (0.0, 1.0):
        module = digits_module(adversarial_weight=weight)
        fit(module, max_steps=1)
        weights[weight] = [p.detach().clone() for p in module.student.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(weights[0.0], weights[1.0]))


def test_max_steps_a_step_schedule_and_ema_follow_student_steps_not_discriminator_steps():
    # 3 discriminator steps per student step: counted by Lightning, 6 max_steps would end after 2 student steps,
    # the schedule would decay 24 times and EMA's every-2nd-step cadence would never match an index.
    module = digits_module(discriminator_steps=3, scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1,
                                                                    gamma=0.5), scheduler_interval="step")
    watch, ema = WatchSteps(), EMAWeightAveraging(decay=0.5, update_every_n_steps=2)
    trainer = fit(module, [watch, ema], max_steps=6, max_epochs=5)
    assert watch.steps == {"student": 6, "discriminator": 18}
    assert trainer.global_step == 6
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 6)
    assert trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(1e-2)  # the discriminator's stays
    assert int(ema._average_model.n_averaged) == 3  # student steps 1, 3, 5


def test_an_epoch_schedule_steps_once_per_epoch():
    module = digits_module(scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    trainer = fit(module, max_epochs=2)
    assert trainer.global_step == 8
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)


def test_a_resume_from_the_epochs_last_step_continues_the_epoch_schedule(tmp_path, monkeypatch):
    # Lightning resumes from a checkpoint of an epoch's last batch without re-running the epoch-end hooks, so an
    # epoch schedule stepped there would be lost: the ×0.1 after epoch 0 must already be in that checkpoint.
    from test_resume import resume_at_an_epoch_end

    whole, resumed = resume_at_an_epoch_end(tmp_path, monkeypatch, "scheme=adversarial", "distill=[kd]",
                                            "scheduler=multistep", "scheduler.milestones=[1]")
    assert resumed == whole


def test_the_benchmark_pairs_each_adversarial_run_with_the_kd_run_of_its_seed(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("scheme_benchmark", ROOT / "scripts" / "scheme_benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    # Job directories numbered in a different seed order per case: pairing must go by seed, not by position.
    for label, jobs in {"kd": {0: (3, 0.90), 1: (5, 0.80)}, "adversarial": {0: (5, 0.85), 1: (3, 0.95)}}.items():
        for job, (seed, accuracy) in jobs.items():
            (tmp_path / "sweeps" / label / str(job) / ".hydra").mkdir(parents=True)
            (tmp_path / "sweeps" / label / str(job) / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
            (tmp_path / "sweeps" / label / str(job) / "results.json").write_text(
                json.dumps({"student_metrics": {"test/acc": accuracy}}))
    (line,) = benchmark.paired_lines(tmp_path)
    assert line == "`adversarial` − `kd` (last stage, same seeds): +5.00 ± 0.00 pp; per seed 3: +5.00, 5: +5.00."


def test_an_init_stage_term_trains_its_init_stage_first_then_the_adversarial_main_stage(make_cfg, recorded_losses,
                                                                                        monkeypatch):
    snapshots = []

    def snapshot(module) -> None:
        snapshots.append((module.init_stage, [p.detach().clone() for p in module.terms.ft.paraphraser_encoder.parameters()],
                          [p.detach().clone() for p in module.discriminators.parameters()]))

    monkeypatch.setattr(Adversarial, "on_fit_start", snapshot)
    monkeypatch.setattr(Adversarial, "on_train_end", snapshot)
    run(make_cfg("scheme=adversarial", "distill=[ft]", "distill.ft.init_epochs=1", "baseline=false"))
    (init, ft_start, d_start), _, (main, ft_main, d_main), (_, ft_end, d_end) = snapshots
    assert init and not main
    assert len(recorded_losses["student_init"]) == 2 and len(recorded_losses["student"]) == 2
    assert not all(torch.equal(a, b) for a, b in zip(ft_start, ft_main))  # the init stage trained the paraphraser
    assert all(torch.equal(a, b) for a, b in zip(d_start, d_main))  # ... and left the discriminators alone
    assert all(torch.equal(a, b) for a, b in zip(ft_main, ft_end))  # the main stage keeps the paraphraser
    assert not any(torch.equal(a, b) for a, b in zip(d_main, d_end))  # and trains the discriminators


def test_a_tapped_feature_gets_its_own_discriminator_and_unequal_widths_are_refused():
    module = digits_module(teacher="convnet_tiny", discriminate=["logits", "penultimate"])
    assert sorted(module.discriminators) == ["logits", "penultimate"]
    watch = WatchSteps()
    fit(module, [watch], max_steps=2)
    assert watch.leaks == [] and watch.steps == {"student": 2, "discriminator": 2}
    with pytest.raises(ConfigError, match="scheme.discriminate=\\[logits\\]"):
        Adversarial(student=build_model("convnet_tiny", num_classes=10, in_channels=1),
                    teacher=build_model("convnet_large", num_classes=10, in_channels=1), num_classes=10,
                    example_input=torch.randn(2, 1, 8, 8), terms={}, optimizer=SGD, discriminator_optimizer=ADAM,
                    discriminate=["penultimate"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["scheme.discriminator_optimizer=null"], "scheme.discriminator_optimizer is not set"),
    (["+trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val=null"),
    (["+trainer.accumulate_grad_batches=2"], "larger data.batch_size"),
    (["scheme.discriminator_steps=0"], "whole number"),
])
def test_bad_settings_are_refused_before_anything_trains(make_cfg, overrides, message):
    cfg = make_cfg("scheme=adversarial", *overrides)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (Path(cfg.paths.cache_dir) / "stages").exists()  # not even the teacher trained


def test_ddp_lets_the_adversarial_stage_alone_find_unused_parameters(make_cfg):
    stages = plan_stages(make_cfg("scheme=adversarial", "trainer=ddp", "trainer.accelerator=cpu"))
    assert stages[-1].overrides["trainer.strategy"] == "ddp_find_unused_parameters_true"
    assert all("trainer.strategy" not in stage.overrides for stage in stages[:-1])


def test_a_non_finite_discriminator_loss_names_its_learning_rate():
    watch = NonFiniteWatch(["ce", "discriminator"], remedies={"discriminator": "scheme.discriminator_optimizer.lr"})
    watch.record("discriminator", torch.tensor(float("nan")), 4)
    with pytest.raises(ConfigError, match="'discriminator'.*step 4.*scheme.discriminator_optimizer.lr"):
        watch.raise_if_any()


@pytest.mark.slow
def test_two_ddp_ranks_on_different_shards_end_identical_discriminators_included(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "_ddp_adversarial.py"),
                             "ddp_find_unused_parameters_true", str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"ddp-rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert rank0["losses"] != rank1["losses"]  # the shards differ, so unsynchronised gradients would too
    from _ddp_adversarial import build

    initial = build(torch.randn(2, 1, 8, 8)).state_dict()
    trained = [key for key in rank0["state_dict"] if not key.endswith(("running_mean", "running_var",
                                                                       "num_batches_tracked"))]
    discriminator = [key for key in trained if key.startswith("discriminators.")]
    assert discriminator and all(not torch.equal(rank0["state_dict"][key], initial[key]) for key in discriminator)
    for key in trained:
        assert torch.equal(rank0["state_dict"][key], rank1["state_dict"][key]), f"ranks disagree on {key}"


def cached_module(tmp_path, discriminate=("logits",), terms=None, dtype="float32"):
    from kd_lightning.data import DigitsDataModule
    from kd_lightning.teacher_cache import TeacherCacheOptions

    data = DigitsDataModule(batch_size=32, augment=True, train_subset=64)
    L.seed_everything(0)
    module = Adversarial(student=build_model("convnet_tiny", num_classes=10, in_channels=1),
                         teacher=build_model("convnet_small", num_classes=10, in_channels=1), num_classes=10,
                         example_input=data.example_input(), terms=terms or {"kd": KD(weight=0.9, temperature=4.0)},
                         ce_weight=0.1, optimizer=SGD, discriminator_optimizer=ADAM, discriminate=list(discriminate),
                         train_size=data.train_size, train_targets=data.train_targets,
                         teacher_cache=TeacherCacheOptions(storage="memory", directory=tmp_path / "outputs",
                                                           dtype=dtype))
    return module, data


def cache_meetings(module, data):
    """Train-step a cached module on one batch that meets the cache in each way (all misses, all hits, half
    and half) and yield, per step, the teacher logits the discriminator saw, the teacher's exact logits, and
    which samples hit."""
    from kd_lightning.teacher_cache import stored_inputs

    cache = module.teacher_outputs
    cache.open(data, module.teacher.model, module.teacher_forward, torch.device("cpu"), "32-true")
    positions = torch.arange(32)
    raw = stored_inputs(data.train_set, positions.tolist())
    views = data.train_views.draw(32, torch.Generator().manual_seed(0))
    other = views.clone()
    other[16:] = (views[16:] + 1) % data.train_views.count
    targets = torch.randint(0, 10, (32,))
    for batch_views, hit in ((views, torch.zeros(32, dtype=torch.bool)), (views, torch.ones(32, dtype=torch.bool)),
                             (other, torch.arange(32) < 16)):
        images = data.train_views.crop_flip(raw, batch_views)
        cache.lookup(positions, batch_views)
        module.training_losses(images, targets, positions)
        seen = module.discriminated_outputs("teacher")["logits"]
        module.release_features()
        exact = module.teacher(images)
        module.release_features()
        yield seen, exact, hit


def test_the_discriminator_sees_the_whole_batchs_teacher_logits_under_the_teacher_cache(tmp_path):
    # The teacher runs only on the samples the cache misses, so a forward hook sees part of the batch (all hits:
    # nothing, the KeyError of issue 19); the discriminator must get the cache's merged whole-batch logits.
    module, data = cached_module(tmp_path)
    for seen, exact, _ in cache_meetings(module, data):
        assert torch.equal(seen, exact)
    assert module.teacher_outputs.hits == 32 + 16


def test_a_float16_cache_gives_the_discriminator_rounded_teacher_logits_in_float32(tmp_path):
    # A hit returns the stored float16 row cast back to the forward's dtype, and a miss returns what its later
    # hit will, so on a lossy table the teacher side the discriminator compares with the (exact) student is
    # rounded to 11 significant bits for every sample, hit or miss.
    module, data = cached_module(tmp_path, dtype="float16")
    for seen, exact, hit in cache_meetings(module, data):
        rounded = exact.half().float()
        assert seen.dtype == torch.float32 and not torch.equal(rounded, exact)
        assert torch.equal(seen[hit], rounded[hit])
        assert torch.equal(seen[~hit], rounded[~hit])


def test_adversarial_trains_with_a_precomputed_teacher_cache(make_cfg):
    results = run(make_cfg("scheme=adversarial", "teacher_cache=memory", "teacher_cache.precompute=true",
                           "baseline=false"))
    assert "test/acc" in results["student_metrics"]


def test_discriminating_a_tap_the_teacher_cache_does_not_store_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"\['penultimate'\].*scheme.discriminate=\[logits\].*teacher_cache=none"):
        cached_module(tmp_path, discriminate=("logits", "penultimate"))
