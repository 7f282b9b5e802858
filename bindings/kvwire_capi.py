"""The Python side of libkvwire.so: the ``_kvwpy_*`` functions behind kvwire.h.

cffi runs this file as the embedding's init code, inside the module ``_kvwire_capi``.
Outside libkvwire.so (linting, tests) it imports and does nothing but define helpers.

Rules kept here:
  * every function returns ``status + 1`` (see build_capi.py): KVW_OK is 1 on this side;
  * every exception becomes a status and a thread-local message, none is lost on stderr;
  * a failed call changes nothing: every argument (output pointers first) is checked
    before anything is created, registered or sent;
  * messages speak C: they name the C argument, field or option, never a Python type;
  * handles are small integers disguised as pointers, looked up in a table: a closed or
    freed handle is simply missing (KVW_ERR_CLOSED), so use-after-close cannot crash.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import logging
import math
import re
import sys
import threading
import time
import traceback
from typing import Any

# enum kvw_status
OK, INVALID, TIMEOUT, PEER_LOST, AUTH, PROTOCOL, LAYOUT, CANCELLED, TRANSFER, CLOSED, INIT, INTERNAL = range(12)
SYSTEM, PENDING, CHECKSUM = 12, 13, 14
MESSAGES = {
    OK: "success",
    INVALID: "invalid argument",
    TIMEOUT: "timed out",
    PEER_LOST: "peer lost or unreachable",
    AUTH: "authentication failed",
    PROTOCOL: "protocol error",
    LAYOUT: "layout or codec mismatch",
    CANCELLED: "cancelled",
    TRANSFER: "transfer failed",
    CLOSED: "handle closed or freed",
    INIT: "not initialised: call kvw_init() first, or the runtime failed to start",
    INTERNAL: "internal error",
    SYSTEM: "refused by the system (address in use, no such device, out of memory)",
    PENDING: "pending: still in flight",
    CHECKSUM: "payloads kept failing their checksum (the path corrupts data)",
}
DTYPES = {0: "KVW_BF16", 1: "KVW_FP16", 2: "KVW_FP32"}
LOG_LEVELS = {10: "KVW_LOG_DEBUG", 20: "KVW_LOG_INFO", 30: "KVW_LOG_WARNING", 40: "KVW_LOG_ERROR", 100: "KVW_LOG_OFF"}
# Bounds on a layout: far above any model, low enough that a garbage value cannot make
# the library build millions of objects before it fails.
LAYOUT_LIMITS = {"num_layers": 4096, "num_kv_heads": 4096, "head_dim": 65536, "block_size": 65536}
ADDRESS_SPACE = 1 << 47  # a cache tensor spans less than the user address space


class Closed(Exception):
    """A handle that was closed or freed (or never existed)."""


class Invalid(ValueError):
    """A caller's mistake, in C terms."""


class SystemRefused(Exception):
    """The machine cannot do it (no such device, address in use), in C terms."""


def status_of(exc: BaseException) -> int:
    import kvwire

    for kind, status in (
        (Closed, CLOSED),
        (SystemRefused, SYSTEM),
        (kvwire.TransferTimeout, TIMEOUT),
        (kvwire.PeerLost, PEER_LOST),
        (kvwire.AuthenticationFailed, AUTH),
        (kvwire.LayoutMismatch, LAYOUT),
        (kvwire.ProtocolError, PROTOCOL),
        (kvwire.Cancelled, CANCELLED),
        (kvwire.ChecksumMismatch, CHECKSUM),
        (kvwire.TransferError, TRANSFER),
        ((ValueError, TypeError), INVALID),
        ((OSError, MemoryError), SYSTEM),
    ):
        if isinstance(exc, kind):
            return status
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, for CUDA memory
        return SYSTEM
    return INTERNAL


