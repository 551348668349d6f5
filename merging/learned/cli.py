"""`mtl-merge merge=adamerging|atlas|concrete_ta|concrete_adamerging`: learn on a split's images, no labels,
on `eval.device` (the device the run evaluates on).

CLI-only keys of these methods (the rest are `merging.learn` hyperparameters):

| key | default | meaning |
|---|---|---|
| `split` | `test` | images the coefficients are learned on (as the papers do); `val` selectable. Labels are never read (entropy objectives) |
| `batch_size` | 16 | unlabeled images per task per step (entropy objectives) |
| `eval_every` | 0 | every n steps, the merged model's validation score is recorded: each task's primary metric relative to its fine-tune's (an MAE too), averaged over tasks (uses val labels; 0: never) |
| `shots` | 16 | aTLAS `objective=supervised`: labelled images per class (per task for dense or regression tasks), from the train split |
| `shots_batch` | null | aTLAS `objective=supervised`: labelled images per task per step, drawn without replacement from the shots (one shuffled pass per cycle); null: all shots every step |

A key the method does not have is refused naming the valid ones; a key its other settings leave unread
(`split`, `batch_size` with supervised aTLAS; `shots`, `shots_batch` with the entropy objective; `k`
without `vectors=ties`; `threshold` without `final_mask=hard`; `inner_steps` with `steps=0`; `inner` with
`inner_steps=0` or `steps=0`; `inner_lr` with
`inner=continue`, `inner_steps=0` or `steps=0`; `coef_lr` with `final_steps=0` unless `inner=continue` with inner
steps and mask steps) is dropped at its
default and refused when set to anything else; one that `learn_max_steps` leaves unread is dropped.

With `+merge.bn=recompute`, the shared BatchNorm layers normalise with the statistics of each step's
batches of all tasks pooled (the current merged weights'), and the final statistics — and those of each
`eval_every` validation model — are re-estimated on one pass over the images learned on (`merge.split`,
`merge.batch_size` per task per pass; supervised aTLAS: the shots), at most `bn_stats.max_batches` per task
(`merging.learn(..., bn="recompute", bn_max_batches=...)`). `bn_stats.split` and `bn_stats.batch_size` are not
read: set to anything but their defaults they are refused.

Outputs in the run folder: `coefficients/coefficients.safetensors` + `coefficients.json` (summary and
per-step history), `coefficients.png` (λ heatmap layer × task, or block × task for aTLAS) and
`learning_curves.png` (objective per step, normalized validation score per evaluation). The run records the data
settings its objective used (`split`, `batch_size`; or `shots`, `shots_batch`, `shots_split` for supervised
aTLAS) in `metrics.json`'s `selected`, the model folder's meta and `coefficients.json`'s `hparams`. Every
setting is checked before the pool is loaded; aTLAS's `blocks` and `learn_blocks` against the tensor names in
the pool's headers, before any model is evaluated.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

import merging
from mtl.io import is_plain_json
from mtl.registry import derived_seed, meant

from ..bn import pooled_batches
from ..evaluation import ImageBatches
from ..job import CLI_METHODS, MergeJob, Selection
from ..run_outputs import COEFFICIENTS_DIR, COEFFICIENTS_PLOT, CURVES_PLOT
from .api import KEY_OPTIONS, LEARNED_METHODS, check_hparams, unread, unread_message
from .layout import make_layout
from .objective import entropy_tasks
from .plots import plot_coefficients, plot_learning_curves

__all__ = ["LabeledShots", "precheck_learned", "select_learned"]

log = logging.getLogger("merging.learned")

CLI_KEYS = {"split": "test", "batch_size": 16, "eval_every": 0}
#: aTLAS's only: its supervised objective's labelled shots
SHOT_KEYS = {"shots": 16, "shots_batch": None}


class LabeledShots:
    """k labelled images per class (the first k of each class in a seeded order; k images for dense or
    regression targets). Served as one batch of all of them (`batch_size=None`), or as shuffled
    minibatches of `batch_size`, each shot once per pass: a step then costs `batch_size` images instead
    of k × classes."""

    def __init__(self, dataset, target_key: str, shots: int, seed: int = 0, batch_size: int | None = None,
                 num_classes: int | None = None, task: str | None = None):
        _check_shots_batch(batch_size)
        y = dataset.tensors[target_key]
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(seed)))
        classes = y.dim() == 1 and not y.is_floating_point()
        where = f"task {task or target_key!r}'s train split"
        if classes:  # classification: k per class; fewer would silently be a smaller budget than recorded
            counts = torch.bincount(y, minlength=int(num_classes or 0))
            short = [(c, int(n)) for c, n in enumerate(counts.tolist()) if n < shots]
            if short:
                listed = ", ".join(f"class {c}: {n}" for c, n in short[:5]) + (" ..." if len(short) > 5 else "")
                raise ValueError(f"merge.shots={shots}: {where} has fewer labelled images than that for "
                                 f"{len(short)} class(es) ({listed}); lower merge.shots or use more data")
            keep = torch.cat([order[y[order] == c][:shots] for c in torch.unique(y)])
        else:  # dense or regression targets have no per-image class: k images
            if len(y) < shots:
                raise ValueError(f"merge.shots={shots}: {where} has only {len(y)} images; lower merge.shots")
            keep = order[:shots]
        # the dtype a batch of the split carries: label maps may be stored smaller (uint8 semseg, 0/1 edges)
        batch_dtype = torch.int64 if classes else getattr(dataset, "cast", {}).get(target_key, y.dtype)
        self.batch = (dataset.tensors["image"][keep], y[keep].to(batch_dtype))
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(derived_seed(seed, 1))

    def __iter__(self):
        x, y = self.batch
        if self.batch_size is None or self.batch_size >= len(y):
            yield self.batch
            return
        order = torch.randperm(len(y), generator=self.gen)
        for i in range(0, len(y), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield x[idx], y[idx]


def _check_shots_batch(v: Any) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"merge.shots_batch must be a positive int or null (all shots every step), got {v!r}")


def _split_dataset(job: MergeJob, task: str, split: str):
    return job.evaluator.datamodule(task).dataset(split)


def _options(method: str, hp: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(CLI-only options, `merging.learn` keyword arguments), both checked: no model or data is needed."""
    cli = {**CLI_KEYS, **(SHOT_KEYS if method == "atlas" else {})}
    defaults = LEARNED_METHODS[method]
    unknown = sorted(set(hp) - set(defaults) - set(cli) - set(KEY_OPTIONS))
    if unknown:
        hint = meant(unknown, [*defaults, *cli, *KEY_OPTIONS])
        raise TypeError(f"merge={method}: unknown key(s) {', '.join(unknown)}{hint}; valid: {', '.join([*defaults, *cli])} "
                        f"and the key options {', '.join(KEY_OPTIONS)}")
    opts = {k: hp.get(k, v) for k, v in cli.items()}
    if opts["split"] not in ("val", "test"):
        raise ValueError(f"merge.split must be 'val' or 'test' (the images learned on), got {opts['split']!r}")
    for key, low in (("batch_size", 1), ("eval_every", 0), ("shots", 1)):
        v = opts.get(key, low)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"merge.{key} must be an int ≥ {low}, got {v!r}")
    _check_shots_batch(opts.get("shots_batch"))
    supervised = hp.get("objective", "entropy") == "supervised"
    idle = ("split", "batch_size") if supervised else tuple(SHOT_KEYS) if method == "atlas" else ()
    changed = [k for k in idle if opts[k] != cli[k]]
    if changed:  # the config carries every key: at its default an unread one is dropped, set it is refused
        k = changed[0]
        why = ("supervised aTLAS learns on merge.shots labelled train images, merge.shots_batch per step" if supervised
               else "it is read only with merge.objective=supervised")
        raise ValueError(f"merge={method}: merge.{k}={opts[k]!r} is not read with merge.objective="
                         f"{hp.get('objective', 'entropy')} ({why}); remove it")
    kw = {k: v for k, v in hp.items() if k not in cli and v is not None}
    for k in unread({**defaults, **kw}):
        if kw.get(k) == defaults[k]:
            del kw[k]
        elif k in kw:  # said in the CLI's keys (check_hparams would name the Python ones)
            raise ValueError(f"merge={method}: {unread_message(k, kw[k], {**defaults, **kw}, cli=True)}")
    try:
        check_hparams(method, kw)
    except (TypeError, ValueError) as e:
        raise type(e)(f"merge={method}: {e}") from None
    return opts, kw


