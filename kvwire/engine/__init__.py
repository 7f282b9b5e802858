"""The pipeline: :class:`Sender` and :class:`Receiver`."""

from kvwire.engine.receiver import ReceiveHandle, Receiver
from kvwire.engine.sender import Sender, SendHandle

__all__ = ["ReceiveHandle", "Receiver", "SendHandle", "Sender"]
