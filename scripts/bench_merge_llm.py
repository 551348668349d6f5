#!/usr/bin/env python
"""LLM-scale merging: synthetic Llama-shaped bf16 models (base + T fine-tunes) as sharded Hugging Face
folders, merged by mtlkit and by mergekit on the same files in the same run.

    python scripts/bench_merge.py --llm --sizes 0.25 0.5 1 [--mergekit-path /tmp/mk/src:/tmp/mkdeps] \
        [--out-dir /dev/shm] [--only copy "ours task"] [--repeat 2]

Runs per size (each in its own subprocess; peak RSS = its VmHWM, import baseline included):
  copy (mmap / pread)  every input byte read from page cache and copied once (the memory-bandwidth floor)
  ours TA         merge_to_file("task_arithmetic", lam=0.3)   (chunked kernels with the native chunk step;
                  with the torch chunk step, MTLKIT_NATIVE=0; and fused=False)
  ours TIES       merge_to_file("ties", trim="per_tensor", k=20)  (the paper's rules, per tensor; and global)
  ours TIES/mk    merge_to_file("ties", convention="mergekit", density=0.2)
  mergekit TIES / TA   mergekit's run_merge (dtype float32, out_dtype bfloat16), when importable
Bandwidth = input bytes / wall time. Every run starts with the inputs in page cache (read once before);
each row records the 1-minute load average around it (the machine may be shared).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SIZES = {  # billions of parameters -> (hidden, intermediate, layers, vocab)
    0.25: (1024, 2816, 16, 32000),
    0.5: (1536, 4096, 16, 32000),
    1.0: (2048, 5632, 16, 32000),
}


def llama_shapes(hidden, inter, layers, vocab):
    s = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            s[p + f"self_attn.{n}_proj.weight"] = (hidden, hidden)
        s[p + "mlp.gate_proj.weight"] = s[p + "mlp.up_proj.weight"] = (inter, hidden)
        s[p + "mlp.down_proj.weight"] = (hidden, inter)
        s[p + "input_layernorm.weight"] = s[p + "post_attention_layernorm.weight"] = (hidden,)
    s["model.norm.weight"] = (hidden,)
    s["lm_head.weight"] = (vocab, hidden)
    return s


def generate(root: Path, size: float, T: int) -> list[Path]:
    """base + T fine-tunes (base + 0.1·noise), written tensor by tensor as 1 GB shards."""
    import torch

    from merging.hf import write_sharded
    from merging.sources import TensorInfo

    hidden, inter, layers, vocab = SIZES[size]
    shapes = llama_shapes(hidden, inter, layers, vocab)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
           "num_key_value_heads": hidden // 64, "vocab_size": vocab, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    specs = [(k, TensorInfo(s, torch.bfloat16)) for k, s in shapes.items()]
    folders = []
    for t in range(T + 1):
        folder = root / ("base" if t == 0 else f"ft{t}")
        folders.append(folder)
        if (folder / "config.json").is_file():
            continue
        tmp = root / f".{folder.name}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)

        def tensors():
            for i, (k, s) in enumerate(shapes.items()):
                base = torch.randn(s, generator=torch.Generator().manual_seed(i)) * 0.02
                if t:
                    base += torch.randn(s, generator=torch.Generator().manual_seed(1000 * t + i)) * 0.002
                yield k, base.to(torch.bfloat16)

        write_sharded(tmp, specs, tensors(), 1 << 30, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg))
        os.replace(tmp, folder)
    return folders


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def warm(paths) -> None:
    for p in paths:
        for f in Path(p).glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def evict(root: Path, keep: Path) -> None:
    """Drop the other sizes' inputs from page cache (POSIX_FADV_DONTNEED), so that each size's runs
    find their own inputs cached and enough free memory for their outputs."""
    for f in root.glob("llama_*/*/*.safetensors"):
        if keep not in f.parents:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def copy_mmap(files) -> None:
    """Page cache -> one reused buffer through the mapping: every input byte once."""
    import mmap

    import torch

    buf = None
    for f in files:
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            src = torch.frombuffer(m, dtype=torch.uint8)
            if buf is None or buf.numel() < src.numel():
                buf = torch.empty(src.numel(), dtype=torch.uint8)
            buf[: src.numel()].copy_(src)
            del src


def copy_pread(files) -> None:
    """The same bytes through pread into one 1 MB buffer (no page faults)."""
    view = memoryview(bytearray(1 << 20))
    for f in files:
        fd, off = os.open(f, os.O_RDONLY), 0
        while (n := os.preadv(fd, [view], off)) > 0:
            off += n
        os.close(fd)


def _work(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    base, fts, out = spec["base"], spec["fts"], Path(spec["out"])
    # the libraries are imported before the clock starts: the merge is timed, not Python's imports
    if spec["tool"] == "mtlkit":
        os.environ["MTLKIT_NATIVE"] = "1" if spec["hp"].pop("native", True) else "0"
        import merging
    elif spec["tool"] == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    start = time.perf_counter()
    files = [f for p in [base, *fts] for f in sorted(Path(p).glob("*.safetensors"))]
    if spec["kind"] == "copy":
        copy_mmap(files)
    elif spec["kind"] == "pread":
        copy_pread(files)
    elif spec["tool"] == "mtlkit":
        merging.merge_to_file(spec["method"], base, fts, out, overwrite=True, shard_size="1GB",
                              threads=spec["threads"], **spec["hp"])
    else:
        cfg = {"merge_method": spec["method"], "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
               "models": [{"model": base}] + [{"model": f, "parameters": spec["hp"]} for f in fts]}
        run_merge(MergeConfiguration.model_validate(cfg), str(out),
                  MergeOptions(copy_tokenizer=False, lazy_unpickle=True, low_cpu_memory=True, quiet=True))
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": vm_hwm_mb()}


RUNS = [  # label, tool, method, hyperparameters (cheap runs first, each pair side by side)
    ("memory copy of the inputs (mmap)", "none", "copy", {}),
    ("memory copy of the inputs (pread)", "none", "pread", {}),
    ("ours task arithmetic", "mtlkit", "task_arithmetic", {"lam": 0.3}),
    ("ours TA, torch chunk step", "mtlkit", "task_arithmetic", {"lam": 0.3, "native": False}),
    ("ours TA, whole-tensor kernels", "mtlkit", "task_arithmetic", {"lam": 0.3, "fused": False}),
    ("mergekit task arithmetic", "mergekit", "task_arithmetic", {"weight": 0.3}),
    ("ours TIES (paper, per tensor)", "mtlkit", "ties", {"trim": "per_tensor", "k": 20, "lam": 1.0}),
    ("ours TIES (paper, global)", "mtlkit", "ties", {"k": 20, "lam": 1.0}),
    ("mergekit TIES", "mergekit", "ties", {"density": 0.2, "weight": 1.0}),
    ("ours TIES (convention=mergekit)", "mtlkit", "ties", {"convention": "mergekit", "density": 0.2}),
    ("ours TA (convention=mergekit)", "mtlkit", "task_arithmetic", {"convention": "mergekit", "weight": 0.3}),
]


# (ours, mergekit's) rows that do the same merge: their time ratio is printed
PAIRS = [("ours task arithmetic", "mergekit task arithmetic"), ("ours TA (convention=mergekit)", "mergekit task arithmetic"),
         ("ours TIES (convention=mergekit)", "mergekit TIES"), ("ours TIES (paper, per tensor)", "mergekit TIES")]
COPY = "memory copy of the inputs (pread)"


def ratios(runs: dict[str, list[dict]], copy: str = COPY, pairs=PAIRS) -> list[str]:
    """Each row's median time as a multiple of the same run's pread copy of the inputs (row ``copy``: the floor
    a merge that reads every input once cannot beat), and mergekit's time over ours for the rows doing the
    same merge (``pairs``)."""
    med = {label: statistics.median(r["seconds"] for r in rs) for label, rs in runs.items()
           if rs and all("seconds" in r for r in rs)}
    lines = []
    width = max(34, *map(len, med)) if med else 34
    if copy in med:
        lines += [f"{label:{width}s} {t / med[copy]:.2f}x the pread copy's time" for label, t in med.items() if label != copy]
    lines += [f"{ours:{width}s} {med[theirs] / med[ours]:.2f}x faster than {theirs!r}" for ours, theirs in pairs
              if ours in med and theirs in med]
    return lines


def check_only(only) -> None:
    """Refuse an --only word that matches no run label (substring match), before any input is generated."""
    for word in only or ():
        if not any(word in label for label, *_ in RUNS):
            raise ValueError(f"--only {word!r} matches no run label; valid: " + ", ".join(repr(r[0]) for r in RUNS))


def run_one(spec: dict, mergekit_path: str | None) -> dict:
    env = dict(os.environ)
    if spec["tool"] == "mergekit":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [mergekit_path, env.get("PYTHONPATH")]))
    warm([spec["base"], *spec["fts"]])
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, str(HERE), "--worker", json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["load"] = (load + os.getloadavg()[0]) / 2  # 1-minute load average, before and after
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5], choices=sorted(SIZES))
    ap.add_argument("--models", type=int, default=4, help="fine-tuned models (plus the base)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (mergekit) / merge threads (ours)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None,
                    help="where merged outputs go (default: the workdir); a tmpfs such as /dev/shm takes the "
                         "disk out of the timing, i.e. measures the merge step itself")
    ap.add_argument("--repeat", type=int, default=1, help="run the whole list this many times (rows interleaved)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models (reused by the next run)")
    ap.add_argument("--mergekit-path", default=None, help="PYTHONPATH entries holding mergekit and its dependencies")
    ap.add_argument("--only", nargs="*", default=None, help="run labels to run (substring match; a word matching no label is refused)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from script_cli import require_positive

    require_positive(args, ["models", "threads", "repeat"])
    if args.worker:
        print(json.dumps(_work(json.loads(args.worker))))
        return {}
    check_only(args.only)  # a typo ran nothing after generating gigabytes of inputs, and exited 0
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_llm_"))
    results = {"threads": args.threads, "models": args.models, "cpus": os.cpu_count(), "out_dir": args.out_dir,
               "sizes": {}}
    for size in args.sizes:
        t0 = time.perf_counter()
        folders = generate(root / f"llama_{size}", size, args.models)
        inputs = sum(f.stat().st_size for p in folders for f in p.glob("*.safetensors"))
        print(f"# {size}B: {inputs / 1e9:.2f} GB of inputs, generated in {time.perf_counter() - t0:.0f} s", flush=True)
        evict(root, root / f"llama_{size}")
        warm(folders)
        rows = results["sizes"][str(size)] = {"input_bytes": inputs, "runs": {}}
        for label, tool, method, hp in [r for _ in range(args.repeat) for r in RUNS]:
            if args.only and not any(s in label for s in args.only):
                continue
            out = Path(args.out_dir or root) / f"out_{size}_{tool}_{method}"
            spec = {"tool": tool, "kind": method if method in ("copy", "pread") else "merge", "method": method, "hp": hp,
                    "base": str(folders[0]), "fts": [str(f) for f in folders[1:]], "out": str(out),
                    "threads": args.threads}
            r = run_one(spec, args.mergekit_path)
            if "seconds" in r:
                r["read_gb_s"] = inputs / r["seconds"] / 1e9
            rows["runs"].setdefault(label, []).append(r)
            print(f"{label:34s} " + ("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())), flush=True)
            subprocess.run(["rm", "-rf", str(out)])
        rows["ratios"] = ratios(rows["runs"])  # measured in this run, against its own copy and mergekit rows
        print("\n".join(f"# {size}B ratio: {line}" for line in rows["ratios"]), flush=True)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(root / f"llama_{size}")])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    from script_cli import run

    run(main)
