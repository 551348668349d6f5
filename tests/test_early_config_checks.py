"""Settings every CLI can judge from its config alone are refused before any run folder exists: one line naming
the key (with the setting it most likely meant), exit status 1, no folder, no ``run_dir:`` line."""
import pytest

TRAIN = ("mtl.cli.train", "debug=smoke", "task=[depth]", "logger=none", "viz.num_samples=0")


def _refused_without_folder(console, capfd, cli, *args):
    code, out = console(cli, *args)
    stdout, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "run_dir:" not in stdout and not any(out.rglob("config.yaml")), sorted(out.rglob("*"))
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize("args, expected", [
    # Lightning's Trainer.__init__ has max_epochs, not max_epoch (was its "unexpected keyword" after a FAILED folder)
    ((*TRAIN, "+trainer.max_epoch=3"), "unknown setting trainer.max_epoch (did you mean trainer.max_epochs?)"),
    # ScenesDataModule takes batch_size
    ((*TRAIN, "+data.batch_sise=4"), "unknown setting data.batch_sise (did you mean data.batch_size?)"),
    # a depth task takes metrics, name, weight, target_key
    ((*TRAIN, "+task.depth.wieght=2"), "unknown setting task.depth.wieght (did you mean task.depth.weight?)"),
    ((*TRAIN, "task.depth.weight=null"), "task 'depth': weight must be a finite number >= 0, got None"),
    # task_arithmetic's only hyperparameter is its λ
    (("merging.cli", "debug=smoke", "+merge.lamm=0.5"), "task_arithmetic: unknown hyperparameter(s) lamm "
                                                        "(did you mean lam?); accepted: lam"),
    # the ONNX exporter's option is opset
    (("mtl.cli.export", "debug=smoke", "+format.opsett=17"), "format=onnx has no option(s) ['opsett'] "
                                                             "(did you mean opset?)"),
    # the smoke model trains on scenes, whose data module takes batch_size
    (("pruning.cli", "debug=smoke", "+data.batch_sise=4"), "unknown setting data.batch_sise "
                                                           "(did you mean data.batch_size?)"),
])
def test_a_section_setting_the_job_cannot_take_is_refused_before_any_folder(console, capfd, args, expected):
    assert _refused_without_folder(console, capfd, *args).startswith(expected)
