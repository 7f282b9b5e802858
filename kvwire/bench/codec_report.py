"""``kvwire-bench codec``: compression ratio, error and speed of every codec."""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

import kvwire.codec
from kvwire.codec.synthetic import cosine_similarity, realistic_keys, realistic_values, relative_mse
from kvwire.layout import dtype_from


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codecs", default=",".join(kvwire.codec.NAMES), help="comma-separated codec names")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per tensor (default 4096)")
    p.add_argument("--heads", type=int, default=8, help="KV heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block: the int4 key group")
    p.add_argument("--group-size", type=int, default=64, help="int4 value group size (32, 64, 128)")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions; the best is reported")


def _best_seconds(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(args: argparse.Namespace) -> list[dict]:
    dtype = dtype_from(args.dtype, "--dtype")
    for name in ("tokens", "heads", "head_dim", "repeat"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be positive")
    shape = (args.tokens, args.heads, args.head_dim)
    data = {
        "k": realistic_keys(*shape, dtype=dtype),
        "v": realistic_values(*shape, dtype=dtype),
    }
    results = []
    for name in [n.strip() for n in args.codecs.split(",") if n.strip()]:
        codec = kvwire.codec.get(name, group_size=args.group_size)
        for role, x in data.items():
            enc = codec.encode(x, role, args.block_size)
            y = codec.decode(enc)
            logical = x.numel() * x.element_size()
            t_enc = _best_seconds(partial(codec.encode, x, role, args.block_size), args.repeat)
            out = torch.empty_like(x)  # decode into a destination, as a receiver does
            t_dec = _best_seconds(partial(codec.decode, enc, out=out), args.repeat)
            results.append(
                {
                    "codec": codec.descriptor,
                    "role": role,
                    "ratio": logical / enc.nbytes,
                    "relative_mse": relative_mse(x, y),
                    "cosine": cosine_similarity(x, y),
                    "encode_gb_per_s": logical / t_enc / 1e9,
                    "decode_gb_per_s": logical / t_dec / 1e9,
                }
            )
    return results


HEADERS = ("codec", "role", "ratio", "rel MSE", "cosine", "enc GB/s", "dec GB/s")


def rows(results: list[dict]) -> list[list[object]]:
    return [
        [r["codec"], r["role"], r["ratio"], r["relative_mse"], r["cosine"], r["encode_gb_per_s"], r["decode_gb_per_s"]]
        for r in results
    ]
