"""The GPU speed switches (kd_lightning/acceleration.py): applied where they should be, and a CPU run's
losses do not move (bit for bit where the switch is a no-op on the CPU, within tolerance for torch.compile)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from kd_lightning import pipeline
from kd_lightning.acceleration import accelerate, frozen_teachers
from kd_lightning.errors import ConfigError
from kd_lightning.schemes import Offline


def student_module(make_cfg, *overrides: str) -> Offline:
    cfg = make_cfg(*overrides)
    datamodule = pipeline.construct(cfg.data)
    stage = pipeline.plan_stages(cfg)[-1]
    return pipeline.build_stage_module(pipeline.stage_config(cfg, stage), stage, datamodule,
                                       {"teacher": pipeline.build_model(cfg.teacher.model, datamodule)})


def conv_weights(network: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in network.parameters() if p.dim() == 4]


def test_channels_last_converts_both_networks_and_their_inputs_on_cuda_only(make_cfg):
    module = student_module(make_cfg, "distill=[at]")
    images = torch.randn(4, 1, 8, 8)
    module.eval()
    before = module.student(images), module.teacher(images)
    accelerate(module, torch.device("cpu"), OmegaConf.create({"channels_last": True}))
    assert all(w.is_contiguous() for net in (module.student, module.teacher) for w in conv_weights(net))

    seen = []
    module.student.register_forward_pre_hook(lambda _, args: seen.append(args[0]), prepend=False)
    # A CUDA device only decides the layout; the conversion itself runs on these CPU tensors.
    accelerate(module, torch.device("cuda"), OmegaConf.create({"channels_last": True}))
    for network in (module.student, module.teacher.model):
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(network))
    after = module.student(images), module.teacher(images)
    assert seen[-1].is_contiguous(memory_format=torch.channels_last)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before, after))


def test_cpu_losses_are_bit_equal_with_channels_last_on_and_off(make_cfg, recorded_losses):
    pipeline.run(make_cfg("channels_last=false"))
    off = dict(recorded_losses)
    recorded_losses.clear()
    pipeline.run(make_cfg("channels_last=true", "paths.cache_dir=${paths.output_dir}/other_cache"))
    assert recorded_losses == off and off


def student_losses(make_cfg, monkeypatch, *overrides: str) -> list[float]:
    """Per-step losses of one student fit (untrained teacher), without the teacher and baseline stages."""
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    monkeypatch.setattr("kd_lightning.trainer_setup.build_callbacks", lambda *args: [Record()])
    cfg = make_cfg("trainer.limit_train_batches=3", *overrides)
    torch.manual_seed(0)
    module = student_module(make_cfg, *overrides)
    pipeline.fit_and_test(cfg, module, pipeline.construct(cfg.data), "student", test=False)
    return losses


@pytest.mark.slow  # ~25 s of dynamo tracing on a CPU
def test_compile_applies_to_student_and_teacher_and_keeps_the_losses(make_cfg, monkeypatch):
    # The eager backend traces like inductor (dynamo, the taps' forward hooks included) but runs eager
    # kernels: no C++ build, so the test stays short on a CPU machine.
    eager = student_losses(make_cfg, monkeypatch, "distill=[at]")
    compiled = student_losses(make_cfg, monkeypatch, "distill=[at]", "compile.student=true",
                              "compile.teacher=true", "compile.backend=eager")
    assert len(eager) == 3 and compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


def test_compile_reaches_the_networks_it_names(make_cfg):
    module = student_module(make_cfg, "distill=[kd]")
    accelerate(module, torch.device("cpu"), OmegaConf.create({"compile": {"teacher": True, "backend": "eager"}}))
    assert module.teacher.model._compiled_call_impl is not None and module.student._compiled_call_impl is None
    assert frozen_teachers(module) == [module.teacher]
    with pytest.raises(ConfigError, match="compile has no option"):
        accelerate(module, torch.device("cpu"), OmegaConf.create({"compile": {"students": True}}))
