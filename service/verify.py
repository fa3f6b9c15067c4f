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
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from itertools import accumulate, chain, pairwise
from operator import itemgetter
from typing import Any

import orjson
from orjson import OPT_SORT_KEYS, JSONDecodeError, JSONEncodeError, dumps, loads

from service.integrity import DIGEST_FIELD, billing_part
from service.jsonkeys import has_duplicate_keys
from service.merkle import (
    inclusion_proof,
    leaf_hashes,
    root_from_leaf_hashes,
    root_of_hex_digests,
    verify_inclusion,
)
from service.native import native_digests


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
        "root": root_of_hex_digests(digests).hex(),
    }


_Leaf = tuple[bytes | None, str | None, bool]
_ALTERED = "billing fields do not match billing_digest"
_REPEATS = "record repeats a key: it reads two ways"
_UNPROVEN = "record is in no signed range"
# Status byte of a record in the columnar form below.
_BAD, _OK, _NOT_OBJECT, _REPEATED = 0, 1, 2, 3
# The native path's status for a record it leaves to the Python path.
_DECLINED = 255
_DECLINED_B = bytes((_DECLINED,))
_DIGEST_FIELD = DIGEST_FIELD.encode()


def _leaf(value: bytes, added: frozenset[str]) -> _Leaf:
    """(recomputed digest, cdr_id, self-consistent) of one sanitised record; the digest as
    32 bytes (None if the value is not a JSON object). The reference for :class:`_Columns`,
    and what the per-record paths (batches, proofs) use."""
    try:
        doc = loads(value)
    except JSONDecodeError:
        return None, None, False
    if type(doc) is not dict:
        return None, None, False
    stated = doc.get(DIGEST_FIELD)
    # A key twice: another parser may read the first, where the digest covers the last.
    # The service never writes one, so the record was altered.
    unique = dumps(doc) == value or not has_duplicate_keys(value, len(doc))
    for k in added & doc.keys():
        del doc[k]
    h = sha256(dumps(doc, option=OPT_SORT_KEYS))
    cdr_id = doc.get("cdr_id")
    return h.digest(), cdr_id if type(cdr_id) is str else None, unique and stated == h.hexdigest()


_NO_DIGEST = bytes(32)


