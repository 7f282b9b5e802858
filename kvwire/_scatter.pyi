# The compiled helper (kvwire/_scatter.c); see kvwire/scatter.py.
from typing import Any

def crc32c(iov: Any, crc: int = 0, /) -> int: ...
def crc32c_buffer(buffer: Any, crc: int = 0, /) -> int: ...

TOGETHER_MAX: int

def crc32c_together(iovs: Any, /) -> tuple[int, ...]: ...
def sendv(fd: int, iov: Any, timeout: float = -1.0, /) -> int: ...
def recvv(fd: int, iov: Any, timeout: float = -1.0, /) -> int: ...
def copy_out(buffer: Any, iov: Any, /) -> int: ...

STREAMING_STORES: int

def hardware() -> bool: ...
def rows(
    out: Any,
    ids: Any,
    address: int,
    num_blocks: int,
    block_stride: int,
    row_stride: int,
    span: int,
    block_size: int,
    start: int,
    count: int,
    /,
) -> int: ...

LANE_PYTHON: int
LANE_HANDOFF: int
LANE_CHECKSUM: int
LANE_LOST: int
LANE_CREDIT: int
LANE_FAILED: int
LANE_HEAD: int
LANE_FIELDS: int

def lane_recv(
    fd: int,
    head: Any,
    lanes: dict,
    lock: Any,
    batch: int,
    max_payload: int,
    checked: bool,
    counters: Any,
    stream: Any = None,
    conn: Any = None,
    bounce: Any = None,
    /,
) -> tuple[int, Any, int, int, Any]: ...
def key_encode(x: Any, glo: Any, inv: Any, bits: Any, out: Any, kind: int = 0, /) -> None: ...
def key_extremes(x: Any, kind: int, c: int, gmn: Any, gmx: Any, mn: Any, mx: Any, rows: int = 16, /) -> None: ...
def group_codes4(x: Any, kind: int, c: int, rows: int, zero: Any, inv: Any, out: Any, /) -> None: ...
def key_decode(words: Any, bits: Any, scale: Any, glo: Any, out: Any, /) -> None: ...
def rot_stats(x: Any, kind: int, d: int, e: Any, mn: Any, mx: Any, /) -> None: ...
def rot_quantize(x: Any, kind: int, d: int, mode: int, inv: Any, z: Any, out: Any, /) -> None: ...
def rot_dequantize(codes: Any, mode: int, d: int, scale: Any, zero: Any, out: Any, kind: int, /) -> None: ...
def bit_planes(codes: Any, n: int, bits: int, planes: Any, encoding: bool, /) -> None: ...
def key_grid(
    lo: Any, hi: Any, heads: int, bounds: Any, glo: Any, scale: Any, bits: Any, gmn: Any = None, gmx: Any = None, /
) -> None: ...
def row_params4a(
    e: Any, mn: Any, mx: Any, heads: int, log_block: int, base: Any, code: Any, zeros: Any, inv: Any, z: Any, /
) -> None: ...
def row_steps4a(code: Any, base: Any, zeros: Any, scale: Any, z: Any, /) -> None: ...
