"""scripts/ follow the CLIs' convention: a user error is one `error:` line on stderr and exit status 1
(scripts/script_cli.py), never a traceback or files written for nothing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def assert_one_error_line(tmp_path, script, args, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("MTL_VERBOSE", "HYDRA_FULL_ERROR")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *[a.format(tmp=tmp_path) for a in args]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(expected.format(tmp=tmp_path)) and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("script, args, expected", [
    ("disentanglement.py", ["--manifest", "{tmp}/nope.json"], "error: {tmp}/nope.json: file not found"),
    ("disentanglement.py", ["--manifest", "{tmp}/m.json", "--pair", "a", "b", "--grid", "0", "1", "-2"],
     "error: --grid takes finite LO HI and a count N >= 1"),
    ("disentanglement.py", ["--manifest", "{tmp}/m.json", "--alphas", "inf"], "error: --alphas must be finite numbers"),
    ("bench_merge_quality.py", ["--manifest", "{tmp}/nope.json", "--out", "{tmp}/q"],
     "error: --manifest {tmp}/nope.json: file not found"),
    ("bench_prune_latency.py", ["--base", "{tmp}/none", "{tmp}/pruned"], "error: {tmp}/none: no such folder"),
    ("bench_export.py", ["--model", "{tmp}/none"], "error: {tmp}/none: no such folder"),
    # counts checked before the export (--iters 0 divided by zero after it) and before training a model
    ("bench_export.py", ["--model", "{tmp}/none", "--iters", "0", "--out", "{tmp}/q"], "error: --iters must be ≥ 1, got 0"),
    ("bench_export.py", ["--model", "{tmp}/none", "--rounds", "0", "--out", "{tmp}/q"], "error: --rounds must be ≥ 1, got 0"),
    ("bench_export.py", ["--model", "{tmp}/none", "--threads", "0", "--out", "{tmp}/q"], "error: --threads must be ≥ 1, got 0"),
    ("bench_export.py", ["--model", "{tmp}/none", "--compile-timeout", "0", "--out", "{tmp}/q"],
     "error: --compile-timeout must be ≥ 1, got 0"),
    ("bench_export.py", ["--batches", "1,0", "--out", "{tmp}/q"], "error: --batches must be ≥ 1, got 0"),
    ("bench_export.py", ["--batches", "1,x", "--out", "{tmp}/q"], "error: --batches takes comma-separated whole numbers"),
    ("bench_export.py", ["--batches", "8,8", "--out", "{tmp}/q"], "error: --batches lists a size twice"),
    ("bench_train.py", ["--rounds", "0"], "error: --rounds must be ≥ 1, got 0"),
    ("bench_slimmable.py", ["--part", "control"], "error: --part control needs --runs"),
    # a missing run file printed its message without the error: prefix
    ("bench_slimmable.py", ["--part", "compare", "--runs", "{tmp}/none"],
     "error: {tmp}/none/width_table_test.json: file not found"),
    ("bench_slimmable.py", ["--part", "compare", "--runs", "{tmp}/none", "--scores", "{tmp}"],
     "error: {tmp} is a folder, not a JSON file"),
    ("bench_merge.py", ["--small", "--workdir", "{tmp}/none"], "error: --workdir {tmp}/none: no such folder"),
    # counts below 1 are refused before any work (--workers 0 divided by zero after a whole multirun)
    ("bench_launchers.py", ["--workers", "0", "--out", "{tmp}/q"], "error: --workers must be ≥ 1, got 0"),
    ("bench_launchers.py", ["--cores", "0", "--out", "{tmp}/q"], "error: --cores must be ≥ 1, got 0"),
    ("bench_balancers.py", ["--epochs", "0", "--out", "{tmp}/q"], "error: --epochs must be ≥ 1, got 0"),
    ("bench_architectures.py", ["--dispatch-hidden", "96", "0", "--out", "{tmp}/q"],
     "error: --dispatch-hidden must be ≥ 1, got 0"),
    ("bench_prune.py", ["--ft-epochs", "0", "--out", "{tmp}/q"], "error: --ft-epochs must be ≥ 1, got 0"),
    # checked before the base and control runs are trained (they ran first)
    ("bench_prune.py", ["--smoke", "--targets", "1.5", "--out", "{tmp}/q"],
     "error: --targets must be a number in (0, 1), got 1.5"),
    ("bench_prune.py", ["--targets", "0", "--out", "{tmp}/q"], "error: --targets must be a number in (0, 1), got 0.0"),
    ("bench_prune.py", ["--targets", "0.4", "0.6", "0.4", "--out", "{tmp}/q"],
     "error: --targets lists 0.4 twice; name each target once"),
    ("bench_prune.py", ["--smoke", "--methods", "l1", "bogus", "--out", "{tmp}/q"],
     "error: --methods: unknown method(s) ['bogus']"),
    ("bench_prune.py", ["--smoke", "--round-to", "0", "--out", "{tmp}/q"], "error: --round-to must be ≥ 1, got 0"),
    ("bench_prune.py", ["--smoke", "--max-budget", "0", "--out", "{tmp}/q"],
     "error: --max-budget must be a positive number, got 0.0"),
    ("bench_prune.py", ["--smoke", "--search-steps", "-1", "--out", "{tmp}/q"], "error: --search-steps must be ≥ 0, got -1"),
    # refused before --out is created (they left an empty folder)
    ("bench_balancers.py", ["--methods", "bogus", "--out", "{tmp}/q"], "error: "),
    ("bench_balancers.py", ["--baselines", "{tmp}/nope.json", "--out", "{tmp}/q"],
     "error: --baselines {tmp}/nope.json: file not found"),
    ("bench_prune.py", ["--merge", "{tmp}/nope/x.json", "--out", "{tmp}/q"], "error: --merge: no such file(s)"),
    # scripts that printed a traceback, or a line without the error: prefix
    ("show_scenes.py", ["--n", "0", "--out", "{tmp}/q/s.png"], "error: --n must be ≥ 1, got 0"),
    ("show_scenes.py", ["--size", "0", "--out", "{tmp}/q/s.png"], "error: --size must be ≥ 1, got 0"),
    ("bench_merge_chunked.py", ["--workdir", "{tmp}/w", "--out", "{tmp}/q", "--method", "bogus"],
     "error: unknown merge method 'bogus'"),
    ("bench_merge_memory.py", ["--workdir", "/proc/nope"], "error: "),
    ("bench_architectures.py", ["--families", "bogus", "--out", "{tmp}/q"], "error: --families: unknown family ['bogus']"),
    # checked before --out and the quality phase (TopKRouter refused it only in the dispatch timing after them)
    ("bench_architectures.py", ["--skip-quality", "--dispatch-experts", "4", "--dispatch-top-k", "8", "--out", "{tmp}/q"],
     "error: --dispatch-top-k 8 exceeds --dispatch-experts 4"),
    ("moe_routing_mi.py", ["--model", "{tmp}/none", "--max-batches", "0"], "error: --max-batches must be ≥ 1, got 0"),
    # --threads 0: bench_merge ran on every core while its report said 0 threads, others ran on torch's
    # choice, raised torch's RuntimeError (a traceback) or failed every run after generating the inputs
    ("bench_merge.py", ["--small", "--threads", "0", "--workdir", "{tmp}/none"], "error: --threads must be ≥ 1, got 0"),
    ("bench_merge.py", ["--small", "--repeat", "0", "--workdir", "{tmp}/none"], "error: --repeat must be ≥ 1, got 0"),
    ("bench_merge.py", ["--llm", "--threads", "0", "--workdir", "{tmp}/none", "--sizes", "0.25"],
     "error: --threads must be ≥ 1, got 0"),
    # an --only word matching no run label is refused before the inputs (GBs) are generated
    ("bench_merge.py", ["--llm", "--only", "typo", "--workdir", "{tmp}/q", "--sizes", "0.25"],
     "error: --only 'typo' matches no run label; valid: 'memory copy of the inputs (mmap)'"),
    # --small has no ViT part: --only vit printed an empty line and exited 0
    ("bench_merge_learned.py", ["--small", "--only", "vit"], "error: --small has no ViT part"),
    ("bench_merge_learned.py", ["--threads", "0", "--only", "step"], "error: --threads must be ≥ 1, got 0"),
    ("bench_merge_quality.py", ["--manifest", "{tmp}/nope.json", "--threads", "0"], "error: --threads must be ≥ 1, got 0"),
    ("build_zoo.py", ["--zoo", "cnn", "--smoke", "--threads", "0", "--out", "{tmp}/q"], "error: --threads must be ≥ 1, got 0"),
    ("disentanglement.py", ["--manifest", "{tmp}/nope.json", "--threads", "0"], "error: --threads must be ≥ 1, got 0"),
    ("bench_prune_latency.py", ["--base", "{tmp}/none", "{tmp}/pruned", "--threads", "0"],
     "error: --threads must be ≥ 1, got 0"),
    ("bench_slimmable.py", ["--part", "speed", "--threads", "0", "--out", "{tmp}/q/s.json"],
     "error: --threads must be ≥ 1, got 0"),
    ("bench_data.py", ["--threads", "0"], "error: --threads must be ≥ 1, got 0"),
    ("profile_step.py", ["--threads", "0", "--rounds", "1", "--steps", "1"], "error: --threads must be ≥ 1, got 0"),
    # refused before the reference QPs are solved (it failed after them: "no median for empty data")
    ("bench_solvers.py", ["--repeats", "0"], "error: --repeats must be ≥ 1, got 0"),
    # every count flag is checked up front; a negative --warmup trained, then raised a TypeError
    ("bench_train.py", ["--warmup", "-1"], "error: --warmup must be ≥ 0, got -1"),
    ("bench_data.py", ["--num-workers", "-1"], "error: --num-workers must be ≥ 0, got -1"),
    ("bench_merge_chunked.py", ["--workdir", "{tmp}/w", "--out", "{tmp}/q", "--chunks", "-1"],
     "error: --chunks must be ≥ 0, got -1"),
    ("bench_merge_memory.py", ["--workdir", "{tmp}/w", "--layout", "llama", "--layers", "0"],
     "error: --layers must be ≥ 1, got 0"),
    ("bench_merge_quality.py", ["--manifest", "{tmp}/nope.json", "--learn-steps", "0"],
     "error: --learn-steps must be ≥ 1, got 0"),
    ("multirun_memory.py", ["--jobs", "0"], "error: --jobs must be ≥ 1, got 0"),
    ("show_scenes.py", ["--start", "-1", "--out", "{tmp}/q/s.png"], "error: --start must be ≥ 0, got -1"),
    ("show_zoo.py", ["--cols", "0", "--out", "{tmp}/q/z.png"], "error: --cols must be ≥ 1, got 0"),
    ("show_zoo.py", ["--size", "0", "--out", "{tmp}/q/z.png"], "error: --size must be ≥ 1, got 0"),
    # one error: line and exit 1, not argparse's usage block and exit 2
    ("bench_data.py", ["--n", "8", "--batch-size", "8", "--steps", "3"], "error: --steps 3 needs 4 training batches"),
    # an unwritable --out is refused before the sequential multirun (it ran first, then a multi-line message)
    ("bench_launchers.py", ["--smoke", "--out", "/proc/mtlkit_nope"], "error: --out /proc/mtlkit_nope: cannot create"),
])
def test_a_scripts_user_error_is_one_line(tmp_path, script, args, expected):
    assert_one_error_line(tmp_path, script, args, expected)
    assert not (tmp_path / "q").exists()  # bench_merge_quality wrote empty results before
    assert not (tmp_path / "disentanglement").exists()  # the script made its folder before checking its input



@pytest.mark.parametrize("file, text, expected", [
    ("r_s0/width_table_test.json", '{"tasks": ["depth"]}', "error: {tmp}/r_s0/width_table_test.json: missing key 'width_set'"),
    ("x.json", "{}", "error: {tmp}/x.json: missing key 'r_s0' "),
    ("x.json", '{"control": {"r_s0": {}}}', "error: {tmp}/x.json: missing key 'r_s0.uniform_test' "),
    ("x.json", "[]", "error: {tmp}/x.json: expected a --part control --out JSON object, got list"),
])
def test_bench_slimmable_compare_names_the_file_of_json_that_is_no_width_table_or_scores(tmp_path, file, text, expected):
    """Valid JSON of another shape was indexed unchecked: 'error: KeyError 'primary'', without the file."""
    (tmp_path / "r_s0").mkdir()
    (tmp_path / file).write_text(text)
    scores = ["--scores", "{tmp}/x.json"] if file == "x.json" else []
    assert_one_error_line(tmp_path, "bench_slimmable.py", ["--part", "compare", "--runs", "{tmp}/r_s0", *scores], expected)

@pytest.mark.parametrize("script", ["bench_balancers", "bench_architectures"])
def test_baselines_of_another_recipe_are_refused_not_reused(tmp_path, monkeypatch, script):
    """OUT/baselines.json of an --epochs 1 invocation was reused by an --epochs 2 one: Δm against
    baselines of another recipe. Its single-task runs' recorded recipe is checked now."""
    import importlib
    import json

    import mtl.train
    from mtl.evaluation import save_baselines

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = importlib.import_module(script)
    from bench_runs import RecipeMismatch

    trained = []

    def fake_run(overrides, run_dir):  # a finished single-task run, as mtl.train.run leaves it
        task = next(o.split("=", 1)[1] for o in overrides if o.startswith("task="))
        trained.append(task)
        run_dir.mkdir(parents=True)
        test = {task: {"score": 0.5}}
        (run_dir / "metrics.json").write_text(json.dumps({"test": test}))
        save_baselines(next(o.split("=", 1)[1] for o in overrides if o.startswith("baselines.save_to=")), test)

    monkeypatch.setattr(mtl.train, "run", fake_run)
    baselines = bench.baselines if script == "bench_balancers" else bench.single_task_baselines
    args = lambda epochs: bench.parse_args(["--out", str(tmp_path), "--epochs", str(epochs)])  # noqa: E731

    path = baselines(args(1), tmp_path)
    assert sorted(json.loads(path.read_text())) == sorted(bench.TASKS) and len(trained) == len(bench.TASKS)
    assert baselines(args(1), tmp_path) == path and len(trained) == len(bench.TASKS)  # same recipe: reused
    with pytest.raises(RecipeMismatch, match=r"stl_semseg.*trainer\.max_epochs=1.*trainer\.max_epochs=2"):
        baselines(args(2), tmp_path)
    assert len(trained) == len(bench.TASKS)  # refused before training anything


