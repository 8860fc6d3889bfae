"""Simulated events through the real broker and back."""

from __future__ import annotations

import pytest

from fabloop.adapters.kafka import make_producer, partition_key, publish_events, read_topic
from fabloop.core.schemas import SENSOR_TOPIC, TEST_TOPIC, SensorReading, TestResult, parse_event
from fabloop.core.simulate import SimulationConfig, simulate
from tests.helpers.stack import Broker

pytestmark = pytest.mark.integration


def test_10000_simulated_events_round_trip(broker: Broker) -> None:
    config = SimulationConfig(seed=11, wafers=5000, n_sensors=40)
    sent = {e.event_id: e for e in simulate(config)}
    assert len(sent) == 10_000
    stats = publish_events(make_producer(broker.conf), sent.values())
    assert (stats.published, stats.failed) == (10_000, 0)

    received: dict[str, SensorReading | TestResult] = {}
    for topic, kind in ((SENSOR_TOPIC, SensorReading), (TEST_TOPIC, TestResult)):
        for msg in read_topic(broker.conf, topic, expected=5000, idle_timeout=20):
            event = parse_event(msg.value())  # raises if anything on the wire is invalid
            assert isinstance(event, kind)
            assert msg.key() == partition_key(event)  # a reading by its scope (fab/tool), a result by its wafer
            received[event.event_id] = event
    assert received.keys() == sent.keys()
    assert all(received[k] == sent[k] for k in sent)  # byte-for-byte the same events
