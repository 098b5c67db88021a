"""The delta engine (relayd.relay.delta): exact rebuilds, rsync's greedy matching, wire formats, hostile input."""

from __future__ import annotations

import hashlib
import os
import random
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import xxhash
import zstandard

from relayd.relay import delta as deltalib
from relayd.relay.delta import Copy, DeltaError, DeltaStats, Literal, Signature

Op = Literal | Copy


class Files:
    """Writes files into a temporary directory and hands out read-only descriptors (closed at the end)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fds: list[int] = []
        self.n = 0

    def fd(self, data: bytes) -> int:
        self.n += 1
        path = self.root / f"f{self.n}"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        self.fds.append(fd)
        return fd


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Files]:
    f = Files(tmp_path)
    yield f
    for fd in f.fds:
        os.close(fd)


def rand(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def sync(files: Files, basis: bytes, new: bytes, block: int = 1024,
         seed: int = 0x5EED) -> tuple[list[Op], DeltaStats, Signature]:
    """Signature -> wire -> delta -> wire -> patch, as the peers do; asserts an exact rebuild."""
    bfd, nfd = files.fd(basis), files.fd(new)
    sig = deltalib.decode_signature(deltalib.encode_signature(deltalib.signature(bfd, len(basis), block, seed)))
    stats = DeltaStats()
    ops = list(deltalib.delta(nfd, len(new), sig, stats))
    frames = list(deltalib.encode_ops(ops))
    assert all(1 <= len(f) <= deltalib.MAX_FRAME for f in frames)
    h = hashlib.sha256()
    out = deltalib.patch(bfd, len(basis), block, (op for f in frames for op in deltalib.decode_ops([f])), h.update)
    assert out == len(new)
    assert h.digest() == hashlib.sha256(new).digest()
    assert stats.literal_bytes + stats.copied_bytes == len(new)
    assert stats.literal_bytes == sum(len(op.data) for op in ops if isinstance(op, Literal))
    return ops, stats, sig


def merged(ops: list[Op]) -> list[Op]:
    """Adjacent literals joined (delta() cuts long ones in pieces)."""
    out: list[Op] = []
    for op in ops:
        if isinstance(op, Literal) and out and isinstance(out[-1], Literal):
            out[-1] = Literal(out[-1].data + op.data)
        else:
            out.append(op)
    return out


# --- round trips -------------------------------------------------------------------------------


def test_identical_file_is_one_copy(files: Files) -> None:
    basis = rand(random.Random(1), 300_000)          # 292 full blocks + a short one
    ops, stats, sig = sync(files, basis, basis)
    assert ops == [Copy(0, sig.nblocks)]
    assert stats.literal_bytes == 0 and stats.copied_bytes == len(basis)


def test_identical_multiple_of_block(files: Files) -> None:
    basis = rand(random.Random(2), 64 * 1024)
    ops, stats, _ = sync(files, basis, basis)
    assert ops == [Copy(0, 64)] and stats.literal_bytes == 0


def test_insert_at_front(files: Files) -> None:
    rng = random.Random(3)
    basis = rand(rng, 200_000)
    front = rand(rng, 1000)
    ops, stats, sig = sync(files, basis, front + basis)
    assert merged(ops) == [Literal(front), Copy(0, sig.nblocks)]
    assert stats.literal_bytes == 1000


def test_delete_in_the_middle(files: Files) -> None:
    basis = rand(random.Random(4), 100 * 1024)
    new = basis[:50_000] + basis[50_100:]
    ops, stats, _ = sync(files, basis, new)
    assert stats.literal_bytes < 2048             # at most the remains of two blocks
    assert sum(1 for op in ops if isinstance(op, Copy)) == 2


def test_scattered_edits_cost_about_a_block_each(files: Files) -> None:
    rng = random.Random(5)
    basis = bytearray(rand(rng, 2 << 20))
    new = bytearray(basis)
    for pos in rng.sample(range(0, len(new) - 16384, 16384), 40):       # edits apart, some across blocks
        pos += rng.randrange(8192)
        new[pos:pos + 100] = rand(rng, 100)
    ops, stats, _ = sync(files, bytes(basis), bytes(new), block=2048)
    assert 40 * 2048 <= stats.literal_bytes <= 40 * 2 * 2048
    assert sum(1 for op in merged(ops) if isinstance(op, Literal)) == 40


def test_unrelated_data_is_all_literal(files: Files) -> None:
    rng = random.Random(6)
    ops, stats, _ = sync(files, rand(rng, 500_000), rand(rng, 700_000))
    assert stats.copied_bytes == 0 and stats.literal_bytes == 700_000
    assert all(isinstance(op, Literal) and len(op.data) <= 1 << 20 for op in ops)


@pytest.mark.parametrize("basis_len,new_len", [(0, 0), (0, 5000), (5000, 0), (100, 100), (100, 5000),
                                               (5000, 100), (1023, 1023), (1024, 1024), (1025, 1025)])
def test_small_and_empty_files(files: Files, basis_len: int, new_len: int) -> None:
    rng = random.Random(basis_len * 7 + new_len)
    basis = rand(rng, basis_len)
    new = (basis + rand(rng, new_len))[:new_len]
    ops, stats, _ = sync(files, basis, new)
    if basis_len == new_len and new_len:
        assert stats.literal_bytes == 0
    if new_len == 0:
        assert ops == []


def test_basis_shorter_and_longer(files: Files) -> None:
    rng = random.Random(7)
    basis = rand(rng, 300_000)
    _, stats, _ = sync(files, basis[:100_000], basis)          # grew: the old part is copied
    assert stats.copied_bytes == 97 * 1024                     # the short last block is not at the end
    _, stats, _ = sync(files, basis, basis[:100_000])          # shrank
    assert stats.literal_bytes <= 1024


def test_last_short_block_matches_only_at_the_end(files: Files) -> None:
    rng = random.Random(8)
    basis = rand(rng, 10 * 1024 + 300)
    ops, stats, _ = sync(files, basis, rand(rng, 500) + basis)
    assert merged(ops)[-1] == Copy(0, 11) and stats.literal_bytes == 500
    tail = basis[-300:]
    ops, stats, _ = sync(files, basis, basis[:4096] + tail + rand(rng, 3000))
    assert stats.copied_bytes == 4096                  # the tail elsewhere is not a match


def test_block_size_not_a_multiple_of_256(files: Files) -> None:
    rng = random.Random(9)
    basis = rand(rng, 50_000)
    new = basis[:20_000] + b"xyz" + basis[20_000:]
    _, stats, _ = sync(files, basis, new, block=1000)
    assert stats.literal_bytes <= 1003


def test_low_entropy_and_repeated_blocks(files: Files) -> None:
    rng = random.Random(10)
    unit = rand(rng, 1024)
    basis = unit * 50 + bytes(20_000) + bytes(rng.choice(b"ab") for _ in range(20_000))
    new = bytes(5000) + basis[:30_000] + b"ab" * 3000 + basis[30_000:] + unit * 3
    ops, stats, _ = sync(files, basis, new)
    assert stats.literal_bytes < 20_000


def test_sliding_windows_give_the_same_ops(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(11)
    basis = bytearray(rand(rng, 3 << 20))
    new = bytearray(basis)
    for _ in range(30):
        pos = rng.randrange(len(new))
        if rng.random() < 0.5:
            new[pos:pos] = rand(rng, rng.randrange(1, 3000))
        else:
            del new[pos:pos + rng.randrange(1, 3000)]
    new[1 << 20:(1 << 20) + 300_000] = rand(rng, 300_000)         # a long literal
    ops, _, _ = sync(files, bytes(basis), bytes(new), block=2048)
    for name, value in [("_WINDOW", 40_000), ("_SUB", 3000), ("_MAX_STEP", 9000), ("_LIT_CHUNK", 5000),
                        ("_SIG_CHUNK", 10_240), ("_WEAK_CHUNK", 4096)]:
        monkeypatch.setattr(deltalib, name, value)
    small, _, _ = sync(files, bytes(basis), bytes(new), block=2048)
    assert merged(small) == merged(ops)


def test_file_shorter_than_its_size(files: Files) -> None:
    fd = files.fd(b"x" * 5000)
    with pytest.raises(DeltaError):
        deltalib.signature(fd, 6000, 1024, 1)
    sig = deltalib.signature(fd, 5000, 1024, 1)
    with pytest.raises(DeltaError):
        list(deltalib.delta(files.fd(b"y" * 100), 200, sig))


def test_signature_arguments_checked(files: Files) -> None:
    fd = files.fd(b"x" * 100)
    for block, seed in [(256, 1), (2 << 20, 1), (1024, -1), (1024, 1 << 64)]:
        with pytest.raises(ValueError):
            deltalib.signature(fd, 100, block, seed)


# --- the matching is rsync's greedy algorithm ----------------------------------------------------


def reference_delta(basis: bytes, new: bytes, sig: Signature) -> list[Op]:
    """Straightforward rsync matching with a rolling weak sum, byte by byte (slow, obviously right)."""
    b, seed, slen, shift = sig.block_size, sig.seed, sig.strong_len, 32 - 8 * sig.weak_len
    nfull, short = len(basis) // b, len(basis) % b

    def strong(data: bytes) -> bytes:
        return xxhash.xxh3_128_digest(data, seed=seed)[:slen]

    def weak(data: bytes) -> int:
        a = sum(data)
        s = sum(k * x for k, x in enumerate(data))
        return ((s + deltalib.WEAK_K * a) & 0xFFFFFFFF) >> shift

    table: dict[tuple[int, bytes], list[int]] = {}
    for j in range(nfull):
        blk = basis[j * b:(j + 1) * b]
        table.setdefault((weak(blk), strong(blk)), []).append(j)
    weaks = {key[0] for key in table}
    ops: list[Op] = []

    def copy(j: int) -> None:
        last = ops[-1] if ops else None
        if isinstance(last, Copy) and last.index + last.count == j:
            ops[-1] = Copy(last.index, last.count + 1)
        else:
            ops.append(Copy(j, 1))

    def literal(lo: int, hi: int) -> None:
        if hi > lo:
            ops.append(Literal(new[lo:hi]))

    def short_at(q: int) -> bool:
        tail, blk = new[q:], basis[nfull * b:]
        return strong(tail) == strong(blk) and weak(tail) == weak(blk)

    p = lit = 0
    last = -1
    while p < len(new):
        if last >= 0:                                  # right after a match: the next block first
            e = last + 1
            if e < nfull and p + b <= len(new) and strong(new[p:p + b]) == strong(basis[e * b:(e + 1) * b]):
                copy(e)
                last, p, lit = e, p + b, p + b
                continue
            if e == nfull and short and len(new) - p == short and short_at(p):
                copy(e)
                p = lit = len(new)
                break
        found = None
        if p + b <= len(new):                          # roll the weak sum over every offset
            win = new[p:p + b]
            a = sum(win)
            s = sum(k * x for k, x in enumerate(win))
            q = p
            while True:
                w = ((s + deltalib.WEAK_K * a) & 0xFFFFFFFF) >> shift
                if w in weaks:
                    hits = table.get((w, strong(new[q:q + b])))
                    if hits:
                        want = last + 1 if last >= 0 else 0
                        found = (q, want if want in hits else hits[0])
                        break
                if q + b >= len(new):
                    break
                a += new[q + b] - new[q]
                s += b * new[q + b] - a
                q += 1
        if found is None:
            break
        q, j = found
        literal(lit, q)
        copy(j)
        last, p, lit = j, q + b, q + b
    tail = len(new) - short
    if short and p <= tail and lit <= tail and short_at(tail):
        literal(lit, tail)
        copy(nfull)
        lit = len(new)
    literal(lit, len(new))
    return ops


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(7)):
        pos, k = rng.randrange(len(out) + 1), rng.random()
        if k < 0.3:
            out[pos:pos] = rand(rng, rng.randrange(1, 700))
        elif k < 0.6:
            del out[pos:pos + rng.randrange(1, 700)]
        elif k < 0.8:
            seg = rand(rng, rng.randrange(1, 300))
            out[pos:pos + len(seg)] = seg
        else:
            src = rng.randrange(max(1, len(out)))
            out[pos:pos] = out[src:src + rng.randrange(1, 1500)]          # duplicate a stretch
    return bytes(out)


@pytest.mark.parametrize("lengths", [None, (3, 2), (4, 2), (4, 4)])
def test_matches_the_reference_greedy_algorithm(files: Files, monkeypatch: pytest.MonkeyPatch,
                                                lengths: tuple[int, int] | None) -> None:
    """Same ops as a byte-by-byte rsync matcher, also with short checksums that collide often."""
    if lengths is not None:
        monkeypatch.setattr(deltalib, "_checksum_lengths", lambda size, block: lengths)
    rng = random.Random(f"greedy-{lengths}")
    for _ in range(40):
        block = rng.choice([512, 600, 1024])
        size, kind = rng.randrange(12_000), rng.random()
        if kind < 0.3:
            basis = bytes(rng.choice(b"ab") for _ in range(size))
        elif kind < 0.5:
            basis = (rand(rng, block) * (size // block + 1))[:size]
        else:
            basis = rand(rng, size)
        new = mutate(rng, basis) if rng.random() < 0.9 else rand(rng, rng.randrange(6000))
        bfd, nfd = files.fd(basis), files.fd(new)
        sig = deltalib.signature(bfd, len(basis), block, rng.getrandbits(63))
        ops = merged(list(deltalib.delta(nfd, len(new), sig)))
        assert ops == reference_delta(basis, new, sig)
        if lengths is None or lengths[1] >= 4:                   # exact rebuild with real checksums
            h = hashlib.sha256()
            deltalib.patch(bfd, len(basis), block, ops, h.update)
            assert h.digest() == hashlib.sha256(new).digest()


def test_weak_sums_are_those_of_the_reference(files: Files) -> None:
    rng = random.Random(12)
    basis = rand(rng, 5 * 1024 + 77)
    sig = deltalib.signature(files.fd(basis), len(basis), 1024, 99)
    for j in range(sig.nblocks):
        blk = basis[j * 1024:(j + 1) * 1024]
        h = (sum(k * x for k, x in enumerate(blk)) + deltalib.WEAK_K * sum(blk)) & 0xFFFFFFFF
        assert int(sig.weak[j]) == h >> (32 - 8 * sig.weak_len)
        assert bytes(sig.strong[j]) == xxhash.xxh3_128_digest(blk, seed=99)[:sig.strong_len]


# --- block size and checksum lengths ------------------------------------------------------------


def test_choose_block_size() -> None:
    assert deltalib.choose_block_size(0, None) == 2048
    assert deltalib.choose_block_size(1 << 20, None) == 2048
    assert deltalib.choose_block_size(256 << 20, None) == 16384
    assert deltalib.choose_block_size(1 << 40, None) == 128 * 1024
    assert deltalib.choose_block_size((1 << 40) + 1, None) == 129 * 1024
    scattered = deltalib.choose_block_size(256 << 20, 655)
    assert 2048 <= scattered <= 4096
    assert deltalib.choose_block_size(256 << 20, 10) > deltalib.choose_block_size(256 << 20, 100) > scattered
    assert deltalib.choose_block_size(256 << 20, 0) == deltalib.choose_block_size(256 << 20, 1) <= 128 * 1024
    assert deltalib.choose_block_size(1 << 40, 10**9) == 128 * 1024      # at most 2**23 blocks
    assert deltalib.choose_block_size(5 << 40, None) == 640 * 1024
    assert deltalib.choose_block_size(1 << 50, None) == 1 << 20
    for size in (0, 1, 5000, 10**7, 10**9, 1 << 40):
        for history in (None, 0, 1, 50, 10**6):
            b = deltalib.choose_block_size(size, history)
            assert 2048 <= b <= 131072 and b % 1024 == 0


def test_signature_size_like_rsync() -> None:
    # 256 MiB in 16 KiB blocks: 3 + 4 bytes a block (rsync: 4 + 3); many blocks: 4-byte weak sums
    assert deltalib._checksum_lengths(256 << 20, 16384) == (3, 4)
    assert deltalib._checksum_lengths(256 << 20, 2048) == (4, 4)
    assert deltalib._checksum_lengths(0, 2048)[1] >= 2
    for size, block in [(64 << 10, 2048), (1 << 30, 32768), (1 << 43, 1 << 20)]:
        wl, sl = deltalib._checksum_lengths(size, block)
        assert wl in (3, 4) and 2 <= sl <= 8


# --- wire formats --------------------------------------------------------------------------------


def test_signature_encoding_round_trip(files: Files) -> None:
    rng = random.Random(13)
    for size, block in [(0, 2048), (100, 512), (70_000, 1024), ((1 << 14) * 512 + 1, 512)]:
        data = rand(rng, size)
        sig = deltalib.signature(files.fd(data), size, block, rng.getrandbits(64))
        enc = deltalib.encode_signature(sig)
        assert len(enc) == 28 + sig.nblocks * (sig.weak_len + sig.strong_len)
        back = deltalib.decode_signature(enc)
        assert (back.block_size, back.basis_size, back.seed, back.weak_len, back.strong_len) == \
            (sig.block_size, sig.basis_size, sig.seed, sig.weak_len, sig.strong_len)
        assert np.array_equal(back.weak, sig.weak) and np.array_equal(back.strong, sig.strong)
        assert back.weak.dtype == np.uint32 and back.strong.dtype == np.uint8
    assert sig.weak_len == 4                        # more than 2**14 blocks


def test_ops_encoding_round_trip() -> None:
    rng = random.Random(14)
    ops: list[Op] = [Copy(5, 3), Copy(8, 1), Copy(0, 2), Copy(1 << 39, 7), Literal(b"x"),
                     Literal(rand(rng, 9 << 20)), Copy(3, 1), Literal(b"a" * 5_000_000), Copy(2, 2)]
    frames = list(deltalib.encode_ops(ops))
    assert all(1 <= len(f) <= deltalib.MAX_FRAME for f in frames)
    assert {f[0] for f in frames} == {0, 1}               # random data raw, repetitive compressed
    assert merged(list(deltalib.decode_ops(frames))) == merged(ops)
    assert list(deltalib.decode_ops(deltalib.encode_ops([Copy(0, 1)] * 3))) == [Copy(0, 1)] * 3
    assert list(deltalib.encode_ops([])) == []
    # in-order copies are compact
    assert len(b"".join(deltalib.encode_ops([Copy(i * 10, 10) for i in range(1000)]))) <= 1 + 3000


def test_ops_frames_split_and_stay_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deltalib, "MAX_BODY", 4200)
    monkeypatch.setattr(deltalib, "MAX_FRAME", 4201)
    rng = random.Random(15)
    ops: list[Op] = []
    for _ in range(3000):
        ops.append(Copy(rng.randrange(10**6), rng.randrange(1, 100)) if rng.random() < 0.7
                   else Literal(rand(rng, rng.randrange(1, 9000))))
    frames = list(deltalib.encode_ops(ops))
    assert len(frames) > 100 and all(len(f) <= 4201 for f in frames)
    decoded = [op for f in frames for op in deltalib.decode_ops([f])]
    assert merged(decoded) == merged(ops)


def test_patch_checks_copies(files: Files) -> None:
    fd = files.fd(bytes(range(256)) * 10)                 # 2560 bytes: 2 full blocks of 1024 + 512
    out: list[bytes] = []
    assert deltalib.patch(fd, 2560, 1024, [Copy(2, 1), Literal(b"!"), Copy(0, 1)], out.append) == 512 + 1 + 1024
    assert b"".join(out) == (bytes(range(256)) * 10)[2048:] + b"!" + (bytes(range(256)) * 4)
    for bad in (Copy(3, 1), Copy(2, 2), Copy(-1, 1), Copy(0, 0)):
        with pytest.raises(DeltaError):
            deltalib.patch(fd, 2560, 1024, [bad], out.append)


# --- hostile input -------------------------------------------------------------------------------


def good_signature() -> bytes:
    weak = np.arange(3, dtype=np.uint32)
    strong = np.zeros((3, 4), np.uint8)
    return deltalib.encode_signature(Signature(1024, 2100, 7, 4, weak, strong, 3))


def header(**kw: int | bytes) -> bytes:
    v: dict[str, int | bytes] = dict(magic=b"RDSG", version=1, weak_len=3, strong_len=4, reserved=0,
                                      block=1024, basis=2100, seed=7)
    v.update(kw)
    return struct.pack("<4sBBBBIQQ", *v.values())


@pytest.mark.parametrize("data", [
    b"", b"RDSG", good_signature()[:-1], good_signature() + b"\0", good_signature()[:27],
    header(magic=b"RSYN") + bytes(21), header(version=2) + bytes(21), header(reserved=1) + bytes(21),
    header(block=256) + bytes(9 * 21), header(block=(1 << 20) + 1), header(weak_len=2) + bytes(18),
    header(weak_len=5) + bytes(27), header(strong_len=1) + bytes(12), header(strong_len=17) + bytes(60),
    header(basis=1 << 63) + bytes(100), header(basis=(1 << 23) * 1024 + 1, block=1024) + bytes(100),
])
def test_decode_signature_rejects(data: bytes) -> None:
    deltalib.decode_signature(good_signature())          # the template is fine
    with pytest.raises(DeltaError):
        deltalib.decode_signature(data)


def test_signature_objects_checked_before_use(files: Files) -> None:
    fd = files.fd(b"z" * 3000)
    bad = Signature(1024, 3000, 1, 4, np.zeros(2, np.uint32), np.zeros((3, 4), np.uint8), 3)
    wide = Signature(1024, 3000, 1, 4, np.full(3, 1 << 30, np.uint32), np.zeros((3, 4), np.uint8), 3)
    for sig in (bad, wide):
        with pytest.raises(DeltaError):
            list(deltalib.delta(fd, 3000, sig))
        with pytest.raises(DeltaError):
            deltalib.encode_signature(sig)


def zstd_frame(body: bytes, content_size: bool = True) -> bytes:
    return b"\x01" + zstandard.ZstdCompressor(write_content_size=content_size).compress(body)


@pytest.mark.parametrize("frame", [
    b"",                                                   # empty frame
    b"\x02" + b"\x02x",                                    # unknown flag
    b"\x00" + b"\x80",                                     # truncated varint
    b"\x00" + b"\xff" * 10 + b"\x01",                      # varint overflow
    b"\x00" + b"\x14abc",                                  # literal longer than the body
    b"\x00" + b"\x00",                                     # empty literal
    b"\x00" + b"\x01\x00",                                 # copy of 0 blocks
    b"\x00" + b"\x03\x01",                                 # copy at index -1
    b"\x00" + b"\x03",                                     # copy without an index
    b"\x00" + b"\x03\x80\x80\x80\x80\x80\x80\x01",         # copy beyond 2**40
    b"\x00" + bytes(deltalib.MAX_FRAME),                   # oversized frame
    b"\x01" + b"garbage",                                  # not zstd
    zstd_frame(b"\x02a", content_size=False),              # no content size: unbounded
    zstd_frame(b"\x02a") + b"x",                           # trailing data
    zstd_frame(b"\x02a") + zstd_frame(b"\x02a")[1:],       # two zstd frames
    zstd_frame(bytes(9 << 20)),                            # bomb: 9 MiB of zeros
    zstd_frame(b"\x14abc"),                                # malformed inside
])
def test_decode_ops_rejects(frame: bytes) -> None:
    with pytest.raises(DeltaError):
        list(deltalib.decode_ops([frame]))


def test_decode_ops_rejects_a_lying_content_size() -> None:
    """A zstd frame that declares 1,000 bytes but holds 16 MiB fails without inflating it."""
    packed = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(16 << 20))
    assert packed[4] == 0                                  # frame header: no content size, no single segment
    liar = packed[:4] + bytes([0x40]) + packed[5:6] + (1000 - 256).to_bytes(2, "little") + packed[6:]
    assert zstandard.frame_content_size(liar) == 1000
    with pytest.raises(DeltaError):
        list(deltalib.decode_ops([b"\x01" + liar]))


def test_decode_ops_fuzz() -> None:
    """Random mutations of valid frames: either DeltaError or ops, never another exception."""
    rng = random.Random(16)
    ops: list[Op] = [Copy(1, 2), Literal(b"hello" * 50), Copy(9, 1), Literal(rand(rng, 300))]
    frames = list(deltalib.encode_ops(ops)) + list(deltalib.encode_ops([Literal(b"ab" * 2000), Copy(4, 4)]))
    for _ in range(2000):
        f = bytearray(rng.choice(frames))
        for _ in range(rng.randrange(1, 4)):
            if not f:
                break
            k = rng.random()
            pos = rng.randrange(len(f))
            if k < 0.5:
                f[pos] = rng.randrange(256)
            elif k < 0.75:
                del f[pos:]
            else:
                f[pos:pos] = rand(rng, rng.randrange(1, 5))
        try:
            for op in deltalib.decode_ops([bytes(f)]):
                assert isinstance(op, (Literal, Copy))
        except DeltaError:
            pass


def test_max_body_caps_frames_and_round_trips() -> None:
    rng = random.Random(15)
    ops: list[Op] = [Literal(rand(rng, 3 << 20)), Copy(7, 2), Literal(b"z" * 300_000)]
    frames = list(deltalib.encode_ops(ops, 256 * 1024))
    assert len(frames) >= 12 and all(len(f) <= 256 * 1024 + 1 for f in frames)
    assert frames[0][0] == 0 and frames[-1][0] == 1           # random raw (sampled), repetitive compressed
    out = list(deltalib.decode_ops(frames))
    assert b"".join(o.data for o in out if isinstance(o, Literal)) == ops[0].data + ops[2].data  # type: ignore[union-attr]
    assert [o for o in out if isinstance(o, Copy)] == [Copy(7, 2)]
