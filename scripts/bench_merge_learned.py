#!/usr/bin/env python
"""Cost of learned merging (AdaMerging layer-wise): `merging.learn` vs a naive loop, and peak memory.

    python scripts/bench_merge_learned.py              # step time + memory, CNN zoo shape; ViT-B/32 memory
    python scripts/bench_merge_learned.py --only step  # or: --only vit
    python scripts/bench_merge_learned.py --small      # seconds-long check (the step part only)

step: a zoo-CNN-shaped model (timm resnet10t + HPS neck, 8 classification heads, 32×32 inputs),
θ0 + 8 random fine-tunes as model folders, 8 tasks × `--batch` images per step. `merging.learn`
(one model, `functional_call`, task vectors stacked once) against a naive loop that rebuilds the
merged model every step: τ_t = θ_t − θ0 from the state dicts, θ = θ0 + Σ λ τ, a fresh copy of the
model with θ put in place of its parameters, every task's loss summed, one backward. Both start from
the same λ and see the same batches, so their coefficients after the run must agree (checked).
Each variant runs in its own subprocess: peak RSS (VmHWM) is per variant.

vit: layer-wise AdaMerging on θ0 + 8 ViT-B/32-shaped models (random weights, safetensors files in a
temporary folder), 2 steps, peak RSS against the size of the inputs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the CNN zoo shaped pool -------------------------------------------------------------------------------------


def cnn_pool(folder: Path, T: int, size: str):
    import torch

    import mtl
    from mtl.models import create_model

    torch.manual_seed(0)
    tasks = [{"kind": "classification", "name": f"task{i}", "num_classes": 10} for i in range(T)]
    bb = {"name": "resnet10t", "out_indices": [2, 3, 4]} if size == "full" else {"name": "test_resnet", "out_indices": [1, 2, 3]}
    base = create_model(tasks, backbone=bb, decoder={"name": "hps", "channels": 64 if size == "full" else 16})
    data = {"name": "zoo", "dataset": "mnist"}
    mtl.save_model(base, folder / "pre", meta={"data": data})
    paths = []
    g = torch.Generator().manual_seed(1)
    for i in range(T):
        ft = create_model([tasks[i]], backbone=bb, decoder={"name": "hps", "channels": 64 if size == "full" else 16})
        sd = base.state_dict()
        own = ft.state_dict()
        for k, v in own.items():
            src = sd.get(k, v)
            own[k] = src + 0.02 * torch.randn(src.shape, generator=g) * (src.abs().mean() + 0.05) if src.is_floating_point() and "running" not in k else src
        ft.load_state_dict(own)
        mtl.save_model(ft, folder / f"ft{i}", meta={"data": data})
        paths.append(folder / f"ft{i}")
    return folder / "pre", paths


def batches(T: int, batch: int, steps: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {f"task{i}": [torch.randint(0, 256, (batch, 3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(steps)]
            for i in range(T)}


def run_ours(pre, fts, data, steps, **options) -> dict:
    import merging

    t0 = time.perf_counter()
    res = merging.learn("adamerging", pre, fts, unlabeled=data, steps=steps, lr=1e-3, granularity="layer",
                        progress=False, **options)
    # each history row holds the seconds since learning started, taken at the end of its step
    return {"seconds": time.perf_counter() - t0, "coef": res.coefficients.tolist(),
            "stamps": [row["seconds"] for row in res.history]}


def run_naive(pre, fts, data, steps) -> dict:
    """Rebuild the merged model every step from state dicts (what a straightforward implementation does)."""
    import copy

    import torch

    import merging
    from merging.learned.objective import entropy
    from merging.pool import ModelPool
    from mtl.io import load_state

    t0 = time.perf_counter()
    pool = ModelPool.from_folders(pre, fts)
    pre_sd = load_state(pre)
    ft_sds = [load_state(f) for f in fts]
    keys = list(merging.task_vector(pre, fts[0]))  # the merged keys (task vector keys)
    template = pool.merged_model({k: v for k, v in pre_sd.items() if not k.startswith("decoder.heads.")})
    lam = torch.full((len(keys), len(fts)), 0.3, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=1e-3)
    names = [t for m in pool.members for t in m.tasks]
    iters = {t: iter(data[t]) for t in names}
    stamps = []
    for _ in range(steps):
        model = copy.deepcopy(template)
        for r, k in enumerate(keys):
            taus = [ft[k].float() - pre_sd[k].float() for ft in ft_sds]
            merged = pre_sd[k].float() + sum(lam[r, t] * taus[t] for t in range(len(fts)))
            *path, leaf = k.split(".")
            mod = model
            for p in path:
                mod = getattr(mod, p)
            if leaf in mod._parameters:
                del mod._parameters[leaf]
            setattr(mod, leaf, merged)
        loss = sum(entropy(model(next(iters[t]), tasks=[t])[t], "classification", t) for t in names)
        opt.zero_grad()
        loss.backward()
        opt.step()
        del model
        stamps.append(time.perf_counter())
    return {"seconds": time.perf_counter() - t0, "coef": lam.detach().tolist(), "stamps": stamps}


def child_step(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    pre, fts = folder / "pre", sorted(folder.glob("ft*"), key=lambda p: int(p.name[2:]))
    data = batches(len(fts), args.batch, args.steps)
    fn = run_naive if args.variant == "naive" else run_ours
    opts = {"channels_last": False} if args.variant == "ours_nchw" else {}
    fn(pre, fts, {t: b[:1] for t, b in data.items()}, 1, **opts)  # warm-up: imports, allocator, first-call overheads
    out = fn(pre, fts, data, args.steps, **opts)
    out["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(out))


def child_vit(args) -> None:
    import timm
    import torch
    from safetensors.torch import save_file
    from torch import nn

    import merging

    torch.set_num_threads(args.threads)

    class ViTMulti(nn.Module):
        def __init__(self, T):
            super().__init__()
            self.backbone = timm.create_model("vit_base_patch32_224", pretrained=False, num_classes=0)
            self.heads = nn.ModuleDict({f"task{i}": nn.Linear(768, 10) for i in range(T)})

        def forward(self, x, tasks):
            z = self.backbone(x)
            return {t: self.heads[t](z) for t in tasks}

    folder = Path(args.folder)
    T = 8
    if not (folder / "pre.safetensors").exists():
        g = torch.Generator().manual_seed(0)
        base = ViTMulti(T).state_dict()
        shared = {k: v.contiguous() for k, v in base.items() if k.startswith("backbone.")}
        save_file(shared, str(folder / "pre.safetensors"))
        for i in range(T):
            save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in shared.items()},
                      str(folder / f"ft{i}.safetensors"))
        del base, shared
        print("RESULT " + json.dumps({"written": True}))
        return
    inputs = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    model = ViTMulti(T).eval()
    g = torch.Generator().manual_seed(1)
    data = {f"task{i}": [torch.randn(args.batch, 3, 224, 224, generator=g)] for i in range(T)}
    before = peak_rss_mb()
    t0 = time.perf_counter()
    res = merging.learn("adamerging", folder / "pre.safetensors", [folder / f"ft{i}.safetensors" for i in range(T)],
                        unlabeled=data, model=model, tasks=list(data), steps=args.steps, granularity="layer",
                        progress=False)
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                                  "rss_before_mb": before, "inputs_mb": inputs / 2**20,
                                  "params": sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone.")),
                                  "coef_shape": list(res.coefficients.shape)}))


def spawn(*argv: str) -> dict:
    cmd = [sys.executable, __file__, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["step", "vit"])
    p.add_argument("--small", action="store_true",
                   help="the step part on a timm test backbone, 3 tasks, 3 steps unless --steps is given (seconds); "
                        "it has no ViT part, so --only vit is refused")
    p.add_argument("--steps", type=int, default=None, help="steps of the step part (default 5; 3 with --small)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs per variant (the fastest counts)")
    p.add_argument("--child", choices=["step", "vit"], help=argparse.SUPPRESS)
    p.add_argument("--ab-channels-last", action="store_true",
                   help="also run merging.learn with channels_last=False (A/B of the memory format)")
    p.add_argument("--variant", choices=["ours", "naive", "ours_nchw"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from script_cli import require_positive

    require_positive(args, ["steps", "batch", "threads", "repeats"])
    if args.small and args.only == "vit":  # it printed an empty line and exited 0
        raise ValueError("--small has no ViT part: drop --small, or use --only step")
    if args.steps is None:  # an explicit --steps is honoured with --small (--small overrode it with 3)
        args.steps = 3 if args.small else 5
    if args.child == "step":
        child_step(args)
        return 0
    if args.child == "vit":
        child_vit(args)
        return 0

    lines = []
    common = ["--threads", str(args.threads), "--batch", str(args.batch)]
    if args.only in (None, "step"):
        T = 3 if args.small else 8
        steps = args.steps
        with tempfile.TemporaryDirectory(prefix="bench_learned_") as tmp:
            pre, fts = cnn_pool(Path(tmp), T, "small" if args.small else "full")
            inputs = sum((Path(f) / "model.safetensors").stat().st_size for f in [pre, *fts]) / 2**20
            runs: dict[str, list[dict]] = {}
            variants = ("naive", "ours", "ours_nchw") if args.ab_channels_last else ("naive", "ours")
            for variant in variants * args.repeats:  # interleaved
                r = spawn("--child", "step", "--variant", variant, "--folder", tmp, "--steps", str(steps), *common)
                runs.setdefault(variant, []).append(r)
        import torch

        # the fastest run counts, for each measure on its own; steady state = from the end of the first step
        # to the end of the last (no setup, no first step)
        per = {v: min(r["seconds"] for r in rs) / steps for v, rs in runs.items()}
        steady = {v: min((r["stamps"][-1] - r["stamps"][0]) / (steps - 1) if steps > 1 else float("nan") for r in rs)
                  for v, rs in runs.items()}
        rss = {v: max(r["peak_rss_mb"] for r in rs) for v, rs in runs.items()}
        same = all(torch.allclose(torch.tensor(r["coef"]), torch.tensor(runs["naive"][0]["coef"]), atol=1e-5, rtol=1e-4)
                   for rs in runs.values() for r in rs)
        label = {"naive": "naive: rebuild the merged model from state dicts every step",
                 "ours": "`merging.learn` (one model, functional_call, stacked task vectors)",
                 "ours_nchw": "`merging.learn`, channels_last=False"}
        lines += [f"Layer-wise AdaMerging, {T} tasks × {args.batch} images per step, {steps} steps, "
                  f"{'timm test_resnet' if args.small else 'resnet10t + HPS (CNN zoo shape)'}, inputs {inputs:.1f} MB, "
                  f"{args.threads} thread(s), best of {args.repeats}:", "",
                  "| run | time per step (run / steps) | per step after the first | peak RSS |", "|---|---:|---:|---:|"]
        lines += [f"| {label[v]} | {per[v]:.3f} s | {steady[v]:.3f} s | {rss[v]:.0f} MB |" for v in runs]
        lines += ["", "every run, per step after the first (s): " + "; ".join(
            f"{v} " + " / ".join(f"{(r['stamps'][-1] - r['stamps'][0]) / max(steps - 1, 1):.3f}" for r in rs)
            for v, rs in runs.items())]
        lines += ["", f"speed-up {per['naive'] / per['ours']:.2f}× per run, {steady['naive'] / steady['ours']:.2f}× per step "
                  f"after the first; coefficients after {steps} steps equal in every run: {same}"]
    if args.only in (None, "vit") and not args.small:
        with tempfile.TemporaryDirectory(prefix="bench_learned_vit_") as tmp:
            spawn("--child", "vit", "--folder", tmp, *common)
            r = spawn("--child", "vit", "--folder", tmp, "--steps", "2", "--threads", str(args.threads), "--batch", "2")
        ratio = r["peak_rss_mb"] / r["inputs_mb"]
        lines += ["", f"Layer-wise AdaMerging on θ0 + 8 ViT-B/32-shaped models ({r['params'] / 1e6:.1f}M shared parameters each, "
                  f"coefficients {r['coef_shape']}), 2 steps, 8 tasks × 2 images of 224×224:", "",
                  f"inputs {r['inputs_mb']:.0f} MB; peak RSS {r['peak_rss_mb']:.0f} MB (python + torch + model before "
                  f"learning: {r['rss_before_mb']:.0f} MB) = {ratio:.2f}× the inputs; {r['seconds'] / 2:.1f} s per step"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from script_cli import run

    run(main)
