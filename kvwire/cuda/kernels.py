"""Launchers for the kernels in ``src_cuda/kvwire_kernels.cu``.

Each launcher checks shapes, dtypes, devices and alignment, works out strides, the block
table and whether 16-byte vector access is legal, then hands typed arguments to a
*backend*:

* :class:`CupyBackend` runs them on a GPU: it loads a prebuilt fatbin when one was built
  from the very source beside it (``KVWIRE_FATBIN``, or ``kvwire_kernels.fatbin`` beside
  the source, as CMake installs it, each with a ``.sha256`` file naming the source's
  hash), else compiles the source with NVRTC through CuPy; either is cached per device.
* :class:`EmulatedBackend` runs the same source compiled for the host (see
  ``src_cuda/host_emulation.h``), so machines without a GPU test the launchers and the
  kernels' logic against the CPU reference.

Kernels do not decide policy: they are told the layout of the chunk and write exactly
``codec.encoded_size(spec)`` bytes in the layout of ``docs/formats.md``.

Stream order: a kernel runs on the stream it is given (``stream``; the device's current
stream when None), and everything it reads or writes is ready *on that stream* before it:

* the cache rows: the caller orders them (the engine's side stream waits on an event
  recorded after the layer's producer: ``SendHandle.send_layer``);
* the block table: a :class:`BlockTable` copied from pinned host memory on that same
  stream (the launchers refuse a table made on another), or, for state chunks, a
  per-device constant that was complete before the backend was handed out;
* buffers the launchers allocate (``out``, the CRC accumulator): allocated, filled and
  read back on that stream, and the host reads a result only after an event recorded
  there (:func:`wait_on_host`), never by synchronising the device or another stream;
* buffers a caller passes (``out``, ``data``): the caller orders them; the launchers
  check their device, dtype, contiguity and alignment, so a bad view raises
  ``ValueError`` instead of faulting on the GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvwire.codec import ChunkSpec, Codec

log = logging.getLogger("kvwire.cuda")

KIND = {torch.bfloat16: "bf16", torch.float16: "fp16"}
SOURCE_NAME = "kvwire_kernels.cu"
FATBIN_NAME = "kvwire_kernels.fatbin"
HASH_SUFFIX = ".sha256"  # beside a fatbin: the SHA-256 of the source it was built from
SOURCES = ("auto", "fatbin", "nvrtc")  # where a CupyBackend takes its kernels from
GPU_BLOCK = 256  # 8 warps: enough to hide latency, small enough for any occupancy
GPU_MAX_GRID = 65535
A_MAX_KEY_DIM = 1024  # A_MAX_D in the source: shared memory per channel of an int4a key head
KERNEL_CODECS = ("raw", "fp8", "int8h", "int4", "int4h", "int4a")  # the lossy (or raw) stages src_cuda/ implements

Stream = Any  # a torch.cuda.Stream on a GPU; None for the host emulation


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


def source_hash(source: Path | None = None) -> str:
    """SHA-256 (hex) of the kernel source that NVRTC would compile now."""
    return hashlib.sha256((source or source_dir() / SOURCE_NAME).read_bytes()).hexdigest()


def prebuilt_fatbin(path: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """The prebuilt fatbin to load, or None, and why.

    ``path`` defaults to ``$KVWIRE_FATBIN``, else ``kvwire_kernels.fatbin`` beside the
    source. A fatbin is taken only if the file ``<path>.sha256`` beside it (CMake and
    ``bench/compile_kernels.sh`` write it) names the hash of the current source: after an
    edit to the source, an old fatbin is refused and NVRTC compiles the new source.
    """
    fatbin = Path(path or os.environ.get("KVWIRE_FATBIN") or source_dir() / FATBIN_NAME)
    if not fatbin.is_file():
        return None, f"no prebuilt fatbin at {fatbin}"
    stamp = Path(str(fatbin) + HASH_SUFFIX)
    if not stamp.is_file():
        return None, f"{fatbin} refused: no {stamp.name} beside it says which source it was built from"
    words = stamp.read_text().split()
    built = words[0].lower() if words else "(empty)"
    want = source_hash()
    if built != want:
        return None, f"{fatbin} refused: built from source {built[:12]}, the source is now {want[:12]}"
    return fatbin, f"prebuilt {fatbin} (source {want[:12]})"


def supports(codec: Codec, dtype: torch.dtype) -> bool:
    """Whether the kernels implement ``codec`` (its lossy/raw stage) for ``dtype``."""
    inner = codec.inner
    return dtype in KIND and inner.name in KERNEL_CODECS


# -- block tables -----------------------------------------------------------------------------
class BlockTable:
    """Block ids (int32) where kernels read them, and the stream they are ready on.

    On a GPU the ids are copied from pinned host memory by a non-blocking copy queued on
    ``stream``, into memory allocated on ``stream``: a kernel queued after it on the same
    stream reads the copied ids, and nothing else waits (a pageable copy would wait for
    everything queued on the thread's current stream, a model's forward pass included).
    Its memory goes back to ``stream``'s pool, where only work queued later can get it.
    ``stream=None`` with a device table means "complete": ready on every stream.
    """

    def __init__(self, block_ids: Sequence[int] | torch.Tensor, device: torch.device, stream: Stream = None) -> None:
        host = torch.as_tensor(block_ids, dtype=torch.int64, device="cpu").reshape(-1)
        if host.numel() and (int(host.min()) < 0 or int(host.max()) >= 2**31):
            raise ValueError("block_ids: block ids must be in [0, 2**31)")
        self.length = host.numel()
        self.max_id = int(host.max()) if self.length else -1
        self.stream = stream
        self.ids = _copy_to(host.to(torch.int32), device, stream)

    @classmethod
    def constant(cls, block_ids: Sequence[int], device: torch.device) -> BlockTable:
        """A table that is complete before this returns, so ready on every stream (its
        ``stream`` is None): for tables that live as long as the backend."""
        table = cls.__new__(cls)
        host = torch.as_tensor(block_ids, dtype=torch.int32)
        table.length, table.max_id, table.stream = host.numel(), int(host.max()), None
        table.ids = _constant(host, device)
        return table

    def pointer(self, first: int) -> int:
        return self.ids.data_ptr() + 4 * first


def _copy_to(host: torch.Tensor, device: torch.device, stream: Stream) -> torch.Tensor:
    """``host`` on ``device``: allocated on ``stream`` and copied there from pinned memory by a
    non-blocking copy, so it is ready for work queued after it on ``stream`` and for nothing
    else, and the caller's thread does not wait. (Torch's pinned-memory pool keeps the
    pinned copy alive until the copy has run.)"""
    if device.type != "cuda":
        return host
    if stream is None:
        raise ValueError("stream: device memory for a kernel is filled on the stream the kernel runs on")
    with torch.cuda.stream(stream):
        on_device = torch.empty(host.shape, dtype=host.dtype, device=device)  # allocated on `stream`
        on_device.copy_(host.pin_memory(), non_blocking=True)  # queued on `stream`
    return on_device


def _constant(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device``, complete before this returns (so readable from any stream):
    copied on a private stream that is then waited for. For tensors that are never freed."""
    if device.type != "cuda":
        return host
    private = torch.cuda.Stream(device)
    on_device = _copy_to(host, device, private)
    wait_on_host(private)
    return on_device


