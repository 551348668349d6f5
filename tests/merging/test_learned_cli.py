"""mtl-merge with learned merges on a tiny real pool: outputs, frozen regression column, labels never read."""
import json

import pytest
import torch
from safetensors.torch import load_file

import merging
import mtl
from merging.job import run
from merging.learned import cli as learned_cli


@pytest.fixture(scope="module")
def pool(smoke_pool):
    return smoke_pool


def _args(pool, *extra):
    models = ",".join(str(p) for p in pool.member_paths)
    return [f"pretrained={pool.pretrained}", f"models=[{models}]", "eval.max_batches=2", "learn_max_steps=3", *extra]


def test_adamerging_layer_cli_writes_coefficients_plots_and_model(pool, tmp_path):
    rd = tmp_path / "run"
    report = run(_args(pool, "merge=adamerging", "merge.granularity=layer", "merge.eval_every=1", "merge.batch_size=4"),
                 run_dir=rd)
    assert report["method"] == "adamerging"
    coef = load_file(str(rd / "coefficients" / "coefficients.safetensors"))["coefficients"]
    summary = json.loads((rd / "coefficients" / "coefficients.json").read_text())
    assert coef.shape == (len(summary["rows"]), 2) and summary["tasks"] == ["regression", "semseg"]
    # the regression head has no entropy: it is left out and its model's λ stay at the initial 0.3
    assert summary["excluded_from_objective"] == ["regression"]
    assert torch.all(coef[:, 0] == 0.3) and not torch.all(coef[:, 1] == 0.3)
    assert [h["step"] for h in summary["history"]] == [1, 2, 3]
    assert all("val_normalized" in h for h in summary["history"])
    for png in ("coefficients.png", "learning_curves.png", "task_accuracy.png"):
        assert (rd / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = mtl.load_model(rd / "model")
    assert model.meta["merge"]["method"] == "adamerging" and model.meta["merge"]["split"] == "test"
    # the written model holds the learned weights: θ0 + Σ_t λ[k, t] τ_t for a merged tensor
    pre, fts = mtl.load_model(pool.pretrained).state_dict(), [mtl.load_model(p).state_dict() for p in pool.member_paths]
    k = summary["rows"][0]
    r = summary["rows"].index(k)
    expect = pre[k] + sum(coef[r, t] * (fts[t][k] - pre[k]) for t in range(2))
    torch.testing.assert_close(model.state_dict()[k], expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,extra", [
    ("adamerging", ["merge.granularity=task"]), ("adamerging", ["merge.granularity=layer"]),
    ("atlas", ["merge.objective=entropy"]), ("concrete_ta", []), ("concrete_adamerging", []),
])
def test_learning_never_reads_labels(pool, tmp_path, guard_labels, method, extra):
    """From opening the split's data to the written coefficients, the values of every dataset column but
    'image' raise. merge.eval_every stays 0: its per-step validation score reads val labels by design."""
    learning = guard_labels("learning", (learned_cli, "select_learned"))
    report = run(_args(pool, f"merge={method}", "merge.eval_every=0", "merge.batch_size=4", *extra),
                 run_dir=tmp_path / "guarded")
    assert report["method"] == method and learning["calls"] == 1
    assert learning["image_reads"] >= len(report["tasks"])  # each task's images were taken inside the guard


def test_label_guard_bites_on_the_learning_path(pool, tmp_path, guard_labels):
    """The same guard fires once merge.eval_every reads validation labels inside the learning phase."""
    guard_labels("learning", (learned_cli, "select_learned"))
    with pytest.raises(AssertionError, match="label column .* read while learning"):
        run(_args(pool, "merge=adamerging", "merge.granularity=task", "merge.eval_every=1"), run_dir=tmp_path / "v")


