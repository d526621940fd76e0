"""`hydra/launcher=population`: an ordinary `-m` sweep, trained as populations, lands exactly as the basic launcher's.

Each test runs the same sweep twice as a user would (`python -m bench -m ...`), once through the basic launcher and
once through the population launcher, and compares the job directories one by one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from tests.harness_helpers import REPO

# digits: 1,000 training images of 8x8, 8 steps of 128 per epoch; float64 so that results agree to round-off.
BASE = [
    "dataset=digits",
    "trainer.epochs=2",
    "trainer.batch_size=128",
    "trainer.dtype=float64",
    "trainer.progress=false",
    "trainer.num_threads=1",
]
TOL = 1e-10  # relative, float64, non-chaotic towers (the bar)
# Keys whose values are the population's own by design (how it was trained, how long it took).
NOT_COMPARED = {"wall_time_s", "population"}


def _sweep(tmp_path: Path, name: str, *overrides: str, launcher: str | None = None) -> tuple[Path, str]:
    out = tmp_path / name
    args = [*BASE, *overrides, f"hydra.sweep.dir={out}"]
    if launcher:
        args.append(f"hydra/launcher={launcher}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def _close(a, b, tol: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or abs(a - b) <= tol * max(abs(a), abs(b))
    return a == b


def _assert_same_jobs(basic: Path, population: Path, tol: float = TOL) -> list[dict]:
    jobs = sorted((d for d in basic.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    assert sorted(d.name for d in population.iterdir() if d.name.isdigit()) == sorted(d.name for d in jobs)
    metrics = []
    for job in jobs:
        other = population / job.name
        a, b = json.loads((job / "metrics.json").read_text()), json.loads((other / "metrics.json").read_text())
        assert set(a) - NOT_COMPARED == set(b) - NOT_COMPARED, job.name
        for key in set(a) - NOT_COMPARED:
            assert _close(a[key], b[key], tol), (job.name, key, a[key], b[key])
        ha, hb = pd.read_csv(job / "history.csv"), pd.read_csv(other / "history.csv")
        assert list(ha.columns) == list(hb.columns), job.name
        numbers = ha.drop(columns="wall_time_s")
        assert _close(numbers.to_numpy().tolist(), hb.drop(columns="wall_time_s").to_numpy().tolist(), tol), job.name
        for name in ("config.yaml", "overrides.yaml"):
            assert (job / ".hydra" / name).read_text() == (other / ".hydra" / name).read_text(), (job.name, name)
        metrics.append(b)
    return metrics


def test_a_sweep_of_mixed_heights_and_seeds_equals_the_basic_launcher_job_by_job(tmp_path):
    sweep = ["optimizer.base=sgd", "optimizer.hyper=sgd", "optimizer.hyper_lr=0.001", "optimizer.lr=0.03,0.3",
             "optimizer.height=0,1,2", "seed=0,1"]  # fmt: skip
    basic, _ = _sweep(tmp_path, "basic", *sweep)
    population, log = _sweep(tmp_path, "population", *sweep, launcher="population")
    # One population of all 12 jobs (three heights, two seeds), none alone.
    assert "population of 12: jobs #0" in log and "runs alone" not in log
    metrics = _assert_same_jobs(basic, population)
    assert all(m["population"]["size"] == 12 for m in metrics)
    # Seeds 0 and 1 of one configuration are two different runs (each member drew its own batches and weights).
    assert metrics[0]["test_loss"] != metrics[1]["test_loss"]

    # The report reads the population sweep exactly as the basic one.
    from bench.report.load import load_runs

    ta, tb = (load_runs([d], progress=False).table for d in (basic, population))
    keep = [c for c in ta.columns if c not in ("run_dir", "wall_time_s")]
    ta, tb = (t.sort_values("run_dir", key=lambda s: s.map(lambda p: int(Path(p).name)))[keep] for t in (ta, tb))
    assert list(ta.columns) == list(tb.columns)
    assert _close(ta.to_numpy().tolist(), tb.to_numpy().tolist(), TOL)


def test_non_stackable_jobs_run_alone_with_the_reason_and_land(tmp_path):
    # Plain SGD stacks (each member its own torch.optim over views into the stack); Prodigy sums over all
    # parameters, so its jobs run one by one through the ordinary task function.
    sweep = ["optimizer=sgd,prodigy", "optimizer.lr=0.05,1.0", "seed=0,1"]
    basic, _ = _sweep(tmp_path, "basic", *sweep)
    population, log = _sweep(tmp_path, "population", *sweep, launcher="population")
    assert "population of 4: jobs #0, #1, #2, #3" in log
    alone = [line for line in log.splitlines() if "runs alone" in line]
    assert len(alone) == 4 and all("optimizer=prodigy: Prodigy estimates its step size" in line for line in alone)
    metrics = _assert_same_jobs(basic, population)
    assert ["population" in m for m in metrics] == [True] * 4 + [False] * 4


def test_a_diverging_member_is_recorded_as_its_single_run_records_it(tmp_path):
    # lr=30 and lr=1e38 (logits not squashed): finite losses that explode past trainer.diverge_factor, or overflow;
    # lr=1e-3: healthy. In one population, each ends exactly as its single run ends.
    sweep = ["optimizer=adam", "model.output_tanh=false", "optimizer.lr=1e-3,30,1e38", "seed=0,1"]
    basic, _ = _sweep(tmp_path, "basic", *sweep)
    population, log = _sweep(tmp_path, "population", *sweep, launcher="population")
    assert "population of 6" in log
    metrics = _assert_same_jobs(basic, population)
    assert [m["status"] for m in metrics] == ["completed"] * 2 + ["diverged"] * 4
    assert all(m["diverged_reason"].startswith("training loss") for m in metrics[2:4])


def test_a_refused_optimizer_step_is_a_diverged_member_not_a_crashed_population(tmp_path):
    # float32: torch.optim.Adam refuses lr=1e38 ("without overflow"); the harness records that run as diverged.
    sweep = ["trainer.dtype=float32", "optimizer=adam", "optimizer.lr=1e-3,1e38", "seed=0,1"]
    population, log = _sweep(tmp_path, "population", *sweep, launcher="population")
    assert "population of 4" in log
    metrics = [json.loads((population / str(i) / "metrics.json").read_text()) for i in range(4)]
    assert [m["status"] for m in metrics] == ["completed", "completed", "diverged", "diverged"]
    assert all(m["diverged_reason"].startswith("optimizer step overflowed") for m in metrics[2:])
    assert [m["diverged_step"] for m in metrics[2:]] == [1, 1] and [m["steps"] for m in metrics[2:]] == [0, 0]


def test_max_members_splits_a_sweep_into_chunks_with_the_same_results(tmp_path):
    sweep = ["optimizer.base=sgd", "optimizer.lr=0.03,0.3", "optimizer.height=0,1", "seed=0,1,2"]
    whole, _ = _sweep(tmp_path, "whole", *sweep, launcher="population")
    chunked, log = _sweep(tmp_path, "chunked", *sweep, "hydra.launcher.max_members=5", launcher="population")
    assert [line.split("population of ")[1].split(":")[0] for line in log.splitlines() if "population of " in line
            and "jobs #" in line] == ["5", "5", "2"]  # fmt: skip
    _assert_same_jobs(whole, chunked)


def test_a_batchnorm_model_in_the_sweep_runs_alone_and_lands(tmp_path):
    sweep = ["model=mlp,resnet20", "optimizer.lr=0.01,0.1", "trainer.max_steps=2"]
    basic, _ = _sweep(tmp_path, "basic", *sweep)
    population, log = _sweep(tmp_path, "population", *sweep, launcher="population")
    assert "population of 2: jobs #0, #1" in log
    alone = [line for line in log.splitlines() if "runs alone" in line]
    assert [line.split("job ")[1].split(" ")[0] for line in alone] == ["#2", "#3"]
    assert all("BatchNorm layer" in line and "running statistics" in line for line in alone)
    _assert_same_jobs(basic, population)


def test_max_steps_and_baseline_schedules_equal_the_basic_launcher(tmp_path):
    # 8 steps per epoch: a cap at an epoch's end and one inside an epoch; momentum with a cosine schedule stacks
    # (each member keeps its own torch.optim optimizer and scheduler).
    sweep = ["optimizer=momentum", "optimizer.schedule=cosine", "optimizer.lr=0.05,0.2", "seed=0,1",
             "trainer.max_steps=8,11", "dataset.train_size=1024"]  # fmt: skip
    basic, _ = _sweep(tmp_path, "basic", *sweep)
    population, log = _sweep(tmp_path, "population", *sweep, launcher="population")
    assert log.count("population of 4") == 2  # max_steps differs: two populations
    metrics = _assert_same_jobs(basic, population)
    assert sorted({(m["steps"], m["epochs"]) for m in metrics}) == [(8, 1), (11, 2)]


def test_weights_with_non_finite_outputs_are_a_diverged_member_as_in_the_harness(tmp_path):
    # One float32 step of size 1e38 leaves a finite training loss but weights whose outputs overflow: the harness
    # records that run as diverged at step 1 with a non-finite validation loss, and so does the population.
    sweep = ["trainer.dtype=float32", "optimizer.base=sgd", "model.output_tanh=false", "trainer.max_steps=1",
             "optimizer.lr=1e38,0.05", "optimizer.height=0,1"]  # fmt: skip
    basic, _ = _sweep(tmp_path, "basic", *sweep)
    population, _ = _sweep(tmp_path, "population", *sweep, launcher="population")
    metrics = _assert_same_jobs(basic, population, tol=1e-5)
    assert [m["status"] for m in metrics] == ["diverged", "diverged", "completed", "completed"]
    assert all(m["diverged_reason"].startswith("non-finite validation loss") for m in metrics[:2])


def test_bad_input_in_a_population_sweep_is_one_line_and_exit_2(tmp_path, bench_cli):
    args = [*BASE, "optimizer.lr=0.1,-1", f"hydra.sweep.dir={tmp_path / 's'}", "hydra/launcher=population"]
    proc = bench_cli("-m", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: `optimizer.lr` must be")


def test_the_sensitivity_preset_is_one_population(tmp_path):
    # Every job of `-m experiment=sensitivity_mnist5k` (4 heights x 11 step sizes x 3 seeds) stacks with every other.
    import itertools

    from bench.config import compose_config
    from bench.launcher import stack_key, why_alone

    params = compose_config(["experiment=sensitivity_mnist5k"], return_hydra_config=True).hydra.sweeper.params
    grid = [[f"{k}={v}" for v in str(values).split(",")] for k, values in params.items()]
    keys = set()
    for combo in itertools.product(*grid):
        cfg = compose_config(["experiment=sensitivity_mnist5k", f"paths.output_dir={tmp_path}", *combo])
        assert why_alone(cfg, tmp_path / "job") is None
        keys.add(stack_key(cfg))
    assert len(list(itertools.product(*grid))) == 132 and len(keys) == 1


def test_a_killed_population_resumes_to_the_same_results(tmp_path):
    import signal
    import time

    # A population saves as a single run does: every trainer.checkpoint_minutes (here 30 ms, so that a checkpoint on
    # disk marks that training is under way) and on SIGTERM.
    sweep = ["optimizer.base=sgd", "optimizer.lr=0.03,0.3", "optimizer.height=0,2", "trainer.epochs=30",
             "trainer.checkpoint_minutes=0.0005"]  # fmt: skip
    whole, _ = _sweep(tmp_path, "whole", *sweep, launcher="population")
    out = tmp_path / "killed"
    args = [*BASE, *sweep, f"hydra.sweep.dir={out}", "hydra/launcher=population"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bench", "-m", *args]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / ".population").glob("*.pt")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # the first timed checkpoint: training is under way
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "rerun the same command" in stderr.strip().splitlines()[-1]
    assert list((out / ".population").glob("*.pt")) and not (out / "0" / "metrics.json").exists()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_jobs(whole, out)
    assert not (out / ".population").exists()  # every job landed: the checkpoint is gone
