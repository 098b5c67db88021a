"""rsync-style delta engine: block signatures, greedy matching, compact wire formats.

Pure functions over file descriptors (read with :func:`os.pread`, streaming, bounded memory),
vectorised with numpy. The receiver makes the :func:`signature` of its current version of a file
(the *basis*) with a random seed; the sender runs :func:`delta` of the new file against it and
streams :func:`encode_ops` frames; the receiver applies :func:`decode_ops` of each frame. The
receiver's whole-file SHA-256 is the last word: a false block match only makes the transfer fail
(and be re-sent whole), so checksums are truncated, as rsync does.

Checksums of a block ``x[0..n)`` (``n`` = block size, or less for the basis's short last block):

- weak: ``h = (sum(k * x[k]) + 0x9E3779B1 * sum(x[k])) mod 2**32`` -- rsync's two running sums
  mixed into 32 bits, computable at every offset from prefix sums; the signature keeps its top
  ``weak_len`` bytes (``h >> (32 - 8 * weak_len)``): 3 for up to 2**14 blocks, else 4;
- strong: the first ``strong_len`` bytes of ``xxh3_128(x, seed)``; ``weak_len + strong_len`` is
  chosen per basis so a false match stays rarer than about 2**-12 per file (7 bytes per block for
  256 MiB in 16 KiB blocks, like rsync).

Signature (all integers little-endian)::

    header   "RDSG" | version u8 (=1) | weak_len u8 (3..4) | strong_len u8 (2..16) | reserved u8 (=0)
             | block_size u32 (512 .. 1 MiB) | basis_size u64 | seed u64                (28 bytes)
    weak     nblocks x weak_len bytes       nblocks = ceil(basis_size / block_size) <= 2**23
    strong   nblocks x strong_len bytes

Ops stream: a sequence of frames, each a payload of at most 4 MiB - 16 bytes::

    frame    flag u8 (0 = body follows raw, 1 = body is one zstd frame with its content size)
             | body (at most 4 MiB - 17 bytes once decompressed)
    body     op*   (ops never span frames)
    op       varint(n << 1) | n literal bytes                           Literal, n >= 1
             varint(count << 1 | 1) | zigzag varint(index - expected)    Copy, count >= 1

``expected`` is the block after the previous Copy of the same frame (0 at a frame's start), so an
in-order copy of up to 63 blocks costs 2 bytes. Varints are LEB128 (< 2**63). ``Copy(index, count)`` means basis bytes
``[index*B, min((index+count)*B, basis_size))``.

Matching is rsync's greedy algorithm: after a match of block ``j`` the block ``j+1`` is tried at
the following position first (one hash, strong sum only); otherwise the weak sums of every offset of a search
window are computed at once (prefix sums), filtered through a small table, a bitmap and the
sorted weak sums, and the candidates confirmed with the strong sum in offset order: the lowest
offset wins. The basis's short last block is matched only at the very end of the new file.
"""

from __future__ import annotations

import math
import os
import struct
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

__all__ = [
    "Copy", "DeltaError", "DeltaStats", "Literal", "Signature", "choose_block_size", "decode_ops",
    "decode_signature", "delta", "encode_ops", "encode_signature", "patch", "signature",
]

MIN_BLOCK = 512
MAX_BLOCK = 1 << 20
MAX_NBLOCKS = 1 << 23                   # 1 TiB in 128 KiB blocks; bounds a sender's memory
MAX_FRAME = 4 * 1024 * 1024 - 16        # a frame payload, flag byte included
MAX_BODY = MAX_FRAME - 1                # a frame body, before compression
MAX_INDEX = 1 << 40                     # copies beyond this block index are malformed
SIG_MAGIC = b"RDSG"
SIG_VERSION = 1
WEAK_K = 0x9E3779B1
ZSTD_LEVEL = 1
_SAMPLE = 64 * 1024
"""Bytes of a frame body tried first: the rest is compressed only if they compress."""

