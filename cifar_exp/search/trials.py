"""The search loop behind `hydra/sweeper=optuna` (hydra_plugins/cifar_exp_search): asks the study
for a trial whenever a job slot frees up (n_jobs at once, never waiting for a batch), launches each
trial as one job on the configured launcher, and tells the study how it ended: complete with its
metric, pruned, or failed (a diverged loss). A search stopped by Ctrl-C, a crashed worker or an
error continues when the same command runs again: finished and pruned trials stay, interrupted
ones run again under their own numbers (their runs resume from the last checkpoint)."""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf

from cifar_exp.errors import TrialPruned, UserError, first_line
from cifar_exp.hydra_private import job_error
from cifar_exp.search import space, study

log = logging.getLogger(__name__)


def search(config: DictConfig, launcher: Any, arguments: list[str]) -> list[Any]:
    """Runs the search `config.hydra.sweeper` describes on `launcher`; `arguments` are the command
    line's overrides (its sweeps join the search space). Returns the trials' job returns."""
    sweeper = config.hydra.sweeper
    distributions, fixed = check(config, arguments)
    if sweeper.metric.startswith("test/"):
        log.warning(
            f"hydra.sweeper.metric={sweeper.metric}: the search chooses on the test split, so its best "
            "test score is optimistic; val/acc (the default) chooses on the validation split"
        )
    claim = study.claim(config)  # the sweep callback may hold it too: the same lock, counted
    try:
        return Trials(config, claim, distributions, fixed).run(launcher, sweeper.n_jobs)
    finally:
        claim.release()


