"""What the walks of every term over a pair of networks share (tests/test_timm_terms.py: CNN↔ViT;
tests/test_cross_modal_terms.py: image↔feature vector): one training step, and the test-sized recipes."""

from __future__ import annotations

import lightning as L
import torch

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
