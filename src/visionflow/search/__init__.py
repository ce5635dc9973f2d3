"""AutoML search around the one training loop: spaces, studies and (later) budgets and workers.

The training loop never imports Optuna: it receives a :class:`TrialHandle` (``params``,
``report``, ``should_prune``, ``set_info``) and raises :class:`TrialPruned` to stop early.
:class:`Study` is the only place that talks to Optuna (ask/tell, pruning, storage).
"""

from __future__ import annotations

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
    "SearchSpace",
    "StorageError",
    "Study",
    "TrialHandle",
    "TrialPruned",
    "load_space",
    "open_storage",
]
