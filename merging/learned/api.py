"""`merging.learn(method, pretrained, finetuned, unlabeled=...)`: learned merges at test time.

    res = merging.learn("adamerging", "zoo/pre", ["zoo/mnist", "zoo/digits"], unlabeled={"mnist": batches, ...})
    res.state_dict        # merged shared weights (what merging.merge returns)
    res.coefficients      # (T,) task-wise, (tensors, T) layer-wise, (blocks, T) aTLAS
    res.mask              # Concrete: {tensor: the mask shared by all tasks, as it multiplies the task vectors}
"""
from __future__ import annotations

import contextlib
import logging
import numbers
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from mtl.io import require_model
from mtl.registry import check_seed
from mtl.modes import modes_restored

from ..bn import bn_statistics, check_bn, check_recompute_model, pooled_batches
from ..keys import DEFAULT_TASK_KEYS
from .adamerging import CoefficientLearner, Trace
from .concrete import ConcreteMask
from .layout import check_blocks, check_patterns, make_layout
from .loop import POOL_LIMIT, Objective
from .objective import entropy_tasks
from .problem import VECTORS, MergeProblem, build_problem, ties_task_vectors

log = logging.getLogger("merging.learned")

__all__ = ["LEARNED_METHODS", "READ_ONLY_WITH", "LearnedMerge", "check_hparams", "learn", "method_defaults", "unread"]

#: `merging.merge` key options a learned merge passes on (not hyperparameters)
KEY_OPTIONS = ("include", "exclude", "task_keys", "unshared", "bn", "check_finite")
_COMMON = dict(steps=300, lr=1e-3, seed=0, pool_limit=None, channels_last=None)
#: λ clamped to [0, 1] by default, as AdaMerging's and Concrete AdaMerging's own code does; aTLAS's is unbounded
_COEF = dict(init=0.3, clamp=True)
_MASK = dict(temperature=0.5, initial_logits=0.0, threshold=0.5, rescale=True, final_mask="sample")

#: Concrete AdaMerging's inner problem: λ restarted from `init` each outer step (the authors' code), or carried on
INNER = ("reset", "continue")

#: method -> its hyperparameters and their defaults
LEARNED_METHODS: dict[str, dict[str, Any]] = {
    "adamerging": {**_COMMON, **_COEF, "granularity": "layer", "vectors": "plain", "k": 20},
    "atlas": {**_COMMON, **_COEF, "clamp": False, "blocks": "tensor", "learn_blocks": None, "objective": "entropy"},
    "concrete_ta": {**_COMMON, **_MASK, "lam": 0.3},
    "concrete_adamerging": {**_COMMON, **_COEF, **_MASK, "granularity": "layer", "coef_lr": 1e-3,
                            "inner": "reset", "inner_lr": 1.0, "inner_steps": 1, "final_steps": 300},
}


#: hyperparameter -> when the run reads it: alternatives (any may hold), each a list of (setting, test, value)
#: that must all hold. As data rather than code, so that the error can say the condition and the settings it saw.
READ_ONLY_WITH: dict[str, list[list[tuple[str, str, Any]]]] = {
    "lr": [[("steps", ">", 0)]],  # the optimiser of the learned steps (λ, or Concrete's mask logits)
    "k": [[("vectors", "==", "ties")]],
    "threshold": [[("final_mask", "==", "hard")]],
    # the inner steps run within each of the `steps` mask steps: a reset λ's own Adam at inner_lr; carried on
    # (inner=continue), the one Adam at coef_lr
    "inner_steps": [[("steps", ">", 0)]],
    # whether λ restarts before each mask step's inner steps and before the final ones: with no inner step run,
    # λ is still at init with a fresh Adam either way
    "inner": [[("inner_steps", ">", 0), ("steps", ">", 0)]],
    "inner_lr": [[("inner", "==", "reset"), ("inner_steps", ">", 0), ("steps", ">", 0)]],
    "coef_lr": [[("final_steps", ">", 0)], [("inner", "==", "continue"), ("inner_steps", ">", 0), ("steps", ">", 0)]],
}
_TESTS = {"==": operator.eq, ">": operator.gt}


def _holds(hp: Mapping[str, Any], on: str, test: str, value: Any) -> bool:
    try:
        return on not in hp or bool(_TESTS[test](hp[on], value))
    except TypeError:  # a setting of the wrong type: its own check names it
        return True


