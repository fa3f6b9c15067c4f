"""Merkle trees as in RFC 6962 / RFC 9162 (Certificate Transparency): tree hashes,
inclusion proofs and their verification, over 32-byte record digests.

Leaves and interior nodes are hashed with distinct prefixes (0x00 and 0x01), so a leaf
can never be passed off as a node (second-preimage resistance of the tree). The tree over
n leaves splits at k, the largest power of two smaller than n (RFC 9162 §2.1.1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from hashlib import sha256
from operator import add, methodcaller

from service.native import native_merkle

LEAF = b"\x00"
NODE = b"\x01"
EMPTY_ROOT = sha256(b"").digest()
_DIGEST = methodcaller("digest")


def leaf_hash(data: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d)."""
    return sha256(LEAF + data).digest()


def leaf_hashes(leaves: Iterable[bytes]) -> list[bytes]:
    """:func:`leaf_hash` of each, as C-level maps (no Python call per leaf)."""
    return list(map(_DIGEST, map(sha256, map(LEAF.__add__, leaves))))


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return sha256(NODE + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """The tree head over already-hashed leaves (32 bytes each): by the native path
    (service/_native.c) where built, else :func:`python_root_from_leaf_hashes`."""
    native = native_merkle()
    if native is not None and hashes:
        return native[0](hashes)
    return python_root_from_leaf_hashes(hashes)


def root_of_leaf_buffer(buf: bytes | bytearray) -> bytes:
    """The tree head over leaf hashes stored end to end (32 bytes each, at least one):
    the transform's ``BatchResult.leaves[month]``."""
    if not buf or len(buf) % 32:
        raise ValueError("leaf hashes: a non-empty multiple of 32 bytes")
    native = native_merkle()
    if native is not None:
        return native[0](buf)
    return python_root_from_leaf_hashes([bytes(buf[i : i + 32]) for i in range(0, len(buf), 32)])


def root_of_hex_digests(digests: Sequence[str]) -> bytes:
    """The tree head over the leaves ``bytes.fromhex(d)`` of hex digests ("" is an empty
    leaf): what ``cdranon process`` signs per line range of a month file."""
    native = native_merkle()
    if native is not None and digests:
        try:
            return native[1](digests)
        except ValueError:
            pass  # not plain hex of a digest's length: bytes.fromhex decides below
    return python_root_from_leaf_hashes(leaf_hashes(map(bytes.fromhex, digests)))


def python_root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """The tree head over already-hashed leaves, iteratively (no recursion depth limit).

    Pairs adjacent nodes level by level, promoting an odd last node unchanged; for the
    left-balanced tree of RFC 6962 this gives the same root as the recursive definition.
    """
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        # node_hash as a chain of C-level maps, no Python loop: a month is millions of
        # nodes. map() stops at the shorter input: an odd last node has no partner and is
        # promoted below.
        msgs = map(add, map(NODE.__add__, level[0::2]), level[1::2])
        nxt = list(map(_DIGEST, map(sha256, msgs)))
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over raw leaf data."""
    return root_from_leaf_hashes(leaf_hashes(leaves))


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]): the audit path of leaf ``index`` (RFC 9162 §2.1.3.1)."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} out of range for a tree of {n}")
    hashes = [leaf_hash(d) for d in leaves]
    return _path(index, hashes)


def _path(m: int, hashes: list[bytes]) -> list[bytes]:
    n = len(hashes)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*_path(m, hashes[:k]), root_from_leaf_hashes(hashes[k:])]
    return [*_path(m - k, hashes[k:]), root_from_leaf_hashes(hashes[:k])]


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], expected_root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` show leaf data ``leaf`` at ``index`` under the root?"""
    if not 0 <= index < tree_size or any(len(p) != 32 for p in proof):
        return False
    fn, sn = index, tree_size - 1
    r = leaf_hash(leaf)
    for p in proof:
        if sn == 0:
            return False  # proof longer than the tree is deep
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == expected_root
