"""Compute in a machine-independent unit: optimizer steps x batch size x a calibrated per-optimizer step cost.

Wall time measured while other jobs share the CPU says more about the neighbours than about the method (the
same run took 0.80 s alone and 1.72 s inside a 2-job sweep). Here each optimizer's cost of one training step
is measured once per device, in isolation (one thread, nothing else in this process, the minimum over
repeats), relative to plain SGD on the same model and batch, and cached:

    compute = steps x batch_size x step_cost(optimizer) / step_cost(sgd)     ("SGD-equivalent examples")

so a tower's extra cost per step counts, and a sweep's concurrency does not.

    python -m bench.calibrate RUNS_DIR [--cache FILE]     measure every optimizer found below RUNS_DIR

The cache is FILE, else $HYPERGRAD_CALIBRATION_CACHE, else ~/.cache/hypergrad/step_cost.json (the test suite
points the variable into each test's tmp dir, so tests never write into the user's home).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bench.io import atomic_write_json

__all__ = ["CACHE_ENV", "calibrate", "default_cache", "device_key", "measure_step_seconds", "relative_cost"]

CACHE_ENV = "HYPERGRAD_CALIBRATION_CACHE"
_REFERENCE = "sgd(0.01)"


def default_cache() -> Path:
    """Where calibrations are kept: $HYPERGRAD_CALIBRATION_CACHE, else ~/.cache/hypergrad/step_cost.json.

    Read at each call, not at import, so a test (or a job script) that sets the variable is obeyed.
    """
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/hypergrad/step_cost.json").expanduser()


def device_key(device: str = "cpu") -> str:
    """What a calibration is valid for: the device, its name, and the torch version."""
    name = torch.cuda.get_device_name() if device.startswith("cuda") else (torch.backends.cpu.get_cpu_capability())
    return f"{device}|{name}|torch {torch.__version__}"


def measure_step_seconds(cfg: DictConfig, spec: str | None = None, steps: int = 20, repeats: int = 3) -> float:
    """Seconds of one training step (forward, backward, optimizer) of `cfg`'s model and optimizer, in isolation.

    `spec` replaces the optimizer with that tower spec (e.g. the SGD reference). One thread, the model on a
    fixed batch of the run's batch size, the minimum over `repeats` timings of `steps` steps after a warm-up.
    """
    from bench.data import build_dataset
    from bench.models import build_model
    from bench.optim import build_optimizer

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if spec is not None:
        cfg.optimizer = OmegaConf.create({"name": "tower", "spec": spec})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        data = build_dataset(cfg.dataset, torch.device("cpu"))
        model = build_model(cfg.model, data)
        opt = build_optimizer(cfg.optimizer, model.parameters(), 1, steps * (repeats + 1)).optimizer
        x, y = data.train[0][: cfg.trainer.batch_size], data.train[1][: cfg.trainer.batch_size]

        def step() -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        for _ in range(3):
            step()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best = min(best, (time.perf_counter() - start) / steps)
        return best
    finally:
        torch.set_num_threads(threads)


def _cache_key(cfg: DictConfig, optimizer: str) -> str:
    return f"{device_key()}|{cfg.model.name}|{cfg.dataset.name}|batch {cfg.trainer.batch_size}|{optimizer}"


def calibrate(runs_dir: str | Path, cache: str | Path | None = None) -> dict[str, float]:
    """Relative step cost (vs SGD on the same model and batch) of every optimizer below `runs_dir`, cached.

    Keys are metrics.json's `optimizer`; each method is measured once per device, model, dataset and batch size.
    """
    cache = Path(cache) if cache is not None else default_cache()
    stored: dict[str, Any] = json.loads(cache.read_text()) if cache.is_file() else {}
    costs: dict[str, float] = {}
    n_stored = len(stored)
    for metrics_path in sorted(Path(runs_dir).rglob("metrics.json")):
        cfg_path = metrics_path.parent / ".hydra" / "config.yaml"
        if not cfg_path.is_file():
            continue
        metrics = json.loads(metrics_path.read_text())
        optimizer = metrics.get("optimizer")
        if optimizer in costs:
            continue
        cfg = OmegaConf.load(cfg_path)
        # Keyed by method (the optimizer without its weight level's values): a step costs the same whatever
        # the step size, so re-runs at each seed's learned values share one measurement.
        key, ref_key = _cache_key(cfg, str(metrics.get("method", optimizer))), _cache_key(cfg, _REFERENCE)
        if ref_key not in stored:
            stored[ref_key] = measure_step_seconds(cfg, _REFERENCE)
        if key not in stored:
            try:
                stored[key] = measure_step_seconds(cfg)
            except (ArithmeticError, RuntimeError, ValueError) as e:
                # An optimizer that diverges within the few timed steps (an initial step size of 1e38): its
                # cost stays unknown (null) and the report counts it as SGD's, never as its wall time.
                print(f"calibration of {optimizer} failed ({type(e).__name__}); its step cost counts as SGD's")
                stored[key] = None
        if stored[key] is not None:
            costs[optimizer] = stored[key] / stored[ref_key]
    if len(stored) > n_stored:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, stored)
    return costs


def relative_cost(costs: dict[str, float], optimizer: str) -> float:
    """The calibrated cost of `optimizer` relative to SGD; 1.0 (and never wall time) when it was not measured."""
    return float(costs.get(optimizer, 1.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir")
    parser.add_argument("--cache", default=None, help=f"default: ${CACHE_ENV}, else ~/.cache/hypergrad/step_cost.json")
    args = parser.parse_args(argv)
    if not Path(args.runs_dir).is_dir():
        print(f"error: `runs_dir` must be an existing directory, but got {args.runs_dir}", file=sys.stderr)
        return 2
    costs = calibrate(args.runs_dir, args.cache)
    for optimizer, cost in sorted(costs.items(), key=lambda kv: kv[1]):
        print(f"{cost:6.3f} x sgd  {optimizer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
