"""Train DML (two peers of different architectures) for a few steps either as 2 DDP (gloo) processes or as
one process accumulating the same two micro-batches per step; tests/test_scheme_online.py compares them.

    python tests/_ddp_online.py ddp OUT       # 2 ranks × batch 16
    python tests/_ddp_online.py single OUT    # 1 process, micro-batches of 16, 2 per optimizer step
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ddp_equivalence import RANKS, SEED, RecordRank, rank_batches  # noqa: E402

from kd_lightning.data import DigitsDataModule  # noqa: E402
from kd_lightning.models import build_model  # noqa: E402
from kd_lightning.schemes import DML  # noqa: E402


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(SEED)
    datamodule = DigitsDataModule(batch_size=16)
    datamodule.setup("fit")
    peers = [build_model(name, num_classes=10, in_channels=1) for name in ("convnet_small", "convnet_tiny")]
    module = DML(peers, num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4))
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
