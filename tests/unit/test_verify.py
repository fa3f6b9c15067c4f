"""Verification of sanitised records against signed roots: every tampering is found."""

from __future__ import annotations

import itertools
from hashlib import sha256
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.integrity import DIGEST_FIELD, added_fields, billing_part, digest
from service.merkle import verify_inclusion
from service.native import native_digests
from service.policy import load_policy
from service.verify import (
    NoProofError,
    RootEvent,
    TaggedRecord,
    _Columns,
    _leaf,
    leaves_of,
    proof_for,
    root_event_details,
    verify_batches,
    verify_stream,
)
from tests.unit.core_helpers import cdr, make_transformer, now_ms, raw

ADDED = added_fields(load_policy())


@pytest.fixture
def stream(tmp_path: Path) -> tuple[list[tuple[int, bytes]], list[RootEvent]]:
    """Two batches of sanitised records at even positions (Kafka offsets have gaps: the
    transaction markers) 0-18 and 20-32, with their roots."""
    tf = make_transformer(tmp_path)
    r = tf.transform([raw(cdr(cdr_id=f"c{i}", price=i / 100)) for i in range(17)], now_ms())
    records = [(2 * i, o.value) for i, o in enumerate(r.sanitised)]
    roots = []
    for first, last in ((0, 19), (20, 33)):
        digests = [orjson.loads(v)[DIGEST_FIELD] for p, v in records if first <= p <= last]
        roots.append(RootEvent(**root_event_details("s", first, last, digests)))
    return records, roots


def _kinds(records: list[tuple[int, bytes]], roots: list[RootEvent]) -> list[str]:
    return [f.kind for f in verify_stream("s", records, roots, ADDED).findings]


def test_untouched_stream_verifies(stream: tuple[list[tuple[int, bytes]], list[RootEvent]]) -> None:
    records, roots = stream
    rep = verify_stream("s", records, roots, ADDED)
    assert rep.ok
    assert rep.proven == rep.records == 17


def test_every_byte_flip_of_every_record_is_detected(
    stream: tuple[list[tuple[int, bytes]], list[RootEvent]],
) -> None:
    records, roots = stream
    pos, value = records[3]
    undetected = []
    for i in range(len(value)):
        for bit in (0x01, 0x20):
            b = bytearray(value)
            b[i] ^= bit
            mutated = [*records[:3], (pos, bytes(b)), *records[4:]]
            try:
                doc = orjson.loads(bytes(b))
            except orjson.JSONDecodeError:
                doc = None
            if (
                isinstance(doc, dict)
                and billing_part(doc, ADDED) == billing_part(orjson.loads(value), ADDED)
                and doc.get(DIGEST_FIELD) == orjson.loads(value)[DIGEST_FIELD]
            ):
                continue  # the flip hit a derived field (pseudonym, month): not retained data
            if verify_stream("s", mutated, roots, ADDED).ok:
                undetected.append((i, bit))
    assert undetected == []


def test_removed_added_moved_duplicated(
    stream: tuple[list[tuple[int, bytes]], list[RootEvent]],
) -> None:
    records, roots = stream
    assert _kinds(records[:5] + records[6:], roots) == ["missing"]
    extra = orjson.loads(records[2][1])
    extra["cdr_id"] = "forged"
    extra[DIGEST_FIELD] = digest(billing_part(extra, ADDED))
    assert _kinds([*records, (5, orjson.dumps(extra))], roots) == ["extra"]
    swapped = list(records)
    swapped[1], swapped[2] = (records[1][0], records[2][1]), (records[2][0], records[1][1])
    assert _kinds(swapped, roots) == ["mismatch"]
    assert "unproven" in _kinds([*records, (99, records[0][1])], roots)
    assert "duplicate" in _kinds([*records, (99, records[0][1])], roots)


def test_replaced_record_with_a_recomputed_digest_is_caught_by_the_root(
    stream: tuple[list[tuple[int, bytes]], list[RootEvent]],
) -> None:
    records, roots = stream
    doc = orjson.loads(records[7][1])
    doc["price"] = 0.0
    doc[DIGEST_FIELD] = digest(billing_part(doc, ADDED))
    forged = list(records)
    forged[7] = (records[7][0], orjson.dumps(doc))
    assert _kinds(forged, roots) == ["mismatch"]


