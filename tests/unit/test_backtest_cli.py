"""``fabloop backtest`` end to end on a simulated history, as a user runs it: no stack, a JSON line last."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fabloop.core.backtest import RAN
from fabloop.core.simulate import DriftInjection, SimulationConfig, sensor_frame, simulate, test_frame
from tests.helpers.stack import fabloop

KEYS = {"windows", "alarms", "retrains", "refusals", "promotions", "static_auc", "adaptive_auc"}
ROLES = ["--tool-col", "tool", "--chamber-col", "chamber", "--recipe-col", "recipe", "--lot-col", "lot",
         "--step-col", "step"]


def simulated_table(path: Path, wafers: int, drift_from: int) -> Path:
    """A simulated history of three tools as a recorded table (one row per wafer, its sort verdict as label)."""
    config = SimulationConfig(seed=5, wafers=wafers, n_sensors=10, drifts=[DriftInjection(
        kind="mean_shift", tools=["ETCH-02"], from_wafer=drift_from, sensors=6, magnitude=2.0)])
    events = list(simulate(config))
    tests = test_frame(events).sort_values("ts").drop_duplicates("wafer", keep="last")
    table = sensor_frame(events).merge(tests[["wafer", "passed"]], on="wafer", how="left")
    table["label"] = table.pop("passed").map({True: "pass", False: "fail"})
    table.drop(columns=["event_id", "fab"]).rename(columns={"ts": "timestamp"}).to_csv(path, index=False)
    return path


def _last_json(stdout: str) -> dict[str, Any]:
    line = stdout.strip().splitlines()[-1]
    result: dict[str, Any] = json.loads(line)
    return result


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulated_table(tmp_path_factory.mktemp("backtest") / "history.csv", wafers=1500, drift_from=750)


def test_backtest_reports_a_timeline_whose_counts_add_up(history: Path, tmp_path: Path) -> None:
    plot = tmp_path / "timeline.png"
    proc = fabloop("backtest", str(history), *ROLES, "--window-wafers", "100", "--trials", "2",
                   "--plot", str(plot), "--json", timeout=240)
    out = _last_json(proc.stdout)
    assert proc.stdout.strip().count("\n") == 0  # --json: the JSON line only
    assert set(out) >= KEYS
    timeline = out["timeline"]
    assert out["windows"] == len(timeline) > 0
    assert out["alarms"] == sum(s["breach"] and s["trigger"] != "first_training" for s in timeline)
    assert out["retrains"] == sum(s["action"] in RAN for s in timeline)
    assert out["refusals"] == sum(s["action"] == "refused" for s in timeline)
    assert out["promotions"] == sum(s["action"] == "promoted" for s in timeline)
    assert out["retrains"] == out["refusals"] + out["rejections"] + out["not_approved"] + out["promotions"]
    assert out["promotions"] >= 1 and out["static_auc"] is not None and out["adaptive_auc"] is not None
    assert out["alarms"] >= 1  # ETCH-02 drifted half way through
    # Event time: a scope's windows follow each other without overlapping.
    for model in {s["model"] for s in timeline}:
        spans = sorted((s["ts_start"], s["ts_end"]) for s in timeline if s["model"] == model)
        assert all(end < start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
    assert plot.stat().st_size > 0


def test_backtest_refuses_what_replay_refuses(history: Path, tmp_path: Path) -> None:
    """Same table errors and exit codes as ``fabloop replay``; a policy block needs a Prefect API."""
    missing = fabloop("backtest", str(history), "--tool-col", "bay", check=False)
    assert missing.returncode == 2
    assert "'bay'" in missing.stdout and "not in the table" in missing.stdout
    replay = fabloop("replay", str(history), "--tool-col", "bay", "--dry-run", check=False)
    assert replay.returncode == 2 and replay.stdout.strip() == missing.stdout.strip()

    policy = tmp_path / "policy.yaml"
    policy.write_text("drift:\n  alpha: 2\n")
    bad = fabloop("backtest", str(history), "--policy", str(policy), check=False)
    assert bad.returncode == 2 and "drift.alpha" in bad.stdout

    no_api = fabloop("backtest", str(history), "--policy", "strict", check=False,
                     env={"FABLOOP_HOME": str(tmp_path / "nowhere"), "PREFECT_API_URL": ""})
    assert no_api.returncode == 2 and "no Prefect API" in no_api.stdout

