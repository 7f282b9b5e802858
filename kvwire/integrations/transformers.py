"""Disaggregated prefill and decode for Hugging Face transformers models, through kvwire.

Prefill side: :class:`StreamingCache` is a ``DynamicCache`` that, the moment a layer's
attention has produced its keys and values, copies them into a paged block pool and
calls ``send_layer``, so layer i is on the wire while layer i+1 is still being computed.

Decode side: :func:`cache_from_blocks` rebuilds a ``DynamicCache`` from the blocks a
:class:`~kvwire.Receiver` filled, and ``model.generate`` continues from it.

The model's cache ``[batch=1, kv_heads, tokens, head_dim]`` per layer maps onto a kvwire
layout with paged ``k``/``v`` tensors of ``[num_blocks, block_size, kv_heads, head_dim]``
(see :func:`layout_for`). Batch size 1: one request per cache.

Example (two processes; see docs/examples/disaggregated_smollm2.py)::

    # prefill process
    cache = StreamingCache(transfer, pool, block_ids)   # transfer = sender.transfer(...)
    out = model.generate(ids, max_new_tokens=1, past_key_values=cache, return_dict_in_generate=True)
    transfer.finish()                                    # every layer is on the decode side
    first_token = out.sequences[0, -1]

    # decode process
    handle.wait()
    cache = cache_from_blocks(pool, block_ids, num_tokens)
    model.generate(torch.cat([ids, first_token]), past_key_values=cache, max_new_tokens=63)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvwire.blocks import gather_tokens, scatter_tokens
from kvwire.layout import KVLayout, Selection

try:
    import transformers
    from transformers import DynamicCache
except ImportError as exc:  # pragma: no cover - an optional integration
    raise ImportError("kvwire.integrations.transformers needs transformers: pip install transformers") from exc


def layout_for(config, block_size: int = 16, dtype: torch.dtype = torch.float32) -> KVLayout:
    """The kvwire layout of a decoder-only model's KV cache, from its ``config``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return KVLayout.gqa(config.num_hidden_layers, kv_heads, head_dim, block_size=block_size, dtype=dtype)


class StreamingCache(DynamicCache):
    """A ``DynamicCache`` that streams each layer's new keys and values as soon as they exist.

    Args:
        transfer: a :class:`~kvwire.SendHandle` for this request (``Sender.transfer``),
            whose ``block_ids`` name the blocks of ``pool`` that hold the request's tokens
            ``[start, start + num_tokens)``.
        pool: the sender's paged caches (the ``kv_caches`` the Sender was made with).
        start: the first token that the transfer carries (a multiple of the block size):
            tokens before it are already on the decode side (an incremental transfer).
        stream: False fills the pool without sending (the caller sends every layer after
            the forward pass: the baseline that layer-wise streaming is measured against).

    Only the first forward pass (the prefill) streams; later calls (decode steps in this
    process, if any) just cache as usual.
    """

    def __init__(self, transfer, pool: Sequence[dict[str, torch.Tensor]], start: int = 0, stream: bool = True) -> None:
        super().__init__()
        self._stream = stream
        self._transfer = transfer
        self._pool = pool
        self._start = start
        self._block_size = pool[0]["k"].shape[1]
        if start % self._block_size:
            raise ValueError(f"start: {start} is not a multiple of the block size {self._block_size}")
        self._streamed: set[int] = set()
        self.layer_sent_at: dict[int, float] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx not in self._streamed:
            self._streamed.add(layer_idx)
            sel = self._transfer.selection
            for name, full in (("k", keys), ("v", values)):
                # [1, heads, tokens, head_dim] -> the transfer's tokens as [tokens, heads, head_dim]
                tokens = full[0, :, self._start : self._start + sel.num_tokens].transpose(0, 1)
                scatter_tokens(self._pool[layer_idx][name], sel, self._block_size, 0, tokens.contiguous())
            if self._stream:
                self._transfer.send_layer(layer_idx)
        return keys, values


def cache_from_blocks(
    pool: Sequence[dict[str, torch.Tensor]],
    block_ids: Sequence[int],
    num_tokens: int,
    block_size: int | None = None,
) -> DynamicCache:
    """A ``DynamicCache`` holding tokens ``[0, num_tokens)`` of the blocks ``block_ids``.

    ``block_ids`` lists every block of the request in token order, prefix blocks already
    held by this side included.
    """
    block_size = block_size or pool[0]["k"].shape[1]
    sel = Selection(tuple(block_ids), num_tokens).check(block_size)
    cache = DynamicCache()
    for i, layer in enumerate(pool):
        k = gather_tokens(layer["k"], sel, block_size).transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        v = gather_tokens(layer["v"], sel, block_size).transpose(0, 1).unsqueeze(0)
        cache.update(k.contiguous(), v.contiguous(), i)
    return cache


def cache_argument(cache) -> dict:
    """transformers 5 calls the argument ``cache``; 4.x calls it ``past_key_values``."""
    major = int(transformers.__version__.split(".")[0])
    return {"cache": cache} if major >= 5 else {"past_key_values": cache}


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, transfer, pool, start: int = 0, stream: bool = True) -> torch.Tensor:
    """Run the prefill with layer-wise streaming; return the first generated token ``[1, 1]``.

    Uses ``generate`` for one token, so the forward pass is exactly the one a single-process
    ``generate`` runs first (same attention path, same positions, same bits).
    """
    cache = StreamingCache(transfer, pool, start, stream)
    out = model.generate(input_ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                         **cache_argument(cache))  # fmt: skip
    return out.sequences[:, -1:]


@torch.inference_mode()
def continue_generation(model, input_ids: torch.Tensor, first_token: torch.Tensor, cache, max_new_tokens: int):
    """Greedy decoding from a received cache: ``input_ids`` is the prompt, ``first_token`` the
    prefill's token. Returns the ``max_new_tokens`` generated ids (first_token included)."""
    ids = torch.cat([input_ids, first_token], dim=1)
    if max_new_tokens <= 1:
        return first_token[0]
    out = model.generate(ids, max_new_tokens=max_new_tokens - 1, do_sample=False, **cache_argument(cache))
    return out[0, input_ids.shape[1] :]
