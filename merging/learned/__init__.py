"""Learned merging at test time: AdaMerging, aTLAS, Concrete subspace (see docs/merging.md).

    merging.learn(method, pretrained, finetuned, unlabeled={task: batches}, **hparams) -> LearnedMerge
"""
from .api import LEARNED_METHODS, LearnedMerge, check_hparams, learn, method_defaults
from .layout import GRANULARITIES, make_layout
from .objective import entropy, has_entropy
from .problem import MergeProblem, build_problem

__all__ = ["LEARNED_METHODS", "LearnedMerge", "check_hparams", "learn", "method_defaults", "GRANULARITIES", "make_layout",
           "entropy", "has_entropy", "MergeProblem", "build_problem"]
