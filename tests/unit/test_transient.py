"""Which failures are retried: an unreachable or busy component, never an answer."""

from __future__ import annotations

import httpx
import pytest
import requests
import sqlalchemy.exc
from confluent_kafka import KafkaError, KafkaException
from mlflow.exceptions import MlflowException, RestException
from prefect.states import Completed, Failed

from fabloop.adapters.registry import RegistryError
from fabloop.adapters.transient import is_transient
from fabloop.core.training import DataGateError
from fabloop.tasks.retries import TRANSIENT, retry_if_transient


def _mlflow_unreachable() -> MlflowException:
    """What MLflow's REST client raises when the server refuses the connection (the cause rides in __context__)."""
    try:
        try:
            raise requests.exceptions.ConnectionError("Max retries exceeded: Connection refused")
        except Exception as e:  # noqa: BLE001 - exactly as mlflow.utils.rest_utils.http_request wraps it
            raise MlflowException(f"API request to http://127.0.0.1:5000/x failed with exception {e}")  # noqa: B904
    except MlflowException as exc:
        return exc


@pytest.mark.parametrize("exc", [
    _mlflow_unreachable(),
    RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}),
    RestException({"error_code": "INTERNAL_ERROR", "message": "database is locked"}),
    ConnectionRefusedError(111, "Connection refused"),
    TimeoutError("timed out"),
    httpx.ConnectError("refused"),
    httpx.HTTPStatusError("503", request=httpx.Request("GET", "http://x"),
                          response=httpx.Response(503, request=httpx.Request("GET", "http://x"))),
    sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("database is locked")),
    sqlalchemy.exc.InterfaceError("SELECT 1", {}, Exception("connection is closed")),
    KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down")),
], ids=["mlflow-refused", "mlflow-503", "mlflow-500", "refused", "timeout", "httpx-refused", "http-503",
        "sqlite-locked", "pg-closed", "kafka-transport"])
def test_an_unreachable_or_busy_component_is_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such model"}),
    RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad alias"}),
    MlflowException("model flavour mismatch"),
    RegistryError("model 'm' has no version '3'"),
    DataGateError("too few rows: 120 < min_rows=200"),
    ValueError("bad data"),
    KeyError("sensor"),
    httpx.HTTPStatusError("404", request=httpx.Request("GET", "http://x"),
                          response=httpx.Response(404, request=httpx.Request("GET", "http://x"))),
    sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed")),
    KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "denied")),
], ids=["not-found", "bad-parameter", "mlflow-other", "registry", "data-gate", "value", "key", "http-404",
        "integrity", "kafka-auth"])
def test_an_answer_is_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_the_retry_condition_reads_the_failed_states_exception() -> None:
    assert retry_if_transient(None, None, Failed(data=ConnectionRefusedError("refused")))  # type: ignore[arg-type]
    assert not retry_if_transient(None, None, Failed(data=RegistryError("gone")))  # type: ignore[arg-type]
    assert not retry_if_transient(None, None, Completed(data=1))  # type: ignore[arg-type]


def test_backoff_grows_and_is_shared() -> None:
    delays = TRANSIENT["retry_delay_seconds"]
    assert len(delays) == TRANSIENT["retries"] and delays == sorted(delays) and delays[0] < delays[-1]
