"""Chunks that lie in memory as many short spans, moved and checked where they lie.

When prefill and decode split the KV heads differently, a chunk carries some of the heads
of each token. In a ``[blocks, block_size, heads, head_dim]`` cache those are one short
span per token (4 heads of 128 bf16 values: 1 KiB; 2,048 spans in a 2 MiB chunk). A
:class:`Spans` is such a chunk as a ``struct iovec`` array, built by the compiled helper
``kvwire._scatter`` (kvwire/_scatter.c) from the block ids; the helper also sends it,
receives into it and computes its CRC32C with no Python object per span and the GIL
released. Without the helper (it is optional: it needs a C compiler when kvwire is
installed), or on a stream it cannot use (TLS, UCX), such chunks go through a staging
copy instead, as before: :func:`available` says which.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import numpy as np

try:
    from kvwire import _scatter
except ImportError:  # pragma: no cover - depends on how kvwire was installed
    _scatter = None  # type: ignore[assignment]

IOV_DTYPE = np.uint64  # rows of [address, length]: struct iovec on 64-bit Linux


def available() -> bool:
    """Whether spans move and are checked in place: the helper is built, and computes
    CRC32C with the CPU's instruction (its byte-table fallback is slower than a copy)."""
    return _scatter is not None and _scatter.hardware()


class Spans:
    """Byte spans of host memory, in order: ``iov`` (``[n, 2]`` uint64 rows of address
    and length) and the arrays they lie in, kept alive while the spans are in use."""

    __slots__ = ("iov", "nbytes", "_owner")

    def __init__(self, iov: np.ndarray, owner: object, nbytes: int | None = None) -> None:
        if iov.dtype != IOV_DTYPE or iov.ndim != 2 or iov.shape[1] != 2 or not iov.flags.c_contiguous:
            raise ValueError(f"iov: expected a C-contiguous uint64 array of [address, length] rows, "
                             f"got {iov.dtype} {tuple(iov.shape)}")  # fmt: skip
        self.iov = iov
        self.nbytes = int(iov[:, 1].sum()) if nbytes is None else nbytes  # given by those who know it
        self._owner = owner

    def crc32c(self, crc: int = 0) -> int:
        """CRC32C of the spans' concatenation, continuing ``crc``."""
        return _scatter.crc32c(self.iov, crc)

    def cut(self, start: int, nbytes: int) -> Spans:
        """Bytes ``start`` to ``start + nbytes`` of the spans' concatenation, as spans of
        their own (the same arrays kept alive)."""
        if start < 0 or nbytes < 0 or start + nbytes > self.nbytes:
            raise ValueError(f"cut: bytes {start} to {start + nbytes} of spans holding {self.nbytes}")
        if nbytes == 0:
            return Spans(np.zeros((0, 2), dtype=IOV_DTYPE), self._owner, 0)
        ends = np.cumsum(self.iov[:, 1])
        first = int(np.searchsorted(ends, start, side="right"))  # the span holding byte start
        last = int(np.searchsorted(ends, start + nbytes, side="left"))  # and the one holding the last byte
        part = self.iov[first : last + 1].copy()
        into = IOV_DTYPE(start - (int(ends[first]) - int(part[0, 1])))  # bytes of the first span before start
        part[0, 0] += into
        part[0, 1] -= into
        part[-1, 1] -= IOV_DTYPE(int(ends[last]) - (start + nbytes))  # bytes of the last span after the cut
        return Spans(part, self._owner, nbytes)

    def tobytes(self) -> bytes:
        """The spans' bytes, joined (for tests and for streams that need one buffer)."""
        return b"".join(_span_view(int(a), int(n)) for a, n in self.iov)


TOGETHER_MAX = 8  # span lists crc32c_together reads at once (the helper's TOGETHER_MAX)


def crc32c_together(spans: Sequence[Spans]) -> tuple[int, ...]:
    """The CRC32C of each of several span lists whose span ``t`` lies in the same token row
    (some heads each), reading the rows once: twice as fast out of main memory as one list
    after another (``_scatter.c``, ``crc_together``)."""
    return _scatter.crc32c_together([s.iov for s in spans])


