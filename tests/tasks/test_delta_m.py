"""Δm% sign conventions, variants and the baselines file."""
import json
import math
import re

import pytest

from mtl.evaluation import delta_m, delta_m_per_task, load_baselines, save_baselines
from mtl.tasks import create_task

TASKS = [create_task("semseg"), create_task("depth")]
BASE = {"semseg": {"miou": 0.5, "pixel_acc": 0.8}, "depth": {"rmse": 2.0, "abs_rel": 0.4}}


def test_equal_to_baseline_is_zero():
    assert delta_m(BASE, BASE, TASKS) == 0.0
    assert delta_m(BASE, BASE, TASKS, variant="all") == 0.0


def test_sign_conventions_primary():
    # lower rmse (better) -> positive; higher miou (better) -> positive
    better_depth = {"semseg": BASE["semseg"], "depth": {"rmse": 1.5, "abs_rel": 0.4}}
    assert delta_m(better_depth, BASE, TASKS) == pytest.approx(100 * 0.25 / 2)
    worse_seg = {"semseg": {"miou": 0.4, "pixel_acc": 0.8}, "depth": BASE["depth"]}
    assert delta_m(worse_seg, BASE, TASKS) == pytest.approx(-100 * 0.2 / 2)
    worse_depth = {"semseg": BASE["semseg"], "depth": {"rmse": 3.0, "abs_rel": 0.4}}
    assert delta_m(worse_depth, BASE, {"depth": TASKS[1]}) == pytest.approx(-50.0)


def test_all_variant_averages_within_then_across_tasks():
    m = {"semseg": {"miou": 0.6, "pixel_acc": 0.8}, "depth": {"rmse": 1.0, "abs_rel": 0.5}}
    # semseg: (+20% + 0%) / 2 = 10; depth: (+50% − 25%) / 2 = 12.5; Δm = (10 + 12.5) / 2
    assert delta_m_per_task(m, BASE, TASKS, "all") == pytest.approx({"semseg": 10.0, "depth": 12.5})
    assert delta_m(m, BASE, TASKS, variant="all") == pytest.approx(11.25)
    assert delta_m(m, BASE, TASKS) == pytest.approx((20.0 + 50.0) / 2)


def test_flat_variant_averages_over_all_metrics_of_all_tasks():
    m = {"semseg": {"miou": 0.6, "pixel_acc": 0.8}, "depth": {"rmse": 1.0, "abs_rel": 0.5}}
    # four signed changes: miou +20%, pixel_acc 0%, rmse +50%, abs_rel −25% -> (20 + 0 + 50 − 25) / 4
    assert delta_m(m, BASE, TASKS, variant="flat") == pytest.approx(11.25)
    # with unequal metric counts, flat and all differ: normals has five metrics, depth one
    normals, depth = create_task("normals"), create_task("depth", metrics=["abs_err"])
    base = {"normals": {"mean_angle": 20.0, "median_angle": 10.0, "pct_11_25": 50.0, "pct_22_5": 60.0,
                        "pct_30": 80.0}, "depth": {"abs_err": 0.5}}
    got = {"normals": {"mean_angle": 18.0, "median_angle": 10.0, "pct_11_25": 50.0, "pct_22_5": 60.0,
                       "pct_30": 80.0}, "depth": {"abs_err": 0.6}}
    # normals: mean_angle 20 -> 18 is +10% (lower is better), others 0; depth: 0.5 -> 0.6 is −20%
    assert delta_m(got, base, [normals, depth], variant="flat") == pytest.approx((10.0 - 20.0) / 6)
    assert delta_m(got, base, [normals, depth], variant="all") == pytest.approx((10.0 / 5 - 20.0) / 2)
    assert delta_m_per_task(got, base, [normals, depth], "flat") == pytest.approx({"normals": 2.0, "depth": -20.0})


def test_unknown_variant():
    with pytest.raises(ValueError, match="valid names: primary, all, flat"):
        delta_m(BASE, BASE, TASKS, variant="mean")