class TransferTables:
    """Each transfer's :class:`BlockTable`, made at its first chunk and reused by the rest
    (one pinned copy per transfer instead of one per chunk). Keyed weakly by an owner (the
    transfer's handle): a table goes away with its transfer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.made = 0  # tables made so far (tests check that it is one per transfer)

    def get(self, owner: object, block_ids: Sequence[int], device: torch.device, stream: Stream) -> BlockTable:
        with self._lock:
            table = self._tables.get(owner)
            if table is None or table.stream != stream:
                table = self._tables[owner] = BlockTable(block_ids, device, stream)
                self.made += 1
            return table


def wait_on_host(stream: Stream) -> None:
    """Block the calling thread until the work queued on ``stream`` so far is done: an event
    recorded there, not a device-wide synchronisation, and later work on the stream (other
    threads') is not waited for. Nothing to do for the host emulation (``stream=None``)."""
    if stream is None:
        return
    done = torch.cuda.Event()
    done.record(stream)
    done.synchronize()


def receive_buffer(nbytes: int, device: torch.device, stream: Stream) -> torch.Tensor:
    """Device memory that a transport may write outside stream order (UCX), for kernels on
    ``stream`` to read afterwards.

    It is allocated on a stream on which nothing is ever queued (one per device), so the
    caching allocator can only hand out memory that no queued kernel still uses, and it is
    marked as used by ``stream`` (``record_stream``): it goes back to the pool only once
    the work queued on ``stream`` before it is freed has finished."""
    if device.type != "cuda":
        return torch.empty(nbytes, dtype=torch.uint8)
    with torch.cuda.stream(_idle_stream(device)):
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    buffer.record_stream(stream)
    return buffer


@functools.cache
def _idle_stream(device: torch.device) -> Any:
    return torch.cuda.Stream(device)


# -- backends -------------------------------------------------------------------------------
class CupyBackend:
    """Runs kernels on one CUDA device through CuPy.

    ``source``: ``auto`` (a matching prebuilt fatbin, else NVRTC), ``fatbin`` (the prebuilt
    one or an error) or ``nvrtc`` (always compile the source). ``origin`` says which."""

    block = GPU_BLOCK
    max_grid = GPU_MAX_GRID

    def __init__(self, device: torch.device, source: str = "auto") -> None:
        if source not in SOURCES:
            raise ValueError(f"source: expected one of {SOURCES}, got {source!r}")
        try:
            import cupy
        except ImportError as exc:
            raise ImportError("kvwire's CUDA kernels need CuPy: pip install 'kvwire[cuda]'") from exc
        self._cupy = cupy
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.index)
        self._functions: dict[str, Any] = {}
        self._functions_lock = threading.Lock()
        with cupy.cuda.Device(self.index):  # the module is loaded into this device's context
            self.module, self.origin = self._load(source)
        # Constants the kernels read: complete before any launch can see them.
        self.crc_tables = _constant(_crc_table(), self.device)
        self.zero_table = BlockTable.constant([0], self.device)  # a state chunk's one block
        self.tables = TransferTables()

    def _load(self, source: str) -> tuple[Any, str]:
        cupy = self._cupy
        major, minor = torch.cuda.get_device_capability(self.device)
        why = "NVRTC requested"
        if source != "nvrtc":
            fatbin, why = prebuilt_fatbin()
            if fatbin is not None:
                try:
                    module = cupy.RawModule(path=str(fatbin))
                    module.get_function("kvw_raw_gather_bf16")  # fails if no image matches this GPU
                    return module, why
                except cupy.cuda.driver.CUDADriverError as exc:
                    why = f"{fatbin} refused: no image for sm_{major}{minor} ({exc})"
            if source == "fatbin":
                raise RuntimeError(f"kvwire kernels: {why}")
            if "refused" in why:
                log.warning("kvwire kernels: %s; compiling the source with NVRTC", why)
        code = (source_dir() / SOURCE_NAME).read_text()
        module = cupy.RawModule(code=code, options=("--std=c++17", f"--gpu-architecture=sm_{major}{minor}"))
        module.get_function("kvw_raw_gather_bf16")  # compile now rather than inside the first transfer
        return module, f"NVRTC for sm_{major}{minor} ({why})"

    def launch(self, name: str, grid: int, args: Sequence[tuple[str, int]], stream: Stream) -> None:
        conv = {"ptr": np.uint64, "i32": np.int32, "i64": np.int64}
        typed = tuple(conv[kind](value) for kind, value in args)
        cupy = self._cupy
        # The device explicitly, whatever the thread's current device is: a function of this
        # module exists in this device's context only.
        with cupy.cuda.Device(self.index):
            fn = self._functions.get(name)
            if fn is None:
                with self._functions_lock:
                    fn = self._functions[name] = self.module.get_function(name)
            with cupy.cuda.ExternalStream(stream.cuda_stream, self.index):
                fn((grid,), (self.block,), typed)


