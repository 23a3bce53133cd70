"""The main job end to end: teacher (trained, then cached), baseline, distilled student, table, export."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kd_lightning.models import build_model
from kd_lightning.pipeline import run
from kd_lightning.teachers import load_weights, read_weights


def test_default_job_reports_three_rows_and_reuses_the_cached_teacher(make_cfg, tmp_path, capsys):
    results = run(make_cfg())
    table = capsys.readouterr().out
    assert results["teacher"]["source"].startswith("trained")
    for role in ("teacher", "student baseline", "student + kd"):
        assert role in table
    for metrics in (results["teacher"]["metrics"], results["baseline"], results["student_metrics"]):
        assert 0.0 <= metrics["test/acc"] <= 1.0
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["student_metrics"]["test/acc"] == results["student_metrics"]["test/acc"]
    cached = list((tmp_path / "cache" / "teachers").glob("convnet_large-*.pt"))
    assert len(cached) == 1

    again = run(make_cfg("baseline=false", "seed=1"))
    assert again["teacher"]["source"] == f"cache {cached[0]}"
    assert again["teacher"]["metrics"] == results["teacher"]["metrics"]
    assert "baseline" not in again


def test_teacher_cache_key_changes_with_the_recipe(make_cfg, tmp_path):
    run(make_cfg("baseline=false"))
    run(make_cfg("baseline=false", "optimizer.lr=0.01"))
    run(make_cfg("baseline=false", "optimizer.lr=0.01", "teacher.lr=0.05"))  # the teacher's own learning rate
    assert len(list((tmp_path / "cache" / "teachers").glob("*.pt"))) == 3


def test_exported_student_rebuilds_without_the_teacher(make_cfg, tmp_path):
    results = run(make_cfg("baseline=false"))
    state_dict, spec = read_weights(tmp_path / "out" / "student.pt")
    assert spec["name"] == "convnet_tiny"
    assert not any(key.startswith(("teacher", "terms")) for key in state_dict)
    student = load_weights(build_model(**spec), tmp_path / "out" / "student.pt", role="student")
    assert torch.equal(student.fc.weight, state_dict["fc.weight"])
    assert results["student_metrics"]["test/acc"] > 0


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
    results = run(make_cfg("scheme=supervised", "student=convnet_large"))
    assert "teacher" not in results and "baseline" not in results
    assert not (tmp_path / "cache").exists()
    assert 0.0 <= results["student_metrics"]["test/acc"] <= 1.0


def test_bf16_mixed_precision_on_cpu(make_cfg):
    results = run(make_cfg("baseline=false", "distill=[kd,at]", "scheme.ce_weight=0.1", "trainer.precision=bf16-mixed"))
    assert 0.0 <= results["student_metrics"]["test/acc"] <= 1.0


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

    import kd_lightning.pipeline as pipeline

    original = pipeline.build_callbacks
    pipeline.build_callbacks = lambda cfg, has_logger: original(cfg, has_logger) + [Record()]
    try:
        run(make_cfg("scheme=supervised", "trainer.max_epochs=2", f"ckpt_path={checkpoint_path}"))
    finally:
        pipeline.build_callbacks = original
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
    import kd_lightning.pipeline as pipeline

    seen = []
    original = pipeline.scheme_kwargs
    pipeline.scheme_kwargs = lambda cfg, dm: seen.append(cfg.scheduler.T_max) or original(cfg, dm)
    try:
        run(make_cfg("baseline=false", "teacher.max_epochs=2", "trainer.max_epochs=1"))
    finally:
        pipeline.scheme_kwargs = original
    assert 2 in seen and 1 in seen  # the teacher's cosine spans its own 2 epochs, the student's its 1
