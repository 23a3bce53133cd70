"""Every catalogue term between a CNN and a ViT, both ways: it trains a step with a finite loss, or it is
refused with a ConfigError when the scheme is built (never a traceback in the middle of training)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning.data import SyntheticDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.models import build_model
from kd_lightning.pipeline import build_terms
from kd_lightning.schemes import Offline
from kd_lightning.teachers import FrozenTeacher

CONF = Path(__file__).resolve().parents[1] / "conf"
TERMS = sorted(path.stem for path in (CONF / "distill").glob("*.yaml"))
# conf/student/vit_digits.yaml, one block fewer: the walk is about shapes, not capacity.
VIT = {"name": "timm:vit_tiny_patch16_224", "img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2,
       "num_heads": 2}
# The only refusals, with what their messages must say: FSP's Gram matrices need equal widths on both sides
# (its own rule, as between CNNs), OFD's margin needs a teacher BatchNorm before a ReLU, which a ViT has not.
REFUSED = {("fsp", "cnn_teacher_vit_student"): "equal channel counts",
           ("fsp", "vit_teacher_cnn_student"): "equal channel counts",
           ("ofd", "vit_teacher_cnn_student"): "vision-transformer teacher"}
# CRD's negatives cut to the 16-image split.
SMALL_MEMORY = {"crd": ["distill.crd.nce_k=8"], "crd_queue": ["distill.crd_queue.queue_size=16"]}
PAIRS = {"cnn_teacher_vit_student": ("convnet_large", VIT), "vit_teacher_cnn_student": (VIT, "convnet_small")}


def network(spec) -> torch.nn.Module:
    if isinstance(spec, str):
        return build_model(spec, num_classes=10, in_channels=1)
    return build_model(num_classes=10, in_channels=1, **spec)


def sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9)


def one_step(module, datamodule) -> torch.Tensor:
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    return trainer.callback_metrics["train/loss"]


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("term_name", TERMS)
def test_term_trains_between_cnn_and_vit_or_is_refused_up_front(make_cfg, term_name, pair):
    torch.manual_seed(0)
    datamodule = SyntheticDataModule(num_classes=10, in_channels=1, image_size=8, train_size=16, val_size=8,
                                     test_size=8, batch_size=8)
    teacher_spec, student_spec = PAIRS[pair]
    terms = build_terms(make_cfg(f"distill=[{term_name}]", *SMALL_MEMORY.get(term_name, [])))
    try:
        module = Offline(student=network(student_spec), teacher=FrozenTeacher(network(teacher_spec)), terms=terms,
                         num_classes=10, example_input=datamodule.example_input(), optimizer=sgd,
                         train_size=datamodule.train_size, train_targets=datamodule.train_targets,
                         max_epochs=100)
    except ConfigError as error:
        assert (term_name, pair) in REFUSED, f"refused unexpectedly: {error}"
        assert REFUSED[term_name, pair] in str(error) and "\n" not in str(error).strip(), "one paragraph, the reason"
        return
    assert (term_name, pair) not in REFUSED, "expected a refusal at construction"
    if any(term.init_epochs for term in module.terms.values()):
        module.set_init_stage(True)
        assert torch.isfinite(one_step(module, datamodule))
        module.set_init_stage(False)
    assert torch.isfinite(one_step(module, datamodule))
