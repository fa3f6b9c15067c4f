"""Scenario 10: tamper detection over what a real ``cdranon run`` wrote.

The exhaustive unit tests already cover the audit chain as a file (tests/unit/test_audit.py:
every bit flip of every byte, every drop, swap, replay and forgery, truncation with anchors)
and the Merkle proofs (tests/unit/test_merkle.py, tests/unit/test_verify.py over file
positions). This goes further on the stream itself: a processor writes sanitised records
tagged with their leaf and signed ``integrity.root`` events in its transactions; then
every single-bit flip (all 8 bits of every byte of the covered records, their leaf tags
included), every deletion, insertion (a copy at a new offset, a forged record), reordering
(values swapped between leaves) and truncation is tried against ``verify_batches``, and the
same five against the audit topic's chain with ``audit.verify`` and the anchors of an
earlier verification. Detected: 100%. A flip that leaves the billing fields, the digest
and the leaf tag as they were (it hit a pseudonym, the month or the key id: derived data,
not the original form the roots prove) is counted apart and must not be the majority.
"""

from __future__ import annotations

import orjson
import pytest
from confluent_kafka.admin import AdminClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from service.audit import ChainHead, generate_signing_key, parse_signing_key_text, verify
from service.integrity import DIGEST_FIELD, LEAF_FIELD, added_fields, billing_part, leaf_of
from service.kafka.topics import TopicNames
from service.keystore import generate_master_key
from service.policy import load_policy
from service.verify import RootEvent, TaggedRecord, verify_batches
from tests.integration.kafka_helpers import consume_until, create_topics
from tests.integration.run_support import (
    Processor,
    produce_input,
    recent_months,
    wait_all_committed,
    write_config,
)
from tests.reliability.support import Scale

ADDED = added_fields(load_policy(None))


def _cdr(i: int, month: str) -> bytes:
    return orjson.dumps(
        {
            "cdr_id": f"t-{i}",
            "event_time": f"{month}-02T10:{i % 60:02d}:00Z",
            "account_id": f"acct-{i % 3}",
            "channel": "sms",
            "parts": 1 + i % 3,
            "price": round(0.01 * i, 4),
            "currency": "EUR",
            "country": "GB",
            "msisdn": f"+4477009{i:05d}",
        }
    )


@pytest.fixture(scope="module")
def written(
    kafka_bootstrap: str,
    admin: AdminClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[TaggedRecord], list[RootEvent], list[bytes], str, str]:
    """Records, roots and audit events as a real processor wrote them."""
    tmp = tmp_path_factory.mktemp("tamper")
    uid = tmp.name.replace("_", "-")
    prefix = f"tamper-{uid}"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=1)
    month = recent_months(1)[0]
    n = 24
    produce_input(kafka_bootstrap, names.raw, [_cdr(i, month) for i in range(n)])
    key_text = generate_signing_key()
    env = {
        "CDRANON_MASTER_KEY": generate_master_key(),
        "CDRANON_AUDIT_SIGNING_KEY": key_text,
        "CDRANON_HOME": str(tmp / "home"),
    }
    cfg = write_config(
        tmp / "run.toml",
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        group=f"g-{uid}",
        keystore=tmp / "keys",
        max_records=6,
    )
    proc = Processor(cfg, env, name="tamper")
    try:
        wait_all_committed(kafka_bootstrap, f"g-{uid}", names.raw, timeout_s=120)
        assert proc.terminate() == 0, proc.raw[-5:]
    finally:
        proc.close()
    topic = names.sanitised(month)
    recs = consume_until(kafka_bootstrap, [topic], count=n, to_end=True)
    tagged: list[TaggedRecord] = [
        (str(r.partition), r.offset, r.value or b"", leaf_of(r.value or b"")) for r in recs
    ]
    events = [r.value or b"" for r in consume_until(kafka_bootstrap, [names.audit], to_end=True)]
    roots = [
        RootEvent.from_event(ev)
        for ev in map(orjson.loads, events)
        if ev.get("event") == "integrity.root" and ev["details"]["stream"] == topic
    ]
    assert len(roots) >= 2, "the run should have signed several batches"
    public = parse_signing_key_text(key_text, source="test").public_key
    pem = public.public_bytes_raw().hex()
    return tagged, roots, events, topic, pem


def _at(part: str, off: int, value: bytes) -> TaggedRecord:
    """A record as `cdranon verify --topic` reads it: its leaf from its own bytes."""
    return (part, off, value, leaf_of(value))


def _retagged(value: bytes, leaf: tuple[str, int]) -> bytes:
    doc = orjson.loads(value)
    doc[LEAF_FIELD] = f"{leaf[0]}/{leaf[1]}"
    return orjson.dumps(doc)


def _ok(topic: str, records: list[TaggedRecord], roots: list[RootEvent]) -> bool:
    return verify_batches(topic, records, roots, ADDED).ok


