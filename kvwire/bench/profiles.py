"""Model profiles: the KV shape of well-known model families, with where each figure comes from.

Figures are from the models' published configuration files (``config.json`` on their
model cards): layer count, KV heads, head dimension, and for MLA the latent width
(``kv_lora_rank + qk_rope_head_dim``). ``prefill_tokens_per_s`` is a rough single-node
prefill rate used only to pace ``--layer-ms`` when not given; it is an assumption, and
says so in its ``source``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvwire.layout import KVLayout


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    make: Callable[[], KVLayout]
    source: str
    prefill_tokens_per_s: float

    def layout(self, block_size: int | None = None) -> KVLayout:
        layout = self.make()
        if block_size is not None and block_size != layout.block_size:
            layout = KVLayout(layout.layers, block_size, layout.dtype)
        return layout


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in [
        Profile(
            "llama3-8b",
            "Llama-3-8B-like GQA: 32 layers, 8 KV heads x 128",
            lambda: KVLayout.gqa(32, 8, 128, block_size=16),
            "Llama 3 8B config: num_hidden_layers 32, num_key_value_heads 8, head_dim 128; "
            "prefill rate assumed ~10k tokens/s on one H100",
            10_000.0,
        ),
        Profile(
            "llama3-70b",
            "Llama-3-70B-like GQA: 80 layers, 8 KV heads x 128",
            lambda: KVLayout.gqa(80, 8, 128, block_size=16),
            "Llama 3 70B config: num_hidden_layers 80, num_key_value_heads 8, head_dim 128; "
            "prefill rate assumed ~2.5k tokens/s on one 8-GPU node",
            2_500.0,
        ),
        Profile(
            "qwen3-235b",
            "Qwen3-235B-A22B-like MoE with GQA: 94 layers, 4 KV heads x 128",
            lambda: KVLayout.gqa(94, 4, 128, block_size=16),
            "Qwen3-235B-A22B config: num_hidden_layers 94, num_key_value_heads 4, head_dim 128; "
            "prefill rate assumed ~6k tokens/s on one 8-GPU node",
            6_000.0,
        ),
        Profile(
            "deepseek-v3",
            "DeepSeek-V3-like MLA: 61 layers, one 576-wide latent per token",
            lambda: KVLayout.mla(61, latent_dim=576, block_size=64),
            "DeepSeek-V3 config: num_hidden_layers 61, kv_lora_rank 512 + qk_rope_head_dim 64; "
            "prefill rate assumed ~5k tokens/s on one 8-GPU node",
            5_000.0,
        ),
        Profile(
            "kimi-linear-48b",
            "Kimi-Linear-48B-like hybrid: 27 layers, 3 linear-attention (KDA) to 1 MLA",
            lambda: KVLayout(
                layers=tuple(
                    KVLayout.mla(1, latent_dim=576, block_size=64).layers[0]
                    if (i + 1) % 4 == 0
                    else KVLayout.hybrid("L", 1, 128, state_shape=(32, 128, 128)).layers[0]
                    for i in range(27)
                ),
                block_size=64,
            ),
            "Kimi Linear 48B-A3B config: 27 layers, KDA:MLA 3:1, 32 KDA heads with 128x128 states, "
            "MLA kv_lora_rank 512 + rope 64; prefill rate assumed ~8k tokens/s",
            8_000.0,
        ),
    ]
}


def get(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"--profile: unknown profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]


def wire_bytes_per_token(layout: KVLayout, codec, tokens: int = 1024) -> float:
    """Encoded bytes per token of ``layout``'s paged tensors with ``codec`` for a request
    of ``tokens`` tokens (scales and zero-points counted; states excluded)."""
    from kvwire.codec import ChunkSpec

    total = 0
    for layer in layout.layers:
        for p in layer.paged:
            total += codec.encoded_size(ChunkSpec(tokens, p.heads, p.head_dim, layout.dtype, p.name, layout.block_size))
    return total / tokens
