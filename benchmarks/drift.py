"""Benchmark: fabloop's check_drift vs Evidently's DataDriftPreset Report on one window.

Synthetic SECOM-like data: a 2,000-wafer reference and a 1,000-wafer window of 590
sensors with mixed scales, missing readings, stuck sensors and few-level setpoints;
a handful of sensors drift. Both paths run in this process on the same frames; the
Report is the baseline. The per-sensor verdicts (test, score to 1e-9, drifted flag)
and the drifted count must agree.

    python benchmarks/drift.py [--rows 1000] [--reference-rows 2000] [--features 590]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings

import numpy as np
import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset

from fabloop.core.drift import check_drift
from fabloop.core.policies import DriftPolicy


def make_data(n_ref: int, n_cur: int, n_features: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    rng = np.random.default_rng(seed)
    cols = [f"sensor_{i:03d}" for i in range(n_features)]
    loc = rng.uniform(-50, 500, n_features)
    scale = rng.lognormal(0, 1.5, n_features)
    ref = pd.DataFrame(rng.normal(loc, scale, size=(n_ref, n_features)), columns=cols)
    cur = pd.DataFrame(rng.normal(loc, scale, size=(n_cur, n_features)), columns=cols)
    # missing readings: most sensors a few %, some half the time (so the reference is "small" for them)
    for i in rng.choice(n_features, n_features // 3, replace=False):
        ref.loc[rng.random(n_ref) < 0.03, cols[i]] = np.nan
        cur.loc[rng.random(n_cur) < 0.03, cols[i]] = np.nan
    for i in rng.choice(n_features, 10, replace=False):
        ref.loc[rng.random(n_ref) < 0.55, cols[i]] = np.nan
    # stuck sensors and few-level setpoints (float dtype: Evidently types them numerical)
    for i in rng.choice(n_features, 15, replace=False):
        ref[cols[i]] = float(loc[i])
        cur[cols[i]] = float(loc[i])
    for i in rng.choice(n_features, 10, replace=False):
        levels = np.round(rng.uniform(0, 10, rng.integers(2, 5)), 1)
        ref[cols[i]] = rng.choice(levels, n_ref)
        cur[cols[i]] = rng.choice(levels, n_cur)
    # sensors that drift in the window: mean shifts and a variance blow-up
    continuous = [i for i in range(n_features) if ref[cols[i]].nunique() > 20]
    drifted = list(rng.choice(continuous, 12, replace=False))
    for k, i in enumerate(drifted):
        c = cols[i]
        if k % 3 == 2:
            cur[c] = loc[i] + (cur[c] - loc[i]) * 2.5
        else:
            cur[c] += scale[i] * (0.3 + 0.15 * k)
    return ref, cur, [cols[i] for i in drifted]


def report_verdicts(snapshot) -> tuple[dict[str, dict], int]:
    data = snapshot.dict()
    status = {t["metric_config"]["metric_id"]: str(t["status"]) for t in data["tests"] if t["id"] == "drift"}
    columns, count = {}, -1
    for m in data["metrics"]:
        cfg = m["config"]
        if cfg["type"] == "evidently:metric_v2:ValueDrift":
            columns[cfg["column"]] = {
                "method": cfg["method"],
                "score": float(m["value"]),
                "drifted": status[m["id"]].endswith("FAIL"),
            }
        elif cfg["type"] == "evidently:metric_v2:DriftedColumnsCount":
            count = int(m["value"]["count"])
    return columns, count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--reference-rows", type=int, default=2000)
    parser.add_argument("--features", type=int, default=590)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Evidently's correlations on stuck sensors warn per column

    ref, cur, planted = make_data(args.reference_rows, args.rows, args.features)
    policy = DriftPolicy(min_window_rows=1, min_feature_values=1)  # Evidently parity: test every sensor

    t0 = time.perf_counter()
    ours = check_drift(ref, cur, policy)
    fabloop_s = time.perf_counter() - t0
    print(f"fabloop check_drift: {fabloop_s:.3f} s, {ours.n_drifted}/{ours.n_tested} drifted", file=sys.stderr)

    t0 = time.perf_counter()
    snapshot = Report([DataDriftPreset()], include_tests=True).run(current_data=cur, reference_data=ref)
    columns, count = report_verdicts(snapshot)
    report_s = time.perf_counter() - t0
    print(f"evidently DataDriftPreset Report: {report_s:.3f} s, {count} drifted", file=sys.stderr)

    mismatches = []
    for f in ours.features:
        ev = columns.get(f.feature)
        if (
            ev is None
            or f.status != "ok"
            or ev["method"] != f.stattest_display
            or ev["drifted"] != f.drifted
            or not math.isclose(f.score, ev["score"], rel_tol=1e-9, abs_tol=1e-9)
        ):
            mismatches.append((f.feature, f.stattest_display, f.score, f.drifted, ev))
    agree = not mismatches and len(columns) == len(ours.features) and count == ours.n_drifted
    for m in mismatches[:10]:
        print("mismatch:", m, file=sys.stderr)
    missed = sorted(set(planted) - {f.feature for f in ours.features if f.drifted})
    used = pd.Series([f.stattest for f in ours.features]).value_counts().to_dict()
    print(f"stattests used: {used}; planted drift missed: {missed}", file=sys.stderr)

    print(
        json.dumps(
            {
                "bench": "drift",
                "rows": args.rows,
                "reference_rows": args.reference_rows,
                "features": args.features,
                "drifted": ours.n_drifted,
                "fabloop_s": round(fabloop_s, 4),
                "evidently_report_s": round(report_s, 3),
                "speedup": round(report_s / fabloop_s, 1),
                "ratio": round(fabloop_s / report_s, 5),
                "verdicts_agree": agree,
            }
        )
    )


if __name__ == "__main__":
    main()