def test_missing_baseline_names_task_and_metric():
    with pytest.raises(ValueError, match="'depth'.*'rmse'"):
        delta_m(BASE, {"semseg": BASE["semseg"]}, TASKS)
    with pytest.raises(ValueError, match="'abs_rel'.*'depth'"):
        delta_m(BASE, {**BASE, "depth": {"rmse": 2.0}}, TASKS, variant="all")
    with pytest.raises(ValueError, match="zero|0.0"):
        delta_m(BASE, {**BASE, "semseg": {"miou": 0.0}}, TASKS)


def test_load_baselines_names_the_file(tmp_path):
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps({"semseg": {"miou": 0.5}}))
    with pytest.raises(ValueError, match=r"'rmse'.*baselines\.json"):
        load_baselines(path, tasks=TASKS)
    loaded = load_baselines(path)
    with pytest.raises(ValueError, match=r"'depth'.*baselines\.json"):
        delta_m(BASE, loaded, TASKS)

    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"baselines\.json"):
        load_baselines(path)
    path.write_text(json.dumps({"semseg": {"miou": "high"}}))
    with pytest.raises(ValueError, match=r"baselines\.json.*'miou'"):
        load_baselines(path)
    with pytest.raises(ValueError, match=r"missing\.json"):
        load_baselines(tmp_path / "missing.json")


def test_save_baselines_merges_atomically(tmp_path):
    path = tmp_path / "out" / "baselines.json"
    save_baselines(path, {"semseg": BASE["semseg"]})
    save_baselines(path, {"depth": {"rmse": 3.0, "abs_rel": 0.1}})
    save_baselines(path, {"depth": BASE["depth"]})  # a task is replaced as a whole
    assert load_baselines(path, tasks=TASKS, variant="all") == BASE
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    with pytest.raises(ValueError, match=rf"^baselines to save to baselines file {re.escape(str(path))}: "
                                         r"task 'depth' metric 'rmse' must be a finite number, got nan$"):
        save_baselines(path, {"depth": {"rmse": math.nan}})
    with pytest.raises(ValueError, match=r"^baselines to save to baselines\.save_to=b\.json: task 'depth'"):
        save_baselines(path, {"depth": {"rmse": math.nan}}, target="baselines.save_to=b.json")
    assert load_baselines(path) == BASE  # a rejected save leaves the file untouched


def test_a_zero_baseline_is_refused_when_the_file_is_read(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"semseg": {"miou": 0.0, "pixel_acc": 0.5}}))
    with pytest.raises(ValueError, match=r"baseline of task 'semseg' metric 'miou' is 0 .*retrain that baseline") as e:
        load_baselines(path, tasks=[create_task("semseg")])
    assert "variant" not in str(e.value)  # miou is the primary metric: no variant leaves it out
    path.write_text(json.dumps({"semseg": {"miou": 0.5, "pixel_acc": 0.0}}))
    with pytest.raises(ValueError, match=r"metric 'pixel_acc' is 0 .*or use a Δm variant without 'pixel_acc'"):
        load_baselines(path, tasks=[create_task("semseg")], variant="all")


def test_a_negative_baseline_is_refused_it_would_flip_the_sign_of_its_term(tmp_path):
    """(−1)^l (M − M_b) / M_b with M_b = −3 and M = 4 (rmse, worse) would read +233 %, an improvement."""
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"depth": {"rmse": -3.0, "abs_rel": 0.1}}))
    with pytest.raises(ValueError, match=r"metric 'rmse' is -3 .*needs a positive baseline"):
        load_baselines(path, tasks=[create_task("depth")])
    with pytest.raises(ValueError, match=r"metric 'rmse' is -3.0.*needs a positive baseline"):
        delta_m({"depth": {"rmse": 4.0, "abs_rel": 0.1}}, {"depth": {"rmse": -3.0, "abs_rel": 0.1}}, [create_task("depth")])


def test_a_non_finite_metric_is_named_not_averaged_into_nan():
    tasks = [create_task("depth")]
    with pytest.raises(ValueError, match=r"task 'depth' metric 'rmse' is nan in the metrics"):
        delta_m({"depth": {"rmse": math.nan, "abs_rel": 0.1}}, {"depth": {"rmse": 1.0, "abs_rel": 0.1}}, tasks)