def test_bad_split_is_named(pool, tmp_path):
    with pytest.raises(ValueError, match="merge.split must be 'val' or 'test'.*'train'"):
        run(_args(pool, "merge=adamerging", "merge.split=train"), run_dir=tmp_path / "bad")
    for method, key, value, low in (("adamerging", "batch_size", 0, 1), ("adamerging", "eval_every", -1, 0),
                                    ("atlas", "shots", 0, 1)):
        with pytest.raises(ValueError, match=rf"merge.{key} must be an int ≥ {low}, got {value}"):
            run(_args(pool, f"merge={method}", f"merge.{key}={value}"), run_dir=tmp_path / key)


@pytest.mark.parametrize("extra,match", [
    (["merge=adamerging", "merge.split=train"], "merge.split must be 'val' or 'test'"),
    (["merge=adamerging", "merge.granularity=foo"], "merge=adamerging: unknown granularity 'foo'"),
    (["merge=adamerging", "+merge.foo=1"], r"merge=adamerging: unknown key\(s\) foo; valid: steps, .*, split, "
                                           "batch_size, eval_every and the key options include"),
    (["merge=concrete_ta", "+merge.lamm=0.5"], r"merge=concrete_ta: unknown key\(s\) lamm \(did you mean lam\?\); valid:"),
    (["merge=adamerging", "+merge.shots_batch=3"], r"merge=adamerging: unknown key\(s\) shots_batch; valid:"),
    (["merge=adamerging", "merge.k=50"], "merge=adamerging: merge.k=50 is read only with merge.vectors=ties \\(here merge.vectors=plain\\); remove it or set merge.vectors=ties"),
    (["merge=atlas", "merge.shots=4"], "merge=atlas: merge.shots=4 is not read with merge.objective=entropy"),
    (["merge=atlas", "merge.shots_batch=8"], "merge.shots_batch=8 is not read with merge.objective=entropy"),
    (["merge=atlas", "merge.objective=supervised", "merge.split=val"],
     "merge=atlas: merge.split='val' is not read with merge.objective=supervised"),
    (["merge=atlas", "merge.objective=supervised", "merge.batch_size=8"],
     "merge.batch_size=8 is not read with merge.objective=supervised"),
    (["merge=concrete_ta", "merge.threshold=0.7"], "merge=concrete_ta: merge.threshold=0.7 is read only with merge.final_mask=hard"),
    (["merge=concrete_adamerging", "merge.inner=continue", "merge.inner_lr=0.5"],
     "merge.inner_lr=0.5 is read only with merge.inner=reset and merge.inner_steps > 0 and merge.steps > 0 "
     "\\(here merge.inner=continue, merge.inner_steps=1, merge.steps=300\\)"),
    (["merge=concrete_adamerging", "merge.final_steps=0", "merge.coef_lr=0.05"],
     "merge.coef_lr=0.05 is read only with merge.final_steps > 0, or merge.inner=continue and merge.inner_steps > 0 "
     "and merge.steps > 0 \\(here merge.final_steps=0, merge.inner=reset, merge.inner_steps=1, merge.steps=300\\)"),
    (["merge=concrete_adamerging", "merge.steps=0", "merge.inner_steps=2"],
     r"merge.inner_steps=2 is read only with merge.steps > 0 \(here merge.steps=0\)"),
    (["merge=atlas", "merge.steps=0", "merge.lr=0.01"],
     r"merge=atlas: merge.lr=0.01 is read only with merge.steps > 0 \(here merge.steps=0\)"),
    (["merge=adamerging", "merge.lr=-1"], "merge=adamerging: lr must be a positive, finite number, got -1"),
    (["merge=atlas", "merge.learn_blocks=['(bad']"], "learn_blocks: '\\(bad' is not a regular expression"),
    (["merge=atlas", "merge.learn_blocks=[]"], r"^merge=atlas: learn_blocks=\[\] selects no block; use null"),
    (["merge=atlas", "merge.objective=supervised", "merge.shots_batch=0"], "merge.shots_batch must be a positive int"),
    (["merge=concrete_ta", "merge.final_mask=hard", "merge.threshold=2"], r"threshold must be in \[0, 1\), got 2"),
    (["merge=adamerging", "learn_max_steps=-1"], r"learn_max_steps must be an int >= 0 or null \(no cap\), got -1"),
])
def test_bad_learned_settings_are_refused_before_the_pool_is_loaded(pool, tmp_path, monkeypatch, extra, match):
    import merging.job as job

    def no_load(*a, **k):
        raise AssertionError("the pool was loaded before the settings were checked")

    monkeypatch.setattr(job, "resolve_pool", no_load)
    with pytest.raises((ValueError, TypeError), match=match):
        run(_args(pool, *extra), run_dir=tmp_path / "bad")


