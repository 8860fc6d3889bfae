"""The retrain flow end to end: simulated events → event store → Optuna/LightGBM → MLflow.

The fab is simulated once per module (one tool per scenario), published to a
private broker and ingested by the real ``fabloop ingest`` into the stack's event
store. ``retrain`` then runs in this process as a real Prefect flow run against the
stack's Prefect server, logs to and registers in the stack's MLflow server and keeps
its Optuna study in the store's database. Everything is read back from those
servers: the registry, the runs, the artifacts, the Prefect event feed, the study.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pandas as pd
import pytest

from fabloop.adapters import registry, store
from fabloop.adapters.store import make_engine
from fabloop.blocks import ModelCatalog
from fabloop.core.names import CHALLENGER_REJECTED, RETRAIN_REJECTED
from fabloop.core.policies import RetrainPolicy
from fabloop.core.training import data_hash, gate_training_set
from fabloop.flows.retrain import retrain
from tests.helpers.prefect_api import artifacts_of
from tests.helpers.promotion import events
from tests.helpers.retrain import (
    MISSING_SENSOR,
    Fab,
    build_fab,
    mlflow_client,
    save_retrain_policy,
    start_broker,
    versions,
)
from tests.helpers.stack import RunningStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REASONS = ["feature drift on 9 of 30 sensors (share 0.30 > 0.25)", "fail rate 0.09 > champion 0.06 + 0.02"]
N_TRIALS = 8


@pytest.fixture(scope="module")
def fab(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Fab:
    running = start_broker(tmp_path_factory.mktemp("retrain-broker"))
    try:
        return build_fab(stack, running.broker)
    finally:
        running.stop()


@dataclass
class Trained:
    model: str
    summary: dict[str, Any]
    window_ids: list[int]
    windows: list[tuple[int, dict[str, Any]]]
    seconds: float


@pytest.fixture(scope="module")
def trained(stack: RunningStack, fab: Fab) -> Trained:
    """One retrain of the GOOD tool's model, as a drift check of its last two windows would start it."""
    model = fab.models["GOOD"]
    windows = fab.windows(stack, "GOOD")
    assert len(windows) == 5, windows  # 2000 wafers in windows of 400
    window_ids = [w for w, _ in windows[-2:]]
    t0 = time.monotonic()
    summary = retrain(model=model, reasons=REASONS, window_ids=window_ids,
                      policy_block=save_retrain_policy(n_trials=N_TRIALS), catalog_block=fab.catalog, promotion="off")
    return Trained(model, summary, window_ids, windows, time.monotonic() - t0)


def _training_set(stack: RunningStack, fab: Fab, key: str) -> pd.DataFrame:
    """The scenario's labelled wafers, read from the store independently of the flow."""
    spec = ModelCatalog.load(fab.catalog).value().models[0]

    async def run() -> pd.DataFrame:
        engine = make_engine(stack.ep.database_url)
        try:
            return await store.training_frame(engine, spec, {"tool": f"{fab.prefix}-{key}"})
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_retrain_registers_a_challenger_with_its_lineage(stack: RunningStack, fab: Fab, trained: Trained) -> None:
    client, model, summary = mlflow_client(stack), trained.model, trained.summary
    print(f"retrain of {model}: {trained.seconds:.1f} s")
    [mv] = versions(stack, model)
    assert mv.version == summary["version"] == "1"
    assert client.get_model_version_by_alias(model, "challenger").version == mv.version
    assert mv.run_id == summary["run_id"]

    # The lineage, on the version and on its training run: trigger, windows, offsets, data.
    frame = _training_set(stack, fab, "GOOD")
    assert len(frame) == summary["rows"] == 2000
    gate = gate_training_set(frame, store.LABEL, store.sensor_columns(frame), RetrainPolicy())
    digest = data_hash(frame[["event_id", "ts", *gate.features, store.LABEL]])
    run_tags = client.get_run(mv.run_id).data.tags
    for tags in (mv.tags, run_tags):
        assert tags["fabloop.model"] == model
        assert tags["fabloop.trigger_reasons"] == "; ".join(REASONS)
        assert tags["fabloop.window_ids"] == ",".join(map(str, trained.window_ids))
        assert tags["fabloop.data_hash"] == digest
        offsets = tags["fabloop.kafka_offsets"]
        for window_id, ranges in trained.windows[-2:]:
            assert f"w{window_id}[" in offsets
            assert ranges, f"window {window_id} recorded no offsets"
            for tp, (lo, hi) in ranges.items():
                assert tp.startswith("fab.sensor.readings:") and lo <= hi
                assert f"{tp}:{lo}-{hi}" in offsets
        for window_id, _ in trained.windows[:-2]:  # only the triggering windows
            assert f"w{window_id}[" not in offsets
    # No champion yet: the gate judges the floor only.
    assert mv.tags["fabloop.validation"] == "passed"
    assert "no champion" in mv.tags["fabloop.validation_reasons"]
    assert summary["champion"] is None and summary["gate"]["passed"]


