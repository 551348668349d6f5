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
    # real Trainer arguments that the job fills itself (were "unknown setting", then "got multiple values")
    ((*TRAIN, "+trainer.default_root_dir=/tmp/x"), "trainer.default_root_dir is set by mtlkit (the run folder; use "
                                                   "hydra.run.dir=...)"),
    ((*TRAIN, "+trainer.callbacks=[]"), "trainer.callbacks is set by mtlkit (use callbacks.<name>=...)"),
    # ScenesDataModule takes batch_size
    ((*TRAIN, "+data.batch_sise=4"), "unknown setting data.batch_sise (did you mean data.batch_size?)"),
    # a depth task takes metrics, name, weight, target_key
    ((*TRAIN, "+task.depth.wieght=2"), "unknown setting task.depth.wieght (did you mean task.depth.weight?)"),
    # named by its config key: task.zoo's name is the dataset's (${data.dataset}), here "pretrain"
    (("mtl.cli.train", "experiment=zoo_cnn_pretrain", "debug=smoke", "+task.zoo.lable_smoothing=0.1"),
     "unknown setting task.zoo.lable_smoothing (did you mean task.zoo.label_smoothing?)"),
    # Lightning's Trainer refused it after the run folder, in its words (were "You selected an invalid accelerator")
    ((*TRAIN, "trainer.accelerator=gpuu"), "trainer.accelerator='gpuu' is not an accelerator; use one of auto, cpu, "
                                           "cuda, gpu, mps, tpu"),
    # a known name this machine lacks (mps off a Mac): Lightning's "MPSAccelerator can not run" after the run folder
    pytest.param((*TRAIN, "trainer.accelerator=mps"), "trainer.accelerator=mps is not available on this machine "
                 "(MPSAccelerator); use trainer=cpu", marks=pytest.mark.skipif(
                     __import__("torch").backends.mps.is_available(), reason="MPS is available here")),
    # an unknown strategy name: Lightning's "You selected an invalid strategy name" after a FAILED run folder
    ((*TRAIN, "+trainer.strategy=ddpp"), "trainer.strategy='ddpp' is not a strategy (did you mean ddp?); use one of "
                                         "auto, ddp, "),
    ((*TRAIN, "task.depth.weight=null"), "task 'depth': weight must be a finite number >= 0, got None"),
    # task_arithmetic's only hyperparameter is its λ
    (("merging.cli", "debug=smoke", "+merge.lamm=0.5"), "task_arithmetic: unknown hyperparameter(s) lamm "
                                                        "(did you mean lam?); accepted: lam"),
    # the ONNX exporter's option is opset
    (("mtl.cli.export", "debug=smoke", "+format.opsett=17"), "format=onnx has no option(s) ['opsett'] "
                                                             "(did you mean opset?)"),
    # mtl-prune's method options: a misspelling named with the one meant, as the other CLIs name theirs
    (("pruning.cli", "debug=smoke", "prune=l1", "+prune.ratoi=0.5"), "prune=l1: prune method 'l1' has no option(s) "
                                                                     "['ratoi'] (did you mean ratio?); its options: "),
    # the dynamo exporter (the default) writes opsets from 18: refused after the run folder existed (left FAILED)
    (("mtl.cli.export", "debug=smoke", "format.opset=17"), "format.opset=17: the dynamo exporter writes opsets 18–"),
    # the loader and split settings (were refused by the data module's constructor after a FAILED run folder)
    ((*TRAIN, "data.batch_size=0"), "data.batch_size must be an int >= 1, got 0"),
    ((*TRAIN, "data.num_workers=-1"), "data.num_workers must be an int >= 0, got -1"),
    ((*TRAIN, "data.n_val=0"), "data.n_val must be an int >= 1, got 0"),
    (("pruning.cli", "debug=smoke", "+data.batch_size=0"), "data.batch_size must be an int >= 1, got 0"),
    # data=zoo too (its registry entry is a wrapper function: were refused after a FAILED run folder, unnamed)
    (("mtl.cli.train", "experiment=zoo_cnn_pretrain", "debug=smoke", "data.batch_size=0"),
     "data.batch_size must be an int >= 1, got 0"),
    (("mtl.cli.train", "experiment=zoo_cnn_pretrain", "debug=smoke", "data.num_workers=-1"),
     "data.num_workers must be an int >= 0, got -1"),
    (("mtl.cli.train", "experiment=zoo_cnn_pretrain", "debug=smoke", "data.seed=-1"),
     "data.seed must be an int in [0, 2**64 - 1], got -1"),
    # the smoke model trains on scenes, whose data module takes batch_size
    (("pruning.cli", "debug=smoke", "+data.batch_sise=4"), "unknown setting data.batch_sise "
                                                           "(did you mean data.batch_size?)"),
    # a misspelt callback or logger class (was "nonexist.Foo: Error loading 'nonexist.Foo': (…)" and a FAILED folder)
    ((*TRAIN, "+callbacks.x._target_=nonexist.Foo"), "callbacks.x._target_=nonexist.Foo cannot be imported: "
                                                     "No module named 'nonexist'"),
    ((*TRAIN, "+logger.x._target_=lightning.pytorch.loggers.CSVLoger"),
     "logger.x._target_=lightning.pytorch.loggers.CSVLoger cannot be imported: No module named "
     "'lightning.pytorch.loggers.CSVLoger'"),
])
def test_a_section_setting_the_job_cannot_take_is_refused_before_any_folder(console, capfd, args, expected):
    assert _refused_without_folder(console, capfd, *args).startswith(expected)


