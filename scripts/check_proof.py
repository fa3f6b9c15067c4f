#!/usr/bin/env python3
"""Check a cdranon inclusion proof as a third party: needs only Python 3 and `cryptography`.

    cdranon verify --file DIR/sanitised/2026-10.jsonl --record CDR_ID > proof.json
    python3 check_proof.py proof.json audit-signing.pub

Checks, in order: (1) the canonical bytes are the billing fields shown, and hash to the
billing digest; (2) the audit path leads from that leaf to the root (RFC 6962/9162);
(3) the root and tree size are the ones in the signed audit event; (4) the event's Ed25519
signature verifies under the published public key. Prints OK or the first failed check.
"""

from __future__ import annotations

import hashlib
import json
import sys

from cryptography.hazmat.primitives.serialization import load_pem_public_key


def _canonical(obj: object) -> bytes:
    # JSON with keys sorted, no whitespace, UTF-8 (non-ASCII not escaped).
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _verify_path(leaf: bytes, index: int, size: int, path: list[bytes], root: bytes) -> bool:
    if not 0 <= index < size:
        return False
    fn, sn = index, size - 1
    r = hashlib.sha256(b"\x00" + leaf).digest()
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def main() -> int:
    proof = json.load(open(sys.argv[1], encoding="utf-8"))  # noqa: SIM115
    public_key = load_pem_public_key(open(sys.argv[2], "rb").read())  # noqa: SIM115
    canonical = proof["canonical"].encode()
    if json.loads(canonical) != proof["billing"]:
        return _fail("1: the canonical bytes are not the billing fields shown")
    leaf = hashlib.sha256(canonical).digest()
    if leaf.hex() != proof["billing_digest"]:
        return _fail("1: the billing fields do not hash to the billing digest")
    path = [bytes.fromhex(h) for h in proof["proof"]]
    if not _verify_path(
        leaf, proof["leaf_index"], proof["tree_size"], path, bytes.fromhex(proof["root"])
    ):
        return _fail("2: the audit path does not lead to the root")
    event = proof["audit_event"]
    details = event["details"]
    if details["root"] != proof["root"] or details["size"] != proof["tree_size"]:
        return _fail("3: the root or tree size is not the signed one")
    body = {k: v for k, v in event.items() if k != "sig"}
    try:
        public_key.verify(bytes.fromhex(event["sig"]), _canonical(body))  # type: ignore[union-attr, call-arg]
    except Exception:  # noqa: BLE001  # any failure of the signature check is a failure
        return _fail("4: the audit event's signature does not verify under this public key")
    where = f"leaf {proof['leaf_index']} of {proof['tree_size']}"
    print(f"OK: record {proof['cdr_id']} is {where} under a signed root")
    return 0


def _fail(why: str) -> int:
    print(f"FAILED check {why}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
