"""Launchers for the kernels in ``src_cuda/kvwire_kernels.cu``.

Each launcher checks shapes and dtypes, works out strides, the block table and whether
16-byte vector access is legal, then hands typed arguments to a *backend*:

* :class:`CupyBackend` runs them on a GPU: it loads a prebuilt fatbin when one matches
  (``KVWIRE_FATBIN``, or ``kvwire_kernels.fatbin`` beside the source, as CMake installs
  it), else compiles the source with NVRTC through CuPy; either is cached per device.
* :class:`EmulatedBackend` runs the same source compiled for the host (see
  ``src_cuda/host_emulation.h``), so machines without a GPU test the launchers and the
  kernels' logic against the CPU reference.

Kernels do not decide policy: they are told the layout of the chunk and write exactly
``codec.encoded_size(spec)`` bytes in the layout of ``docs/formats.md``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvwire.codec import ChunkSpec, Codec

KIND = {torch.bfloat16: "bf16", torch.float16: "fp16"}
SOURCE_NAME = "kvwire_kernels.cu"
GPU_BLOCK = 256  # 8 warps: enough to hide latency, small enough for any occupancy
GPU_MAX_GRID = 65535


def source_dir() -> Path:
    """Where the kernel source lives: beside this package in a checkout, else the installed
    package data. The checkout comes first: an editable install maps ``kvwire._cuda_src``
    to the checkout it was made from, which need not be the one this module was imported
    from, and the kernels must be those of the code that launches them."""
    checkout = Path(__file__).resolve().parents[2] / "src_cuda"
    if (checkout / SOURCE_NAME).exists():
        return checkout
    try:
        from importlib.resources import files

        path = Path(str(files("kvwire._cuda_src")))
        if (path / SOURCE_NAME).exists():
            return path
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return checkout


def supports(codec: Codec, dtype: torch.dtype) -> bool:
    """Whether the kernels implement ``codec`` (its lossy/raw stage) for ``dtype``."""
    inner = getattr(codec, "inner", codec)
    return dtype in KIND and inner.name in ("raw", "fp8", "int4")


# -- backends -------------------------------------------------------------------------------
class CupyBackend:
    """Runs kernels on the current CUDA device through CuPy."""

    block = GPU_BLOCK
    max_grid = GPU_MAX_GRID

    def __init__(self, device: torch.device) -> None:
        try:
            import cupy
        except ImportError as exc:
            raise ImportError("kvwire's CUDA kernels need CuPy: pip install 'kvwire[cuda]'") from exc
        self._cupy = cupy
        self.device = device
        with cupy.cuda.Device(device.index or 0):
            self.module, self.origin = self._load()
        self._functions: dict[str, Any] = {}

    def _load(self):
        cupy = self._cupy
        major, minor = torch.cuda.get_device_capability(self.device)
        fatbin = os.environ.get("KVWIRE_FATBIN") or str(source_dir() / "kvwire_kernels.fatbin")
        if Path(fatbin).exists():
            try:
                module = cupy.RawModule(path=fatbin)
                module.get_function("kvw_raw_gather_bf16")  # fails if no image matches this GPU
                return module, f"prebuilt {fatbin}"
            except cupy.cuda.driver.CUDADriverError:
                pass
        code = (source_dir() / SOURCE_NAME).read_text()
        module = cupy.RawModule(code=code, options=("--std=c++17", f"--gpu-architecture=sm_{major}{minor}"))
        return module, f"NVRTC for sm_{major}{minor}"

    def launch(self, name: str, grid: int, args: Sequence[tuple[str, int]], stream: torch.cuda.Stream | None) -> None:
        import numpy as np

        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self.module.get_function(name)
        conv = {"ptr": np.uint64, "i32": np.int32, "i64": np.int64}
        typed = tuple(conv[kind](value) for kind, value in args)
        s = stream or torch.cuda.current_stream(self.device)
        with self._cupy.cuda.ExternalStream(s.cuda_stream, self.device.index or 0):
            fn((grid,), (self.block,), typed)


class EmulatedBackend:
    """Runs the kernels on the CPU (tests): one emulated block of 32 threads at a time."""

    block = 32
    max_grid = 4

    def __init__(self, library: Path) -> None:
        self._lib = ctypes.CDLL(str(library))

    @classmethod
    @functools.lru_cache(maxsize=1)
    def build(cls) -> EmulatedBackend:
        """Compile the kernel source for the host with g++ (once per process)."""
        out = Path(tempfile.mkdtemp(prefix="kvwire-emu-")) / "kvwire_emu.so"
        src = source_dir() / SOURCE_NAME
        cmd = ["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-mf16c", "-shared", "-fPIC",
               "-Wno-unknown-pragmas", "-DKVW_HOST_EMULATION", "-x", "c++", str(src), "-o", str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return cls(out)

    def launch(self, name: str, grid: int, args: Sequence[tuple[str, int]], stream=None) -> None:
        conv = {"ptr": ctypes.c_void_p, "i32": ctypes.c_int, "i64": ctypes.c_longlong}
        typed = [conv[kind](value) for kind, value in args]
        if len(typed) == 11:  # kernels without a group size take a dummy one
            typed.append(ctypes.c_int(0))
        getattr(self._lib, f"emu_{name}")(ctypes.c_uint(grid), ctypes.c_uint(self.block), *typed)


@functools.cache
def gpu_backend(device_index: int) -> CupyBackend:
    return CupyBackend(torch.device("cuda", device_index))


# -- launchers --------------------------------------------------------------------------------
class Chunk:
    """Where a chunk's rows live: a paged tensor with a block table, or a state's rows."""

    def __init__(self, tensor: torch.Tensor, block_table: torch.Tensor, rows: int, block_size: int) -> None:
        self.tensor, self.block_table, self.rows, self.block_size = tensor, block_table, rows, block_size

    @classmethod
    def paged(cls, cache: torch.Tensor, block_ids: Sequence[int], start: int, count: int, block_size: int) -> Chunk:
        """Rows ``[start, start + count)`` of a selection; ``start`` is block-aligned."""
        if start % block_size:
            raise ValueError(f"start: {start} is not a multiple of the block size {block_size}")
        first, last = start // block_size, -(-(start + count) // block_size)
        table = torch.tensor(list(block_ids[first:last]), dtype=torch.int32, device=cache.device)
        return cls(cache, table, count, block_size)

    @classmethod
    def state(cls, state: torch.Tensor, start: int, count: int) -> Chunk:
        """Rows of a request-level state seen as ``[rows, last_dim]`` (one block)."""
        if not state.is_contiguous():
            raise ValueError("state: must be contiguous")
        rows = state.reshape(-1, state.shape[-1])[start : start + count]
        view = rows.unsqueeze(0)  # [1 block, count rows, D]
        return cls(view, torch.zeros(1, dtype=torch.int32, device=state.device), count, max(count, 1))

    def geometry(self) -> tuple[int, int, list[tuple[str, int]], bool]:
        """(H, D, the paged arguments, whether 16-byte vector access is legal)."""
        t = self.tensor
        if t.dim() == 4:  # [blocks, bs, H, D]
            H, D = t.shape[2], t.shape[3]
            sb, st, sh, sd = t.stride()
        elif t.dim() == 3:  # [blocks, bs, D]: one head
            H, D = 1, t.shape[2]
            sb, st, sd = t.stride()
            sh = 0
        else:
            raise ValueError(
                "cache: expected [blocks, block_size, heads, head_dim] or [blocks, block_size, dim], "
                f"got {tuple(t.shape)}"
            )
        vec = sd == 1 and D % 8 == 0 and all(s % 8 == 0 for s in (sb, st, sh)) and t.data_ptr() % 16 == 0
        args = [("ptr", t.data_ptr()), ("ptr", self.block_table.data_ptr()), ("i32", self.rows), ("i32", H),
                ("i32", D), ("i32", self.block_size), ("i64", sb), ("i64", st), ("i64", sh), ("i64", sd)]  # fmt: skip
        return H, D, args, vec


def _grid(backend, work_items: int, per_block: int) -> int:
    return max(1, min(backend.max_grid, -(-work_items // per_block)))


def _plan(codec: Codec, chunk: Chunk, role: str, op: str):
    inner: Any = getattr(codec, "inner", codec)  # the lossy stage: Fp8Codec, Int4Codec or RawCodec
    dtype = chunk.tensor.dtype
    if dtype not in KIND:
        raise TypeError(f"cache: the kernels take bfloat16 or float16, got {dtype}")
    H, D, args, vec = chunk.geometry()
    spec = ChunkSpec(chunk.rows, H, D, dtype, role, chunk.block_size)
    inner.check(spec)
    kind = KIND[dtype]
    extra: list[tuple[str, int]] = []
    if inner.name == "raw":
        name = f"kvw_raw_{'gather' if op == 'encode' else 'scatter'}_{kind}"
        work = chunk.rows * H * D // (8 if vec else 1)  # one thread per 16 bytes (or per element)
    elif inner.name == "fp8":
        name, work = f"kvw_fp8_{op}_{kind}", chunk.rows * H  # one warp per row
    elif role == "k":
        name, vec = f"kvw_int4k_{op}_{kind}", False  # one thread per channel pair
        K = inner.key_group(spec)
        groups = -(-chunk.rows // K) if op == "encode" else chunk.rows
        work = groups * H * (D // 2)
        extra = [("i32", K)]
    else:
        name, work = f"kvw_int4v_{op}_{kind}", chunk.rows * H * (D // inner.group_size)  # one thread per group
        extra = [("i32", inner.group_size)]
    if vec and not name.startswith("kvw_int4k"):
        name += "_vec"
    return inner, spec, name, work, args, extra


def encode(
    backend, codec: Codec, chunk: Chunk, role: str, out: torch.Tensor | None = None, stream=None
) -> torch.Tensor:
    """Gather + encode a chunk on the device; return its wire bytes (uint8, on the device).

    With a ``+lz4`` codec only the inner codec runs here: the lossless stage runs on the
    host over these bytes.
    """
    inner, spec, name, work, args, extra = _plan(codec, chunk, role, "encode")
    size = inner.encoded_size(spec)
    if out is None:
        out = torch.empty(size, dtype=torch.uint8, device=chunk.tensor.device)
    elif out.numel() < size or out.dtype != torch.uint8:
        raise ValueError(f"out: needs {size} uint8 bytes, got {out.numel()} of {out.dtype}")
    per_block = backend.block // 32 if inner.name == "fp8" else backend.block
    backend.launch(name, _grid(backend, work, per_block), args + [("ptr", out.data_ptr())] + extra, stream)
    return out[:size]


def decode(backend, codec: Codec, data: torch.Tensor, chunk: Chunk, role: str, stream=None) -> None:
    """Decode a chunk's wire bytes (uint8, on the device) and scatter it into its rows."""
    inner, spec, name, work, args, extra = _plan(codec, chunk, role, "decode")
    size = inner.encoded_size(spec)
    if data.numel() != size:
        raise ValueError(f"data: {inner.descriptor} chunk must be {size} bytes, got {data.numel()}")
    per_block = backend.block // 32 if inner.name == "fp8" else backend.block
    backend.launch(name, _grid(backend, work, per_block), args + [("ptr", data.data_ptr())] + extra, stream)