def check(config: DictConfig, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Every search setting and the search space (distributions, fixed overrides), one line for the
    first mistake: run by the sweep callback before it writes anything, and by the search."""
    sweeper = config.hydra.sweeper
    study.check_settings(sweeper)
    parallel = not str(config.hydra.launcher._target_).endswith(".BasicLauncher")
    if sweeper.n_jobs > 1 and not parallel:
        raise UserError(
            f"hydra.sweeper.n_jobs={sweeper.n_jobs} needs a parallel launcher: add hydra/launcher=joblib "
            "(or submitit_local, submitit_slurm)"
        )
    check_metric(sweeper.metric)
    return space.parse(space.items(sweeper.params, arguments))


def check_metric(metric: str) -> None:
    """The metric must be one that every epoch logs (train.EPOCH_METRICS), or a test metric the
    user named (then each trial evaluates the test split every epoch, and chooses on it)."""
    from cifar_exp.train import EPOCH_METRICS, TEST_METRICS

    if metric not in EPOCH_METRICS + TEST_METRICS and not metric.startswith("test/acc/"):
        raise UserError(
            f"hydra.sweeper.metric={metric}: no run logs it; each epoch logs {', '.join(EPOCH_METRICS)} "
            f"(choosing on the test split, by name: {', '.join(TEST_METRICS)}, test/acc/<class>)"
        )


class Stop(UserError):
    """A trial ended in a way the search cannot go on from (a crashed worker, an error in a job)."""


class Trials:
    """The ask/launch/tell loop over one study."""

    def __init__(self, config: DictConfig, claim: study.Claim, distributions: dict, fixed: list[str]) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sweeper = config.hydra.sweeper
        self.sweeper, self.claim, self.distributions, self.fixed = sweeper, claim, distributions, fixed
        self.study = optuna.create_study(
            study_name=claim.name,
            storage=study.open_storage(claim.storage),
            # its steps are the trials' reports: reports_per_epoch of them an epoch
            pruner=study.make_pruner(sweeper.pruner, config.trainer.epochs, sweeper.reports_per_epoch),
            direction=str(sweeper.direction),
            load_if_exists=True,
        )
        states = optuna.trial.TrialState
        everything = self.study.get_trials(deepcopy=False)
        self.study.sampler = study.make_sampler(sweeper.sampler, len(everything))
        done = [t for t in everything if t.state in (states.COMPLETE, states.PRUNED, states.FAIL)]
        # trials a stopped search left running: they run again first, under their own numbers
        self.resumed = [(t.number, t.params) for t in everything if t.state == states.RUNNING]
        self.to_ask = max(0, sweeper.n_trials - len(done) - len(self.resumed))
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.stopping: Exception | None = None
        self.returns: list[Any] = []
        what = f"{len(done)} of {sweeper.n_trials} trials done" + (
            f", {len(self.resumed)} to resume" if self.resumed else ""
        )
        log.info(f"Optuna study {claim.name} in {claim.storage}: {what}")

    def next(self) -> tuple[int, dict[str, Any]] | None:
        """The next trial to launch: an interrupted one, else a new one asked of the sampler."""
        if self.stopping is not None:
            return None
        if self.resumed:
            return self.resumed.pop(0)
        if self.to_ask <= 0:
            return None
        self.to_ask -= 1
        trial = self.study.ask(self.distributions)
        return trial.number, trial.params

    def launch(self, launcher: Any, number: int, params: dict[str, Any]) -> JobReturn | BaseException:
        """One trial as one job; its number is the job's number, so the job finds its trial."""
        name = f"hydra.sweeper.study_name={_quoted(self.claim.name)}"
        storage = f"hydra.sweeper.storage={_quoted(self.claim.storage)}"
        overrides = [*self.fixed, *space.overrides(params), name, storage]
        log.info(f"trial {number}: {' '.join(space.overrides(params))}")
        try:
            return launcher.launch([overrides], initial_job_idx=number)[0]
        except Exception as e:  # the launcher itself failed (a worker process died)
            return e

    def run(self, launcher: Any, n_jobs: int) -> list[Any]:
        if n_jobs == 1:  # in this thread: Ctrl-C and signals reach an in-process trial as usual
            while (trial := self.next()) is not None:
                self.tell(*trial, self.launch(launcher, *trial))
        else:
            self._run_parallel(launcher, n_jobs)
        if self.stopping is not None:
            raise self.stopping
        self._log_best()
        return self.returns

    def _run_parallel(self, launcher: Any, n_jobs: int) -> None:
        """n_jobs trials at once; a slot that frees up starts the next trial at once."""
        pool = ThreadPoolExecutor(n_jobs, thread_name_prefix="trial")
        running: dict[Future, tuple[int, dict[str, Any]]] = {}
        try:
            while True:
                while len(running) < n_jobs and (trial := self.next()) is not None:
                    running[pool.submit(self.launch, launcher, *trial)] = trial
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    self.tell(*running.pop(future), future.result())
        finally:  # Ctrl-C: the jobs got the signal too; their trials stay RUNNING, to resume
            pool.shutdown(wait=self.stopping is not None and not running, cancel_futures=True)

    def tell(self, number: int, params: dict[str, Any], ret: JobReturn | BaseException) -> None:
        """Records how the trial ended. A trial that could not end (its job raised a user error, its
        worker died) stays RUNNING in the study and stops the search after the running ones."""
        import optuna

        from cifar_exp.train import NonFiniteLossError

        states = optuna.trial.TrialState
        error = ret if isinstance(ret, BaseException) else None
        if isinstance(ret, JobReturn):
            self.returns.append(ret)
            error = job_error(ret)
            if error is None:
                try:
                    value = float(ret.return_value)
                except (TypeError, ValueError):
                    error = UserError(f"trial {number}: the task returned {ret.return_value!r}, not a number")
                else:
                    self.study.tell(number, value)
                    log.info(f"trial {number} finished: {self.sweeper.metric} {value:.4f}")
                    return
        if isinstance(error, TrialPruned):
            self.study.tell(number, state=states.PRUNED)
            log.info(f"trial {number} pruned {error}")  # "after epoch 1 of 5: test/acc 0.2762"
        elif isinstance(error, NonFiniteLossError):  # a diverged loss is an outcome, not a stop
            self.study.tell(number, state=states.FAIL)
            log.warning(f"trial {number} failed: {first_line(error)}")
        elif self.stopping is None:
            done = sum(t.state != states.RUNNING for t in self.study.get_trials(deepcopy=False))
            if isinstance(error, UserError):
                self.stopping = error
            else:
                self.stopping = Stop(
                    f"trial {number} stopped the search ({first_line(error)}); {done} trials done: run "
                    "the same command again to continue"
                )

    def _log_best(self) -> None:
        """The best trial, logged and written beside the sweep (optimization_results.yaml, as
        hydra-optuna-sweeper wrote it)."""
        best = study.best_trial(self.study)
        if best is None:
            return
        values = " ".join(space.overrides(best.params))
        log.info(f"best trial {best.number}: {self.sweeper.metric} {best.value:.4f} ({values})")
        results = {
            "name": "optuna",
            "study": self.claim.name,
            "best_params": best.params,
            "best_value": best.value,
        }
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        (self.sweep_dir / "optimization_results.yaml").write_text(OmegaConf.to_yaml(results))


def _quoted(value: str) -> str:
    """A string Hydra's override grammar reads back as it is (paths, URLs, names)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