def test_bench_merge_chunked_refuses_an_out_folder_of_other_files(tmp_path, monkeypatch):
    """The benchmark deletes --out between its runs: a folder holding something else is refused first
    (it raised FileExistsError with a traceback, after generating the input models)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_merge_chunked

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"^--out .*out holds files that are not an earlier merge's"):
        bench_merge_chunked.main(["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "notes.txt").exists() and not (tmp_path / "w").exists()


def test_the_llm_merge_benchmark_prints_its_times_as_ratios_to_the_same_runs_baselines(monkeypatch):
    """It printed absolute times only; BENCHMARKS.md worked the ratios out by hand."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench_merge_llm import ratios

    runs = {"memory copy of the inputs (pread)": [{"seconds": 2.0}, {"seconds": 1.0}, {"seconds": 9.0}],
            "ours task arithmetic": [{"seconds": 3.0}], "mergekit task arithmetic": [{"seconds": 12.0}],
            "mergekit TIES": [{"error": "ModuleNotFoundError"}]}
    assert ratios(runs) == ["ours task arithmetic".ljust(34) + " 1.50x the pread copy's time",
                            "mergekit task arithmetic".ljust(34) + " 6.00x the pread copy's time",
                            "ours task arithmetic".ljust(34) + " 4.00x faster than 'mergekit task arithmetic'"]
    # an even count's median is the mean of the two middle times (it took the upper one: 3.0 here)
    even = {"memory copy of the inputs (pread)": [{"seconds": 1.0}, {"seconds": 3.0}], "ours": [{"seconds": 4.0}]}
    assert ratios(even, pairs=()) == ["ours".ljust(34) + " 2.00x the pread copy's time"]


