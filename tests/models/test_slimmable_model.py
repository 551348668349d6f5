"""Slimmable layers and the slimmable family against plain networks holding the same (sliced) weights."""
import json

import pytest
import torch
import torch.nn.functional as F

import mtl
from mtl.io import ModelFolderError
from mtl.models import MultiTaskModel, create_model
from mtl.models.slimmable import SlimConv2d, SlimLinear, SwitchableBatchNorm2d
from mtl.models.slimmable.layers import SLIM_TYPES

TASKS = ["semseg", "depth", "classification"]
BB = {"name": "slim_resnet", "stem": 8, "channels": [8, 16, 16], "depths": [1, 2, 1], "out_indices": [1, 2, 3]}
DEC = {"name": "slimmable", "channels": 12}


def slim_model(seed=0):
    torch.manual_seed(seed)
    m = create_model(TASKS, backbone=BB, decoder=DEC, family="slimmable")
    # non-trivial BN statistics and affine parameters in every row
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, SwitchableBatchNorm2d):
                mod.running_means.normal_(0, 0.1)
                mod.running_vars.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m.eval()


def c(full, w):
    return max(1, int(full * w + 0.5))


def plain_twin(slim, enc, dec_widths):
    """A plain MultiTaskModel of the same topology at the given widths, filled by leading slices (test's own)."""
    bb = {**BB, "widths": None, "stem": c(8, enc), "channels": [c(8, enc), c(16, enc), c(16, enc)]}
    dec = {"name": "slimmable", "widths": None, "channels": c(12, enc),
           "head_channels": {t: c(12, w) for t, w in dec_widths.items()}}
    plain = create_model(TASKS, backbone=bb, decoder=dec)
    src = slim.state_dict()
    ws = list(slim.width_set)
    state = {}
    for key, target in plain.state_dict().items():
        if key.endswith("running_mean") or key.endswith("running_var"):
            rows = src[key + "s"]
            if key.startswith(("backbone.", "decoder.neck.")):
                v = rows[ws.index(enc)]
            else:  # a head's norm: one row per (encoder width, its decoder width)
                v = rows[ws.index(enc) * len(ws) + ws.index(dec_widths[key.split(".")[2]])]
        else:
            v = src[key]
        state[key] = v[tuple(slice(0, s) for s in target.shape)].clone()
    plain.load_state_dict(state)
    return plain.eval()


X = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)


def test_full_width_equals_plain_network_with_the_same_weights():
    slim = slim_model()
    plain = plain_twin(slim, 1.0, {t: 1.0 for t in TASKS})
    a, b = slim(X), plain(X)
    for t in TASKS:
        torch.testing.assert_close(a[t], b[t], rtol=0, atol=1e-5)


@pytest.mark.parametrize("enc,dec", [(0.5, {"semseg": 0.25, "depth": 1.0, "classification": 0.75}),
                                     (0.25, {"semseg": 0.25, "depth": 0.25, "classification": 0.25})])
def test_width_w_equals_plain_network_holding_the_sliced_weights(enc, dec):
    slim = slim_model()
    slim.set_widths(encoder=enc, decoders=dec)
    plain = plain_twin(slim, enc, dec)
    a, b = slim(X), plain(X)
    for t in TASKS:
        torch.testing.assert_close(a[t], b[t], rtol=0, atol=1e-5)


def test_slim_conv_and_linear_use_the_leading_slices():
    torch.manual_seed(0)
    conv = SlimConv2d(8, 6, 3, padding=1, in_key="a", out_key="b")
    conv.in_width, conv.out_width = 0.5, 0.5
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight[:3, :4], conv.bias[:3], padding=1))
    lin = SlimLinear(8, 4, in_key="a")  # output side fixed
    lin.in_width = 0.25
    x = torch.randn(3, 2)
    torch.testing.assert_close(lin(x), x @ lin.weight[:, :2].T + lin.bias)


def test_switchable_bn_keeps_separate_statistics_per_width():
    bn = SwitchableBatchNorm2d(4, widths=[0.5, 1.0], key="g", momentum=0.5)
    bn.train()
    x = torch.randn(8, 2, 3, 3) * 3 + 2
    bn.width = 0.5
    bn(x)
    batch_mean = x.mean(dim=(0, 2, 3))
    batch_var = x.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(bn.running_means[0, :2], 0.5 * batch_mean)
    torch.testing.assert_close(bn.running_vars[0, :2], 0.5 * 1 + 0.5 * batch_var)
    # the full width's row (and the unused channels) are untouched
    assert torch.equal(bn.running_means[1], torch.zeros(4)) and torch.equal(bn.running_vars[1], torch.ones(4))
    assert torch.equal(bn.running_means[0, 2:], torch.zeros(2))
    # eval at each width normalises with its own row
    bn.eval()
    y = bn(x)
    expect = (x - bn.running_means[0, :2].view(1, -1, 1, 1)) / torch.sqrt(bn.running_vars[0, :2].view(1, -1, 1, 1) + bn.eps)
    torch.testing.assert_close(y, expect * bn.weight[:2].view(1, -1, 1, 1) + bn.bias[:2].view(1, -1, 1, 1))


