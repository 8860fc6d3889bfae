"""Which failures of MLflow, the database, Prefect or Kafka are worth trying again.

A transient failure is one where the component could not be reached or asked us to
come back later: a refused or dropped connection, a timeout, a 5xx, a locked SQLite
file. Retrying those is safe and usually enough. Everything else (a version that
does not exist, a refused training set, a bad parameter, a bug) would fail the same
way again, and must not be mistaken for an outage, nor an outage for an answer.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import requests
import sqlalchemy.exc
from confluent_kafka import KafkaError, KafkaException
from mlflow.exceptions import MlflowException, RestException
from prefect.exceptions import PrefectHTTPStatusError

__all__ = ["is_transient"]

# Status codes that say "not now" rather than "no".
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# MLflow error codes of a registry that is there but cannot answer now.
_MLFLOW_TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"})
_KAFKA_TRANSPORT = frozenset({
    KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT, KafkaError._MSG_TIMED_OUT,
    KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION,
})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and the ones it was raised from or while handling (MLflow wraps without ``from``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status_transient(status: int | None) -> bool:
    return status is not None and status in _RETRY_STATUS


def _one(exc: BaseException) -> bool | None:
    """True: transient; False: a definite answer (never retry); None: this link does not say."""
    if isinstance(exc, ConnectionError | TimeoutError):  # refused, reset, broken pipe, socket timeout
        return True
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return True
    if isinstance(exc, requests.exceptions.HTTPError):
        return _status_transient(exc.response.status_code if exc.response is not None else None)
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, PrefectHTTPStatusError | httpx.HTTPStatusError):
        return _status_transient(exc.response.status_code)
    if isinstance(exc, RestException):  # the tracking server answered: trust its status
        return exc.error_code in _MLFLOW_TRANSIENT_CODES or exc.get_http_status_code() >= 500
    if isinstance(exc, MlflowException):
        if exc.error_code in _MLFLOW_TRANSIENT_CODES:
            return True
        # rest_utils wraps a request that never got an answer as "API request to … failed with
        # exception …" (the cause is in __context__); any other MlflowException is an answer.
        return True if str(exc.message).startswith("API request to") else None
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError | sqlalchemy.exc.TimeoutError):
        # Connection lost or refused, SQLite "database is locked", pool exhausted.
        return True
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        err: KafkaError = exc.args[0]
        return bool(err.retriable()) or err.code() in _KAFKA_TRANSPORT
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says a component was unreachable or busy, not that the request was wrong."""
    for link in _chain(exc):
        verdict = _one(link)
        if verdict is not None:
            return verdict
    return False
