"""hf_local split names: files and saved splits read by HF datasets' own split keywords, nothing merged into train
or left out unseen (tiny datasets built in each test)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mtl.data import HFImageDataModule


def _rows(path: Path, ids: list[int]) -> None:
    """A parquet file of 2x2 images whose column ``y`` numbers its rows (unique across files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": np.zeros((len(ids), 2, 2, 3), np.uint8).tolist(),
                             "y": ids}), path)


def _ids(dm: HFImageDataModule, split: str) -> set[int]:
    return set(dm.dataset(split).tensors["other"].tolist())


def _hf_splits(folder: Path, cache: Path) -> dict[str, set[int]]:
    """The splits HF datasets itself forms from the folder's files (its data_files split keywords)."""
    from datasets import load_dataset

    loaded = load_dataset("parquet", data_dir=str(folder), cache_dir=str(cache))
    return {name: set(ds["y"]) for name, ds in loaded.items()}


def test_testing_and_eval_files_form_the_test_split_as_in_hf_datasets(tmp_path):
    _rows(tmp_path / "pq" / "train.parquet", list(range(0, 20)))
    _rows(tmp_path / "pq" / "testing.parquet", [100, 101, 102])
    _rows(tmp_path / "pq" / "eval.parquet", [200, 201])
    _rows(tmp_path / "pq" / "dev.parquet", [300, 301])
    hf = _hf_splits(tmp_path / "pq", tmp_path / "cache")
    assert hf["test"] == {100, 101, 102, 200, 201}  # HF's reading: the reference
    dm = HFImageDataModule(tmp_path / "pq", image_column="image", columns={"y": "other"})
    assert _ids(dm, "test") == hf["test"] and _ids(dm, "val") == hf["validation"] and _ids(dm, "train") == hf["train"]


def test_training_files_are_the_train_split(tmp_path):
    _rows(tmp_path / "pq" / "training.parquet", list(range(10)))
    _rows(tmp_path / "pq" / "evaluation.parquet", [50, 51])
    dm = HFImageDataModule(tmp_path / "pq", image_column="image", columns={"y": "other"}, val_fraction=0.2)
    assert _ids(dm, "test") == {50, 51} and _ids(dm, "train") | _ids(dm, "val") == set(range(10))


def test_a_file_naming_no_split_beside_named_ones_is_refused_not_added_to_train(tmp_path):
    _rows(tmp_path / "pq" / "train.parquet", list(range(6)))
    _rows(tmp_path / "pq" / "test.parquet", [10, 11])
    _rows(tmp_path / "pq" / "extra.parquet", [20, 21])
    with pytest.raises(ValueError, match=r"^hf_local: .*extra\.parquet names no split while other files") as e:
        HFImageDataModule(tmp_path / "pq", image_column="image").setup()
    assert "\n" not in str(e.value)


def test_files_naming_no_split_at_all_are_the_train_split(tmp_path):
    _rows(tmp_path / "pq" / "part-a.parquet", list(range(5)))
    _rows(tmp_path / "pq" / "part-b.parquet", list(range(5, 10)))
    dm = HFImageDataModule(tmp_path / "pq", image_column="image", columns={"y": "other"})
    assert _ids(dm, "train") | _ids(dm, "val") | _ids(dm, "test") == set(range(10))


@pytest.mark.parametrize("files, splits", [
    (["latest/train.parquet", "latest/validation.parquet"], {"train", "validation"}),
    (["data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet", "data/val.parquet"],
     {"train", "test", "validation"}),
    (["interval/data.parquet", "contest/dev.parquet"], {None, "validation"}),
    (["training_set.parquet", "testing.parquet", "eval-0.parquet", "evaluation/x.parquet"], {"train", "test"}),
    (["data/unsupervised-00000-of-00001.parquet", "data/eval-00000-of-00002.parquet"], {"unsupervised", "test"}),
])
def test_parquet_splits_come_from_whole_words_of_the_path(files, splits):
    from mtl.data.hf_splits import split_of

    assert {split_of(Path(f)) for f in files} == splits


def _saved(path: Path, **splits: int) -> None:
    from datasets import Dataset, DatasetDict

    start, parts = 0, {}
    for name, n in splits.items():
        parts[name] = Dataset.from_dict({"img": np.zeros((n, 2, 2, 3), np.uint8).tolist(),
                                         "y": list(range(start, start + n))})
        start += n
    DatasetDict(parts).save_to_disk(str(path))


def test_a_saved_eval_split_is_the_test_split(tmp_path):
    _saved(tmp_path / "dd", train=10, eval=3)
    dm = HFImageDataModule(tmp_path / "dd", image_column="img", columns={"y": "other"})
    assert _ids(dm, "test") == {10, 11, 12} and len(dm.dataset("train")) + len(dm.dataset("val")) == 10