def test_calibrated_width_gets_its_own_statistics_from_the_batches():
    slim = slim_model()
    before = {k: v.clone() for k, v in slim.state_dict().items()}
    batch = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    assert slim.calibrate_widths([0.6], [batch]) == [0.25, 0.5, 0.6, 0.75, 1.0]
    assert slim.meta["calibrated_widths"] == {"0.6": {"batches": 1}}  # recorded for the folders saved from it
    stem_conv, stem_bn = slim.backbone.stem[0], slim.backbone.stem[1]
    k = 2
    ch = c(8, 0.6)
    pre = F.conv2d(slim.normalize(batch), stem_conv.weight[:ch], None, 2, 1)  # the stem's input to BN at 0.6
    torch.testing.assert_close(stem_bn.running_means[k, :ch], pre.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stem_bn.running_vars[k, :ch], pre.var(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    # the rows of the old widths are untouched, the model stays in eval mode at its old widths
    assert torch.equal(stem_bn.running_means[[0, 1, 3, 4]], before["backbone.stem.1.running_means"])
    assert not slim.training and slim.widths["encoder"] == 1.0
    slim.set_widths(encoder=0.6, decoders=0.6)
    out = slim(X)
    assert out["depth"].shape == (2, 1, 32, 32)
    assert slim.config["backbone"]["widths"] == [0.25, 0.5, 0.6, 0.75, 1.0]


def test_calibrated_head_rows_see_the_features_the_encoder_gives_at_run_time():
    """A head row of a new (encoder, head) pair is estimated with the encoder already on its new stored
    statistics, not on batch statistics of the same pass: recomputed with the model in eval, it matches."""
    slim = slim_model()
    batches = [torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
               for i in range(3)]
    slim.calibrate_widths([0.6], batches)
    heads = [m for m in slim.decoder.modules() if isinstance(m, SwitchableBatchNorm2d) and m.cond_key]
    assert heads
    for dec in (0.25, 0.6, 1.0):
        slim.set_widths(encoder=0.6, decoders=dec)
        seen = {id(bn): [] for bn in heads}
        hooks = [bn.register_forward_pre_hook(lambda mod, args: seen[id(mod)].append(args[0].mean(dim=(0, 2, 3))))
                 for bn in heads]
        with torch.no_grad():
            for b in batches:
                slim(b)
        for h in hooks:
            h.remove()
        for bn in heads:
            ch = seen[id(bn)][0].numel()
            want = torch.stack(seen[id(bn)]).mean(0)  # equal batch sizes: the cumulative average of batch means
            torch.testing.assert_close(bn.running_means[bn.row(), :ch], want, atol=1e-5, rtol=1e-4)


def test_head_norm_keeps_statistics_per_encoder_and_decoder_width():
    """A head's first norm reads features of the encoder's width: (enc 1.0, dec 0.25) and (enc 0.25,
    dec 0.25) see different distributions, so each pair has its own row (row = i_enc * k + i_dec)."""
    bn = SwitchableBatchNorm2d(4, widths=[0.5, 1.0], key="d", cond_key="e", momentum=1.0)
    assert bn.running_means.shape == (4, 4)
    bn.train()
    x_small, x_big = torch.randn(8, 2, 3, 3) + 5, torch.randn(8, 2, 3, 3) - 7
    bn.width, bn.cond_width = 0.5, 0.5
    bn(x_small)
    bn.cond_width = 1.0
    bn(x_big)
    torch.testing.assert_close(bn.running_means[0 * 2 + 0, :2], x_small.mean(dim=(0, 2, 3)))  # (0.5, 0.5)
    torch.testing.assert_close(bn.running_means[1 * 2 + 0, :2], x_big.mean(dim=(0, 2, 3)))    # (1.0, 0.5)
    assert torch.equal(bn.running_means[[1, 3]], torch.zeros(2, 4))  # decoder width 1.0: untouched


def test_model_heads_use_the_row_of_the_encoder_width_pair():
    slim = slim_model().train()
    head_bn = slim.decoder.heads["depth"].body[1]
    before = head_bn.running_means.clone()
    slim.set_widths(encoder=1.0, decoders={"depth": 0.25})
    slim(X)
    ws = list(slim.width_set)
    changed = (head_bn.running_means != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [ws.index(1.0) * len(ws) + ws.index(0.25)]


def test_folder_written_with_one_row_per_decoder_width_still_loads(tmp_path):
    """Folders from before per-pair statistics: each decoder width's row serves every encoder width."""
    slim = slim_model()
    state = slim.state_dict()
    k = len(slim.width_set)
    old = {key: (v[:k].clone() if key.startswith("decoder.heads.") and key.endswith(("running_means", "running_vars")) else v)
           for key, v in state.items()}
    again = create_model(TASKS, backbone=BB, decoder=DEC, family="slimmable")
    again.load_state_dict(old)
    bn = again.decoder.heads["depth"].body[1]
    for j in range(k):
        assert torch.equal(bn.running_means[j * k:(j + 1) * k], old["decoder.heads.depth.body.1.running_means"])


def test_failed_calibration_leaves_the_model_as_it_was():
    slim = slim_model()
    before = {k: v.clone() for k, v in slim.state_dict().items()}
    good = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"^slimmable: input must be \(B, 3, H, W\), got \(2, 5, 32, 32\)$"):
        slim.calibrate_widths([0.6], [good, torch.zeros(2, 5, 32, 32)])  # 5 channels: the second batch fails
    assert slim.width_set == (0.25, 0.5, 0.75, 1.0) and slim.config["backbone"]["widths"] == [0.25, 0.5, 0.75, 1.0]
    after = slim.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="0.6"):
        slim.set_widths(encoder=0.6)


def test_calibrating_on_one_image_whose_map_is_1x1_names_the_width_layer_and_batch_size():
    # BN's variance needs ≥ 2 values per channel: one 8x8 image leaves stage 1 a 1x1 map
    slim = slim_model()
    before = {k: v.clone() for k, v in slim.state_dict().items()}
    one = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"calibrate_widths: width\(s\) \[0\.6\] \(encoder 0\.6, .*\): layer "
                                         r"backbone\.stages\.1\.0\.bn1 gets input \(1, 10, 1, 1\) from a batch of 1 "
                                         r"image\(s\); BN statistics need more than one value per channel"):
        slim.calibrate_widths([0.6], [one])
    assert slim.width_set == (0.25, 0.5, 0.75, 1.0)
    assert all(torch.equal(before[k], v) for k, v in slim.state_dict().items())
    assert slim.calibrate_widths([0.6], [torch.cat([one, one.flip(-1)])])[2] == 0.6  # two images: fine


