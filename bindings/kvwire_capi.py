"""The Python side of libkvwire.so: the ``_kvwpy_*`` functions behind kvwire.h.

cffi runs this file as the embedding's init code, inside the module ``_kvwire_capi``.
Outside libkvwire.so (linting, tests) it imports and does nothing but define helpers.

Rules kept here:
  * every function returns ``status + 1`` (see build_capi.py): KVW_OK is 1 on this side;
  * every exception becomes a status and a thread-local message, none is lost on stderr;
  * handles are small integers disguised as pointers, looked up in a table: a closed or
    freed handle is simply missing (KVW_ERR_CLOSED), so use-after-close cannot crash.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import threading
import traceback
from typing import Any

OK, INVALID, TIMEOUT, PEER_LOST, AUTH, PROTOCOL, LAYOUT, CANCELLED, TRANSFER, CLOSED, INIT, INTERNAL = range(12)
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
}


class Closed(Exception):
    """A handle that was closed or freed (or never existed)."""


class Invalid(ValueError):
    pass


def status_of(exc: BaseException) -> int:
    import kvwire

    for kind, status in (
        (Closed, CLOSED),
        (kvwire.TransferTimeout, TIMEOUT),
        (kvwire.PeerLost, PEER_LOST),
        (kvwire.AuthenticationFailed, AUTH),
        (kvwire.LayoutMismatch, LAYOUT),
        (kvwire.ProtocolError, PROTOCOL),
        (kvwire.Cancelled, CANCELLED),
        (kvwire.TransferError, TRANSFER),
        ((ValueError, TypeError), INVALID),
    ):
        if isinstance(exc, kind):
            return status
    return INTERNAL


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
        if handle == 0:
            raise Invalid(f"{argument}: NULL handle")
        with self._lock:
            entry = self._objects.get(handle)
        if entry is None or entry[0] != kind:
            raise Closed(f"{argument}: this {kind} was closed or freed (or is not a {kind})")
        return entry[1]

    def pop(self, kind: str, handle: int, argument: str) -> object:
        obj = self.get(kind, handle, argument)
        with self._lock:
            self._objects.pop(handle, None)
        return obj


# -- conversions ---------------------------------------------------------------------------------
def parse_options(text: str, allowed: dict[str, type]) -> dict:
    """``"a=1,b=fp8"`` -> typed dict; unknown keys and bad values are errors that name them."""
    out = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise Invalid(f"options: {item!r} is not key=value")
        if key not in allowed:
            raise Invalid(f"options: unknown option {key!r}; known: {', '.join(sorted(allowed))}")
        try:
            out[key] = allowed[key](value.strip())
        except ValueError:
            raise Invalid(f"options: {key}={value!r} is not a {allowed[key].__name__}") from None
    return out


def layout_from(c_layout) -> object:
    import kvwire

    dtypes = {0: "bf16", 1: "fp16", 2: "fp32"}
    if c_layout.dtype not in dtypes:
        raise Invalid(f"layout.dtype: {c_layout.dtype} is not KVW_BF16, KVW_FP16 or KVW_FP32")
    if c_layout.num_kv_heads == 0:
        return kvwire.KVLayout.mla(c_layout.num_layers, c_layout.head_dim, c_layout.block_size, dtypes[c_layout.dtype])
    return kvwire.KVLayout.gqa(
        c_layout.num_layers, c_layout.num_kv_heads, c_layout.head_dim, c_layout.block_size, dtypes[c_layout.dtype]
    )


class _CudaArray:
    """Just enough of ``__cuda_array_interface__`` for torch to wrap a device pointer."""

    def __init__(self, ptr: int, count: int, typestr: str) -> None:
        self.__cuda_array_interface__ = {"shape": (count,), "typestr": typestr, "data": (ptr, False), "version": 3}


def tensor_from(ptr: int, device: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype) -> object:
    """A torch view of caller-owned memory (host or CUDA); no copy, no ownership."""
    import torch

    if ptr == 0:
        raise Invalid("caches: a tensor has a NULL data pointer")
    if any(s < 0 for s in strides):
        raise Invalid("caches: negative strides are not supported")
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device < 0:
        buffer = (ctypes.c_char * (span * itemsize)).from_address(ptr)
        flat = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype)
    else:
        typestr = {2: "<i2", 4: "<f4"}[itemsize]
        flat = torch.as_tensor(_CudaArray(ptr, span, typestr), device=f"cuda:{device}").view(dtype)
    return flat.as_strided(shape, strides)


def caches_from(layout, c_caches, count: int) -> list[dict]:
    per_layer = [p for p in layout.layers[0].paged]
    want = layout.num_layers * len(per_layer)
    if c_caches is None:
        raise Invalid("caches: NULL")
    if count != want:
        raise Invalid(f"num_caches: the layout needs {want} tensors ({len(per_layer)} per layer), got {count}")
    out = []
    for i in range(layout.num_layers):
        layer = {}
        for j, spec in enumerate(per_layer):
            c = c_caches[i * len(per_layer) + j]
            if c.num_blocks <= 0:
                raise Invalid(f"caches[{i * len(per_layer) + j}].num_blocks: must be positive, got {c.num_blocks}")
            shape = (c.num_blocks, layout.block_size, *spec.token_shape)
            strides = tuple(c.strides[k] for k in (0, 1, 2, 3)) if len(spec.token_shape) == 2 else (
                c.strides[0], c.strides[1], c.strides[3])  # fmt: skip
            layer[spec.name] = tensor_from(int(ffi_cast_ptr(c.data)), c.device, shape, strides, layout.dtype)
        out.append(layer)
    return out


def ffi_cast_ptr(ptr) -> int:
    return int(_ffi.cast("uintptr_t", ptr))


def text(ptr, argument: str, allow_null: bool = False) -> str:
    if ptr == _ffi.NULL:
        if allow_null:
            return ""
        raise Invalid(f"{argument}: NULL")
    return _ffi.string(ptr).decode()


def block_list(ptr, count: int) -> list[int]:
    if count < 0:
        raise Invalid(f"num_blocks: must be >= 0, got {count}")
    if count and ptr == _ffi.NULL:
        raise Invalid("block_ids: NULL")
    return [ptr[i] for i in range(count)]


def timeout(value: float) -> float | None:
    return None if value < 0 else value


# -- the exported functions ---------------------------------------------------------------------
_ffi = None
_state = threading.local()
_handles = Handles()
_kvwire = None
_init_error: str | None = None


def _fail(status: int, message: str) -> int:
    _state.message = message
    return status + 1


def guarded(fn):
    """Run an export: exceptions become statuses and a thread-local message."""

    def wrapper(*args):
        if _kvwire is None:
            return _fail(INIT, _init_error or "kvwire is not initialised: call kvw_init() first")
        try:
            fn(*args)
            _state.message = ""
            return OK + 1
        except BaseException as exc:  # noqa: BLE001 - nothing may escape into C
            status = status_of(exc)
            detail = f"{type(exc).__name__}: {exc}"
            if status == INTERNAL:
                detail += "\n" + traceback.format_exc()
            return _fail(status, detail)

    wrapper.__name__ = fn.__name__
    return wrapper


def _store(out, kind: str, obj) -> None:
    if out == _ffi.NULL:
        raise Invalid("out: NULL")
    out[0] = _ffi.cast(f"kvw_{kind} *", _handles.add(kind, obj))


def _get(kind: str, ptr) -> Any:
    """The object behind a C handle (``kvw_<kind> *``); the C argument is named ``kind``."""
    return _handles.get(kind, int(_ffi.cast("uintptr_t", ptr)), kind)


def _pop(kind: str, ptr) -> Any:
    """As :func:`_get`, and forget the handle (close and free)."""
    return _handles.pop(kind, int(_ffi.cast("uintptr_t", ptr)), kind)


def install(ffi) -> None:
    global _ffi, _kvwire, _init_error
    _ffi = ffi
    keep = {}  # C strings returned to the caller must outlive the call

    def cstr(key: str, value: str):
        buf = ffi.new("char[]", value.encode())
        keep[key] = buf
        return buf

    @ffi.def_extern(error=INTERNAL + 1)
    def _kvwpy_init():
        global _kvwire, _init_error
        if _kvwire is not None:
            return OK + 1
        try:
            import torch  # noqa: F401

            import kvwire

            _kvwire = kvwire
            return OK + 1
        except BaseException as exc:  # noqa: BLE001
            _init_error = f"kvwire could not be imported by the embedded Python: {exc!r}"
            return _fail(INIT, _init_error)

    @ffi.def_extern()
    def _kvwpy_version():
        return keep.get("version") or cstr("version", "0.1.0")

    @ffi.def_extern()
    def _kvwpy_strerror(status):
        return keep.get(f"e{status}") or cstr(f"e{status}", MESSAGES.get(status, f"unknown status {status}"))

    @ffi.def_extern()
    def _kvwpy_last_error():
        message = getattr(_state, "message", "")
        buf = ffi.new("char[]", message.encode())
        _state.buffer = buf  # valid until this thread's next call of kvw_last_error
        return buf

    # -- sender ------------------------------------------------------------------------------
    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_sender_create(c_layout, peer, secret, caches, num_caches, options, out):
        if c_layout == ffi.NULL:
            raise Invalid("layout: NULL")
        layout = layout_from(c_layout)
        opts = parse_options(
            text(options, "options", allow_null=True),
            {
                "streams": int,
                "codec": str,
                "chunk_kib": int,
                "staging_mib": int,
                "connect_timeout": float,
                "transport": str,
                "exact_tokens": int,
            },  # fmt: skip
        )
        sender = _kvwire.Sender(
            layout,
            text(peer, "peer"),
            secret=text(secret, "secret"),
            kv_caches=caches_from(layout, caches, num_caches),
            streams=opts.get("streams", 4),
            codec=opts.get("codec", "raw"),
            chunk_bytes=opts.get("chunk_kib", 2048) << 10,
            staging_bytes=opts.get("staging_mib", 64) << 20,
            connect_timeout=opts.get("connect_timeout", 10.0),
            transport=opts.get("transport", "tcp"),
            exact_tokens=opts.get("exact_tokens", 0),
        )
        _store(out, "sender", sender)

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_sender_stats_json(sender, buf, buf_len):
        _write_json(_get("sender", sender).stats(), buf, buf_len)

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_sender_close(sender):
        _pop("sender", sender).close()

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_transfer_begin(sender, request_id, block_ids, num_blocks, num_tokens, deadline_s, out):
        s = _get("sender", sender)
        t = s.transfer(text(request_id, "request_id"), block_list(block_ids, num_blocks), num_tokens,
                       deadline=deadline_s if deadline_s > 0 else 60.0)  # fmt: skip
        _store(out, "transfer", t)

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_transfer_send_layer(transfer, layer, cuda_stream):
        t = _get("transfer", transfer)
        if cuda_stream == ffi.NULL:
            t.send_layer(layer)
            return
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(int(ffi.cast("uintptr_t", cuda_stream)))):
            t.send_layer(layer)

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_transfer_finish(transfer, timeout_s):
        _get("transfer", transfer).finish(timeout(timeout_s))

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_transfer_cancel(transfer):
        _get("transfer", transfer).cancel()

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_transfer_free(transfer):
        t = _pop("transfer", transfer)
        if not t.done():
            t.cancel("freed before it ended")

    # -- receiver ----------------------------------------------------------------------------
    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_receiver_create(c_layout, listen, secret, caches, num_caches, options, out):
        if c_layout == ffi.NULL:
            raise Invalid("layout: NULL")
        layout = layout_from(c_layout)
        opts = parse_options(
            text(options, "options", allow_null=True),
            {
                "staging_mib": int,
                "slot_kib": int,
                "window_mib": int,
                "codecs": str,
                "unclaimed_timeout": float,
                "transport": str,
            },  # fmt: skip
        )
        receiver = _kvwire.Receiver(
            layout,
            text(listen, "listen"),
            secret=text(secret, "secret"),
            kv_caches=caches_from(layout, caches, num_caches),
            staging_bytes=opts.get("staging_mib", 256) << 20,
            slot_bytes=opts.get("slot_kib", 4160) << 10,
            window_bytes=(opts.get("window_mib", 0) << 20) or None,
            codecs=opts["codecs"].split("|") if "codecs" in opts else None,
            unclaimed_timeout=opts.get("unclaimed_timeout", 60.0),
            transport=opts.get("transport", "tcp"),
        )
        _store(out, "receiver", receiver)

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_receiver_port(receiver, port):
        r = _get("receiver", receiver)
        if port == ffi.NULL:
            raise Invalid("port: NULL")
        port[0] = r.address[1]

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_receiver_stats_json(receiver, buf, buf_len):
        _write_json(_get("receiver", receiver).stats(), buf, buf_len)

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_receiver_close(receiver):
        _pop("receiver", receiver).close()

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_expect(receiver, request_id, block_ids, num_blocks, num_tokens, deadline_s, out):
        r = _get("receiver", receiver)
        h = r.expect(text(request_id, "request_id"), block_list(block_ids, num_blocks), num_tokens,
                     deadline=deadline_s if deadline_s > 0 else 60.0)  # fmt: skip
        _store(out, "request", h)

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_request_wait_layer(request, layer, timeout_s):
        _get("request", request).wait_layer(layer, timeout(timeout_s))

    @ffi.def_extern(error=INTERNAL + 1)
    @guarded
    def _kvwpy_request_wait(request, timeout_s):
        _get("request", request).wait(timeout(timeout_s))

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


def _write_json(obj, buf, buf_len) -> None:
    data = json.dumps(obj, default=str).encode() + b"\0"
    if buf == _ffi.NULL:
        raise Invalid("buf: NULL")
    if buf_len < len(data):
        raise Invalid(f"buf_len: {buf_len} bytes is too small, the statistics need {len(data)}")
    _ffi.memmove(buf, data, len(data))


try:  # only inside libkvwire.so
    from _kvwire_capi import ffi as _embedded_ffi  # type: ignore[import-not-found]
except ImportError:
    _embedded_ffi = None
if _embedded_ffi is not None:
    install(_embedded_ffi)
