"""What a run directory holds, stated once: the keys of metrics.json and the columns of history.csv (and the key
that names a run of issue 14's stability grid).

The one trainer (bench/train.py: single runs and populations alike), the report loader
(bench/report/load.py) and the tests all read these names from here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

__all__ = [
    "ENVIRONMENT_KEYS",
    "FINAL_KEYS",
    "HISTORY_COLUMNS",
    "IDENTITY_KEYS",
    "METRICS_KEYS",
    "NUMBER_KEYS",
    "ROUNDOFF_KEYS",
    "STABILITY_GRID_KEYS",
    "STABILITY_MOMENTUM",
    "STABILITY_ROW_FIELDS",
    "TEXT_KEYS",
    "environment_label",
    "environments_counted",
    "hyperparameter_columns",
    "stability_key",
    "stability_overrides",
]

FINAL_KEYS = ("test_error", "test_loss", "val_error", "val_loss", "train_loss")
"""The last epoch's numbers, copied into metrics.json (NaN there, written as null, when no epoch was evaluated)."""

HISTORY_COLUMNS = ("epoch", "steps", "train_loss", "val_loss", "val_error", "test_loss", "test_error", "wall_time_s")
"""history.csv: one row per epoch with these columns, then every level's hyperparameters (`hyperparameter_columns`)."""

IDENTITY_KEYS = ("optimizer", "method", "family", "height", "init", "hyperparameters", "seed", "model", "dataset")
"""What a run is: the optimizer (normalized spec or baseline name), its method (the tower without the base's initial
values), family (tower, baseline, tuning_free), height, initial and final hyperparameters, seed, model and dataset."""

METRICS_KEYS = (
    *FINAL_KEYS,
    "diverged",
    "diverged_step",
    "diverged_reason",
    "epochs",
    "steps",
    "wall_time_s",
    *IDENTITY_KEYS,
    "status",
    "config",
    "config_fingerprint",
    "environment",
)
"""Every key of a run's metrics.json (a population member's adds `population`; a failed run's adds `error`)."""

ENVIRONMENT_KEYS = ("torch", "python", "hypergrad", "device", "num_threads")
"""metrics.json's `environment` (bench.train.environment): where the run trained, which is not part of its identity
(a run may resume on another machine) yet decides its round-off. A run resumed from a checkpoint written in another
environment adds `resumed_from`: the checkpoint's environment."""

ROUNDOFF_KEYS = ("torch", "device", "num_threads")
"""The environment keys that change a run's numbers by round-off (which training amplifies): runs that agree on them
give bitwise the same results for the same config."""

NUMBER_KEYS = (*FINAL_KEYS, "wall_time_s", "epochs", "steps")
"""metrics.json keys that hold a number or null."""

TEXT_KEYS = ("method", "family", "dataset", "model", "optimizer", "status")
"""metrics.json keys that hold a string."""


def hyperparameter_columns(levels: list[dict[str, float]]) -> dict[str, float]:
    """A history row's hyperparameter columns: `L1.lr`, `L2.lr`, ... (level 1 is the weights' optimizer).

    >>> hyperparameter_columns([{"lr": 0.01, "beta1": 0.9}, {"lr": 1e-05}])
    {'L1.lr': 0.01, 'L1.beta1': 0.9, 'L2.lr': 1e-05}
    """
    return {f"L{k}.{name}": value for k, level in enumerate(levels, start=1) for name, value in level.items()}


def environment_label(environment: object) -> str:
    """An environment in words, by the keys that decide round-off; "unknown" for a run that did not record one.

    >>> environment_label({"torch": "2.5.1", "python": "3.11.7", "device": "cpu", "num_threads": 2})
    'torch 2.5.1, cpu, 2 threads'
    >>> environment_label(None)
    'unknown'
    """
    if not isinstance(environment, dict):
        return "unknown"
    threads = environment.get("num_threads")
    label = f"torch {environment.get('torch')}, {environment.get('device')}, {threads} thread{'s' * (threads != 1)}"
    if "resumed_from" in environment:
        label += f" (resumed from {environment_label(environment['resumed_from'])})"
    return label


