"""DeepInversion and Fast-Datafree through real fits: what the issue says must hold.

The student never receives a real training image (every input it trains on is a pool row), the teacher
stays frozen and eval-pinned while synthesis trains through it (its weights and BN statistics are the
cached teacher's after the fit), a teacher without BatchNorm is refused before anything trains, and the
pool is written to disk only when asked. Resume, bf16 and the static frozen-teacher walk run for both
schemes in tests/test_resume.py and tests/test_schemes.py (cases in tests/scheme_cases.py).
"""

from __future__ import annotations

import pytest
import torch

from kd_lightning import pipeline
from kd_lightning.data.base import KDDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.pipeline import run
from kd_lightning.schemes.inversion import PoolDistillation
from kd_lightning.stages import plan_stages
from scheme_cases import SCHEME_CASES

POOL_SCHEMES = ["deep_inversion", "fast_datafree"]


def build_last_stage(cfg):
    datamodule = pipeline.construct(cfg.data)
    built = {}
    module = None
    for stage in plan_stages(cfg):
        given = pipeline.teacher_arguments(stage, built)
        module = pipeline.build_stage_module(pipeline.stage_config(cfg, stage), stage, datamodule, given)
        built[stage.name] = module.products()
    return module


@pytest.mark.parametrize("scheme", POOL_SCHEMES)
def test_the_student_trains_only_on_pool_images_and_the_teacher_ends_as_it_began(make_cfg, monkeypatch, scheme):
    seen: dict[str, object] = {"inputs": [], "pool_rows_ok": True, "teacher_before": None, "teacher_after": None}

    sample_loader = KDDataModule.sample_loader

    def refuse_real_batches(self):
        # The teacher's stage trains on the data; the data-free stage must never ask for it.
        if isinstance(self.trainer.lightning_module, PoolDistillation):
            raise AssertionError("a data-free scheme asked for the real training samples")
        return sample_loader(self)

    original_fit_start = PoolDistillation.on_fit_start

    def watch(self):
        original_fit_start(self)
        teacher = self.teacher.model
        seen["teacher_before"] = {k: v.clone() for k, v in teacher.state_dict().items()}

        def record(module, args):
            if module.training:  # training forwards only: validation and test read the real test split
                images = args[0].detach()
                rows = self.pool.images[: len(self.pool)].flatten(1)
                matches = (images.flatten(1)[:, None, :] == rows[None]).all(-1).any(1)
                seen["pool_rows_ok"] = bool(seen["pool_rows_ok"]) and bool(matches.all())
                seen["inputs"].append(len(images))
        self.student.register_forward_pre_hook(record)

    def end(self):
        seen["teacher_after"] = {k: v.clone() for k, v in self.teacher.model.state_dict().items()}
        assert not any(m.training for m in self.teacher.model.modules())

    monkeypatch.setattr(KDDataModule, "sample_loader", refuse_real_batches)
    monkeypatch.setattr(PoolDistillation, "on_fit_start", watch)
    monkeypatch.setattr(PoolDistillation, "on_train_end", end, raising=False)
    cfg = make_cfg(f"scheme={scheme}", *SCHEME_CASES[scheme][0], "scheme.student_crop_padding=null", "baseline=false",
                   "trainer.limit_train_batches=4")
    run(cfg)
    assert seen["inputs"] == [8] * 4  # four student steps of 8 pool images
    assert seen["pool_rows_ok"], "the student trained on an image that is not in the synthetic pool"
    before, after = seen["teacher_before"], seen["teacher_after"]
    assert before and after and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "synthesis changed the teacher (weights or BN stats)"
    assert any("running_mean" in k for k in before)


@pytest.mark.parametrize("scheme", POOL_SCHEMES)
def test_a_teacher_without_batch_norm_is_refused_before_training(make_cfg, scheme):
    cfg = make_cfg(f"scheme={scheme}", *SCHEME_CASES[scheme][0], "teacher=lenet5")
    with pytest.raises(ConfigError, match="no BatchNorm layer"):
        build_last_stage(cfg)


@pytest.mark.parametrize(("scheme", "setting"), [("deep_inversion", "DeepInversion"), ("fast_datafree", "Fast-Datafree")])
def test_an_unknown_synthesis_setting_names_the_valid_ones(make_cfg, scheme, setting):
    cfg = make_cfg(f"scheme={scheme}", *SCHEME_CASES[scheme][0], "+scheme.synthesis.iteration=3")
    with pytest.raises(ConfigError, match=f"not a {setting} setting.*Its keys: batch_size"):
        build_last_stage(cfg)


def test_the_pool_is_saved_only_when_asked_and_its_batches_are_shown_as_grids(make_cfg, tmp_path):
    case = SCHEME_CASES["deep_inversion"][0]
    run(make_cfg("scheme=deep_inversion", *case, "baseline=false"))
    assert not list((tmp_path / "out").rglob("synthetic_pool.pt"))
    assert not list((tmp_path / "out").rglob("step_*.png"))
    run(make_cfg("scheme=deep_inversion", *case, "baseline=false", "scheme.save_pool=true",
                 "scheme.log_images_every_n_steps=2", f"paths.output_dir={tmp_path / 'saved'}"))
    (saved,) = (tmp_path / "saved").rglob("synthetic_pool.pt")
    pool = torch.load(saved)
    assert pool["count"] == 8 and pool["images"].shape == (8, 1, 8, 8)  # one round of 8 in 2 steps
    assert [p.name for p in (tmp_path / "saved").rglob("step_*.png")] == ["step_2.png"]