# -- messages in C terms -------------------------------------------------------------------------
# Names the engine uses for what a C caller calls otherwise.
C_TERMS = (
    (re.compile(r"\btorch\.bfloat16\b"), "KVW_BF16"),
    (re.compile(r"\btorch\.float16\b"), "KVW_FP16"),
    (re.compile(r"\btorch\.float32\b"), "KVW_FP32"),
    (re.compile(r"\bkv_caches\b"), "caches"),
    (re.compile(r"\bdeadline:"), "deadline_s:"),
    (re.compile(r"\btimeout:"), "timeout_s:"),  # not connect_timeout: nor unclaimed_timeout:
    (re.compile(r"^finish:"), "kvw_transfer_finish:"),
    (re.compile(r"^send_layer:"), "kvw_transfer_send_layer:"),
    (re.compile(r"\bexpect\(\)"), "kvw_expect"),
    # sizes are options in KiB or MiB in C; the figures after them stay in bytes and say so
    (
        re.compile(r"^(staging|window)_bytes: (budget of )?(\d+)( bytes)?"),
        lambda m: f"{m.group(1)}_mib: {m.group(2) or ''}{m.group(3)} bytes",
    ),
    (re.compile(r"^(chunk|slot)_bytes:"), lambda m: f"{m.group(1)}_kib:"),
    (re.compile(r"\['([^\]]*)'\]"), lambda m: m.group(1).replace("', '", "|")),  # ['fp8', 'int4'] -> fp8|int4
    (re.compile(r"\[Errno (-?\d+)\] ([^,;()]+)"), lambda m: os_error_text(OSError(int(m.group(1)), m.group(2)))),
)


def c_terms(message: str) -> str:
    for pattern, replacement in C_TERMS:
        message = pattern.sub(replacement, message)  # type: ignore[arg-type]
    return message


def os_error_text(exc: OSError) -> str:
    """``[Errno 98] Address already in use`` -> ``address already in use (EADDRINUSE)``."""
    if exc.errno is None:
        return str(exc)
    text = exc.strerror or str(exc)
    text = text[:1].lower() + text[1:]
    if exc.errno < 0:  # getaddrinfo's codes have no errno name
        return text
    return f"{text} ({errno.errorcode.get(exc.errno, f'errno {exc.errno}')})"


def where_from(tb) -> str:
    """The last frames of a traceback, as ``kvwire/engine/sender.py:123 (send_layer)``:
    paths start at the package, so no machine's folders appear in a message."""
    frames = traceback.extract_tb(tb)[-3:]
    out = []
    for f in frames:
        path = f.filename.replace("\\", "/")
        cut = path.rfind("/kvwire/")
        path = path[cut + 1 :] if cut >= 0 else path.rsplit("/", 1)[-1]
        out.append(f"{path}:{f.lineno} ({f.name})")
    return " <- ".join(reversed(out))


def message_of(exc: BaseException, status: int) -> str:
    if status == INTERNAL:
        where = where_from(exc.__traceback__)
        return f"internal error in kvwire, please report it: {type(exc).__name__}: {exc} at {where}"
    if isinstance(exc, OSError) and status == SYSTEM:
        return os_error_text(exc)
    if isinstance(exc, MemoryError):
        return f"out of memory{': ' + str(exc) if str(exc) else ''}"
    return c_terms(str(exc))


SUMMARY = re.compile(r"(sender|receiver) has (\d+) layers \[([^\]]*)\], (\S+) \(fingerprint")


def layout_difference(message: str, own: dict, own_role: str = "sender") -> str:
    """A layout rejection (the handshake's text holds both sides' model summaries) as the
    C fields that differ. Block sizes may differ between peers; the model may not."""
    sides = {m.group(1): m.groups()[1:] for m in SUMMARY.finditer(message)}
    peer_role = "receiver" if own_role == "sender" else "sender"
    if peer_role not in sides:
        return c_terms(message)
    layers, kinds, dtype = sides[peer_role]
    peer: dict = {"num_layers": int(layers), "dtype": c_terms(dtype)}
    latent = re.fullmatch(r"kv (\d+)", kinds.strip())
    paged = re.fullmatch(r"k/v (\d+)x(\d+)", kinds.strip())
    if latent:
        peer.update(num_kv_heads=0, head_dim=int(latent.group(1)))
    elif paged:
        peer.update(num_kv_heads=int(paged.group(1)), head_dim=int(paged.group(2)))
    mine = {"num_layers": own["num_layers"], "num_kv_heads": own["num_kv_heads"], "head_dim": own["head_dim"],
            "dtype": DTYPES.get(own["dtype"], str(own["dtype"]))}  # fmt: skip
    diffs = []

    def shown(key: str, value: object) -> str:
        return f"{value} (MLA latent)" if key == "num_kv_heads" and value == 0 else str(value)

    for key in ("num_layers", "num_kv_heads", "head_dim", "dtype"):
        if key in peer and mine[key] != peer[key]:
            diffs.append(f"{key} is {shown(key, mine[key])} here, {shown(key, peer[key])} on the {peer_role}")
    if not diffs:
        diffs.append(f"the {peer_role}'s model is [{kinds}]")
    return f"layout: the {peer_role}'s KV layout is not this {own_role}'s: " + "; ".join(diffs)


