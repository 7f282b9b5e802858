"""kvwire: move an LLM's KV cache from prefill to decode, layer by layer, across sites.

>>> import kvwire
>>> layout = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
>>> rx = kvwire.Receiver(layout, secret="example-secret", kv_caches=layout.allocate(8))
>>> tx = kvwire.Sender(layout, rx.address, secret="example-secret", kv_caches=layout.allocate(8), streams=2)
>>> h = rx.expect("r1", block_ids=[3, 4], num_tokens=20)
>>> t = tx.transfer("r1", block_ids=[0, 1], num_tokens=20)
>>> for i in range(layout.num_layers):
...     t.send_layer(i)
>>> t.finish(timeout=10)["num_tokens"], h.wait(timeout=10)["ok"]
(20, True)
>>> tx.close(); rx.close()
"""

from kvwire.engine import ReceiveHandle, Receiver, Sender, SendHandle
from kvwire.engine.sharded import ShardedSender, ShardedTransfer
from kvwire.errors import (
    AuthenticationFailed,
    Cancelled,
    ChecksumMismatch,
    KvwireError,
    LayoutMismatch,
    PeerLost,
    ProtocolError,
    TransferError,
    TransferTimeout,
    TransferWouldMissDeadline,
)
from kvwire.layout import KVLayout, LayerSpec, PagedTensorSpec, Selection, StateSpec, TensorParallel
from kvwire.link import LinkState
from kvwire.planning import Estimate
from kvwire.transport.tcp import SocketOptions
from kvwire.tuning import tune_process

__version__ = "0.1.0"

__all__ = [
    "AuthenticationFailed",
    "Cancelled",
    "ChecksumMismatch",
    "Estimate",
    "KVLayout",
    "KvwireError",
    "LayerSpec",
    "LayoutMismatch",
    "LinkState",
    "PagedTensorSpec",
    "PeerLost",
    "ProtocolError",
    "ReceiveHandle",
    "Receiver",
    "Selection",
    "SendHandle",
    "Sender",
    "ShardedSender",
    "ShardedTransfer",
    "SocketOptions",
    "StateSpec",
    "TensorParallel",
    "TransferError",
    "TransferTimeout",
    "TransferWouldMissDeadline",
    "__version__",
    "tune_process",
]
