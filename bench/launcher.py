"""`hydra/launcher=population`: an ordinary `-m` sweep, its stackable jobs trained as populations.

    python -m bench -m optimizer.lr=1e-3,1e-2,1e-1 optimizer.height=0,1,2 seed=0,1,2 hydra/launcher=population

The launcher receives the sweep's jobs like any Hydra launcher, groups the jobs that can be stacked (their configs
differ only in optimizer numbers, tower height and seed), trains each group as one population
(`bench.population`: the members' weights stacked along a leading dimension, one vmapped forward and backward per
step, each member with its own seed for its initialization and its batch order), and then lands every job through
Hydra's own `run_job`, exactly as the basic launcher does: `${hydra.sweep.dir}/<num>/` with `.hydra/`, the job log,
`metrics.json` and `history.csv`, the callbacks, the job's return value. Each job's results equal the basic
launcher's (float64: to 1e-10; float32: to round-off), so the report and every other tool cannot tell the
difference; metrics.json carries one extra entry, `population`, saying which group trained it.

Jobs that cannot be stacked (a BatchNorm or dropout model, a tuning-free baseline, a logger, AMP, ...) run one by one
through the ordinary task function, each with one line saying why. `hydra.launcher.max_members` caps a population's
size: a larger group is split into chunks trained one after another.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

__all__ = ["Job", "launch_population", "plan_jobs", "stack_key", "train_jobs", "why_alone"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One job of a sweep: its number, overrides, Hydra sweep config, and what the task function receives."""

    num: int
    overrides: Sequence[str]
    config: DictConfig  # with the `hydra` node, as run_job receives it
    task: DictConfig  # without it, as the task function receives it
    result: dict[str, Any] | None = field(default=None)  # metrics and history, once its population trained


def _output_dir(config: DictConfig) -> Path:
    """The job's directory, computed as hydra.core.utils.run_job computes it."""
    out = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))) / str(OmegaConf.select(config, "hydra.sweep.subdir"))
    return out.absolute()


def _task_config(config: DictConfig) -> DictConfig:
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def why_alone(task: DictConfig, out: Path) -> str | None:
    """Why this job cannot join a population (one phrase), or None when it can."""
    from bench.config import ConfigError, validate
    from bench.optim import TUNING_FREE
    from bench.train import check_run_dir

    try:
        validate(task)
    except ConfigError:
        return "its config is invalid (the run says why)"
    t = task.trainer
    if not t.force:
        try:
            if check_run_dir(out, task, hydra_dir=True) is not None:
                return "its directory already holds a finished run"
        except ConfigError:
            return "its directory holds another config's run (the run says why)"
    if (out / "checkpoint.pt").is_file() and t.resume:
        return "its directory holds a checkpoint to resume"
    if task.logger.get("name", "none") != "none":
        return f"logger={task.logger.name} writes one logger run per process"
    if t.amp:
        return "trainer.amp=true: autocast is not applied to stacked members"
    if t.compile:
        return "trainer.compile=true: the vmapped forward is not compiled"
    if task.optimizer.name in TUNING_FREE:
        from bench.population import _baseline_problem

        return f"optimizer={task.optimizer.name}: {_baseline_problem(str(task.optimizer.name))}"
    if task.optimizer.get("stable"):
        return "optimizer.stable=true: the stacked towers have no stable mode"
    return None


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
        if k != "seed"
        and k != "optimizer.spec"
        and not (k.startswith("optimizer.") and (_is_number(v) or v is None))
        and k not in ("trainer.max_steps",)  # the same for all by the population's construction: see below
    }
    shared["trainer.max_steps"] = identity.get("trainer.max_steps")
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


def _member(task: DictConfig, name: str) -> Any:
    from bench.optim import tower_spec
    from bench.population import Member
    from hypergrad.spec import parse_spec

    if task.optimizer.name == "tower":
        return Member(parse_spec(tower_spec(task.optimizer)), int(task.seed), name)
    return Member(None, int(task.seed), name, task.optimizer)


