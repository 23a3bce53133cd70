"""The main job end to end: teacher (trained, then cached), baseline, distilled student, table, export."""

from __future__ import annotations

import json

import torch

from kd_lightning.models import build_model
from kd_lightning.pipeline import construct, evaluate, run
from kd_lightning.report import collapse_warning
from kd_lightning.teachers import load_weights, read_weights


def digits(cfg):
    datamodule = construct(cfg.data)
    datamodule.setup("test")
    return datamodule


def test_default_job_distils_a_student_that_beats_its_baseline_and_reuses_the_cached_teacher(make_cfg, tmp_path,
                                                                                         capsys):
    # The real default job (30 epochs on digits, ~25 s): chance is 10 %, so these margins fail on a pipeline
    # that trains the wrong network, loses the teacher or distils towards noise.
    results = run(make_cfg("logger=none", "callbacks=none", "trainer.enable_progress_bar=false", fast=False))
    table = capsys.readouterr().out
    assert results["teacher"]["source"].startswith("trained")
    for role in ("teacher", "student baseline", "student + kd"):
        assert role in table
    assert "params / teacher" in table and "| 590 " in table and "| 0.008 " in table  # 590 / 75.1k parameters
    assert results["stages"]["student"]["size"]["student"] == {"params": 590, "flops": 32416}
    teacher, baseline, distilled = (results["teacher"]["metrics"]["test/acc"], results["baseline"]["test/acc"],
                                    results["student_metrics"]["test/acc"])
    assert teacher >= 0.95 and baseline >= 0.85
    # The default job's claim (seeds 0/1/2 in BENCHMARKS.md: KD ahead by 1.7–3.6 points).
    assert distilled > baseline, (baseline, distilled)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["student_metrics"]["test/acc"] == distilled
    cached = list((tmp_path / "cache" / "stages").glob("teacher-convnet_large-*.pt"))
    assert len(cached) == 1

    # A shorter student run with the teacher's length pinned to the same 30 epochs reuses that teacher.
    again = run(make_cfg("baseline=false", "seed=1", "trainer.max_epochs=1", "teacher.max_epochs=30", "logger=none",
                         "callbacks=none", "trainer.enable_progress_bar=false", fast=False))
    assert again["teacher"]["source"] == f"cache {cached[0]}"
    assert again["teacher"]["metrics"] == results["teacher"]["metrics"]
    assert "baseline" not in again


def test_teacher_cache_key_changes_with_the_recipe(make_cfg, tmp_path):
    run(make_cfg("baseline=false"))
    run(make_cfg("baseline=false", "optimizer.lr=0.01"))
    run(make_cfg("baseline=false", "optimizer.lr=0.01", "teacher.lr=0.1"))  # the teacher's own learning rate
    assert len(list((tmp_path / "cache" / "stages").glob("teacher-*.pt"))) == 3
    # The teacher's own learning rate equal to the default one is the first recipe again.
    assert run(make_cfg("baseline=false", "optimizer.lr=0.01", "teacher.lr=0.05"))["teacher"]["source"].startswith("cache")
    # The key is the recipe the teacher trains under, not how it was spelled: the teacher's own length set
    # to the run's length is the same recipe, whatever the student's epochs.
    again = run(make_cfg("baseline=false", "trainer.max_epochs=2", "teacher.max_epochs=1"))
    assert again["teacher"]["source"].startswith("cache")
    assert len(list((tmp_path / "cache" / "stages").glob("teacher-*.pt"))) == 3


def test_exported_student_rebuilds_without_the_teacher(make_cfg, tmp_path):
    results = run(make_cfg("baseline=false"))
    state_dict, spec = read_weights(tmp_path / "out" / "student.pt")
    assert spec["name"] == "convnet_tiny"
    assert not any(key.startswith(("teacher", "terms")) for key in state_dict)
    student = load_weights(build_model(**spec), tmp_path / "out" / "student.pt", role="student")
    assert torch.equal(student.fc.weight, state_dict["fc.weight"])
    # The file holds the trained student: evaluated on its own, it scores what the run reported.
    assert evaluate(make_cfg(), student, digits(make_cfg()))["test/acc"] == results["student_metrics"]["test/acc"]


def test_lightning_checkpoint_holds_student_and_adapters_but_not_the_teacher(make_cfg, tmp_path):
    run(make_cfg("baseline=false", "distill=[fitnet]", "callbacks=default", "callbacks.progress_bar=null"))
    checkpoint_path = next((tmp_path / "out" / "student").rglob("last.ckpt"))
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    keys = checkpoint["state_dict"].keys()
    assert any(key.startswith("terms.fitnet.regressor") for key in keys)
    assert any(key.startswith("student.") for key in keys)
    assert not any(key.startswith("teacher") for key in keys)
    # A scheme checkpoint is also a valid teacher file: the student's weights, named by its spec.
    state_dict, spec = read_weights(checkpoint_path)
    assert spec["name"] == "convnet_tiny" and "fc.weight" in state_dict


def test_supervised_scheme_trains_one_network_without_a_teacher(make_cfg, tmp_path):
    results = run(make_cfg("scheme=supervised", "student=convnet_large", "trainer.max_epochs=2",
                           "trainer.limit_train_batches=null", "trainer.limit_test_batches=null"))
    assert "teacher" not in results and "baseline" not in results
    assert not (tmp_path / "cache").exists()
    assert results["student_metrics"]["test/acc"] >= 0.9  # two epochs on digits; chance is 0.1
    assert "warning" not in results["stages"]["student"]