# -- checksums of payloads in device memory --------------------------------------------------
CRC32C_POLY = 0x82F63B78
CRC_SEGMENT = 1024  # bytes per thread: 2048 threads for a 2 MiB chunk
_CRC_SHIFTS = 48  # Z_{2^k} for k < 48: payloads up to 256 TiB


def _gf2_apply(matrix: Sequence[int], v: int) -> int:
    r, i = 0, 0
    while v:
        if v & 1:
            r ^= matrix[i]
        v >>= 1
        i += 1
    return r


@functools.cache
def crc_shift_matrices() -> tuple[int, ...]:
    """``Z_{2^k}`` for k = 0.. as 32 columns each (column i: the image of bit i): the
    CRC32C register shifted over 2^k zero bytes. See ``kvw_crc32c`` in the source."""
    z = []
    for i in range(32):
        v = 1 << i
        for _ in range(8):
            v = (v >> 1) ^ (CRC32C_POLY if v & 1 else 0)
        z.append(v)
    out: list[int] = []
    for _ in range(_CRC_SHIFTS):
        out += z
        z = [_gf2_apply(z, z[i]) for i in range(32)]  # Z o Z: twice the shift
    return tuple(out)


@functools.cache
def _crc_tables(device: torch.device) -> torch.Tensor:
    import numpy as np

    table = np.array(crc_shift_matrices(), dtype=np.uint32).view(np.int32)
    return torch.from_numpy(table).to(device)


