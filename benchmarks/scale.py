"""Benchmark: a fab of many tools streaming at once through 2 ingest members, 2 workers and PostgreSQL.

What it does: a throwaway PostgreSQL cluster (``fabloop.infra.postgres``, Debian's
binaries, ``fsync=off``), then ``fabloop up --database-url <it> --partitions 4`` in a
temporary ``FABLOOP_HOME`` on free loopback ports and ``fabloop deploy``. A second
Prefect worker joins the stack's work pool (same command and environment as the
stack's own, another name), so 2 workers pick up the flow runs; ``drift-check`` keeps
its ``prefect.yaml`` concurrency limit, which is what the README sizes.

The fab: ``--tools`` tools (default 12), ``--sensors`` sensors (default 30), windows of
``--window-wafers`` wafers (default 250) per tool (``yield`` model per tool), no drift
injected, no PM re-centring or chamber ageing (a quiet fab).

Champions, chosen cheaply and for real: a set-up stretch of ``--setup-wafers`` wafers
per tool, with all its sort results, is published and stored by the real ``Ingestor``
in this process with its closed windows marked announced without being announced (so no
check or first training starts for them), then each model gets one real ``retrain``
in this process (a 2-trial, 2-fold budget, no promotion) whose version is set as
``champion``. Why not a policy that keeps first trainings from starting: there is
none (a window without a champion always asks for a first training), and a check
without a champion never reaches the drift-check path this benchmark is about. The
window policy has performance tolerances above a 250-wafer window's noise and a
week's cooldown, so a false alarm retrains a model at most once (counted).

The stream: ``--minutes`` minutes (default 3) of the simulated fab published at a
steady ``--wafers-per-s`` (default 25, about 2 events per wafer) in half-second
ticks, while 2 ``fabloop ingest`` processes (one consumer group, 4 partitions per
topic) store it in PostgreSQL and announce each closed window; Prefect's trigger
runs ``drift-check`` on the workers. After the stream: wait until every published
event is stored, stop the ingest members (SIGINT, a clean stop), then wait (up to
``--drain-timeout``) until every window closed during the stream has a judged
check. Both counts are reported as found.

Measured, from the store: ``events_per_s`` = events stored by the stream / seconds
from its first publish to the moment the last one was stored; window-closed →
verdict latency = ``drift_checks.checked_at`` (the verdict recorded) minus
``windows.closed_at`` (set by ingest), p50/p95 over the stream's windows (the
stream's windows: every window closed after the set-up, including those the
set-up opened); ``verdicts_per_min``, the check path's throughput once windows
queue up; from Prefect, each ``drift-check`` run's wait (created → started: trigger,
concurrency slot, worker poll) and run time (started → ended: process start,
imports, the check). Memory:
every second, psutil RSS of each process of the stack's tree, grouped by kind
(ingest members, workers, the fork server, flow-run processes = the workers' children
(launchers) and the fork server's (engines), Prefect server, MLflow, PostgreSQL,
broker); ``peak_rss_mb`` is the largest single process of each kind,
``peak_total_rss_mb`` the largest sum of the kind at one sample (a sum counts shared
pages once per process: PostgreSQL's shared buffers, forked MLflow workers, the
imports an engine shares with the fork server).

    python benchmarks/scale.py [--minutes 3] [--tools 12] [--sensors 30] [--wafers-per-s 25]

Progress goes to stderr; ONE JSON line is printed last on stdout. Exits 1 if a
window closed during the stream was left unjudged or the run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import T0, cli, db_query, say, wait
from sqlalchemy import func, select

from fabloop.adapters.kafka import make_producer, publish_events
from fabloop.adapters.store import (
    DriftCheckRow,
    RetrainTriggerRow,
    SensorReadingRow,
    TestResultRow,
    WindowRow,
)
from fabloop.core.schemas import SensorReading, TestResult
from fabloop.infra.process import ProcessManager, free_port

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
PARTITIONS = 4
INGEST_MEMBERS = ("member-a", "member-b")
SECOND_WORKER = "worker-2"
SETUP_POLICY = "scale-setup"
Event = SensorReading | TestResult







def stored_count(url: str) -> int:
    return int(db_query(url, select(func.count()).select_from(SensorReadingRow))[0][0]) + int(
        db_query(url, select(func.count()).select_from(TestResultRow))[0][0])


# --------------------------------------------------------------------------- memory


class RssSampler(threading.Thread):
    """Samples RSS of the stack's processes once a second, grouped by kind."""

    def __init__(self, kinds: Callable[[], dict[str, list[psutil.Process]]]) -> None:
        super().__init__(daemon=True)
        self.kinds = kinds
        self.stop_event = threading.Event()
        self.peak: dict[str, int] = defaultdict(int)
        self.peak_total: dict[str, int] = defaultdict(int)
        self.peak_count: dict[str, int] = defaultdict(int)
        self.samples = 0

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            try:
                groups = self.kinds()
            except Exception:  # noqa: BLE001 - a process that ends mid-walk: the next sample sees the rest
                continue
            for kind, procs in groups.items():
                total = 0
                for proc in procs:
                    try:
                        rss = proc.memory_info().rss
                    except psutil.Error:
                        continue
                    total += rss
                    self.peak[kind] = max(self.peak[kind], rss)
                self.peak_total[kind] = max(self.peak_total[kind], total)
                self.peak_count[kind] = max(self.peak_count[kind], len(procs))
            self.samples += 1