def _reads(alternatives, hp: Mapping[str, Any]) -> bool:
    return any(all(_holds(hp, *term) for term in terms) for terms in alternatives)


def unread(hp: Mapping[str, Any]) -> list[str]:
    """The hyperparameters in `hp` (defaults included) that its other settings leave unread."""
    return [k for k, alternatives in READ_ONLY_WITH.items() if k in hp and not _reads(alternatives, hp)]


def unread_message(key: str, given: Any, hp: Mapping[str, Any], cli: bool = False) -> str:
    """Why ``key=given`` is refused: the settings it is read with, named as Python or (``cli``) the CLI says it."""
    p, show = ("merge.", str) if cli else ("", repr)
    alternatives = READ_ONLY_WITH[key]

    def term(on, test, value):
        return f"{p}{on}={show(value)}" if test == "==" else f"{p}{on} {test} {value}"

    need = ", or ".join(" and ".join(term(*t) for t in terms) for terms in alternatives)
    seen = dict.fromkeys(on for terms in alternatives for on, _, _ in terms if on in hp)
    here = ", ".join(f"{p}{on}={show(hp[on])}" for on in seen)
    return f"{p}{key}={given!r} is read only with {need} (here {here}); remove it or set {need}"


def method_defaults(method: str) -> dict[str, Any]:
    if method not in LEARNED_METHODS:
        raise ValueError(f"unknown learned merge method {method!r}; valid: {', '.join(LEARNED_METHODS)}")
    return dict(LEARNED_METHODS[method])


@dataclass
class LearnedMerge:
    """The result of a learned merge.

    `coefficients`: (T,) for task granularity, else (rows, T) with `groups` naming the rows (tensor
    or block names) and `tasks` the columns (one per fine-tuned model). Concrete with task arithmetic
    has a single fixed λ (T,). `mask`: the shared mask as it multiplies the task vectors (bool with
    `final_mask="hard"` and `rescale=False`, else float: a Concrete draw and/or divided by its mean per
    tensor), `mask_probability` σ(logits).
    `history`: one row per step (objective per task, callback metrics).
    """

    method: str
    state_dict: dict[str, torch.Tensor]
    coefficients: torch.Tensor
    groups: list[str]
    tasks: list[str]
    granularity: str
    hparams: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    mask: dict[str, torch.Tensor] | None = None
    mask_probability: dict[str, torch.Tensor] | None = None
    excluded_tasks: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # the dataclass's would print every tensor of the state dict
        objective = (f", objective {self.history[0]['objective']:.4g} → {self.history[-1]['objective']:.4g}"
                     if self.history else "")
        return (f"LearnedMerge({self.method!r}, {self.granularity} coefficients {tuple(self.coefficients.shape)} for "
                f"tasks {self.tasks}, {len(self.state_dict)} tensors, {len(self.history)} steps{objective})")

    def summary(self) -> dict[str, Any]:
        c = self.coefficients.reshape(-1, len(self.tasks))
        out: dict[str, Any] = {
            "method": self.method, "granularity": self.granularity, "hparams": self.hparams,
            "tasks": self.tasks, "rows": self.groups, "shape": list(self.coefficients.shape),
            "per_task": {t: {"mean": float(c[:, i].double().mean()), "min": float(c[:, i].min()), "max": float(c[:, i].max())}
                         for i, t in enumerate(self.tasks)},
            "excluded_from_objective": self.excluded_tasks,
            "steps": len(self.history),
            "objective": {"first": self.history[0]["objective"], "last": self.history[-1]["objective"]} if self.history else None,
        }
        if self.mask is not None:  # kept: entries the mask does not zero (a Concrete draw keeps them all)
            kept = sum(int(m.count_nonzero()) for m in self.mask.values())
            total = sum(m.numel() for m in self.mask.values())
            out["mask"] = {"kept_fraction": kept / total,
                           "per_tensor": {k: float(m.count_nonzero()) / m.numel() for k, m in self.mask.items()}}
            if self.mask_probability:
                out["mask"]["mean_probability"] = (sum(float(p.double().sum()) for p in self.mask_probability.values())
                                                   / sum(p.numel() for p in self.mask_probability.values()))
        return out

    def save(self, folder: str | Path) -> Path:
        """coefficients.safetensors (`coefficients`, `mask/<tensor>`: uint8 for a bool mask — `final_mask="hard"`
        without rescaling — else float32, a Bernoulli draw's {0, 1} mask included) + coefficients.json."""
        from mtl.io import atomic_path, save_safetensors, user_path, write_json

        folder = user_path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"coefficients": self.coefficients.contiguous()}
        for k, m in (self.mask or {}).items():
            tensors[f"mask/{k}"] = m.to(torch.uint8 if m.dtype == torch.bool else torch.float32).cpu().contiguous()
        with atomic_path(folder / "coefficients.safetensors") as tmp:
            save_safetensors(tensors, tmp)
        write_json(folder / "coefficients.json", {**self.summary(), "history": self.history})
        return folder


