"""Peak memory of the whole-tensor merge kernels, as a multiple of the largest tensor's float32 size.

Writes a base and T fine-tuned `.safetensors` files (one `rows × 1024` tensor, the "largest tensor", plus a
small one) under --workdir (use /dev/shm, so the inputs are page cache the process maps, as on a real
run), then merges them with `merging.merge_to_file(..., threads=1)` in a fresh interpreter per method and
reports VmHWM (high-water RSS) after the merge minus VmHWM after `import merging`.

    python scripts/bench_merge_memory.py --workdir /dev/shm/dm --models 3 --rows 16384 --dtype float32 \\
        --runs 'dare {"p": 0.5}' 'dare {"p": 0.5, "base": "ties"}' 'consensus {}'

`--layout llama --layers 4` writes Llama-shaped models instead (hidden 1024, MLP 2816): `embed_tokens` and
an untied `lm_head` of `rows × 1024` each, then per layer q/k/v/o, gate/up/down and two norms — many
tensors of several sizes, as an LLM checkpoint has, where the single-tensor layout has one. `--shards N`
writes each model as a Hugging Face folder of N shards with its index (the merge then writes a folder).

The glibc heap makes the whole-tensor kernels' peak vary from run to run (blocks freed inside the heap stay
resident); `MALLOC_MMAP_THRESHOLD_=1048576` in the environment maps every block above 1 MB on its own, which
gives the repeatable figure of the tensors actually live.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

INPUTS = "inputs.json"  # the parameters of the generated inputs beside them: --keep reuses matching ones


def vm_hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def shapes(layout: str, rows: int, layers: int) -> dict[str, tuple[int, ...]]:
    if layout == "one":
        return {"emb": (rows, 1024), "small": (64, 64)}
    hidden, mlp = 1024, 2816
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (rows, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + f"self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"})
        out.update({p + "mlp.gate_proj.weight": (mlp, hidden), p + "mlp.up_proj.weight": (mlp, hidden),
                    p + "mlp.down_proj.weight": (hidden, mlp), p + "input_layernorm.weight": (hidden,),
                    p + "post_attention_layernorm.weight": (hidden,)})
    out.update({"model.norm.weight": (hidden,), "lm_head.weight": (rows, hidden)})
    return out


def make(folder: Path, models: int, rows: int, dtype: str, layout: str = "one", layers: int = 0, shards: int = 1) -> bool:
    """Write the seeded inputs, unless `folder` holds those of the same parameters (recorded last in
    INPUTS, so an interrupted generation is never reused): True when they were reused."""
    import torch

    params = {"models": models, "rows": rows, "dtype": dtype, "layout": layout, "layers": layers, "shards": shards}
    record = folder / INPUTS
    try:
        if json.loads(record.read_text()) == params:
            return True
    except (OSError, ValueError):
        pass
    record.unlink(missing_ok=True)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(*shape, generator=g).to(dt) for k, shape in shapes(layout, rows, layers).items()}
    folder.mkdir(parents=True, exist_ok=True)
    save(base, folder, "base", shards)
    for t in range(models):
        save({k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(dt) for k, v in base.items()}, folder,
             f"ft{t}", shards)
    record.write_text(json.dumps(params))
    return False


def save(sd: dict, folder: Path, name: str, shards: int) -> None:
    """`<name>.safetensors`, or with shards > 1 a Hugging Face folder `<name>/` of that many shards and their index."""
    from safetensors.torch import save_file

    if shards == 1:
        save_file(sd, str(folder / f"{name}.safetensors"))
        return
    (folder / name).mkdir(exist_ok=True)
    keys, weight_map = list(sd), {}
    per = math.ceil(len(keys) / shards)
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in keys[i * per:(i + 1) * per]}, str(folder / name / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys[i * per:(i + 1) * per]})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (folder / name / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / name / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))


def worker(folder: Path, models: int, method: str, hp: dict, shards: int = 1) -> float:
    import merging

    model = (lambda name: folder / name) if shards > 1 else (lambda name: folder / f"{name}.safetensors")
    before = vm_hwm_mb()
    merging.merge_to_file(method, model("base"), [model(f"ft{t}") for t in range(models)],
                          folder / ("out" if shards > 1 else "out.safetensors"), overwrite=True, threads=1, **hp)
    return vm_hwm_mb() - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--rows", type=int, default=16384, help="rows of the largest tensor (× 1024 columns)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--runs", nargs="+", default=['dare {"p": 0.5}'],
                    help="'<method> <JSON object>': merge_to_file's method and keyword arguments (checked first)")
    ap.add_argument("--layout", default="one", choices=["one", "llama"],
                    help="one large tensor, or Llama-shaped models")
    ap.add_argument("--layers", type=int, default=4, help="--layout llama: decoder layers")
    ap.add_argument("--shards", type=int, default=1,
                    help="write each model as a Hugging Face folder of this many shards (default: one file)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the generated inputs (reused by the next run with the same --models, --rows, --dtype, "
                         "--layout, --layers and --shards)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from script_cli import require_positive

    require_positive(args, ["models", "rows", "shards", "layers"])
    name = f"{args.models}_{args.rows}_{args.dtype}" + (f"_llama{args.layers}" if args.layout == "llama" else "")
    name += f"_{args.shards}shards" if args.shards > 1 else ""
    folder = Path(args.workdir) / name
    if args.worker:
        print(json.dumps(worker(folder, args.models, args.worker[0], json.loads(args.worker[1]), args.shards)))
        return
    check_runs(args.runs)
    if make(folder, args.models, args.rows, args.dtype, args.layout, args.layers, args.shards):
        print(f"inputs: reusing {folder} (kept by an earlier --keep run with these parameters)", flush=True)
    try:
        table(args, folder)
    finally:  # in /dev/shm the inputs are RAM: never leave them behind unasked
        if not args.keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


def check_runs(runs: list[str]) -> None:
    """Each --runs entry as merge_to_file would take it (method name, hyperparameters), before any input
    is written or a table line printed."""
    import inspect

    import merging
    from merging.engine import KeyOptions
    from merging.methods import create_method
    from mtl.cli.common import one_line

    call_options = {n for n, p in inspect.signature(merging.merge_to_file).parameters.items() if p.kind is p.KEYWORD_ONLY}
    for run in runs:
        method, _, text = run.partition(" ")
        try:
            hp = json.loads(text or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"--runs {run!r}: the hyperparameters are not JSON ({e})") from None
        if not isinstance(hp, dict):
            raise ValueError(f"--runs {run!r}: the hyperparameters must be a JSON object ({{\"name\": value}})")
        fixed = sorted({"overwrite", "threads"} & set(hp))
        if fixed:
            raise ValueError(f"--runs {run!r}: {', '.join(fixed)} is set by the benchmark (overwrite=True, threads=1)")
        try:  # what merge_to_file hands the method: its own options and the key options taken out
            create_method(method, **KeyOptions.split({k: v for k, v in hp.items() if k not in call_options})[1])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--runs {run!r}: {one_line(e)}") from None


def table(args, folder: Path) -> None:
    numel, largest = max((math.prod(shape), shape) for shape in shapes(args.layout, args.rows, args.layers).values())
    fp32 = numel * 4 / 2**20
    print("| run | T | largest tensor | peak RSS above import | × its float32 size |\n|---|---:|---|---:|---:|")
    for run in args.runs:
        method, _, hp = run.partition(" ")
        out = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--models", str(args.models),
                              "--rows", str(args.rows), "--dtype", args.dtype, "--layout", args.layout,
                              "--layers", str(args.layers), "--shards", str(args.shards), "--worker", method, hp or "{}"],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            sys.exit(f"error: {run}: {out.stderr.strip().splitlines()[-1].removeprefix('error: ')}")
        mb = json.loads(out.stdout.strip().splitlines()[-1])
        shape = "×".join(map(str, largest)) + f" {args.dtype}"
        shape += f" (Llama, {args.layers} layers)" if args.layout == "llama" else ""
        shape += f", {args.shards} shards" if args.shards > 1 else ""
        print(f"| {run} | {args.models} | {shape} | +{mb:.0f} MB | {mb / fp32:.1f}× |", flush=True)


if __name__ == "__main__":
    from script_cli import run

    run(main)
