"""``raw``: the chunk's elements as they are, little-endian, ``[tokens, heads, head_dim]`` order."""

from __future__ import annotations

import torch

from kvwire.codec.base import ChunkSpec, Codec, check_length


class RawCodec(Codec):
    """Bit-exact: decode(encode(x)) has the same bits as x, NaN payloads included."""

    name = "raw"
    lossless = True

    def encoded_size(self, spec: ChunkSpec) -> int:
        return spec.raw_nbytes

    def _encode(self, x3: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        return x3.reshape(-1).view(torch.uint8).clone()

    def _decode(self, data: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        check_length(data, spec.raw_nbytes, self.name)
        return data.view(spec.dtype).view(spec.shape)
