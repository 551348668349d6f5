#!/usr/bin/env python
"""Would a chunked per-tensor task-arithmetic kernel (one pass over the T inputs per cache-sized chunk)
beat the current per-tensor path? Same process, same inputs (4 × 4096² bf16), results compared bit for bit.

    python scripts/bench_merge_chunked.py
"""
import time, torch, merging
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
n = (4096, 4096)
pre = {"w": torch.randn(n, generator=g).to(torch.bfloat16)}
fts = [{"w": (pre["w"].float() + 0.01*torch.randn(n, generator=g)).to(torch.bfloat16)} for _ in range(4)]

def chunked(pre, fts, lam, C=1<<18):
    p = pre["w"].reshape(-1); fs = [f["w"].reshape(-1) for f in fts]
    out = torch.empty(p.numel(), dtype=p.dtype)
    acc = torch.empty(C); tau = torch.empty(C); p32 = torch.empty(C); o = torch.empty(C)
    for s in range(0, p.numel(), C):
        e = min(s + C, p.numel()); m = e - s
        pp = p32[:m].copy_(p[s:e]); a = acc[:m]; t = tau[:m]
        torch.sub(fs[0][s:e].float(), pp, out=a)
        for f in fs[1:]:
            a.add_(torch.sub(f[s:e].float(), pp, out=t))
        out[s:e] = torch.add(pp, a, alpha=lam, out=o[:m])
    return out.view(n)

for rep in range(3):
    t0 = time.perf_counter(); a = merging.merge("task_arithmetic", pre, fts, lam=0.3)["w"]; t1 = time.perf_counter()
    b = chunked(pre, fts, 0.3); t2 = time.perf_counter()
    print(f"current {t1-t0:.3f}s chunked {t2-t1:.3f}s ratio {(t1-t0)/(t2-t1):.2f} equal {torch.equal(a,b)}")
