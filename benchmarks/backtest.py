"""Benchmark: ``fabloop backtest`` on two recorded histories, against a static first model.

Two histories, each written to a CSV and given to the real command in a subprocess:

- the SECOM-shaped table of the tests (1,567 wafers × 590 unnamed sensors over three
  months, many constant or mostly missing, about 7 % fails, a strong shift from wafer
  800 on: ``tests/helpers/secom_table.py``), with SECOM's own conventions (``--secom``);
- a simulated history (``fabloop.core.simulate``): 3 tools × 40 sensors, 6,000 wafers,
  the main job's shift (3 sigma on 24 sensors of ETCH-02) from the middle on.

Goal: each finishes in under 2 minutes here. The baseline, in the same run, is the
static first model the command scores beside the adaptive champion on every window
(``static_auc`` vs ``adaptive_auc``). Prints one JSON line last.

    python benchmarks/backtest.py [--wafers 6000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the SECOM-shaped table is the tests' own generator

GOAL_S = 120.0
KEYS = ("windows", "alarms", "retrains", "refusals", "promotions", "static_auc", "adaptive_auc")


def write_secom(path: Path) -> list[str]:
    from tests.helpers.secom_table import LABEL_COL, TIME_COL, SecomShape, secom_table

    secom_table(SecomShape(shift_from=800)).to_csv(path, index=False)
    return ["--secom", "--timestamp-col", TIME_COL, "--label-col", LABEL_COL, "--wafer-col", "@line"]


def write_simulated(path: Path, wafers: int) -> list[str]:
    from fabloop.core.simulate import DriftInjection, SimulationConfig, sensor_frame, simulate, test_frame

    config = SimulationConfig(seed=3, wafers=wafers, n_sensors=40, drifts=[
        DriftInjection(kind="mean_shift", tools=["ETCH-02"], from_wafer=wafers // 2, sensors=24, magnitude=3.0)])
    events = list(simulate(config))
    sensors, results = sensor_frame(events), test_frame(events)
    newest = results.sort_values("ts").drop_duplicates("wafer", keep="last")  # a retest replaces the first test
    table = sensors.merge(newest[["wafer", "passed"]], on="wafer", how="left")
    table["label"] = table["passed"].map({True: "pass", False: "fail"})
    table.drop(columns=["passed", "event_id", "fab"]).rename(columns={"ts": "timestamp"}).to_csv(path, index=False)
    return ["--tool-col", "tool", "--chamber-col", "chamber", "--recipe-col", "recipe", "--lot-col", "lot",
            "--step-col", "step"]


def backtest(table: Path, options: list[str], plot: Path) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fabloop.cli", "backtest", str(table), *options,
                           "--plot", str(plot), "--json"], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"fabloop backtest {table.name} exited {done.returncode}:\n{done.stdout[-3000:]}"
                         f"\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    missing = [k for k in KEYS if k not in result]
    if missing:
        raise SystemExit(f"the JSON line of {table.name} lacks {missing}")
    summary = {k: result[k] for k in KEYS}
    return {**summary, "wall_s": round(seconds, 1), "under_goal": seconds < GOAL_S}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wafers", type=int, default=6000, help="wafers of the simulated history")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fabloop-backtest-") as tmp:
        folder = Path(tmp)
        runs = {}
        for name, write in (("secom_shaped", write_secom),
                            ("simulated", lambda p: write_simulated(p, args.wafers))):
            table = folder / f"{name}.csv"
            options = write(table)
            runs[name] = backtest(table, options, folder / f"{name}.png")
            print(f"{name}: {runs[name]}", file=sys.stderr)
    met = all(r["under_goal"] for r in runs.values())
    print(json.dumps({"bench": "backtest", "goal_s": GOAL_S, "met": met, **runs}))
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