def _tree(proc: psutil.Process | None) -> list[psutil.Process]:
    if proc is None:
        return []
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _postmaster(datadir: Path) -> psutil.Process | None:
    try:
        return psutil.Process(int((datadir / "postmaster.pid").read_text().splitlines()[0]))
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def pct(values: list[float], q: int) -> float | None:
    """The q-th percentile of sorted ``values`` (inclusive method), None if empty."""
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 1)
    return round(float(statistics.quantiles(values, n=100, method="inclusive")[q - 1]), 1)


def drift_check_runs() -> list[tuple[float, float]]:
    """(created -> started, started -> ended) seconds of every finished ``drift-check`` flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["drift-check"])), limit=200)
    return [((r.start_time - r.created).total_seconds(), (r.end_time - r.start_time).total_seconds())
            for r in runs if r.created and r.start_time and r.end_time]


# --------------------------------------------------------------------------- the fab


def fab(args: argparse.Namespace) -> tuple[list[Event], list[Event]]:
    """Set-up events (the set-up wafers and all their sort results) and the stream's events, in time order."""
    from fabloop.core.simulate import SimulationConfig, ToolSpec, simulate

    stream_wafers = int(args.minutes * 60 * args.wafers_per_s)
    setup_wafers = args.setup_wafers * args.tools
    config = SimulationConfig(
        seed=args.seed, wafers=setup_wafers + stream_wafers, n_sensors=args.sensors, lot_prefix="SC",
        tools=[ToolSpec(name=f"SCALE-{i:03d}") for i in range(1, args.tools + 1)], target_fail_rate=0.1,
        start=datetime.now(UTC) - timedelta(days=30), test_delay_hours=1.0, test_jitter_hours=0.5,
        pm_every_wafers=None, chamber_drift_per_500_wafers=0.0,
    )
    setup_ids: set[str] = set()
    seen = 0
    setup: list[Event] = []
    stream: list[Event] = []
    for ev in simulate(config):
        if isinstance(ev, SensorReading):
            if seen < setup_wafers:
                setup_ids.add(ev.wafer)
            seen += 1
        (setup if ev.wafer in setup_ids else stream).append(ev)
    return setup, stream