class Handles:
    """Integer handles for Python objects, per kind, so C never holds a Python pointer."""

    def __init__(self) -> None:
        self._objects: dict[int, tuple[str, object]] = {}
        self._ids = itertools.count(0x1000)
        self._lock = threading.Lock()

    def add(self, kind: str, obj: object) -> int:
        with self._lock:
            handle = next(self._ids)
            self._objects[handle] = (kind, obj)
            return handle

    def get(self, kind: str, handle: int, argument: str) -> object:
        return self._find(kind, handle, argument, remove=False)

    def pop(self, kind: str, handle: int, argument: str) -> object:
        """The object, removed in the same hold of the lock that found it: of two threads
        freeing one handle at once, one gets it and the other Closed."""
        return self._find(kind, handle, argument, remove=True)

    def _find(self, kind: str, handle: int, argument: str, remove: bool) -> object:
        if handle == 0:
            raise Invalid(f"{argument}: NULL handle")
        with self._lock:
            entry = self._objects.get(handle)
            found = entry is not None and entry[0] == kind
            if found and remove:
                del self._objects[handle]
        if not found:
            raise Closed(f"{argument}: this kvw_{kind} was closed or freed (or is not a kvw_{kind})")
        return entry[1]


# -- options -------------------------------------------------------------------------------------
class Option:
    """One ``key=value`` option: its type and range (or choices), checked in C terms."""

    def __init__(self, kind: type, low: float = 0, high: float = 0, choices=()) -> None:
        self.kind, self.low, self.high, self.choices = kind, low, high, tuple(choices)

    def parse(self, key: str, value: str):
        if self.choices:
            if value not in self.choices:
                raise Invalid(f"options: {key}={value!r} is not one of {'|'.join(self.choices)}")
            return value
        if self.kind is str:
            return value
        if self.kind is int and not re.fullmatch(r"[0-9]+", value):
            raise Invalid(f"options: {key}={value!r} is not a whole number")
        if self.kind is float and not re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", value):
            raise Invalid(f"options: {key}={value!r} is not a number of seconds (such as 10 or 2.5)")
        number = self.kind(value)
        if not self.low <= number <= self.high:
            raise Invalid(f"options: {key}={value} is out of range {self.kind(self.low)}..{self.kind(self.high)}")
        return number


SENDER_OPTIONS = {
    "streams": Option(int, 1, 64),
    "codec": Option(str),
    "chunk_kib": Option(int, 4, 1 << 20),
    "staging_mib": Option(int, 1, 1 << 20),
    "connect_timeout": Option(float, 0.001, 86400),
    "transport": Option(str, choices=("tcp", "ucx")),
    "exact_tokens": Option(int, 0, 1 << 30),
}
RECEIVER_OPTIONS = {
    "staging_mib": Option(int, 1, 1 << 20),
    "slot_kib": Option(int, 4, 1 << 20),
    "window_mib": Option(int, 0, 1 << 20),
    "codecs": Option(str),
    "unclaimed_timeout": Option(float, 0.001, 86400),
    "transport": Option(str, choices=("tcp", "ucx")),
}


def parse_options(text: str, allowed: dict[str, Option]) -> dict:
    """``"a=1, b=fp8"`` -> typed dict. Grammar: items separated by commas; spaces around
    keys and values are ignored; an empty item, an empty value, an unknown key or a key
    given twice is refused, naming it."""
    out: dict[str, Any] = {}
    if not text.strip():
        return out
    for position, item in enumerate(text.split(","), 1):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not item.strip():
            raise Invalid(f"options: item {position} of {text!r} is empty (a stray comma?)")
        if not sep:
            raise Invalid(f"options: {item.strip()!r} is not key=value")
        if key not in allowed:
            raise Invalid(f"options: unknown option {key!r}; known: {', '.join(sorted(allowed))}")
        if key in out:
            raise Invalid(f"options: {key} is given twice")
        if not value:
            raise Invalid(f"options: {key} has an empty value")
        out[key] = allowed[key].parse(key, value)
    return out