def test_extract_cli_names_calib_batch_size_when_one_image_per_batch_cannot_calibrate(tmp_path):
    from mtl.cli.extract import run_extract
    from mtl.cli.in_process import compose_in_process
    from mtl.io import save_model

    data = {"name": "scenes", "size": 16, "n_train": 8, "n_val": 4, "n_test": 4, "batch_size": 4}
    save_model(slim_model(), tmp_path / "slim", meta={"data": data})
    cfg, run_dir = compose_in_process("mtl.configs.extract_app", "extract", [
        f"model={tmp_path / 'slim'}", "widths={encoder: 0.6}", "calib.data={batch_size: 1}", "calib.batches=2"],
        tmp_path / "run")
    with pytest.raises(ValueError, match=r"width\(s\) \[0\.6\].*layer backbone\.stages\.\S+ gets input \(1, \d+, 1, 1\).*"
                                         r"\(calib\.data\.batch_size=1; set it to 2 or more\)$"):
        run_extract(cfg, run_dir)


def test_calibrating_a_width_estimates_each_head_pair_with_the_trained_encoder():
    """Row (enc 1.0, dec 0.6) of a head's norm: statistics of that head's first conv on the features
    the full-width encoder computes with its stored statistics (the encoder is not recalibrated)."""
    slim = slim_model()
    batch = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    slim.calibrate_widths([0.6], [batch])
    ws = list(slim.width_set)
    with torch.no_grad():
        slim.set_widths(encoder=1.0, decoders=1.0)
        z = slim.shared(batch).detach()
        conv = slim.decoder.heads["depth"].body[0]
        pre = F.conv2d(z, conv.weight[:c(12, 0.6)], None, 1, 1)
    row = slim.decoder.heads["depth"].body[1].running_means[ws.index(1.0) * len(ws) + ws.index(0.6), :c(12, 0.6)]
    torch.testing.assert_close(row, pre.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)


def test_folder_round_trip_identical_at_every_width(tmp_path):
    slim = slim_model()
    mtl.save_model(slim, tmp_path / "m")
    again = mtl.load_model(tmp_path / "m")
    assert again.config["family"] == "slimmable"
    for w in slim.width_set:
        for m in (slim, again):
            m.set_widths(encoder=w, decoders=w)
        a, b = slim(X), again(X)
        for t in TASKS:
            assert torch.equal(a[t], b[t]), (w, t)


def test_folder_keeps_the_active_widths(tmp_path):
    """save_model after set_widths once reloaded a full-width model silently."""
    slim = slim_model()
    widths = {"encoder": 0.5, "decoders": {"semseg": 1.0, "depth": 0.25, "classification": 0.5}}
    slim.set_config(widths)
    again = mtl.load_model(mtl.save_model(slim, tmp_path / "m"))
    assert again.widths == widths
    a, b = slim(X), again(X)
    assert all(torch.equal(a[t], b[t]) for t in TASKS)
    with slim.at_widths(slim.max_widths()):
        assert not torch.equal(slim(X)["depth"], b["depth"])  # the widths matter for this input
    # full widths are not written, so folders from before this key load (and save) unchanged
    slim.set_config(slim.max_widths())
    assert "active_widths" not in slim.config
    assert mtl.load_model(mtl.save_model(slim, tmp_path / "full")).widths == slim.max_widths()


def test_export_records_the_active_widths(tmp_path):
    pytest.importorskip("onnxruntime")
    slim = slim_model()
    widths = {"encoder": 0.5, "decoders": {"semseg": 0.25, "depth": 0.25, "classification": 0.25}}
    slim.set_config(widths)
    folder = mtl.save_model(slim, tmp_path / "m", meta={"test": {"depth": {"rmse": 1.5}}})
    out = mtl.export(folder, "onnx", tmp_path / "onnx", exporter="torchscript", input_size=32)
    assert mtl.exporters.read_report(out)["widths"] == widths
    card = (out / "README.md").read_text()
    assert f"widths {json.dumps(widths)}" in card and "| depth | rmse |" not in card


def test_saving_at_chosen_widths_leaves_out_the_full_width_test_metrics(tmp_path, caplog):
    slim = slim_model()
    slim.meta = {"test": {"depth": {"rmse": 1.5}}, "seed": 3}  # as load_model sets it from a training run's folder
    slim.set_widths(encoder=0.5)
    with caplog.at_level("WARNING", logger="mtl.io"):
        mtl.save_model(slim, tmp_path / "half")
    assert json.loads((tmp_path / "half" / "config.json").read_text())["meta"] == {"seed": 3}
    assert "meta.test left out" in caplog.text
    explicit = {"test": {"depth": {"rmse": 2.0}}}  # measured at these widths by the caller: kept
    mtl.save_model(slim, tmp_path / "given", meta=explicit)
    assert json.loads((tmp_path / "given" / "config.json").read_text())["meta"] == explicit
    slim.set_config(slim.max_widths())
    mtl.save_model(slim, tmp_path / "full")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["meta"]["test"] == {"depth": {"rmse": 1.5}}


