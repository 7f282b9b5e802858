"""``kvwire-bench fidelity``: what each codec costs a real model, SmolLM2-135M.

For each prompt of a set (prose, code, chat, numbers, repetition; 32 to 1024+ tokens):

* the reference: the model's KV cache of ``prompt[:-1]``, uncompressed;
* for each codec: the same cache after encode + decode, block by block, exactly what a
  kvwire receiver holds after the transfer (the engine tests show those bytes equal);
* next-token KL divergence ``KL(p_ref || p_codec)`` after feeding the last prompt token,
  and greedy agreement: whether the ``--new-tokens`` continuations are identical, and
  where the first divergence is.

Each codec's size is reported as wire bytes per token of the model's KV as a bf16 cache
(scales and zero-points counted, a 1024-token request), and how many times smaller than
bf16 that is. The ``+lz4`` stage is lossless, so ``fp8+lz4`` and ``int4+lz4`` score as ``fp8`` and ``int4``.
"""

from __future__ import annotations

import argparse
import time

import torch

import kvwire
import kvwire.codec
from kvwire.bench.profiles import wire_bytes_per_token

PROMPTS = {
    "prose": (
        "The lighthouse keeper had kept a log for forty years. Every night he wrote down the wind, the "
        "ships that passed, and one sentence about the sea. Some entries were long and careful; others "
        "were a single word. When the station was automated, the log went to a museum, where visitors "
        "read the entries aloud to each other and argued about what the keeper had meant. "
    ),
    "code": (
        "def merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
        "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
        "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n\n"
        "class Cache:\n    def __init__(self, size):\n        self.size = size\n        self.items = {}\n"
    ),
    "chat": (
        "User: I have a meeting at 3pm in Lyon and my train arrives at 2:40pm. Is that enough time?\n"
        "Assistant: It depends on the distance from the station to your meeting. Lyon Part-Dieu is central; "
        "if the meeting is within a ten-minute walk, twenty minutes is tight but workable.\nUser: "
    ),
    "numbers": (
        "Quarterly revenue: Q1 1,204,332; Q2 1,317,905; Q3 1,288,410; Q4 1,402,771. Operating costs: "
        "Q1 902,114; Q2 955,630; Q3 948,201; Q4 1,010,447. Headcount: 118, 121, 125, 131. "
    ),
}
LENGTHS = (32, 128, 512, 1024)
DEFAULT_CODECS = ("fp8", "int8h", "int4", "int4h", "int4h/k64", "int4a")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codecs", default=",".join(DEFAULT_CODECS),
                   help=f"codecs to score (default {','.join(DEFAULT_CODECS)})")  # fmt: skip
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="prompt lengths in tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy continuation length (default 64)")
    p.add_argument("--group-size", type=int, default=64, help="int4 value group size")
    p.add_argument("--exact-tokens", type=int, default=0,
                   help="first tokens kept exact, as Sender(exact_tokens=N) sends them (default 0)")  # fmt: skip


def model_layout(config) -> kvwire.KVLayout:
    """The KV layout of a transformers model config, as a bf16 cache of 16-token blocks."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return kvwire.KVLayout.gqa(config.num_hidden_layers, heads, head_dim, block_size=16, dtype=torch.bfloat16)


def _prompts(tokenizer, lengths) -> list[tuple[str, list[int]]]:
    out = []
    for kind, text in PROMPTS.items():
        ids = tokenizer(text * 200).input_ids
        for n in lengths:
            out.append((f"{kind}-{n}", ids[:n]))
    return out


def _roundtrip(cache, codec, block_size: int, exact_tokens: int = 0):
    """The cache a receiver holds after a transfer with ``codec`` (a new DynamicCache); the
    first ``exact_tokens`` rows (rounded as the sender rounds them) stay exact."""
    from transformers import DynamicCache

    from kvwire.engine.chunks import received_rows

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        kv = []
        for role, t in (("k", layer.keys), ("v", layer.values)):
            rows = t[0].transpose(0, 1).contiguous()  # [T, H, D]
            y = received_rows(codec, rows, role, block_size, exact_tokens)
            kv.append(y.transpose(0, 1).unsqueeze(0).contiguous())
        out.update(kv[0], kv[1], i)
    return out


@torch.inference_mode()
def _score(model, prompt: list[int], cache, new_tokens: int):
    """(next-token log-probabilities, greedy continuation) from a cache of prompt[:-1]."""
    import copy

    from kvwire.integrations.transformers import cache_argument

    last = torch.tensor([prompt[-1:]])
    logits = model(last, **cache_argument(copy.deepcopy(cache)), use_cache=True).logits[0, -1].double()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, **cache_argument(cache))
    return torch.log_softmax(logits, -1), out[0, len(prompt) :].tolist()


def run(args: argparse.Namespace, progress=print) -> dict:
    from transformers import DynamicCache

    from kvwire.bench.models import smollm2
    from kvwire.integrations.transformers import cache_argument

    lengths = [int(x) for x in args.lengths.split(",")]
    codecs = [kvwire.codec.get(c.strip(), group_size=args.group_size) for c in args.codecs.split(",")]
    tokenizer, model = smollm2()
    rows = []
    t0 = time.monotonic()
    prompts = _prompts(tokenizer, lengths)
    for k, (name, prompt) in enumerate(prompts):
        with torch.inference_mode():
            ref_cache = DynamicCache()
            model(torch.tensor([prompt[:-1]]), **cache_argument(ref_cache), use_cache=True)
        import copy

        ref_lp, ref_tokens = _score(model, prompt, copy.deepcopy(ref_cache), args.new_tokens)
        for codec in codecs:
            lp, tokens = _score(model, prompt, _roundtrip(ref_cache, codec, 16, args.exact_tokens), args.new_tokens)
            kl = float((ref_lp.exp() * (ref_lp - lp)).sum())
            first_diff = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), None)
            rows.append({"prompt": name, "tokens": len(prompt), "codec": codec.descriptor, "kl": kl,
                         "identical": tokens == ref_tokens, "first_divergence": first_diff})  # fmt: skip
        progress(f"  {k + 1}/{len(prompts)} {name}: {time.monotonic() - t0:.0f} s")
    layout = model_layout(model.config)
    bf16 = wire_bytes_per_token(layout, kvwire.codec.get("raw"))
    summary = []
    for codec in codecs:
        mine = [r for r in rows if r["codec"] == codec.descriptor]
        wire = wire_bytes_per_token(layout, codec)
        diverged = [r["first_divergence"] for r in mine if r["first_divergence"] is not None]
        summary.append({
            "codec": codec.descriptor,
            "bytes_per_token": wire,
            "times_smaller_than_bf16": bf16 / wire,
            "mean_kl": sum(r["kl"] for r in mine) / len(mine),
            "max_kl": max(r["kl"] for r in mine),
            "identical_fraction": sum(r["identical"] for r in mine) / len(mine),
            "mean_first_divergence": sum(diverged) / len(diverged) if diverged else None,
            "prompts": len(mine),
        })  # fmt: skip
    return {"kind": "fidelity", "model": "SmolLM2-135M-Instruct (GGUF Q4_1, run in fp32)",
            "new_tokens": args.new_tokens, "exact_tokens": args.exact_tokens, "rows": rows,
            "summary": summary}  # fmt: skip