def codec_option(value: str, key: str) -> str:
    """A codec name or descriptor, checked now so its error names the option."""
    import kvwire.codec

    try:
        return kvwire.codec.get(value).descriptor
    except (ValueError, TypeError) as exc:
        detail = str(exc).removeprefix("codec: ")
        raise Invalid(f"options: {key}={value!r}: {detail}") from None


# -- C structs -----------------------------------------------------------------------------------
def check_struct_size(ptr, ctype: str, argument: str) -> None:
    """Check a struct's ``struct_size`` (this library knows only its own header's size)."""
    size = ptr.struct_size
    known = _ffi.sizeof(ctype)
    if size != known:
        raise Invalid(
            f"{argument}.struct_size: {size}, but this library knows sizeof({ctype}) = {known}: set it to "
            f"sizeof({ctype}), and build against a kvwire.h no newer than the library"
        )


def layout_fields(c_layout) -> dict:
    if c_layout == _ffi.NULL:
        raise Invalid("layout: NULL")
    check_struct_size(c_layout, "kvw_layout", "layout")
    fields = {k: getattr(c_layout, k) for k in ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype")}
    for key, high in LAYOUT_LIMITS.items():
        low = 0 if key == "num_kv_heads" else 1
        if not low <= fields[key] <= high:
            raise Invalid(f"layout.{key}: {fields[key]} is out of range {low}..{high}")
    if fields["dtype"] not in DTYPES:
        raise Invalid(f"layout.dtype: {fields['dtype']} is not KVW_BF16, KVW_FP16 or KVW_FP32")
    return fields


def layout_from(fields: dict) -> object:
    import kvwire

    dtype = {0: "bf16", 1: "fp16", 2: "fp32"}[fields["dtype"]]
    n, heads, dim, bs = fields["num_layers"], fields["num_kv_heads"], fields["head_dim"], fields["block_size"]
    if heads == 0:
        return kvwire.KVLayout.mla(n, dim, bs, dtype)
    return kvwire.KVLayout.gqa(n, heads, dim, bs, dtype)


class _CudaArray:
    """Just enough of ``__cuda_array_interface__`` for torch to wrap a device pointer."""

    def __init__(self, ptr: int, count: int, typestr: str) -> None:
        self.__cuda_array_interface__ = {"shape": (count,), "typestr": typestr, "data": (ptr, False), "version": 3}


def check_device(device: int, argument: str) -> None:
    if device < -1:
        raise Invalid(f"{argument}: {device}; use -1 for host memory or a CUDA device index")
    if device >= 0:
        import torch

        if not torch.cuda.is_available():
            raise SystemRefused(f"{argument}: CUDA device {device}, but no CUDA device is usable in this process")
        count = torch.cuda.device_count()
        if device >= count:
            raise SystemRefused(f"{argument}: CUDA device {device}, but this machine has {count} (0..{count - 1})")


def tensor_from(ptr: int, device: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype) -> object:
    """A torch view of caller-owned memory (host or CUDA); no copy, no ownership."""
    import torch

    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device < 0:
        buffer = (ctypes.c_char * (span * itemsize)).from_address(ptr)
        flat = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype)
    else:
        typestr = {2: "<i2", 4: "<f4"}[itemsize]
        flat = torch.as_tensor(_CudaArray(ptr, span, typestr), device=f"cuda:{device}").view(dtype)
    return flat.as_strided(shape, strides)


