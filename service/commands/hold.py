"""``cdranon hold place|release|list|unseal``: legal holds (docs/retention.md).

File mode (default, or with ``--out DIR``): the registry is ``retention.hold_dir``
(default ``<keystore dir>/holds/`` of a file keystore),
held copies are ``DIR/hold/<ID>.jsonl``. Broker mode (``--config FILE`` or
``$CDRANON_CONFIG``): the registry is the compacted ``cdr.holds`` topic (or the files,
``retention.hold_store = "file"``), held copies are ``cdr.hold.<ID>``. Hold keys always
live in ``retention.hold_dir``, wrapped by the master key.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from service.audit import Auditor, check_free_text
from service.commands.audit import add_audit_flag, open_configured_auditor
from service.commands.common import add_keystore_flag, add_now_flag, keystore_url, now_from
from service.commands.retention import (
    broker_parts,
    hold_directory,
    hold_master_key,
    registry_for,
)
from service.config import CONFIG_ENV, Settings, load_settings
from service.errors import ConfigError, KeystoreError, SealError
from service.holds import (
    FileHoldRegistry,
    Hold,
    HoldRegistry,
    HoldSecrets,
    check_hold_id,
    get_hold,
    hold_id_of_key,
    hold_keys,
    new_hold,
    release,
)
from service.months import identifiers_until, rfc3339, zone
from service.policy import load_policy
from service.retention import FileMonthStore, MonthStore
from service.sealing import Unsealer, blob_key_id


def _mode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=None,
        help="file mode: the `process` output directory that holds DIR/hold/<ID>.jsonl",
    )
    add_keystore_flag(p)
    add_audit_flag(p)  # also --config FILE: broker mode


def register(subparsers: Any) -> None:
    """Add ``hold place``, ``hold release``, ``hold list`` and ``hold unseal``."""
    hold = subparsers.add_parser(
        "hold",
        help="place, release, list legal holds; unseal held records",
        description="Legal holds preserve the sealed records they cover past their "
        "month's deadline, in a separate store under a hold key (docs/retention.md).",
    )
    sub = hold.add_subparsers(dest="hold_command", metavar="ACTION")
    sub.required = True

    place = sub.add_parser("place", help="place a hold (who, why, what it covers)")
    place.add_argument("--id", required=True, dest="hold_id", metavar="ID", help="hold id")
    place.add_argument("--reason", required=True, metavar="TEXT", help="why (a case number)")
    place.add_argument("--by", required=True, metavar="WHO", help="who places it")
    place.add_argument("--month", action="append", default=[], metavar="YYYY-MM")
    place.add_argument("--account", action="append", default=[], metavar="A")
    place.add_argument(
        "--msisdn",
        action="append",
        default=[],
        metavar="N",
        help="a subscriber's number; stored only as a keyed MAC, never in clear",
    )
    _mode_flags(place)
    add_now_flag(place)
    place.set_defaults(func=run_place)

    rel = sub.add_parser("release", help="release a hold: its key and copies are destroyed")
    rel.add_argument("--id", required=True, dest="hold_id", metavar="ID")
    rel.add_argument("--by", required=True, metavar="WHO", help="who releases it")
    rel.add_argument("--reason", default="hold released", metavar="TEXT")
    _mode_flags(rel)
    add_now_flag(rel)
    rel.set_defaults(func=run_release)

    ls = sub.add_parser("list", help="every hold with who, why, when")
    ls.add_argument("--json", action="store_true", help="print JSON")
    _mode_flags(ls)
    ls.set_defaults(func=run_list)

    un = sub.add_parser(
        "unseal", help="print held records with their identifiers restored (audited)"
    )
    un.add_argument("--id", required=True, dest="hold_id", metavar="ID")
    un.add_argument("--input", required=True, metavar="FILE|-", help="held records (JSON Lines)")
    un.add_argument("--reason", required=True, metavar="TEXT", help="why (a case number)")
    un.add_argument("--by", default=None, metavar="WHO", help="who asks (default: the OS user)")
    _mode_flags(un)
    un.set_defaults(func=run_unseal)


@dataclass
class HoldContext:
    """The registry, hold secrets, store of held copies (if known) and audit log."""

    settings: Settings
    registry: HoldRegistry
    secrets: HoldSecrets
    store: MonthStore | None
    auditor: Auditor
    hold_dir: Path

    def close(self) -> None:
        """Close the audit log."""
        self.auditor.close()


def _broker_mode(args: argparse.Namespace) -> bool:
    if args.out is not None:
        if args.config is not None:
            raise ConfigError("give either --out DIR (file mode) or --config FILE (broker mode)")
        return False
    return args.config is not None or bool(os.environ.get(CONFIG_ENV, "").strip())


def open_context(args: argparse.Namespace, *, need_master: bool = True) -> HoldContext:
    """Everything a hold command needs, by mode."""
    settings = load_settings(args.config)
    url = keystore_url(args) if args.keystore else settings.keystore.url
    hdir = hold_directory(settings, url)
    master = hold_master_key(url) if need_master else None
    secrets = HoldSecrets(hdir, master)
    store: MonthStore | None
    if _broker_mode(args):
        policy = load_policy(settings.policy)
        tz = zone(settings.timezone) if settings.timezone else policy.tz
        conf, admin, kstore = broker_parts(
            settings, (policy.max_identifier_months, policy.max_billing_years, tz)
        )
        registry = registry_for(settings, conf, admin, url)
        store = kstore
    else:
        registry = FileHoldRegistry(hdir)
        store = FileMonthStore(args.out) if args.out is not None else None
    target = args.audit
    if target is None and args.out is not None and not settings.audit.target:
        target = f"file://{args.out.absolute()}/audit.jsonl"  # as `process` and `retention`
    auditor = open_configured_auditor(settings, target=target)
    return HoldContext(settings, registry, secrets, store, auditor, hdir)


def run_place(args: argparse.Namespace) -> int:
    """Validate, create the hold key, write the registry entry, audit ``hold.placed``."""
    check_hold_id(args.hold_id)
    check_free_text(args.reason, what="--reason")
    check_free_text(args.by, what="--by")
    ctx = open_context(args)
    try:
        if get_hold(ctx.registry, args.hold_id) is not None:
            raise ConfigError(f"hold {args.hold_id} exists already: hold ids are never reused")
        hold = new_hold(
            hold_id=args.hold_id,
            reason=args.reason,
            placed_by=args.by,
            placed_at=now_from(args),
            months=args.month,
            accounts=args.account,
            msisdns=args.msisdn,
            registry_secret=ctx.secrets.registry_secret() if args.msisdn else None,
        )
        ctx.secrets.create(hold.hold_id)
        ctx.registry.put(hold)
        ctx.auditor.record(
            "hold.placed",
            actor=hold.placed_by,
            reason=hold.reason,
            hold_id=hold.hold_id,
            months=list(hold.months),
            accounts=len(hold.accounts),
            msisdns=len(hold.msisdn_macs),
        )
    finally:
        ctx.close()
    print(
        f"placed hold {hold.hold_id}: {len(hold.months)} month(s), {len(hold.accounts)} "
        f"account(s), {len(hold.msisdn_macs)} MSISDN(s); covered records are copied at "
        "their month's deadline"
    )
    return 0


def _original_deadline(hold: Hold, settings: Settings) -> Any:
    policy = load_policy(settings.policy)
    tz = zone(settings.timezone) if settings.timezone else policy.tz
    months = list(hold.months) + [kid.split("/")[0] for kid in hold.copied]
    if not months:
        return None
    return max(identifiers_until(m, policy.max_identifier_months, tz) for m in months)


def run_release(args: argparse.Namespace) -> int:
    """Release: audit, destroy the hold key and its copies (now, or at the original deadline)."""
    check_free_text(args.reason, what="--reason")
    ctx = open_context(args, need_master=False)
    now = now_from(args)
    try:
        hold = get_hold(ctx.registry, check_hold_id(args.hold_id))
        if hold is None:
            raise ConfigError(f"no hold {args.hold_id}: see `cdranon hold list`")
        destroy_after = now
        if ctx.settings.retention.release_at_original_deadline:
            original = _original_deadline(hold, ctx.settings)
            if original is not None:
                destroy_after = max(now, original)
        released = release(hold, by=args.by, now=now, destroy_after=destroy_after)
        ctx.registry.put(released)
        ctx.auditor.record(
            "hold.released",
            actor=released.released_by or args.by,
            reason=args.reason,
            hold_id=hold.hold_id,
            destroy_after=released.destroy_after,
        )
        if destroy_after > now:
            print(
                f"released hold {hold.hold_id}; its key and copies are destroyed at "
                f"{rfc3339(destroy_after)} by the retention pass"
            )
            return 0
        existed = ctx.secrets.destroy(hold.hold_id)
        ctx.auditor.record(
            "key.destroyed",
            actor=args.by,
            reason="hold released",
            key_id=f"hold/{hold.hold_id}",
            existed=existed,
        )
        deleted = None
        if ctx.store is not None:
            deleted = ctx.store.delete_hold(hold.hold_id)
            if deleted is not None:
                ctx.auditor.record(
                    f"{ctx.store.kind}.deleted",
                    actor=args.by,
                    reason="hold released",
                    hold_id=hold.hold_id,
                    name=deleted,
                )
            ctx.registry.put(replace(released, destroyed_at=rfc3339(now)))
    finally:
        ctx.close()
    where = f"; deleted {deleted}" if deleted else ""
    later = "" if ctx.store is not None else "; its copies are deleted by the next retention pass"
    print(f"released hold {hold.hold_id}: hold key destroyed{where}{later}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Every hold: id, state, who, why, when, what (MSISDNs as a count)."""
    ctx = open_context(args, need_master=False)
    try:
        holds = [h.summary() for h in ctx.registry.list()]
    finally:
        ctx.close()
    if args.json:
        print(json.dumps(holds, indent=2))
        return 0
    if not holds:
        print("no holds")
        return 0
    for h in holds:
        what = ", ".join(
            p
            for p in (
                f"months {','.join(h['months'])}" if h["months"] else "",
                f"accounts {','.join(h['accounts'])}" if h["accounts"] else "",
                f"{h['msisdns']} msisdn(s)" if h["msisdns"] else "",
            )
            if p
        )
        print(
            f"{h['hold_id']}  {h['state']}  placed {h['placed_at']} by {h['placed_by']}: "
            f"{h['reason']}"
        )
        print(f"    covers {what}; {h['records_held']} record(s) held")
        if h["released_at"]:
            print(f"    released {h['released_at']} by {h['released_by']}")
    return 0