def test_an_init_from_folder_without_the_runs_encoder_is_refused_before_any_folder(console, capfd, tmp_path):
    """No encoder tensor of the run's model in the folder (another backbone) was refused only when the weights were
    loaded, after the run folder (config.yaml, FAILED) was written."""
    import mtl

    folder = mtl.save_model(mtl.create_model(["depth"], backbone="test_vit", decoder={"name": "hps", "channels": 16}),
                            tmp_path / "vit")
    assert _refused_without_folder(console, capfd, *TRAIN, f"init_from={folder}").startswith(
        f"init_from={folder} (backbone 'test_vit'): none of this model's ")


def _pruned_folder(folder):
    import torch

    import mtl
    import pruning

    torch.manual_seed(0)
    model = mtl.create_model(["semseg"], backbone="test_resnet", decoder={"name": "hps", "channels": 8})
    pruned, _ = pruning.prune(model, "l1", example=torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ratio=0.5)
    return mtl.save_model(pruned, folder, meta=pruned.meta)


def _extracted_folder(folder):
    import torch

    import mtl
    from mtl.models.task_moe_vit import TaskMoEViT
    from mtl.tasks import create_task

    torch.manual_seed(0)
    vit = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
    model = TaskMoEViT([create_task(t) for t in ("semseg", "depth")], vit, {"num_experts": 4, "top_k": 2})
    mtl.extract(model, out=folder, task="semseg", calib=[torch.zeros(2, 3, 32, 32, dtype=torch.uint8)])
    return folder


@pytest.mark.parametrize("make, kind", [(_pruned_folder, "a pruned model"),
                                        (_extracted_folder, "a sub-network extracted")])
def test_an_init_from_folder_that_fixes_the_architecture_without_a_runs_task_is_refused_before_any_folder(
        console, capfd, tmp_path, make, kind):
    """A pruned (mtl-prune) or extracted (mtl-extract) folder has no head or router for a task it was not made for:
    found from its config.json while the architecture was built, after the run folder (FAILED, config.yaml, .hydra)
    was written. Its own tasks still pass the early check."""
    from omegaconf import OmegaConf

    from mtl.tasks import create_task
    from mtl.warm_start import check_init_from

    folder = make(tmp_path / "start")
    message = _refused_without_folder(console, capfd, *TRAIN, f"init_from={folder}")
    assert message.startswith(f"{folder} holds {kind} for tasks ['semseg']"), message
    assert "fine-tune it on those tasks or a subset of them (['depth'] have no " in message, message
    check_init_from(OmegaConf.create({"init_from": str(folder)}), [create_task("semseg")])


