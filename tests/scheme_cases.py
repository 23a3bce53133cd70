"""The overrides every scheme is exercised under by the tests that walk all schemes (resume, precision,
the frozen-teacher contract). A new `conf/scheme/<name>.yaml` needs an entry here, which
tests/test_schemes.py checks."""

from __future__ import annotations

from pathlib import Path


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TERMS = sorted(path.stem for path in (CONF_DIR / "distill").glob("*.yaml"))
# Terms that read transformer blocks (and refuse CNNs): walked with the digits ViT pair.
TRANSFORMER_TERMS = ("minilm", "minivit", "vitkd")
TRANSFORMER_PAIR = ["student=vit_digits", "teacher=vit_digits_large"]
# The networks of conf/student/vit_digits.yaml and conf/teacher/vit_digits_large.yaml, for tests that build
# models directly: `build_model(**VIT_DIGITS, num_classes=10, in_channels=1)`.
_DIGITS_VIT = {"name": "timm:vit_tiny_patch16_224", "img_size": 8, "patch_size": 2}
VIT_DIGITS = {**_DIGITS_VIT, "embed_dim": 32, "depth": 3, "num_heads": 2}
VIT_DIGITS_LARGE = {**_DIGITS_VIT, "embed_dim": 64, "depth": 4, "num_heads": 4}
DEIT_DIGITS = {**VIT_DIGITS, "name": "timm:deit_tiny_distilled_patch16_224"}  # conf/student/deit_digits.yaml
# Recipes cut to the tests' size: init stages of one epoch, warm-ups that end within two epochs, CRD with
# 64 negatives instead of 16384, FSP between networks of equal widths.
TERM_OVERRIDES = {
    "ab": ["distill.ab.init_epochs=1"], "ft": ["distill.ft.init_epochs=1"],
    "fsp": ["distill.fsp.init_epochs=1", "student=convnet_large"],
    "dkd": ["distill.dkd.warmup_epochs=2"], "dkd_ls": ["distill.dkd_ls.warmup_epochs=2"],
    "reviewkd": ["distill.reviewkd.warmup_epochs=2"], "crd": ["distill.crd.nce_k=64"],
    **{term: TRANSFORMER_PAIR for term in TRANSFORMER_TERMS},
}
DATA_FREE = ["scheme.batch_size=16", "scheme.generator.width=8"]
POOL = ["scheme.steps_per_epoch=4", "scheme.steps_per_round=3", "scheme.batch_size=8", "scheme.pool_size=20",
        "scheme.student_crop_padding=1", "scheme.synthesis.batch_size=8"]
# scheme → the override lists it is run under (the first is the one the cheaper walks use).
SCHEME_CASES: dict[str, list[list[str]]] = {
    "supervised": [["distill=[]"]],
    "offline": [[f"distill=[{term}]", *TERM_OVERRIDES.get(term, [])] for term in TERMS],
    "multi_teacher": [["distill=[kd,fitnet]", "scheme.ce_weight=0.1", f"scheme.aggregation={aggregation}"]
                      for aggregation in ("average", "confidence", "random")],
    "takd": [["distill=[kd]"]],
    "born_again": [["distill=[kd]", "plan.generations=2"]],
    "dml": [["scheme.peers=[convnet_small,convnet_tiny]"]],
    "kdcl": [["scheme.rampup_epochs=1"]],
    "byot": [[]], "cs_kd": [[]], "tf_kd_reg": [[]], "tf_kd_self": [[]], "mean_teacher": [[]],
    # Two discriminator steps per student step, a step-interval schedule: both must resume exactly.
    "adversarial": [["distill=[kd]", "scheme.discriminator_steps=2", "+scheme.scheduler_interval=step"]],
    # Data-free: small generators and batches; generator rounds short enough that a resume lands inside one.
    # DFAD with its generator's class priors on (ZSKT runs without: both generator losses resume exactly);
    # ZSKT with a replay pool small enough to wrap before the resume point.
    "dafl": [DATA_FREE], "dfad": [[*DATA_FREE, "scheme.student_steps=2", "scheme.class_priors.one_hot=1",
                                   "scheme.class_priors.information_entropy=5"]],
    "zskt": [[*DATA_FREE, "scheme.student_steps=2", "scheme.replay.capacity=6", "scheme.replay.push_every_n_steps=1",
              "scheme.replay.push_images=4", "scheme.replay.batch_size=3"]], "datafree_noise": [["scheme.batch_size=16"]],
    # Pool schemes: a synthesis round at steps 0, 3, 6 (one at the resume point), a pool that wraps, every
    # synthesis part switched on.
    "deep_inversion": [[*POOL, "scheme.synthesis.iterations=3", "scheme.synthesis.adi_weight=1.0",
                        "scheme.synthesis.tv_l1=1e-3", "scheme.synthesis.l2=1e-4", "scheme.synthesis.flip=true",
                        "scheme.normalize_mean=[0.5]", "scheme.normalize_std=[0.25]"]],
    "fast_datafree": [[*POOL, "scheme.generator.latent_dim=8", "scheme.generator.width=4", "scheme.synthesis.steps=2",
                       "scheme.synthesis.warmup_rounds=1", "scheme.synthesis.crop_padding=1"]],
    # Its weak view and its own strong view of every sample (conf/scheme/mlkd.yaml).
    "mlkd": [[]],
    # Pre-training without labels, then fine-tuning the same network from it (the resumed stage).
    "supervision_transfer": [[]],
    # The distilled digits ViT (class and distillation heads) from the default CNN teacher, on mixed batches.
    "deit": [["student=deit_digits", "data.mixup_alpha=0.8", "data.cutmix_alpha=1.0"]],
}
# Named inputs (kd_lightning/data/inputs.py), one case per kind of input, walked beside the cases above: a student
# on a view resized on the device (cross-resolution), a student on another modality (cross-modal), the mean
# teacher's independent view and KDCL's per-peer distortion (views with their own draws, which a resume must
# replay).
# (Both read views of their own by default; augmented digits make those draws differ from the student's.)
NAMED_INPUT_CASES: list[tuple[str, list[str]]] = [
    ("offline", ["distill=[kd]", "+inputs.views.low={size:4}", "inputs.student=low"]),
    # Cross-modal: a CNN teacher on the image, an MLP student on a paired feature vector of the same sample.
    ("offline", ["distill=[kd,supervision_transfer]", "scheme.ce_weight=0.1", "data=synthetic", "data.num_classes=10",
                 "data.in_channels=1", "data.image_size=8", "data.train_size=64", "data.batch_size=16",
                 "data.paired_features=32", "inputs.student=features", "student=mlp_small"]),
    ("mean_teacher", ["data.augment=true"]),
    ("kdcl", ["scheme.rampup_epochs=1", "data.augment=true"]),
]