def member_batches(data: Any, batch_size: int, seeds: Sequence[int]) -> Callable[[int], Any]:
    """Each member's batches, drawn from its own seed exactly as its harness run draws them, stacked (K x batch)."""
    from bench.train import epoch_batch, epoch_permutation

    x_all, y_all = data.train
    n = len(x_all)

    def batches(epoch: int) -> Any:
        e = epoch - 1  # the harness counts completed epochs
        perms = [epoch_permutation(n, s, e, x_all.device) for s in seeds]
        stacked = torch.stack(perms)
        for b in range(math.ceil(n / batch_size)):
            if data.augment is None:
                idx = stacked[:, b * batch_size : (b + 1) * batch_size]
                yield x_all[idx], y_all[idx]
            else:  # each member's own augmentation draw
                pairs = [epoch_batch(data, p, b, batch_size, s, e) for p, s in zip(perms, seeds, strict=True)]
                yield torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

    return batches


def checkpoint_path(folder: Path, names: Sequence[str]) -> Path:
    """Where the population of these members keeps its checkpoint (one file per population)."""
    import hashlib

    digest = hashlib.sha256(",".join(names).encode()).hexdigest()[:12]
    return folder / f"population-{names[0]}-{names[-1]}-{digest}.pt"


def train_jobs(
    tasks: Sequence[DictConfig], names: Sequence[str] | None = None, checkpoints: Path | None = None
) -> list[dict[str, Any]]:
    """Train the stackable configs `tasks` as populations; return each one's `{"metrics", "history"}`.

    `checkpoints`: a folder for the populations' checkpoints (saved every epoch and on a stop request; a rerun
    resumes from them). Raises `bench.population.PopulationError` when the model cannot be stacked (BatchNorm,
    dropout, an RNN) and `bench.population.PopulationStopped` when a stop was requested.
    """
    from bench.data import build_dataset
    from bench.models import build_model
    from bench.optim import build_optimizer
    from bench.population import _train_vectorized, check_vectorizable, group_members, member_metrics
    from bench.train import DTYPES, _device, fingerprint, run_identity, to_dtype

    first = tasks[0]
    t = first.trainer
    device, dtype = _device(t.device), DTYPES[t.get("dtype", "float32")]
    if t.num_threads is not None:
        torch.set_num_threads(t.num_threads)
    data = build_dataset(first.dataset, device)
    to_dtype(data, dtype)

    def make_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)  # as bench.train: the seed, then the dataset (which draws nothing), then the model
        return build_model(first.model, data).to(device, dtype)

    check_vectorizable(make_model(0), str(first.model.name))
    steps_per_epoch = math.ceil(len(data.train[0]) / t.batch_size)
    total = min(steps_per_epoch * t.epochs, t.get("max_steps") or math.inf)

    def make_optimizer(member: Any, params: Sequence[torch.Tensor]) -> Any:
        built = build_optimizer(member.baseline, params, steps_per_epoch, total)
        built.zero_grad = built.optimizer.zero_grad  # type: ignore[attr-defined]
        return built

    names = list(names or [str(i) for i in range(len(tasks))])
    members = [_member(task, name) for task, name in zip(tasks, names, strict=True)]
    plans = group_members(members)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=int(total) * len(plans),
        disable=not t.progress,
        desc=f"{first.model.name}/{first.dataset.name} population of {len(members)}",
        unit="step",
        dynamic_ncols=True,
    )
    out: list[dict[str, Any] | None] = [None] * len(tasks)
    with bar:
        for plan in plans:
            seeds = [members[i].seed for i in plan]
            start = time.perf_counter()
            results = _train_vectorized(
                [make_model(s) for s in seeds],
                [members[i] for i in plan],
                plan,
                member_batches(data, t.batch_size, seeds),
                {"val": data.val, "test": data.test},
                t.epochs,
                t.get("max_steps"),
                t.eval_batch_size,
                None,
                make_optimizer,
                str(first.model.name),
                per_member=True,
                diverge_factor=t.get("diverge_factor"),
                on_step=bar.update,
                checkpoint=None if checkpoints is None else checkpoint_path(checkpoints, [names[i] for i in plan]),
            )
            wall = time.perf_counter() - start
            for k, (i, r) in enumerate(zip(plan, results, strict=True)):
                extra = {"size": len(plan), "index": k, "dtype": str(t.get("dtype", "float32")), "wall_time_s": wall}
                # A member's own cost is its share of the population: the report adds wall times up as compute.
                metrics = member_metrics(tasks[i], r, wall / len(plan), extra)
                identity = run_identity(tasks[i])
                metrics.update(config=identity, config_fingerprint=fingerprint(identity))
                from bench.io import to_jsonable

                out[i] = {"metrics": to_jsonable(metrics), "history": r.history}
    return [o for o in out if o is not None]


