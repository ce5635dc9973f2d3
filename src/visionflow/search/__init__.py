"""AutoML search around the one training loop: spaces, studies, the budgeted run and workers.

The training loop never imports Optuna: it receives a :class:`TrialHandle` (``params``,
``report``, ``should_prune``, ``set_info``) and raises :class:`TrialPruned` to stop early.
:class:`Study` is the only place that talks to Optuna (ask/tell, pruning, storage).
"""

from __future__ import annotations

from visionflow.search.runner import SearchResult, build_space, run_worker, search_classifier
from visionflow.search.space import (
    PARAM_NAMES,
    Categorical,
    Dimension,
    Fixed,
    FloatRange,
    IntRange,
    SearchSpace,
    load_space,
)
from visionflow.search.study import (
    StorageError,
    Study,
    TrialHandle,
    TrialPruned,
    open_storage,
)

__all__ = [
    "PARAM_NAMES",
    "Categorical",
    "Dimension",
    "Fixed",
    "FloatRange",
    "IntRange",
    "SearchResult",
    "SearchSpace",
    "StorageError",
    "Study",
    "TrialHandle",
    "TrialPruned",
    "build_space",
    "load_space",
    "open_storage",
    "run_worker",
    "search_classifier",
]
