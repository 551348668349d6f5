"""Progress reaches non-TTY logs: text lines instead of Rich's live bar."""
import io
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar

from mtl.progress import TextProgressBar, create_progress_bar


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def training_step(self, batch, i):
        loss = self.w(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, i):
        self.log("val/loss", self.w(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(n, 2)), batch_size=2)


def test_text_progress_prints_lines_with_step_rate_and_losses(tmp_path):
    stream = io.StringIO()
    bar = TextProgressBar(every_seconds=0, stream=stream)
    trainer = L.Trainer(max_epochs=2, callbacks=[bar], logger=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path), num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(Tiny(), _loader(8), _loader(4))
    lines = stream.getvalue().splitlines()
    steps = [ln for ln in lines if ln.startswith("[train] epoch") and " step " in ln]
    assert len(steps) == 2 * 4  # every step at every_seconds=0
    assert steps[0].startswith("[train] epoch 1/2 step 1/4 (25%)") and "it/s" in steps[0]
    assert steps[-1].startswith("[train] epoch 2/2 step 4/4 (100%)") and "train/loss" in steps[-1]
    assert sum(ln.startswith("[val] epoch") and "val/loss" in ln for ln in lines) == 2
    assert sum(ln.startswith("[train]") and " done in " in ln for ln in lines) == 2
    # validation batches get the same lines (a large validation set on a CPU once ran silently for minutes)
    assert [ln.split(" (")[0] for ln in lines if ln.startswith("[val] epoch 1 batch")] == ["[val] epoch 1 batch 2/2"]
    assert any(ln.startswith("[val] epoch 2 done in ") and "val/loss" in ln for ln in lines)


def test_interval_limits_the_lines(tmp_path):
    stream = io.StringIO()
    trainer = L.Trainer(max_epochs=1, callbacks=[TextProgressBar(every_seconds=3600, stream=stream)], logger=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path), enable_model_summary=False)
    trainer.fit(Tiny(), _loader(20))
    steps = [ln for ln in stream.getvalue().splitlines() if " step " in ln]
    assert len(steps) == 1 and " step 1/10 " in steps[0]  # the first step, then nothing for an hour


def test_auto_style_follows_the_terminal(monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())  # not a TTY
    assert isinstance(create_progress_bar("auto"), TextProgressBar)
    assert isinstance(create_progress_bar("rich"), RichProgressBar)
    with pytest.raises(ValueError, match="auto, rich or text"):
        create_progress_bar("fancy")


def test_progress_line_format():
    from mtl.progress_log import progress_line

    assert progress_line("[x] step", 40, 100, 20.0, note="loss 0.5") == "[x] step 40/100 (40%) 2.00 it/s eta 0:00:30 loss 0.5"
    assert progress_line("[x]", 3, None, 1.5, unit="tasks") == "[x] 3 2.00 tasks/s"  # no total: no % or eta


