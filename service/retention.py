"""The retention controller: one pass = inventory, plan (pure), execute (I/O), report.

The plan is a pure function of an :class:`Inventory` (what exists), the policy and an
instant, so every deadline decision is unit-tested with an injected clock. A pass:

1. creates the keys of this month and the next ``lead_months`` (and, in broker mode,
   their topics) ahead of time;
2. for every month key past its identifier deadline (per retention class): first copies
   the records that active legal holds cover into each hold's store, re-sealed under the
   hold key, then destroys the key;
3. deletes a month's sealed data (``cdr.sealed.YYYY-MM`` / ``DIR/sealed/YYYY-MM.jsonl``)
   once every class of that month is past its identifier deadline (the sealed data of a
   month is shared by all classes), and the sanitised data once the longest billing
   period has passed;
4. bounds rejected input like the sealed months (file mode: rewrites ``rejected.jsonl``
   without lines of months no longer identifiable; broker mode: ``cdr.rejected`` has a
   bounded ``retention.ms``);
5. destroys the key and store of released holds when their time comes.

Never early: an action is planned only once its deadline (an exclusive instant: "gone
from") is at or before ``now``. Idempotent: the plan is built from what exists, so a
re-run finds nothing left to do. A failed action is reported as failed (never as done),
blocks what depends on it (a failed hold copy blocks the key's destruction: the held
records must be saved first), stays in the plan of the next pass, and keeps the overdue
gauge above zero.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import orjson

from service.durable import fsync_dir, replace_file
from service.errors import CdranonError, ConfigError, KeyDestroyedError
from service.holds import (
    Hold,
    HoldRegistry,
    HoldSecrets,
    copy_held,
    held_key_ids,
)
from service.keystore.base import KeyState, Keystore, key_id, split_key_id
from service.logs import log_event
from service.metrics import RetentionMetrics
from service.monthkeys import MonthKeys
from service.months import (
    billing_until,
    identifiers_until,
    month_of,
    month_of_ms,
    month_start,
    parse_rfc3339,
    rfc3339,
)
from service.policy import Policy

_LOG = logging.getLogger("cdranon.retention")
ACTOR = "retention"


class AuditSink(Protocol):
    """What the controller needs of the audit log (service.audit.Auditor has it)."""

    def record(self, event: str, *, actor: str, reason: str | None = None, **details: Any) -> Any:
        """Write one event durably; raise if it could not be written."""
        ...


class ActionKind(StrEnum):
    """What a pass can do; also the ``action`` label of the actions metric."""

    CREATE_KEY = "create_key"
    CREATE_TOPICS = "create_topics"
    COPY_HOLD = "copy_hold"
    DESTROY_KEY = "destroy_key"
    DELETE_SEALED = "delete_sealed"
    DELETE_SANITISED = "delete_sanitised"
    PRUNE_REJECTED = "prune_rejected"
    DESTROY_HOLD = "destroy_hold"


# Kinds whose deadline has passed when planned: not done means overdue.
DUE_KINDS = frozenset(
    {
        ActionKind.COPY_HOLD,
        ActionKind.DESTROY_KEY,
        ActionKind.DELETE_SEALED,
        ActionKind.DELETE_SANITISED,
        ActionKind.PRUNE_REJECTED,
        ActionKind.DESTROY_HOLD,
    }
)


class Status(StrEnum):
    """How an action ended; also the ``outcome`` label of the actions metric."""

    DONE = "done"
    SKIPPED = "skipped"  # nothing to do (already done, or absent)
    FAILED = "failed"
    BLOCKED = "blocked"  # a prerequisite failed; retried next pass
    PLANNED = "planned"  # dry run


@dataclass(frozen=True, slots=True)
class Action:
    """One step of a pass. ``deadline``: the instant it became due (None: ahead-of-time)."""

    kind: ActionKind
    target: str  # key id, month, hold id, or "rejected"
    deadline: datetime | None = None
    hold_id: str | None = None
    requires: tuple[str, ...] = ()
    why: str = ""

    @property
    def name(self) -> str:
        """Unique within a plan; ``requires`` refers to it."""
        suffix = f"@{self.hold_id}" if self.hold_id else ""
        return f"{self.kind.value}:{self.target}{suffix}"


@dataclass(frozen=True)
class Inventory:
    """What exists at the start of a pass. Built by :meth:`Controller.inventory`."""

    keys: Mapping[str, KeyState]  # month key id -> state
    sealed_months: frozenset[str]
    sanitised_months: frozenset[str]
    holds: tuple[Hold, ...] = ()
    hold_stores: frozenset[str] = frozenset()  # hold ids with a store (topic/file)
    hold_key_states: Mapping[str, str] = field(
        default_factory=dict
    )  # id -> active/destroyed/absent
    rejected_months: Mapping[str, int] | None = None  # file mode: lines per month


@dataclass(frozen=True)
class Plan:
    """The actions of a pass, in execution order, and what was noticed but left alone."""

    now: datetime
    actions: tuple[Action, ...]
    notes: tuple[str, ...] = ()


def _months_ahead(now: datetime, ahead: int, tz: tzinfo) -> list[str]:
    y, m = (int(p) for p in month_of(now, tz).split("-"))
    out = []
    for n in range(ahead + 1):
        total = y * 12 + (m - 1) + n
        out.append(f"{total // 12:04d}-{total % 12 + 1:02d}")
    return out


def plan_pass(
    inv: Inventory,
    policy: Policy,
    now: datetime,
    *,
    lead_months: int = 1,
    create_stores: bool = False,
    tz: tzinfo | None = None,
) -> Plan:
    """Decide what a pass does at ``now``. Pure: no I/O, no clock.

    Order: ahead-of-time creation, then per month key the hold copies before the key's
    destruction, then deletion of month data, rejected input, released holds.
    """
    zone = tz if tz is not None else policy.tz
    notes: list[str] = []
    actions = _plan_ahead(inv, policy, now, lead_months, create_stores, zone)
    key_actions, copies_of_month = _plan_keys(inv, policy, now, zone, notes)
    actions += key_actions
    actions += _plan_month_data(inv, policy, now, zone, copies_of_month)
    actions += _plan_holds(inv, now, notes)
    return Plan(now, tuple(actions), tuple(notes))


def _plan_ahead(
    inv: Inventory,
    policy: Policy,
    now: datetime,
    lead_months: int,
    create_stores: bool,
    zone: tzinfo,
) -> list[Action]:
    """Keys (and topics) of this month and the next ``lead_months``, if missing."""
    actions: list[Action] = []
    ahead = _months_ahead(now, lead_months, zone)
    for month in ahead:
        for rc in sorted(policy.classes.values(), key=lambda c: c.name):
            kid = key_id(month, rc.name)
            if kid in inv.keys or identifiers_until(month, rc.identifier_months, zone) <= now:
                continue  # present (or destroyed), or a 0-month class: never keyed
            actions.append(Action(ActionKind.CREATE_KEY, kid, why="ahead of time"))
    if create_stores:
        for month in ahead:
            if month not in inv.sealed_months or month not in inv.sanitised_months:
                actions.append(Action(ActionKind.CREATE_TOPICS, month, why="ahead of time"))
    return actions


def _plan_keys(
    inv: Inventory, policy: Policy, now: datetime, zone: tzinfo, notes: list[str]
) -> tuple[list[Action], dict[str, list[str]]]:
    """Month keys past their identifier deadline: hold copies first, then destruction."""
    actions: list[Action] = []
    copies_of_month: dict[str, list[str]] = {}
    active_holds = [h for h in inv.holds if h.active]
    for kid in sorted(inv.keys):
        if inv.keys[kid] is not KeyState.ACTIVE:
            continue
        month, cname = split_key_id(kid)
        rc = policy.classes.get(cname)
        if rc is None:
            notes.append(
                f"key {kid}: retention class {cname!r} is not in the policy; left alone "
                "(add the class back to the policy to have it destroyed on time)"
            )
            continue
        deadline = identifiers_until(month, rc.identifier_months, zone)
        if deadline > now:
            continue
        requires = []
        for h in active_holds:
            if not h.covers_month(month) or kid in h.copied:
                continue  # not covered, or copied by an earlier pass whose destroy failed
            copy = Action(
                ActionKind.COPY_HOLD,
                kid,
                deadline,
                hold_id=h.hold_id,
                why=f"hold {h.hold_id} covers {month}",
            )
            actions.append(copy)
            requires.append(copy.name)
            copies_of_month.setdefault(month, []).append(copy.name)
        actions.append(
            Action(
                ActionKind.DESTROY_KEY,
                kid,
                deadline,
                requires=tuple(requires),
                why=f"identifier deadline ({rc.identifier_months} months)",
            )
        )
    return actions, copies_of_month


def _plan_month_data(
    inv: Inventory,
    policy: Policy,
    now: datetime,
    zone: tzinfo,
    copies_of_month: Mapping[str, list[str]],
) -> list[Action]:
    """Sealed data when every class of its month is past; sanitised at billing; rejected."""
    actions: list[Action] = []
    longest_ident = policy.max_identifier_months
    longest_billing = policy.max_billing_years
    for month in sorted(inv.sealed_months):
        deadline = identifiers_until(month, longest_ident, zone)
        if deadline <= now:
            actions.append(
                Action(
                    ActionKind.DELETE_SEALED,
                    month,
                    deadline,
                    requires=tuple(copies_of_month.get(month, ())),
                    why=f"identifier deadline of the longest class ({longest_ident} months)",
                )
            )
    for month in sorted(inv.sanitised_months):
        deadline = billing_until(month, longest_billing, zone)
        if deadline <= now:
            actions.append(
                Action(
                    ActionKind.DELETE_SANITISED,
                    month,
                    deadline,
                    why=f"billing deadline ({longest_billing} years)",
                )
            )
    if inv.rejected_months:
        expired = [
            d
            for d in (identifiers_until(m, longest_ident, zone) for m in inv.rejected_months)
            if d <= now
        ]
        if expired:
            actions.append(
                Action(
                    ActionKind.PRUNE_REJECTED,
                    "rejected",
                    min(expired),
                    why="rejected input of months no longer identifiable",
                )
            )
    return actions


def _plan_holds(inv: Inventory, now: datetime, notes: list[str]) -> list[Action]:
    """Released holds: their key and store go at ``destroy_after``."""
    actions: list[Action] = []
    for h in inv.holds:
        if h.active:
            continue
        leftover = (
            inv.hold_key_states.get(h.hold_id, "absent") == "active"
            or h.hold_id in inv.hold_stores
            or h.destroyed_at is None
        )
        if not leftover:
            continue
        when = parse_rfc3339(h.destroy_after or h.released_at or rfc3339(now))
        if when > now:
            notes.append(f"hold {h.hold_id}: released, its store is kept until {rfc3339(when)}")
            continue
        actions.append(Action(ActionKind.DESTROY_HOLD, h.hold_id, when, why="hold released"))
    return actions


# -- stores of month data ----------------------------------------------------------------


class MonthStore(Protocol):
    """Where a mode keeps month data and hold copies: files (``--out DIR``) or topics."""

    kind: str  # "file" or "topic": audit events are "<kind>.deleted"

    def sealed_months(self) -> set[str]:
        """Months with sealed data present."""
        ...

    def sanitised_months(self) -> set[str]:
        """Months with sanitised data present."""
        ...

    def hold_stores(self) -> set[str]:
        """Hold ids with a store present."""
        ...

    def rejected_months(self, tz: tzinfo) -> dict[str, int] | None:
        """Lines of rejected input per month (None: the store bounds them itself)."""
        ...

    def ensure_months(self, months: Sequence[str]) -> list[str]:
        """Create the stores of ``months`` ahead of time; the names created."""
        ...

    def read_sealed(self, month: str) -> Iterable[bytes]:
        """Every sealed record of ``month``, as stored."""
        ...

    def held_key_ids(self, hold_id: str) -> set[str]:
        """Month key ids whose covered records the hold's store already holds."""
        ...

    def write_hold(self, hold_id: str, kid: str, records: Sequence[bytes]) -> None:
        """Add the copies of ``kid``'s records to the hold's store, all or nothing."""
        ...

    def delete_sealed(self, month: str) -> str | None:
        """Delete the month's sealed data; its name, or None if it was already gone."""
        ...

    def delete_sanitised(self, month: str) -> str | None:
        """Delete the month's sanitised data; its name, or None if already gone."""
        ...

    def delete_hold(self, hold_id: str) -> str | None:
        """Delete the hold's store; its name, or None if already gone."""
        ...

    def prune_rejected(self, keep: Callable[[str], bool], tz: tzinfo) -> int:
        """Drop rejected input of months ``keep`` refuses; lines removed."""
        ...


