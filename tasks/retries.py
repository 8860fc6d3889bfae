"""The retry settings of every task that talks to MLflow, the database, Prefect or Kafka.

Defined once, spread into each such ``@task(...)`` as ``**TRANSIENT``: a component
that was unreachable or busy gets a few more attempts with exponential backoff
(with jitter, so checks that failed together do not come back together); a failure
that is an answer (a missing version, a refused training set, a bug) fails at once.
When every attempt fails, the task and its flow run fail with the last error: an
outage is reported, never read as a verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import exponential_backoff

from fabloop.adapters.transient import is_transient

__all__ = ["RETRIES", "TRANSIENT", "RetryOptions", "retry_if_transient"]

# 5 retries after 2, 4, 8, 16, 32 s (±50 %), on top of the clients' own reconnect
# attempts: an MLflow or database restart of about two minutes (a busy host) is ridden out.
RETRIES = 5
_BACKOFF_FACTOR = 2


def retry_if_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's ``retry_condition_fn``: retry only if the failure says "unreachable" or "busy"."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the failed state's exception is what is being classified
        return is_transient(exc)
    return False


class RetryOptions(TypedDict):
    retries: int
    retry_delay_seconds: list[float]
    retry_jitter_factor: float
    retry_condition_fn: Callable[[Task[..., Any], TaskRun, State[Any]], bool]


TRANSIENT: RetryOptions = {
    "retries": RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=_BACKOFF_FACTOR)(RETRIES),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
}
