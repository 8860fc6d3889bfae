"""Benchmark: fabloop's at-least-once ingestor vs a bare confluent-kafka consumer.

Data: SECOM-width simulated events (``fabloop.core.simulate``, 590 sensors per reading; one
sensor reading and one wafer-sort result per wafer, so about half the messages are
~12.5 kB readings), published ONCE to a private Tansu broker this script starts on
a free loopback port (3 partitions per topic), then consumed twice, one after the
other, each time by a fresh consumer group reading from the earliest offset:

* baseline: a bare ``confluent_kafka.Consumer`` doing ``consume(batch_size)`` and
  ``json.loads`` of every value (same fetch sizes, prefetch queue and batch size as
  the ingestor), until all N messages are read;
* fabloop: ``fabloop.adapters.ingestor.Ingestor`` with the default ``ModelCatalogValue()`` and a
  fresh SQLite event store file, i.e. validation of every event, one transaction
  per batch (idempotent inserts, window bookkeeping, batch record) and the offset
  commit after it, until all N events are stored.

Each consumer runs in its own child process, so that its RSS is its own (the parent
holds the broker handle and publishing state). What is timed, identically for both:
from the moment the FIRST non-empty batch has been fully handled (for fabloop: its
``on_batch`` callback) to the moment the LAST batch has been fully handled; the rate
is the number of messages in batches 2..last divided by that time. This leaves out
the group join / partition assignment wait, the first fetch, and any idle tail
(the run stops as soon as N messages are done).

Memory: RSS is sampled with psutil in the child after every batch, together with the
count of live Python allocations (``sys.getallocatedblocks``, ``py_blocks_*``: a leak
of Python objects shows there whatever SQLite's page cache, librdkafka or glibc do
with RSS). ``rss_mb_by_decile`` is RSS at 10 %, 20 %, ... 100 % of the events and
``peak_rss_mb`` the child's high-water RSS (VmHWM). Note the consumption ORDER of a
backlog: fetches are sized in bytes per partition, so the ~0.5 kB test results are
read first and the 12.5 kB sensor readings after them (roughly the first half of the
run is all test results, the second all readings). Batches of 500 readings hold
several times the memory of batches of test results, so RSS steps up when the
readings start; "flat" is therefore judged from the point where 10 % of the READINGS
have been handled (``rss_mb_at_10pct_of_readings``) to the end: RSS may grow by at
most max(10 %, 16 MB). ``rss_mb_at_10pct`` (10 % of all events) is reported too.

CPU: ``cpu_us_per_event`` is the child's CPU time (all threads) over the same timed
section per message, and ``cpu_ratio`` baseline/fabloop: on a shared machine it
moves much less with other people's load than the rates do.

With ``--rounds R`` the pair is run R times, alternating, on the same messages; the
rates and ratios reported are medians over the rounds, memory figures come from
round 1 and ``memory_flat`` must hold in every round.

    python benchmarks/ingest.py [--events 100000] [--sensors 590] [--batch-size 500] [--rounds 1]

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Consumer, KafkaError, KafkaException

from fabloop.adapters.kafka import broker_healthy, ensure_topics, make_producer, publish_events
from fabloop.core.schemas import SENSOR_TOPIC, TEST_TOPIC, TOPICS
from fabloop.infra.process import ProcessManager, free_port, wait_until
from fabloop.infra.stack import broker_command

MB = 1024 * 1024
# Same fetch sizing and prefetch queue as the Ingestor (IngestSettings.max_message_bytes = 1 MB).
FETCH_CONF = {
    "fetch.message.max.bytes": 4_000_000,
    "receive.message.max.bytes": 100_000_000,
    "queued.max.messages.kbytes": 16_384,
    "fetch.queue.backoff.ms": 20,
}


def peak_rss_mb() -> float:
    """This process's high-water RSS (VmHWM). Not ru_maxrss: that survives exec, so a
    child would report its parent's peak from before the fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


