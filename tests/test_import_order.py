"""Every module of mtl/, merging/ and pruning/ imports when it is the first of ours to load (as
`python -c "import merging.grid_job"` does): an import cycle among them shows as an ImportError."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# one interpreter: before each import every module of ours is dropped, so it runs first again, while
# torch, timm, Lightning ... stay loaded (a fresh interpreter per module takes ~20 min for all of them)
_SCRIPT = """
import importlib, json, sys
failed = {}
for name in json.loads(sys.argv[1]):
    for k in [k for k in sys.modules if k.split(".")[0] in ("mtl", "merging", "pruning")]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
print(json.dumps(failed))
"""


def _modules() -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for pkg in ("mtl", "merging", "pruning") for p in (ROOT / pkg).rglob("*.py"))


def test_each_module_imports_when_it_is_the_first_of_ours():
    names = _modules()
    assert "merging.grid_job" in names and len(names) > 100
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(names)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}
