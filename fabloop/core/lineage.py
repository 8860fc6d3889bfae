"""Where a challenger comes from: its lineage tags and the Optuna study it was searched in.

The same tags go on the training run and on the registered version, so either one
answers "which windows, which Kafka offsets, which data, which drift check".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

from fabloop.core.policies import RetrainPolicy

# Longest text kept in a lineage tag.
MAX_TAG_TEXT = 5000

# Policy fields that decide what a trial's value means: the rows it tunes on (split
# shares), the folds it is scored on, the binning and the boosting budget. Workers that
# share a study must agree on them; the budget (n_trials, timeout_s) and seed may differ.
SEARCH_SETUP_FIELDS = (
    "holdout_share", "validation_share", "n_folds", "min_train_share", "max_bin",
    "max_boost_rounds", "early_stopping_rounds",
)


def offsets_text(offsets: Mapping[str, Mapping[str, Sequence[int]]]) -> str:
    """``w<window>[<topic-partition>:<low>-<high>,…] …``, windows and partitions sorted."""
    parts = []
    for window, ranges in sorted(offsets.items()):
        parts.append(f"w{window}[" + ",".join(f"{tp}:{lo}-{hi}" for tp, (lo, hi) in sorted(ranges.items())) + "]")
    return " ".join(parts)


def lineage(
    model: str,
    reasons: Sequence[str],
    window_ids: Sequence[int],
    offsets: Mapping[str, Mapping[str, Sequence[int]]],
    data_digest: str,
    drift_check_id: int | None,
    flow_run_id: str | None,
) -> dict[str, str]:
    """The ``fabloop.*`` lineage tags of a retraining (long texts cut to :data:`MAX_TAG_TEXT`)."""
    return {
        "fabloop.model": model,
        "fabloop.trigger_reasons": "; ".join(reasons)[:MAX_TAG_TEXT],
        "fabloop.window_ids": ",".join(map(str, window_ids)),
        "fabloop.kafka_offsets": offsets_text(offsets)[:MAX_TAG_TEXT],
        "fabloop.data_hash": data_digest,
        "fabloop.drift_check_id": str(drift_check_id or ""),
        "fabloop.retrain_flow_run": flow_run_id or "",
    }


def study_name(model: str, data_digest: str, policy: RetrainPolicy) -> str:
    """One Optuna study per model, training data and search set-up.

    The data hash alone is not enough: a retrain of the same wafers under an edited
    policy (other folds, other round budget) would load the earlier study, mix trial
    values scored on different folds, and take its best trial (params and rounds)
    from a search it never ran.
    """
    setup = json.dumps({f: getattr(policy, f) for f in SEARCH_SETUP_FIELDS}, sort_keys=True)
    return f"{model}-{data_digest[:12]}-{hashlib.sha256(setup.encode()).hexdigest()[:8]}"
