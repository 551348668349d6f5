"""Model folders under random corruption: every damaged folder is refused with a ModelFolderError that
names the file (and key where one is at fault), or it loads exactly the saved model — never a
different model, never another exception."""
import json
import random
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mtl
from mtl.io import CONFIG, WEIGHTS, ModelFolderError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = mtl.create_model(["depth", "edges", "classification"],
                             backbone={"name": "test_resnet", "out_indices": [1, 2]},
                             decoder={"name": "hps", "channels": 8})
    return mtl.save_model(model, tmp_path_factory.mktemp("fuzz") / "model")


def _tensors(path):
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _flip(file, rng):
    data = bytearray(file.read_bytes())
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    file.write_bytes(bytes(data))


def _truncate(file, rng):
    data = file.read_bytes()
    file.write_bytes(data[:rng.randrange(len(data))])


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path, obj


def _edit_json(folder, rng):
    cfg = json.loads((folder / CONFIG).read_text())
    what = rng.choice(["leaf", "delete", "swap_kinds", "rename_task", "format"])
    if what == "swap_kinds":  # depth and edges heads have the same shapes
        tasks = {t["name"]: t for t in cfg["model"]["tasks"]}
        tasks["depth"]["kind"], tasks["edges"]["kind"] = tasks["edges"]["kind"], tasks["depth"]["kind"]
    elif what == "rename_task":
        t = rng.choice(cfg["model"]["tasks"])
        t["name"] = rng.choice(["depth", "edges", "classification", "other"])
    elif what == "format":
        cfg["format"] = rng.choice(["mtlkit.model/2", None, 1])
    else:
        path, value = rng.choice(list(_leaves(cfg)))
        node = cfg
        for p in path[:-1]:
            node = node[p]
        if what == "delete":
            del node[path[-1]]
        elif isinstance(value, bool) or value is None:
            node[path[-1]] = rng.choice([0, "x", not value])
        elif isinstance(value, (int, float)):
            node[path[-1]] = rng.choice([value + 1, value * 2, -value, str(value), None])
        else:
            node[path[-1]] = rng.choice([value + "x", "", 3, [value]])
    (folder / CONFIG).write_text(json.dumps(cfg))


def _edit_tensors(folder, rng, keep_header: bool):
    state, header = _tensors(folder)
    key = rng.choice(sorted(state))
    what = rng.choice(["rename", "drop", "dtype", "shape", "nan", "inf", "value"] if keep_header
                      else ["rename", "drop", "dtype", "shape", "nan", "inf"])
    t = state[key]
    if what == "rename":
        state[key + "_x" if rng.random() < 0.5 else key.replace(".", "_", 1)] = state.pop(key)
    elif what == "drop":
        del state[key]
    elif what == "dtype":
        state[key] = t.to(rng.choice([torch.float16, torch.bfloat16, torch.int32]) if t.is_floating_point()
                          else torch.float32)
    elif what == "shape":
        state[key] = torch.cat([t.reshape(-1), t.reshape(-1)[:1]]) if t.numel() else torch.zeros(1)
    elif what in ("nan", "inf"):
        if not t.is_floating_point():
            state[key] = t.float()  # becomes a dtype change
        else:
            t = t.clone()
            t.view(-1)[rng.randrange(t.numel())] = float("nan") if what == "nan" else float("-inf")
            state[key] = t
    else:  # a plausible value, only the header's digest can tell
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] += 1
        state[key] = t
    save_file(state, str(folder / WEIGHTS), metadata=header if keep_header else None)


CORRUPTIONS = ["truncate_weights", "truncate_config", "flip_weights", "flip_config", "json_edit",
               "tensors_with_header", "tensors_without_header"]


def _corrupt(folder, kind, rng):
    if kind == "truncate_weights":
        _truncate(folder / WEIGHTS, rng)
    elif kind == "truncate_config":
        _truncate(folder / CONFIG, rng)
    elif kind == "flip_weights":
        _flip(folder / WEIGHTS, rng)
    elif kind == "flip_config":
        _flip(folder / CONFIG, rng)
    elif kind == "json_edit":
        _edit_json(folder, rng)
    else:
        _edit_tensors(folder, rng, keep_header=kind == "tensors_with_header")


def fuzz(folder, tmp_path, n, seed):
    original = mtl.load_model(folder)
    ref_state, ref_cfg = original.state_dict(), original.config
    rng = random.Random(seed)
    outcomes = {"refused": 0, "identical": 0}
    for i in range(n):
        kind = CORRUPTIONS[i % len(CORRUPTIONS)]
        case = tmp_path / f"case{i}"
        shutil.copytree(folder, case)
        _corrupt(case, kind, rng)
        try:
            model = mtl.load_model(case)
        except ModelFolderError as e:
            msg = str(e)
            assert str(case / CONFIG) in msg or str(case / WEIGHTS) in msg, (kind, msg)
            outcomes["refused"] += 1
        except BaseException as e:  # noqa: BLE001 - the point: nothing else may escape
            pytest.fail(f"case {i} ({kind}): {type(e).__name__}: {e}")
        else:
            # loaded: it must be exactly the saved model (a harmless edit, e.g. in 'meta')
            state = model.state_dict()
            assert model.config == ref_cfg, (i, kind)
            assert state.keys() == ref_state.keys(), (i, kind)
            assert all(torch.equal(state[k], ref_state[k]) for k in state), (i, kind)
            outcomes["identical"] += 1
        shutil.rmtree(case)
    return outcomes


def test_fuzzed_model_folders_are_refused_or_identical(folder, tmp_path):
    outcomes = fuzz(folder, tmp_path, n=140, seed=0)
    assert outcomes["refused"] > 100  # most corruptions must be caught, not merely survive


@pytest.mark.slow
def test_fuzzed_model_folders_many(folder, tmp_path):
    outcomes = fuzz(folder, tmp_path, n=700, seed=1)
    assert outcomes["refused"] > 500


@pytest.mark.parametrize("what, match", [
    ("nan", r"model\.safetensors: key 'decoder\.heads\.depth\.body\.1\.weight' holds NaN or infinite values"),
    ("kind", r"config\.json: task 'depth' has kind 'edges', but .*model\.safetensors was saved with kind 'depth'"),
    ("format", r"config\.json: key 'format' is 'mtlkit\.model/2'"),
    ("digest", r"model\.safetensors: weights differ from the digest"),
])
def test_named_refusals(folder, tmp_path, what, match):
    case = shutil.copytree(folder, tmp_path / "m")
    state, header = _tensors(case)
    cfg = json.loads((case / CONFIG).read_text())
    key = "decoder.heads.depth.body.1.weight"
    if what == "nan":  # a file without mtlkit's header: the value check itself must catch it
        state[key].view(-1)[3] = float("nan")
        save_file(state, str(case / WEIGHTS))
    elif what == "digest":
        state[key].view(-1)[3] += 1.0
        save_file(state, str(case / WEIGHTS), metadata=header)
    elif what == "kind":
        tasks = {t["name"]: t for t in cfg["model"]["tasks"]}
        tasks["depth"]["kind"], tasks["edges"]["kind"] = "edges", "depth"
    else:
        cfg["format"] = "mtlkit.model/2"
    (case / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match=match):
        mtl.load_model(case)