@pytest.mark.parametrize("argv, targets", [
    (["--smoke"], [0.4]),
    (["--smoke", "--backbone", "resnet10t", "--size", "40", "--n-train", "100", "--targets", "0.3", "0.5"], [0.3, 0.5]),
    (["--size", "40"], [0.4, 0.6]),
])
def test_bench_prune_records_the_model_and_data_its_runs_train(tmp_path, monkeypatch, argv, targets):
    """Under --smoke bench_prune.json recorded backbone resnet10t, size 32, n_train 256 (which --reuse-base
    compares) while debug=smoke trained test_resnet on 64 scenes, and --backbone/--size/--n-train and all
    targets but the first were dropped unsaid. The recorded options are now those of the composed config."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_prune
    from mtl.cli.in_process import compose_in_process

    args = bench_prune.parse_args(["--out", str(tmp_path), *argv])
    cfg, _ = compose_in_process("mtl.configs", "train", bench_prune.training_overrides(args), run_dir=tmp_path / "run")
    assert (args.backbone, args.size, args.n_train) == (cfg.backbone.name, cfg.data.size, cfg.data.n_train)
    assert args.targets == targets


@pytest.mark.parametrize("run, expected", [
    ("bogus {}", "error: --runs 'bogus {}': unknown merge method 'bogus'"),
    ("dare {p: 0.5}", "error: --runs 'dare {p: 0.5}': the hyperparameters are not JSON"),
    ('dare {"p": 1.5}', "error: --runs 'dare {\"p\": 1.5}': p (drop probability) must be in [0, 1)"),
    ('dare {"p": 0.5, "chunk": 1000}', "error: dare {\"p\": 0.5, \"chunk\": 1000}: chunk applies to the chunked kernels"),
])
def test_bench_merge_memory_refuses_a_bad_run_in_one_error_line(tmp_path, run, expected):
    """A bad --runs entry printed the table header, generated the inputs, then 'error: bogus {}: error: unknown
    merge method' (the worker's own prefix repeated). Names and JSON are checked first; a failure the merge
    itself finds (the last case) keeps one prefix."""
    env = {k: v for k, v in os.environ.items() if k not in ("MTL_VERBOSE", "HYDRA_FULL_ERROR")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_merge_memory.py"), "--workdir",
                           str(tmp_path / "w"), "--rows", "64", "--runs", run], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().startswith(expected), proc.stderr[-2000:]
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if "chunk" not in run:  # refused before any input is written or a table line printed
        assert proc.stdout == "" and not (tmp_path / "w").exists()


def test_bench_prune_latency_writes_one_json_shape_with_or_without_breakdown(tmp_path, monkeypatch):
    """--out was the list of rows, or {"speedup": rows, "breakdown": ...} with --breakdown: a reader broke
    as soon as --breakdown was added. It is now always the dict."""
    import json

    import torch

    from mtl.io import save_model
    from mtl.models import create_model

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_prune_latency

    torch.manual_seed(0)
    for name in ("base", "other"):
        save_model(create_model(["semseg"], backbone="test_resnet", decoder={"name": "hps", "channels": 4}),
                   tmp_path / name)
    common = ["--base", str(tmp_path / "base"), str(tmp_path / "other"), "--sizes", "16", "--batch", "1",
              "--rounds", "1", "--repeats", "1"]
    bench_prune_latency.main([*common, "--out", str(tmp_path / "a.json")])
    bench_prune_latency.main([*common, "--breakdown", "16", "--top", "2", "--out", str(tmp_path / "b.json")])
    plain, detailed = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert sorted(plain) == sorted(detailed) == ["breakdown", "speedup"]
    assert plain["breakdown"] is None and detailed["breakdown"]
    assert [r["model"] for r in plain["speedup"]] == [r["model"] for r in detailed["speedup"]] == ["other"]


def test_bench_merge_memory_reuses_kept_inputs_of_the_same_parameters(tmp_path, monkeypatch):
    """--keep said the inputs were reused by the next run, but every run wrote them again. They are now
    reused when the parameters recorded beside them match, and written again when the record is missing
    (an interrupted or older generation)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_merge_memory

    written = []
    save = bench_merge_memory.save
    monkeypatch.setattr(bench_merge_memory, "save", lambda sd, folder, name, shards: written.append(name) or
                        save(sd, folder, name, shards))
    folder = tmp_path / "in"
    assert bench_merge_memory.make(folder, 2, 8, "float32") is False and written == ["base", "ft0", "ft1"]
    before = {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}
    assert bench_merge_memory.make(folder, 2, 8, "float32") is True and len(written) == 3  # nothing rewritten
    assert bench_merge_memory.make(folder, 1, 8, "float32") is False and len(written) == 5  # other parameters
    (folder / bench_merge_memory.INPUTS).unlink()
    assert bench_merge_memory.make(folder, 2, 8, "float32") is False and len(written) == 8
    assert {p.name: p.read_bytes() for p in folder.glob("*.safetensors")} == before  # seeded: the same inputs


