"""Per-step cost of hypergradient towers against the plain torch.optim optimizer, measured in the same run.

Issue 15's table: the paper's MNIST MLP (784-128-10, tanh), batch 256, random batches and labels, one CPU thread by
default, and CUDA when present. A row's ratio is its ms/step over the plain torch.optim optimizer's (``torch.optim.SGD``
or ``torch.optim.Adam`` with torch's default implementation choice), timed interleaved in rounds so that machine noise
hits both alike; the median of the per-round ratios is reported. Both kinds of hyper levels are timed: SGD levels
(``sgd(1e-6)``, ``sgd(1e-7)``, ``sgd(1e-5)``) and Adam levels (``adam(1e-7)``).

Then two rows where the model's own work dominates, next to the paper's runtime figure (Chandra et al. 2022, figure
"runtime per step against tower height": +1.5% for the CNN on CIFAR-10 and +2.0% for the RNN on War and Peace at
height 1; +6.2% and +5.0% at height 3): ResNet-20 on CIFAR-shaped random data (batch 128) and the char-LSTM (batch 64,
sequence 128, vocabulary 84), both from ``bench/models``.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over a few steps. On CPU, no allocator counts bytes, so a
dispatch mode adds up the storages of the tensors that every op returns while they are alive from Python, over a
few steps (forward, backward, optimizer step). The model's saved activations are counted only while Python holds them,
so the CPU figure is mostly the optimizer's temporaries and state; compare it to the plain optimizer's, never
across devices. With ``--reference``, the paper's reference package (``gradient-descent-the-ultimate-optimizer``)
is timed on the MLP rows too. With ``--compile``, each MLP tower is timed again with ``compile=True`` (impl
``compiled``; level 0's update and hypergradient through torch.compile, compiled during the warm-up steps). With
``--stable``, each MLP tower is timed again with ``stable=True`` (impl ``stable``: issue 14's opt-in mode, whose hyper
levels run as small tensors, not floats, and whose base is guarded; docs/stable.md, "What it costs"). With
``--step-alone``, a first table times the MLP towers' optimizer step by itself (``opt.step()`` between two timer
reads, the forward and backward pass outside them), next to the plain optimizer's and, with ``--compile``, the
compiled tower's, with the seconds its warm-up steps took (the compile, in the rows that compile code no earlier row
of this process compiled). The step is what a tower changes; the whole-step ratio hides it behind the model's work.
A plain SGD base stays eager under ``compile=True`` (see ``hypergrad.core._fused``), so its two columns time
the same code.

    python scripts/bench_overhead.py [--steps 200] [--rounds 5] [--threads 1] [--device cpu|cuda|all]
        [--heights 0,1,3,50] [--model-steps 3] [--model-rounds 3] [--no-models] [--reference] [--compile]
        [--stable] [--step-alone]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hypergrad

HEIGHTS = (0, 1, 3, 50)


@dataclass(frozen=True)
class Row:
    label: str
    base: str  # "sgd" | "adam": which torch.optim optimizer is the plain baseline
    spec: str
    height: int
    goal: float | None = None  # issue 15's target ratio
    paper: str = ""  # the paper's runtime figure for this row


def mlp_rows() -> list[Row]:
    sgd, adam = "sgd(0.01)", "adam(0.001)"
    return [
        Row("sgd (no hyper level)", "sgd", sgd, 0),
        Row("sgd/sgd(1e-6)", "sgd", sgd + "/sgd(1e-06)", 1, 1.05, "+0.5%"),
        Row("sgd + 3 levels of sgd(1e-6)", "sgd", sgd + "/sgd(1e-06)" * 3, 3, 1.10, "+3.4%"),
        Row("sgd + 50 levels of sgd(1e-7)", "sgd", sgd + "/sgd(1e-07)" * 50, 50, 1.30),
        Row("adam (no hyper level)", "adam", adam, 0),
        Row("adam/sgd(1e-5)", "adam", adam + "/sgd(1e-05)", 1, 1.05),
        Row("adam + 3 levels of adam(1e-7)", "adam", adam + "/adam(1e-07)" * 3, 3, 1.10),
        Row("adam + 50 levels of adam(1e-7)", "adam", adam + "/adam(1e-07)" * 50, 50, 1.30),
        Row("adam + 3 levels of sgd(1e-5)", "adam", adam + "/sgd(1e-05)" * 3, 3),
        Row("adam + 50 levels of sgd(1e-5)", "adam", adam + "/sgd(1e-05)" * 50, 50),
    ]


def model_rows(model: str) -> list[Row]:
    # The paper's figure: height 1 and 3 over height 0, per model (CNN on CIFAR-10, RNN on War and Peace).
    paper = {"resnet20": ("+1.5%", "+6.2%"), "char_lstm": ("+2.0%", "+5.0%")}[model]
    return [
        Row(f"{model} sgd/sgd(1e-6)", "sgd", "sgd(0.01)/sgd(1e-06)", 1, None, paper[0]),
        Row(f"{model} sgd + 3 levels of sgd(1e-6)", "sgd", "sgd(0.01)" + "/sgd(1e-06)" * 3, 3, None, paper[1]),
        Row(f"{model} adam/sgd(1e-5)", "adam", "adam(0.001)/sgd(1e-05)", 1),
    ]


def build(model: str, device: str) -> tuple[nn.Module, Callable[[], tuple[torch.Tensor, torch.Tensor]], nn.Module]:
    """The model, a cycle of random batches, and the loss; the same seed for every optimizer."""
    torch.manual_seed(0)
    if model == "mlp":
        net: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 10))
        # Random batches with random labels: the gradients stay the size they have in training (one batch repeated
        # would be memorized, and the vanishing gradients would time float denormals instead of optimizers).
        xs, ys = torch.randn(16, 256, 784), torch.randint(0, 10, (16, 256))
        loss: nn.Module = nn.CrossEntropyLoss()
    elif model == "resnet20":
        from bench.models.resnet import CifarResNet

        net = CifarResNet(20, 3, 10, 16)
        xs, ys = torch.randn(2, 128, 3, 32, 32), torch.randint(0, 10, (2, 128))
        loss = nn.CrossEntropyLoss()
    elif model == "char_lstm":
        from bench.models.char_lstm import CharLSTM

        vocab = 84  # about the distinct characters of a novel's plain text
        net = CharLSTM(vocab, 32, 128, 2)  # bench/conf/model/char_lstm.yaml
        xs, ys = torch.randint(0, vocab, (2, 64, 128)), torch.randint(0, vocab, (2, 64, 128))

        class Flat(nn.Module):
            def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

        loss = Flat()
    else:
        raise ValueError(f"model must be mlp, resnet20 or char_lstm, but got {model!r}")
    net, xs, ys = net.to(device), xs.to(device), ys.to(device)
    counter = iter(range(1 << 62))

    def data() -> tuple[torch.Tensor, torch.Tensor]:
        i = next(counter) % len(xs)
        return xs[i], ys[i]

    return net, data, loss


def make_optimizer(kind: str, row: Row, net: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``kind`` in plain | ours | compiled | stable for ``row``."""
    if kind == "plain":
        cls = torch.optim.SGD if row.base == "sgd" else torch.optim.Adam
        return cls(net.parameters(), lr=0.01 if row.base == "sgd" else 0.001)
    # Random data can drive tall towers to NaN; the cost, not the result, is measured here.
    return hypergrad.tower(
        row.spec, net.parameters(), check_finite=False, compile=kind == "compiled", stable=kind == "stable"
    )


