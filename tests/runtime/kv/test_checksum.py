"""Page checksums: bit-exact with the Triton kernel's reference, every single bit flip seen."""

from __future__ import annotations

import pytest
import torch

from runtime.kv.checksum import fold_digests, layer_digests, page_checksums, page_digest

MASK64 = (1 << 64) - 1


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((4, 3), torch.float32),
        ((9, 42), torch.bfloat16),
        ((2, 5, 6), torch.float16),
        ((7,), torch.int32),
    ],
)
def test_matches_kernel_reference(shape, dtype):
    ref = pytest.importorskip("kernels.page_checksum").reference_page_checksum
    g = torch.Generator().manual_seed(0)
    pages = torch.randn((3, *shape), generator=g).to(dtype)  # [S, *page]
    want = [int(x) & MASK64 for x in ref(pages)]
    assert [page_digest(pages[i]) for i in range(3)] == want


def test_every_single_bit_flip_changes_the_digest():
    t = torch.arange(16, dtype=torch.float32)  # 64 bytes, 512 bits
    base = page_digest(t)
    raw = t.view(torch.uint8)
    seen = {base}
    for byte in range(raw.numel()):
        for bit in range(8):
            flipped = raw.clone()
            flipped[byte] ^= 1 << bit
            d = page_digest(flipped.view(torch.float32))
            assert d != base
            seen.add(d)
    assert len(seen) == 513  # and no two flips collide


def test_word_order_and_length_matter():
    t = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    assert page_digest(t) != page_digest(t.flip(0))
    assert page_digest(t) != page_digest(torch.tensor([1, 2, 3, 4, 0], dtype=torch.int32))
    assert page_digest(torch.zeros(3, dtype=torch.uint8)) == page_digest(
        torch.zeros(3, dtype=torch.uint8)
    )  # odd byte counts are zero padded, deterministically


def test_layer_digests_and_fold():
    g = torch.Generator().manual_seed(1)
    plane = torch.randn(3, 5, 4, 6, generator=g).to(torch.bfloat16)  # [L, S, P, tail]
    per_layer = layer_digests(plane, [4, 1])
    assert per_layer.shape == (2, 3)
    for i, slot in enumerate([4, 1]):
        for layer in range(3):
            assert int(per_layer[i, layer]) & MASK64 == page_digest(plane[layer, slot].contiguous())
    sums = page_checksums({"latent": plane}, [4, 1])
    assert sums[0]["latent"] == fold_digests(per_layer[:1])[0]
    assert sums[0] != sums[1]
    before = page_checksums({"latent": plane}, [1])[0]["latent"]
    plane[2, 1, 3, 5] += 1  # one value in the last layer of slot 1
    assert page_checksums({"latent": plane}, [1])[0]["latent"] != before
    plane[2, 0, 0, 0] += 1  # another slot does not matter
    assert page_checksums({"latent": plane}, [4])[0] == sums[0]
    assert page_checksums({}, [0, 1]) == [{}, {}]