def test_wrong_signed_size_or_root(stream: tuple[list[tuple[int, bytes]], list[RootEvent]]) -> None:
    records, roots = stream
    bad = RootEvent(
        roots[0].stream, roots[0].first, roots[0].last, roots[0].size + 1, roots[0].root
    )
    assert _kinds(records, [bad, roots[1]]) == ["missing"]
    flipped = ("0" if roots[1].root[0] != "0" else "1") + roots[1].root[1:]
    bad2 = RootEvent(roots[1].stream, roots[1].first, roots[1].last, roots[1].size, flipped)
    assert _kinds(records, [roots[0], bad2]) == ["mismatch"]


def test_third_party_proof(stream: tuple[list[tuple[int, bytes]], list[RootEvent]]) -> None:
    records, roots = stream
    proof = proof_for("c12", "s", records, roots, ADDED)
    assert proof is not None
    leaf = bytes.fromhex(digest(proof["billing"]))
    assert leaf.hex() == proof["billing_digest"]
    assert verify_inclusion(
        leaf,
        proof["leaf_index"],
        proof["tree_size"],
        [bytes.fromhex(h) for h in proof["proof"]],
        bytes.fromhex(proof["root"]),
    )
    proof["billing"]["price"] = 9.99
    assert not verify_inclusion(
        bytes.fromhex(digest(proof["billing"])),
        proof["leaf_index"],
        proof["tree_size"],
        [bytes.fromhex(h) for h in proof["proof"]],
        bytes.fromhex(proof["root"]),
    )
    assert proof_for("nope", "s", records, roots, ADDED) is None


def test_leaves_on_forked_workers_equal_the_single_process_ones() -> None:
    """--jobs N: the same leaves, in order, for good, altered and non-object records."""
    added = frozenset({"month", "billing_digest"})
    values: list[bytes] = []
    for i in range(60_000):
        billing = {"cdr_id": f"id-{i}", "price": i / 7, "currency": "EUR"}
        digest = sha256(orjson.dumps(billing, option=orjson.OPT_SORT_KEYS)).hexdigest()
        doc = {**billing, "month": "2026-10", "billing_digest": digest}
        if i % 997 == 0:
            doc["price"] = -1  # altered after the digest
        values.append(b"[1, 2]" if i % 1499 == 0 else orjson.dumps(doc))
    single = leaves_of(values, added, jobs=1)
    forked = leaves_of(values, added, jobs=2)
    assert forked == single
    assert sum(1 for d, _, ok in single if d is not None and not ok) > 0
    assert sum(1 for d, _, _ in single if d is None) > 0


def test_columns_equal_the_per_record_leaf() -> None:
    """verify_stream's inlined copy of _leaf (service.verify._Columns) gives its answers for
    records that are not JSON, not objects, lack fields or carry odd types."""
    added = frozenset({"month", "billing_digest"})
    good = {"cdr_id": "a", "price": 0.5}
    stated = sha256(orjson.dumps(good, option=orjson.OPT_SORT_KEYS)).hexdigest()
    values = [
        orjson.dumps({**good, "month": "2026-10", "billing_digest": stated}),
        orjson.dumps({**good, "billing_digest": stated.upper()}),
        orjson.dumps({**good, "billing_digest": bytes.fromhex(stated).hex()[:-1]}),
        orjson.dumps({"price": 1, "billing_digest": 7}),
        orjson.dumps({"cdr_id": 5, "month": None}),
        b'{"cdr_id":"x","cdr_id":"y","billing_digest":"00"}',
        b"{}",
        b"[1, 2]",
        b"null",
        b"not json",
    ]
    assert leaves_of(values, added) == [_leaf(v, added) for v in values]
    assert [ok for _, _, ok in leaves_of(values, added)] == [True] + [False] * 9


def _forgeries(value: bytes) -> dict[str, bytes]:
    """Altered records that keep a matching digest where they can, so only the record's
    text gives them away."""
    doc = orjson.loads(value)
    billing = billing_part(doc, ADDED)
    added = {k: v for k, v in doc.items() if k in ADDED}
    p = orjson.dumps(dict(reversed(list(billing.items()))))  # not canonical
    return {
        # the billing fields reordered, the digest of those bytes stated
        "reordered": p[:-1]
        + orjson.dumps({**added, DIGEST_FIELD: sha256(p).hexdigest()}).replace(b"{", b",", 1),
        # a billing field repeated after the added ones (orjson keeps the last, others
        # the first) ...
        "shadowed": value[:-1] + b',"price":0}',
        # ... or before: a reader keeping the first sees cdr_id "z"
        "two_ids": value.replace(b'"cdr_id":', b'"cdr_id":"z","cdr_id":', 1),
        # a repeat nested in a billing value, and one hidden behind an escape
        "nested_repeat": value.replace(b'{"account_id":', b'{"a":{"b":1,"b":2},"account_id":', 1),
        "escaped_repeat": value.replace(b'"cdr_id":', b'"cdr_\\u0069d":"z","cdr_id":', 1),
        # an added field repeated (the digest then reads two ways)
        "two_digests": value[:-1]
        + b',"billing_digest":"00"}'.replace(b'"00"', b'"' + b"0" * 64 + b'"'),
    }