def make_halves(kind: str, model: str, row: Row, device: str) -> tuple[Callable[[], None], Callable[[], object]]:
    """A torch.optim-style training step for ``kind`` in plain | ours | compiled | stable, in two closures: zero_grad
    and the forward and backward pass on a fresh batch, then the optimizer's step."""
    net, data, loss_fn = build(model, device)
    opt = make_optimizer(kind, row, net)

    def backward() -> None:
        opt.zero_grad()
        x, y = data()
        loss_fn(net(x), y).backward()

    return backward, opt.step


def make_loop(kind: str, model: str, row: Row, device: str) -> Callable[[], None]:
    """One training step closure for ``kind`` in plain | ours | compiled | stable | reference."""
    if kind in ("plain", "ours", "compiled", "stable"):
        backward, update = make_halves(kind, model, row, device)

        def step() -> None:
            backward()
            update()

        return step
    net, data, loss_fn = build(model, device)
    from gradient_descent_the_ultimate_optimizer import gdtuo

    levels = hypergrad.parse_spec(row.spec).levels
    inner: object = gdtuo.NoOpOptimizer()
    for level in reversed(levels):
        cls = {"sgd": gdtuo.SGD, "adam": gdtuo.Adam}[level.rule.name]
        inner = cls(level.values.get("lr", level.rule.defaults["lr"]), optimizer=inner)
    mw = gdtuo.ModuleWrapper(net, optimizer=inner)
    mw.initialize()

    def step() -> None:
        x, y = data()
        mw.begin()
        mw.zero_grad()
        loss_fn(mw.forward(x), y).backward(create_graph=True)
        mw.step()

    return step