@pytest.mark.parametrize("family", [None, "linearized"])
def test_an_init_from_linearized_folder_for_a_plain_model_is_refused_before_any_folder(console, capfd, tmp_path,
                                                                                       family):
    """A linearized folder started a plain model (which would drop its θ0) only to be refused as its weights were
    loaded, after the run folder was written; from its config.json alone. family=linearized passes the check."""
    from omegaconf import OmegaConf

    import mtl
    from mtl.models import linearize
    from mtl.warm_start import check_init_from

    folder = mtl.save_model(linearize(mtl.create_model(["depth"], backbone="test_resnet",
                                                           decoder={"name": "hps", "channels": 16})), tmp_path / "lin")
    cfg = OmegaConf.create({"init_from": str(folder), "family": family, "backbone": {"name": "test_resnet"},
                            "decoder": {"name": "hps", "channels": 16}})
    if family == "linearized":
        return check_init_from(cfg, [mtl.create_task("depth")])
    assert _refused_without_folder(console, capfd, *TRAIN, f"init_from={folder}") == (
        f"init_from={folder} is a linearized (tangent-space) model: continue it with family=linearized (its expansion "
        "point θ0 comes with it); a plain model, or linearize=true (which expands around the loaded weights), would "
        "drop its θ0")


@pytest.mark.parametrize("args, expected", [
    # Hydra said "Could not override 'trainer.max_epoch'; To append to your config use +trainer.max_epoch=3"
    ((*TRAIN, "trainer.max_epoch=3"), "no setting trainer.max_epoch (did you mean trainer.max_epochs?)"),
    ((*TRAIN, "task.depth.weigth=2"), "no setting task.depth.weigth (did you mean task.depth.weight?)"),
    ((*TRAIN, "trainr.max_epochs=3"), "no setting trainr.max_epochs (did you mean trainer.max_epochs?)"),
    # equally close names, each given in full (was "data.size or seed")
    ((*TRAIN, "data.seze=64"), "no setting data.seze (did you mean data.size or data.seed?)"),
    (("merging.cli", "debug=smoke", "merge.lamm=1"), "no setting merge.lamm (did you mean merge.lam?)"),
    (("mtl.cli.export", "debug=smoke", "format.opst=17"), "no setting format.opst (did you mean format.opset?)"),
    # case alone (L/l was looked alike before case was folded, so LR matched nothing: Hydra's message, no hint)
    ((*TRAIN, "optim.LR=0.1"), "no setting optim.LR (did you mean optim.lr?)"),
    # nothing in the node is close: Hydra's own message (its + advice then gets the job's check)
    ((*TRAIN, "trainer.zzzz=3"), "Could not override 'trainer.zzzz'; To append to your config use +trainer.zzzz=3"),
])
def test_a_misspelt_nested_key_is_named_with_the_key_it_nearly_matches(console, capfd, args, expected):
    message = _refused_without_folder(console, capfd, *args)
    assert (message.startswith(expected) if expected.startswith("Could not") else message == expected), message


def test_close_names_folds_case_before_look_alike_characters():
    """A name equal to the key but for case and O/0, l/1, I/1 is the one meant (L1 and LR found nothing: l and i
    were folded to 1 before case, so L and I stayed apart from them); one differing in case alone comes first."""
    from mtl.registry import close_names

    assert close_names("L1", ["l1", "l1_global"]) == ["l1"]
    assert close_names("LR", ["lr", "momentum"]) == ["lr"]
    assert close_names("iou", ["IoU", "loss"]) == ["IoU"]
    assert close_names("I1", ["l1", "l1_global"]) == ["l1"]  # look-alike, as before
    assert close_names("L1", ["I1", "l1"]) == ["l1", "I1"]  # case alone before a look-alike


def test_check_kwargs_takes_none_only_where_the_annotation_or_the_default_allows_it():
    """None passed every annotation unchecked: a plain ``float`` setting set to null failed later, in the
    constructor's arithmetic, naming no key."""
    from mtl.registry import check_kwargs

    def fn(a: float = 1.0, b: "int | None" = 2, c: int = None, d: "list[int]" = (1,), e=3):
        pass

    check_kwargs(fn, {"b": None, "c": None, "d": None, "e": None}, "x")
    with pytest.raises(TypeError, match=r"^x\.a must be float, got None$"):
        check_kwargs(fn, {"a": None}, "x")


