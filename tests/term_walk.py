"""What the walks of every term over a pair of networks share (tests/test_timm_terms.py: CNN↔ViT;
tests/test_cross_modal_terms.py: image↔feature vector): one training step, and the test-sized recipes."""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.pipeline import build_terms
from kd_lightning.schemes import Offline
from kd_lightning.teachers import FrozenTeacher

# CRD's negatives cut to the 16-image split.
SMALL_MEMORY = {"crd": ["distill.crd.nce_k=8"], "crd_queue": ["distill.crd_queue.queue_size=16"]}


def sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9)


def one_step(module, datamodule) -> torch.Tensor:
    """The total loss of one training step of `module` on `datamodule`."""
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    return trainer.callback_metrics["train/loss"]


def trains_or_is_refused(make_cfg, term_name: str, refusal: str | None, student: Callable, teacher: Callable,
                         datamodule) -> None:
    """Build `Offline` with term `term_name` between the networks `student()` and `teacher()` make: it must be
    refused at construction in one paragraph containing `refusal`, or (refusal None) train its init stage, if
    any, and a main step with finite losses."""
    terms = build_terms(make_cfg(f"distill=[{term_name}]", *SMALL_MEMORY.get(term_name, [])))
    try:
        module = Offline(student=student(), teacher=FrozenTeacher(teacher()), terms=terms, num_classes=10,
                         example_input=datamodule.example_input(), optimizer=sgd, train_size=datamodule.train_size,
                         train_targets=datamodule.train_targets, max_epochs=100)
    except ConfigError as error:
        assert refusal is not None, f"refused unexpectedly: {error}"
        assert refusal in str(error) and "\n" not in str(error).strip(), str(error)
        return
    assert refusal is None, "expected a refusal at construction"
    if any(term.init_epochs for term in module.terms.values()):
        module.set_init_stage(True)
        assert torch.isfinite(one_step(module, datamodule))
        module.set_init_stage(False)
    assert torch.isfinite(one_step(module, datamodule))
