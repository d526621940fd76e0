"""The one trainer: `run(cfg) -> metrics` under `python -m bench`, and `Trainer` for K >= 1 members.

A run trains the composed model on the composed dataset with the composed optimizer, evaluates on
the validation and test splits after every epoch, and writes into its run directory (atomically):

- `history.csv`: one row per epoch (metrics and every level's hyperparameters, as `L1.lr`, `L2.lr`, ...),
- `metrics.json`: the final metrics, the run's identity (optimizer, method, family, ...) and its status,
- `checkpoint.pt`: every `trainer.checkpoint_every` epochs, and on request (see `request_checkpoint`).

Statuses: "completed"; "diverged" (a non-finite loss or hyperparameter stopped the run, which still
counts as a result: exit code 0, so a sweep goes on); "pruned" (the epoch callback raised
`optuna.TrialPruned`); "failed" (the epoch callback raised anything else). A directory whose
metrics.json says "completed" or "diverged" is not run again unless `trainer.force=true`.

A single run is a population of one: `Trainer` trains K >= 1 members through one `Learner`, either a
`ModuleLearner` (one `nn.Module` with its optimizer) or a `bench.population.StackedLearner` (K members
stacked under `torch.vmap`), and gives every member all of the above in its own run directory.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import platform
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
    synced_together,
    to_jsonable,
)
from bench.logger import RunLogger, build_logger
from bench.models import build_model
from bench.optim import BuiltOptimizer, build_optimizer
from bench.schema import FINAL_KEYS, ROUNDOFF_KEYS, environment_label, hyperparameter_columns

__all__ = [
    "FINISHED",
    "Health",
    "Interrupted",
    "Learner",
    "ModuleLearner",
    "RunDirError",
    "Trainer",
    "environment",
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


def _is_pruned(error: Exception) -> bool:
    import optuna

    return isinstance(error, optuna.TrialPruned)


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


def environment(device: torch.device) -> dict[str, Any]:
    """Where a run trains (metrics.json's `environment`, bench.schema.ENVIRONMENT_KEYS): read while it trains.

    Not part of the run's identity (a run may resume on another machine), yet the torch version, the device and the
    CPU thread count change its numbers by round-off, which training amplifies.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        hypergrad_version = version("hypergrad")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        hypergrad_version = "unknown"
    name = str(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return {
        "torch": str(torch.__version__),  # a TorchVersion, which a weights-only checkpoint load refuses
        "python": platform.python_version(),
        "hypergrad": hypergrad_version,
        "device": name,
        "num_threads": torch.get_num_threads(),
    }


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
        with warnings.catch_warnings(), torch.serialization.safe_globals(_state_classes()):
            warnings.simplefilter("ignore")  # e.g. torch's note on a foreign pickle protocol: the error says enough
            state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or not {"model", "optimizer", "progress"} <= state.keys():
            raise ValueError("not a bench checkpoint")
        if "health" not in state:
            raise ValueError("written by a version of bench before one trainer served populations")
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        # torch's weights-only refusal names the offending global on a later line; that is the reason to show.
        reason = next((line for line in lines if "Unsupported" in line), lines[0])
        raise RunDirError(
            f"`{path}` cannot be resumed ({reason[:200]}); move it aside and rerun, or pass trainer.force=true to "
            "start over"
        ) from None
    return state


def _state_classes() -> list[type]:
    """The NamedTuple types of hypergrad's functional state (a stacked learner's checkpoint holds them)."""
    import hypergrad.rules
    import hypergrad.stable
    from hypergrad import core

    return [
        v
        for module in (core, hypergrad.rules, hypergrad.stable)
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, tuple) and hasattr(v, "_fields")
    ]


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
    """A progress bar only where it stays readable: not in a job of a parallel launcher (one process draws it).

    Parallel workers (joblib, submitit) would draw over each other's line; they log one line per epoch instead.
    """
    if not wanted:
        return False
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    hc = HydraConfig.get()
    target = str(hc.launcher.get("_target_", ""))
    return str(hc.mode) != "RunMode.MULTIRUN" or any(
        f".{name}" in target for name in ("BasicLauncher", "PopulationLauncher")
    )


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


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` for a 2-D ``idx`` (every member's batch): the same rows, copied by ``index_select`` (132 members'
    MNIST batches, 106 MB: 45 ms a step instead of the advanced indexing's 67 ms)."""
    return t.index_select(0, idx.flatten()).unflatten(0, idx.shape)


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


# -- the members' health: who still trains, and why the others stopped ----------------------------------------------


class Health:
    """Which of K members still train: (K,) tensors on the training device, read by the host once per step.

    A member leaves by diverging (`step` and `reason(i)` say when and why, in a single run's words) or by being
    stopped from outside (pruned); nothing of a member that left changes afterwards, and the others never notice.
    """

    LOSS, VALIDATION, EXPLODED, NOTE = 1, -1, -2, -3  # `code`; 2 + j: hyperparameter j of `hp_names` went non-finite

    def __init__(self, size: int, device: torch.device, diverge_factor: float | None) -> None:
        self.factor, self.hp_names = diverge_factor, []  # the stacked learner names its hyperparameters
        self.alive = torch.ones(size, dtype=torch.bool, device=device)
        self.stopped = torch.zeros_like(self.alive)
        self.step = torch.full((size,), -1, dtype=torch.long, device=device)
        self.code = torch.zeros_like(self.step)
        self.value = torch.zeros(size, dtype=torch.float64, device=device)
        self.initial: torch.Tensor | None = None  # every member's first training loss
        self.notes: dict[int, str] = {}  # reasons given in words (code NOTE)

    def active(self) -> torch.Tensor:
        return self.alive & ~self.stopped

    def mark(self, newly: torch.Tensor, step: int, code: torch.Tensor | int, value: torch.Tensor) -> None:
        """Members `newly` (a (K,) mask) diverged in `step`."""
        self.step = torch.where(newly, step, self.step)
        self.code = torch.where(newly, code, self.code)
        self.value = torch.where(newly, value.to(self.value.dtype), self.value)
        self.alive = self.alive & ~newly

    def note(self, i: int, step: int, reason: str) -> None:
        self.step[i], self.code[i], self.alive[i] = step, self.NOTE, False
        self.notes[i] = reason

    def check_explosion(self, losses: torch.Tensor, stepped: torch.Tensor, step: int) -> None:
        """A finite training loss above `trainer.diverge_factor` times the member's first one: it diverged (a step
        size of 2e9 can keep every number finite). Checked after the step, which the member keeps."""
        if self.initial is None:
            self.initial = losses.double().clone()
        if self.factor is not None:
            over = stepped & (losses.double() > self.factor * self.initial.clamp(min=1e-12))
            self.mark(over, step, self.EXPLODED, losses)

    def own_steps(self, steps: int) -> list[int]:
        """Each member's count of completed steps (a diverging step does not count; a validation divergence does)."""
        counted = torch.where(self.code == self.VALIDATION, self.step, self.step - 1)
        return torch.where(self.step < 0, steps, counted).tolist()

    def reason(self, i: int) -> str | None:
        code, value = int(self.code[i]), float(self.value[i])
        if code == 0:
            return None
        if code == self.LOSS:
            return f"non-finite training loss ({value})"
        if code == self.VALIDATION:
            return f"non-finite validation loss ({value})"
        if code == self.EXPLODED:
            initial = float(self.initial[i])  # type: ignore[index]
            return (
                f"training loss {value:.4g} exceeded trainer.diverge_factor={self.factor:g} times its initial value "
                f"{initial:.4g}"
            )
        if code == self.NOTE:
            return self.notes[i]
        level, name = self.hp_names[code - 2]
        error = hypergrad.NonFiniteHyperparameterError(level + 1, name, value, int(self.step[i]))
        return f"non-finite hyperparameter: {error}"

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("alive", "stopped", "step", "code", "value", "initial", "notes")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


# -- learners: what trains the members ------------------------------------------------------------------------------


class Learner(Protocol):
    """K >= 1 members trained in lockstep on the same steps; the training loop (`Trainer`) needs only this.

    `ModuleLearner` is one member: any `nn.Module` with its optimizer, AMP, torch.compile, BatchNorm, tuning-free
    baselines. `bench.population.StackedLearner` is K members whose weights are stacked and trained by one vmapped
    forward and backward. A member that diverges in `step` is marked in `health` and frozen from then on.
    """

    size: int
    per_member: bool  # whether `step` takes stacked batches (one per entry of `batch_members`), or one for all
    batch_members: list[int]  # whose batches (their seeds' draws), stacked in this order, when `per_member`
    health: Health

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """One training step of every active member; returns the (K,) mean losses (the host reads them)."""

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, chunk: int) -> tuple[list[float], list[float]]:
        """Every member's mean loss and error rate on a split, evaluated in chunks of `chunk` examples."""

    def hyperparameters(self) -> list[list[dict[str, float]]]:
        """Every member's current hyperparameters, level 1 first, natural scale."""

    def describe(self) -> list[dict[str, Any]]:
        """Every member's optimizer, method, family, height and initial hyperparameters (metrics.json's words)."""

    def train_mode(self) -> None: ...
    def eval_mode(self) -> None: ...
    def state_dict(self) -> dict[str, Any]:
        """`{"model": ..., "optimizer": ...}`: everything a checkpoint needs to continue exactly."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModuleLearner:
    """One member: the config's model as an `nn.Module` and the optimizer its config builds (tower or baseline)."""

    size, per_member, batch_members = 1, False, [0]

    def __init__(self, cfg: DictConfig, data: Data, device: torch.device, steps_per_epoch: int, total: int) -> None:
        t = cfg.trainer
        torch.manual_seed(cfg.seed)  # the model's initialization, then dropout's draws (the dataset draws nothing)
        self.model = build_model(cfg.model, data).to(device, DTYPES[t.dtype])
        self.forward = torch.compile(self.model) if t.compile else self.model
        self.opt: BuiltOptimizer = build_optimizer(cfg.optimizer, self.model.parameters(), steps_per_epoch, total)
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16) if t.amp else nullcontext()
        self.device = device
        self.health = Health(1, torch.device("cpu"), t.diverge_factor)

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        with self.amp:
            logits = self.forward(x)
        loss, _ = _loss_and_errors(logits, y)
        loss = loss / y.numel()
        value = torch.tensor([loss.item()], dtype=torch.float64)
        if not math.isfinite(value):
            self.health.mark(torch.tensor([True]), step, Health.LOSS, value)
            return value
        loss.backward()
        try:
            self.opt.step()
        except hypergrad.NonFiniteHyperparameterError as e:
            self.health.note(0, step, f"non-finite hyperparameter: {e}")
            return value
        except RuntimeError as e:
            # torch.optim refuses a step size that overflows the parameters' dtype (e.g. Adam with lr=1e38):
            # that run diverged, it did not crash.
            if "without overflow" not in str(e):
                raise
            self.health.note(0, step, f"optimizer step overflowed: {e}")
            return value
        self.opt.optimizer.zero_grad(set_to_none=True)
        self.health.check_explosion(value, torch.tensor([True]), step)
        return value

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, chunk: int) -> tuple[list[float], list[float]]:
        loss, wrong = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for i in range(0, len(x), chunk):
            with self.amp:
                logits = self.forward(x[i : i + chunk])
            batch_loss, batch_wrong = _loss_and_errors(logits, y[i : i + chunk])
            loss, wrong = loss + batch_loss, wrong + batch_wrong
        return [loss.item() / y.numel()], [wrong.item() / y.numel()]

    def hyperparameters(self) -> list[list[dict[str, float]]]:
        return [self.opt.hyperparameters()]

    def describe(self) -> list[dict[str, Any]]:
        o = self.opt
        return [{"optimizer": o.name, "method": o.method, "family": o.family, "height": o.height, "init": o.init}]

    def train_mode(self) -> None:
        self.model.train()
        self.opt.train_mode()

    def eval_mode(self) -> None:
        self.model.eval()
        self.opt.eval_mode()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])


# -- the training loop, for K >= 1 members ---------------------------------------------------------------------------


def load_data(cfg: DictConfig) -> tuple[torch.device, Data]:
    """The training device and the config's dataset on it, in `trainer.dtype` (set-up shared by every learner)."""
    t = cfg.trainer
    device = _device(t.device)
    if t.num_threads is not None:
        torch.set_num_threads(t.num_threads)
    data = build_dataset(cfg.dataset, device)
    to_dtype(data, DTYPES[t.dtype])
    return device, data


@dataclass
class _Job:
    """One member's side of the loop: its config, run directory, logger, epoch callback and what it has recorded."""

    cfg: DictConfig
    out: Path
    callback: EpochCallback | None
    logger: RunLogger = field(default_factory=RunLogger)
    history: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False  # its last row is written (diverged, pruned or failed)
    status: str = "completed"
    error: Exception | None = None


class Trainer:
    """Trains K >= 1 members that share the data, model architecture and trainer settings; a single run is K = 1.

    Every member gets what a single run gets: its own batches (from its seed), one history row per epoch,
    divergence recorded in its own words while the others go on, pruning by its epoch callback, metrics.json,
    history.csv and its logger (W&B: one run per member). One checkpoint holds them all; a stop request saves it
    mid-epoch and a rerun resumes from it to the same results.
    """

    def __init__(
        self,
        cfgs: Sequence[DictConfig],
        outs: Sequence[Path],
        *,
        stacked: bool = False,
        callbacks: Sequence[EpochCallback | None] | None = None,
        checkpoint: Path | None = None,
        population: dict[str, Any] | None = None,
        data: tuple[torch.device, Data] | None = None,
    ) -> None:
        self.cfg, t = cfgs[0], cfgs[0].trainer
        self.device, self.data = data or load_data(self.cfg)
        self.steps_per_epoch = math.ceil(len(self.data.train[0]) / t.batch_size)
        self.total_steps = min(t.epochs * self.steps_per_epoch, t.max_steps or math.inf)
        if stacked:
            from bench.population import StackedLearner

            self.learner: Learner = StackedLearner(cfgs, self.data, self.device, self.steps_per_epoch, self.total_steps)
        elif len(cfgs) == 1:
            self.learner = ModuleLearner(self.cfg, self.data, self.device, self.steps_per_epoch, self.total_steps)
        else:
            raise ValueError(f"`cfgs` must hold one config for a module learner, but got {len(cfgs)}")
        self.jobs = [_Job(c, o, b) for c, o, b in zip(cfgs, outs, callbacks or [None] * len(cfgs), strict=True)]
        for job in self.jobs:  # its own directory, wherever its config says (W&B records the config)
            job.cfg = copy.deepcopy(job.cfg)
            with open_dict(job.cfg):
                job.cfg.paths.output_dir = str(job.out)
        self.seeds = [int(c.seed) for c in cfgs]
        self.checkpoint, self.population = checkpoint, population
        self.environment = environment(self.device)  # gains `resumed_from` when a checkpoint was written elsewhere
        # A population saves as a single run does: every `checkpoint_minutes` of training, every `checkpoint_every`
        # epochs when set, and on a stop request. (It used to save after every epoch as well: 132 MNIST MLPs spent
        # 2.5 s of a 22 s sweep writing checkpoints that a sweep of a few minutes never reads.)
        self.every = t.checkpoint_every
        # Progress; all of it goes into the checkpoint.
        self.epoch = self.batch = self.steps = 0  # completed epochs, next batch of this epoch, steps in all
        self.sums = torch.zeros(2, len(cfgs), dtype=torch.float64, device=self.learner.health.alive.device)
        self.elapsed = 0.0
        self.saved_at = time.monotonic()

    # -- checkpoints ---------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        if len(self.jobs) == 1:
            return run_identity(self.cfg)
        return {f"member{i}.{k}": v for i, job in enumerate(self.jobs) for k, v in run_identity(job.cfg).items()}

    def save_checkpoint(self) -> None:
        state = {
            **self.learner.state_dict(),
            "progress": {
                "epoch": self.epoch,
                "batch": self.batch,
                "steps": self.steps,
                "sums": self.sums,
                "elapsed": self.elapsed + time.perf_counter() - self.started,
            },
            "members": [{"history": j.history, "done": j.done, "status": j.status} for j in self.jobs],
            "health": self.learner.health.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()},
            "config": self.identity(),
            "environment": self.environment,
        }
        atomic_save_torch(self.checkpoint, state)
        self.saved_at = time.monotonic()

    def load_checkpoint(self) -> None:
        out = self.jobs[0].out if len(self.jobs) == 1 else self.checkpoint.parent
        state = read_checkpoint(self.checkpoint, self.device)
        refuse_other_config(out, self.checkpoint.name, state.get("config"), self.identity())
        self.learner.load_state_dict(state)
        self.learner.health.load_state_dict(state["health"])
        p = state["progress"]
        self.epoch, self.batch, self.steps, self.sums, self.elapsed = (
            p["epoch"], p["batch"], p["steps"], p["sums"], p["elapsed"],
        )  # fmt: skip
        for job, saved in zip(self.jobs, state["members"], strict=True):
            job.history, job.done, job.status = saved["history"], saved["done"], saved["status"]
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.resume_environment(state.get("environment"))

    def resume_environment(self, written: dict[str, Any] | None) -> None:
        """Record the environment the checkpoint was written in when it differs from this one (and say so once).

        A checkpoint written before environments were recorded (`written` None) tells nothing, so nothing is said.
        """
        if not isinstance(written, dict):
            return
        if any(written.get(k) != self.environment[k] for k in ROUNDOFF_KEYS):
            log.warning(
                "%s was written in another environment (%s; now %s): this run will differ from an uninterrupted one "
                "by round-off, which training amplifies",
                self.checkpoint, environment_label(written), environment_label(self.environment),
            )  # fmt: skip
            self.environment = {**self.environment, "resumed_from": written}
        elif "resumed_from" in written:  # resumed elsewhere before: the mixed history stays on record
            self.environment = {**self.environment, "resumed_from": written["resumed_from"]}

    # -- training ------------------------------------------------------------------------------

    def batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start + 1`, ... of `epoch`: the draws of the learner's `batch_members` (stacked), or
        one for all."""
        bs, data = self.cfg.trainer.batch_size, self.data
        seeds = [self.seeds[i] for i in self.learner.batch_members] if self.learner.per_member else self.seeds[:1]
        perms = [epoch_permutation(len(data.train[0]), s, epoch, self.device) for s in seeds]
        stacked = torch.stack(perms)
        for b in range(start, self.steps_per_epoch):
            if not self.learner.per_member:
                yield epoch_batch(data, perms[0], b, bs, seeds[0], epoch)
            elif data.augment is None:
                idx = stacked[:, b * bs : (b + 1) * bs]
                yield _gather(data.train[0], idx), _gather(data.train[1], idx)
            else:  # each member's own augmentation draw
                pairs = [epoch_batch(data, p, b, bs, s, epoch) for p, s in zip(perms, seeds, strict=True)]
                yield torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

    def fit(self) -> list[dict[str, Any]]:
        """Train every member to its end; return each one's metrics (written to its run directory, then logged).

        On a stop request (`request_checkpoint`) it saves the checkpoint and returns `{"status": "preempted", ...}`
        for every member, writing no metrics.json.
        """
        try:
            return self._fit()
        finally:
            for job in self.jobs:  # a stopped or crashed run's loggers close too (a finished one's already did)
                job.logger.finish({})

    def _fit(self) -> list[dict[str, Any]]:
        t, health = self.cfg.trainer, self.learner.health
        if self.checkpoint is not None and t.resume and self.checkpoint.is_file():
            self.load_checkpoint()
            log.info("resuming %s from epoch %d, step %d", self.checkpoint.parent, self.epoch, self.steps)
        for job in self.jobs:
            job.logger = build_logger(job.cfg, job.out)
        self.started = time.perf_counter()
        size = len(self.jobs)
        name = self.learner.describe()[0]["optimizer"] if size == 1 else f"population of {size}"
        bar = tqdm(
            total=self.total_steps,
            initial=self.steps,
            disable=not _show_progress(t.progress),
            desc=f"{self.cfg.model.name}/{self.cfg.dataset.name} {name}",
            unit="step",
            dynamic_ncols=True,
        )
        logging_steps = any(type(job.logger) is not RunLogger for job in self.jobs)
        try:
            while self.epoch < t.epochs and self.steps < self.total_steps and bool(health.active().any()):
                self.learner.train_mode()
                for x, y in self.batches(self.epoch, self.batch):
                    was = health.active()
                    losses = self.learner.step(x, y, self.steps + 1)
                    self.steps += 1
                    self.batch += 1
                    # Weighted by batch size, as an epoch's mean: a short last batch counts less.
                    counted = (was & health.alive).double() * (y.shape[1] if self.learner.per_member else len(y))
                    self.sums += torch.stack([losses.double() * counted, counted]).nan_to_num_(0.0)
                    active = health.active().tolist()
                    if logging_steps:
                        self.log_step(losses.tolist(), active)
                    bar.update()
                    if self.steps % 10 == 0:
                        bar.set_postfix(loss=f"{float(losses[0]):.4f}", refresh=False)
                    if _checkpoint_requested and self.checkpoint is not None:
                        self.save_checkpoint()
                        return [{"status": "preempted", "steps": self.steps, "output_dir": str(j.out)}
                                for j in self.jobs]  # fmt: skip
                    minutes = t.checkpoint_minutes
                    if minutes and self.checkpoint is not None and time.monotonic() - self.saved_at >= 60 * minutes:
                        self.save_checkpoint()
                    if not any(active) or self.steps >= self.total_steps:
                        break
                # When max_steps or divergence stops the run inside an epoch, that partial epoch is its last row:
                # evaluated and reported like any other (a pruner then sees the final value of a finished trial).
                self.end_epoch()
        finally:
            bar.close()
        wall = self.elapsed + time.perf_counter() - self.started
        # Exactly what metrics.json holds: non-finite numbers are null there, so they are None here too.
        out = [to_jsonable(metrics) for metrics in self.metrics(wall)]
        with synced_together():  # a population's many small files wait for the disk together
            for job, metrics in zip(self.jobs, out, strict=True):
                # history.csv first: a metrics.json on disk always has its history next to it.
                atomic_write_csv(job.out / "history.csv", job.history)
                atomic_write_json(job.out / "metrics.json", metrics)
        for i, (job, metrics) in enumerate(zip(self.jobs, out, strict=True)):
            job.logger.finish(metrics)  # W&B copies the files just written
            if size > 1 and job.status != "completed":
                log.info("member %d (%s): %s", i, job.out, job.status)
        return out

    def log_step(self, losses: list[float], active: list[bool]) -> None:
        hps: list[list[list[dict[str, float]]]] = []  # computed once, and only when a logger asks

        def hyperparameters(i: int) -> list[dict[str, float]]:
            if not hps:
                hps.append(self.learner.hyperparameters())
            return hps[0][i]

        for i, job in enumerate(self.jobs):
            if active[i]:
                job.logger.log_step(self.steps, losses[i], lambda i=i: hyperparameters(i))

    def end_epoch(self) -> None:
        """Every member's row for this epoch; then the checks that may end a member, and its epoch callback."""
        health, learner, chunk = self.learner.health, self.learner, self.cfg.trainer.eval_batch_size
        learner.eval_mode()
        val_loss, val_error = learner.evaluate(*self.data.val, chunk)
        test_loss, test_error = learner.evaluate(*self.data.test, chunk)
        wall = self.elapsed + time.perf_counter() - self.started
        active, steps, hps = health.active().tolist(), health.own_steps(self.steps), learner.hyperparameters()
        total, count = self.sums.tolist()
        self.epoch, self.batch = self.epoch + 1, 0
        self.sums.zero_()
        for i, job in enumerate(self.jobs):
            if job.done or (not active[i] and job.history and job.history[-1]["steps"] == steps[i]):
                job.done = True  # it ended at its epoch's first step: the row before is its last
                continue
            row = {
                "epoch": self.epoch,
                "steps": steps[i],
                "train_loss": total[i] / count[i] if count[i] else math.nan,
                "val_loss": val_loss[i],
                "val_error": val_error[i],
                "test_loss": test_loss[i],
                "test_error": test_error[i],
                "wall_time_s": wall,
                **hyperparameter_columns(hps[i]),
            }
            job.history.append(row)
            job.logger.log_epoch(row)
            if len(self.jobs) == 1:
                log.info(
                    "epoch %d: train loss %.4f, val error %.2f%%, test error %.2f%%, %d steps",
                    row["epoch"], row["train_loss"], 100 * row["val_error"], 100 * row["test_error"], row["steps"],
                )  # fmt: skip
            if active[i] and not math.isfinite(row["val_loss"]):
                # Training losses were finite, yet the weights now give non-finite outputs: as diverged as it gets.
                one = torch.arange(len(self.jobs), device=health.alive.device) == i
                health.mark(one, steps[i], Health.VALIDATION, torch.full_like(health.value, row["val_loss"]))
                active[i] = False
            job.done = not active[i]
        if self.every and self.epoch % self.every == 0 and any(active) and self.checkpoint is not None:
            self.save_checkpoint()
        for i, job in enumerate(self.jobs):
            if active[i] and job.callback is not None:
                try:
                    job.callback(self.epoch, dict(job.history[-1]))
                except Exception as e:  # a pruned trial, or the callback's own failure: recorded, then raised
                    job.error, job.status, job.done = e, "pruned" if _is_pruned(e) else "failed", True
                    health.stopped[i] = True

    def metrics(self, wall: float) -> list[dict[str, Any]]:
        health = self.learner.health
        steps, described, hps = health.own_steps(self.steps), self.learner.describe(), self.learner.hyperparameters()
        out = []
        for i, job in enumerate(self.jobs):
            last = job.history[-1] if job.history else {}
            reason = health.reason(i)
            step = int(health.step[i]) if reason is not None else None
            identity = run_identity(job.cfg)
            metrics = {
                **{key: last.get(key, math.nan) for key in FINAL_KEYS},
                "diverged": reason is not None,
                "diverged_step": step,
                "diverged_reason": reason,
                "epochs": len(job.history),
                "steps": last.get("steps", steps[i]),  # a pruned member's too: where it stopped
                # A member's own cost is its share of the population: the report adds wall times up as compute.
                "wall_time_s": wall / len(self.jobs),
                **described[i],
                "hyperparameters": hps[i],
                "seed": job.cfg.seed,
                "model": job.cfg.model.name,
                "dataset": job.cfg.dataset.name,
                "status": "diverged" if reason is not None else job.status,
                "config": identity,
                "config_fingerprint": fingerprint(identity),
                "environment": self.environment,
            }
            if self.population is not None:
                metrics["population"] = {**self.population, "size": len(self.jobs), "index": i, "wall_time_s": wall}
            if job.error is not None:
                metrics["error"] = f"{type(job.error).__name__}: {job.error}"
            out.append(metrics)
        return out


def run(
    cfg: DictConfig, output_dir: str | Path | None = None, epoch_callback: EpochCallback | None = None
) -> dict[str, Any]:
    """Train and evaluate one run; return its metrics (the content of metrics.json).

    `output_dir=None` means Hydra's runtime output directory. `epoch_callback(epoch, row)` is called
    after each epoch's evaluation with that epoch's history row; if it raises, the run directory
    records the run as "pruned" (`optuna.TrialPruned`) or "failed" and the exception propagates.
    Raises `bench.config.ConfigError` before any work when the config is invalid.
    """
    global _checkpoint_requested, _preempted
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
    # From here on a signal asks for a checkpoint (saved after the first step when it arrives while data loads).
    with _stop_on_signals():
        trainer = Trainer([cfg], [out], callbacks=[epoch_callback], checkpoint=out / "checkpoint.pt")
        try:
            [metrics] = trainer.fit()
        finally:
            # Cleared at the end, not the start: a preemption signal that arrives while the data loads still counts.
            _checkpoint_requested = False
        _preempted = _preempted or metrics.get("status") == "preempted"
        if metrics.get("status") == "preempted" and _interrupted_by is not None:
            raise Interrupted(metrics["steps"], _interrupted_by)
        if trainer.jobs[0].error is not None:
            raise trainer.jobs[0].error
        return metrics


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
