"""Run the `experiment=stability` grid in ONE process (no Hydra launcher start-up per run) and append one JSON line
per run to RESULTS; runs already in RESULTS are skipped, so the script resumes after an interruption.

    python scripts/stability_grid.py RESULTS.jsonl OUT_DIR [override ...]

Extra overrides (e.g. `trainer.epochs=10`) apply to every run. The grid is the preset's sweep, plus a
momentum base (sgd with optimizer.momentum=0.9) and height 5; height-3 runs go first.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[1] / "bench" / "conf"
BASES = ["sgd", "momentum", "adam", "adagrad", "rmsprop"]
HEIGHTS = [3, 1, 5]
LRS = ["1e-7", "1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]
TOWER_LRS = LRS[::2]  # towers every second decade: the grid has to fit in the time a shared machine gives it
HYPER_LRS = ["1e-10", "1e-7", "1e-4", "1e-1"]


def grid() -> list[dict[str, object]]:
    cells = [dict(base=b, height=0, lr=lr, hyper_lr="1e-4", stable=False) for b in BASES for lr in LRS]
    for h, k, s, b, lr in itertools.product(HEIGHTS, HYPER_LRS, (False, True), BASES, TOWER_LRS):
        cells.append(dict(base=b, height=h, lr=lr, hyper_lr=k, stable=s))
    return cells


def key(c: dict[str, object]) -> str:
    return f"{c['base']}_h{c['height']}_lr{c['lr']}_k{c['hyper_lr']}_{'stable' if c['stable'] else 'ref'}"


def main(results: Path, out_dir: Path, extra: list[str]) -> None:
    from bench.train import run

    done = set()
    if results.is_file():
        done = {json.loads(line)["key"] for line in results.read_text().splitlines() if line.strip()}
    with initialize_config_dir(str(CONF), version_base=None):
        for c in grid():
            if key(c) in done:
                continue
            base = "sgd" if c["base"] == "momentum" else c["base"]
            overrides = [
                "experiment=stability",
                f"optimizer.base={base}",
                f"optimizer.height={c['height']}",
                f"optimizer.lr={c['lr']}",
                f"optimizer.hyper_lr={c['hyper_lr']}",
                f"optimizer.stable={str(c['stable']).lower()}",
                "trainer.progress=false",
                *(["optimizer.momentum=0.9"] if c["base"] == "momentum" else []),
                *extra,
            ]
            cfg = compose("config", overrides=overrides)
            try:
                m = run(cfg, out_dir / key(c))
            except Exception as e:  # a crashed run is a result of the grid, not the end of it
                m = {"status": "crashed", "error": f"{type(e).__name__}: {e}"}
            row = {
                "key": key(c),
                **c,
                **{k: m.get(k) for k in ("status", "diverged", "test_error", "train_loss", "steps", "hyperparameters")},
            }
            row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(row["key"], row["status"], row["test_error"], flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
