"""What the sending and the receiving side share: argument checks and small descriptions.

Every public entry point checks its arguments here before anything is sent, so the two
sides refuse the same things with the same words.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping

from kvwire.layout import KVLayout, Selection

TRANSPORTS = ("tcp", "ucx")


def check_transport(transport: str, tls) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport: {transport!r} is not one of {TRANSPORTS}")
    if transport == "ucx":
        if tls is not None:
            raise ValueError("tls: not available with transport='ucx' (UCX has its own transports)")
        from kvwire.transport.ucx import import_ucxx

        import_ucxx()  # fail now, with the install command, rather than at connect


def check_checksum(checksum: str | None, tls) -> str:
    """A ``checksum=`` argument; None picks the default: none with TLS, whose AEAD already
    authenticates every byte, else CRC32C."""
    from kvwire.proto.frames import CHECKSUMS

    if checksum is None:
        return "none" if tls is not None else "crc32c"
    if checksum not in CHECKSUMS:
        raise ValueError(f"checksum: {checksum!r} is not one of {CHECKSUMS}")
    return checksum


# The longest duration a timeout or deadline may name (about 31 years): Python's waits take
# at most threading.TIMEOUT_MAX (about 9.2e9 s) and fail beyond it, deep inside a wait.
MAX_SECONDS = 1e9


def check_seconds(value, name: str, *, optional: bool = False, zero: bool = False) -> float | None:
    """A duration argument: a finite number of seconds, positive (or >= 0 with ``zero``),
    at most ``MAX_SECONDS``.

    NaN and infinity are refused: a NaN deadline compares false with every clock reading,
    so a wait on it would never end (and never time out)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected seconds as a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number of seconds, got {value}")
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name}: must be {'>= 0' if zero else 'positive'}, got {value}")
    if value > MAX_SECONDS:
        raise ValueError(f"{name}: at most {MAX_SECONDS:g} seconds, got {value:g}")
    return float(value)


def check_count(value, name: str, minimum: int = 1) -> int:
    """An integer setting (a limit, a number of connections), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def secret_bytes(secret: bytes | str | None) -> bytes:
    """The shared secret from the argument or ``KVWIRE_SECRET``; refuse to run without one."""
    if secret is None:
        secret = os.environ.get("KVWIRE_SECRET")
    if secret is None:
        raise ValueError("secret: a shared secret is required (pass secret= or set KVWIRE_SECRET)")
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes):
        raise TypeError(f"secret: expected bytes or str, got {type(secret).__name__}")
    if len(secret) < 8:
        raise ValueError("secret: must be at least 8 bytes")
    return secret


def check_terms(terms: Mapping | None) -> dict | None:
    """Validate ``Sender(terms=...)``: names to str/int/float/bool, at most 4 KiB as JSON."""
    if terms is None:
        return None
    if not isinstance(terms, Mapping):
        raise TypeError(f"terms: expected a dict, got {type(terms).__name__}")
    for key, value in terms.items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"terms: {key!r} -> {value!r}: expected str keys and str/int/float/bool values")
    if len(json.dumps(dict(terms))) > 4096:
        raise ValueError("terms: more than 4 KiB as JSON")
    return dict(terms)


def layout_summary(layout: KVLayout) -> str:
    """The model a layout describes, in one line for a person (sent at the handshake, shown
    in errors): layers, each kind of layer's tensors with heads x head_dim, the dtype. The
    block size and the tensor-parallel shard are not in it: peers may differ in those.

    >>> layout_summary(KVLayout.gqa(2, 8, 128).shard(0, 2))
    '2 layers [k/v 8x128], torch.bfloat16'
    """
    model = layout.model()
    kinds = set()
    for layer in model.layers:
        parts = []
        names = [p.name for p in layer.paged]
        if names == ["kv"]:
            parts.append(f"kv {layer.paged[0].head_dim}")
        elif names:
            p = layer.paged[0]
            parts.append(f"{'/'.join(names)} {p.heads}x{p.head_dim}")
        if layer.state is not None:
            parts.append("state " + "x".join(map(str, layer.state.shape)))
        kinds.add("+".join(parts))
    return f"{model.num_layers} layers [{', '.join(sorted(kinds))}], {model.dtype}"


def check_codec_fits(codec, layout: KVLayout) -> None:
    """ValueError (naming the codec's reason) unless ``codec`` can code every tensor of
    ``layout``: its paged tensors' head_dim (int4 groups that do not divide it, say) and
    each state's last dimension, as which a state travels. Both sides ask: a sender before
    it connects, a receiver before it accepts a sender's codecs."""
    from kvwire.codec import ChunkSpec
    from kvwire.layout import STATE_NAME

    for layer in layout.layers:
        specs = [ChunkSpec(layout.block_size, p.heads, p.head_dim, layout.dtype, p.name, layout.block_size)
                 for p in layer.paged]  # fmt: skip
        if layer.state is not None:
            specs.append(ChunkSpec(layer.state.rows, 1, layer.state.shape[-1], layout.dtype, STATE_NAME))
        for spec in specs:
            codec.check(spec)


def request_arguments(
    request_id, block_ids, num_tokens, deadline: float, block_size: int, num_blocks: int | None
) -> tuple[str, Selection]:
    """The checks ``Sender.transfer`` and ``Receiver.expect`` share: (request id, selection)."""
    request_id = check_request_id(request_id)
    sel = Selection(block_ids, num_tokens).check(block_size, num_blocks)  # Selection takes tensors too
    check_seconds(deadline, "deadline")
    return request_id, sel


def check_request_id(request_id: str | int) -> str:
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
        raise TypeError(f"request_id: expected str or int, got {type(request_id).__name__}")
    text = str(request_id)
    if not text or len(text.encode()) > 1024:
        raise ValueError("request_id: must be 1..1024 bytes")
    return text


class LogLimit:
    """Warnings about what a peer can repeat at will (a refused connection or request, a
    payload that fails its checksum), at most one line per ``period_s`` for each kind: a
    flood of bad input must not become a flood of log lines. The next line of a kind says
    how many it left out."""

    def __init__(self, logger: logging.Logger, period_s: float = 1.0, clock=time.monotonic) -> None:
        self._log = logger
        self._period = period_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # by kind: a few fixed names, so it stays small
        self._left_out: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args) -> bool:
        """Log ``message % args`` unless a line of ``kind`` went out less than a period ago
        (then only count it); whether it was logged."""
        now = self._clock()
        with self._lock:
            if now - self._last.get(kind, -math.inf) < self._period:
                self._left_out[kind] = self._left_out.get(kind, 0) + 1
                return False
            self._last[kind] = now
            left_out = self._left_out.pop(kind, 0)
        if left_out:
            message += " (%d more like it since the last such line, not logged)"
            args += (left_out,)
        self._log.warning(message, *args)
        return True