@pytest.mark.parametrize("cli, top", [
    ("mtl.cli.train", "backbone, balancer, baselines,"), ("merging.cli", "bn_stats, debug, eval,"),
    ("pruning.cli", "baselines, calib, data,"), ("mtl.cli.export", "debug, format, hydra,"),
    ("mtl.cli.extract", "calib, debug, hydra,"),
])
def test_an_added_top_level_key_nothing_reads_is_refused_in_every_cli(console, capfd, cli, top):
    """`+foo=1` ran and exited 0 with foo in config.yaml: no part of any tool reads it."""
    message = _refused_without_folder(console, capfd, cli, "debug=smoke", "+foo=1")
    assert message.startswith(f"+foo=1: no setting foo (the top-level settings are: {top}"), message


@pytest.mark.parametrize("args, expected", [
    # config.yaml recorded opsett: 17 while opset 18 was used
    (("mtl.cli.export", "debug=smoke", "+opsett=17"), "+opsett=17: no setting opsett (the top-level settings are: "),
    ((*TRAIN, "+model.foo=1"), "+model.foo=1: no setting model (the top-level settings are: "),  # mtl-train has none
])
def test_an_added_key_under_a_new_top_level_name_is_refused(console, capfd, args, expected):
    assert _refused_without_folder(console, capfd, *args).startswith(expected)


@pytest.mark.parametrize("args, expected", [
    # ran with MultiTaskModule's default lr while config.yaml had no optim.lr
    ((*TRAIN, "~optim.lr"), "~optim.lr: optim.lr cannot be removed (the run reads it); set it instead, e.g. "
                            "optim.lr=0.002"),
    ((*TRAIN, "~optim"), "~optim: optim cannot be removed (the run reads it); set its keys instead"),
    # was "Key 'balancer' is not in struct (…)" after a FAILED folder
    ((*TRAIN, "~balancer"), "~balancer: this run needs its balancer group; pick one of: aligned_mtl, cagrad,"),
    # Hydra's "Config group override must be a string or a list. Got NoneType" named no group
    ((*TRAIN, "balancer=null"), "balancer=null: a config group takes one of its options (balancer cannot be "
                                "removed); balancer options: aligned_mtl, cagrad,"),
    (("mtl.cli.train", "experiment=null"), "experiment=null: a config group takes one of its options (leave "
                                           "experiment= out for none); experiment options: cityscapes,"),
    (("merging.cli", "task=null"), "task=null: no setting task"),
    (("pruning.cli", "task=null"), "task=null: no setting task"),
    (("mtl.cli.export", "task=null"), "task=null: no setting task (did you mean tasks?)"),
    (("mtl.cli.extract", "task=null"), "task=null: no setting task (did you mean tasks?)"),
    # logger may go (~logger), but not as a group choice: Hydra refuses logger=null naming no group
    ((*TRAIN, "logger=null"), "logger=null: a config group takes one of its options (~logger runs without one); "
                              "logger options: csv,"),
    (("merging.cli", "~eval"), "~eval: this run needs its eval group; pick one of: none, tasks"),
    # mtl-prune's data is its own setting (data: null), a group only in the shared configs: was "no setting data
    # (did you mean data?)"; Hydra would read data=null as a group choice and refuse it naming nothing
    (("pruning.cli", "debug=smoke", "data=null"), "data=null: data is a setting here, not a config group, and null "
                                                  "is its default: leave data= out"),
    (("pruning.cli", "debug=smoke", "~data"), "~data: data is a setting here, and null is its default: leave ~data out"),
])
def test_removing_what_the_run_needs_is_refused_naming_it(console, capfd, args, expected):
    assert _refused_without_folder(console, capfd, *args).startswith(expected)