class Progress:
    """Per-batch bookkeeping shared by both consumers: timing window and RSS samples."""

    def __init__(self, expected: int, readings: int) -> None:
        self.expected = expected
        self.readings_expected = readings
        self.readings = 0
        self.proc = psutil.Process()
        self.done = 0
        self.batches = 0
        self.t_first: float | None = None
        self.n_first = 0
        self.t_last = 0.0
        self.cpu_first = 0.0
        self.cpu_last = 0.0
        # (messages handled, sensor readings among them, rss bytes, live Python blocks)
        self.samples: list[tuple[int, int, int, int]] = []

    def batch(self, n: int, readings: int) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.done += n
        self.readings += readings
        self.batches += 1
        if self.t_first is None:
            self.t_first, self.n_first, self.cpu_first = now, self.done, cpu
        self.t_last, self.cpu_last = now, cpu
        self.samples.append((self.done, self.readings, self.proc.memory_info().rss, sys.getallocatedblocks()))

    def sample_at(self, fraction: float, of_readings: bool = False) -> tuple[int, int, int, int]:
        col, total = (1, self.readings_expected) if of_readings else (0, self.expected)
        target = math.ceil(total * fraction)
        return next((s for s in self.samples if s[col] >= target), self.samples[-1])

    def rss_at(self, fraction: float, of_readings: bool = False) -> float:
        return round(self.sample_at(fraction, of_readings)[2] / MB, 1)

    def result(self) -> dict[str, Any]:
        timed_s = self.t_last - (self.t_first or self.t_last)
        timed_n = self.done - self.n_first
        return {
            "handled": self.done,
            "batches": self.batches,
            "timed_messages": timed_n,
            "timed_s": round(timed_s, 3),
            "rate": round(timed_n / timed_s, 1) if timed_s > 0 else None,
            # CPU of the whole process (all threads, librdkafka's included) per message
            # in the timed section: less sensitive than the rate to what else runs.
            "cpu_us_per_event": round(1e6 * (self.cpu_last - self.cpu_first) / timed_n, 1) if timed_n else None,
            "rss_mb_by_decile": [self.rss_at(k / 10) for k in range(1, 11)],
            "rss_mb_at_10pct": self.rss_at(0.10),
            "rss_mb_at_50pct": self.rss_at(0.50),
            "rss_mb_at_10pct_of_readings": self.rss_at(0.10, of_readings=True),
            "rss_mb_at_end": self.rss_at(1.0),
            "peak_rss_mb": peak_rss_mb(),
            # Live Python allocations: a leak of Python objects shows here whatever
            # the C allocators (SQLite's page cache, librdkafka, glibc) do with RSS.
            "py_blocks_at_10pct": self.sample_at(0.1)[3],
            "py_blocks_at_10pct_of_readings": self.sample_at(0.1, of_readings=True)[3],
            "py_blocks_at_end": self.sample_at(1.0)[3],
        }


def run_baseline(bootstrap: str, expected: int, readings: int, batch_size: int) -> dict[str, Any]:
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"bench-baseline-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,  # as the ingestor: the embedded broker joins in ~half of it
        **FETCH_CONF,
    })
    consumer.subscribe([SENSOR_TOPIC, TEST_TOPIC])
    progress = Progress(expected, readings)
    t0 = time.perf_counter()
    deadline = time.monotonic() + 600
    try:
        while progress.done < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"baseline read only {progress.done} of {expected} messages in 600 s")
            msgs = consumer.consume(batch_size, 0.5)
            n = sensors = 0
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                        continue
                    raise KafkaException(err)
                json.loads(m.value())
                n += 1
                sensors += m.topic() == SENSOR_TOPIC
            if n:
                progress.batch(n, sensors)
    finally:
        consumer.close()
    return {**progress.result(), "wall_s": round(time.perf_counter() - t0, 3)}


