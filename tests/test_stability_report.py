"""scripts/stability_report.py: the goal's "decades of top hyper-step" counts only measured decades. A grid that ran
top hyper-steps 1e-10, 1e-7, 1e-4 and 1e-1 cannot show 4 decades, however well each of them does; hyper-steps one
decade apart can, and one that misses (or a failed run inside it) breaks the run. The report reads several results
files, a later file's run replacing an earlier one's with the same key, and says where each row came from; a Hydra sweep
of the `experiment=stability` preset is read as the grid's runs."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from bench.schema import stability_key
from tests.harness_helpers import REPO, bench_env, run_bench, run_text

spec = importlib.util.spec_from_file_location("stability_report", REPO / "scripts" / "stability_report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

FIXED_LRS = [f"1e{e}" for e in range(-11, 2)]  # height 0 at every decade, as the grid's `fixed` part
TOWER_LRS = FIXED_LRS[::2]  # 1e-11 .. 1e1 every second decade: 12 decades, as the grid's `towers` part
BEST = 0.060  # the best fixed run's test error; the goal's band ends at 0.070


def row(
    height: int, lr: str, k: str | None, err: float, status: str = "completed", loss: float = 0.2, extra: tuple = ()
) -> dict:
    mode = "stable" if height else "ref"
    key = "_".join([f"adam_h{height}_lr{lr}_k{k}_{mode}_seed0", *extra])  # as the grid names a run
    return dict(key=key, base="adam", height=height, lr=lr, hyper_lr=k, stable=bool(height), seed=0, extra=list(extra),
                status=status, diverged=status == "diverged", test_error=err, train_loss=loss, steps=480,
                wall_time_s=3.0, hyperparameters=None, error=None)  # fmt: skip


def fixed_rows(extra: tuple[str, ...] = ()) -> list[dict]:
    """Height 0 at every decade, the best (BEST) at 1e-3; the run at 1e-11 stands for the initial loss (2.3)."""
    return [row(0, lr, None, BEST if lr == "1e-3" else 0.5, loss=2.3 if lr == "1e-11" else 0.2, extra=extra)
            for lr in FIXED_LRS]  # fmt: skip


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def decades_of(paths: list[Path]) -> dict:
    """The report's hyper-step decades of the stable adam height-3 towers, per measure, read from ``paths``."""
    _, robust = report.robustness(report.cells(report.load(paths)))
    return dict(report.hyper_decades(robust).set_index(["mode", "base", "height"]).loc[("stable", "adam", 3)])


def measured(tmp_path: Path, towers: dict[str, dict[str, float]], status: dict[tuple[str, str], str]) -> dict:
    """Write a results file (height 0 at every decade; height-3 towers at 0.065 unless ``towers[k][lr]`` says
    otherwise) and read the report's hyper-step decades back from it, per measure."""
    lines = fixed_rows()
    for k, errs in towers.items():
        for lr in TOWER_LRS:
            lines.append(row(3, lr, k, errs.get(lr, 0.065), status.get((k, lr), "completed")))
    return decades_of([write(tmp_path / "results.jsonl", lines)])


def test_consecutive_decades_that_each_keep_8_decades_of_initial_step_size_count_their_span(tmp_path: Path) -> None:
    ks = ["1e-10", "1e-9", "1e-8", "1e-7", "1e-6"]
    assert measured(tmp_path, {k: {} for k in ks}, {}) == dict(hyper_decades=4.0, hyper_span=4.0)


def test_hyper_steps_three_decades_apart_count_no_decade_however_well_each_does(tmp_path: Path) -> None:
    ks = ["1e-10", "1e-7", "1e-4", "1e-1"]
    # The coarse span would call this 9 decades; only the measured ones count, and no two are one decade apart.
    assert measured(tmp_path, {k: {} for k in ks}, {}) == dict(hyper_decades=0.0, hyper_span=9.0)


@pytest.mark.parametrize(
    ("errs", "status"),
    [({"1e-5": 0.071}, {}), ({}, {("1e-8", "1e-5"): "diverged"})],
    ids=["one cell 1.1 points above the best", "one run diverged"],
)
def test_a_measured_decade_that_misses_breaks_the_run(
    tmp_path: Path, errs: dict[str, float], status: dict[tuple[str, str], str]
) -> None:
    ks = ["1e-10", "1e-9", "1e-8", "1e-7", "1e-6"]
    # At 1e-8 the initial step sizes within 1 point are 1e-11..1e-7 and 1e-3..10: 4 decades each, not 8.
    towers = {k: (errs if k == "1e-8" else {}) for k in ks}
    assert measured(tmp_path, towers, status) == dict(hyper_decades=1.0, hyper_span=1.0)


