"""Benchmark: false alarms and detection of the calibrated data-drift rule on the simulator.

Each tool is a model's scope, as in the main job: its first ``--train-wafers`` wafers
are the training set, and the reference is its oldest 70 % (the train part of the
default time split, as the retraining flow logs it). The tool's later wafers are cut
into windows of ``--window`` wafers, and every window is checked against the reference
with the default policy (``alarm_rule='calibrated'``, alpha 0.01). The baseline, in the
same run and on the same windows, is the fixed Evidently rule fabloop used before:
``alarm_rule='share'``, ``drift_share=0.5``.

What "no drift" means: the simulator's default stream, PMs every 400 wafers of a tool
(drift-prone sensors reset, PM-sensitive ones re-centre) and chamber ageing between
them, with no injected fault. Those are how a healthy etch tool behaves, so they stay in
the no-drift run: a rule that alarms on every PM would be useless on a fab. The same
windows without PMs and ageing (i.i.d. wafers) are measured too, as a second rate, and
so is the rule calibrated on random reference rows instead of contiguous blocks.

Detection: the main job's shift (3 sigma on 24 of 40 sensors of ETCH-02) and a mild one
(1 sigma on 10 sensors), each starting exactly at a window boundary of ETCH-02 after
``--clean-windows`` clean windows. The delay is the number of drifted windows before
the first alarm (0: the first fully drifted window alarms).

Cost: the calibration of a 1,000-wafer reference of 566 simulated sensors for 200-wafer
windows is timed too (a drift check pays it once per champion and window size).

    python benchmarks/false_alarms.py [--windows 40] [--window 200] [--train-wafers 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings

import pandas as pd
from scipy.stats import binomtest

from fabloop.core.calibration import DriftCalibration, calibrate_drift
from fabloop.core.drift import check_drift
from fabloop.core.policies import DriftPolicy, RetrainPolicy
from fabloop.core.simulate import DriftInjection, SimulationConfig, sensor_frame, sensor_names, simulate

TOOLS = ("ETCH-01", "ETCH-02", "ETCH-03")
SHIFT_TOOL = "ETCH-02"
N_SENSORS = 40


def _reference_rows(train_wafers: int) -> int:
    """The train part of the default time split (holdout and validation are the newest wafers)."""
    p = RetrainPolicy()
    return train_wafers - math.ceil(train_wafers * p.holdout_share) - math.ceil(train_wafers * p.validation_share)


def _stream(wafers: int, drifts: list[DriftInjection] | None = None, quiet: bool = False) -> pd.DataFrame:
    extra = {"pm_every_wafers": None, "chamber_drift_per_500_wafers": 0.0} if quiet else {}
    cfg = SimulationConfig(seed=7, wafers=wafers, n_sensors=N_SENSORS, drifts=drifts or [], **extra)
    return sensor_frame(simulate(cfg))


def _tool_windows(frame: pd.DataFrame, tool: str, train: int, window: int, n_windows: int) -> tuple[
    pd.DataFrame, list[pd.DataFrame]
]:
    rows = frame[frame["tool"] == tool]
    sensors = sensor_names(N_SENSORS)
    reference = rows.iloc[: _reference_rows(train)][sensors].reset_index(drop=True)
    later = rows.iloc[train:]
    windows = [later.iloc[i * window:(i + 1) * window][sensors] for i in range(n_windows)]
    if len(windows[-1]) < window:
        raise RuntimeError(f"{tool}: the stream is too short for {n_windows} windows")
    return reference, windows


def _rate(k: int, n: int) -> tuple[float, float, float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")  # Clopper-Pearson
    return k / n, float(ci.low), float(ci.high)


def _judge(
    reference: pd.DataFrame, windows: list[pd.DataFrame], calibrated: DriftPolicy, cal: DriftCalibration,
    rows_cal: DriftCalibration | None = None,
) -> tuple[list[bool], list[bool], list[float], list[bool]]:
    """Per window: the calibrated verdict, the fixed-share baseline's, the share, and the random-rows null's."""
    share_rule = calibrated.model_copy(update={"alarm_rule": "share", "drift_share": 0.5})
    ours, base, shares, rows = [], [], [], []
    for w in windows:
        r = check_drift(reference, w, calibrated, calibration=cal)
        ours.append(r.drifted)
        shares.append(r.share)
        base.append(check_drift(reference, w, share_rule).drifted)
        rows.append(rows_cal is not None and r.share > rows_cal.threshold)
    return ours, base, shares, rows


def _shift_delay(
    args: argparse.Namespace, policy: DriftPolicy, magnitude: float, sensors: int, plan: pd.DataFrame
) -> dict[str, object]:
    """Windows of SHIFT_TOOL with a mean shift from the start of window ``clean_windows`` on."""
    tool_rows = plan.index[plan["tool"] == SHIFT_TOOL]
    onset = int(tool_rows[args.train_wafers + args.clean_windows * args.window])  # global wafer index
    n_windows = args.clean_windows + args.drift_windows
    drift = DriftInjection(kind="mean_shift", tools=[SHIFT_TOOL], from_wafer=onset, magnitude=magnitude,
                           sensors=sensors)
    frame = _stream(int(tool_rows[args.train_wafers + n_windows * args.window - 1]) + 1, [drift])
    reference, windows = _tool_windows(frame, SHIFT_TOOL, args.train_wafers, args.window, n_windows)
    cal = calibrate_drift(reference, policy, args.window)
    ours, base, shares, _ = _judge(reference, windows, policy, cal)
    after = ours[args.clean_windows:]
    after_base = base[args.clean_windows:]
    print(f"shift {magnitude:g}σ on {sensors} sensors: shares after onset "
          f"{[round(s, 2) for s in shares[args.clean_windows:]]} vs threshold {cal.threshold:.3f}; "
          f"alarms before onset {sum(ours[:args.clean_windows])}", file=sys.stderr)
    return {
        "detected": bool(after[0]),
        "delay": after.index(True) if any(after) else None,
        "baseline_delay": after_base.index(True) if any(after_base) else None,
        "false_alarms_before_onset": sum(ours[: args.clean_windows]),
    }


def _calibration_cost(window: int) -> float:
    """Seconds to calibrate a 1,000-wafer reference of 566 simulated sensors for windows of ``window`` wafers."""
    frame = sensor_frame(simulate(SimulationConfig(seed=3, wafers=3200, n_sensors=566)))
    reference = frame[frame["tool"] == TOOLS[0]].iloc[:1000][sensor_names(566)].reset_index(drop=True)
    t = time.perf_counter()
    calibrate_drift(reference, DriftPolicy(), window)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=40, help="No-drift windows per tool.")
    parser.add_argument("--window", type=int, default=200, help="Wafers per window.")
    parser.add_argument("--train-wafers", type=int, default=1000, help="Tool wafers in the first training set.")
    parser.add_argument("--clean-windows", type=int, default=5, help="Clean windows before an injected shift.")
    parser.add_argument("--drift-windows", type=int, default=8, help="Windows after an injected shift.")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # scipy on constant few-valued draws
    policy = DriftPolicy()
    t0 = time.perf_counter()

    per_tool = args.train_wafers + args.windows * args.window
    wafers = int(per_tool * len(TOOLS) * 1.15)  # tools share the fab's wafers unevenly
    results: dict[str, dict[str, list[bool]]] = {}
    cal_s: list[float] = []
    plan = pd.DataFrame()
    for quiet in (False, True):
        frame = _stream(wafers, quiet=quiet)
        if not quiet:
            plan = frame[["tool"]]
        ours_all, base_all, rows_all = [], [], []
        for tool in TOOLS:
            reference, windows = _tool_windows(frame, tool, args.train_wafers, args.window, args.windows)
            t = time.perf_counter()
            cal = calibrate_drift(reference, policy, args.window)
            cal_s.append(time.perf_counter() - t)
            rows_cal = calibrate_drift(reference, policy, args.window, method="random_rows")
            ours, base, shares, rows = _judge(reference, windows, policy, cal, rows_cal)
            ours_all += ours
            base_all += base
            rows_all += rows
            print(f"{'iid' if quiet else 'fab'} {tool}: threshold {cal.threshold:.3f} (null max "
                  f"{max(cal.shares):.3f}); window shares median {pd.Series(shares).median():.3f} max "
                  f"{max(shares):.3f}; calibrated alarms {sum(ours)}, share-rule alarms {sum(base)}, "
                  f"random-rows null (threshold {rows_cal.threshold:.3f}) alarms {sum(rows)}",
                  file=sys.stderr)
        results["iid" if quiet else "fab"] = {"ours": ours_all, "base": base_all, "rows": rows_all}

    fab, iid = results["fab"], results["iid"]
    n = len(fab["ours"])
    rate, lo, hi = _rate(sum(fab["ours"]), n)
    base_rate, base_lo, base_hi = _rate(sum(fab["base"]), n)
    iid_rate, iid_lo, iid_hi = _rate(sum(iid["ours"]), n)
    strong = _shift_delay(args, policy, 3.0, 24, plan)
    mild = _shift_delay(args, policy, 1.0, 10, plan)
    out = {
        "bench": "false_alarms",
        "alpha": policy.alpha,
        "model_windows": n,
        "window_wafers": args.window,
        "reference_wafers": _reference_rows(args.train_wafers),
        "calibration_draws": policy.calibration_draws,
        "false_alarms": sum(fab["ours"]),
        "false_alarm_rate": round(rate, 4),
        "false_alarm_ci_low": round(lo, 4),
        "false_alarm_ci_high": round(hi, 4),
        "alpha_in_ci": lo <= policy.alpha <= hi,
        "iid_false_alarm_rate": round(iid_rate, 4),
        "iid_false_alarm_ci": [round(iid_lo, 4), round(iid_hi, 4)],
        "random_rows_null_false_alarm_rate": round(sum(fab["rows"]) / n, 4),
        "baseline_rule": "share>=0.5",
        "baseline_false_alarm_rate": round(base_rate, 4),
        "baseline_false_alarm_ci": [round(base_lo, 4), round(base_hi, 4)],
        "detected": strong["detected"],
        "strong_shift_delay_windows": strong["delay"],
        "baseline_strong_shift_delay_windows": strong["baseline_delay"],
        "detection_delay_windows": mild["delay"],
        "baseline_detection_delay_windows": mild["baseline_delay"],
        "calibration_s_40_sensors": round(float(pd.Series(cal_s[1:]).median()), 3),  # the first pays imports
        "calibration_s_566_sensors": round(_calibration_cost(args.window), 2),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