class EmulatedBackend:
    """Runs the kernels on the CPU (tests): one emulated block of 32 threads at a time."""

    block = 32
    max_grid = 4
    device = torch.device("cpu")

    def __init__(self, library: Path) -> None:
        self._lib = ctypes.CDLL(str(library))
        self.origin = f"host emulation {library}"
        self.crc_tables = _constant(_crc_table(), self.device)
        self.zero_table = BlockTable.constant([0], self.device)
        self.tables = TransferTables()

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

    def launch(self, name: str, grid: int, args: Sequence[tuple[str, int]], stream: Stream) -> None:
        conv = {"ptr": ctypes.c_void_p, "i32": ctypes.c_int, "i64": ctypes.c_longlong}
        typed = [conv[kind](value) for kind, value in args]
        if len(typed) == 11:  # kernels without a group size take a dummy one
            typed.append(ctypes.c_int(0))
        getattr(self._lib, f"emu_{name}")(ctypes.c_uint(grid), ctypes.c_uint(self.block), *typed)


Backend = CupyBackend | EmulatedBackend


@functools.cache
def gpu_backend(device_index: int, source: str = "auto") -> CupyBackend:
    return CupyBackend(torch.device("cuda", device_index), source)


def _launch_stream(backend: Backend, tensor: torch.Tensor, name: str, stream: Stream) -> Stream:
    """The stream the kernel runs on (None for the host emulation), after checking that
    ``tensor`` and ``stream`` are on the backend's device."""
    if tensor.device != backend.device:
        raise ValueError(f"{name}: on {tensor.device}, but these kernels run on {backend.device}")
    if backend.device.type != "cuda":
        return None
    s = stream if stream is not None else torch.cuda.current_stream(backend.device)
    if s.device != backend.device:
        raise ValueError(f"stream: on {s.device}, but these kernels run on {backend.device}")
    return s