def test_forged_records_are_found_in_a_range(
    stream: tuple[list[tuple[int, bytes]], list[RootEvent]],
) -> None:
    """Each forgery, in a signed range or in none, is reported altered."""
    records, roots = stream
    k = 7
    pos, value = records[k]
    for name, forged in _forgeries(value).items():
        inside = verify_stream("s", [*records[:k], (pos, forged), *records[k + 1 :]], roots, ADDED)
        assert [(f.kind, f.position) for f in inside.findings] == [("altered", pos)], name
        # a repeat is named as one (its digest may well match)
        repeats = name not in ("reordered",)
        assert ("repeats a key" in inside.findings[0].detail) == repeats, name
        outside = verify_stream("s", [*records, (99, forged)], roots, ADDED)
        assert ("altered", 99) in [(f.kind, f.position) for f in outside.findings], name
        assert not _leaf(forged, ADDED)[2], name


def test_forged_records_are_found_in_a_batch(tmp_path: Path) -> None:
    """verify_batches (the --topic path): each forgery is reported altered, tagged or not."""
    tf = make_transformer(tmp_path)
    r = tf.transform([raw(cdr(cdr_id=f"c{i}", price=i / 100)) for i in range(9)], now_ms())
    tagged: list[TaggedRecord] = [
        ("0", 10 + i, o.value, ("b1", i)) for i, o in enumerate(r.sanitised)
    ]
    ev = RootEvent(
        **{**root_event_details("s", -1, -1, [o.digest or "" for o in r.sanitised]), "batch": "b1"}
    )

    def kinds(recs: list[TaggedRecord]) -> list[tuple[str, int | None]]:
        return [(f.kind, f.position) for f in verify_batches("s", recs, [ev], ADDED).findings]

    assert kinds(tagged) == []
    for name, forged in _forgeries(tagged[7][2]).items():
        inside: list[TaggedRecord] = [*tagged[:7], ("0", 17, forged, ("b1", 7)), *tagged[8:]]
        assert kinds(inside) == [("altered", 17)], name
        outside: list[TaggedRecord] = [*tagged, ("0", 99, forged, None)]
        # every forgery keeps cdr_id c7 for orjson: a duplicate of the record it copies
        assert kinds(outside) == [("altered", 99), ("duplicate", None), ("unproven", 99)], name


def test_proof_finds_an_id_in_any_spelling_and_skips_records_that_are_not_json(
    stream: tuple[list[tuple[int, bytes]], list[RootEvent]],
) -> None:
    """proof_for searches the bytes before parsing: an id spelt with an escape orjson does
    not use is still found, and a broken record elsewhere in the stream does not stop it."""
    records, roots = stream
    pos, value = records[12]
    escaped = value.replace(b'"cdr_id":"c12"', b'"cdr_id":"\\u0063\\u0031\\u0032"', 1)
    assert escaped != value
    assert orjson.loads(escaped)["cdr_id"] == "c12"
    broken = [(1, b"not json"), (3, b"[1, 2]")]
    mutated = [*records[:12], (pos, escaped), *records[13:], *broken]
    proof = proof_for("c12", "s", mutated, roots, ADDED)
    assert proof is not None
    assert proof["position"] == pos
    assert proof["billing"]["cdr_id"] == "c12"
    # the same leaf as the plain spelling: the digest covers the value, not its spelling
    plain = proof_for("c12", "s", records, roots, ADDED)
    assert plain is not None
    assert proof["billing_digest"] == plain["billing_digest"]
    assert proof["leaf_index"] == plain["leaf_index"]
    assert proof_for("c99", "s", mutated, roots, ADDED) is None


def test_proof_finds_ids_spelt_any_way(tmp_path: Path) -> None:
    """Non-ASCII and slash-bearing ids, in orjson's spelling and with escapes; an id
    orjson cannot even write (a lone surrogate, possible from the command line) is simply
    not found."""
    tf = make_transformer(tmp_path)
    ids = ["c0", "é-1/☎", "c2"]
    r = tf.transform([raw(cdr(cdr_id=i)) for i in ids], now_ms())
    records = [(i, o.value) for i, o in enumerate(r.sanitised)]
    roots = [RootEvent(**root_event_details("s", 0, 2, [o.digest or "" for o in r.sanitised]))]
    assert "é-1/☎".encode() in records[1][1]  # orjson writes it raw
    escaped = records[1][1].replace("é-1/☎".encode(), b"\\u00e9-1\\/\\u260e", 1)
    assert orjson.loads(escaped)["cdr_id"] == "é-1/☎"
    for recs in (records, [records[0], (1, escaped), records[2]]):
        proof = proof_for("é-1/☎", "s", recs, roots, ADDED)
        assert proof is not None
        assert proof["position"] == 1
        assert proof["leaf_index"] == 1
    assert proof_for("\udc80", "s", records, roots, ADDED) is None
    assert proof_for("\ud800x", "s", records, roots, ADDED) is None