def run_fabloop(bootstrap: str, expected: int, readings: int, batch_size: int, workdir: Path) -> dict[str, Any]:
    from sqlalchemy import func, select

    from fabloop.adapters.ingestor import BatchStats, Ingestor, IngestSettings
    from fabloop.adapters.store import IngestBatchRow, SensorReadingRow, TestResultRow, WindowRow, make_engine
    from fabloop.core.scopes import ModelCatalogValue

    engine = make_engine(f"sqlite+aiosqlite:///{workdir / 'events.db'}", pooled=True)
    progress = Progress(expected, readings)
    stop = threading.Event()

    class CountingIngestor(Ingestor):
        """Notes how many of each batch's messages are sensor readings (for the RSS samples)."""

        readings_in_batch = 0

        async def process_batch(self, msgs: list[Any]) -> BatchStats:
            self.readings_in_batch = sum(m.topic() == SENSOR_TOPIC for m in msgs)
            return await super().process_batch(msgs)

    def on_batch(stats: BatchStats) -> None:
        progress.batch(stats.consumed, ingestor.readings_in_batch)
        if progress.done >= expected:
            stop.set()

    ingestor = CountingIngestor(
        {"bootstrap.servers": bootstrap}, engine, ModelCatalogValue(),
        group=f"bench-fabloop-{uuid.uuid4().hex[:8]}",
        settings=IngestSettings(batch_size=batch_size), on_batch=on_batch,
    )

    async def main() -> tuple[BatchStats, dict[str, int]]:
        totals = await ingestor.run(stop, max_idle_s=60)
        async with engine.connect() as conn:
            counts = {
                "sensor_rows": (await conn.execute(select(func.count()).select_from(SensorReadingRow))).scalar_one(),
                "test_rows": (await conn.execute(select(func.count()).select_from(TestResultRow))).scalar_one(),
                "windows": (await conn.execute(select(func.count()).select_from(WindowRow))).scalar_one(),
                "windows_closed": (
                    await conn.execute(select(func.count()).select_from(WindowRow).where(WindowRow.status == "closed"))
                ).scalar_one(),
                "batch_rows": (await conn.execute(select(func.count()).select_from(IngestBatchRow))).scalar_one(),
            }
        await engine.dispose()
        return totals, counts

    t0 = time.perf_counter()
    totals, counts = asyncio.run(main())
    wall = time.perf_counter() - t0
    if totals.stored != expected or counts["sensor_rows"] + counts["test_rows"] != expected:
        raise RuntimeError(f"fabloop stored {totals.stored} events ({counts}); expected {expected}: {totals.line()}")
    return {
        **progress.result(), "wall_s": round(wall, 3), "stored": totals.stored,
        "dead_lettered": totals.dead_lettered, "duplicates": totals.duplicates, **counts,
        "db_mb": round((workdir / "events.db").stat().st_size / MB, 1),
    }


def child(
    role: str, bootstrap: str, expected: int, readings: int, batch_size: int, parent_tmp: Path
) -> dict[str, Any]:
    """Run one consumer in a fresh interpreter; its JSON result is its last stdout line."""
    cmd = [sys.executable, __file__, "--role", role, "--bootstrap", bootstrap, "--events", str(expected),
           "--readings", str(readings), "--batch-size", str(batch_size), "--workdir", str(parent_tmp)]
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{role} run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_1m_before"] = round(load_before, 2)
    out["load_1m_after"] = round(os.getloadavg()[0], 2)
    return out