def _month_files(directory: Path) -> set[str]:
    out = set()
    with contextlib.suppress(FileNotFoundError):
        for p in directory.glob("*.jsonl"):
            name = p.name[: -len(".jsonl")]
            if len(name) == 7 and name[4] == "-" and name[:4].isdigit() and name[5:].isdigit():
                out.add(name)
    return out


def rejected_line_month(line: bytes, fallback: str, tz: tzinfo) -> str:
    """The month of a rejected.jsonl line: its original's event_time, else ``fallback``."""
    try:
        doc = orjson.loads(line)
        original = orjson.loads(doc["original"])
        et = original["event_time"]
        if isinstance(et, str):
            return month_of(parse_rfc3339(et), tz)
        if isinstance(et, int) and not isinstance(et, bool):
            return month_of_ms(et, tz)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError):
        pass
    return fallback


class FileMonthStore:
    """The batch mode's output directory (service/batch_mode.py) as a month store.

    Hold copies go to ``DIR/hold/<ID>.jsonl`` (0600), rewritten atomically per copy so a
    pass that crashes half-way leaves either the whole copy or none of it. A rejected
    line's month is that of its original's ``event_time`` when it can be read, else the
    month of the file's last modification (the line cannot be younger than that).
    """

    kind = "file"

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        if not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is not a directory (the `process` output)")

    def _path(self, kind: str, month: str) -> Path:
        return self.out / kind / f"{month}.jsonl"

    def sealed_months(self) -> set[str]:
        """Months with a ``sealed/YYYY-MM.jsonl``."""
        return _month_files(self.out / "sealed")

    def sanitised_months(self) -> set[str]:
        """Months with a ``sanitised/YYYY-MM.jsonl``."""
        return _month_files(self.out / "sanitised")

    def hold_stores(self) -> set[str]:
        """Hold ids with a ``hold/<ID>.jsonl``."""
        d = self.out / "hold"
        return {p.name[: -len(".jsonl")] for p in d.glob("*.jsonl")} if d.is_dir() else set()

    def _rejected_lines(self, tz: tzinfo) -> Iterator[tuple[bytes, str]]:
        path = self.out / "rejected.jsonl"
        try:
            mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            data = path.read_bytes()
        except FileNotFoundError:
            return
        fallback = month_of(mtime, tz)
        for line in data.splitlines():
            if line.strip():
                yield line, rejected_line_month(line, fallback, tz)

    def rejected_months(self, tz: tzinfo) -> dict[str, int] | None:
        """Lines of ``rejected.jsonl`` per month."""
        counts: dict[str, int] = {}
        for _line, month in self._rejected_lines(tz):
            counts[month] = counts.get(month, 0) + 1
        return counts

    def ensure_months(self, months: Sequence[str]) -> list[str]:
        """Nothing: month files are created by `process` when records arrive."""
        return []

    def read_sealed(self, month: str) -> Iterable[bytes]:
        """The lines of ``sealed/YYYY-MM.jsonl`` (none if absent)."""
        try:
            return self._path("sealed", month).read_bytes().splitlines()
        except FileNotFoundError:
            return []

    def _hold_path(self, hold_id: str) -> Path:
        return self.out / "hold" / f"{hold_id}.jsonl"

    def _hold_lines(self, hold_id: str) -> list[bytes]:
        try:
            return [ln for ln in self._hold_path(hold_id).read_bytes().splitlines() if ln.strip()]
        except FileNotFoundError:
            return []

    def held_key_ids(self, hold_id: str) -> set[str]:
        """``held_from`` values in the hold file."""
        return set(held_key_ids(self._hold_lines(hold_id)))

    def write_hold(self, hold_id: str, kid: str, records: Sequence[bytes]) -> None:
        """Rewrite the hold file with ``records`` replacing any earlier copy of ``kid``."""
        path = self._hold_path(hold_id)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        kept = [ln for ln in self._hold_lines(hold_id) if kid not in set(held_key_ids([ln]))]
        data = b"".join(ln + b"\n" for ln in [*kept, *records])
        replace_file(path, data, mode=0o600)

    def _delete(self, path: Path) -> str | None:
        try:
            path.unlink()
        except FileNotFoundError:
            return None
        fsync_dir(path.parent)
        return str(path)

    def delete_sealed(self, month: str) -> str | None:
        """Unlink ``sealed/YYYY-MM.jsonl``."""
        return self._delete(self._path("sealed", month))

    def delete_sanitised(self, month: str) -> str | None:
        """Unlink ``sanitised/YYYY-MM.jsonl``."""
        return self._delete(self._path("sanitised", month))

    def delete_hold(self, hold_id: str) -> str | None:
        """Unlink ``hold/<ID>.jsonl``."""
        return self._delete(self._hold_path(hold_id))

    def prune_rejected(self, keep: Callable[[str], bool], tz: tzinfo) -> int:
        """Rewrite ``rejected.jsonl`` with only the lines of months ``keep`` accepts."""
        lines = list(self._rejected_lines(tz))
        kept = [ln for ln, month in lines if keep(month)]
        removed = len(lines) - len(kept)
        if removed:
            path = self.out / "rejected.jsonl"
            if kept:
                replace_file(path, b"".join(ln + b"\n" for ln in kept), mode=0o600)
            else:
                self._delete(path)
        return removed


