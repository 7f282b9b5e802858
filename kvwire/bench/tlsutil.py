"""Throwaway TLS material for the benchmarks: a private CA and a certificate for 127.0.0.1
(and the emulated link's addresses), written as PEM files that any process can load.

Needs the ``trustme`` package (``pip install 'kvwire[bench]'``).
"""

from __future__ import annotations

import os
import ssl

# SSL_OP_ENABLE_KTLS (OpenSSL 3): Python names it ``ssl.OP_ENABLE_KTLS`` from 3.12 on.
OP_ENABLE_KTLS = getattr(ssl, "OP_ENABLE_KTLS", 1 << 3)


def kernel_tls_available() -> bool:
    """Whether this kernel offers the ``tls`` upper-layer protocol that kernel TLS needs."""
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            return "tls" in f.read().split()
    except OSError:
        return False


def write_material(directory: str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict[str, str]:
    """A CA and a server certificate for ``hosts`` in ``directory``; returns the file paths."""
    try:
        import trustme
    except ImportError:
        raise ValueError("--tls: needs the trustme package (pip install trustme)") from None
    ca = trustme.CA()
    cert = ca.issue_cert(*hosts)
    paths = {"ca": os.path.join(directory, "ca.pem"), "chain": os.path.join(directory, "server.pem")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.private_key_and_cert_chain_pem.write_to_path(paths["chain"])
    return paths


def server_context(paths: dict[str, str], ktls: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(paths["chain"])
    if ktls:
        ctx.options |= OP_ENABLE_KTLS
    return ctx


def client_context(paths: dict[str, str], ktls: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=paths["ca"])
    if ktls:
        ctx.options |= OP_ENABLE_KTLS
    return ctx
