"""Train KD + FitNet for a few steps either as 2 DDP (gloo) processes or as one process on the same global
batches, and save what each rank ended with; tests/test_ddp.py compares the two.

    python tests/_ddp_equivalence.py ddp OUT       # 2 ranks × batch 16
    python tests/_ddp_equivalence.py single OUT    # 1 process, micro-batches of 16, 2 per optimizer step

Lightning's DDP launcher re-runs this script once per extra rank, so it builds everything from scratch and
reads its rank from LOCAL_RANK. One DDP step averages the two ranks' gradients, each computed with its own
BatchNorm batch statistics; gradient accumulation over the same two micro-batches does exactly that in one
process, so the two runs must agree up to float summation order.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from kd_lightning.data import DigitsDataModule
from kd_lightning.losses.terms import KD, FitNet
from kd_lightning.models import build_model
from kd_lightning.schemes import Offline

BATCH, STEPS, RANKS, SEED = 16, 4, 2, 0


def rank_batches(dataset, rank: int) -> list[list[int]]:
    sampler = DistributedSampler(dataset, num_replicas=RANKS, rank=rank, shuffle=True, seed=SEED)
    sampler.set_epoch(0)
    order = list(sampler)
    return [order[start:start + BATCH] for start in range(0, BATCH * STEPS, BATCH)]


class RecordRank(L.Callback):
    def __init__(self, out: Path, mode: str) -> None:
        self.out, self.mode, self.losses = out, mode, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, module) -> None:
        state = {key: value.detach().clone() for key, value in module.state_dict().items()}
        torch.save({"state_dict": state, "losses": self.losses}, self.out / f"{self.mode}-rank{trainer.global_rank}.pt")


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(SEED)
    datamodule = DigitsDataModule(batch_size=BATCH)
    datamodule.setup("fit")
    teacher = build_model("convnet_large", num_classes=10, in_channels=1)
    student = build_model("convnet_tiny", num_classes=10, in_channels=1)
    module = Offline(student=student, teacher=teacher, num_classes=10, example_input=datamodule.example_input(),
                     terms={"kd": KD(weight=0.9, temperature=4.0), "fitnet": FitNet(weight=100.0)},
                     ce_weight=0.1, train_size=datamodule.train_size,
                     optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4))
    if mode == "ddp":
        batches = rank_batches(datamodule.train_set, int(os.environ.get("LOCAL_RANK", 0)))
        options = {"strategy": "ddp", "devices": RANKS}
    else:  # the ranks' batches in the order DDP consumes them together: rank 0's, rank 1's, next step, ...
        per_rank = [rank_batches(datamodule.train_set, rank) for rank in range(RANKS)]
        batches = [batch for step in zip(*per_rank) for batch in step]
        options = {"devices": 1, "accumulate_grad_batches": RANKS}
    loader = DataLoader(datamodule.train_set, batch_sampler=batches)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        use_distributed_sampler=False, callbacks=[RecordRank(out, mode)], **options)
    trainer.fit(module, train_dataloaders=loader)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
