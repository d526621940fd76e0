"""Per-step cost of hypergradient towers against the plain torch.optim optimizer, measured in the same run.

The paper's MNIST MLP (784-128-10, tanh), batch 256, random batches and labels; one CPU
thread by default, and CUDA when present. A row's ratio is its ms/step over the plain optimizer's, timed interleaved
in rounds so that machine noise hits both alike; the median of the rounds is reported. With the paper's reference
package installed (``gradient-descent-the-ultimate-optimizer``), its towers are timed too.

    python scripts/bench_overhead.py [--steps 200] [--rounds 5] [--threads 1] [--device cpu|cuda|all]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import hypergrad

HEIGHTS = (0, 1, 2, 3, 10, 50)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 10))


def spec(base: str, height: int) -> str:
    lr = {"sgd": 0.01, "adam": 0.001}[base]
    return f"{base}({lr})" + "/sgd(1e-05)" * height


def make_loop(kind: str, base: str, height: int, device: str) -> Callable[[], None]:
    """One training step closure for ``kind`` in plain | ours | reference."""
    torch.manual_seed(0)
    model = mlp().to(device)
    # A cycle of random batches with random labels: the gradients stay the size they have in training (one batch
    # repeated would be memorized, and the vanishing gradients would time float denormals instead of optimizers).
    xs = torch.randn(16, 256, 784, device=device)
    ys = torch.randint(0, 10, (16, 256), device=device)
    batch = iter(range(1 << 62))

    def data() -> tuple[torch.Tensor, torch.Tensor]:
        i = next(batch) % 16
        return xs[i], ys[i]

    loss_fn = nn.CrossEntropyLoss()
    if kind in ("plain", "ours"):
        if kind == "plain":
            opt = (torch.optim.SGD if base == "sgd" else torch.optim.Adam)(
                model.parameters(), lr=0.01 if base == "sgd" else 0.001
            )
        else:
            # Random data can drive tall towers to NaN; the cost, not the result, is measured here.
            opt = hypergrad.tower(spec(base, height), model.parameters(), check_finite=False)

        def step() -> None:
            x, y = data()
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad()

        return step
    from gradient_descent_the_ultimate_optimizer import gdtuo

    inner: object = gdtuo.NoOpOptimizer()
    for _ in range(height):
        inner = gdtuo.SGD(1e-5, optimizer=inner)
    top = gdtuo.SGD(0.01, optimizer=inner) if base == "sgd" else gdtuo.Adam(0.001, optimizer=inner)
    mw = gdtuo.ModuleWrapper(model, optimizer=top)
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


def peak_memory_mb(step: Callable[[], None]) -> float:
    """Peak CUDA memory over a few steps (the model, batch, gradients and optimizer state)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(5):
        step()
    return torch.cuda.max_memory_allocated() / 2**20


def state_mb(opt: torch.optim.Optimizer) -> float:
    """Bytes of the tensors an optimizer keeps between steps (what a checkpoint of it stores)."""
    seen: dict[int, int] = {}

    def walk(x: object) -> None:
        if isinstance(x, torch.Tensor):
            seen[x.data_ptr()] = x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(opt.state_dict())
    return sum(seen.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--heights", type=str, default=",".join(map(str, HEIGHTS)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    try:
        import gradient_descent_the_ultimate_optimizer  # noqa: F401

        kinds = ["ours", "reference"]
    except ImportError:
        kinds = ["ours"]
    heights = [int(h) for h in args.heights.split(",")]
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), {args.steps} steps x {args.rounds} rounds")
    print(f"{'device':6} {'tower (hyper levels sgd(1e-05))':32} {'impl':9} {'ms/step':>8} {'plain':>8} {'ratio':>6}")
    for device in devices:
        for base in ("sgd", "adam"):
            for height in heights:
                for kind in kinds:
                    plain = make_loop("plain", base, 0, device)
                    ours = make_loop(kind, base, height, device)
                    for f in (plain, ours):  # warm-up
                        time_steps(f, 10, device)
                    ratios, t_ours, t_plain = [], [], []
                    for _ in range(args.rounds):
                        tp = time_steps(plain, args.steps, device)
                        to = time_steps(ours, args.steps, device)
                        t_plain.append(tp)
                        t_ours.append(to)
                        ratios.append(to / tp)
                    print(
                        f"{device:6} {base + ' height ' + str(height):32} {kind:9} {statistics.median(t_ours):8.3f} "
                        f"{statistics.median(t_plain):8.3f} {statistics.median(ratios):6.3f}",
                        flush=True,
                    )
            if device == "cuda":
                base_mem = peak_memory_mb(make_loop("plain", base, 0, device))
                for height in heights:
                    mem = peak_memory_mb(make_loop("ours", base, height, device))
                    row = f"{base} height {height}"
                    print(f"{device:6} {row:32} peak CUDA MiB {mem:8.2f} (plain {base_mem:.2f})")
    print("\noptimizer state kept between steps (MiB), MLP with 101,770 parameters:")
    model = mlp()
    for base in ("sgd", "adam"):
        plain = (torch.optim.SGD if base == "sgd" else torch.optim.Adam)(model.parameters(), lr=0.01)
        model(torch.randn(2, 784)).sum().backward()
        plain.step()
        row = [f"plain {state_mb(plain):.2f}"]
        for height in heights:
            opt = hypergrad.tower(spec(base, height), model.parameters())
            opt.step()
            opt.step()
            row.append(f"h{height} {state_mb(opt):.2f}")
        print(f"  {base:5} " + "  ".join(row))


if __name__ == "__main__":
    main()