def _land(result: dict[str, Any]) -> Callable[[DictConfig], float | None]:
    """A task function that writes a population member's results into the job's directory (run_job made it)."""

    def task(cfg: DictConfig) -> float | None:
        from hydra.core.hydra_config import HydraConfig

        from bench.io import atomic_write_csv, atomic_write_json, remove_stale_temp_files
        from bench.train import format_summary

        out = Path(HydraConfig.get().runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)
        # history.csv first: a metrics.json on disk always has its history next to it (as bench.train writes).
        atomic_write_csv(out / "history.csv", result["history"])
        atomic_write_json(out / "metrics.json", result["metrics"])
        log.info("%s", format_summary(result["metrics"], out))
        return result["metrics"].get("val_error")

    return task


def load_jobs(context: Any, config: DictConfig, jobs: Sequence[tuple[list[str], int]]) -> list[Job]:
    """Each job's sweep config, as the basic launcher loads it, and its task config."""
    from hydra.core.hydra_config import HydraConfig

    out = []
    for overrides, num in jobs:
        sweep_config = context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = num
            sweep_config.hydra.job.num = num
            sweep_config.hydra.runtime.output_dir = str(_output_dir(sweep_config))
        HydraConfig.instance().set_config(sweep_config)  # ${hydra:...} in the task config resolves per job
        out.append(Job(num, overrides, sweep_config, _task_config(sweep_config)))
    return out


def land(context: Any, job: Job, task_function: Any) -> Any:
    """Run one job through Hydra's run_job: its population's results, or (run alone) the ordinary task function."""
    from hydra.core.utils import run_job

    task = task_function if job.result is None else _land(job.result)
    return run_job(
        hydra_context=context,
        task_function=task,
        config=job.config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


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
    checkpoints = Path(str(config.hydra.sweep.dir)) / ".population"
    for chunk in chunks:
        nums = [job.num for job in chunk]
        log.info("population of %d: jobs %s", len(chunk), ", ".join(f"#{n}" for n in nums))
        HydraConfig.instance().set_config(chunk[0].config)
        try:
            results = _train_until_stopped([job.task for job in chunk], [str(n) for n in nums], checkpoints)
        except PopulationError as e:
            for job in chunk:
                alone[job.num] = str(e).split(": ", 1)[-1].split("; use ")[0]
            continue
        for job, result in zip(chunk, results, strict=True):
            job.result = result
    runs = []
    for job in jobs:
        if job.num in alone:
            log.info("job #%d runs alone: %s", job.num, alone[job.num])
        runs.append(land(context, job, launcher.task_function))
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    shutil.rmtree(checkpoints, ignore_errors=True)  # every job landed: nothing left to resume
    return runs


def _train_until_stopped(tasks: Sequence[DictConfig], names: Sequence[str], checkpoints: Path) -> list[dict[str, Any]]:
    """`train_jobs`, where SIGINT or SIGTERM saves the checkpoint and ends the sweep (128 + signal, one line)."""
    import sys

    import bench.train
    from bench.population import PopulationStopped

    checkpoints.mkdir(parents=True, exist_ok=True)
    with bench.train._stop_on_signals():
        try:
            return train_jobs(tasks, names, checkpoints)
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
    from bench.population import PopulationStopped

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
            results = train_jobs([job.task for job in jobs], [str(job.num) for job in jobs], checkpoints)
        except PopulationStopped:
            bench.train._preempted = True
            preemption.on_job_end(jobs[0].config, ended)  # requeues (USR2) or exits (SIGTERM)
            raise
        finally:
            bench.train._checkpoint_requested = False
        preemption.on_job_end(jobs[0].config, ended)
        for job, result in zip(jobs, results, strict=True):
            job.result = result
    runs = [land(context, job, launcher.task_function) for job in jobs]
    if len(jobs) > 1:
        shutil.rmtree(checkpoints, ignore_errors=True)  # every job of it landed: nothing left to resume
    return runs