def test_two_saved_splits_reading_as_test_are_refused_naming_both(tmp_path):
    _saved(tmp_path / "dd", train=10, test=3, eval=3)
    with pytest.raises(ValueError, match=r"splits \['eval', 'test'\], which all read as test; .*data\.splits"):
        HFImageDataModule(tmp_path / "dd", image_column="img").setup()
    dm = HFImageDataModule(tmp_path / "dd", image_column="img", columns={"y": "other"}, splits={"test": "eval"})
    assert _ids(dm, "test") == {13, 14, 15}


def test_a_saved_split_no_role_takes_is_named_in_a_warning(tmp_path, caplog):
    _saved(tmp_path / "dd", train=10, unsupervised=4)
    with caplog.at_level("WARNING"):
        HFImageDataModule(tmp_path / "dd", image_column="img").setup()
    assert "split(s) ['unsupervised']" in caplog.text and "not used" in caplog.text


@pytest.mark.parametrize("splits, message", [
    ({"train": "train", "valid": "validation"}, r"data\.splits key 'valid' is not a split here \(did you mean val\?\)"
                                                r"; the keys are train, val, test"),
    ({"training": "train"}, r"data\.splits key 'training' is not a split here \(did you mean train\?\)"),
    ({"train": "train", "test": "train"}, r"data\.splits maps both train and test to split 'train'"),
    ({"val": 3}, r"data\.splits\.val must be a split name of the dataset, got 3"),
])
def test_data_splits_with_an_unknown_key_or_one_split_for_two_roles_is_refused(tmp_path, splits, message):
    _saved(tmp_path / "dd", train=10, validation=3)
    with pytest.raises(ValueError, match=r"^hf_local: " + message):
        HFImageDataModule(tmp_path / "dd", image_column="img", splits=splits)


def test_the_cli_refuses_an_unknown_data_splits_key_in_one_line(tmp_path, console, capsys):
    _saved(tmp_path / "dd", train=10, validation=3)
    code, _ = console("mtl.cli.train", "data=hf_local", f"data.path={tmp_path / 'dd'}", "data.image_column=img",
                      "data.columns={y: classification}", "task=classification", "debug=smoke",
                      "data.splits={train: train, valid: validation}")
    err = capsys.readouterr().err
    assert code == 1 and "error: hf_local: data.splits key 'valid' is not a split here" in err


@pytest.mark.parametrize("name", ["val", "validation"])
def test_a_val_file_is_named_by_either_word_in_data_splits(tmp_path, name):
    _rows(tmp_path / "pq" / "train.parquet", list(range(10)))
    _rows(tmp_path / "pq" / "val.parquet", [100, 101])
    _rows(tmp_path / "pq" / "test.parquet", [200, 201])
    dm = HFImageDataModule(tmp_path / "pq", image_column="image", columns={"y": "other"}, splits={"val": name})
    assert _ids(dm, "val") == {100, 101} and _ids(dm, "test") == {200, 201} and _ids(dm, "train") == set(range(10))


@pytest.mark.parametrize("name", ["val", "valid", "dev"])
def test_a_val_file_can_serve_as_the_test_split_by_its_own_word(tmp_path, name):
    # test labels withheld (as on many benchmarks): test on the validation file, named as its file is
    _rows(tmp_path / "pq" / "train.parquet", list(range(10)))
    _rows(tmp_path / "pq" / f"{name}.parquet", [100, 101])
    dm = HFImageDataModule(tmp_path / "pq", image_column="image", columns={"y": "other"}, splits={"test": name})
    assert _ids(dm, "test") == {100, 101} and _ids(dm, "train") <= set(range(10))  # val: held out of train


def test_the_data_folder_of_a_sharded_dataset_as_path_keeps_its_splits_and_warns_the_unused_one(tmp_path, caplog):
    data = tmp_path / "imdb" / "data"  # HF's layout, with data.path pointed at data/ itself
    _rows(data / "train-00000-of-00001.parquet", list(range(10)))
    _rows(data / "test-00000-of-00001.parquet", [100, 101])
    _rows(data / "unsupervised-00000-of-00001.parquet", [200, 201, 202])
    with caplog.at_level("WARNING"):
        dm = HFImageDataModule(data, image_column="image", columns={"y": "other"})
        dm.setup()
    assert _ids(dm, "test") == {100, 101} and _ids(dm, "train") | _ids(dm, "val") == set(range(10))
    assert "split(s) ['unsupervised']" in caplog.text and "not used" in caplog.text


def test_sharded_files_naming_no_split_keyword_anywhere_are_the_train_split_as_in_hf_datasets(tmp_path):
    _rows(tmp_path / "pq" / "mydata-00000-of-00002.parquet", list(range(5)))
    _rows(tmp_path / "pq" / "mydata-00001-of-00002.parquet", list(range(5, 10)))
    assert set(_hf_splits(tmp_path / "pq", tmp_path / "cache")) == {"train"}
    dm = HFImageDataModule(tmp_path / "pq", image_column="image", columns={"y": "other"})
    assert _ids(dm, "train") | _ids(dm, "val") | _ids(dm, "test") == set(range(10))