def test_no_hyper_step_that_keeps_8_decades_reads_minus_one(tmp_path: Path) -> None:
    ks = ["1e-10", "1e-9"]
    towers = {k: {"1e-7": 0.2, "1e-1": 0.2} for k in ks}  # within 1 point over 4 decades at most
    assert measured(tmp_path, towers, {}) == dict(hyper_decades=-1.0, hyper_span=-1.0)


FIVE = ["1e-10", "1e-9", "1e-8", "1e-7", "1e-6"]  # 4 decades of top hyper-step when every one keeps 8 decades


def towers(errs: dict[tuple[str, str], float] | None = None) -> list[dict]:
    """Stable height-3 towers at every FIVE hyper-step and grid step size, 0.065 unless ``errs[(k, lr)]`` says."""
    return [row(3, lr, k, (errs or {}).get((k, lr), 0.065)) for k in FIVE for lr in TOWER_LRS]


def test_a_later_file_replaces_an_earlier_files_run_with_the_same_key_and_says_so(tmp_path: Path) -> None:
    # The old file's run at k = 1e-8, initial step size 1e-5 missed by 1.1 points; a rerun (a new file) did not.
    old = write(tmp_path / "old.jsonl", fixed_rows() + towers({("1e-8", "1e-5"): 0.071}))
    new = write(tmp_path / "new.jsonl", [row(3, "1e-5", "1e-8", 0.065)])
    assert decades_of([old]) == dict(hyper_decades=1.0, hyper_span=1.0)
    assert decades_of([old, new]) == dict(hyper_decades=4.0, hyper_span=4.0)
    assert decades_of([new, old]) == dict(hyper_decades=1.0, hyper_span=1.0)  # the order given decides
    src = report.sources(report.load([old, new])).set_index(["mode", "height"]).loc[("stable", "3")]
    assert (src["runs"], src["files"], src["replaced"]) == (35, "new.jsonl (1), old.jsonl (34)", 1)


def test_a_copy_of_a_run_in_two_files_counts_once(tmp_path: Path) -> None:
    rows = fixed_rows() + towers({("1e-8", "1e-5"): 0.071})
    a, b = write(tmp_path / "a.jsonl", rows), write(tmp_path / "b.jsonl", rows)
    df = report.load([a, b])
    assert len(df) == len(rows)
    assert report.sources(df)["replaced"].sum() == 0  # an identical copy replaces no result


