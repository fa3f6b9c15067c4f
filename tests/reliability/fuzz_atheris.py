"""Coverage-guided fuzzing of parse-and-transform with atheris (libFuzzer).

Run by tests/reliability/test_fuzz_transform.py::test_atheris_transform as
``python -m tests.reliability.fuzz_atheris -atheris_runs=N [libFuzzer flags]``. Each input
is one record (the raw bytes); a seed corpus of valid CDRs starts the search near the
interesting paths. Any exception other than a declared rejection is a crash (libFuzzer
exits non-zero and writes the input as an artifact); so is a rejection with an undeclared
reason, an input counted twice or not at all, or an identifier value in an output.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris
import orjson

with atheris.instrument_imports():  # type: ignore[attr-defined]  # missing from types-atheris
    from service import fields, identifiers, months, transform

from service.keyring import Keyring
from service.keystore.file import FileKeystore
from service.keystore.master import MasterKey
from service.policy import load_policy

_ = (fields, identifiers, months)  # instrumented for coverage feedback

DECLARED = frozenset(
    {
        "too_large",
        "invalid_json",
        "not_an_object",
        "missing_field",
        "wrong_type",
        "invalid_value",
        "too_far_in_future",
        "past_billing_deadline",
    }
)
NOW_MS = 1795435200000  # 2026-11-23T12:00:00Z
POLICY = load_policy(None)
_KEYS = tempfile.mkdtemp(prefix="atheris-keys-")
TF = transform.Transformer(
    POLICY, Keyring(FileKeystore(Path(_KEYS), MasterKey(b"\x09" * 32, source="fuzz")))
)
SEEDS = [
    {
        "cdr_id": "c-1",
        "event_time": "2026-10-15T10:00:00Z",
        "account_id": "acct-1",
        "channel": "sms",
        "parts": 1,
        "price": 0.0425,
        "currency": "EUR",
        "mcc": "234",
        "mnc": "15",
        "country": "GB",
        "msisdn": "+447700900123",
        "imsi": "234150000000001",
        "imei": "490154203237518",
        "email": "someone@example.org",
    },
    {"cdr_id": "c-2", "event_time": 1790000000000, "account_id": 7, "msisdn": "+33612345678"},
    {"cdr_id": "c-3", "event_time": "2026-09-01T00:00:00+02:00", "account_id": "a"},
]


def one_input(data: bytes) -> None:
    """The fuzz target: transform one record and check the contract."""
    result = TF.transform([data], NOW_MS)
    if len(result.sanitised) + len(result.rejected) != 1:
        raise AssertionError("an input was not accounted for exactly once")
    for rej in result.rejected:
        if rej.reason not in DECLARED:
            raise AssertionError(f"undeclared rejection reason {rej.reason!r}")
    if result.sanitised:
        doc = orjson.loads(data)
        out = orjson.loads(result.sanitised[0].value)
        for f in POLICY.identifier_fields:
            v = doc.get(f)
            if isinstance(v, str) and len(v) >= 6:
                added = {k: x for k, x in out.items() if k not in POLICY.billing_fields}
                if v in orjson.dumps(added).decode():
                    raise AssertionError(f"identifier {f} reached the sanitised view")
        for f in POLICY.billing_fields:
            if out.get(f) != doc.get(f):
                raise AssertionError(f"billing field {f} changed")


def main() -> None:
    """libFuzzer entry point; a seed corpus directory is added to the arguments."""
    corpus = Path(tempfile.mkdtemp(prefix="atheris-corpus-"))
    for i, seed in enumerate(SEEDS):
        (corpus / f"seed-{i}").write_bytes(orjson.dumps(seed))
    atheris.Setup([*sys.argv, str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
