"""The transform: a pure batch function from input bytes to sealed, sanitised and rejected
records. No Kafka, file or Faust code here; adapters call it.

Per record: parse (orjson) -> check fields against the policy (allow-list: unnamed fields
are dropped) -> month and deadlines from ``event_time`` -> identifiers sealed in one AEAD
blob and replaced by month-keyed pseudonyms plus their generalised parts -> two JSON
documents. A record that fails any check is rejected with a bounded reason code, the
field, and what was expected; never with an identifier's value.

The inner loop binds attributes to locals and keeps per-month state in a per-batch dict:
this is the hot path (see benchmarks/transform_bench.py and PERFORMANCE-NOTES.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from hashlib import sha256
from math import floor
from operator import itemgetter
from typing import Any

from orjson import OPT_SORT_KEYS, JSONDecodeError, dumps, loads

from service.errors import KeyDestroyedError, RecordError
from service.fields import (
    BILLING_CHECKS,
    EXPECTED_TYPE,
    MEMO_CHECKED,
    check_account,
    check_cdr_id,
    check_non_negative,
)
from service.identifiers import checker_for, general_field
from service.integrity import DIGEST_FIELD, LEAF_FIELD
from service.jsonkeys import WS_TO_SPACE, DuplicateKeyError, check_unique
from service.keyring import Keyring
from service.keystore.base import key_id
from service.merkle import leaf_hash
from service.monthkeys import MonthKeys
from service.months import billing_until, identifiers_until, month_of, month_of_ms, to_ms
from service.native import build_engine, key_fragment
from service.outputs import BatchResult, OutRecord, Rejected
from service.policy import Policy, RetentionClass
from service.pseudonyms import PSEUDONYM_BYTES
from service.sealing import BatchSealer, batch_material

MAX_RECORD_BYTES = 1 << 20
# Cached pseudonyms, all months together; cleared when full (identifiers repeat a lot, a
# cleared cache refills quickly). ~200 bytes an entry: ~100 MB at most. Size it to the
# identifiers seen in the live months (a few months x subscribers x identifier kinds):
# a cache smaller than that working set is cleared over and over and saves little.
PSEUDONYM_CACHE_ENTRIES = 1 << 19

STRIP_PAST_DEADLINE = "past_identifier_deadline"
STRIP_KEY_DESTROYED = "key_destroyed"

_BILLING = 0
_IDENT = 1


_new = tuple.__new__  # builds an OutRecord without a Python-level __new__
_Shape = tuple[tuple[str, ...], tuple[type, ...]]
_PLAN_CACHE_ENTRIES = 4096
_MEMO_ENTRIES = 1 << 16
_MINUTE_CACHE_ENTRIES = 1 << 16
_REQUIRED = (
    ("cdr_id", "a cdr_id string"),
    ("account_id", "an account_id"),
    ("event_time", "an event_time"),
)
# ":SS" -> seconds and "fff" -> milliseconds, for the event-time fast path (a table lookup
# both checks and converts).
_SECONDS = {f":{i:02d}": i * 1000 for i in range(60)}
_MILLIS = {f"{i:03d}": i for i in range(1000)}
# Checks of required fields, done inline in the hot path.
_INLINE_CHECKS = (check_cdr_id, check_account)
_RFC3339 = "expected RFC 3339 (2025-11-30T23:59:59Z)"
_SEALED = b',"sealed":"'
# The runner's batch ids (b<hex>n<seq>): JSON-safe as they are, no escaping needed.
_LEAF_TAG = re.compile(rb"[A-Za-z0-9_.-]{1,64}\Z")
_SOURCE = itemgetter(0)
# What the native engine keeps per month and batch: (head, billing deadline in ms, sealing
# subkey, blob header, AAD prefix, pseudonym key).
_NativeCtx = tuple[bytes, int, bytes, bytes, bytes, bytes]


@dataclass(slots=True)
class _Plan:
    """What to do with records of one shape (field names in order and value types)."""

    # (field, checker, general field, MAC input prefix, general key, pseudonym key): the
    # keys as JSON fragments (',"msisdn_cc":' and ',"msisdn_pseudonym":"').
    idents: tuple[tuple[str, Any, str | None, bytes, bytes, bytes], ...]
    ident_fields: tuple[str, ...]
    drop: tuple[str, ...]  # unnamed fields and null identifiers
    nonneg: tuple[str, ...]  # numeric billing fields that must be >= 0 (non-null here)
    checks: tuple[tuple[str, Any], ...]  # other billing fields with a per-record value check
    memo_get: Callable[[dict[str, Any]], Any] | None  # values of the code fields
    memo_checks: tuple[tuple[str, Any], ...]
    memo_good: set[Any]  # code-field value tuples that passed
    # The generalised parts of the identifiers this shape lacks, as null (',"imei_tac":null').
    absent: bytes


@dataclass(slots=True)
class _MonthCtx:
    """Per-batch state of one (month, retention class)."""

    month: str
    kid: str | None  # None when the identifiers are stripped
    strip_reason: str | None
    billing_until_ms: int
    sealer: BatchSealer | None
    keys: MonthKeys | None
    # field -> raw value -> the sanitised view's JSON fragment for it (generalised part and
    # pseudonym), cached per month key
    caches: dict[str, dict[str, bytes]]
    head: bytes  # ',"month":"2026-10","key_id":"2026-10/default"'


def _stripped_head(month: str) -> bytes:
    """',"month":"2026-10","key_id":null': the head of a stripped record."""
    return key_fragment("month") + dumps(month) + key_fragment("key_id") + b"null"


# A deadline past year 9999, where datetime's range ends: no clock reaches it.
_NEVER_MS = 1 << 62


def _deadline_ms(
    until: Callable[[str, int, tzinfo], datetime], month: str, n: int, tz: tzinfo
) -> int:
    """Epoch ms of a month's deadline; _NEVER_MS when it falls after year 9999 (a month
    in the 9990s: reachable with --now, and it must not end the batch)."""
    try:
        return to_ms(until(month, n, tz))
    except (ValueError, OverflowError):
        return _NEVER_MS


def _renumber_leaves(result: BatchResult, months: set[str]) -> None:
    """Give the sanitised records of ``months`` (in input order) leaf indexes 0, 1, ... in
    that order, and their months' leaf hashes the same order. Off the hot path: only
    where both paths wrote records of a month."""
    recs = result.sanitised
    for month in months:
        buf = bytearray()
        for k, rec in enumerate(recs):
            if rec.month != month:
                continue
            value = rec.value
            # The leaf is the last field, its index the digits after the last "/".
            cut = value.rindex(b"/") + 1
            renumbered = value[:cut] + b"%d" % (len(buf) // 32) + b'"}'
            if renumbered != value:
                recs[k] = rec._replace(value=renumbered)
            assert rec.digest is not None  # integrity is on with a leaf tag
            buf += leaf_hash(bytes.fromhex(rec.digest))
        result.leaves[month] = buf


def _check_unique_keys(raw: bytes) -> None:
    """RecordError if any object in ``raw`` (already valid JSON for orjson) repeats a key."""
    try:
        check_unique(raw)
    except DuplicateKeyError:
        # The key is not named: it is input, and could be anything.
        raise RecordError("invalid_json", None, "an object has a duplicate key") from None
    except RecursionError:
        # Nesting within orjson's limit (1024) but past Python's recursion limit.
        raise RecordError("invalid_json", None, "nested too deeply") from None
    except ValueError as exc:
        # orjson accepted it; the stdlib refused (e.g. its integer digit limit): refuse too.
        raise RecordError("invalid_json", None, type(exc).__name__) from None


class Transformer:
    """Applies a policy to batches of raw CDRs. One instance per processor; not thread-safe."""

    def __init__(
        self,
        policy: Policy,
        keyring: Keyring,
        *,
        tz: tzinfo | None = None,
        future_tolerance_s: int | None = None,
        max_record_bytes: int = MAX_RECORD_BYTES,
        integrity: bool = True,
        cache_entries: int | None = None,
    ) -> None:
        self.policy = policy
        self.keyring = keyring
        self.tz = tz if tz is not None else policy.tz
        self.utc = self.tz is UTC
        tol = policy.future_tolerance_seconds if future_tolerance_s is None else future_tolerance_s
        self.future_tolerance_ms = tol * 1000
        self.max_record_bytes = max_record_bytes
        # "Original form" (service/integrity.py): a digest of the billing fields as
        # received in every sanitised record.
        self.integrity = integrity
        # field -> (class, allowed types / checker, value check / kind, general field)
        self._spec: dict[str, tuple[int, Any, Any, str | None]] = {}
        for name in policy.billing_fields:
            types, check = BILLING_CHECKS.get(name, (None, None))
            self._spec[name] = (_BILLING, types, check, None)
        for name, kind in policy.identifier_fields.items():
            checker = checker_for(
                kind,
                three_digit_mnc_mccs=policy.three_digit_mnc_mccs,
                email_domain=policy.email_domain,
            )
            gen = general_field(name, kind)
            if kind == "email" and not policy.email_domain:
                gen = None
            self._spec[name] = (_IDENT, checker, kind, gen)
        self._plans: dict[_Shape, _Plan] = {}
        # key id -> field -> raw identifier -> sanitised JSON fragment; see _fragment
        self._caches: dict[str, dict[str, dict[str, bytes]]] = {}
        self._cached = 0
        self.cache_entries = PSEUDONYM_CACHE_ENTRIES if cache_entries is None else cache_entries
        self._minutes: dict[str, int] = {}  # "YYYY-MM-DDTHH:MM" (UTC) -> epoch ms
        self._general_none = dict.fromkeys(
            g for (c, _, _, g) in self._spec.values() if c == _IDENT and g is not None
        )
        self._class_by_country: dict[Any, RetentionClass] = dict(policy.class_by_country)
        self._default_class = policy.default_class
        # The native path (service/_native.c) for the common records, or None.
        built = build_engine(
            policy, self._spec, list(self._general_none), max_record_bytes, self.utc
        )
        self._engine: Any = None
        self._engine_classes: list[RetentionClass] = []
        if built is not None:
            self._engine, self._engine_classes = built

    @property
    def native(self) -> bool:
        """True when the native path writes the common records."""
        return self._engine is not None

    # -- record shapes ------------------------------------------------------------------

    def _plan(self, rec: dict[str, Any], shape: _Shape) -> _Plan:  # noqa: PLR0912
        """Check a new shape's types and required fields; cache what to do with it."""
        idents: list[tuple[str, Any, str | None, bytes, bytes, bytes]] = []
        drop: list[str] = []
        checks: list[tuple[str, Any]] = []
        nonneg: list[str] = []
        memo: list[tuple[str, Any]] = []
        for k, v in rec.items():
            s = self._spec.get(k)
            if s is None:
                drop.append(k)  # allow-list: a field the policy does not name is dropped
                continue
            cls, a, b, gen = s
            if cls == _BILLING:
                if a is not None and type(v) not in a:
                    raise RecordError("wrong_type", k, f"expected {EXPECTED_TYPE[a]}")
                if b is None or v is None or b in _INLINE_CHECKS:
                    pass
                elif b is check_non_negative:
                    nonneg.append(k)
                else:
                    (memo if k in MEMO_CHECKED else checks).append((k, b))
            elif v is None:
                drop.append(k)  # a null identifier is an absent one
            else:
                if type(v) is not str:
                    a(k, v)  # every identifier is a string: this raises wrong_type
                idents.append(
                    (
                        k,
                        a,
                        gen,
                        b.encode() + b"\x00",
                        key_fragment(gen) if gen is not None else b"",
                        key_fragment(k + "_pseudonym") + b'"',
                    )
                )
        for name, what in _REQUIRED:
            if rec.get(name) is None:
                raise RecordError("missing_field", name, f"every CDR needs {what}")
        present = {i[2] for i in idents}
        plan = _Plan(
            idents=tuple(idents),
            ident_fields=tuple(i[0] for i in idents),
            drop=tuple(drop),
            nonneg=tuple(nonneg),
            checks=tuple(checks),
            memo_get=itemgetter(*(f for f, _ in memo)) if memo else None,
            memo_checks=tuple(memo),
            memo_good=set(),
            absent=b"".join(
                key_fragment(g) + b"null" for g in self._general_none if g not in present
            ),
        )
        if len(self._plans) >= _PLAN_CACHE_ENTRIES:
            self._plans.clear()
        self._plans[shape] = plan
        return plan

    # -- per-batch month contexts -------------------------------------------------------

    def _ctx(self, month: str, rclass: RetentionClass, now_ms: int) -> _MonthCtx:
        tz = self.tz
        bill_ms = _deadline_ms(billing_until, month, rclass.billing_years, tz)
        if now_ms >= _deadline_ms(identifiers_until, month, rclass.identifier_months, tz):
            # Past the identifier deadline: never a key for this month (RETENTION-RULES).
            return _MonthCtx(
                month, None, STRIP_PAST_DEADLINE, bill_ms, None, None, {}, _stripped_head(month)
            )
        kid = key_id(month, rclass.name)
        try:
            keys = self.keyring.get(kid)
        except KeyDestroyedError:
            # Destroyed early (by an operator): its identifiers can only be stripped, and
            # its cached pseudonyms go with the key.
            self._caches.pop(kid, None)
            return _MonthCtx(
                month, None, STRIP_KEY_DESTROYED, bill_ms, None, None, {}, _stripped_head(month)
            )
        caches = self._caches.get(kid)
        if caches is None:
            caches = self._caches[kid] = {f: {} for f in self.policy.identifier_fields}
        head = key_fragment("month") + dumps(month) + key_fragment("key_id") + dumps(kid)
        return _MonthCtx(month, kid, None, bill_ms, BatchSealer(keys), keys, caches, head)

    # -- the batch ----------------------------------------------------------------------

    def transform(  # noqa: PLR0912, PLR0915  # the hot path, kept inline on purpose
        self, values: Sequence[bytes], now_ms: int, leaf_tag: bytes | None = None
    ) -> BatchResult:
        """Transform one batch. ``now_ms`` decides which deadlines have passed.

        ``leaf_tag`` (integrity on; the runner's batch id, see service/integrity.py): each
        sanitised record then carries ``integrity_leaf`` = ``"<leaf_tag>/<i>"``, ``i`` its
        index in its month's tree, whose leaf hashes the result holds in ``leaves``.

        May raise KeystoreUnavailableError (nothing is returned then; the caller retries
        the whole batch). Every other problem is a per-record rejection.

        The per-record work is inline in this loop, with what it needs bound to locals
        once per batch: a method call and a dozen attribute look-ups per record were ~15%
        of the transform. Outputs are built by joining JSON fragments around one
        serialisation of the billing fields, not by one orjson.dumps per output: dumps
        hands back its whole output buffer (an 8 KiB allocation for a 400-byte record),
        and keeping two per record until the batch is written faulted in fresh memory
        pages on every batch (~0.5 minor faults per record) and grew the processor's RSS
        to 650 MB. bytes.join allocates exactly.
        """
        result = BatchResult()
        rejected = result.rejected
        add_sealed = result.sealed.append
        add_sanitised = result.sanitised.append
        ctxs: dict[tuple[str, str], _MonthCtx] = {}
        max_bytes = self.max_record_bytes
        plans_get = self._plans.get
        minutes_get = self._minutes.get
        seconds_get = _SECONDS.get
        millis_get = _MILLIS.get
        fast_time = self.utc
        class_get = self._class_by_country.get
        default_class = self._default_class
        latest_ms = now_ms + self.future_tolerance_ms
        integrity = self.integrity
        join = b"".join
        digest_key = key_fragment(DIGEST_FIELD) + b'"'
        leaves = result.leaves
        if leaf_tag is not None:
            if not integrity or not _LEAF_TAG.match(leaf_tag):
                raise ValueError("a leaf tag needs integrity on and is 1-64 of [A-Za-z0-9_.-]")
            leaf_key = b'",' + key_fragment(LEAF_FIELD)[1:] + b'"' + leaf_tag + b"/"
            result.leaf_tag = leaf_tag
        leaf_months: set[str] = set()  # months the Python path gave leaves
        pending: Iterable[tuple[int, bytes]] = enumerate(values)
        engine = self._engine
        if engine is not None:
            declined = engine.run(
                values,
                now_ms,
                latest_ms,
                integrity,
                self._native_ctx(ctxs, now_ms),
                result.sealed,
                result.sanitised,
                OutRecord,
                leaf_tag,
                leaves,
            )
            # The records the engine declined (unusual or failing ones) take the path below.
            pending = [(i, values[i]) for i in declined]
            result.python_path = len(declined)
        else:
            result.python_path = len(values)
        for index, raw in pending:
            try:
                if len(raw) > max_bytes:
                    raise RecordError(
                        "too_large",
                        None,
                        f"record of {len(raw)} bytes; the limit is {max_bytes}",
                    )
                try:
                    rec = loads(raw)
                except JSONDecodeError as exc:
                    # orjson's messages describe the syntax error, never quote the document.
                    raise RecordError(
                        "invalid_json", None, f"{exc.msg} at character {exc.pos}"
                    ) from None
                if type(rec) is not dict:
                    raise RecordError("not_an_object", None, "expected one JSON object per record")
                # service.jsonkeys.surely_unique, inline: a record with duplicate keys
                # could be billed differently downstream, so it is rejected.
                if raw.count(b'":') != len(rec) or b" :" in raw.translate(WS_TO_SPACE):
                    _check_unique_keys(raw)

                # A record's shape (field names in order, and each value's type) decides
                # which fields are identifiers, which are dropped and which values need a
                # check. Shapes repeat (a few dozen in real traffic), so the per-field
                # dispatch runs once per shape, not once per record.
                shape = (tuple(rec), tuple(map(type, rec.values())))
                plan = plans_get(shape)
                if plan is None:
                    plan = self._plan(rec, shape)
                idents = plan.ident_fields
                ivalues = list(map(rec.pop, idents))
                for f in plan.drop:
                    del rec[f]
                cdr_id = rec["cdr_id"]
                if not 0 < len(cdr_id) <= 128:  # str: the shape's types are checked
                    check_cdr_id("cdr_id", cdr_id)
                account = rec["account_id"]
                if type(account) is str and not 0 < len(account) <= 256:
                    check_account("account_id", account)
                for f in plan.nonneg:
                    if rec[f] < 0:
                        check_non_negative(f, rec[f])
                for f, check in plan.checks:
                    check(f, rec[f])
                if plan.memo_get is not None:
                    codes = plan.memo_get(rec)
                    if codes not in plan.memo_good:
                        for f, check in plan.memo_checks:
                            check(f, rec[f])
                        if len(plan.memo_good) >= _MEMO_ENTRIES:
                            plan.memo_good.clear()
                        plan.memo_good.add(codes)
                # What is left in rec: the billing fields, in input order.

                et = rec["event_time"]
                if fast_time and type(et) is str and len(et) in (20, 24) and et[-1] == "Z":
                    # Fast path for the common "...:SSZ" / "...:SS.fffZ": the minute's
                    # epoch ms is cached (records of a batch share minutes), the seconds
                    # come from a table.
                    base = minutes_get(et[:16])
                    sec = seconds_get(et[16:19])
                    frac = (
                        0 if len(et) == 20 else (millis_get(et[20:23]) if et[19] == "." else None)
                    )
                    if base is None or sec is None or frac is None:
                        event_ms, month = self._event_time(et)
                    else:
                        event_ms = base + sec + frac
                        month = et[:7]
                else:
                    event_ms, month = self._event_time(et)

                if event_ms > latest_ms:
                    # Before the month's context: a month that far ahead needs no key.
                    raise RecordError(
                        "too_far_in_future",
                        "event_time",
                        "event time is later than now plus the tolerance",
                    )
                rclass = class_get(rec.get("country"), default_class)
                ctx = ctxs.get((month, rclass.name))
                if ctx is None:
                    ctx = ctxs[(month, rclass.name)] = self._ctx(month, rclass, now_ms)
                if now_ms >= ctx.billing_until_ms:
                    raise RecordError(
                        "past_billing_deadline",
                        "event_time",
                        f"billing deadline of {month} has passed",
                    )

                key = account.encode() if type(account) is str else str(account).encode()
                # One serialisation of the billing fields, in the canonical encoding
                # (keys sorted: service/integrity.py), shared by both views and the digest:
                # the billing part of every output is the exact bytes its digest covers.
                doc = dumps(rec, option=OPT_SORT_KEYS)
                if integrity:
                    digest = sha256(doc)
                    hexd = digest.hexdigest()
                    tail = digest_key + hexd.encode() + b'"}'
                else:
                    hexd = None
                    tail = b"}"
                body = doc[:-1]
                keys = ctx.keys
                if keys is None:
                    self._stripped(
                        body, tail, plan, ivalues, ctx, hexd, index, key, event_ms, result
                    )
                    if leaf_tag is not None:
                        self._leaf(result, month, digest.digest(), leaf_key)
                        leaf_months.add(month)
                    continue
                head = ctx.head
                caches = ctx.caches
                parts = [body, head]
                for ident, value in zip(plan.idents, ivalues, strict=True):
                    # What the sanitised view adds for this identifier (its generalised
                    # part and pseudonym), cached per month key: identifiers repeat a lot
                    # in real traffic.
                    frag = caches[ident[0]].get(value)
                    if frag is None:
                        frag = self._fragment(keys, caches[ident[0]], ident, value)
                    parts.append(frag)
                parts.append(plan.absent)
                parts.append(tail)
                sealer = ctx.sealer
                assert sealer is not None  # set together with keys
                blob = sealer.seal_b64(dumps(dict(zip(idents, ivalues, strict=True))), cdr_id)
                sealed = join((body, head, _SEALED, blob, b'"}'))
                add_sealed(_new(OutRecord, (index, month, key, event_ms, sealed, None)))
                add_sanitised(_new(OutRecord, (index, month, key, event_ms, join(parts), hexd)))
                if leaf_tag is not None:
                    # After every check: a leaf index is taken only by a record written.
                    self._leaf(result, month, digest.digest(), leaf_key)
                    leaf_months.add(month)
            except RecordError as err:
                rejected.append(Rejected(index, err.reason, err.field, str(err), bytes(raw)))
        if engine is not None and pending and result.sanitised:
            # Both paths wrote: back to input order (the file outputs and the integrity
            # leaves follow it).
            result.sealed.sort(key=_SOURCE)
            result.sanitised.sort(key=_SOURCE)
            if leaf_months:
                # The engine numbered its leaves first: renumber in input order, as the
                # Python path alone does (outputs do not depend on which path wrote them).
                _renumber_leaves(result, leaf_months)
        for ctx in ctxs.values():
            if ctx.kid is not None:
                result.months.add(ctx.kid)
        return result

    @staticmethod
    def _leaf(result: BatchResult, month: str, digest: bytes, leaf_key: bytes) -> None:
        """Give the last sanitised record its leaf in its month's tree (as the native path
        does: service/_native.c): ``,"integrity_leaf":"<tag>/<i>"`` before its closing
        brace, its leaf hash appended to ``result.leaves[month]``."""
        buf = result.leaves.get(month)
        if buf is None:
            buf = result.leaves[month] = bytearray()
        rec = result.sanitised[-1]
        value = rec.value[:-2] + leaf_key + b"%d" % (len(buf) // 32) + b'"}'
        result.sanitised[-1] = rec._replace(value=value)
        buf += leaf_hash(digest)

    def _native_ctx(
        self, ctxs: dict[tuple[str, str], _MonthCtx], now_ms: int
    ) -> Callable[[str, int], _NativeCtx | None]:
        """The engine's month contexts: the batch's own (shared with the Python path, so
        both see one keystore read and one deadline decision per month), plus a sealing
        subkey of the engine's own; None where identifiers are stripped."""
        classes = self._engine_classes

        def native_ctx(month: str, cls: int) -> _NativeCtx | None:
            rclass = classes[cls]
            ctx = ctxs.get((month, rclass.name))
            if ctx is None:
                ctx = ctxs[(month, rclass.name)] = self._ctx(month, rclass, now_ms)
            keys = ctx.keys
            if keys is None or len(keys.pseudonym_key) != 32:
                return None
            subkey, header, aad_prefix = batch_material(keys)
            return (ctx.head, ctx.billing_until_ms, subkey, header, aad_prefix, keys.pseudonym_key)

        return native_ctx

    def _stripped(
        self,
        body: bytes,
        tail: bytes,
        plan: _Plan,
        values: list[Any],
        ctx: _MonthCtx,
        digest: str | None,
        index: int,
        key: bytes,
        event_ms: int,
        result: BatchResult,
    ) -> None:
        """The sanitised view of a record whose identifiers are stripped (its month is past
        the identifier deadline or its key destroyed): generalised parts only, no pseudonym.

        Identifiers are still checked (a malformed one is still a rejection, so the
        outcome does not depend on the date). Off the hot path.
        """
        parts = [body, ctx.head]
        for (field, checker, gen, _prefix, gen_key, _pkey), value in zip(
            plan.idents, values, strict=True
        ):
            _norm, general = checker(field, value)
            if gen is not None:
                parts.append(gen_key + dumps(general))
        parts.append(plan.absent)
        parts.append(tail)
        reason = ctx.strip_reason or STRIP_PAST_DEADLINE
        result.stripped += 1
        result.stripped_reasons[reason] = result.stripped_reasons.get(reason, 0) + 1
        doc = b"".join(parts)
        result.sanitised.append(_new(OutRecord, (index, ctx.month, key, event_ms, doc, digest)))

    def _fragment(
        self,
        keys: MonthKeys,
        cache: dict[str, bytes],
        ident: tuple[str, Any, str | None, bytes, bytes, bytes],
        value: Any,
    ) -> bytes:
        """Check, normalise and pseudonymise one identifier; cache the sanitised view's
        JSON fragment for it (',"msisdn_cc":"+44","msisdn_pseudonym":"…"').

        One budget bounds the caches of all months together: when it is spent they are
        all cleared (they refill from live traffic), so memory stays flat however many
        months are live. An entry is ~170 bytes: the fragment and the identifier (the key).
        """
        field, checker, gen, prefix, gen_key, pseudonym_key = ident
        norm, general = checker(field, value)
        h = keys.hmac_proto.copy()
        h.update(prefix + norm.encode())
        pseudonym = h.finalize()[:PSEUDONYM_BYTES].hex().encode()
        frag = pseudonym_key + pseudonym + b'"'
        if gen is not None:
            frag = gen_key + dumps(general) + frag
        if self._cached >= self.cache_entries:
            for per_field in self._caches.values():
                for c in per_field.values():
                    c.clear()
            self._cached = 0
        cache[value] = frag
        self._cached += 1
        return frag

    def _event_time(self, et: Any) -> tuple[int, str]:
        """(epoch ms, month) of an event_time: RFC 3339 text or integer epoch millis."""
        te = type(et)
        if te is str:
            s = et
            # RFC 3339 shape first: fromisoformat alone also takes other ISO 8601 forms.
            if (
                len(s) < 20
                or s[4] != "-"
                or s[7] != "-"
                or s[10] not in "Tt"
                or s[13] != ":"
                or s[16] != ":"
                or not s.isascii()
            ):
                raise RecordError("invalid_value", "event_time", _RFC3339)
            try:
                dt = datetime.fromisoformat(s)
            except ValueError:
                raise RecordError("invalid_value", "event_time", _RFC3339) from None
            if dt.tzinfo is None:
                raise RecordError(
                    "invalid_value", "event_time", "expected a Z or an offset such as +01:00"
                )
            try:
                ms = floor(dt.timestamp()) * 1000 + dt.microsecond // 1000
                month = month_of(dt, self.tz)
            except (OverflowError, ValueError):
                # 0001-01-01T00:00:00+01:00 is in year 0 in UTC: outside datetime's range.
                raise RecordError(
                    "invalid_value", "event_time", "event time outside years 1-9999"
                ) from None
            if self.utc and s[-1] == "Z":
                if len(s) in (20, 24) and s[16] == ":":
                    if len(self._minutes) >= _MINUTE_CACHE_ENTRIES:
                        self._minutes.clear()
                    self._minutes[s[:16]] = ms - dt.second * 1000 - dt.microsecond // 1000
                return ms, s[:7]
            return ms, month
        if te is int:
            try:
                return et, month_of_ms(et, self.tz)
            except (ValueError, OverflowError):
                raise RecordError(
                    "invalid_value", "event_time", "epoch milliseconds out of range"
                ) from None
        raise RecordError(
            "wrong_type", "event_time", "expected an RFC 3339 string or integer epoch milliseconds"
        )