def test_a_step_cap_that_leaves_a_setting_unread_drops_it(pool, tmp_path, caplog):
    """learn_max_steps=0 caps steps and final_steps to 0, which leaves coef_lr, inner_lr and inner_steps unread:
    dropped, not refused or recorded; a warning for the one set to another value than its default."""
    rd = tmp_path / "capped"
    with caplog.at_level("WARNING", logger="merging"):
        run(_args(pool, "merge=concrete_adamerging", "learn_max_steps=0", "merge.inner_lr=0.5"), run_dir=rd)
    hp = json.loads((rd / "coefficients" / "coefficients.json").read_text())["hparams"]
    assert hp["final_steps"] == 0 and hp["steps"] == 0
    assert "coef_lr" not in hp and "inner_lr" not in hp and "inner_steps" not in hp
    warned = [r.getMessage() for r in caplog.records if "leaves merge." in r.getMessage()]
    assert warned == ["learn_max_steps=0 leaves merge.inner_lr unread: it is not used or recorded"]


def test_runs_record_the_data_their_objective_used(pool, tmp_path):
    entropy = run(_args(pool, "merge=adamerging", "merge.granularity=task", "merge.batch_size=4"),
                  run_dir=tmp_path / "entropy")["selected"]
    assert entropy["split"] == "test" and entropy["batch_size"] == 4 and "shots" not in entropy
    runs = {}
    for shots_batch in (None, 2):
        rd = tmp_path / f"sup_{shots_batch}"
        sel = run(_args(pool, "merge=atlas", "merge.objective=supervised", "merge.shots=4",
                        f"merge.shots_batch={'null' if shots_batch is None else shots_batch}"), run_dir=rd)["selected"]
        hp = json.loads((rd / "coefficients" / "coefficients.json").read_text())["hparams"]
        meta = mtl.load_model(rd / "model").meta["merge"]
        for record in (sel, hp, meta):  # labelled train shots, not the test images: the record says so
            assert record["shots"] == 4 and record["shots_batch"] == shots_batch and record["shots_split"] == "train"
            assert "split" not in record and "batch_size" not in record
        runs[shots_batch] = sel
    assert runs[None] != runs[2]


def test_rerun_without_steps_leaves_no_stale_learning_curves(pool, tmp_path):
    rd = tmp_path / "rerun"
    run(_args(pool, "merge=adamerging", "merge.granularity=task"), run_dir=rd)
    assert (rd / "learning_curves.png").exists()
    run(_args(pool, "merge=adamerging", "merge.granularity=task", "merge.steps=0", "overwrite=true"), run_dir=rd)
    assert json.loads((rd / "coefficients" / "coefficients.json").read_text())["history"] == []
    assert not (rd / "learning_curves.png").exists()  # the first run's curves are not this run's


def test_list_hyperparameters_are_recorded(pool, tmp_path):
    report = run(_args(pool, "merge=atlas", "merge.learn_blocks=[backbone]"), run_dir=tmp_path / "atlas")
    assert report["selected"]["learn_blocks"] == ["backbone"]
    assert mtl.load_model(tmp_path / "atlas" / "model").meta["merge"]["learn_blocks"] == ["backbone"]


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("atlas", ["merge.blocks=module"]), ("concrete_ta", []),
                                          ("concrete_adamerging", ["merge.split=val"])])
