"""A whole sweep through three Hydra launchers; time per step of K stacked towers against K sequential runs.

Part 1 (``--sweep full|reduced``): the `experiment=sensitivity_mnist5k` sweep (132 jobs: 4 heights x 11 step sizes x
3 seeds, 80 steps each) run end to end as a user runs it, `python -m bench -m experiment=sensitivity_mnist5k`, through
the basic launcher, through joblib with 2 workers and through `hydra/launcher=population`: whole-sweep wall time
(process start to exit) and the ratios. ``--sweep reduced`` runs 16 of its jobs (4 heights x 4 step sizes, seed 0)
where the full comparison takes too long on a shared machine; it says so in its output.

Part 2, time per step:

The paper's MNIST MLP (784-128-10, tanh; bench.models.mlp) with sgd/sgd towers, one member per initial step size,
batch 256 (the paper's; --batch-size) of random data (the cost does not depend on the values). The vectorized
column times `bench.population.StackedLearner`'s step for all K members at once. The sequential column times steps
of one ordinary run (`nn.Module` + `hypergrad.tower`, `loss.item()` each step, as the harness does) and multiplies by K:
every member of the grid costs the same, so K runs one after another take K times as long. Both are timed in the
same process, interleaved in rounds so that load from other processes hits both alike; the best round is reported.

The floor column times the two large matrix products every member-step needs whatever the implementation (the
784x128 layer's forward and weight gradient): vectorizing removes per-run overhead, not this arithmetic, so one
run's ms/step over the floor bounds the speed-up.

Each K runs in two fresh subprocesses. One measures peak memory: on CPU the growth of the peak resident set while
the population is built and trained (Linux VmHWM, reset first; glibc made to unmap every freed tensor), on CUDA
torch.cuda.max_memory_allocated; the one-time set-up of the libraries is done before and counted in neither. The
other times the steps with glibc keeping freed memory for reuse, as the population launcher sets it (bench/launcher.py).

Every member draws its own batch (the population launcher's case: each member's seed sets its batch order), so
the vectorized step gathers K batches and runs batched matrix products.

    python scripts/bench_population.py [--sweep full|reduced|none] [--sizes 1 8 64 256] [--rounds 5] [--threads 1]
                                       [--batch-size 256] [--device cpu|cuda|all]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

SPEC = "sgd(0.01)/sgd(1e-05)"


def _model(seed: int) -> torch.nn.Module:
    from bench.models.mlp import MLP

    torch.manual_seed(seed)
    return MLP(784, 128, 10)


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set (VmHWM) to the current one
    return _status_mb("VmRSS")


def _peak(device: str, base: float) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20 - base
    return _status_mb("VmHWM") - base


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _population_step(k: int, device: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    from bench.config import compose_config
    from bench.data import Data
    from bench.population import StackedLearner
    from bench.train import _gather

    lrs = torch.logspace(-3, -1, k).tolist()
    cfgs = [compose_config(["model=mlp", f'optimizer.spec="sgd({lr})/sgd(1e-05)"', f"seed={i}", "trainer.device=cpu"])
            for i, lr in enumerate(lrs)]  # fmt: skip
    # Each member's own batch, gathered from a pool as the trainer gathers it from the training set.
    pool_x, pool_y = torch.randn(4 * len(x), *x.shape[1:], device=device), torch.randint(0, 10, (4 * len(x),))
    pool_y = pool_y.to(device)
    split = (pool_x, pool_y)
    data = Data("random", "image", split, split, split, tuple(x.shape[1:]), 10)
    pop = StackedLearner(cfgs, data, torch.device(device), 1, 1)
    pop.health.factor = None  # random data: no divergence rule, every step is timed alike
    idx = torch.stack([torch.randperm(len(pool_x))[: len(x)] for _ in range(k)]).to(device)
    if not pop.per_member:  # K = 1: one seed, one batch
        return lambda: pop.step(pool_x[idx[0]], pool_y[idx[0]], 1)
    return lambda: pop.step(_gather(pool_x, idx), _gather(pool_y, idx), 1)


def _single_step(device: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    import hypergrad

    model = _model(0).to(device)
    opt = hypergrad.tower(SPEC, model.parameters())

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        loss.item()  # the harness reads every step's loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def _time(step: Callable[[], None], steps: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def measure(
    k: int, steps: int, single_steps: int, rounds: int, device: str, batch_size: int, memory: bool
) -> dict[str, float]:
    """Peak memory in MB of the population (all K members) and of one single run (``memory``), or else the
    best-round ms/step of each, with glibc keeping freed memory as the population launcher makes it do."""
    x = torch.randn(batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    warm = _single_step(device, x, y)
    for _ in range(3):  # the libraries' one-time set-up (BLAS workspaces, autograd) is nobody's peak memory
        warm()
    del warm
    base = _reset_peak(device)
    single = _single_step(device, x, y)
    for _ in range(3):
        single()
    single_mb = _peak(device, base)
    base = _reset_peak(device)
    population = _population_step(k, device, x, y)
    for _ in range(3):  # warm-up: allocations, the first hypergradient graph, CUDA kernels
        population()
    if memory:
        return {"vectorized_mb": _peak(device, base), "single_mb": single_mb}
    best_pop = _time(population, steps, device)
    w = torch.randn(784, 128, device=device)
    g = torch.randn(len(x), 128, device=device)
    flat = x.flatten(1)

    def floor() -> None:
        flat @ w  # forward of the first layer
        flat.T @ g  # its weight gradient

    best_single = _time(single, single_steps, device)
    best_floor = _time(floor, single_steps, device)
    for _ in range(rounds - 1):
        best_pop = min(best_pop, _time(population, steps, device))
        best_single = min(best_single, _time(single, single_steps, device))
        best_floor = min(best_floor, _time(floor, single_steps, device))
    return {"vectorized_ms": best_pop, "single_ms": best_single, "floor_ms": best_floor}


def _child(k: int, args: argparse.Namespace, device: str) -> dict[str, float]:
    steps = max(2, args.steps // max(1, k // 8))  # about the same wall time for every K
    cmd = [sys.executable, __file__, "--one", str(k), "--steps", str(steps), "--single-steps", str(args.single_steps)]
    cmd += ["--rounds", str(args.rounds), "--device", device, "--threads", str(args.threads)]
    cmd += ["--batch-size", str(args.batch_size)]
    out = {}
    # Memory: a fixed mmap threshold makes glibc return every freed tensor to the system, so the resident set follows
    # the live tensors instead of the allocator's cache (otherwise a run reusing freed memory would look free).
    # Time: a separate child in which glibc keeps freed memory, as the population launcher makes it (with the fixed
    # threshold every large tensor is mapped afresh and page-faulted in at every step, which no training pays).
    for extra, env in (["--memory"], {"MALLOC_MMAP_THRESHOLD_": "65536"}), ([], {}):
        done = subprocess.run(cmd + extra, check=True, capture_output=True, text=True, env=dict(os.environ, **env))
        out.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


REDUCED = ["optimizer.lr=1e-6,1e-4,1e-2,1.0", "seed=0"]  # 4 heights x 4 step sizes x 1 seed = 16 jobs
LAUNCHERS = {
    "basic": [],
    "joblib, 2 workers": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "population": ["hydra/launcher=population"],
    # The preset pins trainer.num_threads=1 (many small runs); one population process may use both cores.
    "population, 2 threads": ["hydra/launcher=population", "trainer.num_threads=2"],
}


def time_sweep(kind: str, out: Path) -> dict[str, float]:
    """Wall time of the sensitivity sweep through each launcher (a fresh process each, as a user runs it)."""
    extra = REDUCED if kind == "reduced" else []
    times = {}
    for name, launcher in LAUNCHERS.items():
        sweep_dir = out / name.replace(", ", "_").replace(" ", "_")
        cmd = [sys.executable, "-m", "bench", "-m", "experiment=sensitivity_mnist5k", "trainer.progress=false",
               f"hydra.sweep.dir={sweep_dir}", *extra, *launcher]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        times[name] = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"the {name} sweep failed:\n{done.stderr[-2000:]}")
        metrics = [json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")]
        # Training: the jobs' wall_time_s added up (a population member's is its share of the population's time).
        trained = sum(m["wall_time_s"] for m in metrics)
        print(f"{name:>22}: {times[name]:8.1f} s for {len(metrics)} jobs, of which training {trained:6.1f} s and "
              f"everything else {times[name] - trained:6.1f} s ({sweep_dir})", flush=True)  # fmt: skip
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sweep",
        choices=["full", "reduced", "none"],
        default="full",
        help="the sensitivity_mnist5k sweep through three launchers (reduced: 16 of its 132 jobs)",
    )
    parser.add_argument("--sweep-dir", type=Path, default=None, help="where the sweeps write (default: a temp dir)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--steps", type=int, default=20, help="timed population steps per round at K <= 8")
    parser.add_argument("--single-steps", type=int, default=20, help="timed single-run steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256, help="256 is the paper's")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one is not None:
        if not args.memory:
            from bench.launcher import _keep_freed_memory

            _keep_freed_memory()
        result = measure(
            args.one, args.steps, args.single_steps, args.rounds, args.device, args.batch_size, args.memory
        )
        print(json.dumps(result))
        return

    if args.sweep != "none":
        import tempfile

        jobs = "16 of its 132 jobs (--sweep reduced)" if args.sweep == "reduced" else "all 132 jobs"
        print(f"python -m bench -m experiment=sensitivity_mnist5k: {jobs}, whole-process wall time, 1 thread per job")
        with tempfile.TemporaryDirectory() as tmp:
            times = time_sweep(args.sweep, args.sweep_dir or Path(tmp))
        basic = times["basic"]
        print("  speed-up over basic: " + ", ".join(f"{name} {basic / t:.2f}x" for name, t in times.items()) + "\n")

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"MNIST MLP 784-128-10, batch {args.batch_size}, K towers sgd(lr)/sgd(1e-05); torch {torch.__version__}")
    print(f"CPU threads: {args.threads}; sequential = K x ms/step of one ordinary run; best of {args.rounds} rounds")
    for device in devices:
        where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        print(f"\n{device} ({where})")
        print(
            f"{'K':>5} {'vectorized ms/step':>19} {'sequential ms/step':>19} {'speed-up':>9} {'ms/member-step':>15}"
            f" {'floor ms/member-step':>21} {'peak MB':>9} {'peak MB, one run':>17}"
        )
        for k in args.sizes:
            r = _child(k, args, device)
            seq = k * r["single_ms"]
            print(
                f"{k:>5} {r['vectorized_ms']:>19.2f} {seq:>19.2f} {seq / r['vectorized_ms']:>8.2f}x"
                f" {r['vectorized_ms'] / k:>15.3f} {r['floor_ms']:>21.3f} {r['vectorized_mb']:>9.1f}"
                f" {r['single_mb']:>17.1f}"
            )


if __name__ == "__main__":
    main()