def configure(args: argparse.Namespace) -> None:
    """Blocks ``default``: the windows, a quiet-fab drift policy, a small retrain budget; the set-up budget."""
    from fabloop.blocks import DEFAULT, DriftPolicyBlock, ModelCatalog, RetrainPolicyBlock
    from fabloop.core.policies import DriftPolicy, RetrainPolicy
    from fabloop.core.scopes import ModelSpec

    ModelCatalog(models=[ModelSpec(window_wafers=args.window_wafers, window_minutes=1e6)]).save(
        DEFAULT, overwrite=True)
    DriftPolicyBlock(policy=DriftPolicy(roc_auc_drop_tolerance=0.2, fail_rate_tolerance=0.1,
                                        cooldown_minutes=7 * 24 * 60)).save(DEFAULT, overwrite=True)
    small = RetrainPolicy(n_trials=2, timeout_s=30, n_folds=2, min_rows=100, min_class_count=8,
                          max_regression=0.1, min_roc_auc=0.5)
    RetrainPolicyBlock(policy=small).save(DEFAULT, overwrite=True)
    RetrainPolicyBlock(policy=small).save(SETUP_POLICY, overwrite=True)


def ingest_setup(conf: dict[str, str], database_url: str, window_wafers: int) -> list[int]:
    """The set-up stretch stored by the real Ingestor; its closed windows marked announced, not announced."""
    from fabloop.adapters.ingestor import ClosedWindow, Ingestor, IngestSettings
    from fabloop.adapters.store import make_engine
    from fabloop.blocks import KafkaConnection, load_block
    from fabloop.core.scopes import ModelCatalogValue, ModelSpec

    closed: list[ClosedWindow] = []
    group = load_block(KafkaConnection).consumer_group

    async def go() -> None:
        engine = make_engine(database_url, pooled=True)
        ingestor = Ingestor(
            conf, engine, ModelCatalogValue(models=[ModelSpec(window_wafers=window_wafers, window_minutes=1e6)]),
            group=group, settings=IngestSettings(batch_size=1000, consumer_name="scale-setup"),
            announce=closed.append,
        )
        try:
            await ingestor.run(threading.Event(), max_idle_s=5)
        finally:
            await engine.dispose()

    asyncio.run(go())
    return [w.id for w in closed]


def train_champion(tracking_uri: str, model: str) -> str:
    """A real first training in this process (no promotion), then ``champion`` on its version."""
    from mlflow import MlflowClient

    from fabloop.flows.retrain import retrain

    summary = retrain(model=model, reasons=["benchmarks/scale.py set-up champion"], policy_block=SETUP_POLICY,
                      promotion="off")
    if not isinstance(summary, dict) or "version" not in summary:
        raise RuntimeError(f"the set-up training of {model} registered no version: {summary}")
    version = str(summary["version"])
    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(
        model, "champion", version)
    return version


# --------------------------------------------------------------------------- the run


