"""Re-run a tower's base optimizer alone, fixed at the values the tower learned (the paper's re-run rows, Table 1).

    python -m bench.rerun RUNS_DIR --out OUT_DIR [--mode per_seed|mean] [-- HYDRA_OVERRIDES...]

For every finished tower run (height >= 1) below RUNS_DIR, the weight optimizer's final hyperparameters
(`metrics.json`'s `hyperparameters[0]`: learned ones and fixed ones alike) become a height-0 spec, e.g.
`sgd(0.01)/adam(0.1)` that learned lr 0.45 -> `sgd(0.45)`, trained with the same config and seed.
`--mode per_seed` (default) re-runs each seed with its own learned values; `--mode mean` re-runs every seed of
a group (same tower spec) with the mean of the group's learned values.

Each re-run lands in OUT_DIR/<source dir name>/ with the usual metrics.json and history.csv, its composed
config in .hydra/ (so the report knows the experiment preset) and `rerun.json`: the tower it came from, the
source run, the learned values and the spec. A learned value the base optimizer cannot use (a negative step
size, a beta outside (0, 1)) is not a crash: `rerun.json` records status "unusable", the values and why, and
no training happens. OUT_DIR/reruns.csv lists every re-run with its status.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from bench.io import atomic_write, atomic_write_csv, atomic_write_json
from hypergrad import parse_spec
from hypergrad.spec import Level, Tower, format_spec

__all__ = ["RerunPlan", "plan_reruns", "rerun_spec", "run_reruns"]


# One planned re-run: source (run dir), rerun_of (tower spec), seed, learned (values), mode, spec (None when
# unusable), status ("planned", "unusable", then the run's own status) and reason.
RerunPlan = dict[str, Any]


def rerun_spec(tower: str, learned: dict[str, float]) -> tuple[str | None, str | None]:
    """The base optimizer of `tower` fixed at `learned`, as a spec; or (None, why) when a value is unusable.

    >>> rerun_spec("sgd(0.01)/adam(0.1)", {"lr": 0.4538})
    ('sgd(0.4538)', None)
    >>> rerun_spec("sgd(0.01)/sgd(0.01)", {"lr": -0.0173})[1]
    'sgd: lr must be in [0, inf), but got -0.0173'
    """
    rule = parse_spec(tower).levels[0].rule
    values = {k: float(v) for k, v in learned.items() if k in rule.defaults}
    try:
        return format_spec(Tower((Level(rule, values),))), None
    except ValueError as e:
        return None, str(e)


def _finished_towers(runs_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(runs_dir.rglob("metrics.json")):
        if any(p.startswith(".") for p in path.relative_to(runs_dir).parts):
            continue
        metrics = json.loads(path.read_text())
        if metrics.get("family") != "tower" or int(metrics.get("height", 0)) < 1:
            continue
        if metrics.get("status") != "completed" or not metrics.get("hyperparameters"):
            continue  # a diverged or unfinished tower learned nothing worth re-running
        found.append((path.parent, metrics))
    return found


def plan_reruns(runs_dir: str | Path, mode: str = "per_seed") -> list[RerunPlan]:
    """What `run_reruns` will train: one plan per finished tower run below `runs_dir`."""
    if mode not in ("per_seed", "mean"):
        raise ValueError(f"`mode` must be per_seed or mean, but got {mode}")
    towers = _finished_towers(Path(runs_dir))
    learned = {src: {k: float(v) for k, v in m["hyperparameters"][0].items()} for src, m in towers}
    if mode == "mean":
        groups: dict[str, list[Path]] = defaultdict(list)
        for src, m in towers:
            groups[m["optimizer"]].append(src)
        for members in groups.values():
            mean = {k: sum(learned[s][k] for s in members) / len(members) for k in learned[members[0]]}
            for s in members:
                learned[s] = mean
    plans = []
    for src, m in towers:
        spec, reason = rerun_spec(m["optimizer"], learned[src])
        plans.append(
            dict(
                source=str(src),
                rerun_of=m["optimizer"],
                seed=m["seed"],
                learned=learned[src],
                mode=mode,
                spec=spec,
                status="planned" if spec else "unusable",
                reason=reason,
            )
        )
    return plans


def _config(source: Path, spec: str, overrides: list[str]) -> tuple[DictConfig, list[str]]:
    cfg = OmegaConf.load(source / ".hydra" / "config.yaml")
    src_overrides = yaml.safe_load((source / ".hydra" / "overrides.yaml").read_text()) or []
    kept = [o for o in src_overrides if not str(o).startswith("optimizer.")]
    new_overrides = [*kept, f"optimizer.spec='{spec}'", *overrides]
    cfg.merge_with_dotlist(overrides)
    from bench.conf import group_defaults

    # A tower built from the sweep keys (optimizer.lr=..., height=...) keeps them in its config; the spec decides
    # them now, so they go back to the preset's defaults (validation refuses a spec beside changed keys).
    (tower_defaults,) = group_defaults("optimizer", "tower")
    with open_dict(cfg):
        for key in ("base", "hyper", "lr", "hyper_lr", "height", "momentum"):
            if key in cfg.optimizer and key in tower_defaults:
                cfg.optimizer[key] = tower_defaults[key]
        cfg.optimizer.spec = spec
        cfg.paths.output_dir = None
    return cfg, new_overrides


def run_reruns(
    runs_dir: str | Path, out_dir: str | Path, mode: str = "per_seed", overrides: list[str] | None = None
) -> list[RerunPlan]:
    """Train every planned re-run of the towers below `runs_dir` into `out_dir`; return the plans with status."""
    from bench.train import run

    out_dir = Path(out_dir)
    plans = plan_reruns(runs_dir, mode)
    for plan in plans:
        source = Path(plan["source"])
        target = out_dir / f"{source.parent.name}_{source.name}"
        target.mkdir(parents=True, exist_ok=True)
        if plan["spec"] is not None:
            cfg, new_overrides = _config(source, plan["spec"], list(overrides or []))
            hydra_dir = target / ".hydra"
            hydra_dir.mkdir(exist_ok=True)
            atomic_write(hydra_dir / "config.yaml", lambda f, c=cfg: f.write(OmegaConf.to_yaml(c)))
            atomic_write(hydra_dir / "overrides.yaml", lambda f, o=new_overrides: f.write(yaml.safe_dump(o)))
            metrics = run(cfg, output_dir=target)
            plan["status"] = str(metrics.get("status"))
            plan["test_error"] = metrics.get("test_error")
        atomic_write_json(target / "rerun.json", dict(plan))
        shown = plan["spec"] or f"unusable ({plan['reason']})"
        print(f"re-run of {plan['rerun_of']} seed {plan['seed']}: {shown} -> {plan['status']}", flush=True)
    rows = [{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in p.items()} for p in plans]
    if rows:
        atomic_write_csv(out_dir / "reruns.csv", rows)
    return plans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rerun", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", help="a finished sweep (or any directory with tower runs below it)")
    parser.add_argument("--out", required=True, help="where the re-runs go (one directory per source run)")
    parser.add_argument("--mode", default="per_seed", help="per_seed (default) or mean")
    parser.add_argument("overrides", nargs="*", help="Hydra-style key=value overrides for every re-run")
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        print(f"error: `runs_dir` must be an existing directory, but got {args.runs_dir}", file=sys.stderr)
        return 2
    if args.mode not in ("per_seed", "mean"):
        print(f"error: `--mode` must be per_seed or mean, but got {args.mode}", file=sys.stderr)
        return 2
    plans = run_reruns(runs_dir, args.out, args.mode, args.overrides)
    if not plans:
        print(
            f"error: `runs_dir` must hold finished tower runs (height >= 1), but {runs_dir} has none", file=sys.stderr
        )
        return 2
    unusable = sum(p["status"] == "unusable" for p in plans)
    print(f"{len(plans)} re-runs in {args.out} ({unusable} unusable: see reruns.csv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