def test_removing_what_the_app_config_does_not_set_stays_allowed():
    """A key an experiment adds (the sandwich's cikd_level) or a callback may go; an optional group may be dropped,
    and so may the groups training reads with cfg.get and runs without (logger, callbacks)."""
    from mtl.cli.common import check_group_choices

    assert check_group_choices(["experiment=scenes_slimmable", "~strategy.cikd_level", "~callbacks.progress_bar",
                                "~launcher"], ("mtl.configs",)) is None
    assert check_group_choices(["~logger", "~callbacks"], ("mtl.configs",)) is None


@pytest.mark.slow
def test_a_run_without_logger_and_callbacks_trains(tmp_path):
    from mtl.train import run

    run(["debug=smoke", "task=[depth]", "viz.num_samples=0", "~logger", "~callbacks"], run_dir=tmp_path / "r")
    assert (tmp_path / "r" / "metrics.json").is_file()


def test_an_in_process_run_refuses_a_removed_setting_too(tmp_path):
    from mtl.train import run

    with pytest.raises(ValueError, match=r"^~optim\.lr: optim\.lr cannot be removed"):
        run(["debug=smoke", "~optim.lr"], run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, expected", [
    # read only inside the job, after the run folder (FAILED, config.yaml) was made
    ((*TRAIN, "baselines.path=/nonexistent/b.json"), "cannot read baselines file /nonexistent/b.json: No such file "
                                                     "or directory"),
    ((*TRAIN, "task=[depth,semseg]", "baselines.save_to=/nonexistent/b.json"),
     "baselines.save_to: baselines are single-task runs, this run trains 2 tasks (depth, semseg)"),
    ((*TRAIN, "baselines.variant=mean"), "baselines.variant='mean' is not a Δm variant; valid names: primary, all, "
                                         "flat"),
])
def test_baselines_settings_are_refused_before_any_folder(console, capfd, args, expected):
    assert _refused_without_folder(console, capfd, *args).startswith(expected)


@pytest.mark.parametrize("given, expected", [
    # read only in setup(), after the run folder (FAILED) was made
    ([], "nyuv2 (format=mat) needs data.splits_file; see docs/data.md"),
    (["data.splits_file={tmp}/splits.json"], "nyuv2 (format=mat) needs data.class_mapping; see docs/data.md"),
    (["data.splits_file={tmp}/splits.json", "data.class_mapping=[{tmp}/c40.mat,{tmp}/none.mat]"],
     "nyuv2: data.class_mapping '{tmp}/none.mat' does not exist"),
    (["data.splits_file={tmp}/none.json", "data.class_mapping={tmp}/c40.mat"],
     "nyuv2: data.splits_file '{tmp}/none.json' does not exist"),
])
def test_the_nyuv2_mat_release_without_its_splits_or_class_mapping_is_refused_before_any_folder(
        console, capfd, tmp_path, given, expected):
    for name in ("nyu.mat", "splits.json", "c40.mat"):  # only their presence is judged from the settings
        (tmp_path / name).write_text("")
    args = ("mtl.cli.train", "experiment=nyuv2", f"data.root={tmp_path}/nyu.mat", "task=[bench_semseg,bench_depth]",
            "debug=smoke", "logger=none", *(g.format(tmp=tmp_path) for g in given))
    assert _refused_without_folder(console, capfd, *args) == expected.format(tmp=tmp_path)