# --- the native digest pass (service._native.digests) against the Python one ----------


def _columns_both_ways(values: list[bytes], added: frozenset[str]) -> tuple[Any, Any]:
    native, python = _Columns(), _Columns()
    native.add(values, added)
    python.add_python(values, added)
    return (
        (native.digests, native.leaves, bytes(native.status), native.ids),
        (python.digests, python.leaves, bytes(python.status), python.ids),
    )


def test_native_digest_pass_is_built() -> None:
    # Without it the comparisons below would compare the Python pass with itself.
    assert native_digests() is not None


def test_native_digest_pass_equals_the_python_one(tmp_path: Path) -> None:
    tf = make_transformer(tmp_path)
    res = tf.transform(
        [raw(cdr(cdr_id=f"c{i}", price=i / 7, parts=i)) for i in range(40)], now_ms()
    )
    added = added_fields(load_policy())
    good = [o.value for o in res.sanitised]
    odd = [
        good[0].replace(b'"parts":0', b'"parts":1'),  # altered: digest no longer matches
        good[1].replace(b'"sms"', b'"s\\u006ds"'),  # an escape: the Python pass decides
        good[2].replace(b'"c2"', b'"c\xc3\xa92"'),  # non-ASCII
        good[3][:-1] + b',"cdr_id":"other"}',  # a repeated key
        good[4].replace(b"{", b'{ "note" : {"nested": [1, 2.50]} ,', 1),  # nested, spaced
        good[5].replace(b'"price":', b'"price":1e-3,"x":'),  # an exponent
        b"[1]",
        b"not json",
        b'{"cdr_id":"only","billing_digest":"00"}',
    ]
    values = good + odd
    native, python = _columns_both_ways(values, added)
    assert native == python
    status = native[2]
    assert list(status[: len(good)]) == [1] * len(good)
    # altered, an escape of the same text (still the same billing value), non-ASCII (other
    # value), a repeated key, nested (not billing: changes it), exponent, not objects
    assert list(status[len(good) :]) == [0, 1, 0, 3, 0, 0, 2, 2, 0]
    # Buffers (a worker's share is memoryviews of one blob) give the same answers.
    blob = b"".join(values)
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    views = [memoryview(blob)[a:b] for a, b in itertools.pairwise(offsets)]
    assert _columns_both_ways(views, added) == (python, python)  # type: ignore[arg-type]


def test_no_proof_for_an_altered_record_or_a_range_that_no_longer_proves_out(
    stream: tuple[list[tuple[int, bytes]], list[RootEvent]],
) -> None:
    records, roots = stream
    pos, value = records[12]
    # The record itself altered: its price, its stated digest kept.
    doc = orjson.loads(value)
    doc["price"] = 99.0
    altered = [*records[:12], (pos, orjson.dumps(doc)), *records[13:]]
    with pytest.raises(NoProofError, match="record c12 is altered"):
        proof_for("c12", "s", altered, roots, ADDED)
    # A repeated key: the digest matches the last copy, another reader sees the first.
    repeated = value.replace(b'"cdr_id":"c12"', b'"cdr_id":"c13","cdr_id":"c12"', 1)
    assert orjson.loads(repeated) == orjson.loads(value)
    with pytest.raises(NoProofError, match="altered"):
        proof_for("c12", "s", [*records[:12], (pos, repeated), *records[13:]], roots, ADDED)
    # A neighbour in the same range altered together with its digest: the record is
    # intact, but the path no longer leads to the signed root.
    npos, nvalue = records[13]
    ndoc = orjson.loads(nvalue)
    ndoc["price"] = 42.0
    ndoc[DIGEST_FIELD] = digest(billing_part(ndoc, ADDED))
    replaced = [*records[:13], (npos, orjson.dumps(ndoc)), *records[14:]]
    with pytest.raises(NoProofError, match="no longer hashes to its signed root"):
        proof_for("c12", "s", replaced, roots, ADDED)
    assert proof_for("c12", "s", records, roots, ADDED) is not None
