"""`hydra/launcher=population`: an ordinary `-m` sweep, its stackable jobs trained as populations.

    python -m bench -m optimizer.lr=1e-3,1e-2,1e-1 optimizer.height=0,1,2 seed=0,1,2 hydra/launcher=population

The launcher receives the sweep's jobs like any Hydra launcher, groups the jobs that can be stacked (their configs
differ only in optimizer numbers, tower height and seed), trains each group as one population
(`bench.population`: the members' weights stacked along a leading dimension, one vmapped forward and backward per
step, each member with its own seed for its initialization and its batch order), and then lands every job as
Hydra's `run_job` does for the basic launcher (a job run alone goes through `run_job` itself; a trained one through
`_run_trained_job`, run_job's steps less its copies of the config): `${hydra.sweep.dir}/<num>/` with `.hydra/`, the
job log, `metrics.json` and `history.csv`, the callbacks, the job's return value. A population's many small files
wait for the disk together (`bench.io.synced_together`). Each job's results equal the basic
launcher's (float64: to 1e-10; float32: to round-off), so the report and every other tool cannot tell the
difference; metrics.json carries one extra entry, `population`, saying which group trained it.

Jobs that cannot be stacked (a BatchNorm or dropout model, a tuning-free baseline, AMP, ...) run one by one
through the ordinary task function, each with one line saying why. `hydra.launcher.max_members` caps a population's
size: a larger group is split into chunks trained one after another.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from bench.io import synced_together

__all__ = ["Job", "launch_population", "plan_jobs", "stack_key", "train_jobs", "why_alone"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One job of a sweep: its number, overrides, Hydra sweep config, and what the task function receives."""

    num: int
    overrides: Sequence[str]
    config: DictConfig  # with the `hydra` node, as run_job receives it
    task: DictConfig  # without it, as the task function receives it
    result: dict[str, Any] | None = field(default=None)  # its metrics, once its population trained and wrote them


def _output_dir(config: DictConfig) -> Path:
    """The job's directory, computed as hydra.core.utils.run_job computes it."""
    out = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))) / str(OmegaConf.select(config, "hydra.sweep.subdir"))
    return out.absolute()


def _task_config(config: DictConfig) -> DictConfig:
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


_INVALID = "its config is invalid (the run says why)"


def why_alone(task: DictConfig, out: Path) -> str | None:
    """Why this job cannot join a population (one phrase), or None when it can."""
    from bench.config import ConfigError, validate
    from bench.train import check_run_dir

    try:
        validate(task)
    except ConfigError:
        return _INVALID
    if not task.trainer.force:
        try:
            if check_run_dir(out, task, hydra_dir=True) is not None:
                return "its directory already holds a finished run"
        except ConfigError:
            return "its directory holds another config's run (the run says why)"
    if (out / "checkpoint.pt").is_file() and task.trainer.resume:
        return "its directory holds a checkpoint to resume"
    from bench.population import stacked_problem

    return stacked_problem(task)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def stack_key(task: DictConfig) -> str:
    """What a job shares with every job it can be stacked with: its config less seed, optimizer numbers and spec.

    Towers whose rules differ still share a key; `bench.population.group_members` splits them by plan.
    """
    from bench.train import run_identity

    identity = run_identity(task)
    shared = {
        k: v
        for k, v in identity.items()
        if k not in ("seed", "optimizer.spec") and not (k.startswith("optimizer.") and (_is_number(v) or v is None))
    }
    return json.dumps(shared, sort_keys=True, default=str)


def plan_jobs(jobs: Sequence[Job], max_members: int | None) -> tuple[list[list[Job]], dict[int, str]]:
    """Split a sweep's jobs into populations (each at most `max_members`) and the jobs that run alone (with why)."""
    alone: dict[int, str] = {}
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        reason = why_alone(job.task, _output_dir(job.config))
        if reason is not None:
            alone[job.num] = reason
            continue
        groups.setdefault(stack_key(job.task), []).append(job)
    chunks: list[list[Job]] = []
    for group in groups.values():
        if len(group) == 1:
            alone[group[0].num] = "no other job of the sweep differs from it only in optimizer numbers, height and seed"
            continue
        size = max_members or len(group)
        chunks += [group[i : i + size] for i in range(0, len(group), size)]
    return chunks, alone


def checkpoint_path(folder: Path, names: Sequence[str]) -> Path:
    """Where the population of these members keeps its checkpoint (one file per population)."""
    import hashlib

    digest = hashlib.sha256(",".join(names).encode()).hexdigest()[:12]
    return folder / f"population-{names[0]}-{names[-1]}-{digest}.pt"


