"""``<codec>+lz4``: an optional lossless stage after any codec.

The inner codec's bytes are first split into byte planes when they are 2- or 4-byte
floats (``raw`` of bf16/fp16/fp32): the high bytes (sign, exponent) of KV values are
far more alike than the low ones, so lz4 finds runs in the high plane. Then the bytes
are cut into blocks of ``LZ4_BLOCK`` bytes, each written as a little-endian u32 header
followed by its bytes: header bit 31 set means "stored as is", otherwise lz4 block
format; the low 31 bits are the stored length. A block that lz4 does not shrink is
stored as is, so the stage never grows data by more than 4 bytes per block.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvwire.codec.base import ChunkSpec, Codec, take

LZ4_BLOCK = 256 * 1024  # big enough for lz4 to find runs, small enough to bound the work per call
STORED = 0x8000_0000
_HEADER = struct.Struct("<I")


def _lz4():
    try:
        import lz4.block
    except ImportError as exc:  # pragma: no cover - lz4 is a dependency; the GPU image may lack it
        raise ImportError("the '+lz4' codecs need the lz4 package: pip install lz4") from exc
    return lz4.block


def split_planes(data: np.ndarray, width: int) -> np.ndarray:
    if width == 1:
        return data
    return np.ascontiguousarray(data.reshape(-1, width).T).reshape(-1)


def join_planes(data: np.ndarray, width: int) -> np.ndarray:
    if width == 1:
        return data
    return np.ascontiguousarray(data.reshape(width, -1).T).reshape(-1)


def compress_blocks(data: np.ndarray) -> bytes:
    lz4 = _lz4()
    parts = []
    view = data.data
    for start in range(0, len(data), LZ4_BLOCK):
        block = view[start : start + LZ4_BLOCK]
        packed = lz4.compress(block, store_size=False)
        if len(packed) < len(block):
            parts += [_HEADER.pack(len(packed)), packed]
        else:
            parts += [_HEADER.pack(STORED | len(block)), block.tobytes()]
    return b"".join(parts)


def decompress_blocks(data: torch.Tensor, expected: int) -> np.ndarray:
    lz4 = _lz4()
    src = data.numpy().data
    out = np.empty(expected, dtype=np.uint8)
    pos = written = 0
    while written < expected:
        if pos + 4 > len(src):
            raise ValueError(f"buf: lz4 stream ends after {pos} bytes, {expected - written} bytes still to come")
        (header,) = _HEADER.unpack_from(src, pos)
        pos += 4
        length = header & ~STORED
        want = min(LZ4_BLOCK, expected - written)
        if pos + length > len(src):
            raise ValueError(f"buf: lz4 block at byte {pos - 4} claims {length} bytes, only {len(src) - pos} left")
        block = src[pos : pos + length]
        if header & STORED:
            if length != want:
                raise ValueError(f"buf: stored block of {length} bytes where {want} were expected")
            out[written : written + want] = np.frombuffer(block, dtype=np.uint8)
        else:
            try:
                plain = lz4.decompress(block, uncompressed_size=want)
            except Exception as exc:  # lz4.block.LZ4BlockError
                raise ValueError(f"buf: corrupt lz4 block at byte {pos - 4}: {exc}") from exc
            if len(plain) != want:
                raise ValueError(f"buf: lz4 block decoded to {len(plain)} bytes, expected {want}")
            out[written : written + want] = np.frombuffer(plain, dtype=np.uint8)
        pos += length
        written += want
    if pos != len(src):
        raise ValueError(f"buf: {len(src) - pos} trailing bytes after the lz4 stream")
    return out


class Lz4Stage(Codec):
    """Wraps ``inner``; wire size varies with the data (``encoded_size`` is an upper bound)."""

    variable_size = True
    has_lossless_stage = True

    def __init__(self, inner: Codec) -> None:
        self._inner = inner
        self.name = f"{inner.name}+lz4"
        self.lossless = inner.lossless

    @property
    def inner(self) -> Codec:
        return self._inner

    @property
    def key_tokens(self) -> int | None:
        return self._inner.key_tokens

    def row_unit(self, role: str, block_size: int) -> int:
        return self._inner.row_unit(role, block_size)

    def exact_unit(self, role: str, block_size: int) -> int:
        return self._inner.exact_unit(role, block_size)

    @property
    def descriptor(self) -> str:
        return f"{self.inner.descriptor}+lz4"

    def check(self, spec: ChunkSpec) -> None:
        self.inner.check(spec)

    def _plane_width(self, spec: ChunkSpec) -> int:
        return spec.itemsize if self.inner.name == "raw" else 1

    def encoded_size(self, spec: ChunkSpec) -> int:
        n = self.inner.encoded_size(spec)
        return n + 4 * (-(-n // LZ4_BLOCK))

    def pack(self, inner_bytes: np.ndarray, spec: ChunkSpec) -> bytes:
        """The lossless stage alone: the inner codec's bytes (e.g. made by a GPU kernel) -> wire bytes."""
        return compress_blocks(split_planes(inner_bytes, self._plane_width(spec)))

    def unpack(self, data: torch.Tensor, spec: ChunkSpec) -> np.ndarray:
        """Wire bytes -> the inner codec's bytes, checked against the size the chunk implies."""
        if data.device.type != "cpu":
            data = data.cpu()
        return join_planes(decompress_blocks(data, self.inner.encoded_size(spec)), self._plane_width(spec))

    def _encode(self, x3: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        packed = self.pack(self.inner._encode(x3, spec).numpy(), spec)
        return torch.frombuffer(bytearray(packed), dtype=torch.uint8) if packed else torch.empty(0, dtype=torch.uint8)

    def _decode(self, data: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        return self.inner._decode(torch.from_numpy(self.unpack(data, spec)), spec)


__all__ = ["Lz4Stage", "LZ4_BLOCK", "take"]
