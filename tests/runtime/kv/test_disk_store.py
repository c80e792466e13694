"""L3 disk store: crash-safe page files, restart, and every kind of bad file is a miss."""

from __future__ import annotations

import os

import pytest
import torch

from runtime.kv.checksum import page_checksums
from runtime.kv.disk_store import DiskStore
from runtime.kv.host_pool import PlaneSpec

SPECS = {"latent": PlaneSpec((6,), torch.bfloat16), "index_k": PlaneSpec((2,), torch.float32)}
L, P = 3, 4


def page(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn((L, P, *s.tail), generator=g).to(s.dtype) for name, s in SPECS.items()
    }


def sums(p: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: page_checksums({"x": t.unsqueeze(1)}, [0])[0]["x"] for name, t in p.items()}


def store(root, budget=1 << 20, fp="model-a", page_size=P, specs=SPECS) -> DiskStore:
    return DiskStore(root, budget, fp, page_size, (0, L), specs)


def empty() -> dict[str, torch.Tensor]:
    return {name: torch.zeros((L, P, *s.tail), dtype=s.dtype) for name, s in SPECS.items()}


def test_roundtrip_and_restart(tmp_path):
    s = store(tmp_path)
    p = page(1)
    assert s.put(0xABC, p, sums(p))
    assert s.contains(0xABC) and s.num_pages == 1 and s.bytes_used > s.page_bytes
    out = empty()
    assert s.get(0xABC, out) == sums(p)
    assert all(torch.equal(out[n], p[n]) for n in p)
    s2 = store(tmp_path)  # a new process on the same directory
    assert s2.contains(0xABC) and s2.bytes_used == s.bytes_used
    out2 = empty()
    assert s2.get(0xABC, out2) == sums(p) and torch.equal(out2["latent"], p["latent"])
    assert s2.get(0xDEF) is None and s2.stats["misses"] == 1


def test_checksum_carried_not_recomputed(tmp_path):
    """The header carries the L1 data's checksum: data that no longer matches it is a miss."""
    s = store(tmp_path)
    p = page(2)
    wrong = dict(sums(p), latent=sums(p)["latent"] ^ 1)
    assert s.put(7, p, wrong)
    assert s.get(7, empty()) is None and not s.contains(7) and not s.path_of(7).exists()


def damage_cases(data: bytes, header_end: int):
    yield "truncated", data[:-1]
    yield "truncated_header", data[:20]
    yield "empty", b""
    yield "extra_byte", data + b"\0"
    for where in (0, 9, 13, 20, header_end - 3, header_end + 1, len(data) - 1):
        flipped = bytearray(data)
        flipped[where] ^= 0x10
        yield f"bitflip@{where}", bytes(flipped)


def test_damaged_files_are_misses_and_deleted(tmp_path):
    s = store(tmp_path)
    p = page(3)
    s.put(1, p, sums(p))
    data = s.path_of(1).read_bytes()
    header_end = 16 + int.from_bytes(data[8:12], "little")
    for name, bad in damage_cases(data, header_end):
        s.path_of(1).write_bytes(bad)
        out = empty()
        assert s.get(1, out) is None, name
        assert not s.path_of(1).exists(), name
        assert all(not t.any() for t in out.values()), name  # nothing served
        s.put(1, p, sums(p))
    assert s.stats["rejected"] >= 10


def test_foreign_stale_and_temp_files(tmp_path):
    a = store(tmp_path, fp="model-a")
    p = page(4)
    a.put(1, p, sums(p))
    b = store(tmp_path, fp="model-b")  # another model's file: dropped at scan
    assert not b.contains(1) and not a.path_of(1).exists()
    a.put(2, p, sums(p))
    assert b.get(2, empty()) is None  # and at read
    a.put(3, p, sums(p))
    assert not store(tmp_path, page_size=8).contains(3)  # stale layout: dropped
    a.put(4, p, sums(p))
    other = dict(SPECS, index_k=PlaneSpec((2,), torch.bfloat16))
    assert not store(tmp_path, specs=other).contains(4)
    (tmp_path / ".dead.kvp.1.2.tmp").write_bytes(b"half a page")  # a crash mid-write
    (tmp_path / "zzzz.kvp").write_bytes(b"junk")
    store(tmp_path)
    assert sorted(os.listdir(tmp_path)) == []


def test_lru_eviction_under_budget_survives_restart(tmp_path):
    probe = store(tmp_path / "probe")
    p = page(5)
    probe.put(0, p, sums(p))
    size = probe.bytes_used
    s = store(tmp_path / "d", budget=3 * size)
    for key in (1, 2, 3):
        assert s.put(key, p, sums(p))
        os.utime(s.path_of(key), ns=(key * 10**9, key * 10**9))  # distinct mtimes
    assert s.get(1, empty()) is not None  # 1 becomes most recent (file touched)
    s = store(tmp_path / "d", budget=3 * size)  # restart: LRU order from mtimes
    assert s.put(4, p, sums(p))
    assert not s.contains(2) and s.contains(1) and s.contains(3) and s.contains(4)
    assert s.bytes_used == 3 * size and s.stats["evictions"] == 1
    assert not store(tmp_path / "e", budget=size - 1).put(9, p, sums(p))  # never fits


def test_put_rejects_wrong_shapes(tmp_path):
    s = store(tmp_path)
    p = page(6)
    p["latent"] = p["latent"][:, :2]
    with pytest.raises(AssertionError):
        s.put(1, p, {"latent": 0, "index_k": 0})
