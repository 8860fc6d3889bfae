"""Decisions that move ``champion``: the order of the alias moves, and the audit that checks them.

The registry here is an in-memory stand-in that records every alias state and can
fail at any write, as an interrupted run would: pure logic, no MLflow.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from fabloop.adapters import registry
from fabloop.core.approval import (
    COMPLETED,
    INTENDED,
    ApprovalRecord,
    Decision,
    alias_history,
    verify_aliases,
)


class Interrupted(Exception):
    """The run died at this registry write."""


class FakeRegistry:
    """Aliases of one model; ``die_at`` makes the n-th write (1-based) fail before it applies."""

    def __init__(self, aliases: dict[str, str], tags: dict[str, dict[str, str]] | None = None,
                 die_at: int | None = None) -> None:
        self.aliases = dict(aliases)
        self.tags = tags or {}
        self.die_at = die_at
        self.writes = 0
        self.states: list[dict[str, str]] = [dict(aliases)]

    def _write(self) -> None:
        self.writes += 1
        if self.die_at is not None and self.writes == self.die_at:
            raise Interrupted(f"write {self.writes}")

    def get_model_version(self, model: str, version: str) -> Any:
        return SimpleNamespace(name=model, version=version, run_id=None, tags=self.tags.get(version, {}),
                               aliases=[a for a, v in self.aliases.items() if v == version])

    def get_registered_model(self, model: str) -> Any:
        return SimpleNamespace(name=model, aliases=dict(self.aliases))

    def set_registered_model_alias(self, model: str, alias: str, version: str) -> None:
        self._write()
        self.aliases[alias] = str(version)
        self.states.append(dict(self.aliases))

    def delete_registered_model_alias(self, model: str, alias: str) -> None:
        self._write()
        del self.aliases[alias]
        self.states.append(dict(self.aliases))


def _never_champion_is_previous(fake: FakeRegistry) -> None:
    for state in fake.states:
        assert state.get("champion") is None or state.get("champion") != state.get("previous"), fake.states


PROMOTIONS = [
    # (aliases before, version approved, aliases after)
    ({"champion": "1", "challenger": "2"}, "2", {"champion": "2", "previous": "1"}),
    ({"challenger": "1"}, "1", {"champion": "1"}),
    ({"champion": "2", "previous": "1", "challenger": "3"}, "3", {"champion": "3", "previous": "2"}),
    # Approving the version that ``previous`` names (e.g. again after a rollback).
    ({"champion": "3", "previous": "2"}, "2", {"champion": "2", "previous": "3"}),
    # A newer challenger keeps its alias.
    ({"champion": "1", "challenger": "3"}, "2", {"champion": "2", "previous": "1", "challenger": "3"}),
]


@pytest.mark.parametrize(("before", "version", "after"), PROMOTIONS)
def test_promotion_interrupted_at_any_write_never_leaves_champion_on_previous_and_completes(
    before: dict[str, str], version: str, after: dict[str, str]
) -> None:
    clean = FakeRegistry(before)
    replaced = registry.promote_to_champion(clean, "m", version)  # type: ignore[arg-type]
    assert clean.aliases == after and replaced == before.get("champion")
    _never_champion_is_previous(clean)

    for die_at in range(1, clean.writes + 1):
        fake = FakeRegistry(before, die_at=die_at)
        with pytest.raises(Interrupted):
            registry.promote_to_champion(fake, "m", version)  # type: ignore[arg-type]
        _never_champion_is_previous(fake)
        assert fake.aliases.get("champion") in (before.get("champion"), version)  # one side of the move
        # A later run completes it from the intent record, which names the replaced champion.
        fake.die_at = None
        assert registry.promote_to_champion(fake, "m", version, before.get("champion")) == before.get("champion")  # type: ignore[arg-type]
        assert fake.aliases == after, (die_at, fake.states)
        _never_champion_is_previous(fake)


ROLLBACKS = [
    # (aliases before, tags of the restored version, aliases after)
    ({"champion": "2", "previous": "1"}, {}, {"champion": "1"}),
    ({"champion": "3", "previous": "2"}, {"2": {"fabloop.previous_champion": "1"}}, {"champion": "2", "previous": "1"}),
]


@pytest.mark.parametrize(("before", "tags", "after"), ROLLBACKS)
def test_rollback_interrupted_at_any_write_never_leaves_champion_on_previous_and_completes(
    before: dict[str, str], tags: dict[str, dict[str, str]], after: dict[str, str]
) -> None:
    planned = (before["champion"], before["previous"])
    clean = FakeRegistry(before, tags)
    assert registry.rollback_champion(clean, "m") == planned  # type: ignore[arg-type]
    assert clean.aliases == after
    _never_champion_is_previous(clean)
    for die_at in range(1, clean.writes + 1):
        fake = FakeRegistry(before, tags, die_at=die_at)
        with pytest.raises(Interrupted):
            registry.rollback_champion(fake, "m", planned)  # type: ignore[arg-type]
        _never_champion_is_previous(fake)
        fake.die_at = None
        assert registry.rollback_champion(fake, "m", planned) == planned  # type: ignore[arg-type]
        assert fake.aliases == after
        # Repeated once more (a retry after success): nothing moves a step further back.
        assert registry.rollback_champion(fake, "m", planned) == planned  # type: ignore[arg-type]
        assert fake.aliases == after


# --- the audit ---------------------------------------------------------------------------------


def rec(i: int, decision: Decision, version: str, previous: str | None = None, status: str = COMPLETED,
        **detail: Any) -> ApprovalRecord:
    if decision in ("approved", "rolled_back"):
        detail["status"] = status
    return ApprovalRecord(id=i, model="m", version=version, decision=decision, approver="alice",
                          previous_champion=previous, decided_at=datetime(2026, 12, 1, 8, i, tzinfo=UTC),
                          detail=detail)


HISTORY = [
    rec(1, "approved", "1"),
    rec(2, "rejected", "2", "1"),
    rec(3, "approved", "3", "1"),
    rec(4, "rolled_back", "3", "3", champion="1", demoted="3"),
    rec(5, "timed_out", "4", "1"),
]


def test_recorded_history_explains_the_registry() -> None:
    verdict = verify_aliases("m", {"champion": "1"}, HISTORY)
    assert verdict.explained and (verdict.expected, verdict.decision_id) == ("1", 4)
    assert [champion for _, champion in alias_history(HISTORY)] == ["1", "1", "3", "1", "1"]


@pytest.mark.parametrize(("aliases", "problem"), [
    ({"champion": "3"}, "champion is version 3 but the last decision #4 (rolled_back by alice"),
    ({}, "champion is no version but the last decision #4"),
    ({"champion": "1", "previous": "1"}, "champion and previous are both on version 1"),
])
def test_a_champion_the_last_decision_did_not_make_is_unexplained(aliases: dict[str, str], problem: str) -> None:
    verdict = verify_aliases("m", aliases, HISTORY)
    assert not verdict.explained and verdict.problem is not None and problem in verdict.problem, verdict.problem


def test_a_champion_without_any_decision_is_unexplained_and_no_champion_without_one_is_fine() -> None:
    moved_by_hand = verify_aliases("m", {"champion": "2"}, [rec(1, "rejected", "2")])
    assert not moved_by_hand.explained and "no recorded decision" in (moved_by_hand.problem or "")
    assert verify_aliases("m", {"challenger": "1"}, []).explained


def test_an_intended_approval_explains_either_side_of_its_move_and_nothing_else() -> None:
    history = [*HISTORY, rec(6, "approved", "5", "1", status=INTENDED)]
    for champion in ("1", "5"):
        verdict = verify_aliases("m", {"champion": champion}, history)
        assert verdict.explained and "intended, not completed" in (verdict.note or ""), verdict
    assert not verify_aliases("m", {"champion": "3"}, history).explained
    completed = [*HISTORY, rec(6, "approved", "5", "1")]
    assert not verify_aliases("m", {"champion": "1"}, completed).explained  # completed: the move happened
