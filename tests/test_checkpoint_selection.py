"""`test_weights=best`: the test, the exported network and `val/acc` are the best-validated checkpoint's."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.errors import ConfigError
from kd_lightning.pipeline import fit_and_test, run, stage_config, stage_recipe
from kd_lightning.stages import plan_stages
from kd_lightning.teachers import read_weights

BEST = ["test_weights=best", "callbacks=default", "~callbacks.last_checkpoint", "callbacks.progress_bar=null"]


class ScriptedValidation(L.LightningModule):
    """A weight that counts training steps (one per epoch), validated by a script: epoch 1 scores best."""

    SCRIPT = (0.2, 0.9, 0.5, 0.1)

    def __init__(self) -> None:
        super().__init__()
        self.steps_done = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            self.steps_done += 1
        return (self.steps_done * 0).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", self.SCRIPT[self.current_epoch])

    def test_step(self, batch, batch_idx):
        self.log("test/acc", self.steps_done.detach())  # which weights were tested, read off the test metric

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)


def test_the_best_validated_epoch_is_tested_and_reported_not_the_last(make_cfg):
    module = ScriptedValidation()
    cfg = make_cfg(*BEST, f"trainer.max_epochs={len(ScriptedValidation.SCRIPT)}", "trainer.limit_train_batches=1")
    datamodule = L.LightningDataModule.from_datasets(loader().dataset, loader().dataset, loader().dataset,
                                                     batch_size=1)
    metrics, _ = fit_and_test(cfg, module, datamodule, "student")
    # Epoch 1 (its second step) validated best: those weights, not the fourth step's, are tested and kept.
    assert metrics["test/acc"] == 2.0 and float(module.steps_done) == 2.0
    assert metrics["val/acc"] == pytest.approx(0.9)
    last, _ = fit_and_test(make_cfg(*BEST[1:], "trainer.max_epochs=4", "trainer.limit_train_batches=1"),
                           ScriptedValidation(), datamodule, "last")
    assert last["test/acc"] == 4.0 and last["val/acc"] == pytest.approx(0.1)


def test_the_exported_student_is_the_best_checkpoint_of_a_real_run(make_cfg, tmp_path):
    # Every epoch's checkpoint kept (save_top_k=-1): Lightning 2.6 rewrites a monitored checkpoint's last.ckpt only
    # when the top k improved, so the final weights are read off the last epoch's own file.
    results = run(make_cfg("baseline=false", "trainer.max_epochs=4", "optimizer.lr=1.0", *BEST,
                           "+callbacks.model_checkpoint.save_top_k=-1"))
    epochs = sorted((tmp_path / "out" / "student" / "checkpoints").glob("epoch*.ckpt"))
    score = {path: float(path.stem.rsplit("val_acc", 1)[1]) for path in epochs}
    best = max(epochs, key=score.get)  # the first of tied epochs, as ModelCheckpoint ranks (strict improvement)
    chosen, _ = read_weights(best)
    exported, _ = read_weights(tmp_path / "out" / "student.pt")
    assert chosen.keys() == exported.keys() and all(torch.equal(chosen[k], exported[k]) for k in chosen)
    final, _ = read_weights(epochs[-1])
    assert best != epochs[-1] and not all(torch.equal(final[k], exported[k]) for k in final)  # guards: not last
    assert results["student_metrics"]["val/acc"] == pytest.approx(score[best], abs=1e-4)
    assert results["student_metrics"]["val/acc"] == pytest.approx(results["student_metrics"]["val/acc_best"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["test_weights=final"], "not one of"),
    (["test_weights=best", "callbacks=none"], "callbacks=default"),
    (["test_weights=best", "callbacks=default", "data=fashion_mnist"], "data.val_fraction=0.1"),
    (["test_weights=best", "callbacks=ema", "+callbacks.best={_target_: lightning.pytorch.callbacks.ModelCheckpoint,"
      " monitor: val/acc, mode: max}"], "weight-averaging"),
])
def test_a_test_weights_choice_that_cannot_be_honoured_is_refused_before_training(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(make_cfg(*overrides))


def teacher_key(cfg) -> dict:
    teacher = plan_stages(cfg)[0]
    return stage_recipe(stage_config(cfg, teacher), teacher, {})


def test_weight_choices_enter_the_cache_key_and_plain_callbacks_do_not(make_cfg):
    plain = teacher_key(make_cfg())  # FAST: callbacks=none
    assert teacher_key(make_cfg("callbacks=default")) == plain  # checkpoints and bars do not change the weights
    assert teacher_key(make_cfg(*BEST)) == {**plain, "test_weights": "best"}
    averaged = teacher_key(make_cfg("callbacks=ema"))
    assert averaged["weight_averaging"]["ema_weights"]["decay"] == 0.999
    assert {k: v for k, v in averaged.items() if k != "weight_averaging"} == plain
