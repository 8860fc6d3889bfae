"""Helpers for commands that publish streams: drift specs from the command line, pacing."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from fabloop.core.simulate import DriftInjection

T = TypeVar("T")

_DRIFT = re.compile(
    r"^(?P<kind>[a-z_]+):(?P<tools>[^@]+)@(?P<wafer>\d+)(?:x(?P<mag>[-+]?\d+(?:\.\d+)?))?(?::(?P<sensors>.+))?$"
)


def parse_drift_spec(spec: str) -> DriftInjection:
    """``KIND:TOOL[,TOOL]@WAFER[xMAGNITUDE][:SENSOR,SENSOR|:COUNT]`` → a drift injection.

    e.g. ``mean_shift:ETCH-02@300x3`` shifts three sensors of ETCH-02 by 3σ from the
    300th wafer of the fab on.
    """
    m = _DRIFT.match(spec.strip())
    if not m:
        raise ValueError(
            f"drift spec {spec!r} is not KIND:TOOL[,TOOL]@WAFER[xMAGNITUDE][:SENSORS], e.g. mean_shift:ETCH-02@300x3"
        )
    sensors: list[str] | int | None = None
    if m["sensors"]:
        sensors = int(m["sensors"]) if m["sensors"].isdigit() else m["sensors"].split(",")
    return DriftInjection(
        kind=m["kind"],
        tools=m["tools"].split(","),
        from_wafer=int(m["wafer"]),
        magnitude=float(m["mag"]) if m["mag"] else 3.0,
        sensors=sensors,
    )


def paced_by_rate(items: Iterable[T], rate: float) -> Iterator[T]:
    """Yield at most ``rate`` items per second (0 = unpaced), without drift building up."""
    if rate <= 0:
        yield from items
        return
    start = time.monotonic()
    for i, item in enumerate(items):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield item
