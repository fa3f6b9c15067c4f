"""The retention plan is a pure function of (inventory, policy, now): deadlines to the second."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from service.holds import Hold
from service.keystore.base import KeyState
from service.policy import Policy, load_policy, parse_policy
from service.retention import (
    Action,
    ActionKind,
    Inventory,
    Outcome,
    Status,
    overdue_seconds,
    plan_pass,
)

A = KeyState.ACTIVE
D = KeyState.DESTROYED
SECOND = timedelta(seconds=1)


def _policy_with_fr() -> Policy:
    base = load_policy()
    return parse_policy(
        {
            "fields": {
                "billing": list(base.billing_fields),
                "identifiers": dict(base.identifier_fields),
            },
            "retention": {"jurisdictions": {"fr": {"countries": ["FR"], "identifier_months": 24}}},
        },
        "test",
    )


def _kinds(actions: tuple[Action, ...], kind: ActionKind) -> list[str]:
    return [a.target for a in actions if a.kind is kind]


def _due(actions: tuple[Action, ...]) -> tuple[Action, ...]:
    return tuple(a for a in actions if a.kind is not ActionKind.CREATE_KEY)


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_never_early_and_exactly_at_the_deadline() -> None:
    inv = Inventory(
        keys={"2025-11/default": A, "2025-12/default": A},
        sealed_months=frozenset({"2025-11", "2025-12"}),
        sanitised_months=frozenset({"2025-11", "2025-12"}),
    )
    deadline = _t("2026-12-01T00:00:00")
    before = plan_pass(inv, load_policy(), deadline - SECOND, lead_months=0)
    assert _kinds(before.actions, ActionKind.DESTROY_KEY) == []
    assert _kinds(before.actions, ActionKind.DELETE_SEALED) == []
    at = plan_pass(inv, load_policy(), deadline, lead_months=0)
    assert _kinds(at.actions, ActionKind.DESTROY_KEY) == ["2025-11/default"]
    assert _kinds(at.actions, ActionKind.DELETE_SEALED) == ["2025-11"]
    assert _kinds(at.actions, ActionKind.DELETE_SANITISED) == []
    destroy = next(a for a in at.actions if a.kind is ActionKind.DESTROY_KEY)
    assert destroy.deadline == deadline


def test_sanitised_goes_on_1_january_of_year_plus_11() -> None:
    inv = Inventory(
        keys={"2025-11/default": D},
        sealed_months=frozenset(),
        sanitised_months=frozenset({"2025-01", "2025-11", "2026-01"}),
    )
    deadline = _t("2036-01-01T00:00:00")
    assert (
        _kinds(
            plan_pass(inv, load_policy(), deadline - SECOND).actions, ActionKind.DELETE_SANITISED
        )
        == []
    )
    assert _kinds(plan_pass(inv, load_policy(), deadline).actions, ActionKind.DELETE_SANITISED) == [
        "2025-01",
        "2025-11",
    ]


def test_each_class_on_its_own_deadline_sealed_data_at_the_longest() -> None:
    policy = _policy_with_fr()
    inv = Inventory(
        keys={"2025-11/default": A, "2025-11/fr": A},
        sealed_months=frozenset({"2025-11"}),
        sanitised_months=frozenset({"2025-11"}),
    )
    at12 = plan_pass(inv, policy, _t("2026-12-01T00:00:00"), lead_months=0)
    assert _kinds(at12.actions, ActionKind.DESTROY_KEY) == ["2025-11/default"]
    assert _kinds(at12.actions, ActionKind.DELETE_SEALED) == []
    inv2 = Inventory(
        keys={"2025-11/default": D, "2025-11/fr": A},
        sealed_months=inv.sealed_months,
        sanitised_months=inv.sanitised_months,
    )
    assert (
        _kinds(
            plan_pass(inv2, policy, _t("2027-11-30T23:59:59"), lead_months=0).actions,
            ActionKind.DESTROY_KEY,
        )
        == []
    )
    at24 = plan_pass(inv2, policy, _t("2027-12-01T00:00:00"), lead_months=0)
    assert _kinds(at24.actions, ActionKind.DESTROY_KEY) == ["2025-11/fr"]
    assert _kinds(at24.actions, ActionKind.DELETE_SEALED) == ["2025-11"]


def test_keys_ahead_for_every_class_and_topics_in_broker_mode() -> None:
    policy = _policy_with_fr()
    inv = Inventory(
        keys={"2026-03/default": A},
        sealed_months=frozenset({"2026-03"}),
        sanitised_months=frozenset({"2026-03"}),
    )
    plan = plan_pass(inv, policy, _t("2026-03-15T00:00:00"), lead_months=1, create_stores=True)
    assert _kinds(plan.actions, ActionKind.CREATE_KEY) == [
        "2026-03/fr",
        "2026-04/default",
        "2026-04/fr",
    ]
    assert _kinds(plan.actions, ActionKind.CREATE_TOPICS) == ["2026-04"]
    # A destroyed key is never planned for creation again.
    inv_d = Inventory(
        keys={"2026-03/default": D}, sealed_months=frozenset(), sanitised_months=frozenset()
    )
    assert "2026-03/default" not in _kinds(
        plan_pass(inv_d, load_policy(), _t("2026-03-15T00:00:00")).actions, ActionKind.CREATE_KEY
    )


def test_idempotent_once_done() -> None:
    done = Inventory(
        keys={"2025-11/default": D, "2026-12/default": A, "2027-01/default": A},
        sealed_months=frozenset(),
        sanitised_months=frozenset({"2025-11"}),
    )
    assert plan_pass(done, load_policy(), _t("2026-12-01T00:00:00")).actions == ()


def test_hold_copies_come_first_and_gate_destruction() -> None:
    hold = Hold("case-7", "court order", "alice", "2026-01-01T00:00:00Z", months=("2025-11",))
    other = Hold("case-8", "x", "bob", "2026-01-01T00:00:00Z", months=("2025-10",))
    inv = Inventory(
        keys={"2025-11/default": A},
        sealed_months=frozenset({"2025-11"}),
        sanitised_months=frozenset(),
        holds=(hold, other),
    )
    plan = plan_pass(inv, load_policy(), _t("2026-12-01T00:00:00"), lead_months=0)
    plan = replace(plan, actions=_due(plan.actions))
    kinds = [a.kind for a in plan.actions]
    assert kinds == [ActionKind.COPY_HOLD, ActionKind.DESTROY_KEY, ActionKind.DELETE_SEALED]
    copy = plan.actions[0]
    assert copy.hold_id == "case-7"
    assert plan.actions[1].requires == (copy.name,)
    assert plan.actions[2].requires == (copy.name,)
    # Copied by an earlier pass (its destroy failed): no second copy.
    inv2 = Inventory(
        keys=inv.keys,
        sealed_months=inv.sealed_months,
        sanitised_months=frozenset(),
        holds=(
            Hold(
                "case-7",
                "court order",
                "alice",
                "2026-01-01T00:00:00Z",
                months=("2025-11",),
                copied={"2025-11/default": 3},
            ),
        ),
    )
    again = plan_pass(inv2, load_policy(), _t("2026-12-01T00:00:00"), lead_months=0)
    assert [a.kind for a in _due(again.actions)] == [
        ActionKind.DESTROY_KEY,
        ActionKind.DELETE_SEALED,
    ]


def test_released_hold_destroyed_at_its_time() -> None:
    released = Hold(
        "case-9",
        "r",
        "alice",
        "2026-01-01T00:00:00Z",
        months=("2025-11",),
        released_at="2026-12-05T00:00:00Z",
        released_by="bob",
        destroy_after="2027-01-01T00:00:00Z",
    )
    inv = Inventory(
        keys={},
        sealed_months=frozenset(),
        sanitised_months=frozenset(),
        holds=(released,),
        hold_stores=frozenset({"case-9"}),
        hold_key_states={"case-9": "active"},
    )
    early = plan_pass(inv, load_policy(), _t("2026-12-31T23:59:59"), lead_months=0)
    assert _kinds(early.actions, ActionKind.DESTROY_HOLD) == []
    assert any("case-9" in n for n in early.notes)
    due = plan_pass(inv, load_policy(), _t("2027-01-01T00:00:00"), lead_months=0)
    assert _kinds(due.actions, ActionKind.DESTROY_HOLD) == ["case-9"]


def test_rejected_lines_bounded_by_the_longest_identifier_window() -> None:
    inv = Inventory(
        keys={},
        sealed_months=frozenset(),
        sanitised_months=frozenset(),
        rejected_months={"2025-10": 2, "2025-11": 1},
    )
    assert (
        _kinds(
            plan_pass(inv, load_policy(), _t("2026-10-31T23:59:59"), lead_months=0).actions,
            ActionKind.PRUNE_REJECTED,
        )
        == []
    )
    prune = plan_pass(inv, load_policy(), _t("2026-11-01T00:00:00"), lead_months=0).actions
    assert _kinds(prune, ActionKind.PRUNE_REJECTED) == ["rejected"]


def test_unknown_class_is_left_alone_with_a_note() -> None:
    inv = Inventory(
        keys={"2020-01/gone": A}, sealed_months=frozenset(), sanitised_months=frozenset()
    )
    plan = plan_pass(inv, load_policy(), _t("2026-01-01T00:00:00"), lead_months=0)
    assert [a.target for a in plan.actions] == ["2026-01/default"]  # only this month's key
    assert any("gone" in n for n in plan.notes)


def test_overdue_gauge() -> None:
    now = _t("2026-12-02T00:00:00")
    due = Action(ActionKind.DESTROY_KEY, "2025-11/default", _t("2026-12-01T00:00:00"))
    ahead = Action(ActionKind.CREATE_KEY, "2027-01/default")
    assert overdue_seconds([Outcome(due, Status.DONE), Outcome(ahead, Status.FAILED)], now) == 0.0
    assert overdue_seconds([Outcome(due, Status.FAILED)], now) == 86_400.0
    assert overdue_seconds([Outcome(due, Status.BLOCKED)], now) == 86_400.0
    # A failure right at the deadline still pages.
    assert overdue_seconds([Outcome(due, Status.FAILED)], due.deadline or now) == 1.0
    assert overdue_seconds([Outcome(due, Status.SKIPPED)], now) == 0.0