def _on(stream: Stream):
    """Make ``stream`` current (allocations are then made on it); nothing without CUDA."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _check_bytes(name: str, buf: torch.Tensor, device: torch.device, align: int) -> None:
    """``buf`` must be a contiguous 1-D uint8 tensor on ``device``, its first byte aligned
    to ``align``: the kernels access it with 2-, 4- or 16-byte loads and stores, and a
    misaligned one would kill the CUDA context instead of raising."""
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(buf).__name__}")
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous 1-D uint8 tensor, got {buf.dtype} {tuple(buf.shape)}")
    if buf.device != device:
        raise ValueError(f"{name}: on {buf.device}, expected {device}")
    if buf.data_ptr() % align:
        raise ValueError(f"{name}: must start on a {align}-byte boundary for these kernels (address % {align} = "
                         f"{buf.data_ptr() % align}); pass a tensor of its own or an aligned slice")  # fmt: skip


# -- launchers --------------------------------------------------------------------------------
class Chunk:
    """Where a chunk's rows live: a paged tensor and its block table, or a state's rows.

    ``table`` is a :class:`BlockTable` (rows start at its entry ``first``), or a list of
    block ids that the launcher copies to the device on the stream the kernel runs on."""

    def __init__(
        self, tensor: torch.Tensor, table: BlockTable | list[int], first: int, rows: int, block_size: int
    ) -> None:
        self.tensor, self.table, self.first, self.rows, self.block_size = tensor, table, first, rows, block_size

    @classmethod
    def paged(
        cls, cache: torch.Tensor, block_ids: BlockTable | Sequence[int], start: int, count: int, block_size: int
    ) -> Chunk:
        """Rows ``[start, start + count)`` of a selection; ``start`` is block-aligned.

        ``block_ids``: the selection's block ids, as a :class:`BlockTable` made once per
        transfer (on the stream the kernels will run on) or as a sequence of ints."""
        if start % block_size:
            raise ValueError(f"start: {start} is not a multiple of the block size {block_size}")
        first, last = start // block_size, -(-(start + count) // block_size)
        num_blocks = cache.shape[0] if cache.dim() else 0
        if isinstance(block_ids, BlockTable):
            if last > block_ids.length:
                raise ValueError(f"block_ids: {block_ids.length} blocks, rows up to {start + count} need {last}")
            if block_ids.max_id >= num_blocks:
                raise ValueError(f"block_ids: block {block_ids.max_id} is out of range for {num_blocks} blocks")
            return cls(cache, block_ids, first, count, block_size)
        ids = [int(b) for b in block_ids[first:last]]
        if len(ids) < last - first:
            raise ValueError(f"block_ids: {len(block_ids)} blocks, rows up to {start + count} need {last}")
        bad = [b for b in ids if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"block_ids: block {bad[0]} is out of range for {num_blocks} blocks")
        return cls(cache, ids, 0, count, block_size)

    @classmethod
    def state(cls, backend: Backend, state: torch.Tensor, start: int, count: int) -> Chunk:
        """Rows of a request-level state seen as ``[rows, last_dim]`` (one block, whose
        table is the backend's constant ``[0]``: nothing to copy per chunk)."""
        if not state.is_contiguous():
            raise ValueError("state: must be contiguous")
        rows = state.reshape(-1, state.shape[-1])[start : start + count]
        view = rows.unsqueeze(0)  # [1 block, count rows, D]
        return cls(view, backend.zero_table, 0, count, max(count, 1))

    def table_on(self, stream: Stream) -> BlockTable:
        """The block table, ready on ``stream`` (copied there now if it was a list)."""
        if isinstance(self.table, list):
            return BlockTable(self.table, self.tensor.device, stream)
        if self.table.stream is not None and self.table.stream != stream:
            raise ValueError("block_ids: the block table was made on another stream than the one the kernel runs on")
        return self.table

    def geometry(self) -> tuple[int, int, list[tuple[str, int]], bool]:
        """(H, D, the strides, whether 16-byte vector access to the cache is legal)."""
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
        if t.data_ptr() % t.element_size():
            raise ValueError("cache: its first element is not aligned to its element size")
        vec = sd == 1 and D % 8 == 0 and all(s % 8 == 0 for s in (sb, st, sh)) and t.data_ptr() % 16 == 0
        return H, D, [("i64", sb), ("i64", st), ("i64", sh), ("i64", sd)], vec


@dataclass
class _Plan:
    inner: Any  # the lossy stage: Fp8Codec, Int8hCodec, Int4Codec, Int4hCodec or RawCodec
    spec: ChunkSpec
    name: str  # the kernel, without the "_vec" suffix
    vec: bool  # 16-byte access to the cache is legal and the kernel has a vector form
    work: int  # work items (one per thread, or per warp for fp8)
    per_block: int  # work items per thread block of 32-thread warps
    strides: list[tuple[str, int]]
    extra: list[tuple[str, int]]
    align: int  # alignment the kernel needs of the byte buffer (out / data)
    size: int  # bytes of the encoded chunk

    def kernel(self, backend: Backend, chunk: Chunk, table: BlockTable, buf: torch.Tensor) -> tuple[str, list, int]:
        """(kernel name, arguments, grid). raw copies 16 bytes at a time only when the byte
        buffer is 16-byte aligned as well; otherwise it copies element by element."""
        vec = self.vec and (self.inner.name != "raw" or buf.data_ptr() % 16 == 0)
        work = self.work // 8 if self.inner.name == "raw" and vec else self.work
        H, D = self.spec.heads, self.spec.head_dim
        args = [("ptr", chunk.tensor.data_ptr()), ("ptr", table.pointer(chunk.first)), ("i32", chunk.rows),
                ("i32", H), ("i32", D), ("i32", chunk.block_size), *self.strides, ("ptr", buf.data_ptr()),
                *self.extra]  # fmt: skip
        grid = max(1, min(backend.max_grid, -(-work // self.per_block)))
        return self.name + ("_vec" if vec else ""), args, grid


def _plan(backend: Backend, codec: Codec, chunk: Chunk, role: str, op: str) -> _Plan:
    inner: Any = codec.inner
    dtype = chunk.tensor.dtype
    if dtype not in KIND:
        raise TypeError(f"cache: the kernels take bfloat16 or float16, got {dtype}")
    H, D, strides, vec = chunk.geometry()
    spec = ChunkSpec(chunk.rows, H, D, dtype, role, chunk.block_size)
    inner.check(spec)
    kind = KIND[dtype]
    extra: list[tuple[str, int]] = []
    per_block = backend.block
    if inner.name == "raw":
        name = f"kvw_raw_{'gather' if op == 'encode' else 'scatter'}_{kind}"
        work, align = chunk.rows * H * D, 2  # one thread per element, or per 16 bytes (work // 8)
    elif inner.name == "fp8":
        name, work, align = f"kvw_fp8_{op}_{kind}", chunk.rows * H, 4  # one warp per row; fp32 scales
        per_block = backend.block // 32
    elif inner.name == "int4a":
        name, vec, align = f"kvw_int4a_{'keys' if role == 'k' else 'rows'}_{op}_{kind}", False, 2  # fp16, int16 words
        if role == "k" and D > A_MAX_KEY_DIM:
            raise ValueError(f"head_dim: the int4a key kernels take at most {A_MAX_KEY_DIM} channels, got {D}")
        work, per_block = H, 1  # one block per head: a head's channels share ranges, bits and scales
        if role != "k" and op == "decode":
            work, per_block = chunk.rows * H, backend.block // 32  # one warp per row
    elif inner.name == "int8h" or (inner.name == "int4h" and role != "k"):
        bits, align = (8, 4) if inner.name == "int8h" else (4, 2)  # fp32 scales, or bf16 scales and zero-points
        name, vec, work = f"kvw_rot{bits}_{op}_{kind}", False, chunk.rows * H  # one warp per row
        per_block = backend.block // 32
    elif role == "k":
        name, vec, align = f"kvw_int4k_{op}_{kind}", False, 2  # one thread per channel pair; fp16 scales
        K = inner.key_group(spec)
        groups = -(-chunk.rows // K) if op == "encode" else chunk.rows
        work = groups * H * (D // 2)
        extra = [("i32", K)]
    else:
        name, align = f"kvw_int4v_{op}_{kind}", 4  # one thread per group; 4-byte code words
        work = chunk.rows * H * (D // inner.group_size)
        extra = [("i32", inner.group_size)]
    return _Plan(inner, spec, name, vec, work, per_block, strides, extra, align, inner.encoded_size(spec))


def encode(
    backend: Backend, codec: Codec, chunk: Chunk, role: str, out: torch.Tensor | None = None, stream: Stream = None
) -> torch.Tensor:
    """Gather + encode a chunk on the device; return its wire bytes (uint8, on the device).

    Runs on ``stream`` (the current stream when None). ``out`` is allocated on that stream
    when not given; a given ``out`` must be ordered on it by the caller. With a ``+lz4``
    codec only the inner codec runs here: the lossless stage runs on the host over these
    bytes.
    """
    s = _launch_stream(backend, chunk.tensor, "cache", stream)
    plan = _plan(backend, codec, chunk, role, "encode")
    device = chunk.tensor.device
    if out is None:
        with _on(s):
            out = torch.empty(plan.size, dtype=torch.uint8, device=device)  # allocated on the launch stream
    else:
        _check_bytes("out", out, device, plan.align)
        if out.numel() < plan.size:
            raise ValueError(f"out: needs {plan.size} bytes, got {out.numel()}")
    with _on(s):
        table = chunk.table_on(s)  # ready on s: copied there now, or made there earlier
        name, args, grid = plan.kernel(backend, chunk, table, out)
        # Inputs ordered before this launch on s: the cache rows (by the caller: the engine's
        # side stream waits on the layer's event), the block table (line above), `out`
        # (allocated on s above, or the caller's).
        backend.launch(name, grid, args, s)
    return out[: plan.size]


def decode(backend: Backend, codec: Codec, data: torch.Tensor, chunk: Chunk, role: str, stream: Stream = None) -> None:
    """Decode a chunk's wire bytes (uint8, on the cache's device) and scatter it into its
    rows, on ``stream`` (the current stream when None); ``data`` must be ready there."""
    s = _launch_stream(backend, chunk.tensor, "cache", stream)
    plan = _plan(backend, codec, chunk, role, "decode")
    _check_bytes("data", data, chunk.tensor.device, plan.align)
    if data.numel() != plan.size:
        raise ValueError(f"data: {plan.inner.descriptor} chunk must be {plan.size} bytes, got {data.numel()}")
    with _on(s):
        table = chunk.table_on(s)  # ready on s: copied there now, or made there earlier
        name, args, grid = plan.kernel(backend, chunk, table, data)
        # Inputs ordered before this launch on s: `data` (by the caller: the engine copies it
        # to the device on s, or its CRC ran on s after UCX had written it), the block table
        # (line above); the destination rows belong to this request until it completes.
        backend.launch(name, grid, args, s)


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


def _crc_table() -> torch.Tensor:
    """The shift matrices as int32 words (the bit patterns the kernel reads as uint32)."""
    return torch.from_numpy(np.array(crc_shift_matrices(), dtype=np.uint32).view(np.int32))


def crc32c(backend: Backend, data: torch.Tensor, stream: Stream = None) -> int:
    """CRC32C of ``data`` (contiguous uint8, on the device): the same value as the
    ``crc32c`` package gives for the same bytes on the host.

    Runs on ``stream`` (the current stream when None), where ``data`` must be ready; the
    accumulator is allocated, zeroed and copied back to pinned memory on that stream, and
    this waits for an event recorded there: for this stream's work up to here, no more."""
    _check_bytes("data", data, backend.device, 1)
    s = _launch_stream(backend, data, "data", stream)
    n = data.numel()
    items = -(-n // CRC_SEGMENT) + 1
    grid = max(1, min(backend.max_grid, -(-items // backend.block)))
    with _on(s):
        acc = torch.zeros(1, dtype=torch.int32, device=data.device)  # allocated and zeroed on s
        args = [("ptr", data.data_ptr()), ("i64", n), ("i32", CRC_SEGMENT), ("ptr", backend.crc_tables.data_ptr()),
                ("ptr", acc.data_ptr())]  # fmt: skip
        # Inputs ordered before this launch on s: `data` (by the caller), the accumulator
        # (zeroed on s above), the shift matrices (a constant, complete since the backend
        # was made).
        backend.launch("kvw_crc32c", grid, args, s)
        if s is None:  # the host emulation has run the kernel already
            return ~int(acc[0]) & 0xFFFFFFFF
        result = torch.empty(1, dtype=torch.int32, pin_memory=True)
        result.copy_(acc, non_blocking=True)  # queued on s, after the kernel
    wait_on_host(s)
    return ~int(result[0]) & 0xFFFFFFFF