def test_holdout_metrics_model_dataset_and_plots_are_logged(stack: RunningStack, fab: Fab, trained: Trained) -> None:
    client, model, summary = mlflow_client(stack), trained.model, trained.summary
    run = client.get_run(summary["run_id"])
    metrics = run.data.metrics
    # The simulator's signal is learnable: judged on the most recent wafers only.
    assert summary["challenger"]["roc_auc"] > 0.8, summary["challenger"]
    assert metrics["holdout_roc_auc"] == pytest.approx(summary["challenger"]["roc_auc"])
    for key in (
        "holdout_pr_auc", "holdout_recall_at_op", "holdout_precision_at_op", "cv_roc_auc_lgbm", "cv_roc_auc_baseline"
    ):
        assert key in metrics
    assert metrics["holdout_recall_at_op"] >= 0.8  # the policy's operating point: catch 80% of fails
    params = run.data.params
    assert int(params["rows"]) == 2000 and int(params["n_trials"]) == N_TRIALS
    n_train, n_hold = int(params["split_train"]), int(params["split_holdout"])
    assert n_train + int(params["split_validation"]) + n_hold == 2000
    assert summary["challenger"]["n_rows"] == n_hold
    # What the data gate left out of training: here nothing, every simulated sensor reads.
    assert (params["sensors"], params["dropped_dead"], params["dropped_missing"]) == ("30", "0", "0")

    # The model: signature and input example, loadable from the registry and able to score.
    uri = f"models:/{model}/{summary['version']}"
    info = mlflow.models.get_model_info(uri)
    features = info.signature.inputs.input_names()
    assert len(features) >= 25 and all(f not in store.META for f in features)
    assert info.signature.outputs is not None
    assert info.saved_input_example_info is not None
    loaded = mlflow.pyfunc.load_model(uri)
    example = loaded.input_example
    assert list(example.columns) == features and len(example) == 5
    assert len(loaded.predict(example)) == 5
    # Its pip requirements pin what trained it (named, not inferred).
    from importlib.metadata import version

    requirements = Path(mlflow.artifacts.download_artifacts(f"{uri}/requirements.txt")).read_text().split()
    flavour = "lightgbm" if run.data.tags[registry.MODEL_KIND_TAG] == "lightgbm" else "scikit-learn"
    assert f"{flavour}=={version(flavour)}" in requirements and f"numpy=={version('numpy')}" in requirements

    # The training set as an MLflow dataset input.
    [ds_input] = run.inputs.dataset_inputs
    assert ds_input.dataset.name == f"{model}-train"
    assert ds_input.dataset.digest == run.data.tags["fabloop.data_hash"][:36]
    assert {t.key: t.value for t in ds_input.tags}.get("mlflow.data.context") == "training"
    assert f'"num_rows": {n_train}' in ds_input.dataset.profile

    # The feature-importance plot and the drift reference.
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"feature_importance.png", "reference", "features.json", "data_gate.json"} <= artifacts
    listed = json.loads(Path(client.download_artifacts(run.info.run_id, "data_gate.json")).read_text())
    assert listed["summary"] == "0 of 30 sensors dropped: 0 dead, 0 mostly missing, 0 constant", listed
    assert listed["dropped"] == {} and summary["dropped_missing"] == {}
    png = client.download_artifacts(run.info.run_id, "feature_importance.png")
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    ref = pd.read_parquet(client.download_artifacts(run.info.run_id, "reference/sensors.parquet"))
    assert len(ref) == n_train and set(features) <= set(ref.columns)