def caches_from(layout, fields: dict, c_caches, count: int) -> list[dict]:
    """The caller's tensors, checked field by field, as torch views (one dict per layer)."""
    per_layer = [p for p in layout.layers[0].paged]
    want = layout.num_layers * len(per_layer)
    if c_caches == _ffi.NULL:
        raise Invalid("caches: NULL")
    if count != want:
        what = "k and v" if len(per_layer) == 2 else "kv"
        raise Invalid(f"num_caches: the layout needs {want} tensors ({what} for each of {layout.num_layers} layers), "
                      f"got {count}")  # fmt: skip
    check_struct_size(c_caches[0], "kvw_tensor", "caches[0]")
    mla = len(per_layer) == 1
    itemsize = {0: 2, 1: 2, 2: 4}[fields["dtype"]]
    tensors = []
    for index in range(count):
        c = c_caches[index]
        name = f"caches[{index}]"
        if c.struct_size != c_caches[0].struct_size:
            raise Invalid(f"{name}.struct_size: {c.struct_size}, but caches[0] has {c_caches[0].struct_size}")
        if c.data == _ffi.NULL:
            raise Invalid(f"{name}.data: NULL")
        if c.num_blocks <= 0:
            raise Invalid(f"{name}.num_blocks: must be positive, got {c.num_blocks}")
        if c.num_blocks != c_caches[0].num_blocks:
            raise Invalid(f"{name}.num_blocks: {c.num_blocks}, but caches[0] has {c_caches[0].num_blocks}: "
                          "every tensor needs the same block count")  # fmt: skip
        check_device(c.device, f"{name}.device")
        if c.device != c_caches[0].device:
            raise Invalid(f"{name}.device: {c.device}, but caches[0] is on {c_caches[0].device}")
        dims = (0, 1, 3) if mla else (0, 1, 2, 3)
        shape = (c.num_blocks, layout.block_size, *per_layer[0].token_shape)
        strides = tuple(c.strides[k] for k in dims)
        for k, n, s in zip(dims, shape, strides):
            if s < 0 or (s == 0 and n > 1):
                raise Invalid(f"{name}.strides[{k}]: {s}; strides must be positive (0 only for a dimension of 1)")
        span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
        if span * itemsize >= ADDRESS_SPACE:
            raise Invalid(f"{name}: num_blocks and strides span {span * itemsize} bytes, more than an address space")
        tensors.append((int(_ffi.cast("uintptr_t", c.data)), c.device, shape, strides))
    views = [tensor_from(*t, layout.dtype) for t in tensors]
    return [
        {spec.name: views[i * len(per_layer) + j] for j, spec in enumerate(per_layer)} for i in range(layout.num_layers)
    ]


def c_caches_device(c_caches) -> int:
    """The device of caches that :func:`caches_from` accepted (all share one)."""
    return c_caches[0].device


def text(ptr, argument: str, allow_null: bool = False) -> str:
    if ptr == _ffi.NULL:
        if allow_null:
            return ""
        raise Invalid(f"{argument}: NULL")
    raw = _ffi.string(ptr)
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise Invalid(f"{argument}: not valid UTF-8 (byte {exc.start})") from None


def secret_from(ptr) -> bytes:
    if ptr == _ffi.NULL:
        raise Invalid("secret: NULL; pass the shared secret (at least 8 bytes, the same on both sides)")
    secret = _ffi.string(ptr)
    if len(secret) < 8:
        raise Invalid(f"secret: {len(secret)} bytes; at least 8 are needed")
    return secret


def address(ptr, argument: str, port_low: int) -> str:
    value = text(ptr, argument)
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not port_low <= int(port) <= 65535:
        raise Invalid(f'{argument}: expected "host:port" with a port in {port_low}..65535, got {value!r}')
    return value


def endpoint_arguments(c_layout, address_ptr, argument: str, secret, options, out) -> tuple:
    """What ``kvw_sender_create`` and ``kvw_receiver_create`` share, checked in the order of
    their parameters (``out`` first): (layout fields, KVLayout, "host:port", secret, options)."""
    out_pointer(out)
    fields = layout_fields(c_layout)
    listening = argument == "listen"
    where = address(address_ptr, argument, 0 if listening else 1)
    key = secret_from(secret)
    opts = parse_options(text(options, "options", allow_null=True), RECEIVER_OPTIONS if listening else SENDER_OPTIONS)
    return fields, layout_from(fields), where, key, opts


def block_list(ptr, count: int) -> list[int]:
    if count < 0:
        raise Invalid(f"num_blocks: must be >= 0, got {count}")
    if count and ptr == _ffi.NULL:
        raise Invalid("block_ids: NULL")
    return [ptr[i] for i in range(count)]


def deadline_of(value: float) -> float:
    if math.isnan(value) or value <= 0:
        raise Invalid(f"deadline_s: must be > 0 seconds, got {value}")
    return value


def timeout_of(value: float) -> float | None:
    if math.isnan(value):
        raise Invalid("timeout_s: NaN")
    return None if value < 0 else value


def out_pointer(out) -> None:
    if out == _ffi.NULL:
        raise Invalid("out: NULL")


# -- senders and transfers -----------------------------------------------------------------------
class CSender:
    """A ``Sender`` and whether its caches are CUDA memory (``cuda_stream`` is checked against it)."""

    __slots__ = ("sender", "on_gpu")

    def __init__(self, sender, on_gpu: bool) -> None:
        self.sender, self.on_gpu = sender, on_gpu


