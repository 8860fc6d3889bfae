"""The deadline of a human-approved promotion, enforced without a waiting process.

A waiting promotion is a *suspended* ``promote`` run: no process holds it, so
nothing inside it can notice its deadline pass (and the Prefect server ends no
expired suspension by itself). Each promotion therefore schedules one run of this
flow (the ``promotion-timeout`` deployment) at its deadline when it first
suspends; it occupies nothing until then. When it runs and the promotion still
waits, it resumes it with the system's answer, and the promotion, seeing its
deadline passed, records ``timed_out`` and ends.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from fabloop.adapters.prefect_api import end_expired


@flow(name="promotion-timeout", flow_run_name="promotion-timeout-{flow_run_id}")
def promotion_timeout(flow_run_id: str) -> str:
    """Wake the promotion ``flow_run_id`` if it is still waiting at its deadline; returns what was found."""
    found = end_expired(flow_run_id)
    get_run_logger().info(found)
    return found
