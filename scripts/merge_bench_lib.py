"""What `scripts/bench_merge.py` measures the streaming engine with and against: synthetic model shapes
and files (ViT-B/32- and Llama-shaped float32 state dicts), and straightforward in-memory merges.
"""
from __future__ import annotations

from pathlib import Path


# -- model shapes -------------------------------------------------------------------------------------
def vit_shapes(width=768, layers=12, patch=32, tokens=50, out_dim=512):
    s = {
        "backbone.conv1.weight": (width, 3, patch, patch),
        "backbone.class_embedding": (width,),
        "backbone.positional_embedding": (tokens, width),
        "backbone.ln_pre.weight": (width,),
        "backbone.ln_pre.bias": (width,),
    }
    for i in range(layers):
        p = f"backbone.transformer.resblocks.{i}."
        s.update({
            p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
            p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
            p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
            p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
            p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_fc.bias": (4 * width,),
            p + "mlp.c_proj.weight": (width, 4 * width), p + "mlp.c_proj.bias": (width,),
        })
    s.update({"backbone.ln_post.weight": (width,), "backbone.ln_post.bias": (width,), "backbone.proj": (width, out_dim)})
    return s


def llama_shapes(hidden=768, inter=2048, layers=12, vocab=32000):
    s = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        s.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    s.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return s


def numel(shapes):
    n = 0
    for sh in shapes.values():
        k = 1
        for d in sh:
            k *= d
        n += k
    return n


def generate(folder: Path, shapes, T: int, seed: int = 0):
    """θ0 ~ N(0, 0.02²); θ_t = θ0 + N(0, 0.001²). One model in memory at a time besides θ0."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    save_file(pre, str(folder / "pre.safetensors"))
    paths = []
    for t in range(T):
        ft = {k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in pre.items()}
        p = folder / f"ft{t}.safetensors"
        save_file(ft, str(p))
        paths.append(p)
        del ft
    return folder / "pre.safetensors", paths


# -- in-memory baselines -----------------------------------------------------------------------------
def naive_task_arithmetic(pre_p, ft_ps, out, lam):
    import torch
    from safetensors.torch import load_file, save_file

    pre = load_file(pre_p)
    fts = [load_file(p) for p in ft_ps]
    merged = {k: pre[k] + lam * torch.stack([ft[k] - pre[k] for ft in fts]).sum(0) for k in pre}
    save_file(merged, out)


def naive_ties(pre_p, ft_ps, out, k, lam):
    """Flatten every task vector into a T×P matrix, then TIES with whole-matrix torch ops."""
    import math

    import torch
    from safetensors.torch import load_file, save_file

    pre = load_file(pre_p)
    keys = list(pre)
    P = sum(pre[x].numel() for x in keys)
    tv = torch.empty(len(ft_ps), P)
    for t, p in enumerate(ft_ps):
        ft = load_file(p)
        torch.cat([(ft[x] - pre[x]).reshape(-1) for x in keys], out=tv[t])
        del ft
    n = math.ceil(P * k / 100)
    for t in range(len(ft_ps)):
        thr = tv[t].abs().kthvalue(P - n + 1).values
        tv[t] *= tv[t].abs() >= thr
    sign = tv.sum(0).sign()
    agree = torch.where(sign > 0, tv > 0, tv < 0)
    merged_flat = (tv * agree).sum(0) / agree.sum(0).clamp(min=1)
    out_sd, i = {}, 0
    for x in keys:
        m = pre[x].numel()
        out_sd[x] = pre[x] + lam * merged_flat[i : i + m].view_as(pre[x])
        i += m
    save_file(out_sd, out)


def sort_ties_per_tensor(pre_p, ft_ps, out, k, lam):
    """Per-tensor TIES read tensor by tensor, trimming by a full sort of each tensor's magnitudes."""
    import math

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    handles = [safe_open(p, "pt") for p in [pre_p, *ft_ps]]
    out_sd = {}
    for key in handles[0].keys():
        pre = handles[0].get_tensor(key)
        taus = []
        for h in handles[1:]:
            tau = (h.get_tensor(key) - pre).reshape(-1)
            n = math.ceil(tau.numel() * k / 100)
            order = tau.abs().argsort(descending=True)
            keep = torch.zeros_like(tau, dtype=torch.bool)
            keep[order[:n]] = True
            taus.append(tau * keep)
        tv = torch.stack(taus)
        sign = tv.sum(0).sign()
        agree = torch.where(sign > 0, tv > 0, tv < 0)
        merged = (tv * agree).sum(0) / agree.sum(0).clamp(min=1)
        out_sd[key] = pre + lam * merged.view_as(pre)
    save_file(out_sd, out)