def test_card_points_to_the_runs_width_table_only_for_widths_it_holds(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "width_table_test.json").write_text(json.dumps({"width_set": [0.25, 0.5, 0.75, 1.0]}))
    slim = slim_model()
    slim.set_widths(encoder=0.5, decoders=0.25)
    mtl.save_model(slim, run / "model")
    card = (mtl.export(run / "model", "folder", tmp_path / "a") / "README.md").read_text()
    assert f"see its run's `{run / 'width_table_test.json'}` for this configuration" in card
    slim.calibrate_widths([0.6], [torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)])
    slim.set_widths(encoder=0.6)
    mtl.save_model(slim, run / "model")
    card = (mtl.export(run / "model", "folder", tmp_path / "b") / "README.md").read_text()
    assert f"`{run / 'width_table_test.json'}` has no entry for width(s) [0.6]" in card
    assert "for this configuration" not in card


def test_extraction_round_trips_and_is_physically_smaller(tmp_path):
    slim = slim_model()
    widths = {"encoder": 0.5, "decoders": {"semseg": 1.0, "depth": 0.25, "classification": 0.5}}
    sub = mtl.extract(slim, out=tmp_path / "sub", widths=widths)
    assert isinstance(sub, MultiTaskModel) and sub.config["family"] == "multitask"
    assert not any(isinstance(m, SLIM_TYPES) for m in sub.modules())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(sub) < 0.5 * n(slim)
    assert slim.widths["encoder"] == 1.0  # the parent keeps its configuration
    reloaded = mtl.load_model(tmp_path / "sub")
    with slim.at_widths(widths):
        ref = slim(X)
    for model in (sub.eval(), reloaded):
        out = model(X)
        for t in TASKS:
            torch.testing.assert_close(out[t], ref[t], rtol=0, atol=1e-5)


def test_extracted_folder_records_every_calibrated_width_it_uses(tmp_path):
    """A width that does not print exactly in 6 significant digits (its record's key) was dropped: the
    key was matched by float(key) == width."""
    slim = slim_model()
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    slim.calibrate_widths([0.6, 0.1234567, 1 / 3], [batch])
    widths = {"encoder": 0.1234567, "decoders": {"semseg": 0.6, "depth": 1 / 3, "classification": 1.0}}
    mtl.extract(slim, out=tmp_path / "sub", widths=widths)
    recorded = mtl.load_model(tmp_path / "sub").meta["extract"]["calibrated_widths"]
    assert recorded == {"0.6": {"batches": 1}, "0.123457": {"batches": 1}, "0.333333": {"batches": 1}}
    mtl.extract(slim, out=tmp_path / "sub2", widths={"encoder": 1 / 3, "decoders": 1.0})  # only the ones it uses
    assert mtl.load_model(tmp_path / "sub2").meta["extract"]["calibrated_widths"] == {"0.333333": {"batches": 1}}


def test_extracted_folder_keeps_the_training_data_and_seed(tmp_path):
    """Extracted folders once dropped meta.data: mtl-export traced them at 224 px, mtl-prune refused them."""
    pytest.importorskip("onnxruntime")
    slim = slim_model()
    slim.meta = {"data": {"name": "scenes", "size": 40}, "seed": 3, "run_dir": "/runs/r", "test": {"depth": {"rmse": 1.0}}}
    folder = tmp_path / "sub"
    mtl.extract(slim, out=folder, widths={"encoder": 0.5, "decoders": 0.25})
    meta = mtl.load_model(folder).meta
    assert meta["data"] == {"name": "scenes", "size": 40} and meta["seed"] == 3 and meta["extracted_from"] == "/runs/r"
    assert "test" not in meta
    assert "run_dir" not in meta  # no extracting run was named
    out = mtl.export(folder, "onnx", tmp_path / "onnx", exporter="torchscript", verify_batches=[1])
    assert mtl.exporters.read_report(out)["input"]["shape"] == ["batch", 3, 40, 40]
    # the run that extracted it (mtl-extract passes its run folder) is what the model card names
    mtl.extract(slim, out=tmp_path / "sub2", run_dir="/runs/extract", widths={"encoder": 0.5})
    assert mtl.load_model(tmp_path / "sub2").meta["run_dir"] == "/runs/extract"
    card = (mtl.export(tmp_path / "sub2", "folder", tmp_path / "card") / "README.md").read_text()
    assert "Made by `mtl-extract` in `/runs/extract`" in card
    # without a recorded size (and no img_size) the export asks for one instead of guessing 224
    bare = mtl.save_model(mtl.load_model(folder), tmp_path / "bare", meta={})
    with pytest.raises(ValueError, match=r"bare/config.json records no training image size .* format.input_size="):
        mtl.export(bare, "onnx", tmp_path / "onnx2", exporter="torchscript")
    assert not (tmp_path / "onnx2").exists()


def test_extract_names_what_a_family_extracts_by():
    with pytest.raises(TypeError, match=r"model family 'slimmable' extracts with \(widths=\); got \(task=, calib=\)"):
        mtl.extract(slim_model(), task="depth", calib=[X])