_SIG_HEADER = struct.Struct("<4sBBBBIQQ")
_ENTRY_BYTES = 8                        # signature bytes per block, for choose_block_size
_SIG_CHUNK = 4 << 20                    # signature and patch read size
_WEAK_CHUNK = 256 << 10                 # signature weak sums per matrix product (stays in cache)
_WINDOW = 8 << 20                       # delta read window
_SUB = 128 << 10                        # offsets per vectorised weak-sum pass (stays in cache)
_MAX_STEP = 1 << 20                     # largest search step (offsets)
_LIT_CHUNK = 1 << 20                    # literal ops from delta() are at most this long
_U64_32 = np.uint64(32)

U8Array = npt.NDArray[np.uint8]
U32Array = npt.NDArray[np.uint32]


class DeltaError(Exception):
    """Malformed signature or ops (hostile or broken peer), or a file shorter than its size."""


@dataclass
class DeltaStats:
    """Counters filled by :func:`delta`."""

    literal_bytes: int = 0
    copied_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Literal:
    """New bytes, sent as they are."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Copy:
    """``count`` consecutive basis blocks starting at block ``index``."""

    index: int
    count: int


@dataclass(eq=False)
class Signature:
    """Block checksums of a basis: ``weak`` (uint32 values < 2**(8*weak_len)) and ``strong``
    (uint8, nblocks x strong_len), one row per block; the last block may be short."""

    block_size: int
    basis_size: int
    seed: int
    strong_len: int
    weak: U32Array = field(repr=False)
    strong: U8Array = field(repr=False)
    weak_len: int = 4

    @property
    def nblocks(self) -> int:
        return -(-self.basis_size // self.block_size)

    def check(self) -> None:
        """Raise :class:`DeltaError` unless the fields are consistent and within limits."""
        _check_params(self.block_size, self.basis_size, self.weak_len, self.strong_len)
        if not 0 <= self.seed < 1 << 64:
            raise DeltaError("seed outside 0..2**64")
        n = self.nblocks
        if self.weak.shape != (n,) or self.strong.shape != (n, self.strong_len):
            raise DeltaError("signature arrays do not match the basis size")
        if n and int(self.weak.max()) >> (8 * self.weak_len):
            raise DeltaError("weak sum wider than weak_len")


def _check_params(block: int, basis_size: int, weak_len: int, strong_len: int) -> None:
    if not MIN_BLOCK <= block <= MAX_BLOCK:
        raise DeltaError(f"block size {block} outside {MIN_BLOCK}..{MAX_BLOCK}")
    if weak_len not in (3, 4):
        raise DeltaError(f"weak length {weak_len} outside 3..4")
    if not 2 <= strong_len <= 16:
        raise DeltaError(f"strong length {strong_len} outside 2..16")
    if basis_size < 0 or -(-basis_size // block) > MAX_NBLOCKS:
        raise DeltaError(f"basis of {basis_size} bytes: too many blocks of {block}")


def choose_block_size(size: int, history: int | None) -> int:
    """Block size for a basis of ``size`` bytes: about sqrt(size), rounded to 1 KiB, 2-128 KiB.

    ``history`` is the number of changed regions (literal runs) of the previous delta of this path;
    given, the size minimising signature + literal bytes for that many regions is used:
    sqrt(size * bytes-per-entry / regions), i.e. smaller blocks for scattered edits. Bases over
    1 TiB get larger blocks (up to 1 MiB), to stay within :data:`MAX_NBLOCKS`.
    """
    size = max(size, 0)
    if history is None:
        b = math.isqrt(size)
    else:
        b = math.isqrt(size * _ENTRY_BYTES // max(history, 1))
    b = min(max((b + 512) // 1024 * 1024, 2048), 128 * 1024)
    least = -(-size // MAX_NBLOCKS)
    return b if b >= least else min(-(-least // 1024) * 1024, MAX_BLOCK)


def _checksum_lengths(basis_size: int, block_size: int) -> tuple[int, int]:
    """(weak_len, strong_len) for a basis: as short as keeps a false match below about 2**-12.

    A 3-byte weak sum while a search's false candidates stay rare (<= 2**-10 per offset). False
    matches can come from the blocks tried in order (strong sum only: ~nblocks trials) and from
    weak-sum collisions while searching (assumed over a quarter of the file).
    """
    nb = max(1, -(-basis_size // block_size))
    weak_len = 3 if nb <= 1 << 14 else 4
    trials = nb + max(basis_size, block_size) * nb / 2.0 ** (8 * weak_len) / 4
    for strong_len in range(2, 16):
        if trials * 2.0 ** (-8 * strong_len) <= 2.0 ** -12:
            return weak_len, strong_len
    return weak_len, 16


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; DeltaError if the file ends first."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise DeltaError(f"file ended at {offset + done}, before its size")
        done += n


_W32 = np.stack([np.ones(256, np.float32), np.arange(256, dtype=np.float32)], axis=1)


def _block_hashes(x: U8Array, block: int) -> U32Array:
    """32-bit weak hashes ``h`` of the consecutive full blocks of ``x`` (len(x) a multiple of ``block``)."""
    nb = len(x) // block
    if block % 256 == 0:
        # Float32 products over 256-byte sub-blocks are exact (sums < 2**24); combine in int64.
        g = block // 256
        s = (x.reshape(-1, 256).astype(np.float32) @ _W32).astype(np.int64).reshape(nb, g, 2)
        a = s[:, :, 0].sum(axis=1)
        b = s[:, :, 1].sum(axis=1) + s[:, :, 0] @ (np.arange(g, dtype=np.int64) * 256)
    else:
        w = np.stack([np.ones(block), np.arange(block, dtype=np.float64)], axis=1)
        s = (x.reshape(nb, block).astype(np.float64) @ w).astype(np.int64)  # exact: < 2**53
        a, b = s[:, 0], s[:, 1]
    return ((b + WEAK_K * a) & 0xFFFFFFFF).astype(np.uint32)


def _hash1(x: U8Array) -> int:
    """32-bit weak hash ``h`` of one block of any length."""
    v = x.astype(np.int64)
    return (int((v * np.arange(len(v), dtype=np.int64)).sum()) + WEAK_K * int(v.sum())) & 0xFFFFFFFF


def signature(fd: int, size: int, block_size: int, seed: int) -> Signature:
    """Block signature of the first ``size`` bytes of ``fd`` (the basis), read in 4 MiB chunks.

    ``seed`` (0 <= seed < 2**64) seeds the strong hash: pick it at random per transfer.
    ValueError for arguments out of range, DeltaError if the file is shorter than ``size``.
    """
    if not MIN_BLOCK <= block_size <= MAX_BLOCK or not 0 <= seed < 1 << 64 or size < 0:
        raise ValueError("block size, seed or size out of range")
    nb = -(-size // block_size)
    if nb > MAX_NBLOCKS:
        raise ValueError(f"{size} bytes make too many blocks of {block_size}")
    weak_len, strong_len = _checksum_lengths(size, block_size)
    hashes = np.empty(nb, np.uint32)
    strong = bytearray()
    chunk = block_size * max(1, _SIG_CHUNK // block_size)
    sub = max(1, _WEAK_CHUNK // block_size)
    buf = bytearray(min(chunk, size))
    mv = memoryview(buf)
    arr = np.frombuffer(buf, np.uint8)
    digest = xxhash.xxh3_128_digest
    pos = blk = 0
    while pos < size:
        n = min(chunk, size - pos)
        _pread_into(fd, mv[:n], pos)
        full = n // block_size
        for i in range(0, full, sub):
            k = min(sub, full - i)
            hashes[blk + i:blk + i + k] = _block_hashes(arr[i * block_size:(i + k) * block_size], block_size)
        if n > full * block_size:
            hashes[blk + full] = _hash1(arr[full * block_size:n])
        for off in range(0, n, block_size):
            strong += digest(mv[off:off + block_size], seed=seed)[:strong_len]
        blk += -(-n // block_size)
        pos += n
    mv.release()
    weak = hashes >> np.uint32(32 - 8 * weak_len)
    strong_arr = np.frombuffer(bytes(strong), np.uint8).reshape(nb, strong_len)
    return Signature(block_size, size, seed, strong_len, weak, strong_arr, weak_len)


def encode_signature(sig: Signature) -> bytes:
    """The wire form of ``sig`` (see the module docstring): 28-byte header, weak sums, strong sums."""
    sig.check()
    head = _SIG_HEADER.pack(SIG_MAGIC, SIG_VERSION, sig.weak_len, sig.strong_len, 0, sig.block_size,
                            sig.basis_size, sig.seed)
    weak = sig.weak.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :sig.weak_len]
    return head + weak.tobytes() + np.ascontiguousarray(sig.strong, np.uint8).tobytes()


def decode_signature(data: bytes) -> Signature:
    """Parse :func:`encode_signature` output; DeltaError on anything malformed or oversized."""
    if len(data) < _SIG_HEADER.size:
        raise DeltaError("signature shorter than its header")
    magic, version, weak_len, strong_len, reserved, block, basis_size, seed = _SIG_HEADER.unpack_from(data)
    if magic != SIG_MAGIC:
        raise DeltaError("not a signature (bad magic)")
    if version != SIG_VERSION or reserved:
        raise DeltaError(f"unsupported signature version {version}")
    _check_params(block, basis_size, weak_len, strong_len)
    nb = -(-basis_size // block)
    want = _SIG_HEADER.size + nb * (weak_len + strong_len)
    if len(data) != want:
        raise DeltaError(f"signature of {len(data)} bytes, {nb} blocks need {want}")
    at = _SIG_HEADER.size
    raw = np.zeros((nb, 4), np.uint8)
    raw[:, :weak_len] = np.frombuffer(data, np.uint8, nb * weak_len, at).reshape(nb, weak_len)
    weak = raw.view("<u4").reshape(nb).astype(np.uint32)
    strong = np.frombuffer(data, np.uint8, nb * strong_len, at + nb * weak_len).reshape(nb, strong_len).copy()
    return Signature(block, basis_size, seed, strong_len, weak, strong, weak_len)


class _Reader:
    """A sliding window over the new file: ``ensure(lo, hi)`` makes bytes [lo, hi) addressable."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.base = self.end = 0
        self._alloc(min(_WINDOW, size))

    def _alloc(self, cap: int) -> None:
        self.buf = bytearray(cap)
        self.mv = memoryview(self.buf)
        self.arr = np.frombuffer(self.buf, np.uint8)

    def ensure(self, lo: int, hi: int) -> None:
        hi = min(hi, self.size)
        if lo >= self.base and hi <= self.end:
            return
        keep = 0
        if hi - lo > len(self.buf):
            self._alloc(max(hi - lo, _WINDOW))
        elif self.base <= lo < self.end:
            keep = self.end - lo
            self.arr[:keep] = self.arr[lo - self.base:self.end - self.base]
        end = min(self.size, lo + len(self.buf))
        _pread_into(self.fd, self.mv[keep:end - lo], lo + keep)
        self.base, self.end = lo, end