class PopulationStopped(Exception):
    """A stop was requested (SIGTERM, SIGINT, SLURM's warning): the checkpoint is saved; rerunning resumes it."""

    def __init__(self, steps: int) -> None:
        super().__init__(f"population stopped after step {steps}; its checkpoint is saved, rerun to resume")
        self.steps = steps


def _keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of handing every large block back to the system.

    A population's tensors are large (132 MNIST MLPs: a 106 MB batch and 53 MB per weight gradient, every step).
    glibc serves each block over 32 MB with a fresh mmap and unmaps it when freed, so every step faults in hundreds
    of MB of new pages: gathering the members' batches alone took 100 ms instead of 28 ms. Here no block is mapped
    alone and the heap's free top is not trimmed (below 2 GB), so freed blocks are reused. Values are unchanged;
    the process keeps its peak memory until it exits. No-op where the C library is not glibc.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    mallopt(m_trim_threshold, 2**31 - 1)
    mallopt(m_mmap_max, 0)


def train_jobs(tasks: Sequence[DictConfig], outs: Sequence[Path], names: Sequence[str], checkpoints: Path | None = None
               ) -> list[dict[str, Any]]:  # fmt: skip
    """Train the stackable configs `tasks` as populations into their job directories `outs`; return their metrics.

    `bench.train.Trainer` with a stacked learner writes each job's history.csv and metrics.json (and its logger's
    files) exactly as a single run does. `checkpoints`: a folder for the populations' checkpoints (a rerun resumes
    from them). Raises `bench.population.PopulationError` when the model cannot be stacked (BatchNorm, dropout, an
    RNN) and `PopulationStopped` when a stop was requested.
    """
    from bench.population import plan_groups
    from bench.train import Trainer, load_data

    _keep_freed_memory()
    data = load_data(tasks[0])
    out: list[dict[str, Any]] = [{}] * len(tasks)
    for group in plan_groups(tasks):
        # Members in order of seed: those sharing a seed share their batches, one wide product per layer
        # (bench.population.StackedLearner); every member's results are its own whatever the order.
        group = sorted(group, key=lambda i: int(tasks[i].seed))
        trainer = Trainer(
            [tasks[i] for i in group],
            [outs[i] for i in group],
            stacked=True,
            checkpoint=None if checkpoints is None else checkpoint_path(checkpoints, [names[i] for i in group]),
            population={"dtype": str(tasks[0].trainer.dtype)},
            data=data,
        )
        for i, metrics in zip(group, trainer.fit(), strict=True):
            if metrics["status"] == "preempted":
                raise PopulationStopped(metrics["steps"])
            out[i] = metrics
    return out


def _land(metrics: dict[str, Any]) -> Callable[[DictConfig], float | None]:
    """A task function for a job its population trained (and wrote): the job log's summary, the job's value."""

    def task(cfg: DictConfig) -> float | None:
        from hydra.core.hydra_config import HydraConfig

        from bench.train import format_summary

        log.info("%s", format_summary(metrics, HydraConfig.get().runtime.output_dir))
        return metrics.get("val_error")

    return task


