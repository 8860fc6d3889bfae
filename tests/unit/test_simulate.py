"""The fab simulator: determinism, schema validity, timing, labels and drift injections."""

from __future__ import annotations

import time
from itertools import islice

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from fabloop.core.schemas import SensorReading, TestResult, parse_event, validate_event
from fabloop.core.simulate import (
    DriftInjection,
    SimulationConfig,
    injection_sensors,
    pm_events,
    sensor_frame,
    sensor_names,
    sensor_specs,
    simulate,
    test_frame,
)

WAFERS = 1500
FROM = 800
TOOL = "ETCH-02"
# Sensors with no recipe, ageing or PM behaviour: stationary, so a t-test is fair.
PLAIN = ["rf_power_std", "dc_bias_std", "foreline_pressure_mean"]


def _run(**kw) -> list[SensorReading | TestResult]:
    return list(simulate(SimulationConfig(**kw)))


def _frames(events) -> tuple[pd.DataFrame, pd.DataFrame]:
    return sensor_frame(events), test_frame(events).set_index("wafer")


@pytest.fixture(scope="module")
def baseline() -> tuple[pd.DataFrame, pd.DataFrame]:
    return _frames(_run(wafers=WAFERS, seed=3))


def _injected(*drifts: DriftInjection) -> tuple[pd.DataFrame, pd.DataFrame]:
    return _frames(_run(wafers=WAFERS, seed=3, drifts=list(drifts)))


def _hit_rows(sf: pd.DataFrame, tool: str = TOOL, start: int = FROM, stop: int | None = None) -> np.ndarray:
    g = np.arange(len(sf))  # readings are in global wafer order
    return (sf["tool"].to_numpy() == tool) & (g >= start) & (g < (stop if stop is not None else len(sf)))


