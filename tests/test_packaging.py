"""A non-editable install ships the configs, so the CLIs work from any directory."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_cli_composes_from_anywhere(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheel_dir), str(ROOT)], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("mtlkit-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    assert (target / "mtl" / "configs" / "train.yaml").is_file()
    assert (target / "mtl" / "configs" / "merge_app" / "merge.yaml").is_file()
    assert (target / "merging" / "csrc" / "chunk_kernels.c").is_file()  # compiled by merging.native at first use
    env = dict(os.environ, PYTHONPATH=str(target))
    for module, args in (("mtl.cli.train", ["experiment=scenes_hps", "debug=smoke"]), ("merging.cli", ["merge=ties"])):
        proc = subprocess.run([sys.executable, "-m", module, *args, "--cfg", "job"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        code = subprocess.run([sys.executable, "-c", f"import {module.split('.')[0]} as m; print(m.__file__)"],
                              cwd=tmp_path, env=env, capture_output=True, text=True).stdout
        assert str(target) in code  # the installed copy, not the source tree, answered
    assert "test_resnet" in subprocess.run([sys.executable, "-m", "mtl.cli.train", "experiment=scenes_hps", "debug=smoke",
                                            "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True).stdout


def documented_outputs() -> set[str]:
    """The working-directory paths the README's and docs' examples write: ``output=``, ``baselines.save_to=``,
    ``save_model(..., "x")``, ``merge_to_file(..., "x")``, ``mtl.export(..., out="x")`` (placeholders, absolute
    paths and the output root ``outputs/`` aside; ``$PWD/x`` is ``x``)."""
    import re

    patterns = (r"\boutput=([^\s`'\"),]+)", r"save_to=([^\s`'\"),:]+)",
                r"save_model\([^,()]+,\s*\"([^\"]+)\"", r"merge_to_file\((?:\s*(?:\[[^\]]*\]|[^(),\[\]]+),){3}\s*\"([^\"]+)\"",
                r"\bout=\"([^\"]+)\"")
    found = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for pattern in patterns:
            for path in re.findall(pattern, doc.read_text()):
                path = path.removeprefix("$PWD/")
                if not path.startswith(("<", "$", "/", "~", ".", "outputs/")):
                    found.add(path)
    return found


def test_what_the_documented_examples_write_is_ignored_by_git():
    """.gitignore missed merged/, nyu_base.json, merged.safetensors and pruned/, which README/docs examples write in
    the working directory: `git status` showed a model folder to commit after following them."""
    import shutil

    import pytest

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a checkout")
    outputs = documented_outputs()
    assert {"merged", "nyu_base.json", "merged.safetensors", "pruned"} <= outputs  # the parser still finds them
    probes = [f"{p}/model.safetensors" if "." not in Path(p).name else p for p in sorted(outputs)]
    res = subprocess.run(["git", "check-ignore", "--no-index", "-v", "-n", *probes], cwd=ROOT, capture_output=True,
                         text=True)
    missed = [line.split("\t")[-1] for line in res.stdout.splitlines() if line.startswith("::")]
    assert not missed, f"not ignored by .gitignore: {missed}"


def test_every_phony_make_target_has_a_rule():
    """`bench` was declared .PHONY with no rule: `make bench` did nothing and exited 0."""
    import re

    text = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split()
    rules = set(re.findall(r"^([\w-]+):", text, re.M))
    assert phony and set(phony) <= rules, sorted(set(phony) - rules)


def test_make_treats_an_empty_output_dir_as_unset(tmp_path):
    """`export MTL_OUTPUT_DIR ?= outputs` kept a set-but-empty value: `make demo` removed and wrote /demo/baselines.json."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("no make")
    env = dict(os.environ, MTL_OUTPUT_DIR="")
    dry = subprocess.run(["make", "-n", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60).stdout
    want = ROOT / "outputs" / "demo" / "baselines.json"
    assert f'rm -f "{want}"' in dry, dry


@pytest.mark.parametrize("out", ["/tmp/mtl demo/a,b", "rel dir/out"])
def test_make_demo_passes_an_output_dir_with_spaces_and_commas_whole(tmp_path, out):
    """$(abspath) split `MTL_OUTPUT_DIR="/tmp/x y"` into two words: the override broke in two (and `rm -f`
    got two paths). A fake venv's mtl-train prints the arguments `make demo` gives it."""
    import hashlib
    import shutil

    if shutil.which("make") is None:
        pytest.skip("no make")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".installed").write_text(hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest() + "\n")
    fake = venv / "bin" / "mtl-train"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "<%s>\\n" "$a"; done\n')
    fake.chmod(0o755)
    env = dict(os.environ, MTL_OUTPUT_DIR=out)
    res = subprocess.run(["make", "demo", f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    want = out if out.startswith("/") else f"{ROOT}/{out}"
    assert res.returncode == 0, res.stderr
    assert f"<baselines.save_to='{want}/demo/baselines.json'>" in res.stdout, res.stdout
    assert f"<baselines.path='{want}/demo/baselines.json'>" in res.stdout, res.stdout


@pytest.mark.parametrize("app, doc", [("prune_app", "pruning.md"), ("export_app", "export.md"),
                                      ("extract_app", "models.md")])
def test_every_setting_of_a_job_cli_is_documented(app, doc):
    """mtl-prune's, mtl-export's and mtl-extract's `smoke_model` (set by debug=smoke) was in no doc: every top-level
    setting of a job CLI's config file is named in that CLI's doc (`key` or `key.<sub>`)."""
    import yaml

    settings = yaml.safe_load((ROOT / "configs" / app / f"{app.removesuffix('_app')}.yaml").read_text())
    text = (ROOT / "docs" / doc).read_text()
    missing = [key for key in settings if key not in ("defaults", "name", "hydra")
               and f"`{key}`" not in text and f"`{key}." not in text and f"`{key}=" not in text]
    assert missing == [], f"docs/{doc} names no {missing}"