def load_jobs(context: Any, config: DictConfig, jobs: Sequence[tuple[list[str], int]]) -> list[Job]:
    """Each job's sweep config, as the basic launcher loads it, and its task config."""
    from hydra.core.hydra_config import HydraConfig

    load = context.config_loader.load_sweep_config
    load = getattr(load, "take", load)  # bench.sweepconfig: the sweeper's check made these configs already
    out = []
    for overrides, num in jobs:
        sweep_config = load(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = num
            sweep_config.hydra.job.num = num
            sweep_config.hydra.runtime.output_dir = str(_output_dir(sweep_config))
        OmegaConf.set_readonly(sweep_config.hydra, True)  # as HydraConfig.set_config leaves it (run_job sets it)
        out.append(Job(num, overrides, sweep_config, _task_config(sweep_config)))
    if out:  # ${hydra:...} resolves from the last job's, as it did when each job was set in turn (nothing reads it
        HydraConfig.instance().set_config(out[-1].config)  # in between; setting each costs a copy of its hydra node)
    return out


def land(context: Any, job: Job, task_function: Any) -> Any:
    """Run one job as Hydra's run_job runs it: its population's results, or (run alone) the ordinary task function."""
    from hydra import version
    from hydra.core.utils import run_job

    # (Under a version_base before 1.2 run_job changes directory with a deprecation warning: that is run_job's own.)
    if job.result is not None and (job.config.hydra.job.chdir is not None or version.base_at_least("1.2")):
        return _run_trained_job(context, job)
    return run_job(
        hydra_context=context,
        task_function=task_function,
        config=job.config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


def _run_trained_job(context: Any, job: Job) -> Any:
    """`hydra.core.utils.run_job` (hydra-core 1.3) for a job its population trained, step by step, less its copies.

    run_job copies the job's config four times (twice the hydra node for `HydraConfig`, once the whole config for the
    task, once the hydra node for the JobReturn) so that one job cannot change the next one's; a population sweep's
    jobs are already separate copies (`load_jobs`), and landing one only logs its summary, so one copy for
    `HydraConfig` does (132 jobs: about 2 s less). The rest is run_job's: the output directory, working directory,
    job logging, `.hydra/` (`hydra.output_subdir`), `hydra.job.env_set`, the callbacks, the JobReturn.
    tests/test_population_launcher.py compares every job's directory with the basic launcher's, which uses run_job.
    """
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import (
        JobReturn,
        JobRuntime,
        JobStatus,
        _check_hydra_context,
        _flush_loggers,
        _save_config,
        configure_log,
        env_override,
    )

    _check_hydra_context(context)
    config, callbacks = job.config, context.callbacks
    old_cwd, orig_hydra_cfg = os.getcwd(), HydraConfig.instance().cfg
    sweep = config.hydra.sweep
    output_dir = os.path.join(str(sweep.dir), str(sweep.subdir))
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    HydraConfig.instance().set_config(config)
    hydra_cfg = HydraConfig.instance().cfg  # this job's own copy (set_config copies the hydra node)
    chdir = bool(hydra_cfg.hydra.job.chdir)  # None: False from version_base 1.2 on (`land` checked)
    try:
        ret = JobReturn()
        ret.cfg, ret.hydra_cfg = job.task, hydra_cfg
        ret.overrides = OmegaConf.to_container(config.hydra.overrides.task)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if chdir:
            os.chdir(output_dir)
            ret.working_dir = output_dir
        else:
            ret.working_dir = os.getcwd()
        configure_log(config.hydra.job_logging, config.hydra.verbose)
        if config.hydra.output_subdir is not None:
            hydra_output = Path(config.hydra.runtime.output_dir) / Path(config.hydra.output_subdir)
            _save_config(job.task, "config.yaml", hydra_output)
            _save_config(hydra_cfg, "hydra.yaml", hydra_output)
            _save_config(config.hydra.overrides.task, "overrides.yaml", hydra_output)
        task = _land(job.result)
        with env_override(hydra_cfg.hydra.job.env_set):
            callbacks.on_job_start(config=config, task_function=task)
            try:
                ret.return_value = task(job.task)
                ret.status = JobStatus.COMPLETED
            except Exception as e:
                ret.return_value = e
                ret.status = JobStatus.FAILED
        ret.task_name = JobRuntime.instance().get("name")
        _flush_loggers()
        callbacks.on_job_end(config=config, job_return=ret)
        return ret
    finally:
        HydraConfig.instance().cfg = orig_hydra_cfg
        if chdir:
            os.chdir(old_cwd)


def launch_population(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """What `PopulationLauncher.launch` does (hydra_plugins/bench_population_launcher)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import configure_log, filter_overrides, setup_globals

    from bench.population import PopulationError

    setup_globals()
    config, context = launcher.config, launcher.hydra_context
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    log.info("Launching %d jobs as populations", len(job_overrides))
    for i, overrides in enumerate(job_overrides):
        log.info("\t#%d : %s", initial_job_idx + i, " ".join(filter_overrides(overrides)))
    jobs = load_jobs(context, config, [(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)])
    chunks, alone = plan_jobs(jobs, launcher.max_members)
    for job in jobs:  # bad input first: its one-line error ends the sweep before any population trains for nothing
        if alone.get(job.num) == _INVALID:
            land(context, job, launcher.task_function)
    checkpoints = Path(str(config.hydra.sweep.dir)) / ".population"
    for chunk in chunks:
        nums = [job.num for job in chunk]
        log.info("population of %d: jobs %s", len(chunk), ", ".join(f"#{n}" for n in nums))
        HydraConfig.instance().set_config(chunk[0].config)
        try:
            results = _train_until_stopped(chunk, checkpoints)
        except PopulationError as e:
            for job in chunk:
                alone[job.num] = str(e).split(": ", 1)[-1].split("; ")[0]
            continue
        for job, result in zip(chunk, results, strict=True):
            job.result = result
    runs = []
    # Consecutive jobs that a population trained land with their files synced together (bench.io); a job that
    # runs alone starts with everything before it on disk, as with the basic launcher.
    for trained, batch in itertools.groupby(jobs, key=lambda job: job.result is not None):
        with synced_together() if trained else contextlib.nullcontext():
            for job in batch:
                if job.num in alone:
                    log.info("job #%d runs alone: %s", job.num, alone[job.num])
                runs.append(land(context, job, launcher.task_function))
                configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    shutil.rmtree(checkpoints, ignore_errors=True)  # every job landed: nothing left to resume
    return runs


def _train(jobs: Sequence[Job], checkpoints: Path) -> list[dict[str, Any]]:
    return train_jobs([j.task for j in jobs], [_output_dir(j.config) for j in jobs], [str(j.num) for j in jobs],
                      checkpoints)  # fmt: skip


def _train_until_stopped(jobs: Sequence[Job], checkpoints: Path) -> list[dict[str, Any]]:
    """`train_jobs`, where SIGINT or SIGTERM saves the checkpoint and ends the sweep (128 + signal, one line)."""
    import sys

    import bench.train

    checkpoints.mkdir(parents=True, exist_ok=True)
    with bench.train._stop_on_signals():
        try:
            return _train(jobs, checkpoints)
        except PopulationStopped as e:
            signum = bench.train._interrupted_by
            if signum is None:
                raise  # a preemption (submitit's handler asked): the caller requeues
            print(f"{e}: rerun the same command (same hydra.sweep.dir)", file=sys.stderr)
            sys.exit(128 + signum)
        finally:
            bench.train._checkpoint_requested = False


# -- hydra/launcher=population_slurm: one array task per population ------------------------------------------------
def launch_population_array(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """What `PopulationSlurmLauncher.launch` does: plan the populations here, train each as one array task."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import filter_overrides, setup_globals
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    setup_globals()
    config = launcher.config
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for i, overrides in enumerate(job_overrides):
        log.info("\t#%d : %s", initial_job_idx + i, " ".join(filter_overrides(overrides)))
    jobs = load_jobs(
        launcher.hydra_context, config, [(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)]
    )
    chunks, alone = plan_jobs(jobs, launcher.max_members)
    units = [[(list(job.overrides), job.num) for job in chunk] for chunk in chunks]
    for job in jobs:
        if job.num in alone:
            log.info("job #%d runs alone: %s", job.num, alone[job.num])
            units.append([(list(job.overrides), job.num)])
    for chunk in chunks:
        log.info("population of %d: jobs %s", len(chunk), ", ".join(f"#{job.num}" for job in chunk))

    # The executor exactly as hydra_submitit_launcher builds it (BaseSubmititLauncher.launch).
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    log.info("Submitit 'slurm': %d array tasks for %d jobs, sweep output dir %s", len(units), len(jobs), sweep_dir)
    array = executor.map_array(launcher, units, [Singleton.get_state()] * len(units))
    returns = {}
    for unit, task in zip(units, array, strict=True):
        for (_, num), ret in zip(unit, task.results()[0], strict=True):
            returns[num] = ret
    return [returns[initial_job_idx + i] for i in range(len(job_overrides))]


def run_unit(launcher: Any, unit: Sequence[tuple[list[str], int]], singleton_state: dict[Any, Any]) -> list[Any]:
    """One array task: a population trained and landed, or one job run alone (the ordinary task function)."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, setup_globals

    import bench.train
    from bench.cluster import CheckpointOnPreemption

    Singleton.set_state(singleton_state)
    setup_globals()
    context = launcher.hydra_context
    jobs = load_jobs(context, launcher.config, unit)
    if len(jobs) > 1:
        checkpoints = checkpoint_path(
            Path(str(launcher.config.hydra.sweep.dir)) / ".population", [str(job.num) for job in jobs]
        ).with_suffix("")
        checkpoints.mkdir(parents=True, exist_ok=True)
        # SLURM's warning signal (or SIGTERM) asks for a checkpoint; once saved, submitit requeues this task, which
        # then resumes from it (bench/cluster.py says how for single runs; this is the same callback).
        preemption = CheckpointOnPreemption()
        preemption.on_job_start(jobs[0].config)
        ended = JobReturn()
        ended.status = JobStatus.COMPLETED
        try:
            results = _train(jobs, checkpoints)
        except PopulationStopped:
            bench.train._preempted = True
            preemption.on_job_end(jobs[0].config, ended)  # requeues (USR2) or exits (SIGTERM)
            raise
        finally:
            bench.train._checkpoint_requested = False
        preemption.on_job_end(jobs[0].config, ended)
        for job, result in zip(jobs, results, strict=True):
            job.result = result
    with synced_together() if len(jobs) > 1 else contextlib.nullcontext():
        runs = [land(context, job, launcher.task_function) for job in jobs]
    if len(jobs) > 1:
        shutil.rmtree(checkpoints, ignore_errors=True)  # every job of it landed: nothing left to resume
    return runs