def precheck_learned(method: str, hp: Mapping[str, Any], merged_keys: list[str] | None = None,
                     task_kinds: Mapping[str, str | None] | None = None) -> None:
    """`mtl-merge`'s check of a learned method's settings before the pool is loaded and scored; with
    `task_kinds` (`{task: kind}` from the models' config.json) also that an entropy objective has a task to read;
    with `merged_keys` (the pool's merged tensors, read from its files' headers) also aTLAS's `blocks` and
    `learn_blocks` against them. A tensor no fine-tune changed gets no coefficient while learning, so a
    pattern that matches only such tensors is still found when learning starts."""
    _, kw = _options(method, hp)
    if task_kinds is not None and hp.get("objective", "entropy") != "supervised":
        try:
            entropy_tasks(task_kinds, "use merge=atlas merge.objective=supervised (merge.shots labelled train images "
                                      "per class) or a merge that learns nothing, e.g. merge=task_arithmetic")
        except ValueError as e:
            raise ValueError(f"merge={method}: {e}") from None
    if merged_keys is None or method != "atlas":
        return
    try:
        make_layout(merged_keys, "block", kw.get("blocks", "tensor")).select(kw.get("learn_blocks"))
    except ValueError as e:
        raise ValueError(f"merge={method}: {e}") from None


