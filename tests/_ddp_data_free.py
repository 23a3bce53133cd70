"""Train a data-free scheme for a few steps as 2 DDP (gloo) processes and save what each rank ended with and the synthetic
batch it drew first; tests/test_scheme_data_free.py compares the ranks.

    python tests/_ddp_data_free.py SCHEME OUT     # SCHEME: dafl (one joint backward) or dfad (separate G and S steps)

Lightning's DDP launcher re-runs this script for rank 1, which reads its rank from LOCAL_RANK.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from kd_lightning.data import DigitsDataModule
from kd_lightning.losses.terms import KD
from kd_lightning.models import build_model
from kd_lightning.schemes import DAFL, DFAD

STEPS = 3


class RecordRank(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.first_batch, self.initial = out, None, None

    def on_train_start(self, trainer, module) -> None:
        self.initial = {key: value.detach().clone() for key, value in module.state_dict().items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.first_batch is None:
            self.first_batch = module._shown.detach().clone()

    def on_train_end(self, trainer, module) -> None:
        state = {key: value.detach().clone() for key, value in module.state_dict().items()}
        torch.save({"state_dict": state, "initial": self.initial, "first_batch": self.first_batch,
                    "global_step": trainer.global_step}, self.out / f"rank{trainer.global_rank}.pt")


SCHEMES = {"dafl": (DAFL, {}), "dfad": (DFAD, {"student_steps": 1})}


def main(scheme: str, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=8)
    cls, options = SCHEMES[scheme]
    module = cls(student=build_model("convnet_tiny", 10, 1), teacher=build_model("convnet_large", 10, 1),
                  terms={"kd": KD(weight=1.0, temperature=1.0)}, num_classes=10,
                  example_input=datamodule.example_input(), steps_per_epoch=STEPS, batch_size=8,
                  generator={"width": 4}, optimizer=lambda params: torch.optim.SGD(params, lr=0.05), **options)
    strategy = "ddp_find_unused_parameters_true" if scheme == "dfad" else "ddp"
    trainer = L.Trainer(accelerator="cpu", strategy=strategy, devices=2, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[RecordRank(out)])
    trainer.fit(module, datamodule=datamodule)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
