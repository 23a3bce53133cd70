"""Train the adversarial scheme for a few steps as 2 DDP (gloo) CPU processes and save what each rank ended with.

    python tests/_ddp_adversarial.py STRATEGY OUT

Each rank reads its own shard (different batches), so ranks end identical only if every optimizer's
gradients — the discriminator's as well as the student's — are averaged across them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from _ddp_equivalence import BATCH, RANKS, SEED, SGD, RecordRank, model, rank_batches
from torch.utils.data import DataLoader

from kd_lightning.data import DigitsDataModule
from kd_lightning.losses.terms import KD
from kd_lightning.schemes import Adversarial

DISCRIMINATOR = {"_target_": "torch.optim.Adam", "lr": 1e-2}


def build(example: torch.Tensor) -> Adversarial:
    L.seed_everything(SEED)
    return Adversarial(student=model("convnet_tiny"), teacher=model("convnet_large"), num_classes=10,
                       example_input=example, terms={"kd": KD(weight=0.9, temperature=4.0)}, ce_weight=0.1,
                       optimizer=SGD, discriminator_optimizer=DISCRIMINATOR, discriminator_steps=2)


def main(strategy: str, out: Path) -> None:
    torch.set_num_threads(1)
    datamodule = DigitsDataModule(batch_size=BATCH)
    datamodule.setup("fit")
    module = build(datamodule.example_input())
    loader = DataLoader(datamodule.train_set,
                        batch_sampler=rank_batches(datamodule.train_set, int(os.environ.get("LOCAL_RANK", 0))))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        use_distributed_sampler=False, callbacks=[RecordRank(out, "ddp")], strategy=strategy,
                        devices=RANKS)
    trainer.fit(module, train_dataloaders=loader)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
