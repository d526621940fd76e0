"""One training run: `run(cfg) -> metrics`, the importable core under `python -m bench`.

A run trains the composed model on the composed dataset with the composed optimizer, evaluates on
the validation and test splits after every epoch, and writes into its run directory (atomically):

- `history.csv`: one row per epoch (metrics and every level's hyperparameters, as `L1.lr`, `L2.lr`, ...),
- `metrics.json`: the final metrics, the run's identity (optimizer, method, family, ...) and its status,
- `checkpoint.pt`: every `trainer.checkpoint_every` epochs, and on request (see `request_checkpoint`).

Statuses: "completed"; "diverged" (a non-finite loss or hyperparameter stopped the run, which still
counts as a result: exit code 0, so a sweep goes on); "pruned" (the epoch callback raised
`optuna.TrialPruned`); "failed" (the epoch callback raised anything else). A directory whose
metrics.json says "completed" or "diverged" is not run again unless `trainer.force=true`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, open_dict
from tqdm.auto import tqdm

import hypergrad
from bench.config import ConfigError, validate
from bench.data import Data, build_dataset
from bench.io import (
    atomic_save_torch,
    atomic_write_csv,
    atomic_write_json,
    remove_stale_temp_files,
    to_jsonable,
)
from bench.logger import RunLogger, build_logger
from bench.models import build_model
from bench.optim import BuiltOptimizer, build_optimizer
from bench.schema import FINAL_KEYS, hyperparameter_columns

__all__ = [
    "FINISHED",
    "Interrupted",
    "RunDirError",
    "fingerprint",
    "format_summary",
    "read_checkpoint",
    "request_checkpoint",
    "run",
    "run_identity",
]

FINISHED = ("completed", "diverged")
"""Statuses of a run directory that a resubmitted sweep must not run again."""

EpochCallback = Callable[[int, dict[str, Any]], None]

_checkpoint_requested = False

log = logging.getLogger(__name__)


def request_checkpoint() -> None:
    """Ask the training loop of this process to save `checkpoint.pt` and stop, e.g. before a preemption.

    Only sets a flag, so it is safe to call from a signal handler (SLURM's pre-kill signal, submitit's
    checkpoint hook). The loop checks the flag after every optimizer step, saves a checkpoint that
    resumes mid-epoch exactly where it stopped, writes no metrics.json, and `run` returns
    `{"status": "preempted", ...}`. Running the same run directory again resumes it.
    """
    global _checkpoint_requested, _preempted
    _checkpoint_requested, _preempted = True, False


_preempted = False


def stopped_for_checkpoint() -> bool:
    """Whether a run of this process saved a checkpoint and stopped since `request_checkpoint()` was last asked."""
    return _preempted


class _CallbackRaised(Exception):
    """Carries what the epoch callback raised out of the loop, so the run directory can record it first."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _is_pruned(error: Exception) -> bool:
    import optuna

    return isinstance(error, optuna.TrialPruned)


class _Diverged(Exception):
    def __init__(self, step: int, reason: str) -> None:
        super().__init__(reason)
        self.step, self.reason = step, reason


# -- the identity of a run directory ------------------------------------------------------------------------------

# Keys that do not change a run's result: where files live, how fast or how visibly it runs, when it saves.
_NOT_IDENTITY = {
    "trainer": {
        "device",
        "num_threads",
        "eval_batch_size",
        "checkpoint_every",
        "checkpoint_minutes",
        "resume",
        "force",
        "progress",
    },
    "dataset": {"data_dir", "download", "path", "verify_checksums"},
}
_IDENTITY_GROUPS = ("dataset", "model", "optimizer", "trainer")


