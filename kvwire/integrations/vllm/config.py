"""Settings of the vLLM connector (``kv_connector_extra_config``) and the pairing contract.

Nothing here imports vLLM, so a router or a deployment tool can validate settings and
build ``kv_transfer_params`` without it.

The pairing contract, fixed so that any router can drive it: the decode request carries
``{"do_remote_prefill": true, "kvwire_transfer_id": ID}``, the prefill request
``{"do_remote_decode": true, "kvwire_transfer_id": ID, "kvwire_peer": "HOST:PORT"}``,
where ``HOST:PORT`` is the decode instance's ``listen`` address.

A request's prompt travels as *segments*: segment ``k`` holds tokens
``[k * segment_tokens, min((k + 1) * segment_tokens, prompt_len))`` and is one kvwire
transfer named ``f"{ID}#{k}"``. Both sides derive the same segments from the prompt
length alone, so the decode can expect every one of them before the prefill has decided
how to split the prompt into chunks; the prefill sends a segment, layer by layer, in the
step that computes its last token.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

import kvwire.codec

# Both sides state these at kvwire's handshake; a decode refuses a prefill whose terms differ.
PROTOCOL = "kvwire-vllm/1"
DEFAULT_PORT = 7600
DEFAULT_SEGMENT_TOKENS = 1024  # divides vLLM's usual chunk sizes; a 128K prompt is 128 transfers

KEYS = {
    "listen": "decode side: HOST:PORT; tensor-parallel rank r's receiver listens on PORT + r (0: any free port)",
    "secret": "shared secret (else the KVWIRE_SECRET environment variable)",
    "connections": "TCP connections per prefill rank to each decode rank it sends to (4)",
    "decode_tp": "prefill side: the decode instance's tensor-parallel size, if it differs from this one's",
    "codec": "raw, fp8, int4, or any of them +lz4; both sides must agree (raw)",
    "exact_tokens": "with a lossy codec, a transfer's first tokens travel raw (0)",
    "deadline_s": "seconds a segment may take, on either side, before it fails (60)",
    "segment_tokens": "tokens per transfer, a multiple of the block size; both sides must agree (1024)",
    "connect_timeout_s": "seconds the prefill waits to connect to a decode rank (10)",
    "staging_mib": "host staging per sender or receiver, MiB (sender 64, receiver 256)",
    "tls_cert": "PEM certificate: the decode's server certificate, or the prefill's client certificate",
    "tls_key": "PEM private key of tls_cert",
    "tls_ca": "PEM CA bundle: the prefill checks the decode with it; on the decode it requires client certs",
    "tls_check_hostname": "prefill side: check the decode's certificate against its host name (true)",
}


@dataclass(frozen=True)
class Settings:
    """``kv_connector_extra_config``, validated (see :data:`KEYS` and docs/vllm.md)."""

    listen: tuple[str, int] | None = None
    secret: bytes = b""
    connections: int = 4
    codec: str = "raw"
    exact_tokens: int = 0
    deadline_s: float = 60.0
    segment_tokens: int = DEFAULT_SEGMENT_TOKENS
    decode_tp: int | None = None  # None: the same as this instance's
    connect_timeout_s: float = 10.0
    staging_mib: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_check_hostname: bool = True
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_extra_config(cls, extra: Mapping | None, *, needs_listen: bool) -> Settings:
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(KEYS))
        if unknown:
            raise ValueError(f"kv_connector_extra_config: unknown keys {unknown}; known: {sorted(KEYS)}")
        listen = None
        if "listen" in extra:
            listen = parse_host_port(extra["listen"], "kv_connector_extra_config['listen']")
        elif needs_listen:
            listen = ("0.0.0.0", DEFAULT_PORT)
        secret = extra.get("secret", os.environ.get("KVWIRE_SECRET"))
        if secret is None:
            raise ValueError("kv_connector_extra_config['secret']: a shared secret is required (or set KVWIRE_SECRET)")
        secret_b = secret.encode() if isinstance(secret, str) else secret
        if not isinstance(secret_b, bytes) or len(secret_b) < 8:
            raise ValueError("kv_connector_extra_config['secret']: must be a string of at least 8 bytes")
        codec = extra.get("codec", "raw")
        kvwire.codec.get(codec)  # raises ValueError naming the codec
        s = cls(
            listen=listen,
            secret=secret_b,
            connections=_int(extra, "connections", 4, 1, 64),
            codec=codec,
            exact_tokens=_int(extra, "exact_tokens", 0, 0, 1 << 30),
            deadline_s=_positive(extra, "deadline_s", 60.0),
            segment_tokens=_int(extra, "segment_tokens", DEFAULT_SEGMENT_TOKENS, 1, 1 << 30),
            decode_tp=_int(extra, "decode_tp", None, 1, 1 << 16),
            connect_timeout_s=_positive(extra, "connect_timeout_s", 10.0),
            staging_mib=_int(extra, "staging_mib", None, 1, 1 << 20),
            tls_cert=_path(extra, "tls_cert"),
            tls_key=_path(extra, "tls_key"),
            tls_ca=_path(extra, "tls_ca"),
            tls_check_hostname=bool(extra.get("tls_check_hostname", True)),
            extra=extra,
        )
        if (s.tls_cert is None) != (s.tls_key is None):
            raise ValueError("kv_connector_extra_config: tls_cert and tls_key go together")
        return s

    def check_block_size(self, block_size: int) -> None:
        if self.segment_tokens % block_size:
            raise ValueError(
                f"kv_connector_extra_config['segment_tokens']: {self.segment_tokens} is not a multiple of "
                f"the KV cache block size {block_size}"
            )

    def server_tls(self) -> ssl.SSLContext | None:
        """The decode's TLS context, or None without a certificate."""
        if self.tls_cert is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_ca is not None:
            ctx.load_verify_locations(self.tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_tls(self) -> ssl.SSLContext | None:
        """The prefill's TLS context, or None when neither a CA nor a certificate is set."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca)
        ctx.check_hostname = self.tls_check_hostname
        if self.tls_cert is not None:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx


def parse_host_port(value: object, argument: str) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"{argument}: expected 'HOST:PORT', got {value!r}")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{argument}: expected 'HOST:PORT' with a port in 0..65535, got {value!r}")
    return host, int(port)


def _int(extra: Mapping, key: str, default, low: int, high: int):
    value = extra.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"kv_connector_extra_config[{key!r}]: expected an int in {low}..{high}, got {value!r}")
    return value


def _positive(extra: Mapping, key: str, default: float) -> float:
    value = extra.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"kv_connector_extra_config[{key!r}]: expected a positive number, got {value!r}")
    return float(value)


def _path(extra: Mapping, key: str) -> str | None:
    value = extra.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not os.path.isfile(value):
        raise ValueError(f"kv_connector_extra_config[{key!r}]: {value!r} is not a readable file")
    return value


# -- segments ------------------------------------------------------------------------------
def segments(num_tokens: int, segment_tokens: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` token ranges of a prompt's segments."""
    return [(s, min(s + segment_tokens, num_tokens)) for s in range(0, num_tokens, segment_tokens)]


def segment_id(transfer_id: str, index: int) -> str:
    return f"{transfer_id}#{index}"


def segment_blocks(block_ids, start: int, stop: int, block_size: int) -> list[int]:
    """The block ids holding tokens ``[start, stop)`` of a request whose blocks are ``block_ids``."""
    return list(block_ids[start // block_size : -(-stop // block_size)])


# -- the pairing contract ---------------------------------------------------------------------
def prefill_params(transfer_id: str, peer: str) -> dict:
    """``kv_transfer_params`` of the prefill request."""
    return {"do_remote_decode": True, "kvwire_transfer_id": transfer_id, "kvwire_peer": peer}


def decode_params(transfer_id: str) -> dict:
    """``kv_transfer_params`` of the decode request."""
    return {"do_remote_prefill": True, "kvwire_transfer_id": transfer_id}


def transfer_id_of(params: Mapping | None) -> str | None:
    value = (params or {}).get("kvwire_transfer_id")
    if not isinstance(value, str) or not value or len(value.encode()) > 900 or "#" in value:
        return None
    return value
