"""Packaging: the library needs torch alone; everything the harness needs comes with the `bench` extra."""

from __future__ import annotations

import sys

import tomllib

from tests.harness_helpers import REPO, run_text


def test_library_depends_on_torch_alone_and_imports_nothing_of_the_harness() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("<")[0] for d in project["dependencies"]] == ["torch"]
    assert any(d.startswith("torchvision") for d in project["optional-dependencies"]["bench"])
    # Importing and using the library loads none of the bench extra's packages.
    code = (
        "import sys, torch, hypergrad\n"
        "opt = hypergrad.tower('adam/sgd(1e-5)', torch.nn.Linear(2, 1).parameters())\n"
        "torch.nn.Linear(2, 1)(torch.ones(1, 2)).sum().backward()\n"
        "bench = {'torchvision', 'hydra', 'omegaconf', 'optuna', 'wandb', 'pandas', 'matplotlib', 'sklearn'}\n"
        "print(sorted(bench & {m.split('.')[0] for m in sys.modules}))\n"
    )
    proc = run_text([sys.executable, "-c", code], REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_console_scripts_point_at_the_entry_points() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "hypergrad-bench": "bench.__main__:main",
        "hypergrad-tune": "bench.tune:main",
        "hypergrad-report": "bench.report.__main__:cli",
    }