def test_profile_step_times_the_comparisons_the_demo_estimate_uses(monkeypatch, capsys):
    """BENCHMARKS.md's demo estimate takes four factors (another input size, another batch size, single-task vs
    six-task step, evaluation forward vs training step) that profile_step.py could not time; they are variants
    of it now, reported per sample against the baseline of the same process."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import profile_step

    assert profile_step.variant("size_64", 48, 32) == ({}, 64, 32)
    assert profile_step.variant("batch_16", 48, 32) == ({}, 48, 16)
    assert profile_step.variant("single_depth", 48, 32) == ({"tasks": ["depth"]}, 48, 32)
    for bad in ("size_x", "batch_0", "single_bogus"):
        with pytest.raises(ValueError, match=rf"^--variants: unknown '{bad}'"):
            profile_step.variant(bad, 48, 32)


@pytest.mark.slow  # six tiny models stepped once each: ~10 s on 2 cores
def test_profile_step_reports_each_variant_at_its_own_input(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import profile_step

    profile_step.main(["--size", "16", "--batch-size", "4", "--rounds", "1", "--steps", "1", "--threads", "1",
                       "--variants", "baseline,size_24,batch_2,eval_forward,single_semseg,single_depth"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and " px " in line}
    assert rows == {"baseline": "4 x 16 px", "size_24": "4 x 24 px", "batch_2": "2 x 16 px",
                    "eval_forward": "4 x 16 px", "single_semseg": "4 x 16 px", "single_depth": "4 x 16 px"}


@pytest.mark.parametrize("how", ["failed", "killed"])
def test_a_failed_or_killed_run_is_not_reused_on_resume(tmp_path, monkeypatch, how):
    """mtl.train writes model/ and metrics.json before later steps that can fail (FAILED) or be killed (its
    .running claim left by a dead process): build_zoo and the benchmarks reused such a run as finished."""
    import json
    import subprocess
    import sys

    from mtl.cli.failures import FAILED, RUNNING

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import build_zoo
    from bench_runs import RECIPE, record, reusable

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    if how == "killed":
        dead = subprocess.Popen([sys.executable, "-c", ""])
        dead.wait()
        (run / RUNNING).write_text(json.dumps({"pid": dead.pid}))  # claimed before the records were written
    (run / "model" / "model.safetensors").write_bytes(b"x")
    (run / "metrics.json").write_text("{}")
    if how == "failed":
        (run / FAILED).write_text("boom")
    assert not build_zoo._finished(run)
    assert not reusable(run, ["a=1"]) and not reusable(run, ["a=1"], build_zoo._finished)
    (run / FAILED).unlink(missing_ok=True)
    (run / RUNNING).unlink(missing_ok=True)
    assert build_zoo._finished(run) and reusable(run, ["a=1"])  # the same folder, finished: reused
    record(run, ["a=1"])
    assert json.loads((run / RECIPE).read_text()) == ["a=1"] and reusable(run, ["a=1"])


@pytest.mark.parametrize("via_bench_merge", [False, True])
def test_the_llm_merge_benchmark_refuses_an_only_word_matching_no_run_before_generating(tmp_path, monkeypatch,
                                                                                        via_bench_merge):
    """--only with a typo generated the inputs (GBs), ran nothing and exited 0; it is refused first now,
    directly and through bench_merge.py --llm. A word that matches a label still runs that label."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_merge
    import bench_merge_llm

    calls = []

    def generate(folder, size, models):
        calls.append("generate")
        Path(folder).mkdir(parents=True, exist_ok=True)
        return [Path(folder)] * (models + 1)

    monkeypatch.setattr(bench_merge_llm, "generate", generate)
    monkeypatch.setattr(bench_merge_llm, "evict", lambda *a: None)
    monkeypatch.setattr(bench_merge_llm, "warm", lambda *a: None)
    monkeypatch.setattr(bench_merge_llm, "run_one", lambda spec, mp: calls.append("run") or {"seconds": 1.0})
    main = (lambda argv: bench_merge.main(["--llm", *argv])) if via_bench_merge else bench_merge_llm.main
    work = tmp_path / "w"
    with pytest.raises(ValueError, match=r"^--only 'ours TIES \(papr' matches no run label; valid: .*'ours TIES \(paper"):
        main(["--sizes", "0.25", "--only", "pread", "ours TIES (papr", "--workdir", str(work)])
    assert calls == [] and not work.exists()
    runs = main(["--sizes", "0.25", "--only", "pread", "--workdir", str(work)])["sizes"]["0.25"]["runs"]
    assert calls == ["generate", "run"] and list(runs) == ["memory copy of the inputs (pread)"]