class RunDirError(ConfigError):
    """A run directory that cannot be used as asked (another config's results, a corrupt file); one line."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run after it saved a checkpoint; rerunning the same command resumes it."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"interrupted at step {step}; rerun the same command to resume")
        self.step, self.signum = step, signum


def _flatten(prefix: str, value: Any, into: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, into)
    else:
        into[prefix] = value


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """Every config value that changes a run's result, flat ("optimizer.lr": 0.01); what a run directory is for."""
    from omegaconf import OmegaConf

    identity: dict[str, Any] = {"seed": cfg.get("seed")}
    for group in _IDENTITY_GROUPS:
        node = cfg.get(group)
        if node is None:
            continue
        skip = _NOT_IDENTITY.get(group, set())
        raw = OmegaConf.to_container(node, resolve=False)
        try:
            resolved = OmegaConf.to_container(node, resolve=True)
        except Exception:  # an interpolation that cannot resolve here (e.g. in a saved .hydra/config.yaml)
            resolved = None
        for key in node:
            if key in skip:
                continue
            if resolved is not None:
                value = resolved[key]
            else:
                try:
                    value = OmegaConf.to_container(node, resolve=True)[key]
                except Exception:
                    value = raw[key]
            _flatten(f"{group}.{key}", value, identity)
    if identity.get("trainer.dtype") == "float32":
        del identity["trainer.dtype"]  # the default, and what every run before the key existed used: same identity
    return to_jsonable(identity)


def fingerprint(identity: dict[str, Any]) -> str:
    """A short hash of a run identity, stored in metrics.json next to the identity itself."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def refuse_other_config(
    out: Path, source: str, stored: dict[str, Any] | None, current: dict[str, Any], recorded_only: bool = False
) -> None:
    """Raise `RunDirError` naming the keys where the run directory's recorded config differs from this one.

    `recorded_only`: compare only the keys the record has (a .hydra/config.yaml from before a setting existed).
    """
    if not isinstance(stored, dict) or stored == current:
        return
    keys = sorted(
        k
        for k in (stored.keys() if recorded_only else stored.keys() | current.keys())
        if stored.get(k) != current.get(k)
    )
    if not keys:
        return
    shown = ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in keys[:4])
    more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
    raise RunDirError(
        f"`{out}` holds a run with another config ({source}: {shown}{more}); pass trainer.force=true to start over, "
        "or use another run directory"
    )


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint as tensors and plain containers only (`weights_only=True`: a crafted file runs no code)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on a foreign pickle protocol: the error says enough
            state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or not {"model", "optimizer", "progress"} <= state.keys():
            raise ValueError("not a bench checkpoint")
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        # torch's weights-only refusal names the offending global on a later line; that is the reason to show.
        reason = next((line for line in lines if "Unsupported" in line), lines[0])
        raise RunDirError(
            f"`{path}` cannot be resumed ({reason[:200]}); move it aside and rerun, or pass trainer.force=true to "
            "start over"
        ) from None
    return state


def check_run_dir(out: Path, cfg: DictConfig, hydra_dir: bool) -> dict[str, Any] | None:
    """Refuse a run directory recorded under another config; return its metrics when it already finished."""
    from omegaconf import OmegaConf

    current = run_identity(cfg)
    saved = out / ".hydra" / "config.yaml"
    if hydra_dir and saved.is_file():
        try:
            recorded = run_identity(OmegaConf.load(saved))
            refuse_other_config(out, ".hydra/config.yaml", recorded, current, recorded_only=True)
        except RunDirError:
            raise
        except Exception:
            pass  # unreadable: the recorded results below still decide
    metrics_path = out / "metrics.json"
    if not metrics_path.is_file():
        return None
    try:
        stored = json.loads(metrics_path.read_text())
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(
            f"`{metrics_path}` is not valid JSON ({e}); move it aside and rerun, or pass trainer.force=true to start "
            "over"
        ) from None
    refuse_other_config(out, "metrics.json", stored.get("config"), current)
    return stored if stored.get("status") in FINISHED else None


# -- stopping on SIGINT / SIGTERM ---------------------------------------------------------------------------------

_interrupted_by: int | None = None


def _on_stop_signal(signum: int, frame: Any) -> None:
    global _interrupted_by
    if _interrupted_by is not None:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the step to end
    _interrupted_by = signum
    request_checkpoint()


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """While training: SIGINT and SIGTERM save a checkpoint after the current step, then the run stops.

    Handlers that others installed (submitit's, bench.cluster's) are left alone; so is a non-main thread.
    """
    global _interrupted_by
    _interrupted_by = None
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
                installed[signum] = signal.signal(signum, _on_stop_signal)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


def _resolve_output_dir(output_dir: str | Path | None) -> Path:
    if output_dir is not None:
        return Path(output_dir)
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ValueError("`output_dir` must be given when bench.train.run is called outside a Hydra app, but got None")
    return Path(HydraConfig.get().runtime.output_dir)


def _show_progress(wanted: bool) -> bool:
    """A progress bar only where it stays readable: not in a job of a parallel launcher.

    Parallel workers (joblib, submitit) would draw over each other's line; they log one line per epoch instead.
    """
    if not wanted:
        return False
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    hc = HydraConfig.get()
    return str(hc.mode) != "RunMode.MULTIRUN" or "BasicLauncher" in str(hc.launcher.get("_target_", ""))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Batches are a function of (seed, epoch) alone, so a resumed run draws the very same batches. The modulus only
    # keeps seeds up to 2**32 within torch's 64-bit seed range (smaller values are unchanged).
    return (seed * 1_000_003 + epoch) % 2**63


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The order of the `n` training examples in epoch `epoch` (0-based) of every run with this seed."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch))).to(device)


def epoch_batch(
    data: Data, perm: torch.Tensor, batch: int, batch_size: int, seed: int, epoch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `batch` of that epoch, augmented as every run with this seed sees it (also a population's members)."""
    x_train, y_train = data.train
    idx = perm[batch * batch_size : (batch + 1) * batch_size]
    x = x_train[idx]
    if data.augment is not None:
        x = data.augment(x, torch.Generator().manual_seed((_epoch_seed(seed, epoch) * 100_003 + batch) % 2**63))
    return x, y_train[idx]


DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""`trainer.dtype`: the floating-point type of the model's weights and of the (non-text) inputs."""


def to_dtype(data: Data, dtype: torch.dtype) -> None:
    """Cast the inputs of every split to `dtype` in place (token ids stay integers)."""
    if data.kind == "text" or dtype == torch.float32:
        return
    for split in ("train", "val", "test"):
        x, y = getattr(data, split)
        setattr(data, split, (x.to(dtype), y))


def _loss_and_errors(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and number of wrong predictions (text: per character)."""
    logits, y = logits.flatten(0, -2), y.flatten()
    # Half precision is summed in float32; float64 (trainer.dtype=float64) stays float64.
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    loss = F.cross_entropy(logits, y, reduction="sum")
    # A non-finite output predicts nothing: it counts as wrong, whatever argmax says.
    wrong = (logits.argmax(-1) != y) | ~torch.isfinite(logits).all(-1)
    return loss, wrong.sum()


class _Trainer:
    def __init__(self, cfg: DictConfig, out: Path, epoch_callback: EpochCallback | None) -> None:
        self.cfg, self.out, self.epoch_callback = cfg, out, epoch_callback
        t = cfg.trainer
        self.device = _device(t.device)
        if t.num_threads is not None:
            torch.set_num_threads(t.num_threads)
        torch.manual_seed(cfg.seed)
        self.data: Data = build_dataset(cfg.dataset, self.device)
        dtype = DTYPES[t.get("dtype", "float32")]
        to_dtype(self.data, dtype)
        self.model = build_model(cfg.model, self.data).to(self.device, dtype)
        self.forward = torch.compile(self.model) if t.compile else self.model
        n = len(self.data.train[0])
        self.steps_per_epoch = math.ceil(n / t.batch_size)
        self.total_steps = min(t.epochs * self.steps_per_epoch, t.max_steps or math.inf)
        self.opt: BuiltOptimizer = build_optimizer(
            cfg.optimizer, self.model.parameters(), self.steps_per_epoch, self.total_steps
        )
        self.amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if t.amp else nullcontext()
        # Progress of the run; all of it goes into the checkpoint.
        self.epoch = 0  # completed epochs
        self.batch = 0  # next batch within the current epoch
        self.steps = 0
        self.loss_sum, self.loss_count = 0.0, 0
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []
        self.initial_loss: float | None = None  # the run's first training loss, for the divergence rule
        self.saved_at = time.monotonic()

    # -- checkpoints ---------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "progress": {
                "epoch": self.epoch,
                "batch": self.batch,
                "steps": self.steps,
                "loss_sum": self.loss_sum,
                "loss_count": self.loss_count,
                "elapsed": self.elapsed + time.perf_counter() - self.started,
            },
            "history": self.history,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()},
            "config": run_identity(self.cfg),
            "initial_loss": self.initial_loss,
        }
        atomic_save_torch(self.checkpoint_path, state)
        self.saved_at = time.monotonic()

    def load_checkpoint(self) -> None:
        state = read_checkpoint(self.checkpoint_path, self.device)
        refuse_other_config(self.out, self.checkpoint_path.name, state.get("config"), run_identity(self.cfg))
        self.initial_loss = state.get("initial_loss")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        p = state["progress"]
        self.epoch, self.batch, self.steps = p["epoch"], p["batch"], p["steps"]
        self.loss_sum, self.loss_count, self.elapsed = p["loss_sum"], p["loss_count"], p["elapsed"]
        self.history = state["history"]
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
        """Mean loss and error rate over a split."""
        x, y = split
        loss, wrong = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        bs = self.cfg.trainer.eval_batch_size
        for i in range(0, len(x), bs):
            with self.amp:
                logits = self.forward(x[i : i + bs])
            batch_loss, batch_wrong = _loss_and_errors(logits, y[i : i + bs])
            loss, wrong = loss + batch_loss, wrong + batch_wrong
        return loss.item() / y.numel(), wrong.item() / y.numel()

    def epoch_row(self, epoch: int) -> dict[str, Any]:
        self.model.eval()
        self.opt.eval_mode()
        val_loss, val_error = self.evaluate(self.data.val)
        test_loss, test_error = self.evaluate(self.data.test)
        row = {
            "epoch": epoch,
            "steps": self.steps,
            "train_loss": self.loss_sum / self.loss_count if self.loss_count else math.nan,
            "val_loss": val_loss,
            "val_error": val_error,
            "test_loss": test_loss,
            "test_error": test_error,
            "wall_time_s": self.elapsed + time.perf_counter() - self.started,
        }
        row.update(hyperparameter_columns(self.opt.hyperparameters()))
        return row

    # -- training ------------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with self.amp:
            logits = self.forward(x)
        loss, _ = _loss_and_errors(logits, y)
        loss = loss / y.numel()
        value = loss.item()
        if not math.isfinite(value):
            raise _Diverged(self.steps + 1, f"non-finite training loss ({value})")
        loss.backward()
        try:
            self.opt.step()
        except hypergrad.NonFiniteHyperparameterError as e:
            raise _Diverged(self.steps + 1, f"non-finite hyperparameter: {e}") from None
        except RuntimeError as e:
            # torch.optim refuses a step size that overflows the parameters' dtype (e.g. Adam with lr=1e38):
            # that run diverged, it did not crash.
            if "without overflow" not in str(e):
                raise
            raise _Diverged(self.steps + 1, f"optimizer step overflowed: {e}") from None
        self.opt.optimizer.zero_grad(set_to_none=True)
        return value

    def fit(self, logger: RunLogger) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.trainer
        if t.resume and self.checkpoint_path.is_file():
            self.load_checkpoint()
            log.info("resuming %s from epoch %d, step %d", self.out, self.epoch, self.steps)
        self.started = time.perf_counter()
        x_train = self.data.train[0]
        bar = tqdm(
            total=self.total_steps,
            initial=self.steps,
            disable=not _show_progress(t.progress),
            desc=f"{cfg.model.name}/{cfg.dataset.name} {self.opt.name}",
            unit="step",
            dynamic_ncols=True,
        )
        status, diverged, error = "completed", None, None
        try:
            while self.epoch < t.epochs and self.steps < self.total_steps:
                perm = epoch_permutation(len(x_train), cfg.seed, self.epoch, self.device)
                self.model.train()
                self.opt.train_mode()
                while self.batch < self.steps_per_epoch and self.steps < self.total_steps:
                    x, y = epoch_batch(self.data, perm, self.batch, t.batch_size, cfg.seed, self.epoch)
                    value = self.train_step(x, y)
                    self.check_explosion(value)
                    self.steps += 1
                    self.batch += 1
                    self.loss_sum += value * len(y)
                    self.loss_count += len(y)
                    logger.log_step(self.steps, value, self.opt.hyperparameters)
                    bar.update()
                    if self.steps % 10 == 0:
                        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                    if _checkpoint_requested:
                        self.save_checkpoint()
                        return {"status": "preempted", "steps": self.steps, "output_dir": str(self.out)}
                    minutes = t.get("checkpoint_minutes")
                    if minutes and time.monotonic() - self.saved_at >= 60 * minutes:
                        self.save_checkpoint()
                # When max_steps stops the run inside an epoch, that partial epoch is the run's last row: it is
                # evaluated and reported like any other (a pruner then sees the final value of a finished trial).
                self.end_epoch(logger)
        except _Diverged as d:
            status, diverged = "diverged", d
            if not self.history or self.history[-1]["steps"] != self.steps:
                self.history.append(self.epoch_row(self.epoch + 1))
                logger.log_epoch(self.history[-1])
        except _CallbackRaised as raised:
            # A pruned trial, or the callback's own failure: record it, then let it go on to the caller.
            error = raised.error
            status = "pruned" if _is_pruned(error) else "failed"
        finally:
            bar.close()
        # Exactly what metrics.json holds: non-finite numbers are null there, so they are None here too.
        metrics = to_jsonable(self.metrics(status, diverged, error))
        self.write(metrics)
        logger.finish(metrics)
        if error is not None:
            raise error
        return metrics

    def check_explosion(self, value: float) -> None:
        """The divergence rule for finite losses: a training loss above `trainer.diverge_factor` times the run's
        first training loss means the run exploded (a step size of 2e9 can keep every number finite)."""
        if self.initial_loss is None:
            self.initial_loss = value
        factor = self.cfg.trainer.get("diverge_factor")
        if factor is not None and value > factor * max(self.initial_loss, 1e-12):
            raise _Diverged(
                self.steps + 1,
                f"training loss {value:.4g} exceeded trainer.diverge_factor={factor:g} times its initial value "
                f"{self.initial_loss:.4g}",
            )

    def end_epoch(self, logger: RunLogger, callback: bool = True) -> None:
        self.history.append(self.epoch_row(self.epoch + 1))
        row = self.history[-1]
        self.epoch, self.batch, self.loss_sum, self.loss_count = self.epoch + 1, 0, 0.0, 0
        logger.log_epoch(row)
        log.info(
            "epoch %d: train loss %.4f, val error %.2f%%, test error %.2f%%, %d steps",
            row["epoch"],
            row["train_loss"],
            100 * row["val_error"],
            100 * row["test_error"],
            row["steps"],
        )
        if not math.isfinite(row["val_loss"]):
            # Training losses were finite, yet the weights now give non-finite outputs: as diverged as it gets.
            raise _Diverged(self.steps, f"non-finite validation loss ({row['val_loss']})")
        every = self.cfg.trainer.checkpoint_every
        if every and self.epoch % every == 0:
            self.save_checkpoint()
        if callback and self.epoch_callback is not None:
            try:
                self.epoch_callback(row["epoch"], dict(row))
            except Exception as e:
                raise _CallbackRaised(e) from e

    def metrics(self, status: str, diverged: _Diverged | None, error: Exception | None) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        metrics = {key: last.get(key, math.nan) for key in FINAL_KEYS}
        metrics.update(
            diverged=diverged is not None,
            diverged_step=None if diverged is None else diverged.step,
            diverged_reason=None if diverged is None else diverged.reason,
            epochs=len(self.history),
            steps=self.steps,
            wall_time_s=self.elapsed + time.perf_counter() - self.started,
            optimizer=self.opt.name,
            method=self.opt.method,
            family=self.opt.family,
            height=self.opt.height,
            init=self.opt.init,
            hyperparameters=self.opt.hyperparameters(),
            seed=self.cfg.seed,
            model=self.cfg.model.name,
            dataset=self.cfg.dataset.name,
            status=status,
            config=run_identity(self.cfg),
            config_fingerprint=fingerprint(run_identity(self.cfg)),
        )
        if error is not None:
            metrics["error"] = f"{type(error).__name__}: {error}"
        return metrics

    def write(self, metrics: dict[str, Any]) -> None:
        # history.csv first: a metrics.json on disk always has its history next to it.
        atomic_write_csv(self.out / "history.csv", self.history)
        atomic_write_json(self.out / "metrics.json", metrics)


def run(
    cfg: DictConfig, output_dir: str | Path | None = None, epoch_callback: EpochCallback | None = None
) -> dict[str, Any]:
    """Train and evaluate one run; return its metrics (the content of metrics.json).

    `output_dir=None` means Hydra's runtime output directory. `epoch_callback(epoch, row)` is called
    after each epoch's evaluation with that epoch's history row; if it raises, the run directory
    records the run as "pruned" (`optuna.TrialPruned`) or "failed" and the exception propagates.
    Raises `bench.config.ConfigError` before any work when the config is invalid.
    """
    global _checkpoint_requested
    out = _resolve_output_dir(output_dir)
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    validate(cfg)
    if not cfg.trainer.force:
        stored = check_run_dir(out, cfg, hydra_dir=output_dir is None)
        if stored is not None:
            log.info("skipping %s: metrics.json records a %s run (trainer.force=true reruns it)", out, stored["status"])
            return stored
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    if cfg.trainer.force:
        for name in ("metrics.json", "history.csv", "checkpoint.pt"):
            (out / name).unlink(missing_ok=True)
    global _preempted
    # From here on a signal asks for a checkpoint (saved after the first step when it arrives while data loads).
    with _stop_on_signals():
        trainer = _Trainer(cfg, out, epoch_callback)
        logger = build_logger(cfg, out)
        try:
            metrics = trainer.fit(logger)
            _preempted = _preempted or metrics.get("status") == "preempted"
            if metrics.get("status") == "preempted" and _interrupted_by is not None:
                raise Interrupted(metrics["steps"], _interrupted_by)
            return metrics
        finally:
            logger.finish({})
            # Cleared at the end, not the start: a preemption signal that arrives while the data loads still counts.
            _checkpoint_requested = False


def format_summary(metrics: dict[str, Any], output_dir: str | Path | None = None) -> str:
    """A short human-readable table of a run's result: errors, seed and directory, learned hyperparameters, time."""
    import pandas as pd

    if metrics.get("status") == "preempted":
        return f"preempted after {metrics['steps']} steps; rerun the same run directory to resume"

    def pct(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"

    lines = [
        f"{metrics['optimizer']} on {metrics['model']}/{metrics['dataset']}: {metrics['status']}"
        + (f" at step {metrics['diverged_step']} ({metrics['diverged_reason']})" if metrics["diverged"] else ""),
        f"test error {pct(metrics['test_error'])}, val error {pct(metrics['val_error'])}, "
        f"{metrics['epochs']} epochs, {metrics['steps']} steps, {metrics['wall_time_s']:.1f} s",
    ]
    lines.append(f"seed {metrics.get('seed')}, dir {output_dir or metrics.get('output_dir') or 'n/a'}")
    rows = {"L1 initial": metrics["init"]}
    rows.update({f"L{i} final": hp for i, hp in enumerate(metrics["hyperparameters"], start=1)})
    table = pd.DataFrame.from_dict(rows, orient="index")
    lines.append(table.to_string(na_rep="", float_format=lambda v: f"{v:.4g}"))
    return "\n".join(lines)
