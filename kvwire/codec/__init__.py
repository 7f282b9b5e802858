"""How a chunk of KV travels: ``raw``, ``fp8``, ``int8h``, ``int4``, ``int4h``, ``int4a``, each optionally ``+lz4``.

>>> import torch, kvwire.codec
>>> codec = kvwire.codec.get("fp8")
>>> x = torch.randn(16, 8, 128, dtype=torch.bfloat16)
>>> enc = codec.encode(x, role="k")
>>> round(x.numel() * 2 / enc.nbytes, 2)
1.94
>>> codec.decode(enc).shape
torch.Size([16, 8, 128])

Each codec's CPU implementation here is the specification of its bytes
(``docs/formats.md``); the CUDA kernels in ``src_cuda/`` must reproduce it.
"""

from __future__ import annotations

from kvwire.codec.allocated import Int4aCodec
from kvwire.codec.base import ROLES, ChunkSpec, Codec, Encoded, as_chunk
from kvwire.codec.fp8 import Fp8Codec
from kvwire.codec.int4 import GROUP_SIZES, KEY_TOKENS, Int4Codec
from kvwire.codec.lz4stage import Lz4Stage
from kvwire.codec.raw import RawCodec
from kvwire.codec.rotated import Int4hCodec, Int8hCodec

BASE_CODECS = ("raw", "fp8", "int8h", "int4", "int4h", "int4a")
NAMES = BASE_CODECS + tuple(f"{n}+lz4" for n in BASE_CODECS)
# Descriptor parameters each codec takes: g<channels per int4 value group>, k<tokens per key group>.
PARAMETERS = {"int4": "gk", "int4h": "k"}


def get(name: str, *, group_size: int = 64, key_tokens: int | None = None) -> Codec:
    """The codec called ``name`` (see ``NAMES``). For ``int4``: ``group_size`` channels per
    value group; for ``int4`` and ``int4h``: ``key_tokens`` tokens per key group (None: the
    block size).

    Also accepts a descriptor as peers exchange it, e.g. ``"int4/g128+lz4"``,
    ``"int4/g64/k64"`` or ``"int4h/k64"``.
    """
    if not isinstance(name, str):
        raise TypeError(f"codec: expected a name, got {type(name).__name__}")
    base, plus, stage = name.partition("+")
    if plus and stage != "lz4":
        raise ValueError(f"codec: unknown stage {stage!r} in {name!r}; known codecs: {', '.join(NAMES)}")
    base, *params = base.split("/")
    for param in params:
        if not param[:1] or param[:1] not in PARAMETERS.get(base, "") or not param[1:].isdigit():
            raise ValueError(f"codec: malformed descriptor {name!r}")
        if param[0] == "g":
            group_size = int(param[1:])
        else:
            key_tokens = int(param[1:])
    if base == "raw":
        codec: Codec = RawCodec()
    elif base == "fp8":
        codec = Fp8Codec()
    elif base == "int8h":
        codec = Int8hCodec()
    elif base == "int4":
        codec = Int4Codec(group_size=group_size, key_tokens=key_tokens)
    elif base == "int4h":
        codec = Int4hCodec(key_tokens=key_tokens)
    elif base == "int4a":
        codec = Int4aCodec()
    else:
        raise ValueError(f"codec: unknown codec {name!r}; known codecs: {', '.join(NAMES)}")
    return Lz4Stage(codec) if plus else codec


__all__ = ["get", "NAMES", "ROLES", "GROUP_SIZES", "KEY_TOKENS", "ChunkSpec", "Codec", "Encoded", "as_chunk"]
