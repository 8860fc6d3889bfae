"""Kafka plumbing: topics, a publisher for events, and reading a topic back.

Plain functions over librdkafka config dicts (see ``KafkaConnection.client_config``)
so they serve the CLI, flows, tests and benchmarks alike. Every client they make has
an ``error_cb`` (the block's, else :func:`refusal_handler`): a refused login or TLS
handshake raises :class:`KafkaRefused` within seconds instead of idling.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from fabloop.core.schemas import SENSOR_TOPIC, TEST_TOPIC, SensorReading, TestResult
from fabloop.core.scopes import ScopeField

MAX_MESSAGE_BYTES = 1_000_000


def topic_for(event: SensorReading | TestResult) -> str:
    return SENSOR_TOPIC if isinstance(event, SensorReading) else TEST_TOPIC


CLIENT_LOG = logging.getLogger("fabloop.kafka")
"""librdkafka's own log lines go through Python logging instead of raw stderr."""

_QUIET = logging.getLogger("fabloop.kafka.probe")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


class KafkaRefused(RuntimeError):
    """The cluster refused this client's credentials or TLS: a setting to fix, not an outage to wait out.

    librdkafka reports a refused authentication as a non-fatal error and retries it
    forever, so without this a client with a wrong password idles silently.
    """


# What librdkafka's error callback reports when the cluster will not have this client
# as configured (wrong credentials, mechanism or certificate), as opposed to a broker
# that is away, which the client waits out by itself.
REFUSALS = frozenset({
    KafkaError._AUTHENTICATION, KafkaError._SSL, KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.UNSUPPORTED_SASL_MECHANISM, KafkaError.ILLEGAL_SASL_STATE,
})
_SASL_CREDENTIALS = ("sasl.username", "sasl.password")
_OIDC = ("sasl.oauthbearer.token.endpoint.url", "sasl.oauthbearer.client.id", "sasl.oauthbearer.client.secret",
         "sasl.oauthbearer.scope")
_TLS = ("ssl.ca.location", "ssl.certificate.location", "ssl.key.location")


def suspect_settings(err: KafkaError, conf: dict[str, Any]) -> list[str]:
    """The client settings a refusal points at, most likely first."""
    text = err.str()
    mechanism = conf.get("sasl.mechanism")
    if err.code() == KafkaError._SSL or "SSL handshake" in text or "certificate" in text:
        return [k for k in _TLS if k in conf] or ["security.protocol", "ssl.ca.location"]
    if "mechanism" in text and ("handshake" in text or "nsupported" in text):
        return ["sasl.mechanism", "security.protocol"]
    if mechanism == "OAUTHBEARER":
        return [k for k in _OIDC if k in conf]
    if not str(conf.get("security.protocol", "PLAINTEXT")).startswith("SASL_"):
        return ["security.protocol"]
    return list(_SASL_CREDENTIALS)


def refusal_handler(
    conf: dict[str, Any], source: str | None = None, setting_name: Callable[[str], str] = str,
) -> Callable[[KafkaError], None]:
    """An ``error_cb`` that raises :class:`KafkaRefused` on a refusal or a fatal error.

    Raised inside the callback, the exception comes out of the client call that
    served it (``consume``, ``poll``, ``flush``), within a second of the refusal.
    ``source`` names the configuration (a block); ``setting_name`` maps a librdkafka
    property to the name the user edits.
    """
    where = source or "Kafka client"
    bootstrap = conf.get("bootstrap.servers", "?")

    def on_error(err: KafkaError) -> None:
        if sys.is_finalizing():
            return  # a client destroyed at exit: nobody is left to catch it
        if err.code() in REFUSALS:
            check = " / ".join(setting_name(k) for k in suspect_settings(err, conf))
            raise KafkaRefused(f"{where}: Kafka at {bootstrap} refused the connection ({err.str()}); "
                               f"check {check}")
        if err.fatal():
            raise KafkaRefused(f"{where}: fatal Kafka client error at {bootstrap}: {err.str()}")
        CLIENT_LOG.debug("kafka client: %s (it recovers by itself)", err.str())

    return on_error


def with_error_cb(conf: dict[str, Any]) -> dict[str, Any]:
    """``conf`` with an ``error_cb`` (a block's own, naming the block, if it has one)."""
    return conf if "error_cb" in conf else {**conf, "error_cb": refusal_handler(conf)}