@pytest.mark.parametrize("args, expected", [
    (("experiment=nyuv2", 'data.size="32"'), "data.size must be null (as stored), a positive int (the height, aspect "
                                             "kept) or [H, W] of positive ints, got '32'"),
    (("experiment=nyuv2", "data.num_classes=255"), "nyuv2: data.num_classes must be in 1..254 (255 marks ignored "
                                                   "pixels), got 255"),
    (("experiment=nyuv2", "data.val_fraction=1.0"), "nyuv2: val_fraction must be in [0, 1), got 1.0"),
    (("experiment=nyuv2", "data.format=hdf5"), "nyuv2: format must be auto, npy or mat, got 'hdf5'"),
    (("experiment=cityscapes", "data.n_train=0"), "cityscapes: n_train must be a positive int or null (all), got 0"),
    (("experiment=cityscapes", "data.num_classes=8"), "cityscapes: num_classes must be 7 or 19, got 8"),
    (("data=hf_local", "task=classification", "data.size=0"), "data.size must be null (as stored), a positive int (a "
                                                              "square side) or [H, W] of positive ints, got 0"),
    (("data=hf_local", "task=classification", "data.val_fraction=2"), "hf_local: val_fraction must be in [0, 1), got 2"),
    (("data=hf_local", "task=classification", "data.splits={training: train}"),
     "hf_local: data.splits key 'training' is not a split here"),
])
def test_data_settings_judged_without_the_data_are_refused_before_any_folder(console, capfd, tmp_path, args, expected):
    """Were refused by the data module's constructor, after the run folder (FAILED, then a run_dir: line); the root
    (an empty folder) is fine, the setting is not."""
    root = "data.path" if "data=hf_local" in args else "data.root"
    message = _refused_without_folder(console, capfd, "mtl.cli.train", *args, f"{root}={tmp_path}", "debug=smoke",
                                      "logger=none")
    assert message.startswith(expected), message


@pytest.mark.parametrize("experiment", ["cityscapes", "nyuv2"])
def test_a_benchmark_root_holding_the_original_release_is_refused_before_any_folder(console, capfd, tmp_path, experiment):
    """Its layout (leftImg8bit/ and no train/) is judged from the folder's names: was found in setup(), FAILED left."""
    (tmp_path / "raw" / "leftImg8bit").mkdir(parents=True)
    message = _refused_without_folder(console, capfd, "mtl.cli.train", f"experiment={experiment}",
                                      f"data.root={tmp_path}/raw", "debug=smoke", "logger=none")
    assert message == (f"{experiment}: data.root '{tmp_path}/raw' holds leftImg8bit (the original release) but no train/ "
                       "folder; this loader reads the preprocessed npy release (<root>/{train,val}/image/<i>.npy; see "
                       "docs/data.md)")


@pytest.mark.parametrize("args, cache", [(TRAIN, "scenes"),
                                         (("mtl.cli.train", "experiment=zoo_cnn_pretrain", "debug=smoke"), "zoo")])
def test_an_unusable_data_cache_is_refused_before_any_folder(console, capfd, tmp_path, args, cache):
    """A file where the cache folder should be, or a cache folder that cannot be created, was found when the data
    were generated, after the run folder existed (FAILED); /proc/x gave a bare "[Errno 2] ...: '/proc/x'"."""
    (tmp_path / "afile").write_text("")
    message = _refused_without_folder(console, capfd, *args, f"data.cache_dir={tmp_path}/afile/{cache}")
    assert message.startswith(f"[Errno 20] data cache {tmp_path}/afile/{cache}: {tmp_path}/afile is a file, "
                              "not a folder; set MTL_DATA_CACHE or data.cache_dir"), message
    message = _refused_without_folder(console, capfd, *args, f"data.cache_dir=/proc/mtl-no-such/{cache}")
    assert message.startswith(f"[Errno 2] data cache /proc/mtl-no-such/{cache}: cannot create /proc/mtl-no-such "
                              "(No such file or directory)"), message
    assert not (tmp_path / "afile").stat().st_size


def test_a_strategy_lightning_takes_passes_the_early_strategy_check():
    """Lightning's names as its Trainer reads them (lowercased), the shipped trainer=ddp's, and a strategy given as an
    object (a ``_target_`` mapping) are left to Lightning; only an unknown name is refused."""
    from omegaconf import OmegaConf

    from mtl.train_checks import check_trainer

    for strategy in ("auto", "ddp", "DDP", "ddp_spawn", {"_target_": "lightning.pytorch.strategies.DDPStrategy"}):
        check_trainer(OmegaConf.create({"strategy": strategy, "accelerator": "cpu", "devices": 1, "max_epochs": 1}))
    with pytest.raises(ValueError, match=r"^trainer.strategy='fsdq' is not a strategy \(did you mean fsdp\?\)"):
        check_trainer(OmegaConf.create({"strategy": "fsdq", "accelerator": "cpu", "devices": 1, "max_epochs": 1}))