class Run:
    def __init__(self, home: Path, pg_datadir: Path, args: argparse.Namespace) -> None:
        from fabloop.infra.settings import StackEndpoints

        self.home = home
        self.args = args
        self.ep = StackEndpoints.load(home)
        self.db = self.ep.database_url
        self.kafka = {"bootstrap.servers": self.ep.kafka_bootstrap_servers}
        self.pg_datadir = pg_datadir
        self.pm = ProcessManager(home)
        self.members: list[subprocess.Popen[bytes]] = []
        self.result: dict[str, Any] = {}

    def kinds(self) -> dict[str, list[psutil.Process]]:
        """The stack's processes by kind (a flow run's: its launcher, a worker's child, and its
        engine, a child of the fork server)."""
        workers = [p for p in (self.pm.running("worker"), self.pm.running(SECOND_WORKER)) if p is not None]
        forkserver = self.pm.running("forkserver")
        engines = _tree(forkserver)[1:]
        flow_runs = [c for w in workers for c in _tree(w)[1:]] + engines
        members = []
        for m in self.members:
            if m.poll() is None:
                members.extend(_tree(psutil.Process(m.pid)))
        return {
            "ingest_member": members,
            "worker": workers,
            "fork_server": [forkserver] if forkserver is not None else [],
            "flow_run": flow_runs,
            "prefect_server": self.pm.tree("prefect"),
            "mlflow": self.pm.tree("mlflow"),
            "postgresql": _tree(_postmaster(self.pg_datadir)),
            "broker": self.pm.tree("kafka"),
        }

    def start_second_worker(self) -> None:
        from fabloop.infra.process import clean_env
        from fabloop.infra.stack import components

        worker = next(c for c in components(self.ep) if c.name == "worker")
        cmd = worker.command(self.ep)
        cmd[cmd.index("--name") + 1] = f"fabloop-{SECOND_WORKER}-{self.home.name}"
        rec = self.pm.start(SECOND_WORKER, cmd, clean_env(worker.env(self.ep)), cwd=REPO)
        say(f"second worker started (pid {rec.pid})")

    def start_members(self) -> None:
        from fabloop.infra.mlflow_auth import client_env
        from fabloop.infra.settings import prefect_env

        env = {**os.environ, **prefect_env(self.ep), **client_env(self.ep), "COLUMNS": "200"}
        for name in INGEST_MEMBERS:
            log = open(self.home / f"ingest-{name}.log", "wb")  # noqa: SIM115 - handed to the child
            self.members.append(subprocess.Popen(
                [sys.executable, "-m", "fabloop.cli", "ingest", "--name", name, "--batch-size", "500"],
                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        say(f"ingest members started (pids {[m.pid for m in self.members]})")

    def stop_members(self) -> list[int]:
        for m in self.members:
            if m.poll() is None:
                m.send_signal(signal.SIGINT)
        codes = []
        for m in self.members:
            try:
                codes.append(m.wait(60))
            except subprocess.TimeoutExpired:
                m.kill()
                codes.append(m.wait(10))
        return codes

    def stream(self, events: list[Event]) -> tuple[float, float]:
        """Publish ``events`` at a steady rate in half-second ticks; returns (start, end) monotonic times."""
        producer = make_producer(self.kafka)
        wafers = sum(isinstance(e, SensorReading) for e in events)
        per_s = len(events) / (wafers / self.args.wafers_per_s)
        start = time.monotonic()
        sent = 0
        tick = 0
        while sent < len(events):
            tick += 1
            due = min(len(events), int(per_s * 0.5 * tick))
            chunk = events[sent:due]
            if chunk:
                stats = publish_events(producer, chunk)
                if stats.failed or stats.published != len(chunk):
                    raise RuntimeError(f"published {stats.published} of {len(chunk)} events ({stats.failed} failed)")
                sent = due
            if tick % 20 == 0:
                say(f"streamed {sent}/{len(events)} events")
            time.sleep(max(0.0, start + 0.5 * tick - time.monotonic()))
        return start, time.monotonic()

    def go(self) -> None:
        from fabloop.infra.mlflow_auth import client_env
        from fabloop.infra.settings import prefect_env

        args = self.args
        os.environ.update({"FABLOOP_HOME": str(self.home), **prefect_env(self.ep), **client_env(self.ep)})
        setup, stream = fab(args)
        say(f"fab: {args.tools} tools x {args.sensors} sensors; set-up {len(setup)} events, stream {len(stream)}")
        configure(args)

        # Set-up: stored quietly, then one real champion per model.
        stats = publish_events(make_producer(self.kafka), setup)
        if stats.failed or stats.published != len(setup):
            raise RuntimeError(f"set-up: published {stats.published} of {len(setup)} events")
        setup_windows = ingest_setup(self.kafka, self.db, args.window_wafers)
        stored_setup = stored_count(self.db)
        say(f"set-up stored: {stored_setup} events, {len(setup_windows)} windows closed quietly")
        models = [f"yield-SCALE-{i:03d}" for i in range(1, args.tools + 1)]
        t = time.monotonic()
        for model in models:
            version = train_champion(self.ep.mlflow_tracking_uri, model)
            say(f"champion {model} v{version}")
        self.result["setup_champion_training_s"] = round(time.monotonic() - t, 1)
        trigger_floor = int(db_query(self.db, select(func.coalesce(func.max(RetrainTriggerRow.id), 0)))[0][0])
        # A window's id is given when it opens: the stream closes windows the set-up opened, so
        # "the stream's windows" are the closed ones minus those the set-up closed.
        setup_closed = set(setup_windows)

        # The scaled-out stack: a second worker and two ingest members in one group.
        self.start_second_worker()
        self.start_members()
        time.sleep(10)  # both members join the group before the stream starts
        sampler = RssSampler(self.kinds)
        sampler.start()
        load_before = os.getloadavg()
        try:
            start, published_at = self.stream(stream)
            say(f"stream published in {published_at - start:.1f}s; waiting for it to be stored")
            want = stored_setup + len(stream)
            wait("every streamed event stored", lambda: stored_count(self.db) >= want, 300, 0.5)
            stored_at = time.monotonic()
            stored = stored_count(self.db) - stored_setup
            codes = self.stop_members()
            say(f"stored {stored} events in {stored_at - start:.1f}s; ingest members stopped ({codes})")

            def windows() -> list[Any]:
                rows = db_query(self.db, select(WindowRow.id, WindowRow.model, WindowRow.closed_at).where(
                    WindowRow.status == "closed"))
                return [r for r in rows if r[0] not in setup_closed]

            def judged() -> dict[int, Any]:
                rows = db_query(self.db, select(DriftCheckRow.window_id, DriftCheckRow.status,
                                                DriftCheckRow.checked_at).where(DriftCheckRow.status != "claimed"))
                return {r[0]: r for r in rows if r[0] not in setup_closed}

            closed = windows()
            drain_start = time.monotonic()
            try:
                wait(f"{len(closed)} closed windows judged", lambda: {w[0] for w in closed} <= set(judged()),
                     args.drain_timeout, 3)
            except TimeoutError as exc:
                say(str(exc))
            drain_s = time.monotonic() - drain_start
        finally:
            sampler.stop_event.set()
            sampler.join(5)
        checks = judged()
        closed = windows()
        latencies = sorted((checks[w[0]][2] - w[2]).total_seconds() for w in closed if w[0] in checks)
        triggers = db_query(self.db, select(RetrainTriggerRow.action, RetrainTriggerRow.model).where(
            RetrainTriggerRow.id > trigger_floor))

        verdicts = [checks[w[0]][2] for w in closed if w[0] in checks]
        span_min = (max(verdicts) - min(w[2] for w in closed)).total_seconds() / 60 if verdicts else 0.0
        runs = drift_check_runs()
        run_s = sorted(r[1] for r in runs)
        wait_s = sorted(r[0] for r in runs)

        self.result.update({
            "events_stored": stored,
            "events_published": len(stream),
            "stream_publish_s": round(published_at - start, 1),
            "streaming_s": round(stored_at - start, 1),
            "events_per_s": round(stored / (stored_at - start), 1),
            "wafers_per_s_offered": args.wafers_per_s,
            "windows_closed": len(closed),
            "windows_judged": sum(1 for w in closed if w[0] in checks),
            "window_to_verdict_p50_s": pct(latencies, 50),
            "window_to_verdict_p95_s": pct(latencies, 95),
            "window_to_verdict_max_s": round(latencies[-1], 1) if latencies else None,
            # Verdicts per minute from the first window closed to the last verdict: the check
            # path's throughput when windows queue up (else just the rate they closed at).
            "verdicts_per_min": round(len(verdicts) / span_min, 2) if span_min > 0 else None,
            "drain_after_stream_s": round(drain_s, 1),
            # Each drift-check flow run, from Prefect: created -> started (trigger, queue, concurrency
            # slot, worker poll) and started -> ended (process start, imports, the check itself).
            "drift_check_runs": len(runs),
            "drift_check_wait_p50_s": pct(wait_s, 50),
            "drift_check_wait_p95_s": pct(wait_s, 95),
            "drift_check_run_p50_s": pct(run_s, 50),
            "drift_check_run_p95_s": pct(run_s, 95),
            "check_statuses": dict(Counter(r[1] for r in checks.values())),
            "windows_closed_by_model": dict(sorted(Counter(w[1] for w in closed).items())),
            "retrain_triggers": dict(Counter(r[0] for r in triggers)),
            "peak_rss_mb": {k: round(v / MB, 1) for k, v in sampler.peak.items()},
            "peak_total_rss_mb": {k: round(v / MB, 1) for k, v in sampler.peak_total.items()},
            "peak_process_count": dict(sampler.peak_count),
            "rss_samples": sampler.samples,
            "load_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        })


def _concurrency(deployment: str) -> int | None:
    """The deployment's concurrency limit as prefect.yaml sets it (what this run used)."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return next((d.get("concurrency_limit") for d in spec["deployments"] if d["name"] == deployment), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="minutes of streaming")
    ap.add_argument("--tools", type=int, default=12)
    ap.add_argument("--sensors", type=int, default=30)
    ap.add_argument("--wafers-per-s", type=float, default=25.0, help="fab-wide wafers published per second")
    ap.add_argument("--window-wafers", type=int, default=250)
    ap.add_argument("--setup-wafers", type=int, default=300, help="set-up wafers per tool (champion training sets)")
    ap.add_argument("--drain-timeout", type=float, default=900.0, help="seconds to wait for the last verdicts")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--keep-home", action="store_true", help="leave the temporary FABLOOP_HOME for inspection")
    ap.add_argument("--machine-note", default="", help="what else ran on the host, for the JSON line")
    args = ap.parse_args()
    if args.tools < 1 or args.minutes <= 0:
        ap.error("--tools and --minutes must be positive")

    from fabloop.infra.postgres import PostgresCluster

    home = Path(tempfile.mkdtemp(prefix="fabloop-bench-scale-"))
    result: dict[str, Any] = {}
    error = ""
    pg: PostgresCluster | None = None
    run: Run | None = None
    try:
        pg = PostgresCluster.start(free_port())
        say(f"PostgreSQL on port {pg.port}; fabloop up (FABLOOP_HOME={home})")
        cli(home, "up", "--prefect-port", str(free_port()), "--mlflow-port", str(free_port()),
            "--kafka-port", str(free_port()), "--partitions", str(PARTITIONS), "--database-url", pg.url,
            timeout=400)
        cli(home, "deploy", timeout=300)
        say("stack up, deployments registered")
        from fabloop.infra.bootstrap import prefect_api

        run = Run(home, pg.datadir, args)
        with prefect_api(run.ep):
            run.go()
    except Exception:  # noqa: BLE001 - the failure is reported with what was measured
        error = traceback.format_exc()
        say(f"failed:\n{error}")
    finally:
        if run is not None:
            result.update(run.result)
            run.stop_members()
            run.pm.stop(SECOND_WORKER)
        try:
            cli(home, "down", timeout=180)
        except Exception as exc:  # noqa: BLE001 - reported, the cluster still goes
            say(f"fabloop down failed: {exc}")
        if pg is not None:
            pg.stop()
        if not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)
    result.update({
        "bench": "scale",
        "config": {"tools": args.tools, "sensors": args.sensors, "minutes": args.minutes,
                   "wafers_per_s": args.wafers_per_s, "window_wafers": args.window_wafers,
                   "setup_wafers_per_tool": args.setup_wafers, "partitions": PARTITIONS,
                   "ingest_members": len(INGEST_MEMBERS), "workers": 2,
                   "drift_check_concurrency": _concurrency("drift-check"),
                   "event_store": "postgresql (throwaway cluster, fsync=off)"},
        "machine": {"cpus": os.cpu_count(), "note": args.machine_note},
        "error": error.strip().splitlines()[-1] if error else None,
        "seconds": round(time.monotonic() - T0, 1),
    })
    print(json.dumps(result, default=str))
    ok = not error and result.get("windows_closed") == result.get("windows_judged")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