class _Index:
    """The sender's view of a signature: filters, blocks by weak sum, buffers (~30 bytes a block)."""

    def __init__(self, sig: Signature) -> None:
        sig.check()
        self.block = b = sig.block_size
        self.nfull = sig.basis_size // b
        self.short = sig.basis_size - self.nfull * b    # length of a short last block, or 0
        self.wl = wl = sig.weak_len
        self.sl = sig.strong_len
        self.strong = sig.strong
        self.strong_flat = np.ascontiguousarray(sig.strong).tobytes()
        # The full blocks sorted by weak sum, then index: those of weak sum uniq[u] are
        # order[first[u]:first[u + 1]], lowest index first.
        self.order = np.argsort(sig.weak[:self.nfull], kind="stable").astype(np.uint32)
        self.uniq, first = np.unique(sig.weak[self.order], return_index=True)
        self.first = np.append(first, self.nfull).astype(np.uint32)
        # Filters over the 32-bit hashes h of every offset: a table small enough for the L2 cache,
        # then a 2**24-bit map (exact for 3-byte weak sums), then the sorted weak sums.
        h = self.uniq.astype(np.uint32) << np.uint32(32 - 8 * wl)
        bits = min(max(self.nfull.bit_length() + 4, 16), 20)
        self.table = np.zeros(1 << bits, np.bool_)
        self.table[h >> np.uint32(32 - bits)] = True
        self.shift = np.uint64(64 - bits)
        top = h >> np.uint32(8)
        self.bitmap = np.zeros(1 << 21, np.uint8)
        np.bitwise_or.at(self.bitmap, top >> 3, (1 << (top & 7)).astype(np.uint8))
        self.wshift = np.uint64(64 - 8 * wl)
        # Multipliers and buffers of the packed prefix sums (see _Sender.weak_candidates).
        span = _SUB + b
        i = np.arange(span, dtype=np.uint64)
        self.m1 = np.uint64(1) + (i << _U64_32)
        self.m2 = np.uint64(1) + (((np.uint64(WEAK_K) - i) & np.uint64(0xFFFFFFFF)) << _U64_32)
        self.tmp = np.empty(span, np.uint64)
        self.prefix = np.zeros(span + 1, np.uint64)
        self.pairs = np.empty(span // 2 + 1, np.uint64)
        self.idx = np.empty(span, np.uint64)
        self.hit = np.empty(span, np.bool_)


class _Sender:
    """State of one :func:`delta` run (see the module docstring for the algorithm)."""

    def __init__(self, fd: int, size: int, sig: Signature, stats: DeltaStats) -> None:
        self.size, self.sig, self.stats = size, sig, stats
        self.ix = _Index(sig)
        self.reader = _Reader(fd, size)
        self.lit = 0                    # start of the pending literal
        self.run_index = self.run_count = 0
        self.c_lo = self.c_hi = 0       # offsets whose weak sums were computed ...
        self.c_off: list[int] = []      # ... and their candidates (see weak_candidates)
        self.c_head: list[int] = []
        self.c_count: list[int] = []
        self.c_start: list[int] = []
        self.ci = 0
        self.step = 0

    def weak_candidates(self, lo: int, hi: int) -> None:
        """Cache the offsets in [lo, hi) whose weak sum is in the signature ([lo, hi+B-1) is read).

        One uint64 prefix sum carries both running sums: x * (1 + (i << 32)) accumulates sum(x) in
        the low half (< 2**32 for windows under 16 MiB) and sum(i * x) mod 2**32 in the high half.
        A window's difference D = a + (t << 32); D * (1 + (c << 32)) with c = K - q has the high
        half t + (K - q) * a = h, the 32-bit weak hash at relative offset q.
        """
        ix, rd, b = self.ix, self.reader, self.ix.block
        offs: list[int] = []
        heads: list[int] = []                   # per candidate: its first block of that weak sum,
        counts: list[int] = []                  # how many blocks share the weak sum,
        starts: list[int] = []                  # where they start in ix.order
        for s in range(lo, hi, _SUB):
            n = min(s + _SUB, hi) - s
            m = n + b - 1
            x = rd.arr[s - rd.base:s - rd.base + m]
            v = np.multiply(x, ix.m1[:m], out=ix.tmp[:m])
            # prefix[k] = sum(v[:k]), through pair sums: twice as fast as a plain cumsum
            h = m // 2
            np.cumsum(np.add(v[0:2 * h:2], v[1:2 * h:2], out=ix.pairs[:h]), out=ix.prefix[2:2 * h + 1:2])
            np.add(ix.prefix[0:2 * h - 1:2], v[0:2 * h:2], out=ix.prefix[1:2 * h:2])
            if m & 1:
                np.add(ix.prefix[m - 1:m], v[m - 1:m], out=ix.prefix[m:m + 1])
            d = np.subtract(ix.prefix[b:m + 1], ix.prefix[:n], out=ix.tmp[:n])
            np.multiply(d, ix.m2[:n], out=d)
            top = np.right_shift(d, ix.shift, out=ix.idx[:n])
            np.take(ix.table, top.view(np.int64), out=ix.hit[:n])
            cand = np.flatnonzero(ix.hit[:n])
            if not cand.size:
                continue
            dc = d[cand]
            t24 = (dc >> np.uint64(40)).astype(np.uint32)
            keep = ((ix.bitmap[t24 >> 3] >> (t24 & 7).astype(np.uint8)) & 1).view(np.bool_)
            cand, w = cand[keep], (dc[keep] >> ix.wshift).astype(np.uint32)
            if not cand.size:
                continue
            u = np.searchsorted(ix.uniq, w)
            np.minimum(u, len(ix.uniq) - 1, out=u)
            ok = ix.uniq[u] == w
            cand, u = cand[ok], u[ok]
            start = ix.first[u]
            offs.extend((cand + s).tolist())
            heads.extend(ix.order[start].tolist())
            counts.extend((ix.first[u + 1] - start).tolist())
            starts.extend(start.tolist())
        self.c_lo, self.c_hi, self.c_off, self.ci = lo, hi, offs, 0
        self.c_head, self.c_count, self.c_start = heads, counts, starts

    def pick(self, start: int, count: int, strong: bytes, want: int) -> int:
        """Among ``count`` blocks of equal weak sum (from ``start`` in ``order``), the one with this
        strong sum: ``want`` if it is one, else the lowest; -1 if none."""
        ix = self.ix
        idx = ix.order[start:start + count]
        same = idx[(ix.strong[idx] == np.frombuffer(strong, np.uint8)).all(axis=1)]
        if not same.size:
            return -1
        return want if want in same else int(same[0])

    def search(self, p: int) -> Iterator[Literal | Copy | tuple[int, int]]:
        """Yield literal flushes, then (q, block) of the lowest match at q >= p, or (-1, -1)."""
        ix = self.ix
        max_q = self.size - ix.block
        blk, sl, strong_flat = ix.block, ix.sl, ix.strong_flat
        digest, seed = xxhash.xxh3_128_digest, self.sig.seed
        want = self.run_index + self.run_count if self.run_count else 0
        if want >= ix.nfull:
            want = 0
        if not ix.nfull:
            p = max(p, max_q + 1)
        grow = False                    # doubling steps while a search keeps missing
        while p <= max_q:
            if not self.c_lo <= p < self.c_hi:
                self.step = min(2 * self.step, _MAX_STEP) if grow else max(ix.block + ix.block // 4, 16384)
                hi = min(p + self.step, max_q + 1)
                self.reader.ensure(min(self.lit, p), hi - 1 + ix.block)
                self.weak_candidates(p, hi)
            # Confirm the candidates (weak sum in the signature) in offset order with the strong sum.
            offs, heads, counts, rd = self.c_off, self.c_head, self.c_count, self.reader
            ci = bisect_left(offs, p, self.ci)
            while ci < len(offs):
                q = offs[ci]
                ci += 1
                if q < rd.base or q + blk > rd.end:
                    rd.ensure(min(self.lit, q), q + blk)
                at = q - rd.base
                s = digest(rd.mv[at:at + blk], seed=seed)[:sl]
                j = heads[ci - 1]
                if counts[ci - 1] > 1:
                    j = self.pick(self.c_start[ci - 1], counts[ci - 1], s, want)
                elif strong_flat[j * sl:j * sl + sl] != s:
                    j = -1
                if j >= 0:
                    self.ci = ci
                    yield (q, j)
                    return
            self.ci = ci
            p, grow = self.c_hi, True
            if p - self.lit >= _LIT_CHUNK:
                yield from self.flush(p)
        yield (-1, -1)

    def flush(self, upto: int) -> Iterator[Literal | Copy]:
        """The pending copy, then the literal [lit, upto) in pieces."""
        if self.run_count:
            yield Copy(self.run_index, self.run_count)
            self.run_count = 0
        while self.lit < upto:
            n = min(_LIT_CHUNK, upto - self.lit)
            self.reader.ensure(self.lit, self.lit + n)
            at = self.lit - self.reader.base
            yield Literal(bytes(self.reader.mv[at:at + n]))
            self.stats.literal_bytes += n
            self.lit += n

    def matched(self, q: int, j: int, length: int) -> Iterator[Literal | Copy]:
        """Block ``j`` (``length`` bytes) matches at ``q``: flush the literal before, extend or start a run."""
        if q > self.lit:
            yield from self.flush(q)
        if self.run_count and self.run_index + self.run_count == j:
            self.run_count += 1
        else:
            if self.run_count:
                yield Copy(self.run_index, self.run_count)
            self.run_index, self.run_count = j, 1
        self.stats.copied_bytes += length
        self.lit = q + length

    def short_matches(self, q: int) -> bool:
        """Whether the basis's short last block matches the new file's tail at ``q``."""
        ix, rd, sig = self.ix, self.reader, self.sig
        rd.ensure(min(self.lit, q), self.size)
        at = q - rd.base
        s = xxhash.xxh3_128_digest(rd.mv[at:at + ix.short], seed=sig.seed)[:ix.sl]
        if s != ix.strong_flat[ix.nfull * ix.sl:(ix.nfull + 1) * ix.sl]:
            return False
        return _hash1(rd.arr[at:at + ix.short]) >> (32 - 8 * ix.wl) == int(sig.weak[ix.nfull])

    def run(self) -> Iterator[Literal | Copy]:
        ix, rd, size, b = self.ix, self.reader, self.size, self.ix.block
        strong, nfull, seed, sl = ix.strong_flat, ix.nfull, self.sig.seed, ix.sl
        digest = xxhash.xxh3_128_digest
        max_q = size - b
        p = 0
        while p < size:
            if self.run_count:          # just matched: try the next block first
                e = self.run_index + self.run_count
                while e < nfull and p <= max_q:
                    if p + b > rd.end:
                        rd.ensure(p, p + b)
                    at = p - rd.base
                    if digest(rd.mv[at:at + b], seed=seed)[:sl] != strong[e * sl:e * sl + sl]:
                        break
                    self.run_count += 1
                    self.stats.copied_bytes += b
                    p += b
                    e += 1
                self.lit = p
                if e == nfull and ix.short and size - p == ix.short and self.short_matches(p):
                    yield from self.matched(p, e, ix.short)
                    p = size
                    break
            q = j = -1
            for item in self.search(p):
                if isinstance(item, tuple):
                    q, j = item
                else:
                    yield item
            if q < 0:
                break
            yield from self.matched(q, j, b)
            p = q + b
        tail = size - ix.short          # the short block may match only at the very end
        if ix.short and p <= tail and self.short_matches(tail):
            yield from self.matched(tail, nfull, ix.short)
        yield from self.flush(size)
        if self.run_count:
            yield Copy(self.run_index, self.run_count)
            self.run_count = 0


def delta(fd: int, size: int, sig: Signature, stats: DeltaStats | None = None) -> Iterator[Literal | Copy]:
    """Ops rebuilding the first ``size`` bytes of ``fd`` (the new file) from the basis of ``sig``.

    Streams: reads the new file in 8 MiB windows; literals come in pieces of at most 1 MiB,
    consecutive copies merged. ``stats`` (if given) counts literal and copied bytes.
    DeltaError if ``sig`` is inconsistent or the file is shorter than ``size``.
    """
    st = stats if stats is not None else DeltaStats()
    if size <= 0:
        return
    if sig.basis_size == 0:
        sig.check()
        reader = _Reader(fd, size)
        for pos in range(0, size, _LIT_CHUNK):
            n = min(_LIT_CHUNK, size - pos)
            reader.ensure(pos, pos + n)
            yield Literal(bytes(reader.mv[pos - reader.base:pos - reader.base + n]))
            st.literal_bytes += n
        return
    yield from _Sender(fd, size, sig, st).run()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: bytes | memoryview, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf):
            raise DeltaError("truncated varint")
        c = buf[i]
        i += 1
        n |= (c & 0x7F) << shift
        if not c & 0x80:
            return n, i
        shift += 7
        if shift >= 63:
            raise DeltaError("varint too long")


def encode_ops(ops: Iterable[Literal | Copy], max_body: int = 0) -> Iterator[bytes]:
    """Frame payloads (each at most 4 MiB - 16 bytes) carrying ``ops``; see the module docstring.

    Adjacent literals are joined; a frame's body is zstd-compressed when that makes it smaller.
    ``max_body`` (bytes, 64 KiB .. the 4 MiB maximum; 0: the maximum) caps a frame's body, e.g.
    to bound memory and latency when frames are streamed. A large body is compressed only if its
    first 64 KiB compress by 10% or more (random or already compressed data would cost a whole
    zstd pass for nothing). Nothing is yielded for no ops.
    """
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    limit = MAX_BODY if max_body <= 0 else max(64 * 1024, min(max_body, MAX_BODY))
    body = bytearray()
    pending: list[memoryview] = []      # the literal being gathered, written when it ends
    plen = expect = 0

    def close_literal() -> None:
        nonlocal plen
        if plen:
            body.extend(_varint(plen << 1))
            for piece in pending:
                body.extend(piece)
            pending.clear()
            plen = 0

    def frame() -> bytes:
        nonlocal body, expect
        close_literal()
        out = b"\x00" + body
        sample = memoryview(body)[:_SAMPLE]
        if len(body) <= _SAMPLE or len(cctx.compress(sample)) < len(sample) * 0.9:
            packed = cctx.compress(body)
            if len(packed) < len(body):
                out = b"\x01" + packed
        body, expect = bytearray(), 0
        return out

    for op in ops:
        if isinstance(op, Copy):
            if op.index < 0 or op.count < 1:
                raise DeltaError(f"bad copy {op}")
            close_literal()
            if len(body) + 24 > limit:
                yield frame()
            d = op.index - expect
            body += _varint(op.count << 1 | 1)
            body += _varint(d << 1 if d >= 0 else (-d << 1) - 1)
            expect = op.index + op.count
            continue
        data = memoryview(op.data).cast("B")
        i = 0
        while i < len(data):
            room = limit - len(body) - plen - 5
            if room < 4096:
                yield frame()
                continue
            n = min(len(data) - i, room)
            pending.append(data[i:i + n])
            plen += n
            i += n
    if body or plen:
        yield frame()


def decode_ops(frames: Iterable[bytes]) -> Iterator[Literal | Copy]:
    """The ops of :func:`encode_ops` frames; DeltaError on malformed input (sizes checked first)."""
    dctx = zstandard.ZstdDecompressor()
    for payload in frames:
        if not 1 <= len(payload) <= MAX_FRAME:
            raise DeltaError(f"frame of {len(payload)} bytes")
        flag = payload[0]
        body: bytes | memoryview
        if flag == 0:
            body = memoryview(payload)[1:]
        elif flag == 1:
            packed = payload[1:]
            try:
                declared = zstandard.frame_content_size(packed)
                if not 0 < declared <= MAX_BODY:
                    raise DeltaError(f"compressed frame declares {declared} bytes")
                body = dctx.decompress(packed, max_output_size=MAX_BODY, allow_extra_data=False)
            except zstandard.ZstdError as e:
                raise DeltaError(f"bad compressed frame: {e}") from None
            if len(body) != declared:
                raise DeltaError("compressed frame size mismatch")
        else:
            raise DeltaError(f"unknown frame flag {flag}")
        i = expect = 0
        while i < len(body):
            v, i = _read_varint(body, i)
            if v & 1:
                count = v >> 1
                d, i = _read_varint(body, i)
                index = expect + (-((d + 1) >> 1) if d & 1 else d >> 1)
                if count < 1 or index < 0 or index + count > MAX_INDEX:
                    raise DeltaError(f"bad copy of {count} blocks at {index}")
                yield Copy(index, count)
                expect = index + count
            else:
                n = v >> 1
                if n < 1 or i + n > len(body):
                    raise DeltaError(f"bad literal of {n} bytes")
                yield Literal(bytes(body[i:i + n]))
                i += n


def patch(basis_fd: int, basis_size: int, block_size: int, ops: Iterable[Literal | Copy],
          write: Callable[[bytes], None]) -> int:
    """Apply ``ops`` to the basis, passing the new file's bytes to ``write``; return the bytes written.

    A reference implementation (the receiver applies ops itself). DeltaError for copies outside
    the basis.
    """
    if not MIN_BLOCK <= block_size <= MAX_BLOCK:
        raise DeltaError(f"block size {block_size} outside {MIN_BLOCK}..{MAX_BLOCK}")
    nb = -(-basis_size // block_size)
    total = 0
    for op in ops:
        if isinstance(op, Literal):
            write(bytes(op.data))
            total += len(op.data)
            continue
        if op.count < 1 or op.index < 0 or op.index + op.count > nb:
            raise DeltaError(f"copy of blocks {op.index}..{op.index + op.count} outside a basis of {nb}")
        start = op.index * block_size
        end = min((op.index + op.count) * block_size, basis_size)
        while start < end:
            buf = bytearray(min(_SIG_CHUNK, end - start))
            _pread_into(basis_fd, memoryview(buf), start)
            write(bytes(buf))
            start += len(buf)
            total += len(buf)
    return total
