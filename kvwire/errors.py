"""The exceptions kvwire raises.

Bad arguments from the caller are ``ValueError`` / ``TypeError`` (raised before
anything is sent). Everything that goes wrong with a transfer after it started is a
``TransferError`` subclass, so a serving stack can catch one type per request.
"""

from __future__ import annotations


class KvwireError(Exception):
    """Base class of every kvwire-specific error."""


class TransferError(KvwireError):
    """A transfer did not complete. Subclasses say why."""


class TransferTimeout(TransferError):
    """The transfer's deadline passed before it completed."""


class PeerLost(TransferError):
    """The peer went away (connection closed or reset, process gone)."""


class AuthenticationFailed(TransferError):
    """The peer did not prove it knows the shared secret, or we did not."""


class ProtocolError(TransferError):
    """The peer sent bytes that break the protocol: the connection is closed."""


class LayoutMismatch(ProtocolError):
    """The two peers describe the KV cache (or codec) differently."""


class ChecksumMismatch(TransferError):
    """A chunk's payload failed its checksum more often than the receiver asks again."""


class Cancelled(TransferError):
    """The transfer was cancelled, by this side or by the peer."""


class TransferWouldMissDeadline(TransferError):
    """Refused before anything was sent (``transfer(refuse_if_late=True)``): the link
    model predicts the transfer would miss its target or deadline with every codec it may
    use. ``estimate`` is the best prediction (a ``kvwire.planning.Estimate``), so a
    scheduler can prefill locally instead."""

    def __init__(self, message: str, estimate=None) -> None:
        super().__init__(message)
        self.estimate = estimate
