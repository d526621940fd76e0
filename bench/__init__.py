"""The benchmark harness: `python -m bench` (runs), `bench.tune` (Optuna studies), `bench.report` (tables)."""

from bench.rundir import register_resolvers

# Before Hydra composes any config: bench/conf/config.yaml's run directories use ${unique:}.
register_resolvers()