def _objective_tasks(problem: MergeProblem, supervised: bool) -> tuple[list[str], list[str], list[int]]:
    """Tasks in the objective, tasks left out (no entropy), fine-tuned models whose λ stay fixed."""
    if supervised:
        return problem.tasks, [], []
    use = entropy_tasks({t: problem.task_kinds.get(t) for t in problem.tasks},
                        "use objective='supervised' with labeled=... (aTLAS) or a training-free merge")
    out = [t for t in problem.tasks if t not in use]
    if out:
        log.warning("entropy objective: task(s) %s have regression-like heads (%s) with no predictive "
                    "distribution; they are left out of the objective", out,
                    ", ".join(str(problem.task_kinds.get(t)) for t in out))
    frozen = [i for i, ts in enumerate(problem.vector_tasks) if not any(t in use for t in ts)]
    if frozen:
        log.warning("coefficients of %s stay at their initial value (no task of theirs is in the objective)",
                    [problem.vector_names[i] for i in frozen])
    return use, out, frozen


def _full_state(pretrained, finetuned, merged: dict[str, torch.Tensor], key_options) -> dict[str, torch.Tensor]:
    """Every key a training-free merge returns (buffers copied from θ0 etc.), with the learned tensors in."""
    from ..api import merge
    from ..engine import check_merged_variance
    from ..keys import is_bn_variance

    base = merge("task_arithmetic", pretrained, finetuned, lam=0.0, **key_options)
    for k, v in merged.items():
        base[k] = v.detach().to("cpu", base[k].dtype).clone()
        if is_bn_variance(k):  # learned under bn="merge"
            check_merged_variance(k, base[k])
    return base


