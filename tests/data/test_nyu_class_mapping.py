"""NYUv2 class mapping from the community's files: classMapping40.mat (mapClass) and class13Mapping.mat
(struct classMapping13, field labels13), built here with scipy.io.savemat in exactly that structure."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mtl.data import create_datamodule
from mtl.data.nyu_mat import read_class_mapping

savemat = pytest.importorskip("scipy.io").savemat

# raw id -> 1-based 40-class id (everything else -> 1); 0 = unlabelled in the 40-class map too
MAP40 = {1: 12, 2: 0, 5: 3, 894: 40}
# 1-based 40-class id -> 1-based 13-class id (everything else -> 7)
MAP13 = {12: 13, 3: 1, 40: 5}


def write_class_mapping40(path, overrides=MAP40):
    map_class = np.ones(894)
    for raw, c in overrides.items():
        map_class[raw - 1] = c
    names = np.array([f"class{i}" for i in range(1, 41)], dtype=object).reshape(1, 40)
    savemat(path, {"mapClass": map_class.reshape(1, 894), "className": names})  # doubles, 1 x 894, as released
    return path


def write_class13_mapping(path, overrides=MAP13, field="labels13"):
    labels = np.full(40, 7.0)
    for c40, c13 in overrides.items():
        labels[c40 - 1] = c13
    struct = np.empty((1, 1), dtype=[(field, object), ("names13", object)])  # a MATLAB struct array
    struct[0, 0][field] = labels.reshape(1, 40)
    struct[0, 0]["names13"] = np.array([f"c{i}" for i in range(1, 14)], dtype=object).reshape(1, 13)
    savemat(path, {"classMapping13": struct})
    return path


@pytest.fixture
def mats(tmp_path):
    return write_class_mapping40(tmp_path / "classMapping40.mat"), write_class13_mapping(tmp_path / "class13Mapping.mat")


def test_the_two_files_compose_raw_to_13_classes(mats):
    table = read_class_mapping([str(m) for m in mats], 13)
    assert table.shape == (895,) and table.dtype == np.int64
    # raw 0 and raw 2 (40-class 0) stay ignored; 13-class ids become 0-based
    assert table[0] == -1 and table[2] == -1
    assert table[1] == 13 - 1   # raw 1 -> 40-class 12 -> 13-class 13
    assert table[5] == 1 - 1    # raw 5 -> 3 -> 1
    assert table[894] == 5 - 1  # raw 894 -> 40 -> 5
    assert table[3] == 7 - 1    # raw 3 -> 1 -> 7 (the defaults)
    assert set(np.unique(table)) == {-1, 12, 0, 4, 6}


def test_class_mapping40_alone_gives_the_40_class_task(mats):
    table = read_class_mapping(mats[0], 40)
    assert table[0] == -1 and table[2] == -1 and table[1] == 11 and table[5] == 2 and table[894] == 39 and table[3] == 0
    with pytest.raises(ValueError, match=r"classMapping40\.mat.*outside 0\.\.12 \(data\.num_classes=13\).*"
                                         r"set data\.num_classes=40 or add class13Mapping\.mat"):
        read_class_mapping(mats[0], 13)


def test_a_plain_table_can_precede_class13_mapping(tmp_path, mats):
    # a 0-based 40-class table (-1 = ignored) instead of classMapping40.mat
    table40 = read_class_mapping(mats[0], 40)
    (tmp_path / "t40.json").write_text(json.dumps(table40.tolist()))
    assert np.array_equal(read_class_mapping([tmp_path / "t40.json", mats[1]], 13), read_class_mapping(list(mats), 13))


def test_bad_files_name_the_file_and_key(tmp_path, mats):
    map40, map13 = mats
    with pytest.raises(ValueError, match=r"class13Mapping\.mat' maps the 40 classes to 13; put classMapping40\.mat"):
        read_class_mapping([map13, map40], 13)  # wrong order
    with pytest.raises(KeyError, match=r"classMapping40\.mat' after the first class-mapping file must be "
                                       r"class13Mapping\.mat.*found \['className', 'mapClass'\]"):
        read_class_mapping([map40, map40], 13)
    savemat(tmp_path / "other.mat", {"labels": np.zeros((1, 894))})
    with pytest.raises(KeyError, match=r"other\.mat' has no key 'mapClass' .*found \['labels'\]"):
        read_class_mapping(tmp_path / "other.mat", 40)
    savemat(tmp_path / "short.mat", {"mapClass": np.ones((1, 40))})
    with pytest.raises(ValueError, match=r"'mapClass' in .*short\.mat' has 40 entries, expected 894"):
        read_class_mapping(tmp_path / "short.mat", 40)
    bad13 = write_class13_mapping(tmp_path / "bad13.mat", field="labels")
    with pytest.raises(KeyError, match=r"'classMapping13' in .*bad13\.mat' has no field 'labels13'"):
        read_class_mapping([map40, bad13], 13)
    few13 = tmp_path / "few13.mat"
    struct = np.empty((1, 1), dtype=[("labels13", object)])
    struct[0, 0]["labels13"] = np.ones((1, 10))
    savemat(few13, {"classMapping13": struct})
    with pytest.raises(ValueError, match=r"classMapping40\.mat gives class 40 but .*few13\.mat' maps only classes 1\.\.10"):
        read_class_mapping([map40, few13], 13)
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(ValueError, match=r"cannot read .*junk\.mat' as a MATLAB \.mat file"):
        read_class_mapping(tmp_path / "junk.mat", 40)
    with pytest.raises(FileNotFoundError, match=r"data\.class_mapping .*nope\.mat' does not exist"):
        read_class_mapping([map40, tmp_path / "nope.mat"], 13)
    # a table that does not parse: named with the parser's line (row), not its bare error
    (tmp_path / "t.json").write_text("[-1, 0,")
    with pytest.raises(ValueError, match=r"^nyuv2: class mapping .*t\.json' cannot be read as a table of numbers "
                                         r"\(Expecting value: line 1 column 8 \(char 7\)\)$"):
        read_class_mapping(tmp_path / "t.json", 13)
    (tmp_path / "t.txt").write_text("-1\nwall\n")
    with pytest.raises(ValueError, match=r"^nyuv2: class mapping .*t\.txt' cannot be read as a table of numbers "
                                         r"\(could not convert string 'wall' to float64 at row 1, column 1\.\)$"):
        read_class_mapping(tmp_path / "t.txt", 13)


def test_cli_list_override_reaches_the_loader(tmp_path, mats):
    """``data.class_mapping=[classMapping40.mat,class13Mapping.mat]`` from the command line, on the labelled .mat."""
    dm, labels = _composed_mat_loader(tmp_path, f"[{mats[0]},{mats[1]}]")
    semseg = dm.dataset("train").tensors["semseg"][1]  # MATLAB image 2
    table = read_class_mapping(list(mats), 13)
    assert torch.equal(semseg, torch.from_numpy(np.where(table[labels[1]] < 0, 255, table[labels[1]])))


def test_smoke_training_on_the_40_class_task(tmp_path, mats):
    import mtl
    from mtl.train import run
    from tests.data.test_benchmarks import write_nyu_mat

    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    write_nyu_mat(mat, hw=(12, 16))
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"trainNdxs": [1, 2], "testNdxs": [3]}))
    run_dir = run(["experiment=nyuv2", "task=[bench_semseg,bench_depth]", f"data.root={mat}",
                   f"data.splits_file={splits}", f"data.class_mapping={mats[0]}", "data.num_classes=40", "debug=smoke",
                   "data.size=12", "data.batch_size=2", "viz.num_samples=0", "logger=none"], run_dir=tmp_path / "r")
    assert mtl.load_model(run_dir / "model").tasks["semseg"].num_classes == 40


@pytest.mark.parametrize("n", [894, 896])
def test_a_plain_table_needs_one_entry_per_raw_label(tmp_path, n):
    """Raw labels are 0..894: a table of 894 (1-based, say) or 896 entries shifted or padded every class
    silently; a short table also left raw label 894 unmapped until a pixel used it."""
    np.save(tmp_path / "t.npy", np.arange(n) % 13)
    with pytest.raises(ValueError, match=rf"class mapping .*t\.npy' has {n} entries, expected 895 "
                                         r"\(entry i = the 0-based class of raw label i, for raw labels 0\.\.894\)"):
        read_class_mapping(tmp_path / "t.npy", 13)
    (tmp_path / "t.txt").write_text("\n".join(["-1"] + ["0"] * 894))
    assert read_class_mapping(tmp_path / "t.txt", 1).tolist() == [-1] + [0] * 894


def test_a_mapping_with_fewer_classes_than_the_head_is_refused(mats):
    with pytest.raises(ValueError, match=r"class mapping classMapping40\.mat → class13Mapping\.mat gives 13 classes "
                                         r"but data\.num_classes=40; set data\.num_classes=13"):
        read_class_mapping([str(m) for m in mats], 40)


@pytest.mark.parametrize("splits, message", [
    ({"trainNdxs": [1, 2, 3, 5], "testNdxs": [5, 6]}, r"1 image\(s\) in both trainNdxs and testNdxs \(first: 5\)"),
    ({"trainNdxs": [1.7, 2, 3], "testNdxs": [4]}, r"trainNdxs: 1\.7 is not a whole image number"),
    ({"trainNdxs": [0, 1, 2], "testNdxs": [3]}, r"trainNdxs: holds 0; the indices are MATLAB's, 1-based"),
    ({"trainNdxs": [1, 2, 2], "testNdxs": [3]}, r"trainNdxs: image 2 appears more than once"),
    # were "no samples to stack" when the split was read, and a bare JSONDecodeError / TypeError
    ({"trainNdxs": [1, 2], "testNdxs": []}, r"splits\.json': testNdxs is empty$"),
    ({"trainNdxs": [], "testNdxs": [3]}, r"splits\.json': trainNdxs is empty$"),
    ('{"trainNdxs": [1,', r"splits\.json: not valid JSON \(Expecting value: line 1 column 18 \(char 17\)\)$"),
    ("[1, 2]", r"splits\.json' must hold \{\"trainNdxs\": \[\.\.\.\], \"testNdxs\": \[\.\.\.\]\}, got \[1, 2\]$"),
])
def test_bad_split_indices_are_named(tmp_path, splits, message):
    from mtl.data.nyu_mat import read_splits

    path = tmp_path / "splits.json"
    path.write_text(splits if isinstance(splits, str) else json.dumps(splits))
    with pytest.raises(ValueError, match=message):
        read_splits(path)
    path.write_text(json.dumps({"trainNdxs": [1, 3], "testNdxs": [2]}))
    assert read_splits(path) == {"train": [0, 2], "test": [1]}


def test_the_table_may_be_given_inline_as_the_config_says(tmp_path):
    """configs/data/nyuv2.yaml: class_mapping may be "a table of 895 ints" itself, entry i = class of raw label i."""
    mapping = [-1] + [(i * 7) % 13 for i in range(1, 895)]
    mapping[4] = -1  # raw label 4 ignored
    assert read_class_mapping(mapping, 13).tolist() == mapping
    dm, labels = _composed_mat_loader(tmp_path, f"[{','.join(map(str, mapping))}]")
    table = np.asarray(mapping)
    expected = np.where(table[labels[1]] < 0, 255, table[labels[1]])  # MATLAB image 2 by hand
    assert torch.equal(dm.dataset("train").tensors["semseg"][1].long(), torch.from_numpy(expected))


@pytest.mark.parametrize("mapping, message", [
    ([0] * 10, r"data\.class_mapping \(the inline table\) has 10 entries, expected 895"),
    ([-1] + [0.5] * 894, r"data\.class_mapping \(the inline table\) must hold integers ≥ −1"),
    ([-1, 0, "class13Mapping.mat"], r"data\.class_mapping mixes numbers and 'class13Mapping\.mat'"),
])
def test_a_bad_inline_table_is_named(mapping, message):
    with pytest.raises(ValueError, match=r"^nyuv2: " + message):
        read_class_mapping(mapping, 13)


def _composed_mat_loader(tmp_path, class_mapping: str):
    """The nyuv2 loader as `mtl-train experiment=nyuv2` composes it on a tiny labelled .mat (images 1, 2 train, 3
    test) with ``data.class_mapping=<class_mapping>``; (datamodule, raw labels)."""
    from mtl.cli.in_process import compose_in_process
    from tests.data.test_benchmarks import write_nyu_mat

    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    _, _, labels = write_nyu_mat(mat)
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"trainNdxs": [1, 2], "testNdxs": [3]}))
    cfg, _ = compose_in_process("mtl.configs", "train", [
        "experiment=nyuv2", "task=[bench_semseg,bench_depth]", f"data.root={mat}", f"data.splits_file={splits}",
        f"data.class_mapping={class_mapping}", "data.size=null"], run_dir=tmp_path / "r")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return create_datamodule(data.pop("name"), **data), labels