def test_a_stage_that_ends_at_chance_accuracy_is_reported_with_the_fix(make_cfg, capsys):
    # A network that never learns (lr 1e-9) stands in for a collapsed one: the run finishes, and must say so.
    results = run(make_cfg("scheme=supervised", "student=convnet_tiny", "optimizer.lr=1e-9",
                           "trainer.limit_test_batches=null"))
    assert results["student_metrics"]["test/acc"] < 0.15
    warning = results["stages"]["student"]["warning"]
    assert "chance level for 10 classes" in warning and "lower optimizer.lr" in warning
    assert f"WARNING: {warning}" in capsys.readouterr().out
    assert collapse_warning("student", {"test/acc": 0.149, "val/acc": 0.9}, 10)  # test accuracy decides
    assert collapse_warning("student", {"val/acc": 0.151}, 10) is None
    assert collapse_warning("student", {"val/acc": 0.0014}, 1000) and not collapse_warning("s", {"test/acc": 0.5}, 1)


def test_bf16_mixed_precision_on_cpu_follows_the_fp32_run(make_cfg, recorded_losses):
    first_steps = {}
    for precision in ("32-true", "bf16-mixed"):
        recorded_losses.clear()
        run(make_cfg("baseline=false", "distill=[kd,at]", "scheme.ce_weight=0.1", f"trainer.precision={precision}"))
        first_steps[precision] = recorded_losses["student"][0]
    # bf16 keeps 8 mantissa bits: the first loss moves in the third digit, not more; equal would mean the
    # precision setting never reached the step.
    assert first_steps["bf16-mixed"] != first_steps["32-true"]
    assert abs(first_steps["bf16-mixed"] - first_steps["32-true"]) <= 0.02 * abs(first_steps["32-true"])


def test_resume_continues_at_the_next_epoch_with_the_saved_optimizer_state(make_cfg, tmp_path):
    first = make_cfg("scheme=supervised", "trainer.max_epochs=1", "callbacks=default", "callbacks.progress_bar=null")
    run(first)
    checkpoint_path = next((tmp_path / "out" / "student").rglob("last.ckpt"))
    saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0

    from lightning.pytorch.callbacks import Callback

    class Record(Callback):
        epochs: list[int] = []
        momentum: torch.Tensor | None = None

        def on_train_epoch_start(self, trainer, module):
            Record.epochs.append(trainer.current_epoch)
            if Record.momentum is None:
                state = trainer.optimizers[0].state_dict()["state"]
                Record.momentum = state[0]["momentum_buffer"].clone()

    import kd_lightning.trainer_setup as trainer_setup

    original = trainer_setup.build_callbacks
    trainer_setup.build_callbacks = lambda cfg, has_logger: original(cfg, has_logger) + [Record()]
    try:
        run(make_cfg("scheme=supervised", "trainer.max_epochs=2", f"ckpt_path={checkpoint_path}"))
    finally:
        trainer_setup.build_callbacks = original
    assert Record.epochs == [1]
    assert torch.equal(Record.momentum, saved["optimizer_states"][0]["state"][0]["momentum_buffer"])


def test_kd_export_extracts_the_student_from_a_scheme_checkpoint(make_cfg, tmp_path):
    from kd_lightning.export import export

    run(make_cfg("baseline=false", "distill=[fitnet]", "callbacks=default", "callbacks.progress_bar=null"))
    checkpoint_path = next((tmp_path / "out" / "student").rglob("last.ckpt"))
    state_dict, spec = read_weights(export(str(checkpoint_path), str(tmp_path / "exported.pt")))
    assert spec["name"] == "convnet_tiny"
    assert not any("regressor" in key for key in state_dict)
    assert set(state_dict) == set(build_model(**spec).state_dict())


def test_teacher_max_epochs_also_sets_its_schedule_length(make_cfg, tmp_path):
    import kd_lightning.stage_build as stage_build

    seen = []
    original = stage_build.scheme_kwargs
    stage_build.scheme_kwargs = lambda cfg, dm: seen.append(cfg.scheduler.T_max) or original(cfg, dm)
    try:
        run(make_cfg("baseline=false", "teacher.max_epochs=2", "trainer.max_epochs=1"))
    finally:
        stage_build.scheme_kwargs = original
    assert 2 in seen and 1 in seen  # the teacher's cosine spans its own 2 epochs, the student's its 1


def test_network_size_counts_parameters_and_flops_as_by_hand():
    from kd_lightning.report import network_size

    # convnet_tiny on one 8x8 grey image: 3x3 convs 1->4 (8x8), 4->4 (8x8), 4->8 (stride 2, 4x4), fc 8->10.
    macs = 8 * 8 * 4 * 1 * 9 + 8 * 8 * 4 * 4 * 9 + 4 * 4 * 8 * 4 * 9 + 8 * 10
    params = (4 * 1 * 9 + 4 * 4 * 9 + 8 * 4 * 9) + 2 * (4 + 4 + 8) + (8 * 10 + 10)  # convs, BN, fc
    model = build_model("convnet_tiny", num_classes=10, in_channels=1).train()
    assert network_size(model, torch.zeros(5, 1, 8, 8)) == {"params": params, "flops": 2 * macs}
    assert model.training  # measured in eval mode, then given back as it was
