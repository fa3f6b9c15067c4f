"""RFC 6962 Merkle trees: known answers, proofs for every leaf, and mutation tests in the
style of certificate-transparency's proof tests: every change must be rejected."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.merkle import (
    EMPTY_ROOT,
    inclusion_proof,
    leaf_hash,
    leaf_hashes,
    node_hash,
    python_root_from_leaf_hashes,
    root,
    root_from_leaf_hashes,
    root_of_hex_digests,
    root_of_leaf_buffer,
    verify_inclusion,
)
from service.native import native_merkle

# RFC 6962 test vectors (certificate-transparency-go merkle/testdata): eight leaves.
LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def _ref_root(leaves: list[bytes]) -> bytes:
    """The recursive definition of RFC 6962 §2.1, as a reference."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(_ref_root(leaves[:k]), _ref_root(leaves[k:]))


def test_known_roots() -> None:
    assert root([]) == EMPTY_ROOT
    for n in range(1, 9):
        assert root(LEAVES[:n]).hex() == ROOTS[n - 1]


@given(st.lists(st.binary(max_size=8), max_size=70))
def test_iterative_root_matches_the_recursive_definition(leaves: list[bytes]) -> None:
    assert root(leaves) == _ref_root(leaves)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 9, 16, 17, 33])
def test_every_leaf_has_a_valid_proof(n: int) -> None:
    leaves = [bytes([i]) * 3 for i in range(n)]
    r = root(leaves)
    for i in range(n):
        assert verify_inclusion(leaves[i], i, n, inclusion_proof(i, leaves), r)


def _mutations(leaf: bytes, index: int, size: int, proof: list[bytes], r: bytes):  # type: ignore[no-untyped-def]
    """Every single-bit flip of the leaf, each proof element and the root; wrong index and
    size; truncated, extended and reordered proofs."""
    for i in range(len(leaf) * 8):
        b = bytearray(leaf)
        b[i // 8] ^= 1 << (i % 8)
        yield bytes(b), index, size, proof, r
    for j in range(len(proof)):
        for i in range(256):
            p = bytearray(proof[j])
            p[i // 8] ^= 1 << (i % 8)
            yield leaf, index, size, [*proof[:j], bytes(p), *proof[j + 1 :]], r
    for i in range(256):
        rr = bytearray(r)
        rr[i // 8] ^= 1 << (i % 8)
        yield leaf, index, size, proof, bytes(rr)
    for wrong in (index - 1, index + 1, size, -1):
        yield leaf, wrong, size, proof, r
    # Sizes whose path has another shape. (A size with the same path shape computes the
    # same root; the signed audit event binds root and size together, and verify checks
    # the size against it, so that case is caught there, not here.)
    for wrong_size in (size * 2, size + 64, index, 0):
        yield leaf, index, wrong_size, proof, r
    if proof:
        yield leaf, index, size, proof[:-1], r
        yield leaf, index, size, proof[1:], r
        yield leaf, index, size, list(reversed(proof)), r if len(proof) > 1 else EMPTY_ROOT
    yield leaf, index, size, [*proof, b"\x00" * 32], r


@pytest.mark.parametrize(("n", "index"), [(7, 0), (7, 6), (8, 3), (13, 12), (13, 5)])
def test_every_mutation_is_rejected(n: int, index: int) -> None:
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(n)]
    r = root(leaves)
    proof = inclusion_proof(index, leaves)
    assert verify_inclusion(leaves[index], index, n, proof, r)
    count = 0
    for args in _mutations(leaves[index], index, n, proof, r):
        assert not verify_inclusion(*args), args[1:3]
        count += 1
    assert count > 256 * len(proof)


def test_moved_or_duplicated_leaves_change_the_root() -> None:
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(9)]
    r = root(leaves)
    assert root([leaves[1], leaves[0], *leaves[2:]]) != r  # moved
    assert root([*leaves, leaves[3]]) != r  # duplicated
    assert root(leaves[:-1]) != r  # removed
    # A leaf hash presented as leaf data does not verify (leaf/node domain separation).
    assert not verify_inclusion(leaf_hash(leaves[0]), 0, 9, inclusion_proof(0, leaves), r)


@settings(max_examples=60)
@given(st.lists(st.binary(min_size=1, max_size=4), min_size=1, max_size=40), st.data())
def test_proofs_verify_for_random_trees(leaves: list[bytes], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(leaves) - 1))
    assert verify_inclusion(leaves[i], i, len(leaves), inclusion_proof(i, leaves), root(leaves))


