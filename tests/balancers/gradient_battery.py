"""A battery of task-gradient matrices on which aggregators must meet their defining optimum:
random, 120°-conflicting, ×100-norm-spread and near-parallel gradients, T ∈ {2, 3, 6}, P ∈ {10, 1000}."""
import math

import torch


def battery() -> list[tuple[str, torch.Tensor]]:
    """(name, float32 T x P Jacobian) pairs, deterministic."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for T in (2, 3, 6):
        for P in (10, 1000):
            for kind in ("random", "conflict", "spread", "parallel"):
                J = torch.randn(T, P, generator=g, dtype=torch.float64)
                if kind == "conflict":  # unit gradients 120° apart in a plane, plus a little noise
                    plane = torch.linalg.qr(torch.randn(P, 2, generator=g, dtype=torch.float64))[0].T
                    ang = torch.arange(T, dtype=torch.float64) * 2 * math.pi / 3
                    J = torch.cos(ang)[:, None] * plane[0] + torch.sin(ang)[:, None] * plane[1] + 0.05 * J / math.sqrt(P)
                elif kind == "spread":
                    J = J * torch.logspace(0, 2, T, dtype=torch.float64)[:, None]
                elif kind == "parallel":
                    J = torch.randn(1, P, generator=g, dtype=torch.float64) + 1e-3 * J
                    J = J * torch.logspace(0, 2, T, dtype=torch.float64)[:, None]
                cases.append((f"T{T}-P{P}-{kind}", J.float()))
    return cases