def crc32c(backend, data: torch.Tensor, stream=None) -> int:
    """CRC32C of ``data`` (contiguous uint8, on the device): the same value as the
    ``crc32c`` package gives for the same bytes on the host. Waits for the result."""
    if data.dtype != torch.uint8 or data.dim() != 1 or not data.is_contiguous():
        raise ValueError(f"data: expected a contiguous 1-D uint8 tensor, got {data.dtype} {tuple(data.shape)}")
    acc = torch.zeros(1, dtype=torch.int32, device=data.device)
    n = data.numel()
    items = -(-n // CRC_SEGMENT) + 1
    args = [("ptr", data.data_ptr()), ("i64", n), ("i32", CRC_SEGMENT), ("ptr", _crc_tables(data.device).data_ptr()),
            ("ptr", acc.data_ptr())]  # fmt: skip
    if data.device.type == "cuda":
        with torch.cuda.stream(stream or torch.cuda.current_stream(data.device)):
            acc.zero_()  # ordered on the stream the kernel runs on
            backend.launch("kvw_crc32c", _grid(backend, items, backend.block), args, stream)
            torch.cuda.current_stream(data.device).synchronize()
    else:
        backend.launch("kvw_crc32c", _grid(backend, items, backend.block), args, stream)
    return ~int(acc.item()) & 0xFFFFFFFF