class _Columns:
    """:func:`_leaf` of a run of records, as columns: ``digests`` (32 bytes each,
    ``_NO_DIGEST`` where the value is not a JSON object), ``leaves`` (their RFC 6962 leaf
    hashes), ``status`` (one byte per record: ``_OK``, ``_BAD`` altered, ``_NOT_OBJECT``)
    and ``ids`` (cdr_id, None where absent or not a string)."""

    __slots__ = ("digests", "ids", "leaves", "status")

    def __init__(self) -> None:
        self.digests: list[bytes] = []
        self.leaves: list[bytes] = []
        self.status = bytearray()
        self.ids: list[str | None] = []

    def add(self, values: Sequence[bytes | memoryview], added: frozenset[str]) -> None:
        """:func:`_leaf` of each value: by the native path (service/_native.c) where built,
        which hands the records it does not take (not plain printable-ASCII flat objects,
        a repeated key, ...) back to :meth:`add_python`."""
        native = native_digests()
        if native is None:
            self.add_python(values, added)
            return
        names = tuple(sorted(k.encode() for k in added))
        digests, leaves, got, ids = native(values, names, _DIGEST_FIELD)
        status = bytearray(got)
        if _DECLINED_B in got:
            declined = [i for i, st in enumerate(got) if st == _DECLINED]
            rest = _Columns()
            rest.add_python([values[i] for i in declined], added)
            for j, i in enumerate(declined):
                digests[i] = rest.digests[j]
                leaves[i] = rest.leaves[j]
                status[i] = rest.status[j]
                ids[i] = rest.ids[j]
        self.digests += digests
        self.leaves += leaves
        self.status += status
        self.ids += ids

    def add_python(self, values: Sequence[bytes | memoryview], added: frozenset[str]) -> None:
        """:func:`_leaf` of each value, inlined. One record at a time through every step:
        parsing a run of records first and hashing them after was slower (measured), the
        parsed dicts no longer in the CPU caches when dumped again."""
        digests, status, ids = self.digests, self.status, self.ids
        # The added keys to delete, per distinct key sequence ("shape") of a record: a
        # month has a handful, and a tuple of the keys and a lookup cost less than the set
        # intersection per record. Bounded by the number of records, freed on return.
        plans: dict[tuple[str, ...], tuple[str, ...]] = {}
        for value in values:
            try:
                doc = loads(value)
            except JSONDecodeError:
                doc = None
            if type(doc) is not dict:
                digests.append(_NO_DIGEST)
                status.append(_NOT_OBJECT)
                ids.append(None)
                continue
            stated = doc.get(DIGEST_FIELD)
            # A key twice: see _leaf. A record that is exactly orjson's encoding of what it
            # parses to repeats no key; the scans of jsonkeys.surely_unique cost more
            # (measured: 5 us a record against 1).
            unique = dumps(doc) == value or not has_duplicate_keys(bytes(value), len(doc))
            shape = tuple(doc)
            drop = plans.get(shape)
            if drop is None:
                drop = plans[shape] = tuple(k for k in shape if k in added)
            for k in drop:
                del doc[k]
            d = sha256(dumps(doc, option=OPT_SORT_KEYS)).digest()
            digests.append(d)
            # One finalisation, then hex (what hexdigest does); a non-str stated is unequal.
            status.append((stated == d.hex()) if unique else _REPEATED)
            cdr_id = doc.get("cdr_id")
            ids.append(cdr_id if type(cdr_id) is str else None)
        # The leaf hash does not depend on the range: hashed here, in the worker when forked.
        self.leaves += leaf_hashes(digests[len(self.leaves) :])

    def as_leaves(self) -> list[_Leaf]:
        return [
            (None, cid, False) if st == _NOT_OBJECT else (d, cid, st == _OK)
            for d, st, cid in zip(self.digests, self.status, self.ids, strict=True)
        ]


def _columns_of_blob(
    blob: bytes, ends: bytes, added: frozenset[str]
) -> tuple[bytes, bytes, bytes, list[str | None]]:
    """:class:`_Columns` of a share of records sent as one buffer (``blob``: the values
    concatenated, ``ends``: their end offsets as unsigned 64-bit integers), in a compact
    form for the trip back: digests and leaf hashes concatenated, status bytes, cdr_ids.
    The values are views into the buffer (orjson parses a memoryview without a copy)."""
    offsets = array("Q")
    offsets.frombytes(ends)
    view = memoryview(blob)
    cols = _Columns()
    cols.add([view[a:b] for a, b in pairwise(chain((0,), offsets))], added)
    return b"".join(cols.digests), b"".join(cols.leaves), bytes(cols.status), cols.ids


def _packed(values: list[bytes]) -> tuple[bytes, bytes]:
    """A worker's share as :func:`_columns_of_blob` takes it: the values concatenated, and
    their end offsets as unsigned 64-bit integers."""
    return b"".join(values), array("Q", accumulate(map(len, values))).tobytes()


# Below this many records per process a worker costs more than it saves.
_MIN_SHARE = 25_000


def _split32(joined: bytes) -> list[bytes]:
    return [joined[i : i + 32] for i in range(0, len(joined), 32)]


