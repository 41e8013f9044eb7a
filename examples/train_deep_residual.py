"""Train a deep residual MLP with stochastic depth, dense vs skipping the dropped samples' work.

The model has `--blocks` residual blocks x + branch(x), branch = Linear(d, 4d) -> GELU ->
Linear(4d, d), with the paper's linear decay of survival probability from 1 at the input to
`--last-p` (0.5) at the last block. Two variants train from the same initial weights on the same
batches with the same mask seeds:

    dense: x = StochasticDepth(p_l, seed)(x, branch(x))   the branch runs on every sample
    skip:  x = StochasticResidual(branch, p_l, seed)(x)   the branch runs on the kept ones only

The masks are identical, so the two runs compute the same function; their losses agree up to
the order of floating-point sums over the batch inside the branch's weight gradients. The data
is generated here: Gaussian inputs labelled by a fixed random "teacher" network.

    python examples/train_deep_residual.py               # 32 blocks, 60 steps, prints a table
    python examples/train_deep_residual.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from stochdepth.torch import StochasticDepth, StochasticResidual
from torch import nn

import stochdepth


def survival_schedule(blocks: int, last_p: float) -> list[float]:
    """The paper's linear decay: p_l = 1 - l / L * (1 - p_L) for l = 1 .. L."""
    return [1.0 - (i + 1) / blocks * (1.0 - last_p) for i in range(blocks)]


def make_branch(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


class DenseBlock(nn.Module):
    def __init__(self, branch: nn.Module, p: float, seed: int):
        super().__init__()
        self.branch = branch
        self.drop = StochasticDepth(p, seed=seed)

    def forward(self, x):
        return self.drop(x, self.branch(x))


class Net(nn.Module):
    def __init__(self, dim, n_in, n_out, schedule, skip: bool, seed0: int):
        super().__init__()
        self.stem = nn.Linear(n_in, dim)
        blocks = []
        for i, p in enumerate(schedule):
            branch = make_branch(dim)
            blocks.append(StochasticResidual(branch, p, seed=seed0 + i) if skip
                          else DenseBlock(branch, p, seed=seed0 + i))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_out))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def make_data(n: int, n_in: int, n_out: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(n_in, 64, generator=g), torch.randn(64, n_out, generator=g)]
    x = torch.randn(n, n_in, generator=g)
    y = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(dim=1)
    return x, y


def train(skip: bool, args, schedule, data):
    torch.manual_seed(args.seed)  # the same initial weights for both variants
    model = Net(args.dim, args.n_in, args.n_out, schedule, skip, seed0=1000)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x_all, y_all = data
    losses, times = [], []
    for step in range(args.steps):
        lo = (step * args.batch) % (x_all.shape[0] - args.batch + 1)
        x, y = x_all[lo:lo + args.batch], y_all[lo:lo + args.batch]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    ap.add_argument("--last-p", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--n-in", type=int, default=32)
    ap.add_argument("--n-out", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)

    schedule = survival_schedule(args.blocks, args.last_p)
    data = make_data(args.batch * 8, args.n_in, args.n_out, seed=args.seed + 1)
    results = {}
    # Alternate the variants twice so that drift in machine load hits both alike.
    for _rnd in range(2):
        for name, skip in (("dense", False), ("skip", True)):
            losses, times = train(skip, args, schedule, data)
            r = results.setdefault(name, {"losses": losses, "step_ms": []})
            r["step_ms"] += [t * 1e3 for t in times[args.warmup:]]
    for r in results.values():
        r["median_step_ms"] = statistics.median(r["step_ms"])
    speedup = results["dense"]["median_step_ms"] / results["skip"]["median_step_ms"]
    mean_p = sum(schedule) / len(schedule)
    max_loss_diff = max(abs(a - b) for a, b in zip(results["dense"]["losses"],
                                                    results["skip"]["losses"]))

    print(f"{args.blocks} blocks, dim {args.dim}, batch {args.batch}, {args.steps} steps, "
          f"survival 1 -> {args.last_p} (mean {mean_p:.3f}, bound {1 / mean_p:.2f}x), "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"{'variant':8s} {'median step':>12s} {'first loss':>11s} {'last loss':>10s}")
    for name, r in results.items():
        print(f"{name:8s} {r['median_step_ms']:10.1f} ms {r['losses'][0]:11.4f} "
              f"{r['losses'][-1]:10.4f}")
    print(f"speed-up of skip over dense: {speedup:.2f}x; largest loss difference over the "
          f"run: {max_loss_diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "mean_survival": mean_p, "speedup": speedup,
                       "max_loss_diff": max_loss_diff, "results": results,
                       "machine": {"processor": platform.processor(), "python": sys.version,
                                   "torch": torch.__version__,
                                   "torch_threads": torch.get_num_threads(),
                                   "stochdepth": stochdepth.build_info()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
