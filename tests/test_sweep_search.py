"""The project's Optuna sweeper: search space, storages, samplers and pruners by name, pruning inside a trial,
orphaned trials of a killed sweep, and the refusals of bad search settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.errors import ConfigError
from kd_lightning.sweeps.checks import check_sweep
from kd_lightning.sweeps.pruned import TrialStopped
from kd_lightning.sweeps.pruning import ReportToTrial
from kd_lightning.sweeps.search import OWNER_ATTR, ask, requeue_orphans, search_space, write_results
from kd_lightning.sweeps.study import build_pruner, build_sampler, open_storage

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")


def search_cfg(tmp_path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=kd_optuna", *overrides], return_hydra_config=True)
    with open_dict(cfg):  # what Hydra fills in at run time
        cfg.hydra.sweep.dir = str(tmp_path / "sweep")
        cfg.hydra.runtime.choices = {}
    return cfg


# --- the search space ---------------------------------------------------------------------------------------
def test_search_space_reads_hydra_sweeps_as_optuna_distributions_and_the_command_line_wins():
    params = OmegaConf.create({"optimizer.lr": "tag(log, interval(0.005, 0.2))", "distill.kd.weight": "interval(0.1, 1.0)",
                               "trainer.max_epochs": "int(interval(2, 8))", "student": "choice(convnet_tiny, resnet8)",
                               "seed": "range(1, 4)"})
    distributions, fixed = search_space(params, ["distill.kd.weight=0.5", "distill.kd.temperature=interval(1.0, 8.0)"])
    assert distributions == {"optimizer.lr": FloatDistribution(0.005, 0.2, log=True),
                             "trainer.max_epochs": IntDistribution(2, 8),
                             "student": CategoricalDistribution(["convnet_tiny", "resnet8"]),
                             "seed": IntDistribution(1, 3),  # Hydra's range excludes its stop
                             "distill.kd.temperature": FloatDistribution(1.0, 8.0)}
    assert fixed == {"distill.kd.weight": "0.5"}


# --- storages: SQLite and a journal file, reached from other processes --------------------------------------
REPORT_FROM_ANOTHER_PROCESS = """
import sys
from kd_lightning.sweeps.study import load_study, open_storage, trial_of
study = load_study(open_storage(sys.argv[1]), "s")
trial = trial_of(study, int(sys.argv[2]))
trial.report(float(sys.argv[2]), step=0)
"""


@pytest.mark.parametrize("scheme", ["sqlite:///", "journal:///"])
def test_trials_report_to_the_study_from_their_own_processes(tmp_path, scheme):
    url = f"{scheme}{tmp_path}/study/optuna.{'db' if scheme.startswith('sqlite') else 'log'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    trials = [study.ask() for _ in range(3)]
    workers = [subprocess.Popen([sys.executable, "-c", REPORT_FROM_ANOTHER_PROCESS, url, str(trial.number)])
               for trial in trials]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0, 0]
    reloaded = optuna.load_study(study_name="s", storage=open_storage(url))
    assert [t.intermediate_values for t in reloaded.trials] == [{0: float(t.number)} for t in trials]


@pytest.mark.parametrize("url", ["postgresql://kd:kd@127.0.0.1:1/kd", "nosuchdb://somewhere/study"])
def test_a_storage_that_cannot_be_opened_is_refused_naming_the_forms_that_work(url):
    with pytest.raises(ConfigError, match=r"cannot be opened.*sqlite:///.*journal:///.*postgresql://"):
        open_storage(url)


# --- samplers and pruners by name ---------------------------------------------------------------------------
def test_samplers_and_pruners_are_built_by_name_with_their_options():
    assert isinstance(build_sampler({"name": "tpe", "seed": 1, "n_startup_trials": 3}), optuna.samplers.TPESampler)
    assert isinstance(build_sampler({"name": "nsgaii", "seed": 1}), optuna.samplers.NSGAIISampler)
    assert isinstance(build_pruner({"name": "median", "n_warmup_steps": 2}), optuna.pruners.MedianPruner)
    assert isinstance(build_pruner({"name": "successive_halving"}), optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(build_pruner({"name": "hyperband", "max_resource": 8}), optuna.pruners.HyperbandPruner)
    assert isinstance(build_pruner(None), optuna.pruners.NopPruner)


@pytest.mark.parametrize("overrides, message", [
    (["hydra.sweeper.sampler.name=tpee"], r"sampler.name=tpee is not an Optuna sampler.*closest is tpe"),
    (["hydra.sweeper.pruner.name=medain"], r"pruner.name=medain is not an Optuna pruner.*closest is median"),
    (["hydra.sweeper.pruner.name=median", "+hydra.sweeper.pruner.warmup=2"], r"sets warmup, which .*MedianPruner"),
    (["hydra.sweeper.pruner.name=median", "optimized_metric=train/loss"], r"train/loss is not logged at the end of "
                                                                          r"every validation epoch"),
    (["hydra.sweeper.pruner.name=hyperband", "trainer.limit_val_batches=0"], r"limit_val_batches=0"),
    (["+second_objective=student/latency", "hydra.sweeper.direction=[maximize,minimize]"],
     r"second_objective=student/latency is not an objective.*student/params, student/flops"),
    (["+second_objective=student/params"], r"2 objective\(s\).*1 direction"),
    (["+second_objective=student/params", "hydra.sweeper.direction=[maximize,minimize]",
      "hydra.sweeper.pruner.name=median"], r"prunes single-objective studies only"),
    (["hydra.sweeper.storage=nosuchdb://x/y"], r"storage=nosuchdb://x/y cannot be opened"),
    (["hydra.sweeper.direction=maximise"], r"direction names \['maximise'\]; each direction is maximize or minimize"),
])
def test_bad_search_settings_are_refused_before_the_first_trial(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_sweep(search_cfg(tmp_path, "data.val_fraction=0.1", *overrides))


def test_a_sweep_optuna_cannot_sample_is_refused_with_the_kinds_it_can(tmp_path):
    cfg = search_cfg(tmp_path, "data.val_fraction=0.1")
    with open_dict(cfg):
        cfg.hydra.sweeper.params["student"] = "glob(resnet*)"
    with pytest.raises(ConfigError, match=r"student=glob\(resnet\*\) is a sweep Optuna cannot sample.*interval"):
        check_sweep(cfg)


def test_good_search_settings_pass_without_creating_the_study_storage(tmp_path):
    check_sweep(search_cfg(tmp_path, "data.val_fraction=0.1", "hydra.sweeper.pruner.name=median",
                           f"hydra.sweeper.storage=journal:///{tmp_path}/shared/study.log"))
    assert not (tmp_path / "shared").exists()


def test_a_file_storage_where_no_directory_can_be_made_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"a_file is not a directory this user can write"):
        check_sweep(search_cfg(tmp_path, "data.val_fraction=0.1",
                               f"hydra.sweeper.storage=journal:///{tmp_path}/a_file/study.log"))


def test_kd_train_refuses_an_unknown_pruner_in_one_paragraph(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kd_lightning.train", "hparams_search=kd_optuna",
                             "hydra.sweeper.pruner.name=asha", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "kd-train: error: hydra.sweeper.pruner.name=asha is not an Optuna pruner" in result.stderr
    assert "Traceback" not in result.stderr


# --- pruning inside a trial ---------------------------------------------------------------------------------
class FixedAccuracy(L.LightningModule):
    """Logs a given val/acc per epoch, as the schemes do at the end of each validation epoch."""

    def __init__(self, accuracies: list[float]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.accuracies = accuracies

    def training_step(self, batch, index):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, index):
        self.log("val/acc", self.accuracies[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)

    val_dataloader = train_dataloader


def fit(callback: ReportToTrial, accuracies: list[float]) -> None:
    trainer = L.Trainer(max_epochs=len(accuracies), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(FixedAccuracy(accuracies))


def test_a_trial_reports_every_epoch_and_stops_when_the_median_pruner_says_so(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    pruner = {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1}
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize",
                                pruner=build_pruner(pruner))
    for _ in range(2):  # finished trials at 0.9 every epoch set the median
        trial = study.ask()
        for epoch in range(4):
            trial.report(0.9, step=epoch)
        study.tell(trial, 0.9)
    good, bad = study.ask(), study.ask()
    fit(ReportToTrial(url, "s", good.number, "val/acc", pruner), [0.5, 0.95, 0.95, 0.95])
    with pytest.raises(TrialStopped) as stopped:
        fit(ReportToTrial(url, "s", bad.number, "val/acc", pruner), [0.5, 0.5, 0.5, 0.5])
    assert (stopped.value.pruned.trial, stopped.value.pruned.epoch) == (bad.number, 1)  # epoch 0 is the warm-up
    trials = optuna.load_study(study_name="s", storage=open_storage(url)).trials
    assert trials[good.number].intermediate_values == pytest.approx({0: 0.5, 1: 0.95, 2: 0.95, 3: 0.95})
    assert trials[bad.number].intermediate_values == {0: 0.5, 1: 0.5}


def test_a_metric_the_validation_epoch_does_not_log_stops_the_trial_with_the_logged_ones_named(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    with pytest.raises(ConfigError, match=r"val/acc_ema .* logged only \['val/acc'\]"):
        fit(ReportToTrial(url, "s", study.ask().number, "val/acc_ema", {"name": "median"}), [0.5, 0.5])


# --- a killed sweep's trials ----------------------------------------------------------------------------------
def test_trials_left_running_by_a_dead_sweeper_on_this_host_are_failed_and_asked_again(tmp_path):
    import socket

    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan, foreign, alive = (study.ask({"x": FloatDistribution(0, 1)}) for _ in range(3))
    orphan.set_user_attr(OWNER_ATTR, f"{socket.gethostname()}:{dead.pid}")
    foreign.set_user_attr(OWNER_ATTR, f"another-node:{dead.pid}")  # may still run there: left alone
    alive.set_user_attr(OWNER_ATTR, f"{socket.gethostname()}:{__import__('os').getpid()}")
    requeue_orphans(study, "this-sweeper:1")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING, TrialState.WAITING]
    again = ask(study, {"x": FloatDistribution(0, 1)}, "this-sweeper:1")
    assert again.params == orphan.params and again.user_attrs[OWNER_ATTR] == "this-sweeper:1"


def test_a_trial_carries_its_sweeper_from_the_moment_it_runs_and_leaves_no_waiting_trial(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/optuna.db"), direction="maximize")
    trials = [ask(study, {"x": FloatDistribution(0, 1)}, "host:1") for _ in range(3)]
    assert len({t.params["x"] for t in trials}) == 3  # the sampler still draws every parameter
    stored = study.get_trials(deepcopy=False)
    assert [(t.state, t.user_attrs[OWNER_ATTR]) for t in stored] == [(TrialState.RUNNING, "host:1")] * 3


def test_a_continued_seeded_study_asks_new_points_and_the_same_ones_when_repeated(tmp_path):
    from kd_lightning.sweeps.search import OptunaSearch

    space = {"x": FloatDistribution(0, 1)}

    def run(storage: str, trials: int) -> list[float]:
        study = OptunaSearch(sampler={"name": "random", "seed": 7}, storage=storage).open_study()
        points = [study.ask(space) for _ in range(trials)]
        for point in points:
            study.tell(point, point.params["x"])
        return [point.params["x"] for point in points]

    first, second = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    started, continued = run(first, 2), run(first, 2)
    assert not set(started) & set(continued)  # the rerun does not replay the first run's draws
    assert run(second, 2) + run(second, 2) == started + continued  # and the whole sequence is reproducible


def test_results_file_holds_the_best_trial_or_the_pareto_front(tmp_path):
    single = optuna.create_study(direction="maximize")
    for value in (0.2, 0.7, 0.5):
        trial = single.ask({"x": FloatDistribution(0, 1)})
        single.tell(trial, value)
    write_results(single, tmp_path)
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert (results.best_value, results.best_trial) == (0.7, 1)
    pareto = optuna.create_study(directions=["maximize", "minimize"])
    for values in ((0.9, 100.0), (0.8, 50.0), (0.7, 80.0)):  # the last is dominated by the second
        pareto.tell(pareto.ask({"x": FloatDistribution(0, 1)}), list(values))
    write_results(pareto, tmp_path)
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert sorted(s.trial for s in results.solutions) == [0, 1] and "best_params" not in results
    assert json.loads(json.dumps(OmegaConf.to_container(results)))["directions"] == ["maximize", "minimize"]


# --- real searches: trials in two worker processes sharing one journal-file study ----------------------------
TINY = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
        "callbacks=none", "logger=none", "teacher.model.name=convnet_tiny", "torch_threads=1"]


def kd_train(tmp_path, *args: str, **popen) -> subprocess.Popen:
    env = {**__import__("os").environ, "KD_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, "-m", "kd_lightning.train", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def journal_study(path: Path) -> optuna.Study:
    return optuna.load_study(study_name="kd_optuna", storage=open_storage(f"journal:///{path}"))


@pytest.mark.slow
def test_parallel_trials_are_pruned_through_a_journal_study_and_reported_as_pruned(tmp_path):
    sweep, journal = tmp_path / "sweep", tmp_path / "shared" / "study.log"
    study = optuna.create_study(study_name="kd_optuna", storage=open_storage(f"journal:///{journal}"),
                                direction="maximize")
    for _ in range(2):  # two earlier trials that reached val/acc=1.0 after epoch 1: the median every new trial trails
        study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={1: 1.0}, params={},
                                                  distributions={}))
    search = ["hparams_search=kd_optuna", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
              "hydra.sweeper.n_jobs=2", f"hydra.sweeper.storage=journal:///{journal}", f"hydra.sweep.dir={sweep}",
              "data.val_fraction=0.1", *TINY]
    pruned = kd_train(tmp_path, *search, "hydra.sweeper.n_trials=4", "trainer.max_epochs=3",
                      "hydra.sweeper.pruner.name=median", "+hydra.sweeper.pruner.n_startup_trials=2")
    output = pruned.communicate(timeout=900)[0]
    assert pruned.returncode == 0, output
    trials = journal_study(journal).trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4, 5]  # distinct, none lost
    assert [t.state for t in trials[2:]] == [TrialState.PRUNED] * 4
    for trial in trials[2:]:  # stopped after epoch 1 of 3, in its own job directory, recorded as pruned
        assert sorted(trial.intermediate_values) == [0, 1]
        job = sweep / str(trial.number)
        record = json.loads((job / "pruned.json").read_text())
        assert (record["pruned"]["trial"], record["pruned"]["epoch"]) == (trial.number, 1)
        assert not (job / "results.json").exists() and not (job / "error.json").exists()
    # The same study continued without a pruner: its trial completes and kd-report lists both kinds.
    finished = kd_train(tmp_path, *search, "hydra.sweeper.n_trials=1", "trainer.max_epochs=1")
    output = finished.communicate(timeout=600)[0]
    assert finished.returncode == 0, output
    assert journal_study(journal).trials[6].state == TrialState.COMPLETE
    report = subprocess.run([sys.executable, "-m", "kd_lightning.sweeps.report", str(sweep), "--no-wandb"],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "1 results (1 rows), 0 failed jobs, 4 pruned trials." in report.stdout
    assert "## Pruned trials" in report.stdout and "## Failed jobs" not in report.stdout


@pytest.mark.slow
def test_a_killed_parallel_search_resumes_and_asks_its_lost_trials_again(tmp_path):
    import os
    import signal
    import time

    sweep, journal = tmp_path / "sweep", tmp_path / "shared" / "study.log"
    search = ["hparams_search=kd_optuna", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
              "hydra.sweeper.n_jobs=2", f"hydra.sweeper.storage=journal:///{journal}", f"hydra.sweep.dir={sweep}",
              "data.val_fraction=0.1", "trainer.max_epochs=1", *TINY]
    first = kd_train(tmp_path, *search, "hydra.sweeper.n_trials=4", start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill the sweeper and its workers while two trials run
        if journal.is_file() and len(journal_study(journal).get_trials(states=(TrialState.RUNNING,))) == 2:
            break
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    lost = journal_study(journal).get_trials(states=(TrialState.RUNNING,))
    assert len(lost) == 2
    again = kd_train(tmp_path, *search, "hydra.sweeper.n_trials=2")
    output = again.communicate(timeout=900)[0]
    assert again.returncode == 0, output
    trials = journal_study(journal).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    assert [t.params for t in trials[2:]] == [t.params for t in lost]  # the lost points, trained this time
    assert all((sweep / str(t.number) / "results.json").is_file() for t in trials[2:])


@pytest.mark.slow
def test_a_multi_objective_search_trades_validation_accuracy_against_student_parameters(tmp_path):
    sweep = tmp_path / "sweep"
    search = kd_train(tmp_path, "hparams_search=kd_optuna_pareto", "hydra.sweeper.n_trials=3",
                      "hydra.sweeper.params.student='choice(convnet_tiny, convnet_small)'", f"hydra.sweep.dir={sweep}",
                      "data.val_fraction=0.1", "trainer.max_epochs=1", *TINY)
    output = search.communicate(timeout=900)[0]
    assert search.returncode == 0, output
    study = optuna.load_study(study_name="kd_optuna_pareto", storage=open_storage(f"sqlite:///{sweep}/optuna.db"))
    for trial in study.trials:  # each trial returned (val/acc, the student's parameters) from its own results
        results = json.loads((sweep / str(trial.number) / "results.json").read_text())
        assert trial.values == pytest.approx([results["student_metrics"]["val/acc"],
                                              results["stages"]["student"]["size"]["student"]["params"]])
    solutions = OmegaConf.load(sweep / "optimization_results.yaml").solutions
    assert sorted(s.trial for s in solutions) == sorted(t.number for t in study.best_trials)
    report = subprocess.run([sys.executable, "-m", "kd_lightning.sweeps.report", str(sweep), "--no-wandb"],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and "## Pareto front" in report.stdout, report.stderr


def test_each_job_outcome_is_told_to_the_study_and_a_failure_does_not_stop_the_search():
    from hydra.core.utils import JobReturn, JobStatus

    from kd_lightning.sweeps.pruned import PrunedTrial
    from kd_lightning.sweeps.search import tell

    study = optuna.create_study(direction="maximize")
    outcomes = [JobReturn(status=JobStatus.COMPLETED, _return_value=0.8),
                JobReturn(status=JobStatus.COMPLETED, _return_value=PrunedTrial(trial=1, epoch=2, value=0.3)),
                JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("out of memory")),
                JobReturn(status=JobStatus.COMPLETED, _return_value=None)]  # the objective was never logged
    for job in outcomes:
        tell(study, study.ask({"x": FloatDistribution(0, 1)}), job)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                               TrialState.FAIL]
    assert study.best_value == 0.8


def test_kd_best_reruns_the_pareto_trial_it_is_told_and_asks_for_one_otherwise(tmp_path):
    from kd_lightning.sweeps.best import best_overrides

    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["hparams_search=kd_optuna_pareto", "data=digits", "student=resnet8",
                                     "distill.kd.weight=0.3"]), tmp_path / "0" / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"name": "optuna", "directions": ["maximize", "minimize"], "solutions": [
        {"trial": 0, "params": {"student": "resnet8", "distill.kd.weight": 0.3}, "values": [0.9, 78000]},
        {"trial": 3, "params": {"student": "convnet_tiny", "distill.kd.weight": 0.7}, "values": [0.8, 590]}]}),
        tmp_path / "optimization_results.yaml")
    assert best_overrides(tmp_path, 3) == (["data=digits", "student=convnet_tiny", "distill.kd.weight=0.7"], 0.8)
    with pytest.raises(ConfigError, match=r"Pareto front \(trial 0: values \[0.9, 78000\]; trial 3: .*--trial"):
        best_overrides(tmp_path)