def _columns(values: list[bytes], added: frozenset[str], jobs: int) -> _Columns:
    """:class:`_Columns` of every value, on ``jobs`` processes for large months (the work
    is parsing and hashing, CPU-bound: processes, not threads). This process takes the
    first share itself: with N workers it would only wait, and a 2-core machine would pay
    a worker for nothing.

    The workers come from a fork server (a small process started for them), and each gets
    its share as one buffer. Forking this process instead, with the month in memory, was
    slower than one job (measured: 20.7 s against 13.2 s for 1M records): after a fork
    every reference count touched copies its page, in the worker and in this process
    alike, and the fork itself copies the page tables of the whole month.
    """
    out = _Columns()
    if jobs <= 1 or len(values) < 2 * _MIN_SHARE or "forkserver" not in mp.get_all_start_methods():
        out.add(values, added)
        return out
    step = -(-len(values) // jobs)
    bounds = [(i, min(i + step, len(values))) for i in range(0, len(values), step)]
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["service.verify"])
    with ProcessPoolExecutor(len(bounds) - 1, mp_context=ctx) as pool:
        futures = [
            pool.submit(_columns_of_blob, *_packed(values[lo:hi]), added) for lo, hi in bounds[1:]
        ]
        out.add(values[bounds[0][0] : bounds[0][1]], added)
        parts = [f.result() for f in futures]
    for digests, leaves, status, ids in parts:
        out.digests += _split32(digests)
        out.leaves += _split32(leaves)
        out.status += status
        out.ids += ids
    return out


def leaves_of(values: list[bytes], added: frozenset[str], jobs: int = 1) -> list[_Leaf]:
    """:func:`_leaf` of every value (on ``jobs`` forked processes for large months)."""
    return _columns(values, added, jobs).as_leaves()


def _duplicates(stream: str, ids: Iterable[str | None]) -> list[Finding]:
    """A finding per cdr_id seen more than once (the common case, none, costs one set)."""
    listed = list(ids)
    if None in listed:
        listed = [i for i in listed if i is not None]
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
    positions = list(map(itemgetter(0), recs))
    cols = _columns(list(map(itemgetter(1), recs)), added, jobs)
    status, ids = cols.status, cols.ids
    if status.count(_OK) != n:
        rep.findings += [
            Finding(
                "altered", stream, positions[i], ids[i], _REPEATS if st == _REPEATED else _ALTERED
            )
            for i, st in enumerate(status)
            if st != _OK
        ]
    rep.findings += _duplicates(stream, ids)

    covered = bytearray(n)  # 1 where a record lies in some signed range
    for ev in sorted(roots, key=lambda e: e.first):
        rep.ranges += 1
        # positions is sorted: a range is a slice of indexes (bisect, not a scan per root).
        lo, hi = bisect_left(positions, ev.first), bisect_right(positions, ev.last)
        covered[lo:hi] = b"\x01" * (hi - lo)
        finding = _check_range(stream, ev, hi - lo, status[lo:hi], cols.leaves[lo:hi])
        if finding is None:
            rep.proven += hi - lo
        elif finding.kind:
            rep.findings.append(finding)
    if covered.count(0):
        rep.findings += [
            Finding("unproven", stream, positions[i], ids[i], _UNPROVEN)
            for i in range(n)
            if not covered[i]
        ]
    return rep


def _check_range(
    stream: str, ev: RootEvent, count: int, status: bytearray, leaves: list[bytes]
) -> Finding | None:
    """None if the range proves out; a Finding (kind "" = already explained) if not.
    ``count``: the records in the range, ``status`` and ``leaves``: theirs, in order."""
    where = f"positions {ev.first}-{ev.last}"
    if count < ev.size:
        n = ev.size - count
        return Finding("missing", stream, None, None, f"{n} record(s) missing at {where}")
    if count > ev.size:
        n = count - ev.size
        return Finding("extra", stream, None, None, f"{n} record(s) too many at {where}")
    if status.count(_OK) != count:
        # Altered records explain a mismatch and are reported one by one already.
        return Finding("", stream, None, None, "")
    if root_from_leaf_hashes(leaves).hex() == ev.root:
        return None
    return Finding(
        "mismatch",
        stream,
        None,
        None,
        f"records at {where} do not hash to the signed root (replaced or reordered records)",
    )


TaggedRecord = tuple[str, int, bytes, tuple[str, int] | None]  # partition, offset, value, leaf


