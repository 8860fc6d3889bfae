"""Training-set gate, time-ordered split, data hash and holdout metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from fabloop.core.policies import RetrainPolicy
from fabloop.core.training import DataGateError, data_hash, gate_training_set, holdout_metrics, time_ordered_split
from tests.helpers.secom_table import LABEL_COL, TIME_COL, SecomShape, secom_table

FEATURES = [f"f{i}" for i in range(8)]


def wafer_frame(n: int = 300, fail_every: int = 7, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, len(FEATURES))), columns=FEATURES)
    df["fail"] = (np.arange(n) % fail_every == 0).astype(int)
    df["ts"] = pd.Timestamp("2024-03-01", tz="UTC") + pd.to_timedelta(np.arange(n) * 90, unit="s")
    df["wafer"] = [f"L{i // 25:04d}-{i % 25:02d}" for i in range(n)]
    return df


@pytest.fixture
def policy() -> RetrainPolicy:
    return RetrainPolicy(min_rows=100, min_class_count=10, max_missing_share=0.5)


# --- gate: happy path ------------------------------------------------------------


def test_gate_passes_clean_set_and_reports_counts(policy):
    df = wafer_frame()
    report = gate_training_set(df, "fail", FEATURES, policy, expected_features=FEATURES)
    assert report.n_rows == 300
    assert report.n_fail == int(df["fail"].sum()) == 43
    assert report.n_pass == 300 - 43
    assert report.features == FEATURES
    assert report.dropped_constant == []


def test_constant_features_are_dropped_and_listed(policy):
    df = wafer_frame()
    df["f2"] = 3.3
    df.loc[:5, "f5"] = np.nan  # constant apart from missing values is still constant
    df.loc[6:, "f5"] = -1.0
    report = gate_training_set(df, "fail", FEATURES, policy)
    assert report.dropped_constant == ["f2", "f5"]
    assert "f2" not in report.features and "f5" not in report.features
    assert len(report.features) == len(FEATURES) - 2


# --- gate: refusals ---------------------------------------------------------------


def test_one_class_only_is_refused(policy):
    df = wafer_frame()
    df["fail"] = 0
    with pytest.raises(DataGateError, match=r"'fail'.*fail \(1\) has 0 rows.*min_class_count=10"):
        gate_training_set(df, "fail", FEATURES, policy)


def test_too_few_fails_is_refused_with_counts(policy):
    df = wafer_frame()
    df["fail"] = 0
    df.loc[[3, 50, 99], "fail"] = 1
    with pytest.raises(DataGateError, match=r"3 rows < min_class_count=10 \(fail=3, pass=297\)"):
        gate_training_set(df, "fail", FEATURES, policy)


def test_mostly_missing_feature_is_named(policy):
    df = wafer_frame()
    df.loc[df.index[: int(0.95 * len(df))], "f6"] = np.nan
    with pytest.raises(DataGateError, match=r"'f6' 95% missing") as exc:
        gate_training_set(df, "fail", FEATURES, policy.model_copy(update={"missing_action": "fail"}))
    assert "'f1'" not in str(exc.value)


def test_mostly_missing_feature_can_be_dropped_instead(policy):
    df = wafer_frame()
    df.loc[df.index[:285], "f6"] = np.nan
    report = gate_training_set(df, "fail", FEATURES, policy.model_copy(update={"missing_action": "drop"}))
    assert report.dropped_missing == {"f6": 0.95}
    assert "f6" not in report.features


def test_dead_and_mostly_missing_sensors_are_dropped_and_listed_by_default():
    df = wafer_frame()
    df["f1"] = np.nan  # dead: never read
    df.loc[df.index[:240], "f6"] = np.nan  # 80 % missing
    df.loc[df.index[:90], "f3"] = np.nan  # 30 % missing: under the limit, kept
    df["f4"] = 7.0  # constant
    report = gate_training_set(df, "fail", FEATURES, RetrainPolicy(min_rows=100))
    assert RetrainPolicy().missing_action == "drop"
    assert report.features == ["f0", "f2", "f3", "f5", "f7"]
    assert report.dropped_missing == {"f1": 1.0, "f6": 0.8}
    assert report.dead == ["f1"] and report.dropped_constant == ["f4"]
    assert report.n_sensors == 8 and report.n_dropped == 3
    why = report.dropped()
    assert why == {
        "f1": "dead: no reading on any wafer",
        "f6": "mostly missing: 80% of wafers > max_missing_share 50%",
        "f4": "constant: the same value on every wafer that reads it",
    }
    assert report.dropped_summary() == "3 of 8 sensors dropped: 1 dead, 1 mostly missing, 1 constant"
    section = report.dropped_markdown()
    assert report.dropped_summary() in section
    assert all(f"| `{c}` | {w} |" in section for c, w in why.items()), section
    assert gate_training_set(wafer_frame(), "fail", FEATURES, RetrainPolicy(min_rows=100)).dropped_markdown() == ""


def test_more_sensors_dropped_than_the_cap_is_refused_naming_the_field():
    df = wafer_frame()
    df[["f0", "f1", "f2"]] = np.nan  # three dead sensors
    df.loc[df.index[:200], "f3"] = np.nan  # one mostly missing
    df["f4"] = 0.0  # one constant: 5 of 8 would go
    with pytest.raises(DataGateError) as exc:
        gate_training_set(df, "fail", FEATURES, RetrainPolicy(min_rows=100))
    assert str(exc.value).startswith(
        "5 of 8 sensors (62%) would be dropped, more than max_dropped_share=50% of the RetrainPolicy: "
        "3 dead, 1 mostly missing, 1 constant ('f0', 'f1', 'f2', 'f3', 'f4')"
    ), exc.value
    # At the cap exactly the set passes; a raised cap lets the rest through.
    df["f4"] = np.random.default_rng(1).normal(size=len(df))
    assert gate_training_set(df, "fail", FEATURES, RetrainPolicy(min_rows=100)).n_dropped == 4
    df["f4"] = 0.0
    report = gate_training_set(df, "fail", FEATURES, RetrainPolicy(min_rows=100, max_dropped_share=0.7))
    assert report.features == ["f5", "f6", "f7"]


def test_a_cap_refusal_names_the_block_and_the_field_to_change():
    from fabloop.tasks.retraining import remedy_markdown, remedy_text

    df = wafer_frame()
    df[["f0", "f1", "f2", "f3", "f4"]] = np.nan
    with pytest.raises(DataGateError) as exc:
        gate_training_set(df, "fail", FEATURES, RetrainPolicy(min_rows=100))
    reason = str(exc.value)
    markdown = remedy_markdown(reason, "fab-7")
    assert "`fabloop RetrainPolicy` block **`fab-7`**" in markdown
    assert "field `policy.max_dropped_share`, `policy.max_missing_share`." in markdown, markdown
    assert remedy_text(reason, "fab-7").startswith(
        "to change: fabloop RetrainPolicy block 'fab-7', field policy.max_dropped_share, policy.max_missing_share ("
    )
    # A refusal no setting lifts sends the engineer to the data, still naming the block.
    assert remedy_text("label column 'fail' has 3 missing values", "fab-7") == (
        "to change: the data; no field of the fabloop RetrainPolicy block 'fab-7' lifts this limit"
    )


def test_a_secom_shaped_first_training_passes_the_default_gate_and_lists_the_dead_sensors():
    """Hundreds of unnamed sensors, over a hundred constant, dozens dead in the first months, ~7 % fails."""
    frame = secom_table(SecomShape(constant_sensors=120))
    first = frame.iloc[:800].copy()  # the first export, as the replay test cuts it
    constant, sparse = set(frame.attrs["constant"]), set(frame.attrs["sparse"])
    sensors = [c for c in frame.columns if c not in (TIME_COL, LABEL_COL)]
    spare = [c for c in sensors if c not in constant | sparse and int(c) not in SecomShape().informative]
    dead = spare[:40]  # not read at all before the tool's FDC upgrade
    first[dead] = np.nan
    first["failed"] = (first.pop(LABEL_COL) == 1).astype(int)
    first["ts"] = pd.to_datetime(first.pop(TIME_COL), format="%d/%m/%Y %H:%M:%S")

    policy = RetrainPolicy()  # the defaults a new user gets
    report = gate_training_set(first, "failed", sensors, policy)
    assert 0.05 < report.fail_rate < 0.09 and report.n_sensors == 590
    assert report.dead == dead
    assert set(report.dropped_constant) == constant
    assert report.dropped() == {
        **{c: "dead: no reading on any wafer" for c in dead},
        **{c: "constant: the same value on every wafer that reads it" for c in report.dropped_constant},
    }
    assert len(report.features) == 590 - 40 - 120 and sparse <= set(report.features)
    time_ordered_split(first, "ts", policy, label_col="failed")  # and it splits into three labelled parts


def test_too_few_rows_is_refused(policy):
    df = wafer_frame(n=60)
    with pytest.raises(DataGateError, match=r"too few rows: 60 < min_rows=100"):
        gate_training_set(df, "fail", FEATURES, policy)


def test_unexpected_feature_set_names_the_difference(policy):
    df = wafer_frame()
    df["rf_power_new"] = 1.0
    features = [*FEATURES[:-1], "rf_power_new"]
    with pytest.raises(DataGateError, match=r"missing expected features 'f7'; unexpected features 'rf_power_new'"):
        gate_training_set(df, "fail", features, policy, expected_features=FEATURES)


def test_absent_column_is_named(policy):
    df = wafer_frame().drop(columns=["f3"])
    with pytest.raises(DataGateError, match=r"not in the training frame: 'f3'"):
        gate_training_set(df, "fail", FEATURES, policy)


def test_non_numeric_feature_is_named(policy):
    df = wafer_frame()
    df["f4"] = df["f4"].astype(str)
    with pytest.raises(DataGateError, match=r"non-numeric feature columns: 'f4' \(object\)"):
        gate_training_set(df, "fail", FEATURES, policy)


def test_label_must_be_binary(policy):
    df = wafer_frame()
    df.loc[10, "fail"] = 2
    with pytest.raises(DataGateError, match=r"'fail' must be 0 \(pass\) / 1 \(fail\); found 2"):
        gate_training_set(df, "fail", FEATURES, policy)


def test_missing_labels_are_counted(policy):
    df = wafer_frame()
    df["fail"] = df["fail"].astype(float)
    df.loc[[1, 2, 3], "fail"] = np.nan
    with pytest.raises(DataGateError, match=r"'fail' has 3 missing values of 300 rows"):
        gate_training_set(df, "fail", FEATURES, policy)


def test_infinite_sensor_value_is_named(policy):
    df = wafer_frame()
    df.loc[[4, 9], "f0"] = np.inf
    with pytest.raises(DataGateError, match=r"'f0' \(2 rows\)"):
        gate_training_set(df, "fail", FEATURES, policy)


def test_policy_needs_exactly_one_operating_point():
    with pytest.raises(ValidationError, match="exactly one of target_recall or threshold"):
        RetrainPolicy(target_recall=0.8, threshold=0.5)
    assert RetrainPolicy(target_recall=None, threshold=0.5).threshold == 0.5


# --- split ------------------------------------------------------------------------


def test_split_is_time_ordered_with_newest_wafers_held_out(policy):
    df = wafer_frame(n=400).sample(frac=1.0, random_state=3)  # arrival order != process order
    split = time_ordered_split(df, "ts", policy)
    assert sum(split.sizes().values()) == 400
    assert split.sizes() == {"train": 280, "validation": 60, "holdout": 60}
    assert split.train["ts"].max() < split.validation["ts"].min()
    assert split.validation["ts"].max() < split.holdout["ts"].min()
    assert split.holdout["ts"].max() == df["ts"].max()
    assert split.train["ts"].is_monotonic_increasing
    assert split.train_end == split.train["ts"].max()
    all_wafers = set(split.train["wafer"]) | set(split.validation["wafer"]) | set(split.holdout["wafer"])
    assert all_wafers == set(df["wafer"])


def test_split_keeps_wafers_with_the_same_timestamp_together(policy):
    df = wafer_frame(n=100)
    # Wafers 65..74 were measured in one batch: same timestamp across the train/val cut (70).
    df.loc[65:74, "ts"] = df.loc[65, "ts"]
    split = time_ordered_split(df, "ts", policy)
    batch = set(df.loc[65:74, "wafer"])
    assert batch <= set(split.validation["wafer"]) or batch <= set(split.train["wafer"])
    assert split.train["ts"].max() < split.validation["ts"].min()


def test_split_refuses_single_class_holdout(policy):
    df = wafer_frame(n=200)
    df.loc[170:, "fail"] = 0
    with pytest.raises(DataGateError, match=r"holdout part \(30 rows\) has only label 'fail'=0"):
        time_ordered_split(df, "ts", policy, label_col="fail")


def test_split_refuses_missing_timestamps(policy):
    df = wafer_frame(n=100)
    df.loc[[5, 6], "ts"] = pd.NaT
    with pytest.raises(DataGateError, match=r"'ts' has 2 missing values"):
        time_ordered_split(df, "ts", policy)


# --- hash --------------------------------------------------------------------------


def test_data_hash_is_content_based():
    df = wafer_frame()
    h = data_hash(df)
    assert len(h) == 64 and int(h, 16) >= 0
    assert data_hash(df.copy()) == h
    assert data_hash(df[list(reversed(df.columns))]) == h  # column order is not content
    assert data_hash(df.set_index("wafer", drop=False)) == h  # neither is the index
    changed = df.copy()
    changed.loc[17, "f3"] += 1e-9
    assert data_hash(changed) != h
    assert data_hash(df.rename(columns={"f3": "f3_v2"})) != h
    assert data_hash(df.iloc[::-1]) != h  # row order is process order: it matters


# --- metrics ------------------------------------------------------------------------


def test_holdout_metrics_at_target_recall():
    y = np.array([0, 0, 0, 0, 1, 0, 1, 0, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.4, 0.7, 0.5, 0.05, 0.35])
    m = holdout_metrics(y, s, RetrainPolicy(target_recall=0.6))
    # ceil(0.6 * 3) = 2 fails must be caught: threshold at the 2nd-highest fail score.
    assert m["threshold"] == 0.7
    assert m["recall_at_op"] == pytest.approx(2 / 3)
    assert m["precision_at_op"] == pytest.approx(2 / 3)  # alarms: 0.9 (pass), 0.8, 0.7
    # 21 pass/fail pairs; (0.35 fail) loses to 0.9, 0.4, 0.5 and (0.7, 0.8) to 0.9.
    assert m["roc_auc"] == pytest.approx(16 / 21)
    assert m["fail_rate"] == pytest.approx(0.3)
    assert 0 < m["pr_auc"] < 1


def test_holdout_metrics_at_fixed_threshold_and_single_class():
    y = np.array([0, 1, 0, 1])
    s = np.array([0.2, 0.6, 0.7, 0.1])
    m = holdout_metrics(y, s, RetrainPolicy(target_recall=None, threshold=0.5))
    assert (m["recall_at_op"], m["precision_at_op"]) == (0.5, 0.5)
    with pytest.raises(DataGateError, match="single class"):
        holdout_metrics([0, 0, 0], [0.1, 0.2, 0.3], RetrainPolicy())


def test_holdout_metrics_carry_their_uncertainty():
    rng = np.random.default_rng(7)
    y = (rng.random(300) < 0.08).astype(int)
    s = 1 / (1 + np.exp(-(rng.normal(size=300) + 1.5 * y - 2)))
    m = holdout_metrics(y, s, RetrainPolicy(gate_alpha=0.05))
    for name in ("roc_auc", "pr_auc", "recall_at_op", "precision_at_op", "fail_rate"):
        assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"], name
    # DeLong: the interval is the AUC ± 1.96 SE, and the variance is kept for later performance checks.
    half = 1.959964 * m["roc_auc_var"] ** 0.5
    assert m["roc_auc_ci_low"] == pytest.approx(max(0.0, m["roc_auc"] - half))
    assert m["roc_auc_p_chance"] < 0.001
    # A wider confidence level widens every interval.
    wide = holdout_metrics(y, s, RetrainPolicy(gate_alpha=0.01))
    assert wide["roc_auc_ci_high"] - wide["roc_auc_ci_low"] > m["roc_auc_ci_high"] - m["roc_auc_ci_low"]