def test_other_learned_methods_run(pool, tmp_path, method, extra):
    rd = tmp_path / method
    report = run(_args(pool, f"merge={method}", *extra), run_dir=rd)
    assert report["method"] == method
    summary = json.loads((rd / "coefficients" / "coefficients.json").read_text())
    if method.startswith("concrete"):
        masks = {k: v for k, v in load_file(str(rd / "coefficients" / "coefficients.safetensors")).items() if k.startswith("mask/")}
        # the default final mask: one Concrete draw divided by its mean per tensor (float, mean 1)
        assert masks and all(v.dtype == torch.float32 and abs(float(v.double().mean()) - 1) < 1e-4 for v in masks.values())
        assert summary["mask"]["kept_fraction"] == 1.0  # a Concrete draw (final_mask=sample) zeroes no entry
        assert 0.0 < summary["mask"]["mean_probability"] < 1.0
    assert (rd / "coefficients.png").exists() and (rd / "learning_curves.png").exists()


def test_pool_limit_and_memory_format_from_the_cli(pool, tmp_path):
    rd = tmp_path / "single"
    run(_args(pool, "merge=adamerging", "merge.granularity=task", "merge.pool_limit=0", "merge.channels_last=false"),
        run_dir=rd)
    summary = json.loads((rd / "coefficients" / "coefficients.json").read_text())
    assert summary["hparams"]["pool_limit"] == 0
    assert summary["hparams"]["channels_last"] is False  # default null resolves to true for the pool's models
    with pytest.raises(ValueError, match="pool_limit"):
        run(_args(pool, "merge=adamerging", "merge.pool_limit=-1"), run_dir=tmp_path / "bad_limit")


class _Split:
    def __init__(self, n_per_class=5, classes=3):
        y = torch.arange(classes).repeat_interleave(n_per_class)
        self.tensors = {"image": torch.arange(len(y)).float().view(-1, 1), "label": y}