def test_checks_side_by_side_read_the_reference_whole_and_share_one_cached_copy(
    stack: RunningStack, trained: Trained, tmp_path: Path
) -> None:
    """Two drift checks of a model run at once (and a burst runs many): none may read a half-written file."""
    from concurrent.futures import ThreadPoolExecutor

    client = mlflow_client(stack)
    [mv] = versions(stack, trained.model)
    with ThreadPoolExecutor(max_workers=8) as pool:
        frames = list(pool.map(lambda _: registry.reference_frame(client, mv, cache_dir=tmp_path), range(8)))
    cached = tmp_path / mv.run_id / "sensors.parquet"
    assert cached.is_file() and not [p for p in cached.parent.iterdir() if p != cached], "one file, no leftovers"
    for frame in frames:
        pd.testing.assert_frame_equal(frame, frames[0])
    stamp = cached.stat().st_mtime_ns
    pd.testing.assert_frame_equal(registry.reference_frame(client, mv, cache_dir=tmp_path), frames[0])
    assert cached.stat().st_mtime_ns == stamp, "a later check reads the cached copy, not a new download"


def test_every_trial_is_a_nested_run_and_the_study_lives_in_the_store(stack: RunningStack, trained: Trained) -> None:
    client, summary = mlflow_client(stack), trained.summary
    parent = client.get_run(summary["run_id"])
    trials = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100
    )
    assert sorted(r.info.run_name for r in trials) == sorted(f"trial-{i}" for i in range(N_TRIALS))
    states = {r.data.tags["fabloop.trial_state"] for r in trials}
    assert states <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    complete = [r for r in trials if r.data.tags["fabloop.trial_state"] == "COMPLETE"]
    for r in trials:
        assert {"learning_rate", "num_leaves", "scale_pos_weight"} <= r.data.params.keys()
    best_cv = max(r.data.metrics["cv_roc_auc"] for r in complete)
    assert best_cv == pytest.approx(parent.data.metrics["cv_roc_auc_lgbm"])

    # The study is in fabloop's own database (here the stack's SQLite event store) and reloads.
    [study_name] = {r.data.tags["fabloop.study"] for r in trials}
    assert study_name == parent.data.tags["fabloop.study"] == summary["study"]
    study = optuna.load_study(study_name=study_name, storage=store.optuna_storage(stack.ep.database_url))
    assert len(study.trials) == N_TRIALS
    assert study.best_value == pytest.approx(best_cv)
    path = stack.ep.database_url.removeprefix("sqlite+aiosqlite:///")
    with sqlite3.connect(path) as conn:
        assert conn.execute("select count(*) from studies where study_name = ?", (study_name,)).fetchone()[0] == 1


