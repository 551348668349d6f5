"""CPU inference latency of a trained model: eager PyTorch vs ONNX Runtime vs torch.compile.

Batch 1 and 32 (uint8 input, all tasks), a fixed number of threads for every runtime, the runtimes
interleaved in rounds so that load from other jobs on a shared machine hits them alike. Reported per
runtime and batch: the median latency over rounds and the median of the within-round ratio to eager.

    python scripts/bench_export.py                          # trains a small model first (seconds)
    python scripts/bench_export.py --model runs/x/model --threads 2    # at the folder's training size (--size to change)

The ONNX file comes from ``mtl.export(..., format="onnx")`` and is verified against PyTorch there.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import mtl
from mtl.exporters.api import read_report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: train resnet10t on scenes, smoke budget)")
    p.add_argument("--out", default="outputs/bench_export")
    p.add_argument("--size", type=int, default=None,
                   help="input side in pixels (default: the --model folder's training size; 64 for the trained one)")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=5, help="timed calls per runtime per round (batch 1: x4)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-timeout", type=int, default=600, help="give up on torch.compile after this many seconds")
    args = p.parse_args(argv)
    from script_cli import require_positive

    args.batches = batch_sizes(args.batches)
    # before any work: --iters 0 divided by zero after the export, --batches 0 failed after a training
    require_positive(args, ["size", "batches", "threads", "rounds", "iters", "compile_timeout"])
    return args


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        raise ValueError(f"--batches takes comma-separated whole numbers, got {text!r}") from None
    if len(set(sizes)) != len(sizes):  # one input per size: a repeated one would be timed once, reported twice
        raise ValueError(f"--batches lists a size twice: {text!r}")
    return sizes


def train_model(out: Path, size: int) -> Path:
    from bench_runs import record, reusable
    from mtl.train import run

    overrides = ["experiment=scenes_hps", "debug=smoke", "backbone=resnet10t", f"data.size={size}", "logger=none",
                 "viz.num_samples=0", "log_weights_every=0"]
    run_dir = out / "train"
    if not reusable(run_dir, overrides):  # a second run with the same --out measures the same model again
        run(overrides, run_dir=run_dir)
        record(run_dir, overrides)
    return run_dir / "model"


class CompileTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CompileTimeout()


def runtimes(model, onnx_file: Path, threads: int, compile_: bool, example: torch.Tensor, compile_timeout: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])

    def eager(x):
        with torch.inference_mode():
            return model(x)

    fns = {"eager": eager, "onnxruntime": lambda x: session.run(None, {"image": x.numpy()})}
    notes = {}
    if compile_:
        import signal

        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(compile_timeout)
        try:
            compiled = torch.compile(model, dynamic=False)
            start = time.perf_counter()
            with torch.inference_mode():
                for b in sorted({1, example.shape[0]}):
                    compiled(example[:b])
            signal.alarm(0)
            notes["compile_seconds"] = round(time.perf_counter() - start, 1)

            def comp(x):
                with torch.inference_mode():
                    return compiled(x)

            fns["torch.compile"] = comp
        except CompileTimeout:
            notes["torch.compile"] = f"not measured: compiling did not finish within {compile_timeout} s on this machine"
        except Exception as e:  # a missing compiler toolchain is common on small CPU boxes
            if "CompileTimeout" in f"{type(e).__name__} {e}":  # inductor wraps our alarm in its own error
                notes["torch.compile"] = f"not measured: compiling did not finish within {compile_timeout} s on this machine"
            else:
                notes["torch.compile"] = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    return fns, notes


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    folder = Path(args.model) if args.model else train_model(out, args.size or 64)
    # without --size the export takes the folder's recorded training size: time the model as it is shipped
    onnx_dir = mtl.export(folder, "onnx", out / "onnx", exporter=args.exporter, input_size=args.size, overwrite=True)
    h, w = read_report(onnx_dir)["input"]["shape"][2:]
    args.size = h if h == w else f"{h}x{w}"
    model = mtl.load_model(folder).eval()
    batches = args.batches
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=gen) for b in batches}
    fns, notes = runtimes(model, onnx_dir / "model.onnx", args.threads, not args.no_compile, inputs[max(batches)],
                         args.compile_timeout)
    for fn in fns.values():  # warm-up
        for x in inputs.values():
            fn(x)
    times = {(r, b): [] for r in fns for b in batches}
    for _ in range(args.rounds):
        for b, x in inputs.items():
            n = args.iters * (4 if b == 1 else 1)
            for r, fn in fns.items():
                start = time.perf_counter()
                for _ in range(n):
                    fn(x)
                times[r, b].append(1000 * (time.perf_counter() - start) / n)
    rows = []
    for b in batches:
        for r in fns:
            ratios = [t / e for t, e in zip(times[r, b], times["eager", b])]
            rows.append({"runtime": r, "batch": b, "median_ms": statistics.median(times[r, b]),
                         "min_ms": min(times[r, b]), "ratio_to_eager": statistics.median(ratios)})
    result = {"model": str(folder), "size": args.size, "threads": args.threads, "rounds": args.rounds,
              "torch": torch.__version__, "machine": platform.platform(), "cpu": platform.processor(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "exporter": args.exporter,
              "params": sum(p.numel() for p in model.parameters()), "rows": rows, **notes}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{folder} · {args.size}px · {args.threads} threads · {args.rounds} rounds · torch {torch.__version__}")
    print("| runtime | batch | median ms | min ms | latency / eager (median of per-round ratios) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['runtime']} | {r['batch']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['ratio_to_eager']:.2f} |")
    for k, v in notes.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    from script_cli import run

    run(main)
