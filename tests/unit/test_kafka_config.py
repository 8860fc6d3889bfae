"""The Kafka block's librdkafka settings, their validation, and the refusal handler.

librdkafka itself checks every configuration here (clients are built, no broker is
contacted): a property it does not know, or a CA file it cannot load, fails the test.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr, ValidationError

from fabloop.adapters.kafka import KafkaRefused, read_properties, refusal_handler, with_error_cb
from fabloop.blocks import KafkaConnection

NOWHERE = "127.0.0.1:1"  # clients are built, never connected


def pem_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its (encrypted) key, as a CA and as a client identity."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fabloop-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "ca.pem", tmp_path / "client.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"key-pw")))
    return cert_path, key_path


def built_by_librdkafka(block: KafkaConnection) -> None:
    """Every client kind accepts the block's settings (without the error_cb, which would
    report the unreachable broker: that is the integration tests' part)."""
    Producer(librdkafka_props(block.producer_config()))
    Consumer({**librdkafka_props(block.client_config()), "group.id": "g"}).close()
    AdminClient(librdkafka_props(block.client_config()))


def librdkafka_props(conf: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in conf.items() if k != "error_cb"}


def test_scram_over_tls_with_mtls_and_extra_properties(tmp_path: Path) -> None:
    ca, key = pem_pair(tmp_path)
    block = KafkaConnection(
        bootstrap_servers=NOWHERE, security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
        sasl_username="fab-ingest", sasl_password=SecretStr("pw"), ssl_ca_location=str(ca),
        ssl_certificate_location=str(ca), ssl_key_location=str(key), ssl_key_password=SecretStr("key-pw"),
        extra={"client.rack": "fab7-b", "socket.keepalive.enable": "true"},
    )
    assert librdkafka_props(block.client_config()) == {
        "bootstrap.servers": NOWHERE, "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "fab-ingest", "sasl.password": "pw", "ssl.ca.location": str(ca),
        "ssl.certificate.location": str(ca), "ssl.key.location": str(key), "ssl.key.password": "key-pw",
        "client.rack": "fab7-b", "socket.keepalive.enable": "true",
    }
    assert callable(block.client_config()["error_cb"])
    built_by_librdkafka(block)
    # Secrets stay secrets when the block is shown or serialised.
    assert "pw" not in repr(block) and "key-pw" not in block.model_dump_json()


def test_oauthbearer_is_librdkafkas_oidc_client_credentials() -> None:
    block = KafkaConnection(
        bootstrap_servers=NOWHERE, security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER",
        sasl_oauthbearer_token_endpoint_url="http://127.0.0.1:1/oauth2/token",
        sasl_oauthbearer_client_id="fabloop", sasl_oauthbearer_client_secret=SecretStr("cs"),
        sasl_oauthbearer_scope="kafka.fab",
    )
    conf = librdkafka_props(block.client_config())
    assert conf["sasl.oauthbearer.method"] == "oidc"
    assert (conf["sasl.oauthbearer.token.endpoint.url"], conf["sasl.oauthbearer.client.id"],
            conf["sasl.oauthbearer.client.secret"], conf["sasl.oauthbearer.scope"]) == (
        "http://127.0.0.1:1/oauth2/token", "fabloop", "cs", "kafka.fab")
    assert "sasl.username" not in conf and "sasl.password" not in conf
    built_by_librdkafka(block)


def test_producer_guarantees_and_replication_defaults() -> None:
    prod = KafkaConnection()
    assert (prod.producer_config()["enable.idempotence"], prod.producer_config()["acks"]) == (True, "all")
    assert prod.topic_replication() == 3
    assert "enable.idempotence" not in prod.client_config()  # consumers and admin clients do not take it
    embedded = KafkaConnection(replication_factor=1, enable_idempotence=False)
    assert embedded.producer_config()["enable.idempotence"] is False and embedded.topic_replication() == 1
    assert KafkaConnection(replication_factor=None).topic_replication() == -1  # the broker's default
    built_by_librdkafka(KafkaConnection(bootstrap_servers=NOWHERE, security_protocol="SASL_PLAINTEXT",
                                        sasl_mechanism="PLAIN", sasl_username="u", sasl_password=SecretStr("p")))


