"""8-bit KV caches (a serving stack's fp8 cache, as float8 or as uint8 bytes): moved raw, bit
for bit, through strided views; lossy codecs are refused with a clear error."""

import pytest
import torch

import kvwire
import kvwire.codec
from tests.helpers import SECRET, assert_transferred

EIGHT_BIT = [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8]


def random_bytes(layout: kvwire.KVLayout, num_blocks: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    caches = layout.allocate(num_blocks)
    for layer in caches:
        for t in layer.values():
            t.view(torch.uint8).copy_(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
    return caches


@pytest.mark.parametrize("dtype", EIGHT_BIT)
def test_eight_bit_layouts_have_their_own_fingerprint(dtype):
    layout = kvwire.KVLayout.gqa(2, 2, 64, dtype=dtype)
    assert layout.bytes_per_token() == 2 * 2 * 2 * 64
    assert kvwire.KVLayout.from_dict(layout.to_dict()) == layout
    fingerprints = {kvwire.KVLayout.gqa(2, 2, 64, dtype=d).fingerprint() for d in [*EIGHT_BIT, torch.bfloat16]}
    assert len(fingerprints) == 4


@pytest.mark.parametrize("codec", ["fp8", "int4", "fp8+lz4"])
def test_lossy_codecs_refuse_an_fp8_cache(codec):
    layout = kvwire.KVLayout.gqa(2, 2, 64, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"already 8-bit and travels with 'raw'"):
        kvwire.Sender(layout, "127.0.0.1:1", secret=SECRET, kv_caches=layout.allocate(2), codec=codec)
    with pytest.raises(ValueError, match="already 8-bit"):
        kvwire.codec.get(codec).encode(torch.zeros(16, 2, 64, dtype=torch.float8_e4m3fn), "k")


@pytest.mark.parametrize("codec", ["raw", "raw+lz4"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.uint8])
def test_fp8_cache_moves_bit_exact_through_strided_views(dtype, codec):
    layout = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=2, head_dim=32, block_size=16, dtype=dtype)
    # vLLM's packed pages: [blocks, heads, block_size, 2 * head_dim], K and V side by side.
    src_pages = [torch.zeros(12, 2, 16, 64, dtype=dtype) for _ in range(2)]
    dst_pages = [torch.zeros(12, 2, 16, 64, dtype=dtype) for _ in range(2)]
    g = torch.Generator().manual_seed(3)
    for p in src_pages:
        p.view(torch.uint8).copy_(torch.randint(0, 256, p.shape, generator=g, dtype=torch.uint8))

    def views(pages):
        return [{"k": p.transpose(1, 2)[..., :32], "v": p.transpose(1, 2)[..., 32:]} for p in pages]

    src, dst = views(src_pages), views(dst_pages)
    with kvwire.Receiver(layout, secret=SECRET, kv_caches=dst) as rx:
        h = rx.expect("r", [11, 0, 5], 40)
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=src, codec=codec, streams=2) as tx:
            tx.send("r", [1, 2, 3], 40, timeout=30)
        h.wait(timeout=10)
    assert_transferred(layout, src, [1, 2, 3], dst, [11, 0, 5], 40)
    assert not dst_pages[0][[1, 2, 3, 4]].view(torch.uint8).any()  # nothing else written


def test_receiver_refuses_a_lossy_sender_for_an_fp8_cache():
    # A sender whose own cache is 16-bit but claims the receiver's fp8 layout cannot be
    # built, so this checks the receiver's side of the rule directly.
    layout = kvwire.KVLayout.gqa(1, 1, 64, dtype=torch.uint8)
    with kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(2)) as rx:
        assert "already 8-bit" in rx._check_codec("int4")
        assert rx._check_codec("raw") is None
