"""Run issue 14's stability grid in ONE process (no Hydra launcher start-up per run) and append one JSON line per
run to RESULTS; runs already in RESULTS are skipped, so the script resumes after an interruption and several
processes (different --part or --seeds) can share one file. SIGINT or SIGTERM (a plain `kill`) stops the script:
the run in progress saves its checkpoint and is not recorded, one line says so, and the exit status is 128 + the
signal's number; the same command then resumes that run from its checkpoint and goes on with the grid.

    python scripts/stability_grid.py RESULTS.jsonl OUT_DIR [--part towers|fixed|baselines] [options] [override ...]

Parts: `fixed` is height 0 (the base with fixed hyperparameters) at every decade of --lrs; `towers` is
--heights x --hyper-lrs x --modes x --bases x --tower-lrs (every second decade); `baselines` is the tuning-free
optimizers and Adam(1e-3) at their documented defaults. Extra overrides (e.g. `trainer.epochs=10`,
`dataset=digits model=cnn`) apply to every run and are part of each run's key. The `experiment=stability` preset
is the same grid through Hydra's launcher (`python -m bench -m experiment=stability`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from bench.schema import STABILITY_ROW_FIELDS, stability_key, stability_overrides

CONF = Path(__file__).resolve().parents[1] / "bench" / "conf"
BASES = ["sgd", "momentum", "adam", "adagrad", "rmsprop", "adamw"]  # momentum: bench.schema.STABILITY_MOMENTUM
# Twelve decades: the goal's eight must fit inside wherever a base's good step sizes lie (SGD's best fixed step
# size on the MNIST MLP is about 1, Adam's 1e-3).
LRS = ["1e-11", "1e-10", "1e-9", "1e-8", "1e-7", "1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1", "1e0", "1e1"]
HYPER_LRS = ["1e-10", "1e-7", "1e-4", "1e-1"]
BASELINES = ["adam", "prodigy", "dadapt_adam", "dog", "schedulefree_adamw"]


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def grid(args: argparse.Namespace) -> list[dict[str, object]]:
    seeds = [int(s) for s in args.seeds]
    if args.part == "baselines":
        return [
            dict(base=b, height=None, lr=None, hyper_lr=None, stable=None, seed=s) for s in seeds for b in BASELINES
        ]
    if args.part == "fixed":
        cells = itertools.product(seeds, args.bases, args.lrs)
        return [dict(base=b, height=0, lr=lr, hyper_lr=None, stable=False, seed=s) for s, b, lr in cells]
    modes = [m == "stable" for m in args.modes]
    cells = itertools.product(seeds, [int(h) for h in args.heights], args.hyper_lrs, modes, args.bases, args.tower_lrs)
    return [dict(base=b, height=h, lr=lr, hyper_lr=k, stable=st, seed=s) for s, h, k, st, b, lr in cells]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--part", choices=["towers", "fixed", "baselines"], default="towers")
    p.add_argument("--bases", type=_csv, default=BASES)
    p.add_argument("--heights", type=_csv, default=["3"])
    p.add_argument("--lrs", type=_csv, default=LRS, help="initial step sizes of the fixed part")
    p.add_argument("--tower-lrs", type=_csv, default=LRS[::2], help="initial step sizes of the towers part")
    p.add_argument("--hyper-lrs", type=_csv, default=HYPER_LRS)
    p.add_argument("--modes", type=_csv, default=["ref", "stable"])
    p.add_argument("--seeds", type=_csv, default=["0"])
    args, extra = p.parse_known_args(argv)
    from bench.train import Interrupted, run

    with initialize_config_dir(str(CONF), version_base=None):
        for c in grid(args):
            k = stability_key(c, extra)
            # Re-read before every run: other processes may append to the same file.
            if args.results.is_file() and any(
                json.loads(line)["key"] == k for line in args.results.read_text().splitlines() if line.strip()
            ):
                continue
            ov = [*stability_overrides(c), f"seed={c['seed']}", "trainer.progress=false", *extra]
            try:
                m = run(compose("config", overrides=ov), args.out_dir / k)
            except Interrupted as e:  # a stop asked from outside is not a result of the run
                print(
                    f"stopped by signal {e.signum} at step {e.step} of run {k} (not recorded; its checkpoint is "
                    "saved): rerun the same command to resume it and finish the grid",
                    file=sys.stderr,
                )
                sys.exit(128 + e.signum)
            except KeyboardInterrupt:  # a second Ctrl-C, before the checkpoint was saved
                print(f"stopped during run {k} (not recorded): rerun the same command to redo it", file=sys.stderr)
                sys.exit(130)
            except Exception as e:  # a crashed run is a result of the grid, not the end of it
                m = {"status": "crashed", "error": f"{type(e).__name__}: {e}"}
            row = {"key": k, **c, "extra": extra, **{f: m.get(f) for f in STABILITY_ROW_FIELDS}}
            row = {f: (None if isinstance(v, float) and not math.isfinite(v) else v) for f, v in row.items()}
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(k, row["status"], row["test_error"], flush=True)


if __name__ == "__main__":
    main()
