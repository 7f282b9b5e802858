"""The sender's side of the link model: sampling, planning, and connections that follow it.

A :class:`LinkFollower` belongs to one :class:`~kvwire.engine.sender.Sender`. Its thread
samples every live connection's TCP_INFO (every 20 ms while transfers are open, every
500 ms otherwise) into a :class:`~kvwire.link.LinkModel`, and steps a
:class:`~kvwire.planning.StreamPolicy` that asks the sender for more (or fewer)
connections. Each pass also sends the control frames a full socket kept in a connection's
outbox (:meth:`~kvwire.engine.sender.Sender.flush_controls`). The sender asks it for
estimates and codec choices. The model and the
math live in ``kvwire/link.py`` and ``kvwire/planning.py``; this file only wires them to
the sender's connections and clock.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

import kvwire.codec
from kvwire import planning
from kvwire.codec import ChunkSpec, Codec
from kvwire.link import LinkModel, LinkState
from kvwire.threads import Thread

if TYPE_CHECKING:
    from kvwire.engine.sender import Sender

log = logging.getLogger("kvwire.sender")

AUTO = "auto"
# Least lossy first: raw whenever the link allows. int8h, not fp8: at the same size 50x lower
# KL; int4a, not int4 or int4h: 3.5x smaller than bf16 (int4h 3.05x) with the lowest 4-bit KL
# measured (docs/fidelity.md). A head_dim int4a cannot take (not a multiple of 8) gets int4h.
DEFAULT_AUTO_CODECS = ("raw", "int8h", "int4a")
STAND_INS = {"int4a": "int4h"}
BUSY_PERIOD_S = 0.02  # sampling while transfers are open: 50 a second, ~10 us of TCP_INFO per connection each
ALL_AT_ONCE = 0.1  # a transfer whose layers all came within this share of its time had the link from its start
IDLE_PERIOD_S = 0.5
COST_CACHE = 256  # (codec, num_tokens) -> layer costs remembered
PRIOR_TOKENS = 128  # tokens of one tensor a codec is timed on once, when auto may choose it
# Writers gather queued chunks into one send only on a path this short (loopback, one
# datacenter; chunks are larger there too: sender.py, SHORT_PATH_CHUNK_BYTES), where the
# CPU per send is what limits; across a longer path the link does, and chunks taken one
# at a time keep a slow connection from holding a layer's tail. And only without payload
# checksums: each CRC32C is computed just before its chunk is sent, while the bytes are in
# cache; gathering 2 or 8 chunks first lowered throughput by 2-6% on loopback
# (bench/thread_cpu.py; docs/development.md).
SHORT_PATH_RTT_S = 0.002


def auto_codecs(
    names: Sequence[str] | None, dtype: torch.dtype, group_size: int, head_dims: Sequence[int] = ()
) -> list[Codec]:
    """The codecs ``codec="auto"`` may choose, least lossy first (``codecs=``; default
    raw, int8h, int4a, those the cache's dtype and ``head_dims`` allow, int4h in place of
    int4a where it does not fit). Raises ValueError naming ``codecs``."""
    if names is None:
        found = []
        for name in DEFAULT_AUTO_CODECS:
            for candidate in (name, STAND_INS.get(name)):
                if candidate is None:
                    continue
                codec = kvwire.codec.get(candidate, group_size=group_size)
                try:
                    codec.check_dtype(dtype)
                    for d in head_dims:
                        codec.check(ChunkSpec(1, 1, d, dtype, "v"))
                except ValueError:
                    continue
                found.append(codec)
                break
        return found
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"codecs: expected a list of codec names, got {type(names).__name__}")
    codecs: list[Codec] = []
    for name in names:
        if name == AUTO:
            raise ValueError("codecs: 'auto' is not a codec; list the codecs auto may choose")
        codec = kvwire.codec.get(name, group_size=group_size)
        codec.check_dtype(dtype, "codecs")
        if codec.descriptor in (c.descriptor for c in codecs):
            raise ValueError(f"codecs: {name!r} is listed twice")
        codecs.append(codec)
    if not 1 <= len(codecs) <= 8:
        raise ValueError(f"codecs: 1 to 8 codecs, got {len(codecs)}")
    return codecs


class LinkFollower:
    """Samples the sender's connections into the link model and plans with it."""

    def __init__(self, sender: Sender, *, start: int, bound: int, codecs: Sequence[Codec], on_gpu: bool) -> None:
        self._sender = sender
        self._lock = threading.Lock()  # the model and the policy; never held while calling the sender
        self.model = LinkModel()
        self.policy = planning.StreamPolicy(start, bound)
        self._costs: collections.OrderedDict[tuple[str, int], list[planning.LayerCost]] = collections.OrderedDict()
        # CPU seconds per logical byte of each codec (the slower of encode and decode): on a
        # GPU the kernels make it negligible against any link; on the CPU an auto sender's
        # codecs are timed at start, a single codec when an estimate first needs it.
        self._on_gpu = on_gpu
        self._cpu: dict[str, float] = {}
        if not on_gpu and len(codecs) > 1:
            for codec in codecs:
                self._cpu[codec.descriptor] = _time_codec(sender.layout, codec)
        self._stop = False
        self._kick = threading.Event()  # a transfer started: sample at the busy pace from now
        self._growing = False
        self._lost_seen = 0  # connections lost to errors, as last seen
        self._thread = Thread(self._run, "kvwire-link")

    def start(self) -> None:
        self.sample()  # the handshakes' RTT, and the counters' starting points
        self._allow_gathering(self.state())
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._kick.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # -- sampling ----------------------------------------------------------------------------
    def kick(self) -> None:
        """A transfer started: leave the idle pace now."""
        self._kick.set()

    def _run(self) -> None:
        while not self._stop:
            if self._kick.wait(BUSY_PERIOD_S if self._sender._has_open_transfers() else IDLE_PERIOD_S):
                self._kick.clear()
            if self._stop:
                return
            # Each job on its own: one that fails (a bug) must not stop the others, deadlines
            # above all, nor the sampling for good.
            for job in (self._sender.flush_controls, self._sender.expire_transfers, self.sample, self._follow):
                try:
                    job()
                except Exception:
                    log.exception("the link follower's %s failed", job.__name__)

    def sample(self) -> None:
        conns, queued = self._sender._link_view()
        infos: dict[Hashable, Mapping] = {}
        for key, stream in conns:
            info = stream.tcp_info() if hasattr(stream, "tcp_info") else {}
            if not info.get("bytes_acked"):  # no TCP_INFO (UCX): what was written stands in
                written = getattr(stream, "bytes_sent", 0)
                info = {"bytes_acked": written, "bytes_sent": written}
            infos[key] = info
        # Busy: chunks wait for a writer (every connection's socket is full or out of
        # credit), or every connection still has unsent bytes in its socket.
        backlog = queued or bool(infos) and all(i.get("notsent_bytes", 0) > 0 for i in infos.values())
        with self._lock:
            self.model.observe(time.monotonic(), infos, backlog)

    def state(self) -> LinkState:
        with self._lock:
            return self.model.state(time.monotonic())

    # -- connections that follow the link -------------------------------------------------------
    def _allow_gathering(self, state: LinkState) -> None:
        rtt = state.min_rtt.value
        self._sender.gather = self._sender.checksum == "none" and rtt is not None and rtt < SHORT_PATH_RTT_S

    def _follow(self) -> None:
        state = self.state()
        self._allow_gathering(state)
        have, lost, alive = self._sender._connection_count()
        with self._lock:
            if lost > self._lost_seen:  # a lost connection is not replaced: failures stay visible
                self._lost_seen = lost
                self.policy.count = max(1, min(self.policy.count, have))
                self.policy._hold(state.busy_s, f"a connection was lost: {have} left")
            if not alive:  # the session is over (its transfers failed with PeerLost): no new one begins
                return
            want = self.policy.step(state, state.busy_s)
        if want > have and not self._growing:
            self._growing = True
            Thread(self._grow, "kvwire-grow", (want - have,)).start()
        elif want < have:
            self._sender._retire_connections(have - want)
        self._sender._close_retired()

    def _grow(self, n: int) -> None:
        try:
            for _ in range(n):
                if not self._sender._add_connection():
                    break
        except Exception as exc:  # a peer that refuses more connections: keep those we have
            log.warning("could not open another connection: %s", exc)
            have = self._sender._connection_count()[0]
            with self._lock:
                self.policy.count = have
                self.policy._hold(self.model.state(time.monotonic()).busy_s, f"opening a connection failed: {exc}")
        finally:
            self._growing = False

    def stats(self) -> dict:
        with self._lock:
            return self.policy.as_dict()

    def completed(self, handle) -> None:
        """A transfer was acknowledged: if it had the link to itself (no other transfer
        open from its start to its end) and all its layers at once, it is a sample of the
        whole path, start-up included."""
        first, last, acked = handle.t_first_layer, handle.t_last_layer, handle.t_acked
        if first is None or last is None or acked is None or not handle.alone or acked <= first:
            return
        if self._sender._transfers_created_since(handle.tag) or last - first > ALL_AT_ONCE * (acked - first):
            return
        if not self._on_gpu and _costs_cpu(handle.codec):
            return  # bounded by the codec's CPU, perhaps: a sample of this machine, not of the link
        with self._lock:
            self.model.completed(acked, handle.wire_bytes, acked - first)

    # -- planning ------------------------------------------------------------------------------
    def cpu_s_per_byte(self, codec: Codec) -> float:
        """``codec``'s CPU seconds per logical byte here, timed once when first asked for."""
        if self._on_gpu:
            return 0.0
        with self._lock:
            cpu = self._cpu.get(codec.descriptor)
        if cpu is None:
            cpu = _time_codec(self._sender.layout, codec)
            with self._lock:
                self._cpu[codec.descriptor] = cpu
        return cpu

    def layer_costs(self, codec: Codec, num_tokens: int) -> list[planning.LayerCost]:
        key = (codec.descriptor, num_tokens)
        with self._lock:
            found = self._costs.get(key)
            if found is not None:
                self._costs.move_to_end(key)
                return found
        s = self._sender
        costs = planning.layer_costs(s.layout, codec, num_tokens, exact_tokens=s._exact_tokens,
                                     chunk_bytes=s._chunk_bytes, max_payload=s.max_payload, kv_heads=s.part.heads,
                                     whole=s.part.whole, head_slice=s._kv_heads)  # fmt: skip
        with self._lock:
            self._costs[key] = costs
            while len(self._costs) > COST_CACHE:
                self._costs.popitem(last=False)
        return costs

    def estimates(
        self, num_tokens: int, codecs: Sequence[Codec], layers_per_s: float | None
    ) -> list[planning.Estimate]:
        state = self.state()
        queued = self._sender._queued_wire_bytes(self)
        return [
            planning.estimate(
                self.layer_costs(c, num_tokens),
                c.descriptor,
                num_tokens,
                state,
                layers_per_s=layers_per_s,
                cpu_s_per_byte=self.cpu_s_per_byte(c),
                queued_bytes=queued,
            )  # fmt: skip
            for c in codecs
        ]


def _costs_cpu(codec: Codec) -> bool:
    """Whether ``codec`` spends CPU per byte (on the CPU): every codec but plain raw."""
    return codec.name != "raw" or codec.has_lossless_stage


def _time_codec(layout, codec: Codec) -> float:
    """CPU seconds per logical byte of ``codec`` on this machine: the slower of encode and
    decode of ``PRIOR_TOKENS`` tokens of the layout's first paged tensor, after one
    block to warm up. 0 for raw, which moves bytes as they are."""
    if not _costs_cpu(codec):
        return 0.0
    paged = next((p for layer in layout.layers for p in layer.paged), None)
    if paged is None:
        return 0.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PRIOR_TOKENS, paged.heads, paged.head_dim, generator=g).to(layout.dtype)
    warm = x[: layout.block_size]
    codec.decode(codec.encode(warm, paged.name, layout.block_size))  # first calls allocate and dispatch
    t0 = time.perf_counter()
    encoded = codec.encode(x, paged.name, layout.block_size)
    t1 = time.perf_counter()
    codec.decode(encoded)
    t2 = time.perf_counter()
    return max(t1 - t0, t2 - t1) / (x.numel() * x.element_size())
