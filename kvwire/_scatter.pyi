# The compiled helper (kvwire/_scatter.c); see kvwire/scatter.py.
from typing import Any

def crc32c(iov: Any, crc: int = 0, /) -> int: ...

TOGETHER_MAX: int

def crc32c_together(iovs: Any, /) -> tuple[int, ...]: ...
def sendv(fd: int, iov: Any, timeout: float = -1.0, /) -> int: ...
def recvv(fd: int, iov: Any, timeout: float = -1.0, /) -> int: ...
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
