"""The ``fabloop`` command line: one Typer app, its commands in one module per group.

The command modules share :mod:`fabloop.cli._common` and nothing else; this module
only builds the app from them (``[project.scripts] fabloop = "fabloop.cli:main"``).
"""

from __future__ import annotations

import os

import typer

from fabloop.cli import approvals, backtest, data, stack, stream
from fabloop.cli._common import credential_refused, fail

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Event-driven retraining for fab models on Prefect.")

stack.register(app)  # up / run / deploy / status / down
stream.register(app)  # simulate / ingest
approvals.register(app)  # approvals / approve / reject / rollback / audit
data.register(app)  # replay / publish-stdf
backtest.register(app)  # backtest


def main() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        app()
    except Exception as exc:
        if (refused := credential_refused(exc)) is None:
            raise
        fail(refused)
        raise SystemExit(1) from None