def _welch_t(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


# --- stream properties -------------------------------------------------------


def test_same_config_gives_identical_events_and_other_seed_differs():
    a = [e.model_dump() for e in simulate(SimulationConfig(wafers=120, seed=11))]
    b = [e.model_dump() for e in simulate(SimulationConfig(wafers=120, seed=11))]
    c = [e.model_dump() for e in simulate(SimulationConfig(wafers=120, seed=12))]
    assert a == b
    assert [e["event_id"] for e in a] != [e["event_id"] for e in c]
    assert a[0]["sensors"] != c[0]["sensors"]


def test_every_event_is_schema_valid_and_round_trips():
    cfg = SimulationConfig(
        wafers=260, n_sensors=590, seed=1,
        drifts=[DriftInjection(kind="nan", from_wafer=100, sensors=5)],
    )
    events = list(simulate(cfg))
    assert len(events) == 2 * 260
    ids = set()
    for e in events:
        assert parse_event(e.to_json()) == e
        assert validate_event(e.model_dump()) == e
        ids.add(e.event_id)
        if isinstance(e, SensorReading):
            assert len(e.sensors) == 590 and list(e.sensors) == sensor_names(590)
            assert e.fab == "FAB1" and e.step == "POLY_ETCH"
        else:
            assert e.part_id is None and e.program == "SORT1" and e.stage == "wafer_sort"
    assert len(ids) == len(events)
    assert any(v is None for e in events if isinstance(e, SensorReading) for v in e.sensors.values())


def test_events_are_time_ordered_and_sort_results_follow_their_wafer():
    cfg = SimulationConfig(wafers=700, seed=2)
    events = list(simulate(cfg))
    ts = [e.ts for e in events]
    assert ts == sorted(ts)
    sensor_ts = {e.wafer: e.ts for e in events if isinstance(e, SensorReading)}
    tests = [e for e in events if isinstance(e, TestResult)]
    assert len(sensor_ts) == len(tests) == 700
    for t in tests:
        delay_h = (t.ts - sensor_ts[t.wafer]).total_seconds() / 3600
        assert delay_h >= cfg.test_delay_hours, t.wafer
    # results of a lot come after the lot's last wafer was processed
    last_in_lot = pd.Series(sensor_ts).groupby(lambda w: w.split("-")[0]).max()
    assert all(t.ts > last_in_lot[t.lot] for t in tests)
    # interleaved stream, not "all sensors then all tests"
    kinds = [e.kind for e in events]
    assert kinds.index("test") < len(kinds) - kinds[::-1].index("sensor") - 1


def test_wafer_ids_lots_and_routing():
    sf = sensor_frame(simulate(SimulationConfig(wafers=60, seed=4)))
    assert sf["wafer"].tolist()[:3] == ["L0001-01", "L0001-02", "L0001-03"]
    assert sf["wafer"].iloc[25] == "L0002-01" and sf["wafer"].iloc[-1] == "L0003-10"
    assert (sf.groupby("lot")["tool"].nunique() == 1).all()  # a lot runs on one tool
    assert set(sf["chamber"]) == {"A", "B"}


def test_fail_rate_is_secom_like_and_yield_consistent_with_pass_fail(baseline):
    _, tf = baseline
    fail = 1 - tf["passed"].mean()
    assert 0.03 <= fail <= 0.12
    assert (tf["passed"] == (tf["yield_pct"] >= 80.0)).all()
    assert tf["yield_pct"].between(0, 100).all()
    assert tf.loc[tf["passed"], "yield_pct"].median() > tf.loc[~tf["passed"], "yield_pct"].median() + 20
    assert set(tf.loc[~tf["passed"], "hard_bin"]) == {5} and set(tf.loc[tf["passed"], "hard_bin"]) == {1}


def test_sensors_are_correlated_and_on_physical_scale(baseline):
    sf, _ = baseline
    x = sf[sensor_names(40)]
    specs = {s.name: s for s in sensor_specs(SimulationConfig())}
    # shared process factors: many strongly correlated pairs, not an identity matrix
    corr = np.corrcoef(x[sf["recipe"] == sf["recipe"].iloc[0]].to_numpy(), rowvar=False)
    off_diag = np.abs(corr[~np.eye(40, dtype=bool)])
    assert (off_diag > 0.3).mean() > 0.1
    assert abs(x["rf_power_mean"].median() - specs["rf_power_mean"].centre) < 10 * specs["rf_power_mean"].scale
    assert 25 < x["chamber_pressure_mean"].median() < 35


def test_label_is_learnable_on_a_time_ordered_holdout():
    import lightgbm as lgb
    from sklearn.metrics import roc_auc_score

    events = list(simulate(SimulationConfig(wafers=2000, seed=5)))
    sf, tf = _frames(events)
    y = (~tf.loc[sf["wafer"], "passed"]).astype(int).to_numpy()
    x = sf[sensor_names(40)].to_numpy()
    cut = int(0.7 * len(y))  # train on the past, score the future
    model = lgb.LGBMClassifier(n_estimators=200, learning_rate=0.05, num_leaves=15, n_jobs=1, verbose=-1)
    model.fit(x[:cut], y[:cut])
    auc = roc_auc_score(y[cut:], model.predict_proba(x[cut:])[:, 1])
    assert y[cut:].sum() >= 10
    assert auc > 0.8, auc


def test_generation_is_lazy_and_fast():
    huge = simulate(SimulationConfig(wafers=10_000_000))
    t0 = time.perf_counter()
    first = list(islice(huge, 50))
    assert time.perf_counter() - t0 < 2.0 and len(first) == 50
    t0 = time.perf_counter()
    n = sum(1 for _ in simulate(SimulationConfig(wafers=5000)))
    assert n == 10_000
    assert time.perf_counter() - t0 < 5.0


# --- preventive maintenance -------------------------------------------------


def test_pm_resets_chamber_ageing_drift():
    cfg = SimulationConfig(wafers=2400, seed=6, pm_every_wafers=300, chamber_drift_per_500_wafers=3.0)
    pms = pm_events(cfg)
    assert pms and {p.pm_number for p in pms} >= {1, 2}
    sf = sensor_frame(simulate(cfg))
    g = np.arange(len(sf))
    resets = 0
    for pm in pms:
        on_tool = sf["tool"].to_numpy() == pm.tool
        assert sf.iloc[pm.before_wafer]["tool"] == pm.tool and sf.iloc[pm.before_wafer]["ts"] == pm.ts
        before = sf.loc[on_tool & (g < pm.before_wafer), "rf_reflected_power_mean"].to_numpy()[-60:]
        after = sf.loc[on_tool & (g >= pm.before_wafer), "rf_reflected_power_mean"].to_numpy()[:60]
        if len(before) == len(after) == 60:
            assert _welch_t(before, after) > 4  # aged chamber reflects more power; PM cleans it
            resets += 1
    assert resets >= 3


# --- drift injections ---------------------------------------------------------


def _scale(name: str) -> float:
    return next(s.scale for s in sensor_specs(SimulationConfig(seed=3)) if s.name == name)


def test_mean_shift_hits_only_its_tool_after_its_wafer(baseline):
    base_sf, base_tf = baseline
    sf, tf = _injected(DriftInjection(kind="mean_shift", tools=[TOOL], from_wafer=FROM, sensors=PLAIN, magnitude=3))
    hit = _hit_rows(sf)
    other_cols = [c for c in sf.columns if c not in PLAIN]
    pd.testing.assert_frame_equal(sf[other_cols], base_sf[other_cols])
    for name in PLAIN:
        diff = (sf[name] - base_sf[name]).to_numpy()
        assert np.allclose(diff[hit], 3 * _scale(name), rtol=0.02), name
        assert (diff[~hit] == 0).all(), name
        # and detectably so from the stream alone: post vs pre on that tool
        on_tool = sf["tool"].to_numpy() == TOOL
        post, pre = sf.loc[hit, name].to_numpy(), sf.loc[on_tool & ~hit, name].to_numpy()
        assert _welch_t(post, pre) > 10, name
        for other in {"ETCH-01", "ETCH-03"}:
            rows = sf["tool"].to_numpy() == other
            late = rows & (np.arange(len(sf)) >= FROM)
            assert abs(_welch_t(sf.loc[late, name].to_numpy(), sf.loc[rows & ~late, name].to_numpy())) < 4
    pd.testing.assert_frame_equal(tf, base_tf)  # these sensors do not drive yield


def test_mean_shift_on_a_yield_sensor_raises_the_fail_rate(baseline):
    _, base_tf = baseline
    _, tf = _injected(DriftInjection(kind="mean_shift", from_wafer=0, sensors=["chamber_pressure_mean"], magnitude=2))
    assert (1 - tf["passed"].mean()) > 3 * (1 - base_tf["passed"].mean())


def test_stuck_sensor_holds_a_constant_only_where_injected(baseline):
    base_sf, base_tf = baseline
    stuck = ["chamber_pressure_mean", "sensor_033"]
    sf, tf = _injected(DriftInjection(kind="stuck", tools=[TOOL], from_wafer=FROM, sensors=stuck))
    hit = _hit_rows(sf)
    for name in stuck:
        held = sf.loc[hit, name]
        assert held.nunique() == 1 and held.iloc[0] == base_sf.loc[hit, name].iloc[0]
        assert base_sf.loc[hit, name].nunique() > 50
        assert (sf.loc[~hit, name] == base_sf.loc[~hit, name]).all()
    # a broken sensor does not change the wafer: sort results are untouched
    pd.testing.assert_frame_equal(tf, base_tf)


def test_nan_injection_reports_none_in_its_window_only(baseline):
    base_sf, base_tf = baseline
    inj = DriftInjection(kind="nan", tools=[TOOL], from_wafer=FROM, until_wafer=FROM + 300, sensors=2)
    events = _run(wafers=WAFERS, seed=3, drifts=[inj])
    sf, tf = _frames(events)
    names = injection_sensors(SimulationConfig(wafers=WAFERS, seed=3, drifts=[inj]))[0]
    assert len(names) == 2
    hit = _hit_rows(sf, stop=FROM + 300)
    assert 0 < hit.sum() < 300
    assert sf.loc[hit, names].isna().all().all()
    assert not sf.loc[~hit, sensor_names(40)].isna().any().any()
    assert not sf.loc[hit, [c for c in sensor_names(40) if c not in names]].isna().any().any()
    raw = [e for e in events if isinstance(e, SensorReading) and e.sensors[names[0]] is None]
    assert len(raw) == hit.sum()
    pd.testing.assert_frame_equal(tf, base_tf)


def test_variance_change_scales_spread_not_mean(baseline):
    base_sf, _ = baseline
    sf, _ = _injected(DriftInjection(kind="variance_change", tools=[TOOL], from_wafer=FROM, sensors=PLAIN, magnitude=3))
    hit = _hit_rows(sf)
    for name in PLAIN:
        ratio = sf.loc[hit, name].std() / base_sf.loc[hit, name].std()
        assert 2.4 < ratio < 3.6, (name, ratio)
        assert abs(sf.loc[hit, name].mean() - base_sf.loc[hit, name].mean()) < 0.5 * _scale(name)
        assert (sf.loc[~hit, name] == base_sf.loc[~hit, name]).all()


def test_recipe_change_renames_and_shifts_recipe_dependent_sensors(baseline):
    base_sf, base_tf = baseline
    sf, tf = _injected(
        DriftInjection(kind="recipe_change", tools=[TOOL], from_wafer=FROM, magnitude=4, new_recipe="POLY-ETCH-V2")
    )
    hit = _hit_rows(sf)
    assert set(sf.loc[hit, "recipe"]) == {"POLY-ETCH-V2"}
    assert "POLY-ETCH-V2" not in set(sf.loc[~hit, "recipe"])
    specs = sensor_specs(SimulationConfig(seed=3))
    recipe_dep = [s.name for s in specs if s.recipe_dependent]
    assert {"rf_power_mean", "gas_cf4_flow_mean"} <= set(recipe_dep)
    for s in specs:
        diff = (sf[s.name] - base_sf[s.name]).to_numpy()
        assert (diff[~hit] == 0).all(), s.name
        if s.recipe_dependent:
            assert np.allclose(np.abs(diff[hit]), 4 * s.scale, rtol=0.02), s.name
        else:
            assert (diff[hit] == 0).all(), s.name
    pd.testing.assert_frame_equal(tf, base_tf)  # on target for the new recipe


# --- config validation ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"drifts": [{"kind": "mean_shift", "tools": ["ETCH-09"], "from_wafer": 0}]}, "drifts[0].tools"),
        ({"drifts": [{"kind": "stuck", "from_wafer": 0, "sensors": ["no_such_sensor"]}]}, "drifts[0].sensors"),
        ({"drifts": [{"kind": "nan", "from_wafer": 0, "sensors": 41}]}, "drifts[0].sensors"),
        ({"drifts": [{"kind": "melt", "from_wafer": 0}]}, "kind"),
        ({"drifts": [{"kind": "nan", "from_wafer": 10, "until_wafer": 5}]}, "until_wafer"),
        ({"n_sensors": 3}, "n_sensors"),
        ({"start": "2025-01-01T00:00:00"}, "start"),
        ({"tools": [{"name": "ETCH-01"}, {"name": "ETCH-01"}]}, "tools"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field.replace("[", r"\[").replace("]", r"\]")):
        SimulationConfig(**kwargs)