def verify_batches(
    stream: str, records: Iterable[TaggedRecord], roots: Iterable[RootEvent], added: frozenset[str]
) -> Report:
    """Check a topic's records, tagged with their leaf (batch, index), against batch roots."""
    rep = Report()
    recs = list(records)
    n = rep.records = len(recs)
    values = [r[2] for r in recs]
    cols = _Columns()
    cols.add(values, added)
    by_batch, untagged = _by_batch(recs)
    known: set[str] = set()
    checks: list[tuple[RootEvent, Finding | None]] = []
    for ev in roots:
        if ev.batch is None:
            continue
        known.add(ev.batch)
        checks.append((ev, _check_batch(stream, ev, by_batch.get(ev.batch, {}), cols)))
    for batch, slots in by_batch.items():
        if batch not in known:
            untagged += [i for v in slots.values() for i in v]
    status, ids = cols.status, cols.ids
    if status.count(_OK) != n:
        for i, st in enumerate(status):
            if st != _OK:
                detail = f"partition {recs[i][0]}: {_REPEATS if st == _REPEATED else _ALTERED}"
                rep.findings.append(Finding("altered", stream, recs[i][1], ids[i], detail))
    rep.findings += _duplicates(stream, ids)
    for ev, finding in checks:
        rep.ranges += 1
        if finding is None:
            rep.proven += ev.size
        elif finding.kind:
            rep.findings.append(finding)
    for i in untagged:
        detail = f"partition {recs[i][0]}: in no signed batch"
        rep.findings.append(Finding("unproven", stream, recs[i][1], ids[i], detail))
    return rep


def _by_batch(recs: Sequence[TaggedRecord]) -> tuple[dict[str, dict[int, list[int]]], list[int]]:
    """batch -> leaf index -> the indexes of the records tagged with it; and the indexes
    of the records without a tag."""
    by_batch: dict[str, dict[int, list[int]]] = {}
    untagged: list[int] = []
    for i, (_part, _off, _value, leaf) in enumerate(recs):
        if leaf is None:
            untagged.append(i)
        else:
            by_batch.setdefault(leaf[0], {}).setdefault(leaf[1], []).append(i)
    return by_batch, untagged


def _check_batch(
    stream: str, ev: RootEvent, slots: Mapping[int, list[int]], cols: _Columns
) -> Finding | None:
    """None if the batch proves out; a Finding (kind "" = already explained) if not.
    ``slots``: leaf index -> the indexes (into ``cols``) of the records tagged with it."""
    where = f"batch {ev.batch}"
    present = sum(1 for i in range(ev.size) if i in slots)
    extra = sum(len(v) for i, v in slots.items() if not 0 <= i < ev.size)
    extra += sum(len(v) - 1 for v in slots.values() if len(v) > 1)
    if present < ev.size:
        n = ev.size - present
        return Finding("missing", stream, None, None, f"{n} record(s) missing from {where}")
    if extra:
        return Finding("extra", stream, None, None, f"{extra} record(s) too many in {where}")
    members = [slots[i][0] for i in range(ev.size)]
    if any(cols.status[j] != _OK for j in members):
        return Finding("", stream, None, None, "")  # reported as altered
    if root_from_leaf_hashes([cols.leaves[j] for j in members]).hex() == ev.root:
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
    positions = list(map(itemgetter(0), recs))
    values = list(map(itemgetter(1), recs))
    needle = _needle(cdr_id)
    hits = [i for i, v in enumerate(values) if _holds(cdr_id, needle, v)]
    if not hits:
        return None
    # The first root (in the log's order) whose range holds the record; in it, the first
    # position. Only that range's records are hashed.
    for ev in roots:
        lo, hi = bisect_left(positions, ev.first), bisect_right(positions, ev.last)
        j = bisect_left(hits, lo)
        if j == len(hits) or hits[j] >= hi:
            continue
        k = hits[j]
        i = k - lo
        digests = [_leaf(v, added)[0] or _NO_DIGEST for v in values[lo:hi]]
        where = f"the range of {ev.first}-{ev.last}"
        proof = _provable(cdr_id, values[k], added, digests, i, ev, where)
        return {
            "cdr_id": cdr_id,
            "stream": stream,
            "position": positions[k],
            "billing": billing_part(orjson.loads(values[k]), added),
            "billing_digest": digests[i].hex(),
            "leaf_index": i,
            "tree_size": hi - lo,
            "proof": [h.hex() for h in proof],
            "root": ev.root,
            "range": {"first": ev.first, "last": ev.last},
            "audit_event": {"writer": ev.writer, "seq": ev.seq},
        }
    return None