@pytest.mark.parametrize(("fields", "message"), [
    ({"security_protocol": "SASL_SSL"}, "sasl_mechanism is required with security_protocol SASL_SSL"),
    ({"sasl_mechanism": "SCRAM-SHA-256"}, "sasl_mechanism SCRAM-SHA-256 needs security_protocol SASL_"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "u"},
     "sasl_password is required with sasl_mechanism SCRAM-SHA-256"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER", "sasl_oauthbearer_client_id": "c"},
     "sasl_oauthbearer_token_endpoint_url is required with sasl_mechanism OAUTHBEARER"),
    ({"ssl_ca_location": "/etc/fab/ca.pem"}, "ssl_ca_location is set but security_protocol PLAINTEXT uses no TLS"),
    ({"security_protocol": "SSL", "ssl_key_location": "/k.pem"}, "ssl_certificate_location and ssl_key_location"),
    ({"extra": {"sasl.password": "x"}}, "extra['sasl.password'] looks like a secret"),
    ({"replication_factor": 0}, "greater than or equal to 1"),
])
def test_inconsistent_settings_are_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        KafkaConnection(**fields)
    assert message in str(exc.value)


def test_refusal_handler_names_what_to_check() -> None:
    scram = {"bootstrap.servers": "k:9093", "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-256",
             "ssl.ca.location": "/ca.pem"}
    as_fields = refusal_handler(scram, "Kafka block 'default'", setting_name=lambda p: p.replace(".", "_"))
    cases = [
        (KafkaError(KafkaError._AUTHENTICATION, "SASL SCRAM authentication failed: invalid credentials"),
         "check sasl_username / sasl_password"),
        (KafkaError(KafkaError._AUTHENTICATION, "SASL SCRAM-SHA-256 mechanism handshake failed: Unsupported SASL "
                    "mechanism"), "check sasl_mechanism / security_protocol"),
        (KafkaError(KafkaError._SSL, "SSL handshake failed: certificate verify failed"), "check ssl_ca_location"),
    ]
    for err, hint in cases:
        with pytest.raises(KafkaRefused) as exc:
            as_fields(err)
        assert str(exc.value).startswith("Kafka block 'default': Kafka at k:9093 refused the connection (")
        assert str(exc.value).endswith(hint)
    as_fields(KafkaError(KafkaError._TRANSPORT, "Connection refused"))  # an outage: waited out, no raise
    as_fields(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    with pytest.raises(KafkaRefused, match="fatal Kafka client error"):
        as_fields(KafkaError(KafkaError._FENCED, "producer fenced", fatal=True))
    # Without a block: librdkafka's property names.
    with pytest.raises(KafkaRefused, match=r"check sasl\.username / sasl\.password$"):
        refusal_handler({**scram, "ssl.ca.location": None})(
            KafkaError(KafkaError.SASL_AUTHENTICATION_FAILED, "Authentication failed"))


def test_every_client_gets_an_error_cb_and_a_blocks_own_wins() -> None:
    plain = with_error_cb({"bootstrap.servers": NOWHERE})
    assert callable(plain["error_cb"])
    block = KafkaConnection(bootstrap_servers=NOWHERE).client_config()
    assert with_error_cb(block)["error_cb"] is block["error_cb"]


def test_properties_file(tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_text("# fab 7\n\nbootstrap.servers = k1:9093,k2:9093\n! old comment\n"
                    "sasl.jaas.config=x=y\nsecurity.protocol=SASL_SSL\n")
    assert read_properties(path) == {"bootstrap.servers": "k1:9093,k2:9093", "sasl.jaas.config": "x=y",
                                     "security.protocol": "SASL_SSL"}
    path.write_text("bootstrap.servers=k:1\nsecurity.protocol SASL_SSL\n")
    with pytest.raises(ValueError, match=r"client.properties:2: expected key=value"):
        read_properties(path)
