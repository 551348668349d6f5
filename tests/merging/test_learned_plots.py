"""Learned-merge plots say what they show: rows in the model's order, titles inside the figure, true labels."""
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from merging.learned.plots import coefficients_figure, learning_curves_figure, model_order

MODEL_KEYS = ["backbone.stem.weight", "backbone.stem.bias", "backbone.layer1.0.weight", "backbone.layer1.0.bias",
              "backbone.layer10.weight", "heads.a.weight"]
STORED = sorted(MODEL_KEYS[:5])  # a safetensors file lists its keys alphabetically
LONG_RUN = "2026-12-01_12-00-00_a_rather_long_run_folder_name_given_by_the_user_for_this_merge"


def test_rows_follow_the_model_not_the_files():
    assert [STORED[i] for i in model_order(STORED, MODEL_KEYS)] == MODEL_KEYS[:5]
    modules = ["backbone.layer10", "backbone.layer1.0", "backbone.stem"]  # aTLAS blocks="module": first tensor's place
    assert [modules[i] for i in model_order(modules, MODEL_KEYS)] == ["backbone.stem", "backbone.layer1.0",
                                                                      "backbone.layer10"]
    assert model_order(["encoder", *STORED], MODEL_KEYS) is None  # a named block has no place in the model


def test_heatmap_rows_and_label():
    coef = torch.arange(10.0).reshape(5, 2)  # row i of the stored order holds 2i, 2i + 1
    fig = coefficients_figure(coef, STORED, ["a", "b"], model_keys=MODEL_KEYS)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == MODEL_KEYS[:5]
    shown = ax.images[0].get_array()
    for r, k in enumerate(MODEL_KEYS[:5]):
        assert list(shown[r]) == [2.0 * STORED.index(k), 2.0 * STORED.index(k) + 1]
    assert ax.get_ylabel() == "tensor / block, in the model's order"
    plain = coefficients_figure(coef, STORED, ["a", "b"])
    assert plain.axes[0].get_ylabel() == "tensor / block, in the inputs' key order"
    assert [t.get_text() for t in plain.axes[0].get_yticklabels()] == STORED


def _inside(fig, text):
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    box = text.get_window_extent(renderer)
    return box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_long_titles_stay_inside_the_figure():
    title = f"concrete_adamerging (layer)\n{LONG_RUN}"
    rows = [f"backbone.layer{i}.conv.weight" for i in range(30)]
    for coef in (torch.rand(30, 2), torch.rand(2)):
        fig = coefficients_figure(coef, rows if coef.dim() == 2 else ["all"], ["regression", "semseg"], title=title)
        assert _inside(fig, fig._suptitle)
    history = [{"step": s, "objective": 1.0 / s, "per_task": {"semseg": 1.0 / s}} for s in range(1, 4)]
    fig = learning_curves_figure(history, title=title)
    assert _inside(fig, fig._suptitle)


def test_validation_panel_is_labelled_as_the_normalized_score():
    history = [{"step": s, "objective": 1.0 / s, "per_task": {"semseg": 1.0 / s}, "val_normalized": 0.9}
               for s in range(1, 4)]
    label = learning_curves_figure(history).axes[1].get_ylabel()
    assert "normalized" in label and "accuracy" not in label