@pytest.mark.parametrize("argv, steps", [(["--small"], 3), (["--small", "--steps", "7"], 7), ([], 5), (["--steps", "2"], 2)])
def test_bench_merge_learned_runs_the_steps_asked_for(tmp_path, monkeypatch, capsys, argv, steps):
    """--small overrode an explicit --steps N with 3, without a word; each run now takes the --steps given
    (3 with --small, 5 without, when none is), and the printed table says so."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_merge_learned

    def cnn_pool(folder, T, size):
        folders = [folder / f"m{i}" for i in range(T + 1)]
        for f in folders:
            f.mkdir()
            (f / "model.safetensors").write_bytes(b"0" * 1024)
        return folders[0], folders[1:]

    asked = []

    def spawn(*args):
        n = int(args[args.index("--steps") + 1])
        asked.append(n)
        return {"seconds": float(n), "stamps": [float(i) for i in range(n)], "peak_rss_mb": 1.0, "coef": [0.3]}

    monkeypatch.setattr(bench_merge_learned, "cnn_pool", cnn_pool)
    monkeypatch.setattr(bench_merge_learned, "spawn", spawn)
    assert bench_merge_learned.main(["--only", "step", *argv]) == 0
    assert asked == [steps, steps] and f", {steps} steps, " in capsys.readouterr().out


def test_multirun_memory_closes_with_a_table_of_its_jobs_and_no_torch_deprecation_warning(tmp_path, monkeypatch, capsys):
    """It printed per-job lines only, no closing table, and each job's scan of the live objects added
    torch's 'torch.distributed.reduce_op is deprecated' FutureWarning (isinstance on the shim)."""
    import re
    import tempfile
    import warnings

    import mtl.train

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import multirun_memory

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the script's scratch folder
    monkeypatch.setattr(mtl.train, "run", lambda overrides, run_dir: None)  # a job, stubbed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        multirun_memory.main(["--jobs", "2", "--smoke"])
    assert not [w for w in caught if "reduce_op" in str(w.message)], [str(w.message) for w in caught]
    out = capsys.readouterr().out
    jobs = re.findall(r"^job (\d): +([\d.]+)s  rss (\d+) MB  live Trainer (\d+), MultiTaskModule (\d+), "
                      r"MultiTaskModel (\d+), TensorDataModule (\d+)$", out, re.M)
    table = out[out.index("| job | seconds | RSS MB | Trainer | MultiTaskModule | MultiTaskModel | TensorDataModule |"):]
    rows = [tuple(c.strip() for c in line.strip("|").split("|")) for line in table.splitlines()[2:]]
    assert len(jobs) == 2 and rows == [(j, f"{float(s):.1f}", *rest) for j, s, *rest in jobs]


def test_bench_merge_quality_caps_only_the_learned_methods_steps(tmp_path, monkeypatch):
    """--learn-steps was passed as learn_max_steps to every method, which mtl-merge refuses for one that learns
    nothing (merge=ties): it goes to the learned methods only."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = importlib.import_module("bench_merge_quality")
    given = {}

    def fake_run_method(method, manifest, out, overrides):
        given[method] = list(overrides)
        raise RuntimeError("not run")

    monkeypatch.setattr(bench, "run_method", fake_run_method)
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    bench.main(["--manifest", str(manifest), "--out", str(tmp_path / "q"), "--methods", "ties", "atlas",
                "--learn-steps", "5", "--learned-overrides", "merge.eval_every=2"])
    assert given["ties"] == ["+eval.data.batch_size=256"]
    assert given["atlas"] == ["+eval.data.batch_size=256", "merge.eval_every=2", "learn_max_steps=5"]