class Transfer:
    """A ``SendHandle`` with its deadline, which ``kvw_transfer_poll`` enforces at once (the
    sender's own pass ends an expired transfer too, within tens of milliseconds)."""

    __slots__ = ("handle", "on_gpu", "deadline")

    def __init__(self, handle, on_gpu: bool, deadline_s: float) -> None:
        self.handle = handle
        self.on_gpu = on_gpu
        # Taken after the sender took its own: once this has passed, so has the sender's.
        self.deadline = time.monotonic() + deadline_s

    def finish(self, timeout: float | None) -> None:
        self.handle.finish(timeout)

    def poll(self) -> int:
        """PENDING, OK, or raise the transfer's error; never cancels before the deadline."""
        if not self.handle.done():
            if time.monotonic() < self.deadline:
                return PENDING
            self.handle._sender.expire_transfers()  # now, not at the sender's next pass
        self.finish(0)  # it has ended: this returns or raises its outcome, and cancels nothing
        return OK


def request_poll(handle) -> int:
    """PENDING, OK, or raise the request's error; never blocks. Past the deadline it ends
    the request now; one with a payload still landing in its rows stays PENDING until that
    ends (at most the receiver's drain limit), where ``wait`` would block."""
    if not handle.done():
        if time.monotonic() < handle.deadline:
            return PENDING
        handle._receiver._expire(handle)
        if not handle.done():
            return PENDING
    handle.wait(0)  # it has ended: returns or raises the outcome at once
    return OK


# -- logging ---------------------------------------------------------------------------------------
class CLogHandler(logging.Handler):
    """kvwire's log records, to a C callback or to standard error.

    ``logging.Handler.handle`` holds the handler's lock around ``emit``, so the callback is
    never called twice at once; swapping it under that lock means that once the swap
    returns, the old callback is neither running nor called again."""

    def __init__(self) -> None:
        super().__init__()
        self.callback = None
        self.user_data = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                message += f" ({type(exc).__name__}: {exc})"
            message = c_terms(message)
            if self.callback is None:
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
                return
            level = max((lv for lv in (10, 20, 30, 40) if lv <= record.levelno), default=10)
            self.callback(level, _ffi.new("char[]", message.encode(errors="replace")), self.user_data)
        except Exception:  # noqa: BLE001 - logging must never break the thread that logs
            self.handleError(record)

    def set_callback(self, callback, user_data) -> None:
        with self.lock:  # type: ignore[union-attr]
            self.callback, self.user_data = callback, user_data


_log_handler: CLogHandler | None = None


def log_handler() -> CLogHandler:
    """Route the ``kvwire`` loggers through :class:`CLogHandler` (once): until the first
    logging call, Python's own last-resort handler prints warnings to stderr, which
    ``CLogHandler`` without a callback does the same way."""
    global _log_handler
    if _log_handler is None:
        _log_handler = CLogHandler()
        logger = logging.getLogger("kvwire")
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
        logger.addHandler(_log_handler)
        logger.propagate = False
    return _log_handler


# -- the exported functions ---------------------------------------------------------------------
_ffi: Any = None
_state = threading.local()
_handles = Handles()
_kvwire: Any = None
_init_error: str | None = None


def _fail(status: int, message: str) -> int:
    _state.message = message
    return status + 1


def guarded(fn, needs_init: bool = True):
    """Run an export: exceptions become statuses and a thread-local message. ``fn`` may
    return a status (the polls' PENDING); None is KVW_OK. Success clears the message."""

    def wrapper(*args):
        if needs_init and _kvwire is None:
            return _fail(INIT, _init_error or "kvwire is not initialised: call kvw_init() first")
        try:
            status = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - nothing may escape into C
            status = status_of(exc)
            return _fail(status, message_of(exc, status))
        _state.message = ""
        return (status or OK) + 1

    wrapper.__name__ = fn.__name__
    return wrapper


def anytime(fn):
    """:func:`guarded` for the calls that work before ``kvw_init``."""
    return guarded(fn, needs_init=False)


def _store(out, kind: str, obj) -> None:
    out[0] = _ffi.cast(f"kvw_{kind} *", _handles.add(kind, obj))


def _get(kind: str, ptr) -> Any:
    """The object behind a C handle (``kvw_<kind> *``); the C argument is named ``kind``."""
    return _handles.get(kind, int(_ffi.cast("uintptr_t", ptr)), kind)