def _key_record(key_options: Mapping[str, Any], recompute: bool) -> dict[str, Any]:
    """The key options as coefficients.json records them (a callable filter by its repr)."""
    def plain(v):
        return repr(v) if callable(v) else list(v) if isinstance(v, (list, tuple)) else v

    return {"bn": "recompute" if recompute else key_options.get("bn", "pretrained"),
            "include": plain(key_options.get("include")), "exclude": plain(key_options.get("exclude")),
            "task_keys": plain(key_options.get("task_keys", DEFAULT_TASK_KEYS))}


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_hparams(method: str, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hyperparameters with their defaults, key options) of a `learn` call: every check that needs no model
    or data, so that a CLI can refuse a bad setting before it loads a pool."""
    hp = method_defaults(method)
    kwargs = dict(kwargs)
    key_options = {k: kwargs.pop(k) for k in KEY_OPTIONS if k in kwargs}
    unknown = sorted(set(kwargs) - set(hp))
    if unknown:
        from mtl.registry import meant

        raise TypeError(f"{method}: unknown hyperparameter(s) {', '.join(unknown)}{meant(unknown, hp)}; valid: {', '.join(hp)}")
    hp.update(kwargs)
    check_bn(key_options.get("bn", "pretrained"))
    if hp.get("objective", "entropy") not in ("entropy", "supervised"):
        raise ValueError(f"objective must be 'entropy' or 'supervised', got {hp['objective']!r}")
    for k in ("steps", "inner_steps", "final_steps"):
        if k in hp and (isinstance(hp[k], bool) or not isinstance(hp[k], numbers.Integral) or hp[k] < 0):
            raise ValueError(f"{k} must be an int ≥ 0, got {hp[k]!r}")
    for k in ("lr", "coef_lr", "inner_lr"):
        if k in hp and not (_real(hp[k]) and 0 < hp[k] < float("inf")):
            raise ValueError(f"{k} must be a positive, finite number, got {hp[k]!r}")
    for k in ("temperature", "initial_logits", "threshold"):
        if k in hp and not _real(hp[k]):
            raise ValueError(f"{k} must be a number, got {hp[k]!r}")
    if "threshold" in hp:
        ConcreteMask.check(hp["temperature"], hp["initial_logits"], hp["threshold"], hp["rescale"], hp["final_mask"])
    if "seed" in hp:  # also the seeds derived from it (+ offsets) are reduced modulo 2**64: registry.derived_seed
        hp["seed"] = check_seed("seed", hp["seed"])
    if "channels_last" in hp and hp["channels_last"] is not None and not isinstance(hp["channels_last"], bool):
        raise ValueError(f"channels_last must be true or false (null: on for models built from folders), "
                         f"got {hp['channels_last']!r}")
    limit = hp.get("pool_limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 0):
        raise ValueError(f"pool_limit must be an int ≥ 0 (input values of one pooled pass; 0: task by task; null: "
                         f"{POOL_LIMIT} for models built from folders, 0 for a model= you pass), got {hp['pool_limit']!r}")
    if limit is not None:  # np.int64 and the like: one plain int from here on (Objective, coefficients.json)
        hp["pool_limit"] = int(limit)
    for k in ("init", "lam"):
        if k in hp and not (_real(hp[k]) and torch.isfinite(torch.tensor(float(hp[k])))):
            raise ValueError(f"{k} must be a finite number, got {hp[k]!r}")
    if hp.get("vectors", "plain") not in VECTORS:
        raise ValueError(f"vectors must be one of {VECTORS} ('ties': AdaMerging++), got {hp['vectors']!r}")
    if "k" in hp and not (_real(hp["k"]) and 0 < hp["k"] <= 100):
        raise ValueError(f"k (the % of each task vector TIES keeps) must be in (0, 100], got {hp['k']!r}")
    if "inner" in hp and hp["inner"] not in INNER:
        raise ValueError(f"unknown inner {hp['inner']!r}; valid: {', '.join(INNER)}")
    if "granularity" in hp and hp["granularity"] not in ("task", "layer"):  # "block" is aTLAS's (its `blocks`)
        raise ValueError(f"unknown granularity {hp['granularity']!r}; valid: task, layer")
    if "clamp" in hp and not isinstance(hp["clamp"], bool):  # "false" would be truthy
        raise ValueError(f"clamp must be true or false, got {hp['clamp']!r}")
    if hp.get("clamp") and "init" in hp and _real(hp["init"]) and not 0 <= hp["init"] <= 1:
        default = " (the default)" if LEARNED_METHODS[method].get("clamp") and "clamp" not in kwargs else ""
        raise ValueError(f"init must be in [0, 1] with clamp=true{default}, got {hp['init']!r}; "
                         "set clamp=false for an init outside [0, 1]")
    if "blocks" in hp:
        check_blocks(hp["blocks"])
    check_patterns(hp.get("learn_blocks"))
    idle = [k for k in unread(hp) if k in kwargs]
    if idle:  # set but never read: the run would record a setting it did not use
        raise ValueError(f"{method}: {unread_message(idle[0], kwargs[idle[0]], hp)}")
    return hp, key_options


def learn(method: str, pretrained, finetuned, *, unlabeled: Mapping[str, Iterable] | None = None,
          labeled: Mapping[str, Iterable] | None = None, model: torch.nn.Module | None = None,
          tasks: list[str] | None = None, device: str | torch.device = "cpu", progress: bool = True,
          callback: Callable | None = None, callback_every: int = 0, bn_max_batches: int | None = None,
          **kwargs: Any) -> LearnedMerge:
    """Learn a merge of `finetuned` into `pretrained` at test time; see docs/merging.md (Learned merging).

    `unlabeled`: {task: iterable of input batches} — required (aTLAS with `objective="supervised"`
    takes `labeled={task: iterable of (x, y)}` instead). `model`: a module with ``forward(x,
    tasks=[t])`` when the inputs are not model folders; `tasks`: its task name per fine-tuned model (with
    `model` only: model folders bring their tasks, so `tasks` without `model` is refused).
    `callback(step, merged_state)` runs every `callback_every` steps and may return metrics to record.
    Other keyword arguments: the method's hyperparameters (`merging.learned.method_defaults(method)`) and the key
    options of `merging.merge` (`include`, `exclude`, `task_keys`, `bn`, ...). With `bn="recompute"`
    each step runs all tasks' batches in one pooled pass with the shared BatchNorm layers in train mode
    (batch statistics of the current merged weights, differentiated through; see `loop`), and the
    result's statistics are re-estimated on one pass over every task's data (`merging.bn`), at most
    `bn_max_batches` batches per task (None: all of them; read only with `bn="recompute"`).
    """
    hp, key_options = check_hparams(method, kwargs)
    if isinstance(callback_every, bool) or not isinstance(callback_every, numbers.Integral) or callback_every < 0:
        raise ValueError(f"callback_every must be an int ≥ 0 (steps between callback calls; 0: never), "
                         f"got {callback_every!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step, merged_state), got {type(callback).__name__}")
    if callback is not None and not callback_every:
        log.warning("callback given with callback_every=0: it is never called; set callback_every=N")
    recompute = check_bn(key_options.get("bn", "pretrained")) == "recompute"
    if bn_max_batches is not None:
        if isinstance(bn_max_batches, bool) or not isinstance(bn_max_batches, numbers.Integral) or bn_max_batches < 1:
            raise ValueError(f"bn_max_batches must be an int ≥ 1 or None (every batch), got {bn_max_batches!r}")
        if not recompute:  # nothing re-estimates statistics: the cap would be recorded and never applied
            raise ValueError(f"bn_max_batches={bn_max_batches!r} is read only with bn='recompute' "
                             f"(here bn={key_options.get('bn', 'pretrained')!r}); remove it or set bn='recompute'")
        bn_max_batches = int(bn_max_batches)
    if recompute:  # θ0's statistics until they are re-estimated on data
        key_options["bn"] = "pretrained"
    supervised = hp.get("objective", "entropy") == "supervised"
    if supervised and labeled is None:
        raise ValueError("objective='supervised' needs labeled={task: iterable of (inputs, targets)} (k shots per task)")
    if not supervised and unlabeled is None:
        raise ValueError(f"{method} learns at test time from unlabeled data: pass unlabeled={{task: iterable of input batches}}")
    ignored = "unlabeled" if supervised and unlabeled is not None else "labeled" if not supervised and labeled is not None else None
    if ignored:  # one of the two is read; the other would be dropped without a word
        raise ValueError(f"{ignored}= is not read by {method} with objective={hp.get('objective', 'entropy')!r} "
                         f"(it reads {'labeled' if supervised else 'unlabeled'}=); leave it out")
    if hp["channels_last"] is None:  # our models take channels-last images; a caller's model may .view() them
        hp["channels_last"] = model is None
    if hp["pool_limit"] is None:  # a caller's model promises forward(x, tasks=[t]) only: one task per pass
        hp["pool_limit"] = POOL_LIMIT if model is None else 0
    if model is not None:
        require_model(model, "merging.learn(model=...)")
    # build_problem puts a caller's model in eval mode: each module's own mode comes back, also on a refusal
    with modes_restored(model) if model is not None else contextlib.nullcontext():
        problem = build_problem(pretrained, finetuned, model=model, tasks=tasks, device=device, **key_options)
        if hp.get("vectors") == "ties":
            problem.taus = ties_task_vectors(problem.taus, hp["k"])
        cuda = [problem.device.index or 0] if problem.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # seeded for the run; the caller's generator state comes back
            torch.manual_seed(int(hp["seed"]))
            return _learn(method, problem, hp, pretrained, finetuned, key_options, unlabeled, labeled, supervised,
                          progress, callback, callback_every, recompute, bn_max_batches)


def _learn(method, problem, hp, pretrained, finetuned, key_options, unlabeled, labeled, supervised, progress,
           callback, callback_every, recompute, bn_max_batches) -> LearnedMerge:
    if recompute:  # refused before learning, not after it (a slimmable model's statistics would stay as they were)
        check_recompute_model(problem.model)
    obj_tasks, excluded, frozen_cols = _objective_tasks(problem, supervised)
    given = labeled if supervised else unlabeled
    if not isinstance(given, Mapping):
        raise TypeError(f"{'labeled' if supervised else 'unlabeled'} must map each task to an iterable of batches "
                        f"({{task: batches}}), got {type(given).__name__}")
    extra = sorted(set(given) - set(problem.tasks), key=str)
    if extra:
        why = " (task names are strings)" if any(not isinstance(t, str) for t in extra) else ""
        raise ValueError(f"{'labeled' if supervised else 'unlabeled'} names task(s) {extra} that no fine-tuned "
                         f"model has{why}; tasks: {problem.tasks}")
    # asked of the objects, not by calling iter(): a DataLoader would start its workers and draw a seed
    one_shot = [t for t, batches in given.items() if isinstance(batches, Iterator)] if recompute else []
    if one_shot:  # learning would use up what the statistics' pass re-reads
        raise ValueError(f"bn='recompute' reads every task's batches again after learning; unlabeled[{one_shot[0]!r}] "
                         "is a one-shot iterator (a generator): pass a list or a DataLoader")
    bn_options = {"task_keys": key_options["task_keys"]} if "task_keys" in key_options else {}
    objective = Objective(problem, obj_tasks, unlabeled, labeled, supervised, recompute, bn_options, hp["pool_limit"],
                          hp["channels_last"])
    frozen = problem.frozen()
    trace = Trace()
    steps = int(hp["steps"])
    granularity = hp.get("granularity", "block" if method == "atlas" else "task")
    layout = make_layout(problem.keys, granularity, hp.get("blocks", "tensor"))
    cb = dict(callback=callback, callback_every=int(callback_every))

    mask = probs = None
    if method in ("adamerging", "atlas"):
        rows = layout.select(hp.get("learn_blocks"))
        learner = CoefficientLearner(problem, layout, hp["init"], hp["lr"], hp["clamp"], rows, frozen_cols)
        learner.run(objective, frozen, steps, trace, method, progress, **cb)
        merged = learner.merged(detach=True)
        coef = learner.values()
    else:
        if method == "concrete_ta":
            inner, reset = None, False
            lam = torch.full((1, problem.T), float(hp["lam"]), device=problem.device, dtype=problem.coef_dtype)
            coefficients = lambda: lam  # noqa: E731
            group_of = {k: 0 for k in problem.keys}
        else:
            reset = hp["inner"] == "reset"
            inner = CoefficientLearner(problem, layout, hp["init"], hp["inner_lr"] if reset else hp["coef_lr"],
                                       hp["clamp"], None, frozen_cols, "inner_lr" if reset else "coef_lr")
            coefficients = lambda: inner.coef  # noqa: E731
            group_of = layout.group_of
        cm = ConcreteMask(problem, hp["temperature"], hp["initial_logits"], hp["lr"], hp["seed"], hp["threshold"],
                          hp["rescale"], hp["final_mask"])
        cm.run(objective, frozen, steps, trace, method, coefficients, inner, int(hp.get("inner_steps", 1)), progress,
               reset_inner=reset, **cb)
        mask, probs = cm.final(), cm.probabilities()
        fmask = {k: m.to(problem.theta0[k].dtype) for k, m in mask.items()}
        if inner is not None:
            if reset:  # the final AdaMerging starts again from init, with its own Adam at coef_lr
                inner.reset(hp["coef_lr"], "coef_lr")
            inner.run(objective, frozen, int(hp["final_steps"]), trace, f"{method} (λ on the final mask)",
                      progress, mask=fmask, phase="coefficients", **cb)
            coef = inner.values()
        else:
            coef = lam[0].cpu().clone()
            layout = make_layout(problem.keys, "task")
        with torch.no_grad():
            merged = problem.merged(coefficients().detach(), group_of, fmask)
        mask = {k: m.cpu() for k, m in mask.items()}
        probs = {k: p.cpu() for k, p in probs.items()}

    state = _full_state(pretrained, finetuned, merged, key_options)
    hparams = {**{k: v for k, v in hp.items() if k not in unread(hp)}, **_key_record(key_options, recompute)}
    if recompute:
        hparams["bn_max_batches"] = bn_max_batches
        stats = bn_statistics(problem.model, pooled_batches(given, bn_max_batches), params={**frozen, **merged},
                              task=obj_tasks[0], **objective.bn_options)
        state.update({k: v.to("cpu", state[k].dtype) for k, v in stats.items() if k in state})
    return LearnedMerge(method, state, coef, layout.groups, list(problem.vector_names), layout.granularity, hparams,
                        trace.steps, mask, probs, excluded)
