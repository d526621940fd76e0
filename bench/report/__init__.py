"""bench.report: result directories -> sensitivity plots, tuning-cost curves, summary tables and report.md.

`python -m bench.report input=DIR [input=DIR ...]`; from Python, `run(compose_report_config([...]), out)`.
"""

from bench.report.load import ReportInputError, load_runs
from bench.report.pipeline import compose_report_config, run

__all__ = ["ReportInputError", "compose_report_config", "load_runs", "run"]
