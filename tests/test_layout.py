from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire.blocks import cache_bytes, gather_tokens, row_views, scatter_tokens
from kvwire.layout import KVLayout, LayerSpec, PagedTensorSpec, Selection, StateSpec


def test_gqa_layout_counts_bytes_per_token():
    layout = KVLayout.gqa(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16)
    assert layout.bytes_per_token() == 32 * 2 * 8 * 128 * 2
    assert layout.request_bytes(1000) == 1000 * layout.bytes_per_token()


def test_mla_and_hybrid_layouts():
    mla = KVLayout.mla(num_layers=61, latent_dim=576, block_size=64)
    assert mla.bytes_per_token() == 61 * 576 * 2
    hybrid = KVLayout.hybrid("LLLF", num_kv_heads=2, head_dim=64, state_shape=(2, 64, 64))
    assert [layer.tensor_names for layer in hybrid.layers] == [("state",)] * 3 + [("k", "v")]
    assert hybrid.state_bytes() == 3 * 2 * 64 * 64 * 2


def test_fingerprint_is_stable_and_sensitive():
    a = KVLayout.gqa(4, 8, 128, block_size=16)
    assert a.fingerprint() == KVLayout.gqa(4, 8, 128, block_size=16).fingerprint()
    assert a.fingerprint() == KVLayout.from_dict(a.to_dict()).fingerprint()
    for other in (
        KVLayout.gqa(4, 8, 128, block_size=32),
        KVLayout.gqa(4, 8, 64, block_size=16),
        KVLayout.gqa(5, 8, 128, block_size=16),
        KVLayout.gqa(4, 8, 128, block_size=16, dtype="fp16"),
    ):
        assert other.fingerprint() != a.fingerprint()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: KVLayout.gqa(4, 8, 128, block_size=0), "block_size"),
        (lambda: KVLayout.gqa(4, 8, 128, dtype=torch.int8), "dtype"),
        (lambda: KVLayout.gqa(0, 8, 128), "num_layers"),
        (lambda: PagedTensorSpec("q", (8, 128)), "name"),
        (lambda: PagedTensorSpec("k", (1, 2, 3)), "token_shape"),
        (lambda: LayerSpec(paged=(PagedTensorSpec("kv", (576,)), PagedTensorSpec("k", (1, 64)))), "latent"),
        (lambda: StateSpec(()), "state shape"),
        (lambda: KVLayout.hybrid("FXL", 2, 64, (4,)), "pattern"),
    ],
)
def test_bad_layouts_name_the_problem(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_check_caches_names_the_bad_tensor():
    layout = KVLayout.gqa(2, 4, 64, block_size=16)
    caches = layout.allocate(8)
    assert layout.check_caches(caches) == 8
    bad = [dict(c) for c in caches]
    bad[1]["v"] = torch.zeros(8, 16, 4, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"kv_caches\[1\]\['v'\].*shape"):
        layout.check_caches(bad)
    bad[1]["v"] = torch.zeros(8, 16, 4, 64, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"kv_caches\[1\]\['v'\].*dtype"):
        layout.check_caches(bad)
    bad[1]["v"] = torch.zeros(9, 16, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="blocks"):
        layout.check_caches(bad)
    with pytest.raises(ValueError, match="3 layers|2 layers"):
        layout.check_caches(caches + caches[:1])


@pytest.mark.parametrize(
    "sel, message",
    [
        (Selection((0, 1), 33), "do not fit"),
        (Selection((0, 1, 2), 32), "last block would be empty"),
        (Selection((0, 9), 20), r"block_ids\[1\].*out of range"),
        (Selection((3, 3), 20), "twice"),
    ],
)
def test_selection_errors(sel, message):
    with pytest.raises(ValueError, match=message):
        sel.check(block_size=16, num_blocks=8)


def test_selection_rejects_negative_and_non_int_ids():
    with pytest.raises(ValueError, match="negative"):
        Selection((0, -1), 20)
    with pytest.raises(TypeError, match=r"block_ids\[0\]"):
        Selection((1.0,), 4)


def test_gather_and_scatter_roundtrip_with_partial_last_block():
    layout = KVLayout.gqa(1, 2, 8, block_size=4)
    src = torch.randn(6, 4, 2, 8).to(torch.bfloat16)
    sel = Selection((5, 0, 3), 10)
    tokens = gather_tokens(src, sel, 4)
    assert tokens.shape == (10, 2, 8)
    assert torch.equal(tokens[:4], src[5]) and torch.equal(tokens[8:], src[3, :2])
    dst = torch.full((6, 4, 2, 8), 7.0, dtype=torch.bfloat16)
    scatter_tokens(dst, sel, layout.block_size, 0, tokens)
    assert torch.equal(dst[5], src[5]) and torch.equal(dst[0], src[0]) and torch.equal(dst[3, :2], src[3, :2])
    assert (dst[3, 2:] == 7).all(), "tokens past num_tokens must keep their bytes"
    assert (dst[1] == 7).all() and (dst[2] == 7).all() and (dst[4] == 7).all()


def test_gather_accepts_hnd_views():
    hnd = torch.randn(3, 2, 4, 8)  # [blocks, heads, block_size, head_dim]
    nhd_view = hnd.transpose(1, 2)
    tokens = gather_tokens(nhd_view, Selection((2,), 3), 4)
    assert torch.equal(tokens, hnd[2, :, :3].transpose(0, 1))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_head_slices_move_through_numpy_views_like_torch_scatter_and_gather(data):
    from kvwire.blocks import head_bytes, rows_from_blocks, rows_to_blocks

    bs = data.draw(st.sampled_from([1, 4, 16]))
    heads = data.draw(st.sampled_from([2, 4, 8]))
    first = data.draw(st.integers(0, heads - 1))
    count = data.draw(st.integers(1, heads - first))
    ids = data.draw(st.permutations(range(10)))[:6]
    if data.draw(st.booleans()):
        ids = sorted(ids)  # runs of consecutive blocks, and gaps between them
    tokens = data.draw(st.integers(1, 6 * bs))
    start = data.draw(st.integers(0, tokens - 1))
    cache = torch.randn(10, bs, heads, 8).to(torch.bfloat16)
    expected = cache.clone()
    rows = torch.randn(tokens - start, count, 8).to(torch.bfloat16)
    sel = Selection(tuple(ids), tokens)
    view = head_bytes(cache, first, count)
    rows_to_blocks(view, rows.view(torch.uint8).numpy().reshape(tokens - start, -1), ids[start // bs :], bs, start % bs)
    scatter_tokens(expected[:, :, first : first + count], sel, bs, start, rows)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))  # other heads and tokens untouched
    out = np.empty((tokens, count * 16), np.uint8)
    rows_from_blocks(view, ids, bs, out)
    want = gather_tokens(cache[:, :, first : first + count], sel, bs).contiguous()
    assert np.array_equal(out, want.view(torch.uint8).numpy().reshape(tokens, -1))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_row_views_are_a_chunks_bytes_whatever_the_block_order(data):
    """The spans a chunk is sent from and received into (one byte view per run of
    consecutive blocks, from runs found once per selection) hold exactly its rows."""
    block_size = data.draw(st.sampled_from([1, 4, 16]), label="block_size")
    pool = data.draw(st.integers(1, 24), label="pool")
    ids = data.draw(st.permutations(range(pool)).flatmap(lambda p: st.just(p[: max(1, len(p) // 2 + 1)])))
    # runs of consecutive ids are common (allocators hand out blocks in order): keep some
    if data.draw(st.booleans(), label="sorted"):
        ids = sorted(ids)
    tokens = data.draw(st.integers((len(ids) - 1) * block_size + 1, len(ids) * block_size), label="tokens")
    sel = Selection(tuple(ids), tokens)
    start = data.draw(st.integers(0, tokens - 1), label="start")
    count = data.draw(st.integers(1, tokens - start), label="count")
    cache = torch.arange(pool * block_size * 6, dtype=torch.int16).view(pool, block_size, 2, 3)
    blocks = cache_bytes(cache)
    assert blocks is not None
    got = b"".join(bytes(v) for v in row_views(blocks, sel, block_size, Rows("k", start, count)))
    want = gather_tokens(cache, sel, block_size)[start : start + count]
    assert got == want.numpy().tobytes()
    spans = list(zip(*(a.tolist() for a in sel.spans(start // block_size, -(-(start + count) // block_size)))))
    assert all(n > 0 for _, n in spans) and len(spans) <= len(ids)


class Rows(NamedTuple):
    name: str
    start: int
    count: int
