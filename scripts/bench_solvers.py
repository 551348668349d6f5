"""MGDA and Nash-MTL solvers on the aggregator battery (tests/balancers/gradient_battery.py): how far
each lands from its defining optimum and what one solve costs, TorchJD's solvers (mtlkit's defaults
before) against mtlkit's, in the same process.

    python scripts/bench_solvers.py [--repeats 5]

MGDA: relative norm excess ‖d‖/‖d*‖ − 1 against a float64 QP (cvxpy/Clarabel). Nash-MTL: the spread
(max − min)/mean of α_t (Gα)_t, zero at the bargaining point. Times: median per solve.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import cvxpy as cp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "balancers"))
from gradient_battery import battery  # noqa: E402

from mtl.balancers.solvers import min_norm_weights, nash_weights  # noqa: E402


def qp_min_norm(G: torch.Tensor) -> float:
    a = cp.Variable(G.shape[0])
    cp.Problem(cp.Minimize(cp.quad_form(a, cp.psd_wrap(G.numpy()))), [a >= 0, cp.sum(a) == 1]).solve(cp.CLARABEL)
    return float(np.sqrt(max(a.value @ G.numpy() @ a.value, 0.0)))


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from script_cli import require_positive

    require_positive(args, ["repeats"])  # before the reference QPs are solved (it failed after: median of nothing)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from torchjd.aggregation import MGDAWeighting, NashMTL

    rows: dict[str, list[tuple[float, float]]] = {}
    for _, J in battery():
        G64 = J.double() @ J.double().T  # every solver gets the same float64 Gramian
        best = qp_min_norm(G64)
        solvers = {
            "mgda torchjd (eps 1e-3, 100 it)": lambda: MGDAWeighting()(G64),
            "mgda exact (mtlkit)": lambda: min_norm_weights(G64, "exact"),
            "mgda frank_wolfe+away (mtlkit)": lambda: min_norm_weights(G64, "frank_wolfe"),
        }
        for name, fn in solvers.items():
            w, dt = timed(fn, args.repeats)
            norm = float(torch.sqrt(w @ G64 @ w))
            rows.setdefault(name, []).append((norm / best - 1, dt))

        def torchjd_nash():
            agg = NashMTL(n_tasks=J.shape[0], max_norm=0.0)
            agg(J.double())
            return torch.tensor(agg.weighting.prvs_alpha, dtype=torch.float64)

        for name, fn in {"nash torchjd (20 rounds)": torchjd_nash,
                         "nash newton (mtlkit)": lambda: nash_weights(G64)}.items():
            w, dt = timed(fn, args.repeats)
            prod = w * (G64 @ w) if w is not None else torch.tensor([float("nan")])
            rows.setdefault(name, []).append((float((prod.max() - prod.min()) / prod.mean()), dt))

    print(f"{len(battery())} gradient matrices, {args.repeats} repeats, 1 thread\n")
    print("| solver | worst error | cases with error > 1e-4 | median time per solve |")
    print("|---|---|---|---|")
    for name, values in rows.items():
        errs = [e for e, _ in values]
        failed = sum(e != e for e in errs)  # NaN: the solver returned no weights
        worst = max((e for e in errs if e == e), default=float("nan"))
        bad = sum(not e <= 1e-4 for e in errs)  # a failure counts as a bad case
        note = f" ({failed} without weights)" if failed else ""
        print(f"| {name} | {worst:.2e} | {bad} / {len(errs)}{note} | {statistics.median(t for _, t in values) * 1e3:.2f} ms |")
    print("\nerror: MGDA = relative norm excess over the QP optimum; Nash = spread of α_t (Gα)_t")


if __name__ == "__main__":
    from script_cli import run

    run(main)