def test_extract_cli_cuts_a_width_setting(tmp_path):
    from mtl.cli.extract import run_extract
    from mtl.cli.in_process import compose_in_process
    from mtl.io import save_model

    save_model(slim_model(), tmp_path / "slim", meta={"data": {"name": "scenes", "size": 16, "n_train": 8, "n_val": 4,
                                                             "n_test": 4, "batch_size": 4}})
    cfg, run_dir = compose_in_process("mtl.configs.extract_app", "extract", [
        f"model={tmp_path / 'slim'}", "widths={encoder: 0.5, decoders: {depth: 0.25}}"], tmp_path / "run")
    report = run_extract(cfg, run_dir)
    sub = mtl.load_model(run_dir / "model")
    slim = slim_model()
    with slim.at_widths({"encoder": 0.5, "decoders": {"depth": 0.25}}):
        ref = slim(X)
    torch.testing.assert_close(sub(X)["depth"], ref["depth"], rtol=0, atol=1e-5)
    assert report["extracted"]["flops_all_tasks"] < report["parent"]["flops_all_tasks"]
    full = {"encoder": 0.5, "decoders": {t: 0.25 if t == "depth" else 1.0 for t in slim.tasks}}
    assert sub.meta["extract"] == {"widths": full, "requested_widths": {"encoder": 0.5, "decoders": {"depth": 0.25}}}
    assert report["widths"] == full and report["model"] == str((tmp_path / "slim").resolve())
    # a parent saved at narrow widths is still reported at its widest configuration
    narrow = slim_model()
    narrow.set_widths(encoder=0.25, decoders=0.25)
    save_model(narrow, tmp_path / "narrow", meta={"data": {"name": "scenes", "size": 16, "n_train": 8, "n_val": 4,
                                                           "n_test": 4, "batch_size": 4}})
    cfg, run_dir = compose_in_process("mtl.configs.extract_app", "extract", [
        f"model={tmp_path / 'narrow'}", "widths={encoder: 0.5, decoders: {depth: 0.25}}"], tmp_path / "run2")
    again = run_extract(cfg, run_dir)
    assert again["parent"] == report["parent"] and again["parent_widths"].startswith("the widest configuration")


def test_extraction_records_the_widths_it_used_not_only_those_asked_for(tmp_path):
    """Unnamed widths come from the parent's current configuration; the record must say which they were."""
    from mtl.cli.in_process import compose_in_process
    from mtl.cli.extract import run_extract
    from mtl.io import save_model

    slim = slim_model()
    slim.set_widths(decoders={"depth": 0.25})
    sub = mtl.extract(slim, out=tmp_path / "py", widths={"encoder": 0.5})
    expect = {"encoder": 0.5, "decoders": {t: 0.25 if t == "depth" else 1.0 for t in slim.tasks}}
    assert mtl.load_model(tmp_path / "py").meta["extract"]["widths"] == expect
    assert sub.extraction_report["widths"] == expect
    # the CLI on a folder saved without a data config: calib.data gives the size, and the output keeps it
    save_model(slim, tmp_path / "bare")
    cfg, run_dir = compose_in_process("mtl.configs.extract_app", "extract", [
        f"model={tmp_path / 'bare'}", "widths={encoder: 1.0}", "calib.data={name: scenes, size: 16, n_train: 8, "
        "n_val: 4, n_test: 4, batch_size: 4}"], tmp_path / "run")
    report = run_extract(cfg, run_dir)
    expect["encoder"] = 1.0
    assert report["widths"] == expect and report["requested_widths"] == {"encoder": 1.0}
    meta = mtl.load_model(run_dir / "model").meta
    assert meta["extract"]["widths"] == expect and meta["data"]["size"] == 16
    assert mtl.load_model(tmp_path / "bare").meta == {}  # the input folder is untouched
    # without calib.data the error says what the data is for
    cfg, run_dir = compose_in_process("mtl.configs.extract_app", "extract", [
        f"model={tmp_path / 'bare'}", "widths={encoder: 1.0}"], tmp_path / "run2")
    with pytest.raises(ValueError, match=r"widths= \(one image to count FLOPs at\): the model folder's meta has no data"):
        run_extract(cfg, run_dir)