def cluster_metadata(conf: dict[str, Any], timeout: float = 10.0, topic: str | None = None,
                     logger: logging.Logger | None = None) -> ClusterMetadata:
    """The cluster's metadata, or :class:`KafkaRefused` as soon as the cluster refuses us.

    ``list_topics`` alone serves no callbacks, so a refused login would look like an
    unreachable broker for the whole timeout: ask in short slices and poll between them.
    """
    admin_conf: dict[str, Any] = {**with_error_cb(conf), "logger": logger or CLIENT_LOG}
    admin = AdminClient(admin_conf)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                return admin.list_topics(topic=topic, timeout=max(min(left, 0.5), 0.05))
            except KafkaException:
                admin.poll(0)  # serves error_cb: a refusal raises KafkaRefused here
                if left <= 0.5:
                    raise
    finally:
        # Gone now, not with the traceback that holds this frame: a client whose callbacks
        # run while the interpreter shuts down can crash it.
        del admin


def ensure_topics(
    conf: dict[str, Any], partitions: int, topics: Iterable[str], timeout: float = 30.0,
    replication_factor: int = -1,
) -> list[str]:
    """Create the topics that do not exist yet; returns those created. Harmless to repeat.

    ``replication_factor`` -1 is the broker's ``default.replication.factor``.
    """
    existing = set(cluster_metadata(conf, timeout).topics)
    wanted = [NewTopic(t, num_partitions=partitions, replication_factor=replication_factor)
              for t in topics if t not in existing]
    created: list[str] = []
    if wanted:
        admin_conf: dict[str, Any] = {**with_error_cb(conf), "logger": CLIENT_LOG}
        admin = AdminClient(admin_conf)
        for topic, fut in admin.create_topics(wanted, operation_timeout=timeout).items():
            try:
                fut.result(timeout=timeout)
                created.append(topic)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    return created


def topic_partitions(conf: dict[str, Any], topic: str, timeout: float = 10.0) -> int:
    return len(cluster_metadata(conf, timeout, topic=topic).topics[topic].partitions)


def broker_healthy(conf: dict[str, Any], timeout: float = 2.0) -> bool:
    """Whether the cluster answers; a refused login raises :class:`KafkaRefused` instead of
    reading as "not yet up", so a start waiting for the broker fails at once with the reason."""
    try:
        cluster_metadata(conf, timeout, logger=_QUIET)
        return True
    except KafkaException:
        return False


def read_properties(path: Path) -> dict[str, str]:
    """A librdkafka / Java client properties file (``key=value`` lines, ``#`` comments), as
    ``kcat -F`` and Kafka's own tools read it."""
    conf: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{path}:{number}: expected key=value, got {line[:60]!r}")
        conf[key.strip()] = value.strip()
    return conf


def make_producer(conf: dict[str, Any], **overrides: Any) -> Producer:
    """A producer; idempotence only when ``conf`` asks for it (``KafkaConnection.producer_config``):
    the embedded broker forgets producer state on restart, and an idempotent producer then stalls."""
    return Producer(
        {
            "logger": CLIENT_LOG,
            "enable.idempotence": False,
            **with_error_cb(conf),
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
    remaining = flush(producer, 60)
    if remaining:
        stats.failed += remaining
    return stats


def flush(producer: Producer, timeout: float) -> int:
    """``producer.flush`` in half-second slices; returns the messages left undelivered.

    A callback's exception (a refusal from ``error_cb``) comes out when a flush call
    returns, and one long flush keeps going long after the refusal.
    """
    deadline = time.monotonic() + timeout
    remaining = producer.flush(min(timeout, 0.5))
    while remaining and time.monotonic() < deadline:
        remaining = producer.flush(min(deadline - time.monotonic(), 0.5))
    return remaining


def read_topic(
    conf: dict[str, Any],
    topic: str,
    expected: int | None = None,
    idle_timeout: float = 5.0,
) -> Iterator[Message]:
    """Read every partition of a topic from the beginning (no consumer group involved)
    until ``expected`` messages or ``idle_timeout`` seconds of silence."""
    partitions = cluster_metadata(conf, 10, topic=topic).topics[topic].partitions
    consumer = Consumer({
        "logger": CLIENT_LOG, **with_error_cb(conf),
        "group.id": "fabloop-reader", "enable.auto.commit": False, "enable.partition.eof": False,
    })
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
