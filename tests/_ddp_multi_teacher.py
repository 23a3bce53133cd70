"""tests/_ddp_equivalence.py for MultiTeacher: three teachers drawn at random per step, KD + one FitNet
adapter per teacher, 2 DDP (gloo) ranks against one process accumulating the same micro-batches.

    python tests/_ddp_multi_teacher.py ddp OUT | single OUT
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from _ddp_equivalence import RANKS, SEED, RecordRank, rank_batches
from kd_lightning.data import DigitsDataModule
from kd_lightning.losses.terms import KD, FitNet
from kd_lightning.models import build_model
from kd_lightning.schemes import MultiTeacher


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(SEED)
    datamodule = DigitsDataModule(batch_size=16)
    datamodule.setup("fit")
    teachers = [build_model(name, num_classes=10, in_channels=1)
                for name in ("convnet_large", "convnet_small", "convnet_tiny")]
    module = MultiTeacher(student=build_model("convnet_tiny", 10, 1), teachers=teachers, num_classes=10,
                          example_input=datamodule.example_input(), aggregation="random", selection_seed=SEED,
                          terms={"kd": KD(weight=0.9, temperature=4.0), "fitnet": FitNet(weight=100.0)}, ce_weight=0.1,
                          optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4))
    if mode == "ddp":
        batches = rank_batches(datamodule.train_set, int(os.environ.get("LOCAL_RANK", 0)))
        options = {"strategy": "ddp", "devices": RANKS}
    else:
        per_rank = [rank_batches(datamodule.train_set, rank) for rank in range(RANKS)]
        batches = [batch for step in zip(*per_rank) for batch in step]
        options = {"devices": 1, "accumulate_grad_batches": RANKS}
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        use_distributed_sampler=False, callbacks=[RecordRank(out, mode)], **options)
    trainer.fit(module, train_dataloaders=DataLoader(datamodule.train_set, batch_sampler=batches))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