def data_record(opts: Mapping[str, Any], supervised: bool) -> dict[str, Any]:
    """The data settings a run used (the others do not apply to its objective)."""
    if supervised:
        return {"shots": opts["shots"], "shots_batch": opts["shots_batch"], "shots_split": "train"}
    return {"split": opts["split"], "batch_size": opts["batch_size"]}


def select_learned(method: str, job: MergeJob, hp: Mapping[str, Any]) -> Selection:
    opts, kw = _options(method, hp)
    seed = int(kw.get("seed", job.cfg.get("seed", 0)))
    cap = job.cfg.get("learn_max_steps")
    if cap is not None:
        for k in ("steps", "final_steps"):
            if k in LEARNED_METHODS[method]:
                kw[k] = min(int(kw.get(k, LEARNED_METHODS[method][k])), int(cap))
        for k in unread({**LEARNED_METHODS[method], **kw}):  # e.g. coef_lr once final_steps is capped to 0
            if k in kw and kw.pop(k) != LEARNED_METHODS[method][k]:
                log.warning("learn_max_steps=%s leaves merge.%s unread: it is not used or recorded", cap, k)
    names = job.evaluator.names
    supervised = kw.get("objective", "entropy") == "supervised"

    def learning_data() -> dict[str, Any]:  # new loaders, seeded: the same images each time
        if supervised:
            tasks = job.evaluator.tasks
            return {"labeled": {t: LabeledShots(_split_dataset(job, t, "train"), tasks[t].target_key,
                                                int(opts["shots"]), seed, opts["shots_batch"],
                                                getattr(tasks[t], "num_classes", None), t) for t in names}}
        return {"unlabeled": {t: ImageBatches(_split_dataset(job, t, opts["split"]), opts["batch_size"], derived_seed(seed, i), t)
                              for i, t in enumerate(names)}}

    data = learning_data()
    bn_max = job.bn_data["max_batches"] if job.bn_data is not None else None

    def val_score(step: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        model = job.model(_with_unlearned(res_keys, state), recompute_bn=False)
        if job.bn_data is not None:  # the statistics the result would get now: its images, not bn_stats.split's
            batches = next(iter(learning_data().values()))  # not `data`'s loaders: a pass would move their seeds
            merging.recompute_bn(model, pooled_batches(batches, bn_max), task=names[0])
        return {"val_normalized": job.val_normalized(model)}

    if job.bn_data is not None:  # merge.bn=recompute: per step, and at the end on the learning images
        kw.update(bn="recompute", bn_max_batches=bn_max)
    every = int(opts["eval_every"])  # no callback without a schedule: learn() would warn it is never called
    undefined = [f"{t}: {w}" for t in names if every > 0 and (w := job.evaluator.undefined(t, None, "val"))]
    if undefined:  # every point of the curve would be NaN: not worth a validation pass per point
        log.warning("merge.eval_every=%d is not run: the mean normalized validation score is undefined for any "
                    "merged model (%s); the learning curve records the objective alone", every, "; ".join(undefined))
        every = 0
    res_keys = _base_state(job) if every > 0 else {}
    res = merging.learn(method, job.pool.pretrained, job.pool.member_paths, device=job.evaluator.device,
                        callback=val_score if every > 0 else None, callback_every=every, **data, **kw)
    res.hparams.update(data_record(opts, supervised))  # coefficients.json says what the coefficients were learned on
    out = job.run_dir / COEFFICIENTS_DIR
    res.save(out)
    model = job.model(res.state_dict, recompute_bn=False)
    title = f"{method} ({res.granularity})\n{job.run_dir.name}"
    plot_coefficients(res.coefficients, res.groups, res.tasks, job.run_dir / COEFFICIENTS_PLOT, title=title,
                      model_keys=list(model.state_dict()))
    if res.history:  # no steps, no curves (an earlier run's in this folder: removed by job.clear_earlier_outputs)
        plot_learning_curves(res.history, job.run_dir / CURVES_PLOT, title=title,
                             objective="supervised" if supervised else "entropy")
    summary = res.summary()
    selected = {**{k: v for k, v in res.hparams.items() if is_plain_json(v)},
                "coefficients": {t: round(v["mean"], 4) for t, v in summary["per_task"].items()}}
    extra = {"learned": {k: v for k, v in summary.items() if k not in ("hparams", "rows")},
             "coefficients_file": str(out / "coefficients.safetensors")}
    return Selection(model, selected, extra=extra)


def _base_state(job: MergeJob) -> dict[str, torch.Tensor]:
    """θ0's shared keys (buffers etc.) that the per-step validation model needs next to the learned tensors."""
    return merging.merge("task_arithmetic", job.pool.pretrained, job.pool.member_paths, lam=0.0)


def _with_unlearned(base: dict[str, torch.Tensor], learned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**base, **{k: v.detach().cpu() for k, v in learned.items()}}


for _name in LEARNED_METHODS:
    CLI_METHODS.register(_name)(lambda job, hp, _m=_name: select_learned(_m, job, hp))
