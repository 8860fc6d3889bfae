"""fabloop.core.lineage: the lineage tags, the offsets text and the Optuna study name."""

from __future__ import annotations

import hashlib
import json

from fabloop.core.lineage import SEARCH_SETUP_FIELDS, lineage, offsets_text, study_name
from fabloop.core.policies import RetrainPolicy


def test_offsets_text_sorts_windows_and_partitions() -> None:
    offsets = {"12": {"sensors-1": [40, 80], "sensors-0": [10, 55]}, "11": {"sensors-0": [0, 9]}}
    assert offsets_text(offsets) == "w11[sensors-0:0-9] w12[sensors-0:10-55,sensors-1:40-80]"
    assert offsets_text({}) == ""


def test_lineage_tags() -> None:
    tags = lineage("etch-ch1", ["drift", "manual"], [11, 12], {"11": {"s-0": [0, 9]}}, "abc123", 7, "run-1")
    assert tags == {
        "fabloop.model": "etch-ch1",
        "fabloop.trigger_reasons": "drift; manual",
        "fabloop.window_ids": "11,12",
        "fabloop.kafka_offsets": "w11[s-0:0-9]",
        "fabloop.data_hash": "abc123",
        "fabloop.drift_check_id": "7",
        "fabloop.retrain_flow_run": "run-1",
    }


def test_lineage_of_a_manual_retraining_outside_a_flow_run() -> None:
    tags = lineage("etch-ch1", ["manual"], [], {}, "abc123", None, None)
    assert tags["fabloop.window_ids"] == tags["fabloop.kafka_offsets"] == ""
    assert tags["fabloop.drift_check_id"] == tags["fabloop.retrain_flow_run"] == ""


def test_lineage_cuts_long_texts_to_tag_size() -> None:
    offsets = {str(w): {f"sensors-{p}": [0, 10**6] for p in range(20)} for w in range(100)}
    tags = lineage("m", ["x" * 6000], list(range(100)), offsets, "d", 0, None)
    assert tags["fabloop.trigger_reasons"] == "x" * 5000
    assert tags["fabloop.kafka_offsets"] == offsets_text(offsets)[:5000]
    assert tags["fabloop.window_ids"] == ",".join(map(str, range(100)))  # not cut
    assert tags["fabloop.drift_check_id"] == ""  # 0 is no check id


def test_study_name_pins_model_data_and_search_setup() -> None:
    policy = RetrainPolicy()
    setup = json.dumps({f: getattr(policy, f) for f in SEARCH_SETUP_FIELDS}, sort_keys=True)
    expected = f"etch-ch1-0123456789ab-{hashlib.sha256(setup.encode()).hexdigest()[:8]}"
    assert study_name("etch-ch1", "0123456789abcdef", policy) == expected


def test_study_name_changes_with_the_search_setup_only() -> None:
    base = RetrainPolicy()
    name = study_name("m", "d" * 64, base)
    assert study_name("m", "d" * 64, base.model_copy(update={"n_trials": base.n_trials + 5, "seed": 99})) == name
    assert study_name("m", "d" * 64, base.model_copy(update={"n_folds": base.n_folds + 1})) != name
    assert study_name("m", "e" * 64, base) != name
    assert study_name("other", "d" * 64, base) != name


def test_search_setup_fields_are_policy_fields() -> None:
    assert set(SEARCH_SETUP_FIELDS) <= set(RetrainPolicy.model_fields)
    assert {"n_trials", "timeout_s", "seed"}.isdisjoint(SEARCH_SETUP_FIELDS)