def test_extract_cli_without_tasks_or_widths_names_both(tmp_path):
    from mtl.cli.in_process import compose_in_process
    from mtl.cli.extract import run_extract

    cfg, run_dir = compose_in_process("mtl.configs.extract_app", "extract", [f"model={tmp_path / 'm'}"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"tasks=<name> \(a task-routed MoE model\) or 'widths=\{encoder"):
        run_extract(cfg, run_dir)


def test_extract_cli_names_a_width_that_is_not_a_mapping(tmp_path):
    from mtl.cli.in_process import compose_in_process
    from mtl.cli.extract import run_extract
    from mtl.io import save_model

    save_model(slim_model(), tmp_path / "slim")
    cfg, run_dir = compose_in_process("mtl.configs.extract_app", "extract", [f"model={tmp_path / 'slim'}", "widths=0.5"],
                                      tmp_path / "run")
    with pytest.raises(ValueError, match=r"widths must be a mapping like 'widths=\{encoder: 0.5, .*got 0.5"):
        run_extract(cfg, run_dir)


@pytest.mark.parametrize("kwargs,match", [
    ({"encoder": 0.3}, r"encoder width 0\.3 is not in this model's width set \[0\.25, 0\.5, 0\.75, 1\.0\]"),
    ({"encoder": 1.5}, r"encoder width must be in \(0, 1\], got 1\.5"),
    ({"encoder": 0}, r"must be in \(0, 1\], got 0"),
    ({"decoders": {"depth": -0.5}}, r"decoder width of task 'depth' must be in \(0, 1\], got -0\.5"),
    ({"encoder": True}, r"encoder width must be a number in \(0, 1\], got True"),
    ({"encoder": "0.5"}, r"encoder width must be a number in \(0, 1\], got '0.5'"),
])
def test_bad_widths_are_refused_naming_the_value(kwargs, match):
    slim = slim_model()
    with pytest.raises(ValueError, match=match):
        slim.set_widths(**kwargs)
    assert slim.widths["encoder"] == 1.0


def test_unknown_task_is_refused():
    slim = slim_model()
    with pytest.raises(KeyError, match="unknown task.*'bogus'"):
        slim.set_widths(decoders={"bogus": 0.5})
    with pytest.raises(KeyError, match="'bogus'"):
        mtl.extract(slim, widths={"encoder": 0.5, "decoders": {"bogus": 0.5}})


def test_family_needs_slimmable_parts():
    with pytest.raises(ValueError, match="slim_resnet"):
        create_model(TASKS, backbone={"name": "test_resnet", "out_indices": [1, 2, 3]}, decoder=DEC, family="slimmable")
    with pytest.raises(ValueError, match="same width set"):
        create_model(TASKS, backbone=BB, decoder={**DEC, "widths": [0.5, 1.0]}, family="slimmable")


def test_slimmable_parts_with_a_width_set_need_the_slimmable_family():
    with pytest.raises(ValueError, match=r"backbone=slim_resnet decoder=slimmable with a width set needs family=slimmable "
                                         r"\(got family=multitask\)"):
        create_model(TASKS, backbone={**BB, "widths": [0.5, 1.0]}, decoder={**DEC, "widths": [0.5, 1.0]})
    with pytest.raises(ValueError, match=r"^decoder=slimmable with a width set"):
        create_model(TASKS, backbone="test_resnet", decoder={**DEC, "widths": [0.5, 1.0]})
    with pytest.raises(ValueError, match=r"^backbone=slim_resnet with a width set"):  # left out: the default set
        create_model(TASKS, backbone={k: v for k, v in BB.items() if k != "widths"}, decoder="hps")
    plain = create_model(TASKS, backbone={**BB, "widths": None}, decoder={**DEC, "widths": None})  # one width: plain layers
    assert isinstance(plain, MultiTaskModel)


def test_the_decoder_takes_the_backbones_width_set_when_it_names_none():
    """In Python the decoder's default set [0.25, 0.5, 0.75, 1] was refused against a backbone's other set:
    the one set had to be given twice (the CLI reads ${backbone.widths})."""
    model = create_model(TASKS, backbone={**BB, "widths": [0.5, 1.0]}, decoder={k: v for k, v in DEC.items()
                                                                               if k != "widths"}, family="slimmable")
    assert model.decoder.widths == model.backbone.widths == (0.5, 1.0)
    assert model.config["decoder"]["widths"] == [0.5, 1.0]


def test_model_stats_gives_the_parameters_of_the_active_widths_beside_every_stored_one():
    """params counted every stored weight while the FLOPs were the active widths': the mix misled."""
    model = slim_model()
    model.set_widths(encoder=0.5, decoders=0.5)
    stats = mtl.model_stats(model, torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8))
    sub = mtl.extract(model)
    assert stats["params_active"] == sum(p.numel() for p in sub.parameters()) < stats["params"]


def test_extract_cli_names_the_other_familys_setting_in_cli_terms(tmp_path):
    """widths= on a task-routed MoE model (or tasks= on a slimmable one) was refused in Python argument names."""
    from mtl.cli.in_process import compose_in_process
    from mtl.cli.extract import run_extract
    from mtl.io import save_model

    moe = create_model(["depth", "semseg"], backbone={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                                      "num_heads": 2, "mlp_ratio": 2.0},
                       decoder={"num_experts": 4, "top_k": 2}, family="task_moe_vit")
    save_model(moe, tmp_path / "moe")
    save_model(slim_model(), tmp_path / "slim")
    for folder, arg, want in [("moe", "widths={encoder: 0.5}", r"widths= extracts from slimmable models; this "
                               r"'task_moe_vit' model extracts a task's sub-network: pass tasks=<name>"),
                              ("slim", "tasks=depth", r"tasks= extracts from task-routed MoE models; this 'slimmable' "
                               r"model extracts a width configuration: pass 'widths=")]:
        cfg, run_dir = compose_in_process("mtl.configs.extract_app", "extract", [f"model={tmp_path / folder}", arg],
                                          tmp_path / f"run_{folder}")
        with pytest.raises(ValueError, match=want):
            run_extract(cfg, run_dir)


@pytest.mark.parametrize("args, match", [
    (["widths={encoder: 1.5}"], r"^encoder width must be in \(0, 1\], got 1.5$"),
    (["widths={encoder: 0}"], r"^encoder width must be in \(0, 1\], got 0$"),
    (["widths={encoder: abc}"], r"^encoder width must be a number in \(0, 1\], got 'abc'$"),
    (["widths={decoders: {normals: 0.5}}"], r"unknown task\(s\) \['normals'\] in decoder widths"),
    (["widths={encodr: 0.5}"], r"unknown key\(s\) \['encodr'\] in widths"),
    # outside the set but not apart from its 0.5: was refused by calibrate_widths after the run folder
    (["widths={encoder: 0.5000001}"], r"^widths=: the width set \[0.25, 0.5, 0.75, 1.0\] plus \[0.5000001\]: "
                                      r"entries 0.5 and 0.5000001 cannot be told apart"),
    (["widths={encoder: 0.5}", "calib.split=test"], r"^calib.split must be train or val .*got 'test'$")])
def test_extract_cli_refuses_a_bad_width_or_calib_split_before_its_run_folder(tmp_path, args, match):
    """Refused only after the run folder was made and the calibration data built: a FAILED folder."""
    from mtl.cli.extract import run_extract
    from mtl.cli.in_process import compose_in_process

    mtl.save_model(slim_model(), tmp_path / "slim", meta={"data": {"name": "scenes", "size": 32, "n_train": 8,
                                                                   "n_val": 4, "n_test": 4, "batch_size": 4}})
    cfg, run_dir = compose_in_process("mtl.configs.extract_app", "extract", [f"model={tmp_path / 'slim'}", *args],
                                      tmp_path / "run")
    with pytest.raises((KeyError, ValueError), match=match):
        run_extract(cfg, run_dir)
    assert not run_dir.exists() or not any(run_dir.iterdir())