def publish(conf: dict[str, str], n_events: int, n_sensors: int, seed: int) -> dict[str, Any]:
    from fabloop.core.simulate import SimulationConfig, simulate

    config = SimulationConfig(seed=seed, n_sensors=n_sensors, wafers=math.ceil(n_events / 2))
    kinds = {"sensor": 0, "test": 0}

    def count(event: Any) -> None:
        kinds[event.kind] += 1

    events = itertools.islice(simulate(config), n_events)
    t0 = time.perf_counter()
    stats = publish_events(make_producer(conf), events, on_event=count)
    elapsed = time.perf_counter() - t0
    if stats.published != n_events or stats.failed:
        raise RuntimeError(f"published {stats.published} of {n_events} events ({stats.failed} failed)")
    return {"publish_s": round(elapsed, 1), "sensor_events": kinds["sensor"], "test_events": kinds["test"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--sensors", type=int, default=590)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="baseline/fabloop pairs to run (medians reported)")
    ap.add_argument("--role", choices=["baseline", "fabloop"], help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--readings", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.role == "baseline":
        print(json.dumps(run_baseline(args.bootstrap, args.events, args.readings, args.batch_size)))
        return
    if args.role == "fabloop":
        with tempfile.TemporaryDirectory(prefix="fabloop-ingest-store-", dir=args.workdir) as store:
            print(json.dumps(run_fabloop(args.bootstrap, args.events, args.readings, args.batch_size, Path(store))))
        return

    with tempfile.TemporaryDirectory(prefix="fabloop-bench-ingest-") as tmp:
        tmp_path = Path(tmp)
        port = free_port()
        pm = ProcessManager(tmp_path / "broker")
        pm.start("kafka", broker_command("127.0.0.1", port), env=dict(os.environ))
        conf = {"bootstrap.servers": f"127.0.0.1:{port}"}
        rounds: list[tuple[dict[str, Any], dict[str, Any]]] = []
        try:
            wait_until(lambda: broker_healthy(conf), 30, what="broker")
            ensure_topics(conf, 3, TOPICS)
            print(f"publishing {args.events} events ({args.sensors} sensors) ...", file=sys.stderr)
            pub = publish(conf, args.events, args.sensors, args.seed)
            print(f"published in {pub['publish_s']} s", file=sys.stderr)
            who = (conf["bootstrap.servers"], args.events, pub["sensor_events"], args.batch_size)
            for r in range(args.rounds):
                # Alternate the two, so that a change in the machine's load hits both.
                base = child("baseline", *who, tmp_path)
                print(f"round {r + 1} baseline: {base}", file=sys.stderr)
                fab = child("fabloop", *who, tmp_path)
                print(f"round {r + 1} fabloop: {fab}", file=sys.stderr)
                rounds.append((base, fab))
        finally:
            pm.stop("kafka")

    def flat(fab: dict[str, Any]) -> bool:
        rss10, rss_end = fab["rss_mb_at_10pct_of_readings"], fab["rss_mb_at_end"]
        return rss_end - rss10 <= max(0.1 * rss10, 16.0)

    ratios = [f["rate"] / b["rate"] for b, f in rounds]
    base, fab = rounds[0]
    result = {
        "bench": "ingest",
        "events": args.events,
        "sensors": args.sensors,
        "rounds": args.rounds,
        "baseline_rate": round(statistics.median(b["rate"] for b, _ in rounds), 1),
        "fabloop_rate": round(statistics.median(f["rate"] for _, f in rounds), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_per_round": [round(x, 3) for x in ratios],
        "baseline_cpu_us_per_event": statistics.median(b["cpu_us_per_event"] for b, _ in rounds),
        "fabloop_cpu_us_per_event": statistics.median(f["cpu_us_per_event"] for _, f in rounds),
        "cpu_ratio": round(statistics.median(b["cpu_us_per_event"] / f["cpu_us_per_event"] for b, f in rounds), 3),
        "peak_rss_mb": max(f["peak_rss_mb"] for _, f in rounds),
        "rss_mb_at_10pct": fab["rss_mb_at_10pct"],
        "rss_mb_at_50pct": fab["rss_mb_at_50pct"],
        "rss_mb_at_end": fab["rss_mb_at_end"],
        "rss_mb_by_decile": fab["rss_mb_by_decile"],
        "rss_mb_at_10pct_of_readings": fab["rss_mb_at_10pct_of_readings"],
        "rss_growth_mb_10_to_100pct": round(fab["rss_mb_at_end"] - fab["rss_mb_at_10pct"], 1),
        "rss_growth_mb_10pct_of_readings_to_end": round(fab["rss_mb_at_end"] - fab["rss_mb_at_10pct_of_readings"], 1),
        "memory_flat": all(flat(f) for _, f in rounds),
        "py_blocks_at_10pct": fab["py_blocks_at_10pct"],
        "py_blocks_at_10pct_of_readings": fab["py_blocks_at_10pct_of_readings"],
        "py_blocks_at_end": fab["py_blocks_at_end"],
        "baseline_peak_rss_mb": max(b["peak_rss_mb"] for b, _ in rounds),
        "baseline_timed_s": base["timed_s"],
        "fabloop_timed_s": fab["timed_s"],
        "baseline_wall_s": base["wall_s"],
        "fabloop_wall_s": fab["wall_s"],
        "batch_size": args.batch_size,
        "windows_closed": fab["windows_closed"],
        "db_mb": fab["db_mb"],
        **pub,
        "load_1m": [x for b, f in rounds for x in (b["load_1m_before"], f["load_1m_before"])] + [fab["load_1m_after"]],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
