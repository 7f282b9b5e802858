"""The codec interface and the chunk every codec encodes.

A *chunk* is a run of tokens of one tensor of one layer, seen by every codec as a
3-D tensor ``[tokens, heads, head_dim]``: a latent ``kv`` has one head, and a ``state``
is seen as ``[rows, 1, last_dim]``. A chunk starts on a block boundary, which the
``int4`` key grouping relies on. The wire bytes of a chunk carry no header: the frame
that carries them says which chunk they are (see ``docs/formats.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kvwire.codec.scratch import scratch, workspace
from kvwire.layout import DTYPE_NAMES, QUANTIZABLE_DTYPES

ROLES = ("k", "v", "kv", "state")


@dataclass(frozen=True)
class ChunkSpec:
    """What a receiver must know to decode a chunk's bytes."""

    tokens: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    role: str
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: {self.role!r} is not one of {ROLES}")
        if self.dtype not in DTYPE_NAMES:
            raise TypeError(f"dtype: {self.dtype} is not a KV cache dtype ({', '.join(map(str, DTYPE_NAMES))})")
        for name in ("tokens", "heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if value < (0 if name == "tokens" else 1):
                raise ValueError(f"{name}: invalid value {value}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.tokens, self.heads, self.head_dim)

    @property
    def numel(self) -> int:
        return self.tokens * self.heads * self.head_dim

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def raw_nbytes(self) -> int:
        """Bytes of the chunk before any codec: its logical size."""
        return self.numel * self.itemsize


def as_chunk(x: torch.Tensor, role: str, block_size: int = 16) -> tuple[torch.Tensor, ChunkSpec]:
    """Validate ``x`` and view it as ``[tokens, heads, head_dim]``; return it with its spec.

    Accepts ``[T, H, D]``; ``[T, D]`` (one head, e.g. an MLA latent); for ``role='state'``
    any shape, flattened to ``[rows, 1, last_dim]``. Non-contiguous inputs are copied.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_NAMES:
        raise TypeError(f"x: dtype {x.dtype} is not a KV cache dtype ({', '.join(map(str, DTYPE_NAMES))})")
    if role not in ROLES:
        raise ValueError(f"role: {role!r} is not one of {ROLES}")
    if role == "state":
        if x.dim() == 0:
            raise ValueError("x: a state needs at least one dimension")
        x3 = x.reshape(-1, 1, x.shape[-1])
    elif x.dim() == 3:
        x3 = x
    elif x.dim() == 2:
        x3 = x.unsqueeze(1)
    else:
        raise ValueError(f"x: expected [tokens, heads, head_dim] or [tokens, dim], got shape {tuple(x.shape)}")
    if x3.shape[-1] == 0 or x3.shape[1] == 0:
        raise ValueError(f"x: empty head dimension in shape {tuple(x.shape)}")
    spec = ChunkSpec(x3.shape[0], x3.shape[1], x3.shape[2], x.dtype, role, block_size)
    return x3.contiguous(), spec


@dataclass
class Encoded:
    """An encoded chunk: ``data`` is a 1-D uint8 tensor holding exactly the wire bytes."""

    codec: str
    spec: ChunkSpec
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Size on the wire, in bytes."""
        return self.data.numel()

    def tobytes(self) -> bytes:
        return self.data.cpu().numpy().tobytes()


class Codec:
    """A way for a chunk of KV to travel. Subclasses implement the byte format.

    ``encode(x, role, block_size)`` -> :class:`Encoded`; ``decode(encoded, out=None)`` ->
    ``[tokens, heads, head_dim]`` tensor in the original dtype (written into ``out`` if
    given). ``decode_bytes(buf, spec)`` decodes wire bytes received elsewhere.
    """

    name: str = ""
    lossless: bool = False
    # Capabilities the engine asks about, answered by each codec (never probed from outside):
    variable_size: bool = False  # wire size varies with the data; ``encoded_size`` is a bound
    has_lossless_stage: bool = False  # ``pack``/``unpack`` run a host-side stage over ``inner``'s bytes

    @property
    def inner(self) -> Codec:
        """The codec whose bytes a lossless stage wraps (itself when there is no stage):
        what GPU kernels produce and consume."""
        return self

    @property
    def key_tokens(self) -> int | None:
        """Tokens per key group when keys are grouped across blocks (int4), else None."""
        return None

    def row_unit(self, role: str, block_size: int) -> int:
        """Rows a chunk of tensor ``role`` holds a multiple of, so that its bytes do not depend
        on where a transfer is cut into chunks: whole blocks, and whole key groups."""
        key_tokens = self.key_tokens
        if role == "k" and key_tokens:
            return math.lcm(block_size, key_tokens)
        return block_size

    def exact_unit(self, role: str, block_size: int) -> int:
        """Rows the exact (raw) rows at a request's start are rounded up to: ``row_unit``,
        unless the codec's units are larger than a sender's exact rows should be."""
        return self.row_unit(role, block_size)

    @property
    def descriptor(self) -> str:
        """Name plus every parameter that changes the bytes; peers must agree on it."""
        return self.name

    def check(self, spec: ChunkSpec) -> None:
        """Raise ``ValueError`` if this codec cannot encode chunks like ``spec``."""
        self.check_dtype(spec.dtype)

    def check_dtype(self, dtype: torch.dtype, argument: str = "codec") -> None:
        """Raise ``ValueError`` if this codec cannot carry a cache of ``dtype``: the lossy
        codecs quantize 16- and 32-bit floats; an 8-bit (fp8) cache travels as it is."""
        if not self.lossless and dtype not in QUANTIZABLE_DTYPES:
            raise ValueError(
                f"{argument}: {self.descriptor!r} quantizes bfloat16/float16/float32 caches; a {dtype} cache "
                "is already 8-bit and travels with 'raw' (or 'raw+lz4')"
            )

    def encoded_size(self, spec: ChunkSpec) -> int:
        """Exact wire size of such a chunk, or for variable-size codecs an upper bound."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, role: str, block_size: int = 16) -> Encoded:
        x3, spec = as_chunk(x, role, block_size)
        self.check(spec)
        # Work buffers for this call (kvwire/codec/scratch.py); no autograd: bytes have no
        # gradient, and the codecs write into their buffers with out= arguments.
        with workspace(), torch.no_grad():
            return Encoded(self.descriptor, spec, self._encode(x3, spec))

    def decode(self, encoded: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        if encoded.codec != self.descriptor:
            raise ValueError(f"encoded: made by codec {encoded.codec!r}, not {self.descriptor!r}")
        return self.decode_bytes(encoded.data, encoded.spec, out)

    def decode_bytes(self, buf, spec: ChunkSpec, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode wire bytes (a uint8 tensor, bytes-like or memoryview) of a chunk like ``spec``."""
        self.check(spec)
        data = _as_uint8(buf)
        with workspace(), torch.no_grad():
            y = self._decode(data, spec)
        if out is None:
            return y
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
        if out.dtype != spec.dtype:
            raise TypeError(f"out: dtype {out.dtype} does not match the chunk's {spec.dtype}")
        if out.numel() != spec.numel:
            raise ValueError(f"out: has {out.numel()} elements, the chunk has {spec.numel} {spec.shape}")
        if out.is_contiguous():
            out.view(spec.shape).copy_(y)
        else:
            out.copy_(y.reshape(out.shape))
        return out

    def encodes_into(self, spec: ChunkSpec) -> bool:
        """Whether :meth:`encode_into` serves chunks like ``spec`` (this build, this dtype)."""
        return False

    def encode_into(self, spans, spec: ChunkSpec, out: np.ndarray) -> None:
        """Encode a chunk whose values lie in a host cache, read where they lie: ``spans``
        (:class:`~kvwire.scatter.Spans`, whole rows of ``head_dim`` values in the cache
        dtype, in token order) into ``out`` (uint8, :meth:`encoded_size` bytes), the bytes
        :meth:`encode` gives for the same values. Only where :meth:`encodes_into` says so."""
        raise NotImplementedError(f"codec {self.descriptor!r} encodes gathered rows only")

    def _check_encode_into(self, spec: ChunkSpec, out: np.ndarray) -> None:
        """:meth:`encode_into`'s arguments checked: ``spec`` valid, ``out`` its bytes, and a
        build and dtype this codec codes in place for, else a NotImplementedError saying so."""
        self.check(spec)
        check_out(out, self.encoded_size(spec))
        if not self.encodes_into(spec):
            raise NotImplementedError(f"codec {self.descriptor!r} encodes {spec.dtype} rows gathered only (in place: "
                                      f"bf16 and fp32, with the C helper built)")  # fmt: skip

    def decodes_into(self, spec: ChunkSpec) -> bool:
        """Whether :meth:`decode_into` may serve chunks like ``spec`` (this build, this dtype)."""
        return False

    def decode_into(self, buf, spec: ChunkSpec, spans) -> bool:
        """Decode wire bytes straight into a host cache's rows, when this codec can: ``spans``
        (:class:`~kvwire.scatter.Spans`) take exactly the chunk's values in the cache dtype,
        in order. True when it did; False (the default, and for dtypes or builds it does not
        serve) leaves the caller to decode and copy. The values are the ones
        :meth:`decode_bytes` gives."""
        self.check(spec)
        with workspace(), torch.no_grad():
            return self._decode_into(_as_uint8(buf), spec, spans)

    def pack(self, inner_bytes, spec: ChunkSpec) -> bytes:
        """A lossless stage alone: ``inner``'s bytes (e.g. made by a GPU kernel) -> wire bytes.
        Only codecs with ``has_lossless_stage`` have one."""
        raise ValueError(f"codec {self.descriptor!r} has no lossless stage")

    def unpack(self, data: torch.Tensor, spec: ChunkSpec):
        """A lossless stage undone: wire bytes -> ``inner``'s bytes (a uint8 numpy array)."""
        raise ValueError(f"codec {self.descriptor!r} has no lossless stage")

    # Subclasses implement these on validated, contiguous inputs.
    def _encode(self, x3: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, data: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        raise NotImplementedError

    def _decode_into(self, data: torch.Tensor, spec: ChunkSpec, spans) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<codec {self.descriptor}>"


# A chunk's wire bytes start at a multiple of this: its codecs read and write their scales
# and words in place as 2-, 4- and 8-byte items. Staging slots and received payloads are
# aligned; a caller's buffer that is not is copied (decoding) or refused (encode_into).
ALIGNMENT = 16


def _as_uint8(buf) -> torch.Tensor:
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise TypeError(f"buf: expected a 1-D uint8 tensor, got {buf.dtype} of shape {tuple(buf.shape)}")
        data = buf.contiguous()  # a strided view is copied: the codecs read their parts as flat arrays
    else:
        try:
            mv = memoryview(buf).cast("B")
        except TypeError as exc:
            raise TypeError(f"buf: expected bytes-like data, got {type(buf).__name__}") from exc
        if len(mv) == 0:
            return torch.empty(0, dtype=torch.uint8)
        data = torch.frombuffer(mv, dtype=torch.uint8)
    return data if data.data_ptr() % ALIGNMENT == 0 else data.clone()  # a fresh tensor is aligned


# The one NaN a decoder writes in each cache dtype (docs/formats.md): a positive quiet NaN.
# torch's own conversions do not pin it (bf16 NaN comes out as 0xFFFF or 0x7FC0, fp16 keeps
# the payload), nor do the GPU's (cvt.rn.f16.f32 writes 0x7FFF), so it is written explicitly.
CANONICAL_NAN = {torch.float16: 0x7E00, torch.bfloat16: 0x7FC0, torch.float32: 0x7FC00000}
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def to_cache_dtype(y: torch.Tensor, dtype: torch.dtype, fresh: bool = False) -> torch.Tensor:
    """Decoded fp32 values rounded to the cache dtype (nearest, ties to even), every NaN
    written as ``CANONICAL_NAN[dtype]``; a new tensor when ``fresh`` (``y`` is a scratch
    buffer), else possibly ``y`` itself."""
    out = y.to(dtype, copy=fresh)
    if torch.isnan(y.sum()):  # cheap test first (3% of a decode): NaN is rare; inf - inf also lands here
        nan = torch.isnan(y)
        if nan.any():
            out.view(_BITS[dtype])[nan] = CANONICAL_NAN[dtype]
    return out


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as fp32: itself if it already is, else converted in the codec call's work
    buffer ``"x"`` (read-only for the caller either way)."""
    if x.dtype == torch.float32:
        return x
    return scratch("x", tuple(x.shape)).copy_(x)


def helper_rows(x2: torch.Tensor) -> tuple[np.ndarray, int]:
    """Rows ``x2`` ([N, C], any float dtype) as the C helper's codec loops read them: (the
    bits of bf16 as int16, kind 1) or (fp32, kind 0; other dtypes converted in the work
    buffer ``"x"``), C-contiguous either way."""
    if x2.dtype == torch.bfloat16:
        return x2.contiguous().view(torch.int16).numpy(), 1
    return as_float32(x2).contiguous().numpy(), 0


HELPER_WRITES = (torch.bfloat16, torch.float32)  # the cache dtypes the C helper's decoders write
SPILL_BYTES = 64 << 10  # rows a decoder writes into spans at a time, through a work buffer that stays in cache


def helper_out(out: torch.Tensor) -> tuple[np.ndarray, int]:
    """A contiguous ``out`` of a dtype in HELPER_WRITES as the C helper's decoders write it:
    (the bits of bf16 as int16, kind 1) or (fp32, kind 0)."""
    if out.dtype == torch.bfloat16:
        return out.view(torch.int16).numpy(), 1
    return out.numpy(), 0


def helper_spill(spec: ChunkSpec, row: int | None = None) -> tuple[np.ndarray, int]:
    """The work buffer a decoder writes rows into before they go to their spans
    (``Codec.decode_into``): SPILL_BYTES, at least a row (``row`` values, else
    ``head_dim``), as :func:`helper_out` gives it."""
    least = spec.head_dim if row is None else row
    return helper_out(scratch("spill", (max(SPILL_BYTES // spec.itemsize, least),), spec.dtype))


def abs_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """max |x| along ``dim`` from two reductions, without an |x| temporary (NaN propagates;
    a maximum over zeros may come out -0)."""
    return torch.maximum(x.amax(dim=dim), x.amin(dim=dim).neg_())


def check_out(out: np.ndarray, size: int) -> None:
    """``Codec.encode_into``'s ``out``: ``size`` uint8 bytes from an ``ALIGNMENT`` boundary,
    else a ValueError naming what is wrong."""
    if out.dtype != np.uint8 or out.nbytes != size:
        raise ValueError(f"out: {size} uint8 bytes, got {out.nbytes} {out.dtype}")
    if size and (past := out.ctypes.data % ALIGNMENT):
        raise ValueError(f"out: must start at a multiple of {ALIGNMENT} bytes (scales are written in place), "
                         f"starts {past} bytes past one")  # fmt: skip


def check_length(data: torch.Tensor, expected: int, codec: str) -> None:
    if data.numel() != expected:
        raise ValueError(f"buf: {codec} chunk must be {expected} bytes, got {data.numel()}")


def take(data: torch.Tensor, offset: int, nbytes: int, what: str) -> torch.Tensor:
    """A bounds-checked byte slice, so a short buffer fails with a clear message."""
    if offset + nbytes > data.numel():
        raise ValueError(f"buf: too short for the {what} ({data.numel()} bytes, need {offset + nbytes})")
    return data[offset : offset + nbytes]
