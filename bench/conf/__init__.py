"""Hydra configs of the harness (a package so that `pkg://bench.conf` finds them when installed)."""