def test_a_folder_is_its_jsonl_files_and_a_file_named_after_it_wins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "data"
    d.mkdir()
    write(d / "a_rerun.jsonl", [row(3, "1e-5", "1e-8", 0.065)])
    write(d / "b_old.jsonl", fixed_rows() + towers({("1e-8", "1e-5"): 0.071}))
    (d / "notes.txt").write_text("not results")
    assert decades_of([d, d / "a_rerun.jsonl"]) == dict(hyper_decades=4.0, hyper_span=4.0)
    # Within the folder only the names would order the two results of one run: refused, in one line.
    with pytest.raises(SystemExit):
        report.main([str(d), str(tmp_path / "out")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "run 'adam_h3_lr1e-5_k1e-8_stable_seed0' has different results in a_rerun.jsonl and b_old.jsonl" in last
    # The same run in two files of a folder with the same result (a copy) is no conflict.
    write(d / "a_rerun.jsonl", [row(3, "1e-5", "1e-8", 0.071)])
    assert decades_of([d]) == dict(hyper_decades=1.0, hyper_span=1.0)


def test_results_on_two_datasets_are_refused_with_one_line_unless_one_is_chosen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digits = ("dataset=digits", "model=cnn")
    d = tmp_path / "data"
    d.mkdir()
    write(d / "mnist5k.jsonl", fixed_rows() + towers())
    write(d / "digits.jsonl", fixed_rows(digits) + [row(3, lr, "1e-10", 0.5, extra=digits) for lr in TOWER_LRS])
    with pytest.raises(SystemExit):
        report.main([str(d), str(tmp_path / "out")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "datasets ['digits', 'mnist5k']: pass --dataset with one of them" in last
    assert not (tmp_path / "out").exists()  # refused before writing anything
    report.main([str(d), str(tmp_path / "out"), "--dataset", "mnist5k"])
    text = (tmp_path / "out" / "stability.md").read_text()
    assert text.startswith("Dataset mnist5k; 48 runs.") and "digits.jsonl" not in text
    # Another dataset's runs do not conflict with this one's: a second digits file that disagrees is not read.
    write(d / "digits_rerun.jsonl", [row(3, "1e-11", "1e-10", 0.1, extra=digits)])
    report.main([str(d), str(tmp_path / "out"), "--dataset", "mnist5k"])
    with pytest.raises(SystemExit):
        report.main([str(d), str(tmp_path / "out"), "--dataset", "digits"])
    assert "different results in digits.jsonl and digits_rerun.jsonl" in capsys.readouterr().err
    write(d / "fixed_only.jsonl", fixed_rows(digits))
    with pytest.raises(SystemExit):  # fixed runs alone have nothing to compare: one line, not a crash
        report.main([str(d / "fixed_only.jsonl"), str(tmp_path / "out2")])
    assert "must hold tower runs (height >= 1) to report, but bases ['adam'] have none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([str(d), str(tmp_path / "out2"), "--dataset", "cifar10"])
    assert "--dataset must be one of ['digits', 'mnist5k']" in capsys.readouterr().err.strip().splitlines()[-1]


def study(dataset: str, model: str) -> dict:
    """A study_summary.json as bench.tune writes it, reduced to what the report reads."""
    reruns = [dict(seed=s, test_error=e, steps=180, wall_time_s=2.0) for s, e in [(1, 0.010), (2, 0.012), (3, 0.014)]]
    return dict(dataset=dataset, model=model, n_trials=20, reruns=reruns, total_epochs=360, total_steps=3600,
                total_wall_time_s=90.0)  # fmt: skip


def test_the_tuned_baseline_must_be_a_study_on_the_reports_dataset_and_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digits = ("dataset=digits", "model=cnn")
    results = write(tmp_path / "digits.jsonl", fixed_rows(digits) + [row(3, lr, "1e-4", 0.065, extra=digits)
                                                                     for lr in TOWER_LRS])  # fmt: skip
    for name, (dataset, model) in {"mnist5k": ("mnist5k", "mlp"), "digits_mlp": ("digits", "mlp")}.items():
        wrong = tmp_path / f"{name}_study_summary.json"
        wrong.write_text(json.dumps(study(dataset, model)))
        with pytest.raises(SystemExit):
            report.main([str(results), str(tmp_path / "out"), "--tuned", str(wrong)])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert (
            f"--tuned must be a study on the report's dataset and model ('digits', 'cnn'), but {str(wrong)!r} " in last
        )
        assert last.endswith(f"is on ('{dataset}', '{model}')")
        assert not (tmp_path / "out").exists()  # refused before writing anything
    right = tmp_path / "digits_study_summary.json"
    right.write_text(json.dumps(study("digits", "cnn")))
    report.main([str(results), str(tmp_path / "out"), "--tuned", str(right)])
    text = (tmp_path / "out" / "stability.md").read_text()
    # The tuned study's rerun mean (1.2%) and one tower run's share of its steps (480 of 3600) are in the table.
    tuned = next(line for line in text.splitlines() if "adam, Optuna-tuned" in line)
    assert "0.012" in tuned and "20 trials + 3 reruns, 360 epochs in all" in tuned
    tower = next(line for line in text.splitlines() if "stable adam/sgd(0.0001)x3" in line)
    assert "0.1333" in tower  # of_tuned_steps = 480 / 3600


def test_the_report_says_which_environments_each_cell_ran_in_and_warns_only_when_they_differ(tmp_path: Path) -> None:
    # Torch version and thread count move a 30-epoch run's test error by more than round-off: a reader comparing two
    # cells must see when they ran in different environments (rows from before the grid recorded one: "not recorded").
    env = {"torch": "2.14.1+cu130", "python": "3.11.7", "hypergrad": "0.1.0", "device": "cpu", "num_threads": 1}
    old = fixed_rows() + towers()
    new = [{**r, "environment": env} for r in old[:5]]  # five fixed runs rerun in a recorded environment
    one = report.load([write(tmp_path / "one.jsonl", [{**r, "environment": env} for r in old])])
    assert report.environments_note(one) is None
    assert set(report.sources(one)["environments"]) == {
        "torch 2.14.1+cu130, cpu, 1 thread (" + f"{n})" for n in (13, 35)
    }
    assert "environments:" not in report.tables(one, None)
    two = report.load([write(tmp_path / "old.jsonl", old), write(tmp_path / "new.jsonl", new)])
    src = report.sources(two).set_index(["mode", "height"])
    assert src.loc[("reference", "0"), "environments"] == "not recorded (8), torch 2.14.1+cu130, cpu, 1 thread (5)"
    assert src.loc[("stable", "3"), "environments"] == "not recorded (35)"
    note = report.environments_note(two)
    assert note.startswith(
        "These rows come from 2 environments: not recorded (43 runs); torch 2.14.1+cu130, cpu, 1 thr"
    )
    assert note in report.tables(two, None)


# -- the report reads a Hydra sweep of the preset -------------------------------------------------------------------
SWEEP_EXTRA = ["dataset=digits", "model=cnn", "trainer.epochs=1"]  # what the sweep adds to the preset, as the grid does


@pytest.fixture(scope="module")
def preset_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `python -m bench -m experiment=stability ...` sweep (the basic launcher): the momentum base at heights 0
    and 1, two initial step sizes, one top hyper-step, both modes: 8 jobs of one epoch on the digits CNN."""
    tmp = tmp_path_factory.mktemp("preset_sweep")
    sweep = tmp / "sweep"
    args = ["-m", "experiment=stability", *SWEEP_EXTRA, "optimizer.base=sgd", "optimizer.momentum=0.9",
            "optimizer.height=0,1", "optimizer.lr=1e-3,1e-1", "optimizer.hyper_lr=1e-4", "optimizer.stable=false,true",
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = run_bench(args, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def test_a_sweep_of_the_preset_is_read_as_the_grids_runs_with_the_grids_keys_and_numbers(
    preset_sweep: Path, tmp_path: Path
) -> None:
    # A user who ran the preset through Hydra reports it as it is: each job is the grid's row for the same run, its
    # numbers those of its metrics.json; and a run of scripts/stability_grid.py with the same cell is the same run (the
    # same key, the same result), so the two sources can be read together without counting a run twice.
    df = report.load([preset_sweep]).set_index("key")
    assert len(df) == 8 and set(df["base"]) == {"momentum"} and df["dataset"].eq("digits").all()
    for job in sorted(p for p in preset_sweep.iterdir() if (p / "metrics.json").is_file()):
        m = json.loads((job / "metrics.json").read_text())
        cfg = m["config"]
        cell = dict(base="momentum", height=cfg["optimizer.height"], lr={0.001: "1e-3", 0.1: "1e-1"}[cfg["optimizer.lr"]],
                    hyper_lr="1e-4", stable=cfg["optimizer.stable"], seed=0)  # fmt: skip
        r = df.loc[stability_key(cell, SWEEP_EXTRA)]  # the key stability_grid.py writes for this cell
        assert (r["test_error"], r["train_loss"], r["status"], r["steps"]) == (
            m["test_error"], m["train_loss"], m["status"], m["steps"],
        )  # fmt: skip
    results = tmp_path / "grid.jsonl"
    argv = [sys.executable, str(REPO / "scripts" / "stability_grid.py"), str(results), str(tmp_path / "runs"),
            "--bases", "momentum", "--heights", "1", "--tower-lrs", "1e-1", "--hyper-lrs", "1e-4", "--modes", "stable",
            *SWEEP_EXTRA]  # fmt: skip
    proc = run_text(argv, REPO, bench_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = report.load([preset_sweep, results])
    assert len(both) == 8  # the grid's run is the sweep's job, not a ninth run
    src = report.sources(both).set_index(["mode", "height"]).loc[("stable", "1")]
    assert (src["files"], src["replaced"]) == ("grid.jsonl (1), sweep (1)", 0)  # same key, same result


def test_a_sweep_with_an_unfinished_job_is_refused_in_one_line(
    preset_sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A job killed before its end leaves no metrics.json: reporting the sweep without it would drop a run silently
    # (a failed one, perhaps), so the report refuses until every job has finished.
    sweep = tmp_path / "sweep"
    shutil.copytree(preset_sweep, sweep)
    (sweep / "3" / "metrics.json").unlink()
    with pytest.raises(SystemExit) as e:
        report.main([str(sweep), str(tmp_path / "out")])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 of 8 jobs have no metrics.json" in last and "run the sweep again" in last
    assert not (tmp_path / "out" / "stability.md").exists()


def refusal_of_sweep(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run a real sweep (`python -m bench -m args`), report it, and return the report's one refusal line."""
    sweep = tmp_path / "sweep"
    proc = run_bench(["-m", *args, *SWEEP_EXTRA, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.raises(SystemExit):
        report.main([str(sweep), str(tmp_path / "out")])
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_sweep_that_did_not_run_the_preset_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A tower sweep with the default trainer settings is not the grid (other epochs, batch size, threads): its runs
    # would be read as grid cells they are not.
    last = refusal_of_sweep(["optimizer=tower", "optimizer.height=0,1"], tmp_path, capsys)
    assert "must have run experiment=stability (the grid's settings)" in last


def test_a_sweep_with_another_momentum_than_the_grids_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The grid's `momentum` base is SGD with momentum 0.9; a run at 0.5 named `momentum` would sit in its cells.
    args = ["experiment=stability", "optimizer.base=sgd", "optimizer.momentum=0.5", "optimizer.height=1",
            "optimizer.lr=1e-1", "optimizer.hyper_lr=1e-4"]  # fmt: skip
    last = refusal_of_sweep(args, tmp_path, capsys)
    assert "optimizer.momentum must be 0.9 (the grid's momentum base) or 0, but got 0.5" in last
