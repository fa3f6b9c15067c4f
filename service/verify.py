"""Verification of retained records against the signed Merkle roots ("original form").

Pure functions: the caller reads a month's sanitised records (a topic's partitions or a
month file) and the ``integrity.root`` events of an audit log whose chain and signatures
``service.audit.verify`` has already checked. Each root covers one range of positions
(Kafka offsets, or line numbers of a month file) of one stream; the records in that range,
in position order, must hash to it.

Findings, per record where it can be pinned, per range where it cannot:
- ``altered``: a record's billing fields no longer hash to its ``billing_digest``;
- ``missing`` / ``extra``: fewer / more records in a range than its root covers;
- ``mismatch``: same count, every record self-consistent, yet the root differs: records
  reordered, moved, or replaced together with their digests (the signed root catches
  all of these; a record moved to another stream shows as missing here, extra there);
- ``unproven``: a record in no signed range (inserted, or written after the last root);
- ``duplicate``: the same cdr_id twice in one stream.
"""

from __future__ import annotations

import multiprocessing as mp
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

import orjson
from orjson import OPT_SORT_KEYS, JSONDecodeError, dumps, loads

from service.integrity import DIGEST_FIELD, billing_part
from service.merkle import LEAF, inclusion_proof, root, root_from_leaf_hashes


@dataclass(frozen=True, slots=True)
class RootEvent:
    """One signed ``integrity.root``: the tree over ``size`` records of ``stream`` at
    positions ``first`` ... ``last`` (inclusive)."""

    stream: str  # "topic/partition" or a month file's name
    first: int
    last: int
    size: int
    root: str  # hex
    writer: str = ""
    seq: int = 0
    # Stream processor roots name a batch instead of a position range: each record
    # carries its leaf ("<batch>/<index>") in a header, since concurrent writers may
    # interleave in one partition.
    batch: str | None = None

    @classmethod
    def from_event(cls, ev: Mapping[str, Any]) -> RootEvent:
        d = ev["details"]
        return cls(
            stream=str(d["stream"]),
            first=int(d.get("first", -1)),
            last=int(d.get("last", -1)),
            size=int(d["size"]),
            root=str(d["root"]),
            writer=str(ev.get("writer", "")),
            seq=int(ev.get("seq", 0)),
            batch=str(d["batch"]) if "batch" in d else None,
        )


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    stream: str
    position: int | None  # the record's offset or line, when one record is at fault
    cdr_id: str | None
    detail: str


@dataclass
class Report:
    records: int = 0
    proven: int = 0
    ranges: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings and self.records == self.proven


def root_event_details(
    stream: str, first: int, last: int, digests: Sequence[str]
) -> dict[str, Any]:
    """The details of the ``integrity.root`` event a writer records for one range."""
    return {
        "stream": stream,
        "first": first,
        "last": last,
        "size": len(digests),
        "root": root([bytes.fromhex(d) for d in digests]).hex(),
    }


_Leaf = tuple[bytes | None, str | None, bool]
_CHUNK = 25_000
_ALTERED = "billing fields do not match billing_digest"
_UNPROVEN = "record is in no signed range"


def _leaf(value: bytes, added: frozenset[str]) -> _Leaf:
    """(recomputed digest, cdr_id, self-consistent) of one sanitised record; the digest as
    32 bytes (None if the value is not a JSON object)."""
    try:
        doc = loads(value)
    except JSONDecodeError:
        return None, None, False
    if type(doc) is not dict:
        return None, None, False
    stated = doc.get(DIGEST_FIELD)
    # In place, with a C-level set intersection: this runs once per record of a month.
    for k in added & doc.keys():
        del doc[k]
    h = sha256(dumps(doc, option=OPT_SORT_KEYS))
    cdr_id = doc.get("cdr_id")
    return h.digest(), cdr_id if type(cdr_id) is str else None, stated == h.hexdigest()


def _leaf_chunk(values: list[bytes], added: frozenset[str]) -> list[_Leaf]:
    return [_leaf(v, added) for v in values]


# The month being verified, set before the worker processes are forked: they inherit it
# (copy on write) instead of receiving it pickled, which cost more than the work itself.
_SHARED: tuple[list[bytes], frozenset[str]] | None = None


def _leaf_range(bounds: tuple[int, int]) -> tuple[bytes, bytes, list[str | None]]:
    """Leaves of ``_SHARED[lo:hi]`` in a compact form for the trip back: the digests
    concatenated (32 zero bytes where none), one status byte each (0 altered, 1 ok,
    2 not a JSON object), the cdr_ids."""
    assert _SHARED is not None
    values, added = _SHARED
    lo, hi = bounds
    digests = bytearray()
    status = bytearray()
    ids: list[str | None] = []
    for v in values[lo:hi]:
        d, cid, ok = _leaf(v, added)
        digests += d if d is not None else bytes(32)
        status.append(2 if d is None else int(ok))
        ids.append(cid)
    return bytes(digests), bytes(status), ids