def run_unseal(args: argparse.Namespace) -> int:
    """Restore the identifiers of held records (audited as ``unseal``)."""
    hold_id = check_hold_id(args.hold_id)
    check_free_text(args.reason, what="--reason")
    who = args.by or getpass.getuser()
    ctx = open_context(args)
    try:
        if args.input == "-":
            lines = sys.stdin.buffer.read().splitlines()
        else:
            try:
                lines = Path(args.input).read_bytes().splitlines()
            except OSError as exc:
                raise ConfigError(f"cannot read --input {args.input}: {exc.strerror}") from exc
        out: list[bytes] = []
        failed = 0
        unsealers: dict[str, Unsealer] = {}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
                if not isinstance(rec, dict) or "sealed" not in rec:
                    raise SealError("not a sealed record")
                kid = blob_key_id(rec["sealed"])
                which = hold_id_of_key(kid)
                if which is None or which[0] != hold_id:
                    raise SealError(f"not sealed under hold {hold_id}")
                u = unsealers.get(kid)
                if u is None:
                    secret = ctx.secrets.get(hold_id)
                    u = unsealers[kid] = Unsealer(hold_keys(hold_id, secret, which[1]))
                rec.update(u.unseal(rec.pop("sealed"), str(rec.get("cdr_id"))))
            except (SealError, KeystoreError, orjson.JSONDecodeError) as exc:
                failed += 1
                msg = "not valid JSON" if isinstance(exc, orjson.JSONDecodeError) else str(exc)
                print(f"cdranon: line {n}: {msg}", file=sys.stderr)
                continue
            out.append(orjson.dumps(rec))
        # Audited before anything is printed: no unaudited read of identifiers.
        ctx.auditor.record(
            "unseal",
            actor=who,
            reason=args.reason,
            key_ids=sorted(unsealers),
            hold_id=hold_id,
            records=len(out),
            failed=failed,
        )
    finally:
        ctx.close()
    sys.stdout.buffer.write(b"".join(r + b"\n" for r in out))
    sys.stdout.flush()
    if failed:
        print(f"cdranon: {failed} record(s) could not be unsealed", file=sys.stderr)
        return 1
    return 0
