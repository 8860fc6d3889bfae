"""The main job, end to end, on its own embedded stack: the README's run command."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from fabloop.adapters.store import ApprovalRow, DriftCheckRow, make_engine
from fabloop.infra.process import free_port
from fabloop.infra.settings import StackEndpoints
from tests.helpers.stack import fabloop

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_main_job_with_approve_as_ends_with_a_drift_triggered_champion(tmp_path: Path) -> None:
    env = {"FABLOOP_HOME": str(tmp_path / "home")}
    fabloop("up", "--prefect-port", str(free_port()), "--mlflow-port", str(free_port()),
            "--kafka-port", str(free_port()), env=env, timeout=300)
    try:
        out = fabloop("run", "--approve-as", "alice", env=env, timeout=2400)
        ep = StackEndpoints.load(tmp_path / "home")
        result = json.loads((ep.home / "mainjob-result.json").read_text())
        assert "paused for approval" in out.stdout and result["paused_run_url"] in out.stdout.replace("\n", "")
        model, version = result["model"], result["version"]
        assert result["champion"] == version

        from mlflow import MlflowClient

        client = MlflowClient(ep.mlflow_tracking_uri)
        champion = client.get_model_version_by_alias(model, "champion")
        assert champion.version == version
        assert client.get_model_version_by_alias(model, "previous").version != version
        check_id = int(champion.tags["fabloop.drift_check_id"])  # lineage names the drift check

        async def rows() -> tuple[DriftCheckRow, list[ApprovalRow]]:
            engine = make_engine(ep.database_url)
            try:
                async with engine.connect() as conn:
                    check = (await conn.execute(select(DriftCheckRow).where(DriftCheckRow.id == check_id))).one()
                    approvals = (await conn.execute(select(ApprovalRow).where(ApprovalRow.model == model))).all()
                return check, approvals
            finally:
                await engine.dispose()

        check, approvals = asyncio.run(rows())
        assert check.model == model and (check.drifted or check.performance_breach)
        assert check.report_url, "a breaching check keeps its Evidently report"
        decisions = {(a.version, a.decision, a.approver) for a in approvals}
        assert (version, "approved", "alice") in decisions
        assert ("1", "approved", "fabloop-bootstrap") in decisions  # the explicit bootstrap
    finally:
        fabloop("down", env=env, check=False)
