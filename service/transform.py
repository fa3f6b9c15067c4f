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

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from math import floor
from typing import Any

import orjson

from service.errors import KeyDestroyedError, RecordError
from service.fields import BILLING_CHECKS, EXPECTED_TYPE
from service.identifiers import checker_for, general_field
from service.keyring import Keyring
from service.keystore.base import key_id
from service.monthkeys import MonthKeys
from service.months import billing_until, identifiers_until, month_of, month_of_ms, to_ms
from service.outputs import BatchResult, OutRecord, Rejected
from service.policy import Policy, RetentionClass
from service.pseudonyms import PSEUDONYM_BYTES
from service.sealing import BatchSealer

MAX_RECORD_BYTES = 1 << 20
# Per month key and identifier kind; cleared when full (identifiers repeat a lot, a
# cleared cache refills in seconds). Bounded so memory stays flat on any stream.
PSEUDONYM_CACHE_ENTRIES = 1 << 18
_CDR_ID_MAX = 128

STRIP_PAST_DEADLINE = "past_identifier_deadline"
STRIP_KEY_DESTROYED = "key_destroyed"

_BILLING = 0
_IDENT = 1


@dataclass(slots=True)
class _MonthCtx:
    """Per-batch state of one (month, retention class)."""

    month: str
    kid: str | None  # None when the identifiers are stripped
    strip_reason: str | None
    billing_until_ms: int
    sealer: BatchSealer | None
    keys: MonthKeys | None


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
    ) -> None:
        self.policy = policy
        self.keyring = keyring
        self.tz = tz if tz is not None else policy.tz
        self.utc = self.tz is UTC
        tol = policy.future_tolerance_seconds if future_tolerance_s is None else future_tolerance_s
        self.future_tolerance_ms = tol * 1000
        self.max_record_bytes = max_record_bytes
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
        self._general_fields = tuple(
            g for (c, _, _, g) in self._spec.values() if c == _IDENT and g is not None
        )

    # -- per-batch month contexts -------------------------------------------------------

    def _ctx(self, month: str, rclass: RetentionClass, now_ms: int) -> _MonthCtx:
        tz = self.tz
        bill_ms = to_ms(billing_until(month, rclass.billing_years, tz))
        if now_ms >= to_ms(identifiers_until(month, rclass.identifier_months, tz)):
            # Past the identifier deadline: never a key for this month (RETENTION-RULES).
            return _MonthCtx(month, None, STRIP_PAST_DEADLINE, bill_ms, None, None)
        kid = key_id(month, rclass.name)
        try:
            keys = self.keyring.get(kid)
        except KeyDestroyedError:
            # Destroyed early (by an operator): its identifiers can only be stripped.
            return _MonthCtx(month, None, STRIP_KEY_DESTROYED, bill_ms, None, None)
        return _MonthCtx(month, kid, None, bill_ms, BatchSealer(keys), keys)

    # -- the batch ----------------------------------------------------------------------

    def transform(self, values: Sequence[bytes], now_ms: int) -> BatchResult:
        """Transform one batch. ``now_ms`` decides which deadlines have passed.

        May raise KeystoreUnavailableError (nothing is returned then; the caller retries
        the whole batch). Every other problem is a per-record rejection.
        """
        result = BatchResult()
        rejected = result.rejected
        ctxs: dict[tuple[str, str], _MonthCtx] = {}
        for index, raw in enumerate(values):
            try:
                self._one(index, raw, now_ms, ctxs, result)
            except RecordError as err:
                rejected.append(Rejected(index, err.reason, err.field, str(err), bytes(raw)))
        for ctx in ctxs.values():
            if ctx.kid is not None:
                result.months.add(ctx.kid)
        return result

    def _one(  # noqa: PLR0912, PLR0915  # the hot path, kept inline on purpose
        self,
        index: int,
        raw: bytes,
        now_ms: int,
        ctxs: dict[tuple[str, str], _MonthCtx],
        result: BatchResult,
    ) -> None:
        if len(raw) > self.max_record_bytes:
            raise RecordError(
                "too_large",
                None,
                f"record of {len(raw)} bytes; the limit is {self.max_record_bytes}",
            )
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            # orjson's messages describe the syntax error, never quote the document.
            raise RecordError("invalid_json", None, f"{exc.msg} at character {exc.pos}") from None
        if type(rec) is not dict:
            raise RecordError("not_an_object", None, "expected one JSON object per record")

        spec = self._spec
        san: dict[str, object] = {}
        idents: list[tuple[str, Any, str, str | None, Any]] = []
        for k, v in rec.items():
            s = spec.get(k)
            if s is None:
                continue  # allow-list: a field the policy does not name is dropped
            cls, a, b, gen = s
            if cls == _BILLING:
                if a is not None and type(v) not in a:
                    raise RecordError("wrong_type", k, f"expected {EXPECTED_TYPE[a]}")
                if b is not None and v is not None:
                    b(k, v)
                san[k] = v
            elif v is not None:
                idents.append((k, a, b, gen, v))

        cdr_id = san.get("cdr_id")
        if cdr_id is None:
            raise RecordError("missing_field", "cdr_id", "every CDR needs a cdr_id string")
        if type(cdr_id) is not str or len(cdr_id) > _CDR_ID_MAX:
            raise RecordError("invalid_value", "cdr_id", f"expected 1-{_CDR_ID_MAX} characters")
        account = san.get("account_id")
        if account is None:
            raise RecordError("missing_field", "account_id", "every CDR needs an account_id")
        et = san.get("event_time")
        if et is None:
            raise RecordError("missing_field", "event_time", "every CDR needs an event_time")
        event_ms, month = self._event_time(et)

        rclass = self.policy.class_for(san.get("country"))
        ck = (month, rclass.name)
        ctx = ctxs.get(ck)
        if ctx is None:
            ctx = ctxs[ck] = self._ctx(month, rclass, now_ms)
        if event_ms > now_ms + self.future_tolerance_ms:
            raise RecordError(
                "too_far_in_future", "event_time", "event time is later than now plus the tolerance"
            )
        if now_ms >= ctx.billing_until_ms:
            raise RecordError(
                "past_billing_deadline", "event_time", f"billing deadline of {month} has passed"
            )

        key = account.encode() if type(account) is str else str(account).encode()
        out = dict(san)  # the sanitised view; san becomes the sealed view
        out["month"] = month
        out["key_id"] = ctx.kid
        for g in self._general_fields:
            out[g] = None
        keys = ctx.keys
        if keys is not None:
            cache = keys.pseudonym_cache
            proto = keys.hmac_proto
            sealed_ids: dict[str, object] = {}
            for field, checker, kind, gen, value in idents:
                kc = cache.get(kind)
                if kc is None:
                    kc = cache[kind] = {}
                hit = kc.get(value) if type(value) is str else None
                if hit is None:
                    norm, general = checker(field, value)
                    h = proto.copy()
                    h.update(kind.encode() + b"\x00" + norm.encode())
                    hit = (h.finalize()[:PSEUDONYM_BYTES].hex(), general)
                    if len(kc) >= PSEUDONYM_CACHE_ENTRIES:
                        kc.clear()
                    kc[value] = hit
                out[field + "_pseudonym"] = hit[0]
                if gen is not None:
                    out[gen] = hit[1]
                sealed_ids[field] = value
            sealer = ctx.sealer
            assert sealer is not None  # set together with keys
            san["month"] = month
            san["key_id"] = ctx.kid
            san["sealed"] = sealer.seal(sealed_ids, cdr_id)
            result.sealed.append(OutRecord(index, month, key, event_ms, orjson.dumps(san)))
        else:
            # Stripped: identifiers checked (a malformed one is still a rejection, so the
            # outcome does not depend on the date) but only generalised parts are kept.
            for field, checker, _kind, gen, value in idents:
                _norm, general = checker(field, value)
                if gen is not None:
                    out[gen] = general
            reason = ctx.strip_reason or STRIP_PAST_DEADLINE
            result.stripped += 1
            result.stripped_reasons[reason] = result.stripped_reasons.get(reason, 0) + 1
        result.sanitised.append(OutRecord(index, month, key, event_ms, orjson.dumps(out)))

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
                raise RecordError(
                    "invalid_value", "event_time", "expected RFC 3339 (2025-11-30T23:59:59Z)"
                )
            try:
                dt = datetime.fromisoformat(s)
            except ValueError:
                raise RecordError(
                    "invalid_value", "event_time", "expected RFC 3339 (2025-11-30T23:59:59Z)"
                ) from None
            if dt.tzinfo is None:
                raise RecordError(
                    "invalid_value", "event_time", "expected a Z or an offset such as +01:00"
                )
            ms = floor(dt.timestamp()) * 1000 + dt.microsecond // 1000
            if self.utc and s[-1] in "Zz":
                return ms, s[:7]
            return ms, month_of(dt, self.tz)
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