def test_progress_log_prints_first_last_and_at_the_interval(monkeypatch):
    from mtl import progress_log

    clock = iter([0.0, 1.0, 2.0, 50.0, 51.0, 52.0, 60.0, 61.0])  # start, then one reading per update
    monkeypatch.setattr(progress_log, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    stream = io.StringIO()
    bar = progress_log.ProgressLog("[m] step", 5, unit="steps", every_seconds=30, stream=stream)
    for done in range(1, 6):
        bar.update(done, f"n{done}")
    lines = stream.getvalue().splitlines()
    # step 1 (first), step 3 (30 s after step 1's line), step 5 (last); not 2 or 4
    assert [ln.split()[2] for ln in lines] == ["1/5", "3/5", "5/5"]
    assert lines[1] == "[m] step 3/5 (60%) 0.06 steps/s eta 0:00:33 n3"
    quiet = io.StringIO()
    off = progress_log.ProgressLog("[m]", 2, every_seconds=0, stream=quiet, enabled=False)
    off.update(1)
    assert quiet.getvalue() == ""


def test_the_aggregate_loss_comes_first_with_many_tasks():
    # the module logs each task's loss before the aggregate: with >= 4 tasks the cap of 4 dropped val/loss
    metrics = {f"val/t{i}/loss": torch.tensor(float(i)) for i in range(5)} | {"val/t0/acc": torch.tensor(1.0),
                                                                             "val/loss": torch.tensor(10.0)}
    text = TextProgressBar()._metrics(SimpleNamespace(callback_metrics=metrics), "val/")
    assert text == "val/loss 10 val/t0/loss 0 val/t1/loss 1 val/t2/loss 2"


def test_progress_lines_reach_the_jobs_log_file_and_not_stderr(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MTL_OUTPUT_DIR": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mtl.cli.train", "debug=smoke", "task=[depth]", "logger=none",
                           "viz.num_samples=0", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "run" / "train.log").read_text()
    for line in ("[train] epoch 1 done in", "[val] epoch 1 done in", "[test] done in"):
        assert line in proc.stdout and f"[mtl.progress][INFO] - {line}" in log
    assert "[train]" not in proc.stderr and "[val]" not in proc.stderr


def test_progress_lines_are_not_propagated_to_the_root_logger():
    import logging

    from mtl.progress_log import emit

    seen = []
    handler = logging.Handler(logging.INFO)
    handler.emit = seen.append
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        emit("[eval] 1/1 (100%)")
        logging.getLogger("mtl.other").info("reaches root")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    # a notebook with INFO logging on the console would print each progress line twice
    assert [r.getMessage() for r in seen] == ["reaches root"]


def test_summary_tables_written_to_a_file_are_not_cut_to_80_columns(monkeypatch):
    """rich falls back to 80 columns off a terminal: widths, paths and values became "…" in SLURM logs."""
    import io

    from rich.table import Table

    from mtl.progress_log import summary_console

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("sys.stdout", io.StringIO())
    console = summary_console()
    assert console.width == 160
    table = Table()
    for c in ("config", "semseg", "depth", "normals"):
        table.add_column(c)
    table.add_row("encoder 0.25 / decoders 0.25/0.50/0.75/1.00", "0.4567891", "1.2345678", "110.061234")
    console.print(table)
    assert "…" not in console.file.getvalue()


def test_summary_lines_written_to_a_file_are_never_wrapped(monkeypatch):
    """Off a terminal a long summary line (or table title) was cut into several lines: grep missed it."""
    import sys

    from merging.report import print_table
    from mtl.train import print_summary

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("sys.stdout", io.StringIO())
    per_task = {f"a_task_with_a_rather_long_name_{i}": 11.03e6 for i in range(6)}
    print_summary({"test": {"cls": {"acc": 0.5}},
                   "model_stats": {"params": 148336, "flops_all_tasks": 12.75e6, "flops_per_task": per_task}},
                  {"cls": SimpleNamespace(primary="acc", directions={"acc": True})})
    selected = {"convention": "paper", "lam": 1.0, "note": "x" * 150}
    print_table({"method": "task_arithmetic", "selected": selected,
                 "tasks": {"cls": {"primary": "acc", "merged": {"acc": 0.4}, "individual": {"acc": 0.5}, "normalized": 0.8}},
                 "mean": {"merged": 0.4, "individual": 0.5, "normalized": 0.8}})
    lines = [line.strip() for line in sys.stdout.getvalue().splitlines()]
    params = "params 148,336 · FLOPs/sample: all tasks 12.75M; one task alone: " + ", ".join(f"{t} 11.03M" for t in per_task)
    assert len(params) > 160 and params in lines
    assert f"mtl-merge: task_arithmetic {selected}" in lines


def test_summary_lines_keep_bracketed_text(monkeypatch):
    """rich read '[semseg,depth]' in a sweep folder's path as a style tag and dropped it from the printed path."""
    import sys

    from merging.report import print_table

    monkeypatch.setattr("sys.stdout", io.StringIO())
    store = "/runs/task=[semseg,depth]/store"
    print_table({"method": "tall_masks", "selected": {"lam": [0.2]}, "store": store,
                 "tasks": {"cls": {"primary": "acc", "merged": {"acc": 0.4}, "individual": {"acc": 0.5}, "normalized": 0.8}},
                 "mean": {"merged": 0.4, "individual": 0.5, "normalized": 0.8}})
    assert f"TALL store: {store}" in sys.stdout.getvalue()
