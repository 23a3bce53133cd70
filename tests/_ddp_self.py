"""Train a self-distillation scheme for a few steps as 2 DDP (gloo) ranks and save what each rank ended with
(tests/test_scheme_self.py compares them).   python tests/_ddp_self.py {cs_kd|mean_teacher} OUT
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch

from kd_lightning.data import DigitsDataModule
from kd_lightning.losses.terms import Consistency
from kd_lightning.models import build_model
from kd_lightning.schemes import CSKD, MeanTeacher


class RecordRank(L.Callback):
    def __init__(self, out: Path, scheme: str) -> None:
        self.out, self.scheme, self.anchors = out, scheme, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.anchors.extend(batch[2][: len(batch[2]) // 2].tolist())

    def on_train_end(self, trainer, module) -> None:
        state = {key: value.detach().clone() for key, value in module.state_dict().items()}
        ema = module.ema.state_dict() if self.scheme == "mean_teacher" else {}
        torch.save({"state_dict": state, "ema": ema, "anchors": self.anchors},
                   self.out / f"{self.scheme}-rank{trainer.global_rank}.pt")


def main(scheme: str, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=16)
    student = build_model("convnet_tiny", num_classes=10, in_channels=1)
    optimizer = partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    if scheme == "cs_kd":
        module = CSKD(student, num_classes=10, optimizer=optimizer)
    else:
        # The consistency head and the train-mode EMA forward run here too, so the ranks must agree on them.
        module = MeanTeacher(student, {"consistency": Consistency(rampup_epochs=0)}, num_classes=10,
                             example_input=datamodule.example_input(), ema_decay=0.9, logit_distance_cost=0.01,
                             optimizer=optimizer)
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, limit_train_batches=4,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[RecordRank(out, scheme)])
    trainer.fit(module, datamodule=datamodule)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