# -- executing a plan --------------------------------------------------------------------


@dataclass
class Outcome:
    """How one action ended, with a one-line detail (never an identifier)."""

    action: Action
    status: Status
    detail: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for ``--json``."""
        a = self.action
        doc: dict[str, Any] = {
            "action": a.kind.value,
            "target": a.target,
            "status": self.status.value,
            "deadline": rfc3339(a.deadline) if a.deadline else None,
            "why": a.why,
            "detail": self.detail,
        }
        if a.hold_id:
            doc["hold_id"] = a.hold_id
        if self.counts:
            doc["counts"] = self.counts
        return doc


@dataclass
class Report:
    """What a pass did, skipped and failed, and the compliance gauges after it."""

    now: datetime
    dry_run: bool
    outcomes: list[Outcome]
    notes: list[str]
    overdue_seconds: float
    oldest_identifiable_month: str | None
    oldest_identifiable_age_seconds: float
    audit_error: str | None = None

    @property
    def failed(self) -> list[Outcome]:
        """Outcomes that failed or were blocked."""
        return [o for o in self.outcomes if o.status in (Status.FAILED, Status.BLOCKED)]

    @property
    def ok(self) -> bool:
        """True when nothing failed (and the pass itself was audited)."""
        return not self.failed and self.audit_error is None

    def counts(self) -> dict[str, int]:
        """Outcomes by status."""
        out = {s.value: 0 for s in Status}
        for o in self.outcomes:
            out[o.status.value] += 1
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for ``--json``."""
        return {
            "now": rfc3339(self.now),
            "dry_run": self.dry_run,
            "ok": self.ok,
            "counts": self.counts(),
            "overdue_seconds": self.overdue_seconds,
            "oldest_identifiable_month": self.oldest_identifiable_month,
            "oldest_identifiable_age_seconds": self.oldest_identifiable_age_seconds,
            "actions": [o.as_dict() for o in self.outcomes],
            "notes": self.notes,
            "audit_error": self.audit_error,
        }