@pytest.mark.parametrize(
    ("key", "policy", "reason", "field"),
    [
        # missing_action="fail" (the default drops the sensor): a sensor over the missing limit refuses the set.
        ("NAN", {"missing_action": "fail"}, f"'{MISSING_SENSOR}' 95% missing", "max_missing_share"),
        # The default drops it, but not past the cap on dropped sensors.
        ("NAN", {"max_dropped_share": 0.0},
         f"1 of 30 sensors (3%) would be dropped, more than max_dropped_share=0% of the RetrainPolicy: "
         f"0 dead, 1 mostly missing, 0 constant ('{MISSING_SENSOR}')", "max_dropped_share"),
        ("ONE", {}, "class fail (1) has 0 rows < min_class_count=10 (fail=0, pass=400)", "min_class_count"),
        ("FEW", {}, "too few rows: 120 < min_rows=200", "min_rows"),
    ],
    ids=["feature-95pct-missing", "dropped-sensors-over-the-cap", "one-class", "too-few-rows"],
)
def test_a_failed_data_gate_names_the_reason_and_registers_nothing(
    stack: RunningStack, fab: Fab, key: str, policy: dict[str, Any], reason: str, field: str
) -> None:
    model = fab.models[key]
    since = datetime.now(UTC)
    policy_block = save_retrain_policy(**policy)
    state = retrain(model=model, reasons=["manual"], policy_block=policy_block, catalog_block=fab.catalog,
                    promotion="off", return_state=True)
    # A refusal is a decision, not a crash: the run completes, in a state named for it.
    assert state.is_completed() and state.name == "Refused", state
    assert reason in (state.message or ""), state.message
    # The state itself says which block and field to change, for whoever reads only the run list.
    assert f"to change: fabloop RetrainPolicy block {policy_block!r}, field policy.{field}" in (state.message or "")
    assert reason in state.result()["refused"]
    # Its artifact says what to change: which block, which field.
    [artifact] = [a for a in artifacts_of(stack, str(state.state_details.flow_run_id)) if a["type"] == "markdown"]
    assert reason in artifact["data"] and f"`policy.{field}`" in artifact["data"], artifact["data"]
    assert f"`fabloop RetrainPolicy` block **`{policy_block}`**" in artifact["data"], artifact["data"]
    # Nothing registered, nothing even logged.
    assert versions(stack, model) == []
    assert mlflow_client(stack).get_experiment_by_name(f"fabloop/{model}/training") is None
    # The refusal is announced in Prefect's event feed, with the reason.
    [event] = events(stack, RETRAIN_REJECTED, model, since)
    assert reason in event["payload"]["reason"]
    assert event["payload"]["reasons"] == ["manual"]


def test_a_challenger_worse_than_the_champion_is_rejected(stack: RunningStack, fab: Fab) -> None:
    client, model = mlflow_client(stack), fab.models["CHAMP"]
    champion = retrain(model=model, reasons=["first training"], policy_block=save_retrain_policy(),
                       catalog_block=fab.catalog, promotion="off")
    client.set_registered_model_alias(model, "champion", champion["version"])

    # The same wafers, but a budget that cannot find a good model: one trial, ten shallow rounds.
    since = datetime.now(UTC)
    weak = save_retrain_policy(n_trials=1, max_boost_rounds=10, early_stopping_rounds=5, max_bin=7)
    summary = retrain(model=model, reasons=["manual"], policy_block=weak, catalog_block=fab.catalog, promotion="off")

    challenger, champ = summary["challenger"], summary["champion"]
    assert summary["champion_version"] == champion["version"]
    # Both were scored on the same most-recent wafers, and the challenger is worse.
    assert champ["n_rows"] == challenger["n_rows"] and champ["n_fail"] == challenger["n_fail"]
    assert champ["roc_auc"] == pytest.approx(champion["challenger"]["roc_auc"])
    assert challenger["roc_auc"] < champ["roc_auc"] - 0.01, (challenger, champ)
    assert not summary["gate"]["passed"]

    tags = client.get_model_version(model, summary["version"]).tags
    assert tags["fabloop.validation"] == "rejected"
    assert "regresses vs champion" in tags["fabloop.validation_reasons"]
    assert tags["fabloop.champion_at_validation"] == champion["version"]
    # Production is untouched: the champion alias did not move.
    assert client.get_model_version_by_alias(model, "champion").version == champion["version"]
    [event] = events(stack, CHALLENGER_REJECTED, model, since)
    assert event["payload"]["version"] == summary["version"]

    # Same wafers, other search set-up (rounds, binning): a study of its own, so the weak
    # search neither inherits the strong one's best trial nor adds to its history.
    storage = store.optuna_storage(stack.ep.database_url)
    assert summary["study"] != champion["study"]
    assert len(optuna.load_study(study_name=summary["study"], storage=storage).trials) == 1
    assert len(optuna.load_study(study_name=champion["study"], storage=storage).trials) == N_TRIALS