class NoProofError(Exception):
    """The record is found in a signed range, but no proof of it would check out (the
    message says why); ``cdranon verify`` without ``--record`` reports the details."""


def _provable(
    cdr_id: str,
    value: bytes,
    added: frozenset[str],
    digests: Sequence[bytes],
    index: int,
    ev: RootEvent,
    where: str,
) -> list[bytes]:
    """The record's audit path (RFC 9162 §2.1.3.1) in the range's tree of ``digests``;
    NoProofError unless the record is self-consistent and that path leads to the
    signed root: a proof is never printed that a third party's check would refuse, or one
    for a record verify calls altered (a repeated key: the digest covers the last copy,
    other readers see the first)."""
    if not _leaf(value, added)[2]:
        raise NoProofError(
            f"record {cdr_id} is altered (its billing fields do not match its "
            "billing_digest, or it repeats a key): no proof"
        )
    proof = inclusion_proof(index, digests)
    if not verify_inclusion(digests[index], index, len(digests), proof, bytes.fromhex(ev.root)):
        raise NoProofError(
            f"{where}, which holds record {cdr_id}, no longer hashes to its signed root "
            "(records of it altered, missing, extra or reordered): no proof"
        )
    return proof


def _cdr_id_of(value: bytes) -> str | None:
    """The cdr_id of a record; None if it is not a JSON object with a string cdr_id."""
    try:
        doc = loads(value)
    except JSONDecodeError:
        return None
    cid = doc.get("cdr_id") if type(doc) is dict else None
    return cid if type(cid) is str else None


def _holds(cdr_id: str, needle: bytes, value: bytes) -> bool:
    """True if ``value`` is a record of ``cdr_id`` (``needle``: :func:`_needle` of it),
    parsed only when its bytes could be.

    The id is in the bytes as orjson spells it (as the transform writes it), or spelt
    with some escape orjson does not use, which needs a backslash: a record without
    either cannot hold the id, and most records of a month are passed over unparsed.
    """
    return (needle in value or b"\\" in value) and _cdr_id_of(value) == cdr_id


def _needle(cdr_id: str) -> bytes:
    """The id's JSON string as orjson writes it, without its quotes; a backslash for an id
    orjson cannot write (a lone surrogate from the command line): then only records with
    an escape are parsed, and none holds it."""
    try:
        return dumps(cdr_id)[1:-1]
    except JSONEncodeError:
        return b"\\"


def proof_for_batch(
    cdr_id: str,
    stream: str,
    records: Iterable[TaggedRecord],
    roots: Iterable[RootEvent],
    added: frozenset[str],
) -> dict[str, Any] | None:
    """:func:`proof_for` for a topic whose records carry leaf tags."""
    recs = list(records)
    needle = _needle(cdr_id)
    target = None
    for part, off, value, leaf in recs:
        if leaf is not None and _holds(cdr_id, needle, value):
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
        digests = [_leaf(members[i], added)[0] or _NO_DIGEST for i in range(ev.size)]
        proof = _provable(cdr_id, value, added, digests, index, ev, f"batch {batch}")
        doc = orjson.loads(value)
        return {
            "cdr_id": cdr_id,
            "stream": stream,
            "position": {"partition": part, "offset": off},
            "billing": billing_part(doc, added),
            "billing_digest": digests[index].hex(),
            "leaf_index": index,
            "tree_size": ev.size,
            "proof": [h.hex() for h in proof],
            "root": ev.root,
            "batch": batch,
            "audit_event": {"writer": ev.writer, "seq": ev.seq},
        }
    return None