def environments_counted(labels: Iterable[str]) -> tuple[int, str] | None:
    """How many environments the runs' labels name, and each label (sorted) with its count of runs; None when they all
    share one (the reports then say nothing about environments).

    >>> environments_counted(["torch 2.5.1, cpu, 1 thread", "unknown", "torch 2.5.1, cpu, 1 thread"])
    (2, 'torch 2.5.1, cpu, 1 thread (2 runs); unknown (1 run)')
    >>> environments_counted(["unknown", "unknown"]) is None
    True
    """
    counts = Counter(labels)
    if len(counts) < 2:
        return None
    return len(counts), "; ".join(f"{label} ({n} run{'s' * (n != 1)})" for label, n in sorted(counts.items()))


def stability_key(cell: dict[str, object], extra: list[str]) -> str:
    """A run's key in issue 14's stability grid: scripts/stability_grid.py writes it into each row, and
    scripts/stability_report.py gives a sweep job of the `experiment=stability` preset the key of the same run, so
    the two sources name one run alike. ``cell``: base, height (None for a baseline), lr, hyper_lr (as the grid names
    them: "1e-4"), stable, seed; ``extra``: the run's other overrides.

    >>> stability_key(dict(base="adam", height=3, lr="1e-3", hyper_lr="1e-4", stable=True, seed=0), ["dataset=digits"])
    'adam_h3_lr1e-3_k1e-4_stable_seed0_dataset=digits'
    """
    if cell["height"] is None:
        name = f"{cell['base']}_seed{cell['seed']}"
    else:
        mode = "stable" if cell["stable"] else "ref"
        name = f"{cell['base']}_h{cell['height']}_lr{cell['lr']}_k{cell['hyper_lr']}_{mode}_seed{cell['seed']}"
    return "_".join([name, *(e.replace("/", "-") for e in extra)])


STABILITY_MOMENTUM = 0.9
"""The stability grid's ``momentum`` base: SGD with ``optimizer.momentum=0.9``."""

STABILITY_ROW_FIELDS = (
    "status",
    "diverged",
    "test_error",
    "train_loss",
    "steps",
    "wall_time_s",
    "hyperparameters",
    "error",
    "environment",  # torch, device, threads: they decide round-off (rows before the eleventh round lack it)
)
"""What a row of the stability grid keeps of a run's metrics.json, next to its key, cell and ``extra``."""


def stability_overrides(cell: dict[str, object]) -> list[str]:
    """The Hydra overrides that run one cell of issue 14's stability grid (``cell`` as in :func:`stability_key`),
    before its ``seed`` and the run's other overrides.

    >>> stability_overrides(dict(base="momentum", height=3, lr="1e-3", hyper_lr="1e-4", stable=True, seed=0))[1:]
    ['optimizer.base=sgd', 'optimizer.height=3', 'optimizer.lr=1e-3', 'optimizer.hyper_lr=1e-4', \
'optimizer.stable=true', 'optimizer.momentum=0.9']
    """
    if cell["height"] is None:
        # The preset's optimizer keys belong to the tower: a baseline takes the preset's trainer settings only.
        return [f"optimizer={cell['base']}", "trainer.epochs=30", "trainer.batch_size=256", "trainer.num_threads=1"]
    return [
        "experiment=stability",
        f"optimizer.base={'sgd' if cell['base'] == 'momentum' else cell['base']}",
        f"optimizer.height={cell['height']}",
        f"optimizer.lr={cell['lr']}",
        *([f"optimizer.hyper_lr={cell['hyper_lr']}"] if cell["hyper_lr"] is not None else []),
        f"optimizer.stable={str(cell['stable']).lower()}",
        *([f"optimizer.momentum={STABILITY_MOMENTUM}"] if cell["base"] == "momentum" else []),
    ]


STABILITY_GRID_KEYS = frozenset(
    o.split("=", 1)[0]
    for o in stability_overrides(dict(base="momentum", height=1, lr="1", hyper_lr="1", stable=True, seed=0))
) | {"seed", "trainer.progress"}
"""The keys the grid sets for every tower run (:func:`stability_overrides`, its seed, no progress bar): a run's other
overrides are its ``extra``, part of its key."""
