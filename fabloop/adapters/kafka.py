"""Kafka plumbing: topics, a publisher for events, and reading a topic back.

Plain functions over librdkafka config dicts (see ``KafkaConnection.client_config``)
so they serve the CLI, flows, tests and benchmarks alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from fabloop.core.schemas import SENSOR_TOPIC, TEST_TOPIC, SensorReading, TestResult
from fabloop.core.scopes import ScopeField

MAX_MESSAGE_BYTES = 1_000_000


def topic_for(event: SensorReading | TestResult) -> str:
    return SENSOR_TOPIC if isinstance(event, SensorReading) else TEST_TOPIC


def ensure_topics(conf: dict[str, Any], partitions: int, topics: Iterable[str], timeout: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; returns those created. Harmless to repeat."""
    admin = AdminClient(conf)
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics if t not in existing]
    created: list[str] = []
    if wanted:
        for topic, fut in admin.create_topics(wanted, operation_timeout=timeout).items():
            try:
                fut.result(timeout=timeout)
                created.append(topic)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    return created


def topic_partitions(conf: dict[str, Any], topic: str, timeout: float = 10.0) -> int:
    meta = AdminClient(conf).list_topics(topic=topic, timeout=timeout)
    return len(meta.topics[topic].partitions)


CLIENT_LOG = logging.getLogger("fabloop.kafka")
"""librdkafka's own log lines go through Python logging instead of raw stderr."""

_QUIET = logging.getLogger("fabloop.kafka.probe")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def broker_healthy(conf: dict[str, Any], timeout: float = 2.0) -> bool:
    probe: dict[str, Any] = {**conf, "logger": _QUIET}  # librdkafka takes a Python logger here
    try:
        AdminClient(probe).list_topics(timeout=timeout)
        return True
    except KafkaException:
        return False


def make_producer(conf: dict[str, Any], **overrides: Any) -> Producer:
    return Producer(
        {
            "logger": CLIENT_LOG,
            **conf,
            "enable.idempotence": False,
            "linger.ms": 20,
            "compression.type": "none",
            "message.max.bytes": MAX_MESSAGE_BYTES * 2,
            **overrides,
        }
    )


@dataclass
class PublishStats:
    published: int = 0
    failed: int = 0


# What a sensor reading is keyed by: a model scope is a tool or finer (tool, chamber,
# recipe on a tool) in the default catalog, so keying by the tool keeps every such
# scope's readings in one partition, in the order they were produced.
SCOPE_KEY_FIELDS: tuple[ScopeField, ...] = ("fab", "tool")


def partition_key(event: SensorReading | TestResult, scope_fields: Sequence[ScopeField] = SCOPE_KEY_FIELDS) -> bytes:
    """The Kafka key of an event: a sensor reading's scope, a test result's wafer.

    Windows are cut per scope in event time (``fabloop.adapters.store.WindowBook``). Kafka
    keeps order only within a partition, so readings keyed by wafer (spread over every
    partition) reached the store interleaved, and a reading older than its scope's last
    closed window can only be set aside as late. Keyed by their scope, a scope's readings
    arrive in the order the tool produced them and none is late. A test result joins its
    wafer by id whatever its partition: its key only spreads the load.
    """
    if isinstance(event, SensorReading):
        return "/".join(str(getattr(event, f)) for f in scope_fields).encode()
    return event.wafer.encode()


def publish_events(
    producer: Producer,
    events: Iterable[SensorReading | TestResult],
    on_event: Callable[[SensorReading | TestResult], None] | None = None,
    scope_fields: Sequence[ScopeField] = SCOPE_KEY_FIELDS,
) -> PublishStats:
    """Publish events keyed by :func:`partition_key` (a scope's readings stay in order), then flush.

    ``scope_fields``: the fields every model scope of the catalog includes (a catalog
    scoping models by recipe alone across tools would key by ``("fab",)``).
    Delivery failures are counted, never ignored: a caller that needs every event
    raises on ``failed > 0``.
    """
    stats = PublishStats()

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            stats.published += 1
        else:
            stats.failed += 1

    for event in events:
        while True:
            try:
                producer.produce(topic_for(event), event.to_json(), key=partition_key(event, scope_fields),
                                 on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        if on_event is not None:
            on_event(event)
    remaining = producer.flush(60)
    if remaining:
        stats.failed += remaining
    return stats


def read_topic(
    conf: dict[str, Any],
    topic: str,
    expected: int | None = None,
    idle_timeout: float = 5.0,
) -> Iterator[Message]:
    """Read every partition of a topic from the beginning (no consumer group involved)
    until ``expected`` messages or ``idle_timeout`` seconds of silence."""
    consumer = Consumer(
        {**conf, "group.id": "fabloop-reader", "enable.auto.commit": False, "enable.partition.eof": False}
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    seen = 0
    last = time.monotonic()
    try:
        while expected is None or seen < expected:
            msg = consumer.poll(0.5)
            if msg is None:
                if time.monotonic() - last > idle_timeout:
                    return
                continue
            if msg.error():
                raise KafkaException(msg.error())
            seen += 1
            last = time.monotonic()
            yield msg
    finally:
        consumer.close()
