"""A seeded, realistic fab event generator: FDC sensor summaries and delayed sort results.

Why a simulator: the retraining loop needs a stream whose drift we control. Each
wafer passes one etch step on a tool/chamber and yields a ``SensorReading``; hours
later (after its lot finishes and goes to the prober) a wafer-level ``TestResult``.

The model behind it, in standardised units of each sensor's std:

* ``reported = recipe target + process deviation`` and ``physical = centre + scale * reported``.
* The process deviation is a few latent process factors mapped to sensors through a
  loading matrix plus sensor noise (so sensors correlate, as real FDC data does),
  plus per-chamber offsets, a slow chamber-ageing drift that preventive maintenance
  (PM) resets, and a fresh small offset after each PM on PM-sensitive sensors.
* The wafer-sort outcome is a nonlinear function of the *process deviation* of five
  sensors (pressure, reflected RF power, chuck temperature, He backside flow,
  endpoint time) plus irreducible noise, thresholded to a target fail rate.

Drift injections (``DriftInjection``) apply to wafers on the named tools whose
**global wafer index** (0-based position in the fab-wide processing order, which is
also time order) lies in ``[from_wafer, until_wafer)``. ``mean_shift`` and
``variance_change`` are process excursions: they move the deviation, so touching a
yield-driving sensor moves the fail rate too. ``stuck`` and ``nan`` are broken
sensors: only the reported value changes; the wafer and its sort result do not.
``recipe_change`` renames the recipe and moves its target on recipe-dependent
sensors: features shift, yield relative to the new target does not.

Determinism: every random draw (including event ids) comes from generators seeded
by ``(seed, stream, index)``, and injections consume no randomness, so the same
config gives the same events and a config with an injection differs from its
baseline only where the injection says.
"""

from __future__ import annotations

import heapq
import math
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from fabloop.core.schemas import ParametricResult, SensorReading, TestResult

N_FACTORS = 5
MIN_SENSORS = 8
MAX_SENSORS = 5000
CALIBRATION_DRAWS = 20_000
_DRIFT_REFERENCE_WAFERS = 500

# Random-stream ids: each purpose draws from its own generator so that adding
# wafers, injections or sensors downstream never perturbs the others.
_S_STRUCTURE, _S_PLAN, _S_PM, _S_CALIBRATE, _S_INJECT, _S_LOT = 0, 1, 3, 7, 5, 11

DriftKind = Literal["mean_shift", "variance_change", "stuck", "nan", "recipe_change"]


