"""An Optuna search as a Hydra sweeper, with a persistent study and a pruner fed by Lightning's validation metric.

Why our own and not ``hydra-optuna-sweeper``: its last release (1.3.0) pins ``optuna<3``; it runs ``n_trials`` more
trials on every call and leaves a killed search's trials RUNNING, so a search cannot resume; and it cannot prune
(a trial is a whole job whose return value is all Optuna sees). Here:

- the study lives in a storage (``sqlite:///optuna.db`` by default) and is loaded if it exists, so rerunning the
  same command resumes it; trials that a killed search left RUNNING are marked FAIL and enqueued again with the
  same parameters, and the search goes on until ``n_trials`` trials are COMPLETE or PRUNED;
- trials are asked ``n_jobs`` at a time and launched through whichever Hydra launcher is configured (sequential,
  joblib, SLURM), so the search runs wherever a grid runs;
- each trial gets, by override, an :class:`OptunaPruning` Lightning callback that reports the monitored validation
  metric to its trial through the same storage, and stops the run when the study's pruner says so;
- a trial that fails returns NaN (``zoo-train`` records it FAILED in MLflow) and is told FAIL; the search goes on.

One search process per study: a RUNNING trial found at start is taken as orphaned. Parallelism comes from
``n_jobs`` and the launcher, not from several searches on one study.

The search space is written in Hydra's override grammar (see ``sweeps/configs/hydra/sweeper/optuna.yaml``)::

    optim.lr: tag(log, interval(1e-4, 1e-2))   # float, log-uniform
    optim.warmup_steps: int(interval(0, 200))  # int (int() makes the bounds integers)
    model.n_layers: range(2, 9, 2)             # int with a step: 2, 4, 6, 8
    model/mixer: choice(retnet, hyena)         # categorical (also written retnet,hyena)
    seed: 0                                     # not a sweep: a fixed override of every trial
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from experiments.store import first_opening, mask_secrets

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PRUNING_CALLBACK_KEY = "callbacks.pruning"  # train.py instantiates every entry of ``callbacks``


# --------------------------------------------------------------------------------------------------- search space
@dataclass
class Dimension:
    """One searched override: its key as written (``optim.lr``, ``+x``, ``model/mixer``), the Optuna distribution,
    and for categorical dimensions the override text of each choice (choices such as dicts are not valid Optuna
    values, so Optuna sees their text)."""

    key: str
    distribution: BaseDistribution
    choice_text: dict[Any, str] | None = None

    @property
    def name(self) -> str:
        return self.key.lstrip("+~")

    def override(self, value: Any) -> str:
        text = self.choice_text[value] if self.choice_text is not None else repr(value)
        return f"{self.key}={text}"


def _dimension(override: Override) -> Dimension:
    key, sweep = override.get_key_element(), override.value()
    if override.is_interval_sweep():
        log_scale = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return Dimension(key, IntDistribution(sweep.start, sweep.end, log=log_scale))
        return Dimension(key, FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale))
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values or sweep.step <= 0:
            raise ValueError(f"{key}: range() must be increasing and not empty for an Optuna search")
        kind = IntDistribution if all(isinstance(v, int) for v in values) else FloatDistribution
        return Dimension(key, kind(values[0], values[-1], step=sweep.step))
    if override.is_choice_sweep():
        texts = list(override.sweep_string_iterator())
        choices = [
            value if value is None or isinstance(value, (bool, int, float, str)) else text
            for value, text in zip(sweep.list, texts)
        ]
        return Dimension(key, CategoricalDistribution(choices), dict(zip(choices, texts)))
    raise ValueError(f"{key}: {override.input_line!r} is not a sweep Optuna can search (interval, range, choice)")


def search_space(params: Mapping[str, Any], arguments: Sequence[str]) -> tuple[list[str], list[Dimension]]:
    """Fixed overrides and searched dimensions from the config's ``params`` and the command line's overrides.

    A command-line override of a key replaces the config's entry for it, so ``optim.lr=1e-3`` on the command line
    pins a parameter that the sweep file searches."""
    parser = OverridesParser.create()
    entries = [f"{key}={_text(value)}" for key, value in params.items()] + list(arguments)
    by_key: dict[str, Override] = {}
    for override in parser.parse_overrides(entries):
        name = override.get_key_element().lstrip("+~")
        by_key.pop(name, None)  # re-insert: a later entry wins and takes the later position
        by_key[name] = override
    fixed = [o.input_line for o in by_key.values() if not o.is_sweep_override()]
    dims = [_dimension(o) for o in by_key.values() if o.is_sweep_override()]
    return fixed, dims


def _text(value: Any) -> str:
    """A ``params`` value as override text: grammar strings stay as written, YAML numbers/lists/dicts are rendered."""
    return value if isinstance(value, str) else hydra_literal(value)


def hydra_literal(value: Any) -> str:
    """A Python value written in Hydra's override grammar, so it can travel to a trial as one override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # Hydra's quoted strings: backslashes are literal except before a quote or the closing quote; a
        # ``${`` would become an interpolation
        escaped = re.sub(r"(\\+)(?='|$)", r"\1\1", value).replace("'", "\\'").replace("${", "\\${")
        return f"'{escaped}'"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{hydra_literal(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_literal(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a Hydra override")


def absolute_storage(url: str) -> str:
    """``sqlite:///optuna.db`` made absolute: trials may run in another working directory (a worker, a SLURM job)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix) :].startswith(("/", ":memory:")) and url != prefix:
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


# --------------------------------------------------------------------------------------------------------- sweeper
class OptunaSweeper(Sweeper):
    """Hydra sweeper that asks an Optuna study for ``n_jobs`` trials at a time and launches them as Hydra jobs."""

    def __init__(
        self,
        study_name: str,
        storage: str,
        n_trials: int,
        n_jobs: int = 1,
        direction: str = "minimize",
        sampler: DictConfig | None = None,
        pruner: DictConfig | None = None,
        monitor: str = "val/loss",
        max_failures: int | None = None,
        params: DictConfig | None = None,
    ) -> None:
        if not study_name:
            raise ValueError("name the study: hydra.sweeper.study_name=NAME (or sweep_name=NAME); it resumes by name")
        if not storage:
            raise ValueError("set hydra.sweeper.storage: trials report to the study through it, and it resumes from it")
        self.study_name = study_name
        self.storage = absolute_storage(storage)
        self.n_trials = n_trials
        self.n_jobs = n_jobs if n_jobs > 0 else os.cpu_count() or 1  # joblib's -1: all cores
        self.direction = direction
        self.sampler_spec = _container(sampler)
        self.pruner_spec = _container(pruner) or {"_target_": "optuna.pruners.NopPruner"}
        self.monitor = monitor
        self.max_failures = n_trials if max_failures is None else max_failures
        self.params = _container(params) or {}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        fixed, dims = search_space(self.params, arguments)
        space = {d.name: d for d in dims}
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        with first_opening(self.storage):  # parallel searches may share a storage that does not exist yet
            study = optuna.create_study(
                study_name=self.study_name,
                storage=self.storage,
                pruner=hydra.utils.instantiate(self.pruner_spec),
                direction=self.direction,
                load_if_exists=True,
            )
        study.set_metric_names([self.monitor])  # the dashboard's axis: "val/loss", not "Objective 0"
        study.sampler = self._sampler(already=len(study.get_trials(deepcopy=False)))
        retried = requeue_orphans(study)
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        log.info(
            "Optuna study %r in %s: %d of %d trials finished%s; searching %s",
            self.study_name,
            mask_secrets(self.storage),
            done,
            self.n_trials,
            f", {retried} interrupted trial(s) enqueued again" if retried else "",
            ", ".join(f"{d.name} ~ {d.distribution}" for d in dims) or "nothing",
        )
        returns: list[Sequence[JobReturn]] = []
        failures = 0
        while done < self.n_trials:
            trials = [
                study.ask({d.name: d.distribution for d in dims}) for _ in range(min(self.n_jobs, self.n_trials - done))
            ]
            batch = [fixed + self._trial_overrides(trial, space) for trial in trials]
            for trial, overrides in zip(trials, batch):
                trial.set_user_attr("overrides", overrides)
            try:
                self.validate_batch_is_legal(batch)
                # job number = trial number, so <sweep dir>/<number> is the trial's directory (asked numbers are
                # consecutive when one search owns the study)
                results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            except Exception:
                for trial in trials:
                    study.tell(trial, state=TrialState.FAIL)
                raise
            returns.append(results)
            running = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
            for trial, result in zip(trials, results):
                failures += self._tell(study, trial, result, running.get(trial.number))
            done = len(study.get_trials(deepcopy=False, states=FINISHED))
            if failures > self.max_failures:
                raise RuntimeError(
                    f"{failures} trials of study {self.study_name!r} failed (more than hydra.sweeper.max_failures="
                    f"{self.max_failures}); see their logs under {sweep_dir}"
                )
        self._summarise(study, sweep_dir)
        return returns

    def _sampler(self, already: int) -> optuna.samplers.BaseSampler:
        """The configured sampler; its seed is offset by the trials the study already has, or a resumed search
        would draw the same random start-up points again."""
        if not self.sampler_spec:
            return optuna.samplers.TPESampler()
        spec = dict(self.sampler_spec)
        if spec.get("seed") is not None:
            spec["seed"] += already
        return hydra.utils.instantiate(spec)

    def _trial_overrides(self, trial: optuna.Trial, space: dict[str, Dimension]) -> list[str]:
        """The sampled values, the pruning callback, and a run name that says which trial this is."""
        sampled = [space[name].override(value) for name, value in trial.params.items()]
        callback = {
            "_target_": f"{OptunaPruning.__module__}.{OptunaPruning.__qualname__}",
            "storage": self.storage,
            "study_name": self.study_name,
            "trial_number": trial.number,
            "monitor": self.monitor,
            "pruner": self.pruner_spec,
        }
        overrides = [*sampled, f"+{PRUNING_CALLBACK_KEY}={hydra_literal(callback)}"]
        assert self.config is not None
        if self.config.get("name") is None:  # else the user named the runs; the params are columns in MLflow anyway
            shown = " ".join(f"{name.split('.')[-1].split('/')[-1]}={_short(v)}" for name, v in trial.params.items())
            overrides.append(f"name={hydra_literal(f'trial {trial.number} {shown}'.strip())}")
        return overrides

    def _tell(self, study: optuna.Study, trial: optuna.Trial, result: JobReturn, stored: Any) -> int:
        """Tell the trial's outcome; returns 1 if it failed. A pruned run returns NaN like a failed one, so the
        ``pruned`` user attribute that its callback stored is what tells them apart."""
        if stored is None:  # already finished (someone told it); nothing to do
            return 0
        if stored.user_attrs.get("pruned"):
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned at step %s", trial.number, stored.last_step)
            return 0
        if result.status == JobStatus.COMPLETED:
            value = result.return_value
            if isinstance(value, (int, float)) and math.isfinite(value):
                study.tell(trial, float(value))
                log.info("trial %d: %s=%.5g", trial.number, self.monitor, value)
                return 0
            reason = f"the run returned {value!r} (its MLflow run says why)"
        else:  # the job itself raised (zoo-train catches its own errors; a launcher's may not)
            reason = f"the job raised {result._return_value!r}"
        trial.set_user_attr("failure", reason)
        study.tell(trial, state=TrialState.FAIL)
        log.warning("trial %d failed: %s; the search goes on", trial.number, reason)
        return 1

    def _summarise(self, study: optuna.Study, sweep_dir: Path) -> None:
        counts = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
        summary: dict[str, Any] = {
            "study_name": self.study_name,
            "storage": mask_secrets(self.storage),
            "trials": {k: v for k, v in counts.items() if v},
        }
        if counts["COMPLETE"]:
            best = study.best_trial
            summary["best"] = {"number": best.number, "value": best.value, "params": best.params}
            summary["best"]["overrides"] = best.user_attrs.get("overrides", [])
            log.info("best trial %d: %s=%.5g with %s", best.number, self.monitor, best.value, best.params)
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optuna_study.yaml")
        log.info("browse the study: optuna-dashboard %s", mask_secrets(self.storage))


def requeue_orphans(study: optuna.Study) -> int:
    """Trials left RUNNING by a killed search: FAIL them (their runs will never report) and enqueue their
    parameters again, so the resumed search re-tries exactly the points it had started."""
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in orphans:
        optuna.trial.Trial(study, trial._trial_id).set_user_attr("failure", "interrupted: its search was killed")
        study.tell(trial.number, state=TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return len(orphans)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------------- pruning callback
class OptunaPruning(L.Callback):
    """Reports the monitored validation metric to one Optuna trial after each validation during fit, and stops the
    run with ``optuna.TrialPruned`` when the study's pruner says so.

    The trial runs in another process than the search (a launcher's worker, a SLURM job), so it reaches its study
    through the shared storage by name and trial number. Only ``fit`` reports: the final ``validate`` of a run is
    at the step already reported, and a prune there would hit a finished run."""

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_number: int,
        monitor: str = "val/loss",
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        self.storage, self.study_name, self.trial_number = storage, study_name, trial_number
        self.monitor = monitor
        self.pruner = pruner
        self._trial: optuna.Trial | None = None
        self._disabled = False

    def _load_trial(self, trainer: L.Trainer) -> optuna.Trial | None:
        study = optuna.load_study(study_name=self.study_name, storage=self.storage, pruner=self.pruner)
        frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == self.trial_number), None)
        if frozen is None or frozen.state != TrialState.RUNNING:
            # e.g. a trial's overrides rerun by hand after the search: train, but leave the finished trial alone
            state = "missing" if frozen is None else frozen.state.name
            log.warning("Optuna trial %d of %r is %s; not reporting to it", self.trial_number, self.study_name, state)
            return None
        trial = optuna.trial.Trial(study, frozen._trial_id)
        run_id = getattr(trainer.logger, "run_id", None)
        if run_id:  # from the dashboard to the MLflow run
            trial.set_user_attr("mlflow_run_id", run_id)
        return trial

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        prune, step = False, trainer.global_step
        if trainer.is_global_zero and not self._disabled:
            if self._trial is None:
                self._trial = self._load_trial(trainer)
                self._disabled = self._trial is None
            metric = trainer.callback_metrics.get(self.monitor)
            if metric is None:
                raise KeyError(f"OptunaPruning monitors {self.monitor!r}, not among {sorted(trainer.callback_metrics)}")
            value = float(metric)
            if self._trial is not None and math.isfinite(value):
                self._trial.report(value, step)
                prune = self._trial.should_prune()
                if prune:
                    self._trial.set_user_attr("pruned", True)
        # every rank stops together, on rank zero's decision
        if trainer.strategy.broadcast(prune, src=0):
            raise optuna.TrialPruned(f"trial {self.trial_number} of {self.study_name!r} pruned at step {step}")