@pytest.mark.parametrize("widths, match", [
    ("{encoder: 1.5}", r"^encoder width must be in \(0, 1\], got 1.5$"),
    ("{decoders: {depth: abc}}", r"^decoder width of task 'depth' must be a number in \(0, 1\], got 'abc'$"),
    ("{encodr: 0.5}", r"unknown key\(s\) \['encodr'\] in widths")])
def test_extract_smoke_refuses_a_bad_width_before_training(tmp_path, widths, match):
    """debug=smoke trained its whole model first, then refused: a FAILED folder."""
    from mtl.cli.extract import run_extract
    from mtl.cli.in_process import compose_in_process

    cfg, run_dir = compose_in_process("mtl.configs.extract_app", "extract", ["debug=smoke", f"widths={widths}"],
                                      tmp_path / "run")
    with pytest.raises((KeyError, ValueError), match=match):
        run_extract(cfg, run_dir)
    assert not run_dir.exists() or not any(run_dir.iterdir())


def legacy_folder(tmp_path, rows=None):
    """A folder as written before per-pair head statistics: one row per head width (``rows``: another count)."""
    slim = slim_model()
    k = len(slim.width_set)
    for bn in slim.modules():
        if isinstance(bn, SwitchableBatchNorm2d) and bn.cond_key:
            bn.running_means = bn.running_means[: rows or k].clone()
            bn.running_vars = bn.running_vars[: rows or k].clone()
    mtl.save_model(slim, tmp_path / "legacy")
    return slim, tmp_path / "legacy"


def test_folder_written_with_one_row_per_decoder_width_loads_through_load_model(tmp_path):
    old, path = legacy_folder(tmp_path)
    again = mtl.load_model(path)
    k = len(old.width_set)
    for name, bn in again.named_modules():
        if isinstance(bn, SwitchableBatchNorm2d) and bn.cond_key:
            stored = dict(old.named_modules())[name]
            assert bn.running_means.shape == (k * k, bn.num_features)
            for j in range(k):  # every encoder width reads the stored row of its head width
                assert torch.equal(bn.running_means[j * k:(j + 1) * k], stored.running_means)
                assert torch.equal(bn.running_vars[j * k:(j + 1) * k], stored.running_vars)


def test_head_statistics_of_any_other_row_count_are_still_refused(tmp_path):
    _, path = legacy_folder(tmp_path, rows=3)
    with pytest.raises(ModelFolderError, match=r"key 'decoder\.heads\.\w+\.body\.1\.running_means' has shape \(3, 12\)"):
        mtl.load_model(path)


def test_channels_round_half_up_and_keep_at_least_one():
    from mtl.models.slimmable import channels_at

    # floor(C * w + 0.5), at least 1: 10 * 0.25 = 2.5 -> 3 (truncation would give 2), 3 * 0.1 -> 1 (not 0)
    assert [channels_at(10, 0.25), channels_at(3, 0.1), channels_at(12, 0.75), channels_at(7, 0.5)] == [3, 1, 9, 4]


@pytest.mark.parametrize("backbone,decoder,match", [
    ({**BB, "widths": [0.5, 0.2]}, DEC, r"backbone\.widths must contain 1\.0 \(the full network\), got \[0\.2, 0\.5\]"),
    ({**BB, "widths": []}, DEC, r"backbone\.widths is empty"),
    ({**BB, "widths": [0.5, 1.0]}, {**DEC, "widths": [0.5, 0]}, r"decoder\.widths entry must be in \(0, 1\], got 0"),
    # one BN row each, but set_widths (|a - b| < 1e-9) and width-table keys (6 significant digits) see one width
    ({**BB, "widths": [0.5, 0.5000000001, 1.0]}, DEC,
     r"backbone\.widths entries 0\.5 and 0\.5000000001 cannot be told apart \(closer than 1e-09"),
    ({**BB, "widths": [0.5, 0.5000001, 1.0]}, DEC,
     r"backbone\.widths entries 0\.5 and 0\.5000001 cannot be told apart \(width tables write both as '0\.5'\)"),
])
def test_a_bad_width_set_is_refused_naming_its_setting(backbone, decoder, match):
    with pytest.raises(ValueError, match=match):
        create_model(TASKS, backbone=backbone, decoder=decoder, family="slimmable")


def test_init_from_a_folder_of_another_width_set_never_misreads_its_head_statistics(tmp_path):
    from mtl.warm_start import init_from_folder

    # 2 widths store 2 x 2 = 4 per-pair rows, which a 4-width model could take for its older one-row-per-width layout
    two = create_model(TASKS, backbone={**BB, "widths": [0.5, 1.0]}, decoder=DEC, family="slimmable")
    four = slim_model()
    head, theirs = four.decoder.heads["depth"].body[1], two.decoder.heads["depth"].body[1]
    with torch.no_grad():
        theirs.running_means.copy_(torch.rand_like(theirs.running_means) + 2)
    mtl.save_model(two, tmp_path / "two")
    before = head.running_means.clone()
    init_from_folder(four, tmp_path / "two")
    for cond in head.widths:  # not the other set's rows by position: by width pair, where both sets have it
        for w in head.widths:
            shared = {w, cond} <= set(two.width_set)
            want = theirs.running_means[theirs.row(w, cond)] if shared else before[head.row(w, cond)]
            assert torch.equal(head.running_means[head.row(w, cond)], want), (w, cond)
    # the same width set in the older layout is converted, as mtl.load_model converts it
    old, path = legacy_folder(tmp_path)
    fresh = slim_model(seed=1)
    init_from_folder(fresh, path)
    k = len(old.width_set)
    assert torch.equal(fresh.decoder.heads["depth"].body[1].running_means[:k],
                       old.decoder.heads["depth"].body[1].running_means)