def _covered(value: bytes, leaf: tuple[str, int] | None) -> tuple[object, ...]:
    """What the proof covers of a record: billing fields, digest, leaf tag."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return ("unparsable", value)
    if not isinstance(doc, dict):
        return ("not an object", value)
    return (orjson.dumps(billing_part(doc, ADDED)), doc.get(DIGEST_FIELD), leaf)


def test_untouched_stream_and_chain_verify(
    written: tuple[list[TaggedRecord], list[RootEvent], list[bytes], str, str],
) -> None:
    records, roots, events, topic, pub = written
    rep = verify_batches(topic, records, roots, ADDED)
    assert rep.ok
    assert rep.proven == len(records)
    assert verify(events, [_public(pub)]).ok


def _public(hex_raw: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_raw))


def test_every_bit_flip_of_records_and_leaf_tags_is_detected(
    written: tuple[list[TaggedRecord], list[RootEvent], list[bytes], str, str], scale: Scale
) -> None:
    records, roots, _, topic, _ = written
    picks = range(len(records)) if scale.soak else sorted({0, len(records) // 2, len(records) - 1})
    tried = outside = 0
    undetected: list[tuple[int, int, int]] = []
    for k in picks:
        part, off, value, leaf = records[k]
        assert leaf is not None
        before = _covered(value, leaf)
        tag_flips = 0
        for i in range(len(value)):
            for bit in range(8):
                b = bytes(value[:i]) + bytes([value[i] ^ (1 << bit)]) + value[i + 1 :]
                # The leaf tag is the record's last field: the verifier reads it from the
                # flipped bytes, as `cdranon verify --topic` does.
                new_leaf = leaf_of(b)
                tag_flips += new_leaf != leaf
                mutated = [*records[:k], (part, off, b, new_leaf), *records[k + 1 :]]
                tried += 1
                if _covered(b, new_leaf) == before:
                    outside += 1
                    continue
                if _ok(topic, mutated, roots):
                    undetected.append((k, i, bit))
        assert tag_flips >= 8 * len(f"{leaf[0]}/{leaf[1]}") // 2, tag_flips
    assert undetected == [], undetected[:10]
    print(f"record flips: {tried} tried, {outside} outside the proof, 0 undetected")
    assert tried > 1000
    assert outside < tried / 2, (outside, tried)


def test_every_deletion_insertion_reordering_and_truncation_is_detected(
    written: tuple[list[TaggedRecord], list[RootEvent], list[bytes], str, str],
) -> None:
    records, roots, _, topic, _ = written
    n = len(records)
    cases: dict[str, list[list[TaggedRecord]]] = {"delete": [], "insert": [], "reorder": []}
    cases["delete"] = [records[:k] + records[k + 1 :] for k in range(n)]
    end = max(off for _, off, _, _ in records) + 10
    for k in range(n):
        part, _, value, leaf = records[k]
        cases["insert"].append([*records, (part, end + k, value, leaf)])  # a replayed copy
        untagged = orjson.loads(value)
        del untagged[LEAF_FIELD]
        cases["insert"].append([*records, _at(part, end + k, orjson.dumps(untagged))])
        doc = orjson.loads(value)
        doc["cdr_id"] = f"forged-{k}"
        cases["insert"].append([*records, _at(part, end + k, orjson.dumps(doc))])
    for a in range(n):
        for b in range(a + 1, n):
            # The records trade places in their trees: each one's tag names the other's leaf.
            pa, oa, va, la = records[a]
            pb, ob, vb, lb = records[b]
            assert la is not None
            assert lb is not None
            swapped = list(records)
            swapped[a] = _at(pa, oa, _retagged(va, lb))
            swapped[b] = _at(pb, ob, _retagged(vb, la))
            cases["reorder"].append(swapped)
    cases["truncate"] = [records[:k] for k in range(n)]
    undetected = {kind: sum(_ok(topic, m, roots) for m in ms) for kind, ms in cases.items()}
    assert undetected == dict.fromkeys(cases, 0), undetected
    # A deleted root event leaves its batch's records unproven.
    for k in range(len(roots)):
        assert not _ok(topic, records, roots[:k] + roots[k + 1 :])


def test_every_tampering_of_the_audit_topic_is_detected(
    written: tuple[list[TaggedRecord], list[RootEvent], list[bytes], str, str],
) -> None:
    _, _, events, _, pub = written
    key = [_public(pub)]
    base = verify(events, key)
    assert base.ok
    anchors: dict[str, ChainHead] = dict(base.heads)

    def detected(evs: list[bytes]) -> bool:
        return not verify(evs, key, anchors=anchors).ok

    n = len(events)
    results: dict[str, list[bool]] = {"flip": [], "delete": [], "insert": [], "reorder": []}
    for k, raw in enumerate(events):
        for i in range(len(raw)):
            for bit in range(8):
                b = bytearray(raw)
                b[i] ^= 1 << bit
                results["flip"].append(detected([*events[:k], bytes(b), *events[k + 1 :]]))
    results["delete"] = [detected(events[:k] + events[k + 1 :]) for k in range(n)]
    results["insert"] = [
        detected([*events[:at], events[k], *events[at:]]) for k in range(n) for at in range(n + 1)
    ]
    for a in range(n):
        for z in range(a + 1, n):
            s = list(events)
            s[a], s[z] = s[z], s[a]
            results["reorder"].append(detected(s))
    results["truncate"] = [detected(events[:k]) for k in range(n)]
    missed = {kind: r.count(False) for kind, r in results.items()}
    print("audit tamperings tried:", {kind: len(r) for kind, r in results.items()})
    assert missed == dict.fromkeys(results, 0), missed
    assert all(results.values())