def test_labeled_shots_full_batch_or_minibatches_without_replacement():
    from merging.learned.cli import LabeledShots

    full = LabeledShots(_Split(), "label", shots=3, seed=0)
    (x, y), = list(full)  # one batch of all 3 × 3 shots
    assert len(y) == 9 and torch.equal(torch.bincount(y), torch.tensor([3, 3, 3]))
    assert torch.equal(y, (x[:, 0] // 5).long())  # images stay paired with their labels
    mini = LabeledShots(_Split(), "label", shots=3, seed=0, batch_size=4)
    passes = [list(mini), list(mini)]
    for batches in passes:
        assert [len(b[1]) for b in batches] == [4, 4, 1]
        xs = torch.cat([b[0] for b in batches])[:, 0]
        assert sorted(xs.tolist()) == sorted(x[:, 0].tolist())  # each shot exactly once per pass
        assert all(torch.equal(b[1], (b[0][:, 0] // 5).long()) for b in batches)
    assert not torch.equal(torch.cat([b[0] for b in passes[0]]), torch.cat([b[0] for b in passes[1]]))  # reshuffled
    for bad in (0, -2, True, 2.5):
        with pytest.raises(ValueError, match="merge.shots_batch"):
            LabeledShots(_Split(), "label", shots=3, batch_size=bad)


def test_labeled_shots_of_dense_and_regression_targets_are_k_images():
    from merging.learned.cli import LabeledShots

    split = _Split()
    split.tensors["dense"] = torch.randint(0, 3, (15, 4, 4))
    split.tensors["value"] = torch.rand(15, 2)
    for key in ("dense", "value"):
        (x, y), = list(LabeledShots(split, key, shots=6, seed=1))
        assert len(x) == 6 and y.dtype == split.tensors[key].dtype
        assert torch.equal(y, split.tensors[key][x[:, 0].long()])


def test_labeled_shots_carry_the_dtype_of_the_splits_batches():
    """Label maps stored as uint8 (0/1 edges) reach the loss as the split's batches carry them: float32 for BCE."""
    from merging.learned.cli import LabeledShots
    from mtl.data import TensorDictDataset

    edges = torch.randint(0, 2, (6, 1, 4, 4), dtype=torch.uint8)
    split = TensorDictDataset({"image": torch.arange(6).float().view(-1, 1), "edges": edges},
                              cast={"edges": torch.float32})
    (x, y), = list(LabeledShots(split, "edges", shots=3, seed=0))
    assert y.dtype == torch.float32 and torch.equal(y, edges[x[:, 0].long()].float())


def test_supervised_atlas_from_the_cli_on_dense_and_regression_tasks(pool, tmp_path):
    rd = tmp_path / "sup"
    report = run(_args(pool, "merge=atlas", "merge.objective=supervised", "merge.shots=4", "merge.shots_batch=2"),
                 run_dir=rd)
    summary = json.loads((rd / "coefficients" / "coefficients.json").read_text())
    assert report["method"] == "atlas" and summary["excluded_from_objective"] == []
    coef = load_file(str(rd / "coefficients" / "coefficients.safetensors"))["coefficients"]
    assert not torch.all(coef[:, 0] == 0.3) and not torch.all(coef[:, 1] == 0.3)  # each task moved under its own loss


def test_folders_of_another_architecture_are_named_before_a_model_is_built(pool, tmp_path):
    from merging.sources import MergeInputError

    member = mtl.load_model(pool.member_paths[0])
    cfg = dict(member.config)
    other = mtl.create_model([t["name"] for t in cfg["tasks"]], backbone=cfg["backbone"],
                             decoder={**cfg["decoder"], "channels": int(cfg["decoder"].get("channels", 16)) * 2})
    mtl.save_model(other, tmp_path / "other")
    with pytest.raises(MergeInputError, match="shape|do not match|missing"):
        merging.learn("adamerging", pool.pretrained, [pool.member_paths[1], tmp_path / "other"],
                      unlabeled={"semseg": [torch.zeros(1, 3, 8, 8, dtype=torch.uint8)]}, steps=0)


@pytest.mark.parametrize("override, match", [
    ("merge.seed=abc", r"seed must be an int in \[-2\*\*63, 2\*\*64 - 1\], got 'abc'"),
    # torch's bare "Overflow when unpacking long long", once the pool was loaded and scored
    ("merge.seed=18446744073709551616", r"^merge=adamerging: seed must be an int in \[-2\*\*63, 2\*\*64 - 1\], "
                                        r"got 18446744073709551616$"),
    ("merge.channels_last=5", "channels_last must be true or false"),
    ("merge.pool_limit=-3", "pool_limit must be an int ≥ 0"),
    ("merge.init=2", r"init must be in \[0, 1\] with clamp=true, got 2"),  # the config's default clamp
    ("merge.granularity=block", "unknown granularity 'block'; valid: task, layer"),
])
def test_learned_settings_are_refused_before_the_pool_is_scored(pool, tmp_path, monkeypatch, override, match):
    from merging import job as job_module

    def scored(*a, **k):
        raise AssertionError("the pool was loaded before the settings were checked")

    monkeypatch.setattr(job_module, "resolve_pool", scored)
    with pytest.raises(ValueError, match=match):
        run(_args(pool, "merge=adamerging", override), run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad" / "model").exists()


@pytest.mark.parametrize("method", ["adamerging", "concrete_ta"])
def test_a_learned_merge_with_eval_none_is_refused_before_any_run_folder(pool, tmp_path, method):
    with pytest.raises(ValueError, match=f"merge={method} chooses its hyperparameters on task data and cannot run "
                                         "with eval=none"):
        args = [a for a in _args(pool, f"merge={method}", "eval=none") if not a.startswith("eval.")]
        run(args, run_dir=tmp_path / "none")
    assert not (tmp_path / "none").exists()  # no folder holding only FAILED


@pytest.mark.parametrize("override, match", [
    ("merge.learn_blocks=[zzz]", r"^merge=atlas: learn_blocks: 'zzz' matches no block \(there are \d+: backbone\."),
    ("merge.blocks={bb: backbone, nope: zzz}", r"^merge=atlas: blocks: tensor 'decoder\.[^']+' \(and \d+ more\) "
                                               r"matches no block pattern; block\(s\) 'nope' match no merged tensor$"),
])
def test_atlas_blocks_are_checked_against_the_pools_tensors_before_it_is_evaluated(pool, tmp_path, monkeypatch,
                                                                                   override, match):
    """The tensor names are in the files' headers: a pattern that matches none is refused before any model of the
    pool is evaluated on val."""
    from merging import job as job_module

    def evaluated(*a, **k):
        raise AssertionError("the pool was evaluated before merge.blocks / merge.learn_blocks were checked")

    monkeypatch.setattr(job_module, "Evaluator", evaluated)
    with pytest.raises(ValueError, match=match):
        run(_args(pool, "merge=atlas", override), run_dir=tmp_path / "bad")


@pytest.mark.parametrize("method", ["adamerging", "atlas", "concrete_ta", "concrete_adamerging", "dare"])
def test_the_runs_seed_reaches_the_methods_seed(method):
    from mtl.cli.in_process import compose_in_process

    cfg, _ = compose_in_process("mtl.configs.merge_app", "merge", [f"merge={method}", "seed=5"], run_dir="unused")
    assert cfg.merge.seed == 5
    cfg, _ = compose_in_process("mtl.configs.merge_app", "merge", [f"merge={method}", "seed=5", "merge.seed=2"],
                                run_dir="unused")
    assert cfg.merge.seed == 2


def test_the_data_seeds_derived_from_the_top_seed_wrap_around_as_torch_reads_seeds():
    """The shots' minibatch stream is seeded seed + 1, reduced modulo 2**64 as torch reads a negative seed: the
    largest seed (2**64 - 1) no longer overflows, and names the same streams as -1; an ordinary seed is unchanged."""
    from merging.learned.cli import LabeledShots

    top, minus_one = (LabeledShots(_Split(), "label", shots=3, seed=s, batch_size=2) for s in (2**64 - 1, -1))
    assert top.gen.initial_seed() == minus_one.gen.initial_seed() == 0
    assert torch.equal(top.batch[0], minus_one.batch[0])
    assert LabeledShots(_Split(), "label", shots=3, seed=7, batch_size=2).gen.initial_seed() == 8


def test_labeled_shots_refuse_a_class_with_fewer_images_than_asked():
    """16 shots on 6 images of a class would be a smaller budget than the run records; a class the split
    lacks entirely (num_classes known) too."""
    from merging.learned.cli import LabeledShots

    with pytest.raises(ValueError, match=r"merge.shots=6: task 'digits'\'s train split has fewer labelled images than "
                                         r"that for 3 class\(es\) \(class 0: 5, class 1: 5, class 2: 5\)"):
        LabeledShots(_Split(), "label", shots=6, task="digits")
    with pytest.raises(ValueError, match=r"for 1 class\(es\) \(class 3: 0\)"):
        LabeledShots(_Split(), "label", shots=3, num_classes=4)
    split = _Split()
    split.tensors["value"] = torch.rand(15, 2)
    with pytest.raises(ValueError, match=r"merge.shots=16: task 'value'\'s train split has only 15 images"):
        LabeledShots(split, "value", shots=16)


def test_learning_from_folders_leaves_the_callers_random_stream_alone(pool):
    import torch

    import merging

    data = {t: [torch.rand(2, 3, 32, 32)] for m in pool.members for t in m.tasks}
    torch.manual_seed(11)
    want = torch.rand(3)
    torch.manual_seed(11)
    merging.learn("adamerging", pool.pretrained, pool.member_paths, unlabeled=data, steps=1, progress=False)
    assert torch.equal(torch.rand(3), want)  # the models built from the folders drew nothing from it


def test_learn_max_steps_with_a_merge_that_learns_nothing_is_refused_by_name(tmp_path):
    """`learn_max_steps` caps only the learned merges: with ties or task arithmetic it was accepted and read by
    nothing. Now one error line naming it, before any run folder (the paths need not exist)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MTL_OUTPUT_DIR=str(tmp_path / "outputs"))
    inputs = [f"pretrained={tmp_path / 'base'}", f"models=[{tmp_path / 'a'},{tmp_path / 'b'}]"]
    proc = subprocess.run([sys.executable, "-m", "merging.cli", "merge=ties", "eval=none", "learn_max_steps=5", *inputs],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "run_dir:" not in proc.stdout, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("error: learn_max_steps caps the learned merges (adamerging, atlas, concrete_ta, "
                                   "concrete_adamerging); merge=ties does not read it")
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(ValueError, match=r"^learn_max_steps caps the learned merges .*merge=task_arithmetic does not"):
        run(["merge=task_arithmetic", "merge.lam=0.3", "learn_max_steps=5", *inputs], run_dir=tmp_path / "ta")
    assert not (tmp_path / "ta").exists()


def test_debug_smokes_own_learn_max_steps_is_no_setting_of_a_merge_that_learns_nothing(tmp_path, monkeypatch):
    """debug=smoke sets learn_max_steps: 3 for every method: `debug=smoke merge=ties` is not refused for it."""
    import merging.job as job

    def loaded(*a, **k):
        raise RuntimeError("past the settings")

    monkeypatch.setattr(job, "start_run", loaded)
    with pytest.raises(RuntimeError, match="past the settings"):
        run(["debug=smoke", "merge=ties", "merge.lam=0.3"], run_dir=tmp_path / "smoke")
    with pytest.raises(ValueError, match="^learn_max_steps caps the learned merges"):
        run(["debug=smoke", "merge=ties", "merge.lam=0.3", "learn_max_steps=4"], run_dir=tmp_path / "smoke")


def test_a_pool_with_no_entropy_task_is_refused_before_the_run_folder_in_the_clis_terms(pool, tmp_path, monkeypatch):
    """A regression-only pool under an entropy objective was refused after the pool loaded (a FAILED run folder),
    with Python advice (objective='supervised' with labeled=...). Now the task kinds in config.json decide it
    before the run folder (as merging.learn decides it: entropy_tasks), and mtl-merge names its own settings."""
    import os
    import subprocess
    import sys

    import merging.job as job

    regression = pool.member_paths[0]
    inputs = [f"pretrained={pool.pretrained}", f"models=[{regression}]"]
    env = dict(os.environ, MTL_OUTPUT_DIR=str(tmp_path / "outputs"))
    proc = subprocess.run([sys.executable, "-m", "merging.cli", "merge=adamerging", *inputs], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "run_dir:" not in proc.stdout, proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        "error: merge=adamerging: no task has an entropy objective: ['regression'] are regression-like heads; use "
        "merge=atlas merge.objective=supervised (merge.shots labelled train images per class) or a merge that learns "
        "nothing, e.g. merge=task_arithmetic")
    assert not (tmp_path / "outputs").exists()
    for method in ("atlas", "concrete_ta", "concrete_adamerging"):
        with pytest.raises(ValueError, match=rf"^merge={method}: no task has an entropy objective: .*merge=atlas "
                                             r"merge\.objective=supervised"):
            run([f"merge={method}", *inputs], run_dir=tmp_path / method)
        assert not (tmp_path / method).exists()

    def started(*a, **k):
        raise RuntimeError("past the checks")

    monkeypatch.setattr(job, "start_run", started)  # supervised aTLAS reads the regression task's labels
    with pytest.raises(RuntimeError, match="past the checks"):
        run(["merge=atlas", "merge.objective=supervised", *inputs], run_dir=tmp_path / "supervised")
    with pytest.raises(ValueError, match=r"^no task has an entropy objective: \['regression'\] are regression-like "
                                         r"heads; use objective='supervised' with labeled=\.\.\. \(aTLAS\)"):
        merging.learn("adamerging", pool.pretrained, [regression], unlabeled={"regression": [torch.rand(2, 3, 8, 8)]},
                      steps=1, progress=False)