def _span_view(address: int, nbytes: int) -> memoryview:
    import ctypes

    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def token_geometry(heads: np.ndarray) -> tuple[int, int, int, int, int]:
    """(address, num_blocks, block_stride, row_stride, span) of ``heads``, a ``[num_blocks,
    block_size, span]`` uint8 view whose last axis is contiguous: one span per token."""
    nb, _, span = heads.shape
    return heads.ctypes.data, nb, heads.strides[0], heads.strides[1], span


def block_geometry(blocks: np.ndarray, address: int, block_size: int) -> tuple[int, int, int, int, int]:
    """The same for a contiguous cache ``[num_blocks, block_bytes]`` at ``address``: whole
    rows, one span per run of blocks that follow each other in memory."""
    nb, block_bytes = blocks.shape
    row = block_bytes // block_size
    return address, nb, block_bytes, row, row


def token_spans(heads: np.ndarray, block_ids: Sequence[int] | np.ndarray, block_size: int, start: int,
                count: int) -> Spans:  # fmt: skip
    """Tokens ``[start, start + count)`` of a selection (``block_ids``, int64, in token
    order) in ``heads`` (:func:`token_geometry`; :func:`kvwire.blocks.head_bytes`): one
    span per token."""
    return _rows(heads, *token_geometry(heads), block_ids, block_size, start, count, capacity=count)


def block_spans(blocks: np.ndarray, address: int, block_ids: Sequence[int] | np.ndarray, block_size: int, start: int,
                count: int) -> Spans:  # fmt: skip
    """Tokens ``[start, start + count)`` of a selection (``block_ids``, int64, in token
    order) in ``blocks``, a contiguous cache ``[num_blocks, block_bytes]`` at ``address``:
    one span per run of blocks that follow each other in memory."""
    first, last = start // block_size, (start + count - 1) // block_size
    return _rows(blocks, *block_geometry(blocks, address, block_size), block_ids, block_size, start, count,
                 capacity=last - first + 1)  # fmt: skip


def _rows(owner: np.ndarray, address: int, num_blocks: int, block_stride: int, row_stride: int, span: int,
          block_ids: Sequence[int] | np.ndarray, block_size: int, start: int, count: int,
          capacity: int) -> Spans:  # fmt: skip
    """The spans of token rows, computed by the helper (which checks every block id and
    position against the cache's geometry)."""
    iov = np.empty((capacity, 2), dtype=IOV_DTYPE)
    block_ids = np.ascontiguousarray(block_ids, dtype=np.int64)  # no copy for a selection's ids
    n = _scatter.rows(iov, block_ids, address, num_blocks, block_stride, row_stride, span, block_size, start, count)
    return Spans(iov[:n], owner, count * span)


def _buffer_iov(part) -> tuple[np.ndarray, object]:
    array = np.frombuffer(part, dtype=np.uint8)
    return np.array([[array.ctypes.data, array.nbytes]], dtype=IOV_DTYPE), array


def send_parts(sock: socket.socket, parts: Sequence) -> None:
    """Write ``parts`` (bytes-like objects and :class:`Spans`) in order, all of them:
    one ``sendmsg`` per ``IOV_MAX`` spans. Raises OSError (``TimeoutError`` past the
    socket's timeout)."""
    rows, keep = [], []
    for part in parts:
        if isinstance(part, Spans):
            rows.append(part.iov)
        elif len(part):
            iov, array = _buffer_iov(part)
            rows.append(iov)
            keep.append(array)
    iov = np.concatenate(rows) if len(rows) > 1 else rows[0]
    total = int(iov[:, 1].sum())
    sent = _scatter.sendv(sock.fileno(), iov, _timeout(sock))
    if sent != total:  # pragma: no cover - sendv returns only once everything is written
        raise OSError(f"wrote {sent} of {total} bytes")


def recv_spans(sock: socket.socket, spans: Spans) -> int:
    """Fill every span in order; the bytes read (fewer only if the peer closed)."""
    return _scatter.recvv(sock.fileno(), spans.iov, _timeout(sock))


def _timeout(sock: socket.socket) -> float:
    timeout = sock.gettimeout()
    return -1.0 if timeout is None else timeout