def _pop(kind: str, ptr) -> Any:
    """As :func:`_get`, and forget the handle (close and free)."""
    return _handles.pop(kind, int(_ffi.cast("uintptr_t", ptr)), kind)


def _write_json(obj, buf, buf_len, needed) -> None:
    if buf_len < 0:
        raise Invalid(f"buf_len: must be >= 0, got {buf_len}")
    if buf == _ffi.NULL and buf_len:
        raise Invalid("buf: NULL with a non-zero buf_len")
    data = json.dumps(obj, default=str).encode() + b"\0"
    if needed != _ffi.NULL:
        needed[0] = len(data)
    if buf == _ffi.NULL:
        return  # a size query
    if buf_len < len(data):
        raise Invalid(f"buf_len: {buf_len} bytes is too small: the statistics need {len(data)} now (see needed)")
    _ffi.memmove(buf, data, len(data))


def install(ffi) -> None:
    global _ffi
    _ffi = ffi
    keep = {}  # C strings returned to the caller must outlive the call

    @ffi.def_extern(error=INTERNAL + 1)
    def _kvwpy_init():
        global _kvwire, _init_error
        if _kvwire is None:
            try:
                import torch  # noqa: F401

                import kvwire

                _kvwire = kvwire
            except BaseException as exc:  # noqa: BLE001
                _init_error = f"the embedded Python ({sys.executable}) cannot import kvwire: {exc!r}"
                return _fail(INIT, _init_error)
        _state.message = ""
        return OK + 1

    @ffi.def_extern()
    def _kvwpy_strerror(status):
        # One string per status, kept for good (a caller may hold it); setdefault: two threads
        # asking at once get the same string, never one the other's store let go of.
        found = keep.get(f"e{status}")
        if found is None:
            text = MESSAGES.get(status, f"unknown status {status}")
            found = keep.setdefault(f"e{status}", ffi.new("char[]", text.encode()))
        return found

    @ffi.def_extern()
    def _kvwpy_last_error():
        message = getattr(_state, "message", "")
        buf = ffi.new("char[]", message.encode(errors="replace"))
        _state.buffer = buf  # valid until this thread's next call of kvw_last_error
        return buf

    @ffi.def_extern(error=INTERNAL + 1)
    @anytime
    def _kvwpy_set_log_callback(callback, user_data):
        log_handler().set_callback(None if callback == ffi.NULL else callback, user_data)

    @ffi.def_extern(error=INTERNAL + 1)
    @anytime
    def _kvwpy_set_log_level(level):
        if level not in LOG_LEVELS:
            raise Invalid(f"level: {level} is not one of {', '.join(f'{v} ({k})' for k, v in LOG_LEVELS.items())}")
        log_handler()
        logging.getLogger("kvwire").setLevel(logging.CRITICAL + 1 if level == 100 else level)

    # -- sender ------------------------------------------------------------------------------
    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_sender_create(c_layout, peer, secret, caches, num_caches, options, out):
        fields, layout, peer_text, key, opts = endpoint_arguments(c_layout, peer, "peer", secret, options, out)
        codec = codec_option(opts.get("codec", "raw"), "codec")
        chunk_kib, staging_mib = opts.get("chunk_kib"), opts.get("staging_mib", 64)
        if chunk_kib is not None and staging_mib << 10 < chunk_kib + 64:
            raise Invalid(f"options: staging_mib={staging_mib} cannot hold one chunk of chunk_kib={chunk_kib} "
                          f"(it needs {chunk_kib + 64} KiB)")  # fmt: skip
        kv_caches = caches_from(layout, fields, caches, num_caches)
        try:
            sender = _kvwire.Sender(
                layout,
                peer_text,
                secret=key,
                kv_caches=kv_caches,
                streams=opts.get("streams", 4),
                codec=codec,
                chunk_bytes=None if chunk_kib is None else chunk_kib << 10,
                staging_bytes=staging_mib << 20,
                connect_timeout=opts.get("connect_timeout", 10.0),
                transport=opts.get("transport", "tcp"),
                exact_tokens=opts.get("exact_tokens", 0),
            )
        except _kvwire.LayoutMismatch as exc:
            raise _kvwire.LayoutMismatch(layout_difference(str(exc), fields)) from None
        _store(out, "sender", CSender(sender, c_caches_device(caches) >= 0))

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_sender_stats_json(sender, buf, buf_len, needed):
        _write_json(_get("sender", sender).sender.stats(), buf, buf_len, needed)

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_sender_close(sender):
        _pop("sender", sender).sender.close()

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_transfer_begin(sender, request_id, block_ids, num_blocks, num_tokens, deadline_s, out):
        out_pointer(out)
        s = _get("sender", sender)
        deadline = deadline_of(deadline_s)
        handle = s.sender.transfer(text(request_id, "request_id"), block_list(block_ids, num_blocks), num_tokens,
                                   deadline=deadline)  # fmt: skip
        _store(out, "transfer", Transfer(handle, s.on_gpu, deadline))

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_transfer_send_layer(transfer, layer, cuda_stream):
        w = _get("transfer", transfer)
        if cuda_stream == ffi.NULL:
            w.handle.send_layer(layer)
            return
        if not w.on_gpu:
            raise Invalid("cuda_stream: must be NULL, the caches are host memory")
        t = w.handle
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(int(ffi.cast("uintptr_t", cuda_stream)))):
            t.send_layer(layer)

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_transfer_finish(transfer, timeout_s):
        _get("transfer", transfer).finish(timeout_of(timeout_s))

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_transfer_poll(transfer):
        return _get("transfer", transfer).poll()

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_transfer_cancel(transfer):
        _get("transfer", transfer).handle.cancel()

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_transfer_free(transfer):
        t = _pop("transfer", transfer).handle
        if not t.done():
            t.cancel("freed before it ended")

    # -- receiver ----------------------------------------------------------------------------
    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_receiver_create(c_layout, listen, secret, caches, num_caches, options, out):
        fields, layout, listen_text, key, opts = endpoint_arguments(c_layout, listen, "listen", secret, options, out)
        codecs = None
        if "codecs" in opts:
            codecs = [codec_option(name.strip(), "codecs") for name in opts["codecs"].split("|")]
        staging_mib, slot_kib, window_mib = opts.get("staging_mib", 256), opts.get("slot_kib", 4160), opts.get(
            "window_mib", 0)  # fmt: skip
        if staging_mib << 10 < slot_kib:
            raise Invalid(f"options: staging_mib={staging_mib} cannot hold one slot of slot_kib={slot_kib}")
        if window_mib and window_mib << 10 < slot_kib:
            raise Invalid(f"options: window_mib={window_mib} is less than one slot of slot_kib={slot_kib}")
        kv_caches = caches_from(layout, fields, caches, num_caches)
        try:
            receiver = _kvwire.Receiver(
                layout,
                listen_text,
                secret=key,
                kv_caches=kv_caches,
                staging_bytes=staging_mib << 20,
                slot_bytes=slot_kib << 10,
                window_bytes=(window_mib << 20) or None,
                codecs=codecs,
                unclaimed_timeout=opts.get("unclaimed_timeout", 60.0),
                transport=opts.get("transport", "tcp"),
            )
        except OSError as exc:
            raise SystemRefused(f"listen: cannot listen on {listen_text}: {os_error_text(exc)}") from None
        _store(out, "receiver", receiver)

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_receiver_port(receiver, port):
        if port == ffi.NULL:
            raise Invalid("port: NULL")
        port[0] = _get("receiver", receiver).address[1]

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_receiver_stats_json(receiver, buf, buf_len, needed):
        _write_json(_get("receiver", receiver).stats(), buf, buf_len, needed)

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_receiver_close(receiver):
        _pop("receiver", receiver).close()

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_expect(receiver, request_id, block_ids, num_blocks, num_tokens, deadline_s, out):
        out_pointer(out)
        r = _get("receiver", receiver)
        deadline = deadline_of(deadline_s)
        h = r.expect(text(request_id, "request_id"), block_list(block_ids, num_blocks), num_tokens, deadline=deadline)
        _store(out, "request", h)

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_request_wait_layer(request, layer, timeout_s):
        _get("request", request).wait_layer(layer, timeout_of(timeout_s))

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_request_wait(request, timeout_s):
        _get("request", request).wait(timeout_of(timeout_s))

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_request_poll(request):
        return request_poll(_get("request", request))

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_request_cancel(request):
        _get("request", request).cancel()

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_request_free(request):
        h = _pop("request", request)
        if not h.done():
            h.cancel("freed before it ended")


try:  # only inside libkvwire.so
    from _kvwire_capi import ffi as _embedded_ffi  # type: ignore[import-not-found]
except ImportError:
    _embedded_ffi = None
if _embedded_ffi is not None:
    install(_embedded_ffi)