# --- the native tree (service/_native.c) against the Python reference ----------------


def test_native_root_is_built() -> None:
    # Without it the checks below would compare the Python path with itself.
    assert native_merkle() is not None


@pytest.mark.parametrize("n", [*range(1, 70), 127, 128, 129, 1000, 1025])
def test_native_root_equals_the_python_reference(n: int) -> None:
    digests = [hashlib.sha256(b"%d" % i).hexdigest() for i in range(n)]
    if n > 3:
        digests[3] = ""  # a record without a digest: an empty leaf
    hashes = leaf_hashes(bytes.fromhex(d) for d in digests)
    want = python_root_from_leaf_hashes(hashes)
    assert root_from_leaf_hashes(hashes) == want
    assert root_of_hex_digests(digests) == want
    assert root_of_hex_digests([d.upper() for d in digests]) == want
    # The transform's per-month buffer: the same leaves end to end, native and Python.
    assert root_of_leaf_buffer(bytearray(b"".join(hashes))) == want
    assert root_of_leaf_buffer(b"".join(hashes)) == want


def test_leaf_buffer_python_path_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    hashes = leaf_hashes(b"%d" % i for i in range(37))
    want = python_root_from_leaf_hashes(hashes)
    monkeypatch.setenv("CDRANON_NATIVE", "0")
    assert native_merkle() is None
    assert root_of_leaf_buffer(bytearray(b"".join(hashes))) == want
    monkeypatch.setenv("CDRANON_NATIVE", "1")
    native = native_merkle()
    assert native is not None
    for bad in (b"", b"\x00" * 33, bytearray(b"\x01" * 63)):
        with pytest.raises(ValueError, match="multiple of 32"):
            root_of_leaf_buffer(bad)
        if bad:
            with pytest.raises(ValueError, match="multiple of 32"):
                native[0](bad)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=200))
def test_native_root_of_any_leaves(leaves: list[bytes]) -> None:
    assert root_of_hex_digests([x.hex() for x in leaves]) == root(leaves)
    assert root_from_leaf_hashes(leaf_hashes(leaves)) == python_root_from_leaf_hashes(
        leaf_hashes(leaves)
    )


def test_native_root_refuses_what_fromhex_refuses() -> None:
    native = native_merkle()
    assert native is not None
    by_hashes, by_hex = native
    with pytest.raises(ValueError, match="32 bytes"):
        by_hashes([b"\x00" * 31])
    bad_inputs: list[list[Any]] = [["abc"], ["zz"], [b"00"]]
    for bad in bad_inputs:
        with pytest.raises(ValueError, match="hex"):
            by_hex(bad)
        with pytest.raises((ValueError, TypeError)):
            leaf_hashes(map(bytes.fromhex, bad))
        with pytest.raises((ValueError, TypeError)):
            root_of_hex_digests(bad)


def test_what_the_native_tree_does_not_take_goes_to_the_python_one() -> None:
    # Longer than any digest, or spelt with spaces: bytes.fromhex takes both.
    native = native_merkle()
    assert native is not None
    for odd in ("ab" * 129, "00 11"):
        with pytest.raises(ValueError, match="hex"):
            native[1]([odd])
        assert root_of_hex_digests([odd, "00"]) == root([bytes.fromhex(odd), b"\x00"])