class ToolSpec(BaseModel):
    """One process tool and its chambers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    chambers: list[str] = Field(default_factory=lambda: ["A", "B"], min_length=1)


class DriftInjection(BaseModel):
    """A fault injected into the stream from ``from_wafer`` on.

    ``from_wafer``/``until_wafer`` are *global* wafer indices (0-based, fab-wide
    processing order); only wafers run on ``tools`` (None = every tool) are hit.
    ``sensors`` is a list of names or a count picked at random (seeded); None means
    every recipe-dependent sensor for ``recipe_change`` and three sensors otherwise.
    ``magnitude`` is in units of each sensor's std: the shift for ``mean_shift`` and
    ``recipe_change``, the std multiplier for ``variance_change``; unused by
    ``stuck`` (held at the first affected wafer's value, per tool) and ``nan``
    (reported as None).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: DriftKind
    tools: list[str] | None = None
    from_wafer: int = Field(ge=0)
    until_wafer: int | None = Field(default=None, ge=1)
    sensors: list[str] | int | None = None
    magnitude: float = 3.0
    new_recipe: str | None = Field(default=None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _check(self) -> DriftInjection:
        if self.until_wafer is not None and self.until_wafer <= self.from_wafer:
            raise ValueError(f"until_wafer ({self.until_wafer}) must be > from_wafer ({self.from_wafer})")
        if isinstance(self.sensors, int) and self.sensors < 1:
            raise ValueError(f"sensors: a count must be >= 1, got {self.sensors}")
        if isinstance(self.sensors, list) and not self.sensors:
            raise ValueError("sensors: an empty list injects nothing")
        if self.kind == "variance_change" and self.magnitude < 0:
            raise ValueError(f"magnitude: a std multiplier must be >= 0, got {self.magnitude}")
        if self.new_recipe is not None and self.kind != "recipe_change":
            raise ValueError("new_recipe: only meaningful for kind 'recipe_change'")
        return self


def _default_tools() -> list[ToolSpec]:
    return [ToolSpec(name=f"ETCH-0{i}") for i in (1, 2, 3)]


class SimulationConfig(BaseModel):
    """Everything that determines a simulated stream; same config, same events."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    fab: str = Field(default="FAB1", min_length=1, max_length=128)
    tools: list[ToolSpec] = Field(default_factory=_default_tools, min_length=1)
    recipes: list[str] = Field(
        default_factory=lambda: ["POLY-ETCH-STD", "POLY-ETCH-HAR", "POLY-ETCH-LD"], min_length=1
    )
    step: str = Field(default="POLY_ETCH", min_length=1, max_length=128)
    n_sensors: int = Field(default=40, ge=MIN_SENSORS, le=MAX_SENSORS)
    wafers: int = Field(default=2000, ge=1, description="Total wafers processed.")
    lot_size: int = Field(default=25, ge=1, le=99)
    start: AwareDatetime = datetime(2025, 1, 6, 6, 0, tzinfo=UTC)
    cadence_seconds: float = Field(default=90.0, gt=0, description="Simulated seconds between wafers, fab-wide.")
    test_delay_hours: float = Field(default=6.0, gt=0, description="Lot finish to first sort result.")
    test_jitter_hours: float = Field(default=2.0, ge=0, description="Extra uniform per-lot queueing delay.")
    sort_seconds_per_wafer: float = Field(default=120.0, ge=0)
    pm_every_wafers: int | None = Field(default=400, ge=1, description="PM after this many wafers on a tool.")
    chamber_drift_per_500_wafers: float = Field(default=0.8, ge=0, description="Ageing drift, std units.")
    target_fail_rate: float = Field(default=0.065, gt=0, lt=0.5)
    yield_limit_pct: float = Field(default=80.0, gt=1, lt=99)
    program: str = Field(default="SORT1", min_length=1, max_length=128)
    lot_prefix: str = Field(
        default="L", pattern=r"^[A-Za-z0-9_.]{1,16}$",
        description="Lot ids are PREFIX0001…; give each stream its own prefix so wafer ids never collide.",
    )
    drifts: list[DriftInjection] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> SimulationConfig:
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tools: duplicate tool names in {names}")
        for t in self.tools:
            if len(set(t.chambers)) != len(t.chambers):
                raise ValueError(f"tools[{t.name}].chambers: duplicates in {t.chambers}")
        if len(set(self.recipes)) != len(self.recipes):
            raise ValueError(f"recipes: duplicate recipe names in {self.recipes}")
        sensors = set(sensor_names(self.n_sensors))
        for i, d in enumerate(self.drifts):
            unknown = [t for t in (d.tools or []) if t not in names]
            if unknown:
                raise ValueError(f"drifts[{i}].tools: unknown tool(s) {unknown}; known: {names}")
            if isinstance(d.sensors, list):
                missing = [s for s in d.sensors if s not in sensors]
                if missing:
                    raise ValueError(f"drifts[{i}].sensors: unknown sensor(s) {missing[:5]}")
            elif isinstance(d.sensors, int) and d.sensors > self.n_sensors:
                raise ValueError(f"drifts[{i}].sensors: count {d.sensors} exceeds n_sensors={self.n_sensors}")
        return self


# ---------------------------------------------------------------------------
# Sensor catalogue

@dataclass(frozen=True)
class SensorSpec:
    """One FDC sensor summary: physical centre/scale and how it behaves."""

    name: str
    units: str
    centre: float
    scale: float
    recipe_dependent: bool = False  # setpoint moves with the recipe
    drift_prone: bool = False  # ages with chamber wafers since PM
    pm_sensitive: bool = False  # re-centres slightly at each PM
    yield_driver: bool = False  # enters the sort outcome


# name, units, centre, scale, flags (R recipe, D drift, P PM, Y yield)
_NAMED: tuple[tuple[str, str, float, float, str], ...] = (
    ("rf_power_mean", "W", 1500.0, 8.0, "R"),
    ("rf_reflected_power_mean", "W", 12.0, 1.5, "DY"),
    ("chamber_pressure_mean", "mTorr", 30.0, 0.4, "PY"),
    ("chamber_pressure_std", "mTorr", 0.35, 0.04, "D"),
    ("chuck_temp_mean", "degC", 60.0, 0.5, "PY"),
    ("he_backside_flow_mean", "sccm", 12.0, 0.3, "Y"),
    ("endpoint_time_s", "s", 48.0, 1.2, "DY"),
    ("dc_bias_mean", "V", -350.0, 6.0, "R"),
    ("rf_power_std", "W", 6.0, 0.6, ""),
    ("throttle_valve_pos_mean", "pct", 42.0, 1.5, "P"),
    ("chuck_temp_std", "degC", 0.3, 0.03, ""),
    ("wall_temp_mean", "degC", 70.0, 0.6, "D"),
    ("he_backside_pressure_mean", "Torr", 10.0, 0.15, "P"),
    ("gas_cf4_flow_mean", "sccm", 80.0, 0.8, "R"),
    ("gas_o2_flow_mean", "sccm", 10.0, 0.15, "R"),
    ("gas_ar_flow_mean", "sccm", 150.0, 1.5, "R"),
    ("gas_chf3_flow_mean", "sccm", 25.0, 0.4, "R"),
    ("dc_bias_std", "V", 4.0, 0.4, ""),
    ("oes_cf_intensity_mean", "au", 5200.0, 90.0, "RD"),
    ("oes_co_intensity_mean", "au", 1800.0, 40.0, "R"),
    ("esc_voltage_mean", "V", 2500.0, 10.0, "P"),
    ("esc_current_mean", "uA", 35.0, 1.2, "D"),
    ("matcher_c1_pos_mean", "pct", 55.0, 0.8, "DP"),
    ("matcher_c2_pos_mean", "pct", 38.0, 0.8, "DP"),
    ("step_duration_s", "s", 62.0, 0.9, "R"),
    ("foreline_pressure_mean", "mTorr", 120.0, 3.0, ""),
)
_YIELD_SENSORS = (
    "chamber_pressure_mean",
    "rf_reflected_power_mean",
    "chuck_temp_mean",
    "he_backside_flow_mean",
    "endpoint_time_s",
)


def sensor_names(n_sensors: int) -> list[str]:
    """The first ``n_sensors`` names: the physical catalogue, then ``sensor_027``..."""
    if not MIN_SENSORS <= n_sensors <= MAX_SENSORS:
        raise ValueError(f"n_sensors: must be in [{MIN_SENSORS}, {MAX_SENSORS}], got {n_sensors}")
    named = [row[0] for row in _NAMED[:n_sensors]]
    return named + [f"sensor_{i:03d}" for i in range(len(named) + 1, n_sensors + 1)]


def sensor_specs(config: SimulationConfig) -> list[SensorSpec]:
    """The catalogue for this config (numbered sensors get seeded centres and flags)."""
    rng = np.random.default_rng([config.seed, _S_STRUCTURE, 0])
    specs = [
        SensorSpec(name, units, centre, scale, "R" in f, "D" in f, "P" in f, "Y" in f)
        for name, units, centre, scale, f in _NAMED[: config.n_sensors]
    ]
    for i in range(len(specs) + 1, config.n_sensors + 1):
        centre = float(10 ** rng.uniform(0.0, 3.0))
        scale = float(centre * rng.uniform(0.005, 0.05))
        flags = rng.random(3) < (0.10, 0.10, 0.10)
        specs.append(SensorSpec(f"sensor_{i:03d}", "au", centre, scale, *map(bool, flags)))
    return specs


# ---------------------------------------------------------------------------
# Fab structure: everything fixed for a run (loadings, offsets, yield threshold)

@dataclass(frozen=True)
class _Structure:
    names: list[str]
    centre: np.ndarray
    scale: np.ndarray
    decimals: np.ndarray
    nonneg: np.ndarray
    recipe_dep: np.ndarray
    pm_sensitive: np.ndarray
    loadings: np.ndarray  # (n_sensors, N_FACTORS)
    noise_sd: np.ndarray  # (n_sensors,)
    chamber_offset: np.ndarray  # (n_tools, max_chambers, n_sensors)
    drift_slope: np.ndarray  # (n_tools, max_chambers, n_sensors), std per wafer since PM
    recipe_target: np.ndarray  # (n_recipes, n_sensors)
    yield_cols: np.ndarray  # column index of each _YIELD_SENSORS entry
    threshold: float
    eps_sd: float
    injection_cols: list[np.ndarray]
    injection_dir: list[np.ndarray]  # recipe_change direction (+-1) per affected column


_PM_OFFSET_SD = 0.35
_CHAMBER_OFFSET_SD = 0.25
_RECIPE_TARGET_SD = 2.5
_YIELD_EPS_SD = 0.55
_YIELD_SLOPE = 0.9


def _build_structure(config: SimulationConfig) -> _Structure:
    specs = sensor_specs(config)
    n = len(specs)
    rng = np.random.default_rng([config.seed, _S_STRUCTURE, 1])
    centre = np.array([s.centre for s in specs])
    scale = np.array([s.scale for s in specs])
    decimals = np.clip(3 - np.floor(np.log10(scale)), 0, 8).astype(int)
    nonneg = centre > 0  # a physical magnitude (flow, power, std...) cannot go negative

    # Communalities: how much of each sensor's variance the shared process factors explain.
    h2 = rng.uniform(0.35, 0.85, n)
    numbered = np.array([s.name.startswith("sensor_") for s in specs])
    h2[numbered] = rng.uniform(0.05, 0.8, numbered.sum())
    pure_noise = numbered & (rng.random(n) < 0.15)
    h2[pure_noise] = 0.02
    direction = rng.normal(size=(n, N_FACTORS))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    loadings = direction * np.sqrt(h2)[:, None]
    noise_sd = np.sqrt(1.0 - h2)

    n_tools = len(config.tools)
    max_ch = max(len(t.chambers) for t in config.tools)
    chamber_offset = rng.normal(0.0, _CHAMBER_OFFSET_SD, (n_tools, max_ch, n))
    drift_mask = np.array([s.drift_prone for s in specs])
    slope = rng.uniform(0.5, 1.3, (n_tools, max_ch, n)) * rng.choice([-1.0, 1.0], (n_tools, max_ch, n))
    # Ageing raises reflected power and endpoint time (the plasma gets worse), never improves it.
    names = [s.name for s in specs]
    for name in ("rf_reflected_power_mean", "endpoint_time_s"):
        slope[:, :, names.index(name)] = np.abs(slope[:, :, names.index(name)])
    drift_slope = slope * drift_mask * (config.chamber_drift_per_500_wafers / _DRIFT_REFERENCE_WAFERS)

    recipe_dep = np.array([s.recipe_dependent for s in specs])
    recipe_target = rng.normal(0.0, _RECIPE_TARGET_SD, (len(config.recipes), n)) * recipe_dep
    recipe_target -= recipe_target.mean(axis=0, keepdims=True) if len(config.recipes) > 1 else 0.0

    yield_cols = np.array([names.index(y) for y in _YIELD_SENSORS])
    pm_sensitive = np.array([s.pm_sensitive for s in specs])

    inj_cols, inj_dir = _resolve_injections(config, names, recipe_dep)
    partial = _Structure(
        names, centre, scale, decimals, nonneg, recipe_dep, pm_sensitive, loadings, noise_sd,
        chamber_offset, drift_slope, recipe_target, yield_cols, 0.0, _YIELD_EPS_SD, inj_cols, inj_dir,
    )
    threshold = _calibrate_threshold(config, partial)
    return replace(partial, threshold=threshold)


def _resolve_injections(
    config: SimulationConfig, names: list[str], recipe_dep: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    cols_out, dirs_out = [], []
    for i, d in enumerate(config.drifts):
        rng = np.random.default_rng([config.seed, _S_INJECT, i])
        pool = np.flatnonzero(recipe_dep) if d.kind == "recipe_change" else np.arange(len(names))
        if isinstance(d.sensors, list):
            cols = np.array([names.index(s) for s in d.sensors])
        elif d.sensors is None and d.kind == "recipe_change":
            cols = pool
        else:
            count = 3 if d.sensors is None else d.sensors
            if count > len(pool):
                raise ValueError(f"drifts[{i}].sensors: count {count} exceeds the {len(pool)} eligible sensors")
            cols = np.sort(rng.choice(pool, size=count, replace=False))
        cols_out.append(cols)
        dirs_out.append(rng.choice([-1.0, 1.0], size=len(cols)))
    return cols_out, dirs_out


def injection_sensors(config: SimulationConfig) -> list[list[str]]:
    """The sensor names each of ``config.drifts`` affects (resolves counts)."""
    specs = sensor_specs(config)
    names = [s.name for s in specs]
    cols, _ = _resolve_injections(config, names, np.array([s.recipe_dependent for s in specs]))
    return [[names[c] for c in cs] for cs in cols]


def _yield_score(dev_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Risk terms from the process deviation of the yield sensors (columns in _YIELD_SENSORS order).

    High pressure, high reflected power, chuck temperature off target either way,
    starved He backside cooling and late endpoint all kill die.
    """
    press, refl, chuck, he, endpoint = dev_y.T
    terms = np.stack(
        [
            1.0 * press,
            0.8 * refl,
            0.4 * chuck**2,
            -0.6 * he,
            0.7 * np.maximum(endpoint - 0.3, 0.0),
        ],
        axis=1,
    )
    return terms.sum(axis=1), terms


def _calibrate_threshold(config: SimulationConfig, st: _Structure) -> float:
    """Threshold on risk + noise so that a healthy fab fails ``target_fail_rate`` of wafers."""
    rng = np.random.default_rng([config.seed, _S_CALIBRATE])
    m = CALIBRATION_DRAWS
    cols = st.yield_cols
    factors = rng.normal(size=(m, N_FACTORS))
    dev = factors @ st.loadings[cols].T + rng.normal(size=(m, len(cols))) * st.noise_sd[cols]
    tool = rng.integers(0, len(config.tools), m)
    n_ch = np.array([len(t.chambers) for t in config.tools])
    chamber = (rng.random(m) * n_ch[tool]).astype(int)
    age = rng.uniform(0, config.pm_every_wafers or _DRIFT_REFERENCE_WAFERS, m)
    dev += st.chamber_offset[tool, chamber][:, cols]
    dev += st.drift_slope[tool, chamber][:, cols] * age[:, None]
    dev += rng.normal(0.0, _PM_OFFSET_SD, (m, len(cols))) * st.pm_sensitive[cols]
    score, _ = _yield_score(dev)
    q = score + rng.normal(0.0, st.eps_sd, m)
    return float(np.quantile(q, 1.0 - config.target_fail_rate))


# ---------------------------------------------------------------------------
# Lot plan: routing and timing, cheap enough to compute on its own

@dataclass(frozen=True)
class _LotPlan:
    index: int
    lot: str
    tool: int
    recipe: int
    first_wafer: int  # global index of slot 1
    ts: np.ndarray  # seconds since start, per wafer
    tool_wafer: np.ndarray  # index of each wafer in its tool's own sequence


def _plan(config: SimulationConfig) -> Iterator[_LotPlan]:
    rng = np.random.default_rng([config.seed, _S_PLAN])
    tool_count = [0] * len(config.tools)
    first = 0
    index = 0
    while first < config.wafers:
        n = min(config.lot_size, config.wafers - first)
        tool = int(rng.integers(len(config.tools)))
        recipe = int(rng.integers(len(config.recipes)))
        g = np.arange(first, first + n)
        ts = (g + rng.uniform(0.0, 0.5, n)) * config.cadence_seconds
        tw = np.arange(tool_count[tool], tool_count[tool] + n)
        tool_count[tool] += n
        yield _LotPlan(index, f"{config.lot_prefix}{index + 1:04d}", tool, recipe, first, ts, tw)
        first += n
        index += 1


class PMEvent(BaseModel):
    """A preventive maintenance: drift-prone sensors of the tool reset, PM-sensitive ones re-centre."""

    model_config = ConfigDict(frozen=True)

    tool: str
    pm_number: int  # 1 for the first PM of the run on this tool
    before_wafer: int  # global index of the first wafer processed after the PM
    tool_wafer: int  # that wafer's index in the tool's own sequence
    ts: AwareDatetime  # when that wafer was processed


def pm_events(config: SimulationConfig) -> list[PMEvent]:
    """Where the PMs fall in this run (computed from the plan, without generating sensors)."""
    if config.pm_every_wafers is None:
        return []
    out: list[PMEvent] = []
    for lp in _plan(config):
        for k in np.flatnonzero((lp.tool_wafer % config.pm_every_wafers == 0) & (lp.tool_wafer > 0)):
            out.append(
                PMEvent(
                    tool=config.tools[lp.tool].name,
                    pm_number=int(lp.tool_wafer[k] // config.pm_every_wafers),
                    before_wafer=lp.first_wafer + int(k),
                    tool_wafer=int(lp.tool_wafer[k]),
                    ts=config.start + timedelta(seconds=float(lp.ts[k])),
                )
            )
    return out


# ---------------------------------------------------------------------------
# Generation

class _Generator:
    """Turns lot plans into events; holds the only cross-lot state (PM offsets, stuck values)."""

    def __init__(self, config: SimulationConfig) -> None:
        self.cfg = config
        self.st = _build_structure(config)
        self.tool_names = [t.name for t in config.tools]
        self.inj_tools = [
            None if d.tools is None else {self.tool_names.index(t) for t in d.tools} for d in config.drifts
        ]
        self._pm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._stuck: dict[tuple[int, int], np.ndarray] = {}

    def _pm_offset(self, tool: int, pm_number: int) -> np.ndarray:
        key = (tool, pm_number)
        if key not in self._pm_cache:
            # keep only the current PM per tool: the cache stays bounded
            self._pm_cache = {k: v for k, v in self._pm_cache.items() if k[0] != tool}
            rng = np.random.default_rng([self.cfg.seed, _S_PM, tool, pm_number])
            self._pm_cache[key] = rng.normal(0.0, _PM_OFFSET_SD, len(self.st.names)) * self.st.pm_sensitive
        return self._pm_cache[key]

    def lot_events(self, lp: _LotPlan) -> tuple[list[SensorReading], list[TestResult]]:
        cfg, st = self.cfg, self.st
        n, m = len(lp.ts), len(st.names)
        rng = np.random.default_rng([cfg.seed, _S_LOT, lp.index])
        chambers = np.arange(n) % len(cfg.tools[lp.tool].chambers)

        # Process deviation (std units): shared factors + noise + chamber + ageing + PM.
        z_rand = rng.normal(size=(n, N_FACTORS)) @ st.loadings.T + rng.normal(size=(n, m)) * st.noise_sd
        pm_every = cfg.pm_every_wafers
        age = lp.tool_wafer % pm_every if pm_every else lp.tool_wafer
        pm_no = lp.tool_wafer // pm_every if pm_every else np.zeros(n, dtype=int)
        pm_off = np.stack([self._pm_offset(lp.tool, int(k)) for k in pm_no])
        dev = z_rand + st.chamber_offset[lp.tool, chambers] + st.drift_slope[lp.tool, chambers] * age[:, None] + pm_off
        target = np.repeat(st.recipe_target[lp.recipe][None, :], n, axis=0)
        recipes = [cfg.recipes[lp.recipe]] * n
        hits = self._process_drifts(lp, dev, z_rand, target, recipes)

        # Sort outcome from the true process deviation (before sensor faults).
        score, terms = _yield_score(dev[:, st.yield_cols])
        q = score + rng.normal(0.0, st.eps_sd, n)
        logit0 = math.log(cfg.yield_limit_pct / (100.0 - cfg.yield_limit_pct))
        yield_pct = np.round(100.0 / (1.0 + np.exp(-(logit0 + _YIELD_SLOPE * (st.threshold - q)))), 2)
        etch_depth = 850.0 + 12.0 * dev[:, st.yield_cols[4]] + rng.normal(0.0, 4.0, n)
        cd_bias = 4.0 + 1.5 * dev[:, st.yield_cols[0]] + 1.0 * dev[:, st.yield_cols[2]] + rng.normal(0.0, 0.5, n)

        # Reported physical values, then sensor faults.
        phys = st.centre + st.scale * (target + dev)
        phys[:, st.nonneg] = np.maximum(phys[:, st.nonneg], 0.0)
        for dec in np.unique(st.decimals):
            c = st.decimals == dec
            phys[:, c] = np.round(phys[:, c], int(dec))
        values = self._sensor_faults(lp, hits, phys)

        ids = rng.bytes(32 * n)
        test_at = (
            float(lp.ts[-1])
            + cfg.test_delay_hours * 3600.0
            + rng.uniform(0.0, cfg.test_jitter_hours * 3600.0)
            + np.arange(1, n + 1) * cfg.sort_seconds_per_wafer
        )
        readings = self._readings(lp, ids, chambers, recipes, values)
        results = self._results(lp, ids, test_at, yield_pct, terms, etch_depth, cd_bias)
        return readings, results

    def _process_drifts(
        self, lp: _LotPlan, dev: np.ndarray, z_rand: np.ndarray, target: np.ndarray, recipes: list[str]
    ) -> list[np.ndarray | None]:
        """Apply the injected process drifts in place; the wafers each injection hits (None: none)."""
        cfg, st = self.cfg, self.st
        g = lp.first_wafer + np.arange(len(lp.ts))
        hits: list[np.ndarray | None] = []
        for i, d in enumerate(cfg.drifts):
            tools = self.inj_tools[i]
            if tools is not None and lp.tool not in tools:
                hits.append(None)
                continue
            rows = (g >= d.from_wafer) & (g < (d.until_wafer if d.until_wafer is not None else np.inf))
            hits.append(rows if rows.any() else None)
            if not rows.any():
                continue
            cols = st.injection_cols[i]
            sel = np.ix_(rows, cols)
            if d.kind == "mean_shift":
                dev[sel] += d.magnitude
            elif d.kind == "variance_change":
                dev[sel] += (d.magnitude - 1.0) * z_rand[sel]
            elif d.kind == "recipe_change":
                target[sel] += d.magnitude * st.injection_dir[i]
                for w in np.flatnonzero(rows):
                    recipes[w] = d.new_recipe or f"{recipes[w]}-REV2"
        return hits

    def _sensor_faults(
        self, lp: _LotPlan, hits: list[np.ndarray | None], phys: np.ndarray
    ) -> list[list[float | None]]:
        """Stuck and silent sensors on top of the reported values (a stuck sensor holds its first value)."""
        none_cells: list[tuple[int, int]] = []
        for i, d in enumerate(self.cfg.drifts):
            hit = hits[i]
            if hit is None or d.kind not in ("stuck", "nan"):
                continue
            cols = self.st.injection_cols[i]
            if d.kind == "stuck":
                held = self._stuck.setdefault((i, lp.tool), phys[np.flatnonzero(hit)[0], cols].copy())
                phys[np.ix_(hit, cols)] = held
            else:
                none_cells.extend((int(r), int(c)) for r in np.flatnonzero(hit) for c in cols)
        values: list[list[float | None]] = phys.tolist()
        for r, c in none_cells:
            values[r][c] = None
        return values

    def _readings(
        self, lp: _LotPlan, ids: bytes, chambers: np.ndarray, recipes: list[str], values: list[list[float | None]]
    ) -> list[SensorReading]:
        cfg, tool = self.cfg, self.cfg.tools[lp.tool]
        return [
            SensorReading(
                event_id=str(uuid.UUID(bytes=ids[32 * k : 32 * k + 16], version=4)),
                ts=cfg.start + timedelta(seconds=float(lp.ts[k])),
                lot=lp.lot,
                wafer=f"{lp.lot}-{k + 1:02d}",
                fab=cfg.fab,
                tool=tool.name,
                chamber=tool.chambers[chambers[k]],
                recipe=recipes[k],
                step=cfg.step,
                sensors=dict(zip(self.st.names, values[k], strict=True)),
            )
            for k in range(len(lp.ts))
        ]

    def _results(
        self, lp: _LotPlan, ids: bytes, test_at: np.ndarray, yield_pct: np.ndarray, terms: np.ndarray,
        etch_depth: np.ndarray, cd_bias: np.ndarray,
    ) -> list[TestResult]:
        cfg = self.cfg
        passed = yield_pct >= cfg.yield_limit_pct
        results = []
        for k in range(len(lp.ts)):
            ok = bool(passed[k])
            results.append(
                TestResult(
                    event_id=str(uuid.UUID(bytes=ids[32 * k + 16 : 32 * k + 32], version=4)),
                    ts=cfg.start + timedelta(seconds=float(test_at[k])),
                    lot=lp.lot,
                    wafer=f"{lp.lot}-{k + 1:02d}",
                    program=cfg.program,
                    stage="wafer_sort",
                    passed=ok,
                    yield_pct=float(yield_pct[k]),
                    part_id=None,
                    hard_bin=1 if ok else 5,
                    soft_bin=1 if ok else 10 + int(np.argmax(terms[k])),
                    parametrics=[
                        ParametricResult(
                            name="etch_depth_nm", value=round(float(etch_depth[k]), 2), units="nm",
                            test_num=1001, passed=bool(820.0 <= etch_depth[k] <= 880.0),
                        ),
                        ParametricResult(
                            name="cd_bias_nm", value=round(float(cd_bias[k]), 3), units="nm",
                            test_num=1002, passed=bool(abs(cd_bias[k] - 4.0) <= 4.0),
                        ),
                    ],
                )
            )
        return results


def simulate(config: SimulationConfig) -> Iterator[SensorReading | TestResult]:
    """Yield the run's events in timestamp order, generating one lot at a time.

    Sort results wait in a heap until the sensor stream passes their time, so memory
    holds only the lots still "at the prober" (a few hours' worth), not the run.
    """
    gen = _Generator(config)
    pending: list[tuple[datetime, int, TestResult]] = []
    seq = 0
    for lp in _plan(config):
        readings, results = gen.lot_events(lp)
        for r in results:
            heapq.heappush(pending, (r.ts, seq, r))
            seq += 1
        for reading in readings:
            while pending and pending[0][0] < reading.ts:
                yield heapq.heappop(pending)[2]
            yield reading
    while pending:
        yield heapq.heappop(pending)[2]


# ---------------------------------------------------------------------------
# Frames for analysis and tests

_META = ("event_id", "ts", "lot", "wafer", "fab", "tool", "chamber", "recipe", "step")


def sensor_frame(events: Iterable[SensorReading | TestResult]) -> pd.DataFrame:
    """One row per sensor reading: metadata columns then one column per sensor (None -> NaN)."""
    meta: list[tuple[object, ...]] = []
    values: list[dict[str, float | None]] = []
    for e in events:
        if isinstance(e, SensorReading):
            meta.append(tuple(getattr(e, f) for f in _META))
            values.append(e.sensors)
    left = pd.DataFrame.from_records(meta, columns=list(_META))
    right = pd.DataFrame.from_records(values).astype(float) if values else pd.DataFrame()
    return pd.concat([left, right], axis=1)


def test_frame(events: Iterable[SensorReading | TestResult]) -> pd.DataFrame:
    """One row per test result: wafer, ts, pass/fail, yield and bins."""
    cols = ("event_id", "ts", "lot", "wafer", "program", "stage", "passed", "yield_pct", "hard_bin", "soft_bin")
    rows = [tuple(getattr(e, c) for c in cols) for e in events if isinstance(e, TestResult)]
    return pd.DataFrame.from_records(rows, columns=list(cols))


test_frame.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