def leaves_of(values: list[bytes], added: frozenset[str], jobs: int = 1) -> list[_Leaf]:
    """:func:`_leaf` of every value, on ``jobs`` forked processes for large months (the
    work is parsing and hashing, CPU-bound: processes, not threads)."""
    global _SHARED  # noqa: PLW0603 - handed to the forked workers, see above
    if jobs <= 1 or len(values) < 2 * _CHUNK or "fork" not in mp.get_all_start_methods():
        return _leaf_chunk(values, added)
    _SHARED = (values, added)
    try:
        step = -(-len(values) // jobs)
        bounds = [(i, min(i + step, len(values))) for i in range(0, len(values), step)]
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as pool:
            parts = list(pool.map(_leaf_range, bounds))
    finally:
        _SHARED = None
    out: list[_Leaf] = []
    for digests, status, ids in parts:
        out += [
            (None, cid, False) if st == 2 else (digests[32 * i : 32 * i + 32], cid, st == 1)
            for i, (st, cid) in enumerate(zip(status, ids, strict=True))
        ]
    return out


def _duplicates(stream: str, ids: Iterable[str | None]) -> list[Finding]:
    """A finding per cdr_id seen more than once (the common case, none, costs one set)."""
    listed = [i for i in ids if i is not None]
    if len(set(listed)) == len(listed):
        return []
    return [
        Finding("duplicate", stream, None, cid, f"cdr_id appears {n} times")
        for cid, n in Counter(listed).items()
        if n > 1
    ]


def verify_stream(
    stream: str,
    records: Iterable[tuple[int, bytes]],
    roots: Iterable[RootEvent],
    added: frozenset[str],
    *,
    jobs: int = 1,
) -> Report:
    """Check one stream's records (position, value) against the roots that cover it."""
    rep = Report()
    recs = sorted(records)
    n = rep.records = len(recs)
    positions = [p for p, _ in recs]
    computed = leaves_of([v for _, v in recs], added, jobs)
    rep.findings += [
        Finding(
            "altered", stream, positions[i], leaf[1], "billing fields do not match billing_digest"
        )
        for i, leaf in enumerate(computed)
        if not leaf[2]
    ]
    rep.findings += _duplicates(stream, [leaf[1] for leaf in computed])

    covered = bytearray(n)  # 1 where a record lies in some signed range
    for ev in sorted(roots, key=lambda e: e.first):
        rep.ranges += 1
        # positions is sorted: a range is a slice of indexes (bisect, not a scan per root).
        lo, hi = bisect_left(positions, ev.first), bisect_right(positions, ev.last)
        covered[lo:hi] = b"\x01" * (hi - lo)
        finding = _check_range(stream, ev, positions[lo:hi], computed[lo:hi])
        if finding is None:
            rep.proven += hi - lo
        elif finding.kind:
            rep.findings.append(finding)
    if covered.count(0):
        rep.findings += [
            Finding(
                "unproven", stream, positions[i], computed[i][1], "record is in no signed range"
            )
            for i in range(n)
            if not covered[i]
        ]
    return rep


def _check_range(
    stream: str, ev: RootEvent, inside: list[int], leaves: list[_Leaf]
) -> Finding | None:
    """None if the range proves out; a Finding (kind "" = already explained) if not.
    ``inside``: the positions in the range, ``leaves``: their leaves, in order."""
    where = f"positions {ev.first}-{ev.last}"
    if len(inside) < ev.size:
        n = ev.size - len(inside)
        return Finding("missing", stream, None, None, f"{n} record(s) missing at {where}")
    if len(inside) > ev.size:
        n = len(inside) - ev.size
        return Finding("extra", stream, None, None, f"{n} record(s) too many at {where}")
    if not all(leaf[2] for leaf in leaves):
        # Altered records explain a mismatch and are reported one by one already.
        return Finding("", stream, None, None, "")
    if _root_hex([leaf[0] for leaf in leaves]) == ev.root:
        return None
    return Finding(
        "mismatch",
        stream,
        None,
        None,
        f"records at {where} do not hash to the signed root (replaced or reordered records)",
    )


def _root_hex(digests: list[bytes | None]) -> str:
    """The RFC 6962 root over record digests (all present: self-consistent leaves), hex.
    The leaf hashing is inlined: this runs once per record of a month."""
    return root_from_leaf_hashes([sha256(LEAF + d).digest() for d in digests if d]).hex()


TaggedRecord = tuple[str, int, bytes, tuple[str, int] | None]  # partition, offset, value, leaf


def verify_batches(
    stream: str, records: Iterable[TaggedRecord], roots: Iterable[RootEvent], added: frozenset[str]
) -> Report:
    """Check a topic's records, tagged with their leaf (batch, index), against batch roots."""
    rep = Report()
    by_batch: dict[str, dict[int, list[tuple[str, int]]]] = {}
    leaves: dict[tuple[str, int], _Leaf] = {}
    untagged: list[tuple[str, int]] = []
    for part, off, value, leaf in records:
        rep.records += 1
        info = leaves[(part, off)] = _leaf(value, added)
        if not info[2]:
            detail = f"partition {part}: billing fields do not match billing_digest"
            rep.findings.append(Finding("altered", stream, off, info[1], detail))
        if leaf is None:
            untagged.append((part, off))
        else:
            by_batch.setdefault(leaf[0], {}).setdefault(leaf[1], []).append((part, off))
    rep.findings += _duplicates(stream, [i[1] for i in leaves.values()])
    known = set()
    for ev in roots:
        if ev.batch is None:
            continue
        known.add(ev.batch)
        rep.ranges += 1
        finding = _check_batch(stream, ev, by_batch.get(ev.batch, {}), leaves)
        if finding is None:
            rep.proven += ev.size
        elif finding.kind:
            rep.findings.append(finding)
    for batch, slots in by_batch.items():
        if batch not in known:
            untagged += [po for v in slots.values() for po in v]
    for part, off in untagged:
        detail = f"partition {part}: in no signed batch"
        rep.findings.append(Finding("unproven", stream, off, leaves[(part, off)][1], detail))
    return rep


def _check_batch(
    stream: str,
    ev: RootEvent,
    slots: Mapping[int, list[tuple[str, int]]],
    leaves: Mapping[tuple[str, int], _Leaf],
) -> Finding | None:
    """None if the batch proves out; a Finding (kind "" = already explained) if not."""
    where = f"batch {ev.batch}"
    present = sum(1 for i in range(ev.size) if i in slots)
    extra = sum(len(v) for i, v in slots.items() if not 0 <= i < ev.size)
    extra += sum(len(v) - 1 for v in slots.values() if len(v) > 1)
    if present < ev.size:
        n = ev.size - present
        return Finding("missing", stream, None, None, f"{n} record(s) missing from {where}")
    if extra:
        return Finding("extra", stream, None, None, f"{extra} record(s) too many in {where}")
    infos = [leaves[slots[i][0]] for i in range(ev.size)]
    if any(not i[2] for i in infos):
        return Finding("", stream, None, None, "")  # reported as altered
    if _root_hex([i[0] for i in infos]) == ev.root:
        return None
    detail = f"records of {where} do not hash to the signed root (replaced or reordered)"
    return Finding("mismatch", stream, None, None, detail)


def proof_for(
    cdr_id: str,
    stream: str,
    records: Iterable[tuple[int, bytes]],
    roots: Iterable[RootEvent],
    added: frozenset[str],
) -> dict[str, Any] | None:
    """An inclusion proof a third party can check: the record's canonical billing fields,
    its leaf index in the range's tree, the audit path and the signed root's range."""
    recs = sorted(records)
    for ev in roots:
        inside = [(p, v) for p, v in recs if ev.first <= p <= ev.last]
        for i, (pos, value) in enumerate(inside):
            doc = orjson.loads(value)
            if doc.get("cdr_id") != cdr_id:
                continue
            digests = [_leaf(v, added)[0] or bytes(32) for _, v in inside]
            billing = billing_part(doc, added)
            return {
                "cdr_id": cdr_id,
                "stream": stream,
                "position": pos,
                "billing": billing,
                "billing_digest": digests[i].hex(),
                "leaf_index": i,
                "tree_size": len(inside),
                "proof": [h.hex() for h in inclusion_proof(i, digests)],
                "root": ev.root,
                "range": {"first": ev.first, "last": ev.last},
                "audit_event": {"writer": ev.writer, "seq": ev.seq},
            }
    return None


def proof_for_batch(
    cdr_id: str,
    stream: str,
    records: Iterable[TaggedRecord],
    roots: Iterable[RootEvent],
    added: frozenset[str],
) -> dict[str, Any] | None:
    """:func:`proof_for` for a topic whose records carry leaf tags."""
    recs = list(records)
    target = None
    for part, off, value, leaf in recs:
        if leaf is not None and orjson.loads(value).get("cdr_id") == cdr_id:
            target = (part, off, value, leaf)
            break
    if target is None:
        return None
    part, off, value, (batch, index) = target
    for ev in roots:
        if ev.batch != batch:
            continue
        members = {lf[1]: v for _, _, v, lf in recs if lf is not None and lf[0] == batch}
        if sorted(members) != list(range(ev.size)):
            return None
        digests = [_leaf(members[i], added)[0] or bytes(32) for i in range(ev.size)]
        doc = orjson.loads(value)
        return {
            "cdr_id": cdr_id,
            "stream": stream,
            "position": {"partition": part, "offset": off},
            "billing": billing_part(doc, added),
            "billing_digest": digests[index].hex(),
            "leaf_index": index,
            "tree_size": ev.size,
            "proof": [h.hex() for h in inclusion_proof(index, digests)],
            "root": ev.root,
            "batch": batch,
            "audit_event": {"writer": ev.writer, "seq": ev.seq},
        }
    return None