def time_steps(step: Callable[[], None], steps: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


class _LiveBytes(TorchDispatchMode):
    """Adds up the storages of op outputs while Python holds them; ``peak`` is the most held at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list] = {}
        self.cur = self.peak = 0

    def _drop(self, key: int, ref: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1].discard(ref)
        if not entry[1]:
            self.cur -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            if key not in self.live:
                self.live[key] = [storage.nbytes(), set()]
                self.cur += storage.nbytes()
                self.peak = max(self.peak, self.cur)
            if id(t) not in self.live[key][1]:
                self.live[key][1].add(id(t))
                weakref.finalize(t, self._drop, key, id(t))
        return out


def peak_memory_mb(step: Callable[[], None], device: str) -> float:
    """Peak memory over a few steps after a warm-up one (see the module docstring for what each device counts)."""
    step()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        return torch.cuda.max_memory_allocated() / 2**20
    with _LiveBytes() as live:
        for _ in range(3):
            step()
    return live.peak / 2**20


def state_mb(opt: torch.optim.Optimizer) -> float:
    """Bytes of the tensors an optimizer keeps between steps (what a checkpoint of it stores)."""
    seen: dict[int, int] = {}

    def walk(x: object) -> None:
        if isinstance(x, torch.Tensor):
            seen[x.data_ptr()] = x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(opt.state_dict())
    return sum(seen.values()) / 2**20


def measure(model: str, row: Row, kind: str, device: str, steps: int, rounds: int) -> tuple[float, float, float]:
    """(median ms/step of ``kind``, median ms/step of plain, median ratio), plain and ``kind`` interleaved."""
    plain = make_loop("plain", model, row, device)
    ours = make_loop(kind, model, row, device)
    for f in (plain, ours):  # warm-up
        time_steps(f, max(2, steps // 20), device)
    t_plain, t_ours, ratios = [], [], []
    for _ in range(rounds):
        tp = time_steps(plain, steps, device)
        to = time_steps(ours, steps, device)
        t_plain.append(tp)
        t_ours.append(to)
        ratios.append(to / tp)
    return statistics.median(t_ours), statistics.median(t_plain), statistics.median(ratios)


def make_step_timer(kind: str, row: Row, device: str) -> Callable[[int], float]:
    """A closure timing ``n`` optimizer steps alone (ms/step): the forward and backward pass between them, untimed."""
    backward, update = make_halves(kind, "mlp", row, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(n: int) -> float:
        total = 0.0
        for _ in range(n):
            backward()
            sync()
            t0 = time.perf_counter()
            update()
            sync()
            total += time.perf_counter() - t0
        return total / n * 1e3

    return timed


def measure_step_alone(
    row: Row, kinds: list[str], device: str, steps: int, rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms of the optimizer step alone per kind (plain first), the kinds timed interleaved in rounds, and the
    seconds each kind's warm-up steps took (compile=True compiles there)."""
    timers = {k: make_step_timer(k, row, device) for k in ["plain", *kinds]}
    warm = {}
    for k, t in timers.items():
        t0 = time.perf_counter()
        t(max(5, steps // 20))
        warm[k] = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(rounds):
        for k, t in timers.items():
            times[k].append(t(steps))
    return {k: statistics.median(v) for k, v in times.items()}, warm


def print_step_alone(devices: list[str], heights: set[int], kinds: list[str], steps: int, rounds: int) -> None:
    """The MLP rows' optimizer step alone (ms) per implementation, beside the plain optimizer's."""
    kinds = [k for k in kinds if k in ("ours", "compiled", "stable")]
    print(f"optimizer step alone (ms; the forward and backward pass untimed), MLP, {steps} steps x {rounds} rounds:")
    print(f"{'device':6} {'tower':40} {'plain':>8} " + " ".join(f"{k:>9}" for k in kinds), end="")
    print(f" {'warm-up s':>10}" if "compiled" in kinds else "")
    for device in devices:
        for row in mlp_rows():
            if row.height in heights and row.height > 0:
                ms, warm = measure_step_alone(row, kinds, device, steps, rounds)
                cells = " ".join(f"{ms[k]:9.3f}" for k in kinds)
                # The compiled tower's warm-up steps: its compile time with this machine's inductor cache (cold or
                # warm), where no earlier row of this process compiled the same code.
                extra = f" {warm['compiled']:10.1f}" if "compiled" in kinds else ""
                print(f"{device:6} {row.label:40} {ms['plain']:8.3f} {cells}{extra}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="steps per round on the MLP")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--heights", type=str, default=",".join(map(str, HEIGHTS)), help="MLP rows of these heights")
    ap.add_argument("--model-steps", type=int, default=3, help="steps per round on ResNet-20 and the char-LSTM")
    ap.add_argument("--model-rounds", type=int, default=3)
    ap.add_argument("--no-models", action="store_true", help="skip the ResNet-20 and char-LSTM rows")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    ap.add_argument("--reference", action="store_true", help="time the paper's reference package on the MLP too")
    ap.add_argument("--compile", action="store_true", help="time the MLP towers with compile=True too")
    ap.add_argument("--stable", action="store_true", help="time the MLP towers with stable=True too")
    ap.add_argument("--step-alone", action="store_true", help="also time the MLP towers' optimizer step alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    kinds = ["ours"] + (["compiled"] if args.compile else []) + (["stable"] if args.stable else [])
    kinds += ["reference"] if args.reference else []
    heights = {int(h) for h in args.heights.split(",")}
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s); MLP {args.steps} steps x {args.rounds} rounds")
    if args.step_alone:  # first, so that its warm-up column is this process's first compile
        print_step_alone(devices, heights, kinds, args.steps, args.rounds)
        print()
    header = (
        f"{'device':6} {'tower':40} {'impl':9} {'ms/step':>8} {'plain':>8} {'ratio':>6} {'goal':>5} {'paper':>6}"
        f" {'peak MiB':>9} {'plain':>7}"
    )
    print(header)
    for device in devices:
        work = [("mlp", r, args.steps, args.rounds) for r in mlp_rows() if r.height in heights]
        if not args.no_models:
            for m in ("resnet20", "char_lstm"):
                work += [(m, r, args.model_steps, args.model_rounds) for r in model_rows(m)]
        plain_mem: dict[tuple[str, str], float] = {}
        for model, row, steps, rounds in work:
            for kind in kinds:
                if kind in ("reference", "compiled", "stable") and (
                    model != "mlp" or (kind == "compiled" and not row.height)
                ):
                    continue
                t_ours, t_plain, ratio = measure(model, row, kind, device, steps, rounds)
                mem = base = float("nan")
                if not args.no_memory and kind == "ours":
                    if (model, row.base) not in plain_mem:
                        plain_mem[model, row.base] = peak_memory_mb(make_loop("plain", model, row, device), device)
                    base = plain_mem[model, row.base]
                    mem = peak_memory_mb(make_loop(kind, model, row, device), device)
                goal = f"{row.goal:.2f}" if row.goal else ""
                print(
                    f"{device:6} {row.label:40} {kind:9} {t_ours:8.3f} {t_plain:8.3f} {ratio:6.3f} {goal:>5}"
                    f" {row.paper:>6} {mem:9.2f} {base:7.2f}",
                    flush=True,
                )
    print("\noptimizer state kept between steps (MiB), MLP with 101,770 parameters:")
    net, data, loss_fn = build("mlp", "cpu")
    for base in ("sgd", "adam"):
        plain = (torch.optim.SGD if base == "sgd" else torch.optim.Adam)(net.parameters(), lr=0.01)
        x, y = data()
        loss_fn(net(x), y).backward()
        plain.step()
        row = [f"plain {state_mb(plain):.2f}"]
        for r in mlp_rows():
            if r.base == base and r.height in heights:
                opt = hypergrad.tower(r.spec, net.parameters())
                opt.step()
                opt.step()
                row.append(f"{r.label}: {state_mb(opt):.2f}")
        print(f"  {base:5} " + "; ".join(row))


if __name__ == "__main__":
    main()