def test_extract_cli_calibrates_a_width_outside_the_set_on_calib_batches(tmp_path):
    """mtl-extract at a width outside the width set told users to call model.calibrate_widths, which the CLI cannot:
    it now estimates that width's BN statistics on calib.batches batches of calib.split, as calibrate_widths does
    in Python, and the extracted network equals the parent calibrated on the same batches."""
    from mtl.cli.extract import run_extract
    from mtl.cli.in_process import compose_in_process
    from mtl.data import create_datamodule
    from mtl.data.calibration import calibration_batches
    from mtl.io import save_model

    data = {"name": "scenes", "size": 16, "n_train": 8, "n_val": 4, "n_test": 4, "batch_size": 4}
    save_model(slim_model(), tmp_path / "slim", meta={"data": data})
    widths = {"encoder": 0.6, "decoders": {"depth": 0.6}}
    cfg, run_dir = compose_in_process("mtl.configs.extract_app", "extract", [
        f"model={tmp_path / 'slim'}", "widths={encoder: 0.6, decoders: {depth: 0.6}}", "calib.batches=2"], tmp_path / "run")
    report = run_extract(cfg, run_dir)
    # the report and the shipped folder say so in one shape (keyed by width, as docs/models.md gives it; the
    # report had {"widths": [0.6], "batches": 2, "split": "train"}): its 0.6 BN statistics come from 2 train batches
    assert report["calibrated_widths"] == {"0.6": {"batches": 2, "split": "train"}}
    assert json.loads((run_dir / "extract_report.json").read_text())["calibrated_widths"] == report["calibrated_widths"]
    assert mtl.load_model(run_dir / "model").meta["extract"]["calibrated_widths"] == report["calibrated_widths"]
    parent = mtl.load_model(tmp_path / "slim")
    assert 0.6 not in parent.width_set  # the input folder is untouched
    parent.calibrate_widths([0.6], calibration_batches(create_datamodule(**data), 2, "train"))
    parent.set_widths(**widths)
    sub = mtl.load_model(run_dir / "model").eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        want, got = parent.eval()(x), sub(x)
    for t in parent.tasks:
        assert torch.allclose(got[t], want[t], atol=1e-5), t


@pytest.mark.parametrize("widths,match", [
    ([0.5000001], r"calibrate_widths: the width set \[0\.25, 0\.5, 0\.75, 1\.0\] plus \[0\.5000001\]: entries 0\.5 and "
                  r"0\.5000001 cannot be told apart \(width tables write both as '0\.5'\)"),
    ([0.6, 0.6000000001], r"entries 0\.6 and 0\.6000000001 cannot be told apart \(closer than 1e-09"),
])
def test_calibrating_a_width_indistinguishable_from_another_is_refused(widths, match):
    slim = slim_model()
    with pytest.raises(ValueError, match=match):
        slim.calibrate_widths(widths, [torch.rand(2, 3, 16, 16)])
    assert slim.width_set == (0.25, 0.5, 0.75, 1.0)


def test_calibrating_a_width_already_in_the_set_says_its_trained_statistics_are_kept(caplog):
    slim = slim_model()
    before = {k: v.clone() for k, v in slim.state_dict().items()}
    with caplog.at_level("WARNING", logger="mtl.models.slimmable.family"):
        assert slim.calibrate_widths([0.5], [torch.rand(2, 3, 16, 16)]) == list(slim.width_set)
    assert "calibrate_widths: [0.5] already in the width set" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in slim.state_dict().items())


def test_slim_resnet_negative_out_indices_count_from_the_end_as_timm_features_only():
    from mtl.models import BACKBONES

    kw = {k: v for k, v in BB.items() if k not in ("name", "out_indices")}  # 4 stages: stem + 3
    x = torch.randn(1, 3, 32, 32)
    torch.manual_seed(0)
    neg = BACKBONES.get("slim_resnet")(out_indices=[1, -1], **kw)
    torch.manual_seed(0)
    pos = BACKBONES.get("slim_resnet")(out_indices=[1, 3], **kw)
    assert neg.channels == pos.channels == [8, 16] and neg.reductions == pos.reductions == [4, 16]
    assert all(torch.equal(a, b) for a, b in zip(neg.eval()(x), pos.eval()(x)))
    with pytest.raises(ValueError, match=r"^slim_resnet: backbone.out_indices \[-5\] outside the 4 stages"):
        BACKBONES.get("slim_resnet")(out_indices=[-5], **kw)


def test_calibration_and_the_width_table_keep_every_modules_own_mode():
    """A mixed model (frozen-BN backbone in eval, heads training) stays mixed: both passes restored only the top
    flag (model.train(was)), which flattened every module into one mode."""
    from mtl.models.slimmable.table import build_width_table

    slim = slim_model().train()
    slim.backbone.eval()
    modes = {n: m.training for n, m in slim.named_modules()}
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    slim.calibrate_widths([0.6], [batch])
    assert {n: m.training for n, m in slim.named_modules()} == modes
    labelled = {"image": batch, "semseg": torch.randint(0, slim.tasks["semseg"].num_classes, (4, 32, 32)),
                "depth": torch.rand(4, 1, 32, 32) + 0.1,
                "classification": torch.randint(0, slim.tasks["classification"].num_classes, (4,))}
    build_width_table(slim, [labelled], progress=False)
    assert {n: m.training for n, m in slim.named_modules()} == modes