def overdue_seconds(outcomes: Sequence[Outcome], now: datetime) -> float:
    """Seconds past the oldest deadline whose action is not done; 0 when all is well.

    At least 1 when anything due is undone, so a failure right at a deadline still pages.
    """
    worst = 0.0
    undone = False
    for o in outcomes:
        a = o.action
        if a.kind in DUE_KINDS and a.deadline is not None and o.status is not Status.DONE:
            if o.status is Status.SKIPPED:
                continue  # nothing was left to do
            undone = True
            worst = max(worst, (now - a.deadline).total_seconds())
    return max(worst, 1.0) if undone else 0.0


class Controller:
    """Runs retention passes over one keystore, one month store and one hold registry."""

    def __init__(
        self,
        *,
        policy: Policy,
        keystore: Keystore,
        store: MonthStore,
        registry: HoldRegistry,
        hold_secrets: HoldSecrets,
        auditor: AuditSink | None,
        metrics: RetentionMetrics | None = None,
        lead_months: int = 1,
        create_stores: bool = False,
        tz: tzinfo | None = None,
    ) -> None:
        self.policy = policy
        self.keystore = keystore
        self.store = store
        self.registry = registry
        self.hold_secrets = hold_secrets
        self.auditor = auditor
        self.metrics = metrics
        self.lead_months = lead_months
        self.create_stores = create_stores
        self.tz = tz if tz is not None else policy.tz
        self.msisdn_fields = tuple(
            f for f, kind in policy.identifier_fields.items() if kind == "msisdn"
        )

    # -- inventory ---------------------------------------------------------------------

    def inventory(self) -> Inventory:
        """What exists now: keys, month data, holds, hold stores, rejected lines."""
        keys: dict[str, KeyState] = {}
        for info in self.keystore.list():
            try:
                split_key_id(info.key_id)
            except ConfigError:
                continue
            keys[info.key_id] = info.state
        holds = tuple(self.registry.list())
        return Inventory(
            keys=keys,
            sealed_months=frozenset(self.store.sealed_months()),
            sanitised_months=frozenset(self.store.sanitised_months()),
            holds=holds,
            hold_stores=frozenset(self.store.hold_stores()),
            hold_key_states={h.hold_id: self.hold_secrets.state(h.hold_id) for h in holds},
            rejected_months=self.store.rejected_months(self.tz),
        )

    def plan(self, now: datetime) -> Plan:
        """The plan of a pass at ``now`` over the current inventory."""
        return plan_pass(
            self.inventory(),
            self.policy,
            now,
            lead_months=self.lead_months,
            create_stores=self.create_stores,
            tz=self.tz,
        )

    # -- a pass ------------------------------------------------------------------------

    def run_pass(
        self,
        now: datetime,
        *,
        dry_run: bool = False,
        progress: Callable[[int], Any] | None = None,
        should_continue: Callable[[], bool] | None = None,
    ) -> Report:
        """Plan and (unless ``dry_run``) execute one pass at ``now``; report it.

        ``progress(n)`` is called after each action; ``should_continue()`` before each
        (a leader that lost its lease stops; the rest is reported blocked and retried).
        """
        plan = self.plan(now)
        outcomes: list[Outcome] = []
        status_of: dict[str, Status] = {}
        for action in plan.actions:
            if dry_run:
                outcome = Outcome(action, Status.PLANNED, "dry run")
            elif should_continue is not None and not should_continue():
                outcome = Outcome(action, Status.BLOCKED, "leadership lost: left to the leader")
            else:
                unmet = [
                    r
                    for r in action.requires
                    if status_of.get(r) not in (Status.DONE, Status.SKIPPED)
                ]
                if unmet:
                    outcome = Outcome(action, Status.BLOCKED, f"waits for {', '.join(unmet)}")
                else:
                    outcome = self._execute(action, now)
            status_of[action.name] = outcome.status
            outcomes.append(outcome)
            if outcome.status in (Status.FAILED, Status.BLOCKED):
                log_event(
                    _LOG,
                    "retention_action_failed",
                    level=logging.ERROR,
                    action=action.kind.value,
                    target=action.target,
                    status=outcome.status.value,
                    detail=outcome.detail,
                )
            elif outcome.status is Status.DONE:
                log_event(
                    _LOG, "retention_action_done", action=action.kind.value, target=action.target
                )
            if self.metrics is not None and not dry_run:
                self.metrics.actions.labels(action.kind.value, outcome.status.value).inc()
            if progress is not None:
                progress(1)
        report = self._report(now, dry_run, outcomes, list(plan.notes))
        if not dry_run:
            try:
                self._audit(
                    "retention.pass",
                    reason="retention pass",
                    now=rfc3339(now),
                    counts=report.counts(),
                    overdue_seconds=report.overdue_seconds,
                    failed=[o.action.name for o in report.failed],
                )
            except Exception as exc:  # noqa: BLE001 - any audit failure fails the pass
                report.audit_error = _safe_error(exc)
            self._update_metrics(report)
        return report

    def _report(
        self, now: datetime, dry_run: bool, outcomes: list[Outcome], notes: list[str]
    ) -> Report:
        if dry_run:
            # As if nothing were done: what the gauge reads if this plan never runs.
            gauge = overdue_seconds([replace(o, status=Status.FAILED) for o in outcomes], now)
        else:
            gauge = overdue_seconds(outcomes, now)
        active = sorted(
            split_key_id(i.key_id)[0]
            for i in self.keystore.list()
            if i.state is KeyState.ACTIVE and _is_month_key(i.key_id)
        )
        oldest = active[0] if active else None
        age = (now - month_start(oldest, self.tz)).total_seconds() if oldest else 0.0
        return Report(now, dry_run, outcomes, notes, gauge, oldest, max(0.0, age))

    def _update_metrics(self, report: Report) -> None:
        m = self.metrics
        if m is None:
            return
        states = {s.value: 0 for s in KeyState}
        for info in self.keystore.list():
            if _is_month_key(info.key_id):
                states[info.state.value] += 1
        for state, n in states.items():
            m.month_keys.labels(state).set(n)
        m.holds_active.set(sum(1 for h in self.registry.list() if h.active))
        m.overdue.set(report.overdue_seconds)
        m.oldest_identifiable_age.set(report.oldest_identifiable_age_seconds)
        if report.ok:
            m.last_success.set(report.now.timestamp())

    def _audit(self, event: str, **fields: Any) -> None:
        if self.auditor is not None:
            self.auditor.record(event, actor=ACTOR, **fields)

    def _execute(self, action: Action, now: datetime) -> Outcome:
        try:
            return self._dispatch(action, now)
        except CdranonError as exc:
            return Outcome(action, Status.FAILED, str(exc))
        except OSError as exc:
            return Outcome(action, Status.FAILED, f"{exc.strerror or type(exc).__name__}")
        except Exception as exc:  # noqa: BLE001 - one failure must not stop the pass
            return Outcome(action, Status.FAILED, _safe_error(exc))

    def _dispatch(self, a: Action, now: datetime) -> Outcome:
        handlers: dict[ActionKind, Callable[[Action, datetime], Outcome]] = {
            ActionKind.CREATE_KEY: self._create_key,
            ActionKind.CREATE_TOPICS: self._create_topics,
            ActionKind.COPY_HOLD: self._copy_hold,
            ActionKind.DESTROY_KEY: self._destroy_key,
            ActionKind.DELETE_SEALED: self._delete_sealed,
            ActionKind.DELETE_SANITISED: self._delete_sanitised,
            ActionKind.PRUNE_REJECTED: self._prune_rejected,
            ActionKind.DESTROY_HOLD: self._destroy_hold,
        }
        return handlers[a.kind](a, now)

    def _create_key(self, a: Action, _now: datetime) -> Outcome:
        try:
            self.keystore.create_if_absent(a.target)
        except KeyDestroyedError:
            return Outcome(a, Status.SKIPPED, "destroyed earlier: never re-created")
        self._audit("key.created", reason=a.why, key_id=a.target)
        return Outcome(a, Status.DONE, "created")

    def _create_topics(self, a: Action, _now: datetime) -> Outcome:
        created = self.store.ensure_months([a.target])
        return Outcome(a, Status.DONE, ", ".join(created) or "present")

    def _destroy_key(self, a: Action, _now: datetime) -> Outcome:
        existed = self.keystore.destroy(a.target)
        self._audit(
            "key.destroyed",
            reason=a.why,
            key_id=a.target,
            existed=existed,
            deadline=rfc3339(a.deadline) if a.deadline else None,
        )
        return Outcome(a, Status.DONE, "destroyed")

    def _delete_sealed(self, a: Action, _now: datetime) -> Outcome:
        return self._deleted(a, self.store.delete_sealed(a.target), "sealed")

    def _delete_sanitised(self, a: Action, _now: datetime) -> Outcome:
        return self._deleted(a, self.store.delete_sanitised(a.target), "sanitised")

    def _prune_rejected(self, a: Action, now: datetime) -> Outcome:
        longest = self.policy.max_identifier_months

        def keep(month: str) -> bool:
            return identifiers_until(month, longest, self.tz) > now

        removed = self.store.prune_rejected(keep, self.tz)
        if not removed:
            return Outcome(a, Status.SKIPPED, "nothing to remove")
        self._audit(
            f"{self.store.kind}.deleted", reason=a.why, what="rejected input lines", lines=removed
        )
        return Outcome(a, Status.DONE, f"removed {removed} lines", {"lines": removed})

    def _deleted(self, a: Action, name: str | None, view: str) -> Outcome:
        if name is None:
            return Outcome(a, Status.SKIPPED, "already gone")
        self._audit(
            f"{self.store.kind}.deleted", reason=a.why, month=a.target, view=view, name=name
        )
        return Outcome(a, Status.DONE, f"deleted {name}")

    def _copy_hold(self, a: Action, _now: datetime) -> Outcome:
        hold_id = a.hold_id
        assert hold_id is not None
        kid = a.target
        hold = next((h for h in self.registry.list() if h.hold_id == hold_id), None)
        if hold is None or not hold.active:
            return Outcome(a, Status.SKIPPED, "hold no longer active")
        if kid in self.store.held_key_ids(hold_id):
            # A pass crashed after writing the copy and before recording it.
            self.registry.put(replace(hold, copied={**hold.copied, kid: -1}))
            return Outcome(a, Status.SKIPPED, "copied by an earlier pass")
        secret = self.keystore.get(kid)
        if secret is None:
            self.registry.put(replace(hold, copied={**hold.copied, kid: 0}))
            return Outcome(a, Status.SKIPPED, "the month key never existed: nothing sealed")
        month_keys = MonthKeys.derive(kid, secret)
        registry_secret = self.hold_secrets.registry_secret() if hold.msisdn_macs else None
        result = copy_held(
            self.store.read_sealed(month_keys.month),
            month_keys,
            [hold],
            {hold_id: self.hold_secrets.get(hold_id)},
            registry_secret,
            self.msisdn_fields,
        )
        records = result.records[hold_id]
        self.store.write_hold(hold_id, kid, records)
        self.registry.put(replace(hold, copied={**hold.copied, kid: len(records)}))
        counts = {
            "records": len(records),
            "scanned": result.scanned,
            "unreadable": result.unreadable,
        }
        self._audit(
            "hold.copied",
            reason=a.why,
            hold_id=hold_id,
            key_id=kid,
            month=month_keys.month,
            **counts,
        )
        return Outcome(a, Status.DONE, f"copied {len(records)} of {result.scanned}", counts)

    def _destroy_hold(self, a: Action, now: datetime) -> Outcome:
        hold_id = a.target
        existed = self.hold_secrets.destroy(hold_id)
        self._audit(
            "key.destroyed", reason="hold released", key_id=f"hold/{hold_id}", existed=existed
        )
        name = self.store.delete_hold(hold_id)
        if name is not None:
            self._audit(
                f"{self.store.kind}.deleted", reason="hold released", hold_id=hold_id, name=name
            )
        hold = next((h for h in self.registry.list() if h.hold_id == hold_id), None)
        if hold is not None and hold.destroyed_at is None:
            self.registry.put(replace(hold, destroyed_at=rfc3339(now)))
        return Outcome(a, Status.DONE, "hold key destroyed" + (f", {name} deleted" if name else ""))


def _is_month_key(kid: str) -> bool:
    try:
        split_key_id(kid)
    except ConfigError:
        return False
    return True


def _safe_error(exc: BaseException) -> str:
    # Foreign exception messages may quote data; ours never do (service.errors).
    if isinstance(exc, CdranonError):
        return str(exc)
    return type(exc).__name__


def holds_dir(keystore_dir: Path) -> Path:
    """Where the file-mode hold registry and every hold secret live."""
    return keystore_dir / "holds"


__all__ = [
    "ACTOR",
    "Action",
    "ActionKind",
    "AuditSink",
    "Controller",
    "FileMonthStore",
    "Inventory",
    "MonthStore",
    "Outcome",
    "Plan",
    "Report",
    "Status",
    "holds_dir",
    "overdue_seconds",
    "plan_pass",
    "rejected_line_month",
]
