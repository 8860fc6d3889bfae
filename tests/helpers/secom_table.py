"""A synthetic table with the shape of the public SECOM data set, with a drift to find.

SECOM: 1,567 wafers × 590 unnamed sensors over about three months, a ``Time``
column written dd/mm/YYYY HH:MM:SS, a ``Pass/Fail`` label (-1 pass, 1 fail, ~6.6 %
fails), no wafer id, sensors on wildly different scales, many constant sensors and
some with a large share of missing readings. This table copies that shape and adds
what a loop test needs: fails that a model can learn from a few sensors, and from
row ``shift_from`` on a strong mean shift on most sensors (an offset in the
measurement, not in the process: the fail rate stays the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

SECOM_START = datetime(2008, 7, 19, 11, 55)
TIME_COL, LABEL_COL = "Time", "Pass/Fail"


@dataclass(frozen=True)
class SecomShape:
    rows: int = 1567
    sensors: int = 590
    days: float = 91.0
    fail_rate: float = 0.07
    constant_sensors: int = 60
    sparse_sensors: int = 8  # each missing on 25–45 % of the wafers (under the data gate's 50 %)
    missing_share: float = 0.01  # scattered missing readings elsewhere
    informative: tuple[int, ...] = (21, 59, 103)  # the sensors the fails depend on
    shift_from: int = 1000  # first drifted row (in time order)
    shift_share: float = 0.8  # of the non-constant sensors
    shift_sigma: float = 3.0
    seed: int = 7


def secom_table(shape: SecomShape = SecomShape()) -> pd.DataFrame:
    """The table in time order: ``Time`` (text), sensors ``"0"``…``"589"``, ``Pass/Fail``."""
    rng = np.random.default_rng(shape.seed)
    n, m = shape.rows, shape.sensors
    seconds = np.sort(rng.uniform(0, shape.days * 86400, n)).astype(int)
    # Sensors on their own scales (SECOM mixes values around 0.01 with values around 3,000).
    centre = rng.lognormal(mean=3.0, sigma=2.0, size=m)
    spread = centre * rng.uniform(0.02, 0.2, size=m)
    latent = rng.normal(size=(n, m))
    values = centre + spread * latent

    # Fails: a learnable function of a few sensors, with noise; intercept set for the rate.
    a, b, c = shape.informative
    score = 1.6 * latent[:, a] + 1.2 * latent[:, b] - 1.0 * latent[:, c] + rng.normal(scale=0.6, size=n)
    failed = score > np.quantile(score, 1 - shape.fail_rate)

    others = [j for j in range(m) if j not in shape.informative]
    picked = rng.permutation(others)
    constant = picked[: shape.constant_sensors]
    sparse = picked[shape.constant_sensors: shape.constant_sensors + shape.sparse_sensors]
    values[:, constant] = np.round(centre[constant], 3)  # one value for the whole history

    # The drift: a measurement offset on most non-constant sensors, the informative ones included.
    movable = np.array([j for j in range(m) if j not in set(constant)])
    shifted = rng.choice(movable, int(shape.shift_share * len(movable)), replace=False)
    shifted = np.union1d(shifted, shape.informative)
    values[shape.shift_from:, shifted] += shape.shift_sigma * spread[shifted]

    values = np.round(values, 4)
    missing = rng.random((n, m)) < shape.missing_share
    missing[:, constant] = False
    for j, share in zip(sparse, rng.uniform(0.25, 0.45, len(sparse)), strict=True):
        missing[:, j] = rng.random(n) < share
    values[missing] = np.nan

    frame = pd.DataFrame(values, columns=[str(j) for j in range(m)])
    frame.insert(
        0, TIME_COL, [(SECOM_START + timedelta(seconds=int(s))).strftime("%d/%m/%Y %H:%M:%S") for s in seconds]
    )
    frame[LABEL_COL] = np.where(failed, 1, -1)
    frame.attrs["constant"] = [str(j) for j in constant]
    frame.attrs["sparse"] = [str(j) for j in sparse]
    frame.attrs["shifted"] = [str(j) for j in shifted]
    return frame


def write_parts(frame: pd.DataFrame, directory: Path, split_at: int, stem: str) -> tuple[Path, Path]:
    """The history as two recorded files, as a fab would export it: rows before and from ``split_at``."""
    first, second = directory / f"{stem}-part1.csv", directory / f"{stem}-part2.csv"
    frame.iloc[:split_at].to_csv(first, index=False)
    frame.iloc[split_at:].to_csv(second, index=False)
    return first, second
