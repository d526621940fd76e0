"""`python -m bench.report input=DIR [input=DIR ...] [overrides]`: a thin Hydra shell over bench.report.run."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from bench.report.load import ReportInputError
from bench.report.pipeline import CONF_DIR, run


def merge_input_overrides(argv: list[str]) -> list[str]:
    """Quote `input=` paths for Hydra's override grammar and fold repeated ones into one list.

    Hydra alone would keep only the last of `input=A input=B`, and cannot parse a path holding `=` or other
    grammar characters (population member directories are named `lr=0.001_h=0_seed=0`).
    """
    inputs = [a.split("=", 1)[1] for a in argv if a.startswith("input=")]
    if not inputs:
        return argv
    if any(i.startswith("[") for i in inputs):
        if len(inputs) > 1:
            raise SystemExit("error: `input` must be given as one list or as repeated input=DIR, but got both")
        return argv
    quoted = ["'" + i.replace("\\", "\\\\").replace("'", "\\'") + "'" for i in inputs]
    rest = [a for a in argv if not a.startswith("input=")]
    return [*rest, f"input={quoted[0]}" if len(quoted) == 1 else f"input=[{','.join(quoted)}]"]


@hydra.main(config_path=str(CONF_DIR), config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
    except ReportInputError as e:
        # One line and a non-zero exit, not a traceback: the message names the key and the directory.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    n_runs, n_diverged, out = result["n_runs"], result["n_diverged"], result["output_dir"]
    print(f"report: {n_runs} runs ({n_diverged} diverged, counted as misses) -> {out}")
    print(f"  {result['output_dir'] / 'report.md'}")
    if result["environments"]:
        print(result["environments"])


def cli() -> None:
    """The `hypergrad-report` console script (and `python -m bench.report`)."""
    sys.argv = [sys.argv[0], *merge_input_overrides(sys.argv[1:])]
    main()


if __name__ == "__main__":
    cli()
