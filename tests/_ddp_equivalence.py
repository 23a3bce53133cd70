"""Train a scheme for a few steps either as 2 DDP (gloo) processes or as one process on the same global
batches, and save what each rank ended with; `train_both` runs both and the tests compare them.

    python tests/_ddp_equivalence.py SCHEME[,SCHEME...] ddp OUT       # 2 ranks × batch 16
    python tests/_ddp_equivalence.py SCHEME[,SCHEME...] single OUT    # 1 process, micro-batches of 16, 2 per step

SCHEME is a key of MODULES; several run one after another in the same processes (starting a process that imports
torch, Lightning and timm takes ~8 s, more than a scheme's four steps). Lightning's DDP launcher re-runs this
script once per extra rank, so it builds everything from scratch and reads its rank from LOCAL_RANK. One DDP step
averages the two ranks' gradients, each computed with its own BatchNorm batch statistics; gradient accumulation
over the same two micro-batches does exactly that in one process, so the two runs must agree up to float
summation order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from kd_lightning.data import DigitsDataModule, SyntheticDataModule
from kd_lightning.data.inputs import RoleInputs, attach_input
from kd_lightning.losses.terms import KD, FitNet, MiniLM, ViTKD
from kd_lightning.models import build_model
from kd_lightning.schemes import BYOT, DML, KDCL, MLKD, DeiT, MultiTeacher, Offline, TfKDReg
from scheme_cases import DEIT_DIGITS, VIT_DIGITS, VIT_DIGITS_LARGE

BATCH, STEPS, RANKS, SEED = 16, 4, 2, 0
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # per-rank BN statistics, by design
SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)


def model(name: str, in_channels: int = 1) -> torch.nn.Module:
    return build_model(name, num_classes=10, in_channels=in_channels)


def vit(options: dict) -> torch.nn.Module:
    return build_model(**options, num_classes=10, in_channels=1)


def kd_fitnet() -> dict:
    return {"kd": KD(weight=0.9, temperature=4.0), "fitnet": FitNet(weight=100.0)}


# Each builds the module from (the data module's example input); adapters and peers must be synchronised too.
MODULES: dict[str, Callable[[torch.Tensor], L.LightningModule]] = {
    "offline": lambda example: Offline(student=model("convnet_tiny"), teacher=model("convnet_large"), num_classes=10,
                                       example_input=example, terms=kd_fitnet(), ce_weight=0.1, optimizer=SGD),
    # Three teachers drawn at random per step, one FitNet adapter each.
    "multi_teacher": lambda example: MultiTeacher(
        student=model("convnet_tiny"), teachers=[model(n) for n in ("convnet_large", "convnet_small", "convnet_tiny")],
        num_classes=10, example_input=example, aggregation="random", selection_seed=SEED, terms=kd_fitnet(),
        ce_weight=0.1, optimizer=SGD),
    "dml": lambda example: DML([model("convnet_small"), model("convnet_tiny")], num_classes=10, optimizer=SGD),
    "kdcl": lambda example: KDCL([model("convnet_small"), model("convnet_tiny")], num_classes=10, rampup_epochs=0,
                                 optimizer=SGD),
    # Heads on every stage but the deepest: more parameters DDP must reduce.
    "byot": lambda example: BYOT(model("convnet_small"), num_classes=10, example_input=example, optimizer=SGD),
    "tf_kd_reg": lambda example: TfKDReg(model("convnet_tiny"), num_classes=10, optimizer=SGD),
    # Named inputs: the student reads a 4×4 view resized on the device, the teacher the 8×8 image.
    "offline_low_res": lambda example: Offline(
        student=attach_input(model("convnet_tiny"), "low"), teacher=attach_input(model("convnet_large"), "image"),
        num_classes=10, example_input=example, terms=kd_fitnet(), ce_weight=0.1, optimizer=SGD),
    # Attention probabilities (unfused attention), q/k/v relations across head counts, hidden relations.
    "minilm": lambda example: Offline(
        student=vit(VIT_DIGITS), teacher=vit(VIT_DIGITS_LARGE), num_classes=10, example_input=example,
        terms={"minilm": MiniLM(relations=["qq", "kk", "vv"], hidden_relation_weight=0.1)}, optimizer=SGD),
    # Aligners, mask token and generator are synchronised; its random masks differ between ranks and the
    # one-process run, so only the ranks are compared (NOT_COMPARED_TO_ONE_PROCESS).
    "vitkd": lambda example: Offline(student=vit(VIT_DIGITS), teacher=vit(VIT_DIGITS_LARGE), num_classes=10,
                                     example_input=example, terms={"vitkd": ViTKD()}, optimizer=SGD),
    # Cross-modal: the teacher reads the image, the student (an MLP) the paired feature vector.
    "offline_cross_modal": lambda example: Offline(
        student=attach_input(model("mlp_small", 32), "features"), teacher=attach_input(model("convnet_large"), "image"),
        num_classes=10, example_input=example, terms={"kd": KD(weight=0.9, temperature=4.0)}, ce_weight=0.1,
        optimizer=SGD),
    # Two views per sample, both networks on both. The strong view is an own draw without padding (so the same
    # pixels): an own crop comes from each process's random stream, which would make DDP differ from one process
    # by design; with pad 0 everything else in MLKD's two-view step must match it.
    "mlkd": lambda example: MLKD(
        student=attach_input(model("convnet_tiny"), "image"), teacher=attach_input(model("convnet_large"), "image"),
        terms={}, num_classes=10, example_input=example, inputs=RoleInputs(strong="strong"), optimizer=SGD),
    # Two heads, both trained: the class head by CE, the distillation head by the teacher's argmax.
    "deit": lambda example: DeiT(student=vit(DEIT_DIGITS), teacher=model("convnet_large"), terms={}, num_classes=10,
                                 example_input=example, optimizer=SGD),
}
NOT_COMPARED_TO_ONE_PROCESS = {"vitkd"}
# What the data module serves for a scheme of named inputs (`inputs.views`).
NAMED_VIEWS = {"offline_low_res": {"low": {"size": 4}}, "mlkd": {"strong": {"draw": "own", "pad": 0}}}


def rank_batches(dataset, rank: int) -> list[list[int]]:
    sampler = DistributedSampler(dataset, num_replicas=RANKS, rank=rank, shuffle=True, seed=SEED)
    sampler.set_epoch(0)
    order = list(sampler)
    return [order[start:start + BATCH] for start in range(0, BATCH * STEPS, BATCH)]


class RecordRank(L.Callback):
    def __init__(self, out: Path, mode: str, prefix: str = "") -> None:
        self.out, self.mode, self.prefix, self.losses = out, mode, prefix, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, module) -> None:
        state = {key: value.detach().clone() for key, value in module.state_dict().items()}
        torch.save({"state_dict": state, "losses": self.losses}, self.out / f"{self.prefix}{self.mode}-rank{trainer.global_rank}.pt")


def main(schemes: str, mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    for scheme in schemes.split(","):
        train_one(scheme, mode, out)


def train_one(scheme: str, mode: str, out: Path) -> None:
    L.seed_everything(SEED)
    datamodule = (SyntheticDataModule(num_classes=10, in_channels=1, image_size=8, train_size=256, batch_size=BATCH,
                                      paired_features=32)
                  if scheme == "offline_cross_modal" else DigitsDataModule(batch_size=BATCH))
    datamodule.setup("fit")
    if scheme in NAMED_VIEWS:
        datamodule.use_inputs(NAMED_VIEWS[scheme])
    module = MODULES[scheme](datamodule.example_input())
    if scheme in NAMED_VIEWS:  # the resize the data module does on the device when the trainer holds it
        module.on_after_batch_transfer = datamodule.on_after_batch_transfer
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
                        use_distributed_sampler=False, callbacks=[RecordRank(out, mode, f"{scheme}-")], **options)
    trainer.fit(module, train_dataloaders=loader)


def train_both(schemes: list[str], out: Path) -> dict[str, tuple[dict, dict, dict, list[str]]]:
    """scheme → (rank 0, rank 1, one process, the trained keys), after running this script once in each mode for
    all `schemes`. Both ranks must end with identical weights, and equal to the one-process run's but for the
    schemes in NOT_COMPARED_TO_ONE_PROCESS."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    for mode in ("ddp", "single"):
        result = subprocess.run([sys.executable, __file__, ",".join(schemes), mode, str(out)], cwd=out, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    results = {}
    for scheme in schemes:
        rank0, rank1, one_process = (torch.load(out / f"{scheme}-{name}.pt", weights_only=True)
                                     for name in ("ddp-rank0", "ddp-rank1", "single-rank0"))
        trained = [key for key in rank0["state_dict"] if not key.endswith(BUFFERS)]
        for key in trained:
            assert torch.equal(rank0["state_dict"][key], rank1["state_dict"][key]), f"{scheme}: ranks disagree on {key}"
            if scheme not in NOT_COMPARED_TO_ONE_PROCESS:
                torch.testing.assert_close(
                    rank0["state_dict"][key], one_process["state_dict"][key], rtol=1e-5, atol=1e-6,
                    msg=lambda text: f"{scheme} {key}: DDP and one process disagree. {text}")
        results[scheme] = (rank0, rank1, one_process, trained)
    return results


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
