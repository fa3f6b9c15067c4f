"""Sealing, pseudonyms and month keys: round trips, tamper detection, nonces, salts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from pathlib import Path

import orjson
import pytest

from service.errors import SealError
from service.monthkeys import MonthKeys, hkdf
from service.pseudonyms import pseudonym
from service.sealing import VERSION, BatchSealer, Unsealer, blob_key_id
from tests.unit.core_helpers import cdr, make_transformer, now_ms, raw

KID = "2026-10/default"
SECRET = bytes(range(32))
IDS: dict[str, object] = {
    "msisdn": "+447700900123",
    "imsi": "234150000000001",
    "imei": "490154203237518",
    "email": "Jo@Example.org",
}
_SALT, _NONCE, _TAG = 16, 12, 16


@pytest.fixture
def keys() -> MonthKeys:
    return MonthKeys.derive(KID, SECRET)


def _parts(blob: str) -> tuple[int, str, bytes, bytes, bytes]:
    """(version, key id, salt, nonce, ciphertext+tag), decoded independently of the code."""
    raw_blob = base64.b64decode(blob, validate=True)
    n = raw_blob[1]
    kid = raw_blob[2 : 2 + n].decode("ascii")
    rest = raw_blob[2 + n :]
    return raw_blob[0], kid, rest[:_SALT], rest[_SALT : _SALT + _NONCE], rest[_SALT + _NONCE :]


def _encode(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


# --- round trip and layout ---------------------------------------------------------------


def test_seal_unseal_round_trip(keys: MonthKeys) -> None:
    blob = BatchSealer(keys).seal(IDS, "c-1")
    assert Unsealer(keys).unseal(blob, "c-1") == IDS


def test_round_trip_with_fresh_derivation_of_the_same_secret(keys: MonthKeys) -> None:
    # A reader derives its own MonthKeys from the stored secret: nothing else is shared.
    blob = BatchSealer(keys).seal(IDS, "c-1")
    assert Unsealer(MonthKeys.derive(KID, SECRET)).unseal(blob, "c-1") == IDS


def test_empty_identifier_set_round_trips(keys: MonthKeys) -> None:
    blob = BatchSealer(keys).seal({}, "c-1")
    assert Unsealer(keys).unseal(blob, "c-1") == {}


def test_blob_names_its_key_id_and_layout(keys: MonthKeys) -> None:
    blob = BatchSealer(keys).seal(IDS, "c-1")
    assert blob_key_id(blob) == KID
    version, kid, salt, nonce, ct = _parts(blob)
    assert (version, kid) == (VERSION, KID)
    assert len(salt) == _SALT
    assert nonce == (1).to_bytes(12, "big")  # the first record of the batch
    assert len(ct) == len(orjson.dumps(IDS)) + _TAG
    # No plaintext identifier in the blob, decoded or not.
    for v in IDS.values():
        assert isinstance(v, str)
        assert v not in blob
        assert v.encode() not in base64.b64decode(blob)


def test_blob_is_bound_to_its_record(keys: MonthKeys) -> None:
    blob = BatchSealer(keys).seal(IDS, "c-1")
    u = Unsealer(keys)
    for other in ("c-2", "c-1 ", "", "C-1"):
        with pytest.raises(SealError, match="does not authenticate"):
            u.unseal(blob, other)


def test_blob_under_another_months_keys_fails(keys: MonthKeys) -> None:
    blob = BatchSealer(keys).seal(IDS, "c-1")
    with pytest.raises(SealError, match=r"sealed under 2026-10/default, not 2026-09/default"):
        Unsealer(MonthKeys.derive("2026-09/default", SECRET)).unseal(blob, "c-1")
    with pytest.raises(SealError, match="sealed under"):
        Unsealer(MonthKeys.derive("2026-10/it", SECRET)).unseal(blob, "c-1")


def test_blob_under_another_secret_of_the_same_key_id_fails(keys: MonthKeys) -> None:
    blob = BatchSealer(keys).seal(IDS, "c-1")
    other = MonthKeys.derive(KID, bytes(32))
    with pytest.raises(SealError, match="does not authenticate"):
        Unsealer(other).unseal(blob, "c-1")


def test_relabelled_key_id_does_not_authenticate() -> None:
    # Rewrite the header to name another month whose secret happens to be the same: the
    # key id is in the AAD and in the HKDF info, so the blob still does not open.
    sep = MonthKeys.derive("2026-09/default", SECRET)
    blob = BatchSealer(MonthKeys.derive(KID, SECRET)).seal(IDS, "c-1")
    _, _, salt, nonce, ct = _parts(blob)
    kid = b"2026-09/default"
    forged = _encode(bytes((VERSION, len(kid))) + kid + salt + nonce + ct)
    assert blob_key_id(forged) == "2026-09/default"
    with pytest.raises(SealError, match="does not authenticate"):
        Unsealer(sep).unseal(forged, "c-1")


# --- tampering -------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_single_byte_flip_is_detected(keys: MonthKeys, mask: int) -> None:
    blob = BatchSealer(keys).seal(IDS, "c-1")
    good = base64.b64decode(blob)
    u = Unsealer(keys)
    assert u.unseal(blob, "c-1") == IDS
    undetected = []
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= mask
        try:
            u.unseal(_encode(bytes(bad)), "c-1")
        except SealError:
            continue
        undetected.append(i)
    assert undetected == [], f"byte flips not detected at offsets {undetected}"
    # The regions named in the format, to be sure the loop covered each of them.
    n = 2 + len(KID)
    assert len(good) == n + _SALT + _NONCE + len(orjson.dumps(IDS)) + _TAG


def test_every_truncation_is_rejected(keys: MonthKeys) -> None:
    blob = BatchSealer(keys).seal(IDS, "c-1")
    good = base64.b64decode(blob)
    u = Unsealer(keys)
    for cut in range(len(good)):
        with pytest.raises(SealError):
            u.unseal(_encode(good[:cut]), "c-1")
    # Cut inside the fixed-size parts: the message says what is wrong.
    with pytest.raises(SealError, match="truncated"):
        u.unseal(_encode(good[: 2 + len(KID) + _SALT]), "c-1")
    with pytest.raises(SealError, match="truncated"):
        blob_key_id(_encode(good[:10]))


def test_appended_bytes_do_not_authenticate(keys: MonthKeys) -> None:
    good = base64.b64decode(BatchSealer(keys).seal(IDS, "c-1"))
    with pytest.raises(SealError, match="does not authenticate"):
        Unsealer(keys).unseal(_encode(good + b"\x00"), "c-1")


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version(keys: MonthKeys, version: int) -> None:
    good = base64.b64decode(BatchSealer(keys).seal(IDS, "c-1"))
    bad = _encode(bytes((version,)) + good[1:])
    with pytest.raises(SealError, match=r"unsupported sealed blob version \(expected 1\)"):
        Unsealer(keys).unseal(bad, "c-1")
    with pytest.raises(SealError, match="version"):
        blob_key_id(bad)


@pytest.mark.parametrize("blob", ["not base64!", "AQ=", "AQID\n", "Zm9v YmFy", "\u00e9t\u00e9"])
def test_not_base64(keys: MonthKeys, blob: str) -> None:
    with pytest.raises(SealError, match="not valid base64"):
        Unsealer(keys).unseal(blob, "c-1")
    with pytest.raises(SealError, match="not valid base64"):
        blob_key_id(blob)


@pytest.mark.parametrize("blob", [None, 1, b"AQID", ["AQID"]])
def test_not_a_string(keys: MonthKeys, blob: object) -> None:
    with pytest.raises(SealError, match="must be a string"):
        Unsealer(keys).unseal(blob, "c-1")  # type: ignore[arg-type]  # the wrong type on purpose


def test_non_ascii_key_id_is_reported(keys: MonthKeys) -> None:
    good = bytearray(base64.b64decode(BatchSealer(keys).seal(IDS, "c-1")))
    good[2] = 0xC3
    with pytest.raises(SealError, match="malformed key id"):
        blob_key_id(_encode(bytes(good)))


def test_seal_error_messages_carry_no_identifier(keys: MonthKeys) -> None:
    blob = BatchSealer(keys).seal(IDS, "c-1")
    with pytest.raises(SealError) as info:
        Unsealer(keys).unseal(blob, "c-2")
    for v in IDS.values():
        assert isinstance(v, str)
        assert v not in str(info.value)


# --- salts and nonces --------------------------------------------------------------------


def test_batches_of_one_month_use_different_salts(keys: MonthKeys) -> None:
    salts = [_parts(BatchSealer(keys).seal(IDS, "c-1"))[2] for _ in range(200)]
    assert len(set(salts)) == 200


def test_nonces_within_a_batch_are_distinct_counters(keys: MonthKeys) -> None:
    sealer = BatchSealer(keys)
    blobs = [sealer.seal(IDS, f"c-{i}") for i in range(2000)]
    parts = [_parts(b) for b in blobs]
    assert len({p[2] for p in parts}) == 1  # one salt (one subkey) per batch
    nonces = [p[3] for p in parts]
    assert len(set(nonces)) == len(nonces)
    assert [int.from_bytes(n, "big") for n in nonces] == list(range(1, 2001))
    assert all(n[:4] == b"\x00\x00\x00\x00" for n in nonces)
    u = Unsealer(keys)
    assert all(u.unseal(b, f"c-{i}") == IDS for i, b in enumerate(blobs))


def test_same_plaintext_twice_gives_different_blobs(keys: MonthKeys) -> None:
    sealer = BatchSealer(keys)
    a, b = sealer.seal(IDS, "c-1"), sealer.seal(IDS, "c-1")
    assert a != b
    assert _parts(a)[4] != _parts(b)[4]


def test_unsealer_reads_blobs_of_many_batches(keys: MonthKeys) -> None:
    blobs = [
        (BatchSealer(keys).seal({"imsi": f"23415000000{i:04d}"}, f"c{i}"), i) for i in range(50)
    ]
    u = Unsealer(keys)
    for blob, i in blobs:
        assert u.unseal(blob, f"c{i}") == {"imsi": f"23415000000{i:04d}"}


# --- pseudonyms ------------------------------------------------------------------------


def test_pseudonym_is_truncated_hmac_sha256_of_kind_and_value(keys: MonthKeys) -> None:
    # Recomputed with the standard library from the documented derivation.
    pkey = hkdf(SECRET, b"cdranon/v1/pseudonym/" + KID.encode())
    want = hmac.new(pkey, b"msisdn\x00+447700900123", hashlib.sha256).digest()[:16].hex()
    assert pseudonym(keys.hmac_proto, "msisdn", "+447700900123") == want


def test_pseudonym_stable_and_32_hex(keys: MonthKeys) -> None:
    p = pseudonym(keys.hmac_proto, "imsi", "234150000000001")
    assert re.fullmatch(r"[0-9a-f]{32}", p)
    assert pseudonym(keys.hmac_proto, "imsi", "234150000000001") == p
    assert pseudonym(MonthKeys.derive(KID, SECRET).hmac_proto, "imsi", "234150000000001") == p


def test_pseudonym_differs_across_keys_kinds_and_values(keys: MonthKeys) -> None:
    v = "234150000000001"
    base = pseudonym(keys.hmac_proto, "imsi", v)
    other_month = MonthKeys.derive("2026-09/default", SECRET)
    other_class = MonthKeys.derive("2026-10/it", SECRET)
    other_secret = MonthKeys.derive(KID, bytes(32))
    assert pseudonym(other_month.hmac_proto, "imsi", v) != base
    assert pseudonym(other_class.hmac_proto, "imsi", v) != base
    assert pseudonym(other_secret.hmac_proto, "imsi", v) != base
    assert pseudonym(keys.hmac_proto, "msisdn", v) != base
    assert pseudonym(keys.hmac_proto, "opaque", v) != base
    assert pseudonym(keys.hmac_proto, "imsi", "234150000000002") != base


def test_kind_and_value_cannot_be_shifted(keys: MonthKeys) -> None:
    # The NUL separator keeps ("ab", "c") and ("a", "bc") apart.
    assert pseudonym(keys.hmac_proto, "ab", "c") != pseudonym(keys.hmac_proto, "a", "bc")


def test_pseudonyms_module_agrees_with_the_transform(tmp_path: Path) -> None:
    # The transform computes pseudonyms inline (hot path); both must give the same value,
    # or a lookup by pseudonym() would never match the stream's output.
    tf = make_transformer(tmp_path)
    r = tf.transform([raw(cdr(msisdn="+44 7700 900123", email="Jo@Example.org"))], now_ms())
    san = orjson.loads(r.sanitised[0].value)
    mk = tf.keyring.get(san["key_id"], create=False)
    assert san["msisdn_pseudonym"] == pseudonym(mk.hmac_proto, "msisdn", "+447700900123")
    assert san["imsi_pseudonym"] == pseudonym(mk.hmac_proto, "imsi", "234150000000001")
    assert san["imei_pseudonym"] == pseudonym(mk.hmac_proto, "imei", "490154203237518")
    assert san["email_pseudonym"] == pseudonym(mk.hmac_proto, "email", "jo@example.org")


# --- month keys ------------------------------------------------------------------------


def test_month_keys_repr_shows_no_key_material(keys: MonthKeys) -> None:
    pkey = hkdf(SECRET, b"cdranon/v1/pseudonym/" + KID.encode())
    for text in (repr(keys), str(keys), f"{keys}", f"{keys!r}"):
        assert text == "MonthKeys('2026-10/default')"
        for material in (SECRET, keys.seal_root, pkey):
            assert material.hex() not in text
            assert repr(material) not in text


def test_month_keys_fields(keys: MonthKeys) -> None:
    assert (keys.key_id, keys.month, keys.retention_class) == (KID, "2026-10", "default")
    assert len(keys.seal_root) == 32
    assert keys.seal_root != SECRET
    assert keys.seal_root != MonthKeys.derive("2026-09/default", SECRET).seal_root


@pytest.mark.parametrize("secret", [b"", bytes(31), bytes(33)])
def test_month_keys_need_a_32_byte_secret(secret: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        MonthKeys.derive(KID, secret)


@pytest.mark.parametrize("kid", [b"not-a-key-id", b"2026-13/default", b"2026-10/../../x"])
def test_blob_with_a_malformed_key_id_is_a_seal_error(keys: MonthKeys, kid: bytes) -> None:
    _, _, salt, nonce, ct = _parts(BatchSealer(keys).seal(IDS, "c-1"))
    forged = _encode(bytes((VERSION, len(kid))) + kid + salt + nonce + ct)
    with pytest.raises(SealError, match="malformed key id"):
        blob_key_id(forged)
