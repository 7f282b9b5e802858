"""What a KV cache is: layers, named paged tensors, request-level states, selections.

A :class:`KVLayout` describes the *shape* of a model's KV cache, the same on both
peers; it holds no memory. Each layer has one or more paged tensors, each stored by
the serving stack as ``[num_blocks, block_size, *token_shape]``:

* ``k`` and ``v`` with ``token_shape == (num_kv_heads, head_dim)`` (MHA / GQA);
* a single ``kv`` latent with ``token_shape == (latent_dim,)`` (MLA);

and optionally one request-level ``state`` tensor of fixed shape (the recurrent state
of a linear-attention layer, or a sliding-window cache), which is not paged.

A :class:`Selection` says which part of a request a transfer covers: the block ids in
token order and the number of tokens, so the last block may be partial and a transfer
may carry only the uncached tail of a prompt (its first block starts the tail).

Example::

    >>> import torch
    >>> layout = KVLayout.gqa(num_layers=2, num_kv_heads=8, head_dim=128, block_size=16)
    >>> layout.bytes_per_token()
    8192
    >>> caches = layout.allocate(num_blocks=4)
    >>> sel = Selection(block_ids=(3, 1), num_tokens=20)
    >>> sel.check(layout.block_size, num_blocks=4).num_tokens
    20

Moving bytes between blocks and rows is :mod:`kvwire.blocks`; this module only describes.

Paged tensors may have any strides as long as their *logical* shape is
``[num_blocks, block_size, *token_shape]``: an HND cache stored as
``[num_blocks, heads, block_size, head_dim]`` is passed as ``cache.transpose(1, 2)``.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

# The dtypes a KV cache may have, with the names used on the wire and in fingerprints.
# 8-bit caches (a serving stack's fp8 KV cache, stored as float8 or as uint8 bytes) travel
# only with the raw codec: quantizing them again would lose what the cache already lost.
QUANTIZABLE_DTYPES: dict[torch.dtype, str] = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
}
EIGHT_BIT_DTYPES: dict[torch.dtype, str] = {
    torch.float8_e4m3fn: "fp8e4m3",
    torch.float8_e5m2: "fp8e5m2",
    torch.uint8: "u8",
}
DTYPE_NAMES: dict[torch.dtype, str] = QUANTIZABLE_DTYPES | EIGHT_BIT_DTYPES
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}

PAGED_NAMES = ("k", "v", "kv")
STATE_NAME = "state"


def dtype_from(value: torch.dtype | str, argument: str = "dtype") -> torch.dtype:
    """Accept a torch dtype or its name (``bf16``, ``fp16``, ``fp32``, and for 8-bit caches
    ``fp8e4m3``, ``fp8e5m2``, ``u8``); reject the rest."""
    if isinstance(value, str):
        if value not in DTYPES_BY_NAME:
            raise ValueError(f"{argument}: unknown dtype {value!r}; expected one of {sorted(DTYPES_BY_NAME)}")
        return DTYPES_BY_NAME[value]
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{argument}: expected a torch.dtype or a name, got {type(value).__name__}")
    if value not in DTYPE_NAMES:
        raise ValueError(
            f"{argument}: unsupported dtype {value}; expected bfloat16, float16, float32, "
            "float8_e4m3fn, float8_e5m2 or uint8"
        )
    return value


def _positive_int(value: object, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument}: expected an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{argument}: must be positive, got {value}")
    return value


@dataclass(frozen=True)
class PagedTensorSpec:
    """One paged tensor of a layer: ``name`` in ``k``, ``v``, ``kv``; ``token_shape`` per token."""

    name: str
    token_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.name not in PAGED_NAMES:
            raise ValueError(f"paged tensor name: {self.name!r} is not one of {PAGED_NAMES}")
        shape = tuple(self.token_shape)
        if len(shape) not in (1, 2):
            raise ValueError(f"token_shape of {self.name!r}: expected (heads, head_dim) or (latent_dim,), got {shape}")
        for i, n in enumerate(shape):
            _positive_int(n, f"token_shape[{i}] of {self.name!r}")
        object.__setattr__(self, "token_shape", shape)

    @property
    def heads(self) -> int:
        """Heads in the codec's ``[tokens, heads, head_dim]`` view (1 for a latent)."""
        return self.token_shape[0] if len(self.token_shape) == 2 else 1

    @property
    def head_dim(self) -> int:
        return self.token_shape[-1]

    @property
    def elements_per_token(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class StateSpec:
    """A request-level tensor of fixed ``shape`` (not paged), e.g. a linear-attention state."""

    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if not shape:
            raise ValueError("state shape: must have at least one dimension")
        for i, n in enumerate(shape):
            _positive_int(n, f"state shape[{i}]")
        object.__setattr__(self, "shape", shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def rows(self) -> int:
        """Rows in the codec's view: every dimension but the last, flattened."""
        return self.numel // self.shape[-1]


@dataclass(frozen=True)
class LayerSpec:
    """One layer: its paged tensors (possibly none) and an optional request-level state."""

    paged: tuple[PagedTensorSpec, ...] = ()
    state: StateSpec | None = None

    def __post_init__(self) -> None:
        paged = tuple(self.paged)
        names = [p.name for p in paged]
        if len(set(names)) != len(names):
            raise ValueError(f"layer: paged tensor names repeat: {names}")
        if "kv" in names and len(names) > 1:
            raise ValueError(f"layer: a 'kv' latent layer has no other paged tensors, got {names}")
        if not paged and self.state is None:
            raise ValueError("layer: needs at least one paged tensor or a state")
        object.__setattr__(self, "paged", paged)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        names = tuple(p.name for p in self.paged)
        return names + ((STATE_NAME,) if self.state is not None else ())

    def spec(self, name: str) -> PagedTensorSpec:
        for p in self.paged:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass(frozen=True)
class TensorParallel:
    """Which part of a model's KV heads a layout holds: tensor-parallel ``rank`` of
    ``size``, of a model with ``kv_heads`` KV heads per layer."""

    rank: int
    size: int
    kv_heads: int

    def __post_init__(self) -> None:
        for name in ("size", "kv_heads"):
            _positive_int(getattr(self, name), f"tp {name}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.size:
            raise ValueError(f"tp_rank: expected an int in 0..{self.size - 1}, got {self.rank!r}")
        if self.size <= self.kv_heads and self.kv_heads % self.size:
            raise ValueError(f"tp_size: {self.kv_heads} KV heads do not split evenly over {self.size} ranks")
        if self.size > self.kv_heads and self.size % self.kv_heads:
            raise ValueError(f"tp_size: {self.size} ranks cannot replicate {self.kv_heads} KV heads evenly")

    @property
    def heads(self) -> tuple[int, int]:
        """``(first, count)`` of the model's KV heads this rank holds: contiguous, equal
        ranges, as vLLM and SGLang split them; beyond one rank per head, heads are
        replicated and each rank holds one."""
        return heads_of(self.rank, self.size, self.kv_heads)


def heads_of(rank: int, size: int, kv_heads: int) -> tuple[int, int]:
    """``(first, count)`` of the KV heads tensor-parallel ``rank`` of ``size`` holds."""
    if size <= kv_heads:
        per = kv_heads // size
        return rank * per, per
    return rank // (size // kv_heads), 1


@dataclass(frozen=True)
class KVLayout:
    """The shape of a model's KV cache, or of one tensor-parallel rank's part of it.

    Holds no memory and no pool size: each side owns as many blocks as it likes. Two
    peers must describe the same *model* (:meth:`model_fingerprint`); their block sizes
    and tensor-parallel shards may differ (see :meth:`shard`).
    """

    layers: tuple[LayerSpec, ...]
    block_size: int
    dtype: torch.dtype = torch.bfloat16
    tp: TensorParallel | None = None  # None: the whole model (one rank)
    _fingerprint: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers:
            raise ValueError("layers: a layout needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, LayerSpec):
                raise TypeError(f"layers[{i}]: expected LayerSpec, got {type(layer).__name__}")
        _positive_int(self.block_size, "block_size")
        if self.tp is not None:
            first, count = self.tp.heads
            for i, layer in enumerate(layers):
                for p in layer.paged:
                    if p.name != "kv" and p.heads != count:
                        raise ValueError(
                            f"layers[{i}] {p.name!r}: holds {p.heads} heads, tensor-parallel rank {self.tp.rank} "
                            f"of {self.tp.size} holds {count} of {self.tp.kv_heads}"
                        )
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "dtype", dtype_from(self.dtype))
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "_fingerprint", hashlib.sha256(canonical.encode()).hexdigest()[:32])

    # -- constructors for the common shapes -------------------------------------------
    @classmethod
    def gqa(
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = 16,
        dtype: torch.dtype | str = torch.bfloat16,
    ) -> KVLayout:
        """Every layer has ``k`` and ``v`` of ``[num_kv_heads, head_dim]`` per token (MHA too)."""
        _positive_int(num_layers, "num_layers")
        token_shape = (num_kv_heads, head_dim)
        layer = LayerSpec(paged=(PagedTensorSpec("k", token_shape), PagedTensorSpec("v", token_shape)))
        return cls(layers=(layer,) * num_layers, block_size=block_size, dtype=dtype_from(dtype))

    @classmethod
    def mla(
        cls,
        num_layers: int,
        latent_dim: int = 576,
        block_size: int = 64,
        dtype: torch.dtype | str = torch.bfloat16,
    ) -> KVLayout:
        """Every layer has one ``kv`` latent of ``latent_dim`` values per token (DeepSeek MLA)."""
        _positive_int(num_layers, "num_layers")
        layer = LayerSpec(paged=(PagedTensorSpec("kv", (latent_dim,)),))
        return cls(layers=(layer,) * num_layers, block_size=block_size, dtype=dtype_from(dtype))

    @classmethod
    def hybrid(
        cls,
        pattern: str,
        num_kv_heads: int,
        head_dim: int,
        state_shape: Sequence[int],
        block_size: int = 16,
        dtype: torch.dtype | str = torch.bfloat16,
    ) -> KVLayout:
        """Layers from a pattern string: ``F`` a full-attention layer (paged ``k``/``v``),
        ``L`` a linear-attention layer (one ``state`` of ``state_shape`` per request).

        >>> KVLayout.hybrid("LLLF", 2, 64, state_shape=(2, 64, 64)).num_layers
        4
        """
        if not pattern or set(pattern) - {"F", "L"}:
            raise ValueError(f"pattern: expected a string of 'F' and 'L', got {pattern!r}")
        token_shape = (num_kv_heads, head_dim)
        full = LayerSpec(paged=(PagedTensorSpec("k", token_shape), PagedTensorSpec("v", token_shape)))
        linear = LayerSpec(state=StateSpec(tuple(state_shape)))
        layers = tuple(full if c == "F" else linear for c in pattern)
        return cls(layers=layers, block_size=block_size, dtype=dtype_from(dtype))

    # -- tensor parallelism ----------------------------------------------------------
    def shard(self, tp_rank: int, tp_size: int) -> KVLayout:
        """The part of this model's KV one tensor-parallel rank holds: ``k``/``v`` keep the
        rank's heads (contiguous equal ranges; replicated, one per rank, when ``tp_size``
        exceeds the KV head count); an MLA ``kv`` latent and request-level states are
        whole on every rank. The layout of the whole model has ``tp_size`` 1.

        >>> KVLayout.gqa(2, 8, 64).shard(1, 4).layers[0].paged[0].token_shape
        (2, 64)
        """
        if self.tp is not None:
            raise ValueError("shard: this layout is already a shard; shard the whole model's layout")
        heads = {p.heads for layer in self.layers for p in layer.paged if p.name != "kv"}
        if len(heads) > 1:
            raise ValueError(f"shard: layers with different KV head counts {sorted(heads)} are not supported")
        kv_heads = heads.pop() if heads else 1
        tp = TensorParallel(tp_rank, tp_size, kv_heads)
        count = tp.heads[1]
        layers = tuple(
            LayerSpec(
                paged=tuple(p if p.name == "kv" else PagedTensorSpec(p.name, (count, p.head_dim)) for p in layer.paged),
                state=layer.state,
            )
            for layer in self.layers
        )
        return KVLayout(layers=layers, block_size=self.block_size, dtype=self.dtype, tp=tp)

    def model(self) -> KVLayout:
        """The whole model this layout is a shard of (itself when it is not a shard)."""
        if self.tp is None:
            return self
        layers = tuple(
            LayerSpec(
                paged=tuple(
                    p if p.name == "kv" else PagedTensorSpec(p.name, (self.tp.kv_heads, p.head_dim))
                    for p in layer.paged
                ),  # fmt: skip
                state=layer.state,
            )
            for layer in self.layers
        )
        return KVLayout(layers=layers, block_size=self.block_size, dtype=self.dtype)

    def with_block_size(self, block_size: int) -> KVLayout:
        """The same layout with another block size (each side pages its cache its own way)."""
        return KVLayout(layers=self.layers, block_size=block_size, dtype=self.dtype, tp=self.tp)

    def model_fingerprint(self) -> str:
        """A digest of what two peers must agree on: the whole model's layers, heads, head
        dims, state shapes and dtype; not the block size, not the shard."""
        d = self.model().to_dict()
        del d["block_size"]
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]

    # -- properties ------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def fingerprint(self) -> str:
        """A stable hex digest of everything both peers must agree on (not the pool size)."""
        return self._fingerprint

    def bytes_per_token(self) -> int:
        """Bytes of paged KV per token, all layers together, in the cache dtype."""
        elements = sum(p.elements_per_token for layer in self.layers for p in layer.paged)
        return elements * self.itemsize

    def state_bytes(self) -> int:
        """Bytes of request-level state per request, all layers together."""
        return sum(layer.state.numel for layer in self.layers if layer.state) * self.itemsize

    def request_bytes(self, num_tokens: int) -> int:
        """Logical (uncompressed) KV bytes of a request of ``num_tokens`` tokens."""
        return num_tokens * self.bytes_per_token() + self.state_bytes()

    def to_dict(self) -> dict:
        d = {
            "block_size": self.block_size,
            "dtype": DTYPE_NAMES[self.dtype],
            "layers": [
                {
                    "paged": [[p.name, list(p.token_shape)] for p in layer.paged],
                    "state": list(layer.state.shape) if layer.state else None,
                }
                for layer in self.layers
            ],
        }
        if self.tp is not None:
            d["tp"] = [self.tp.rank, self.tp.size, self.tp.kv_heads]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> KVLayout:
        layers = tuple(
            LayerSpec(
                paged=tuple(PagedTensorSpec(name, tuple(shape)) for name, shape in layer["paged"]),
                state=StateSpec(tuple(layer["state"])) if layer["state"] is not None else None,
            )
            for layer in d["layers"]
        )
        tp = TensorParallel(*d["tp"]) if d.get("tp") else None
        return cls(layers=layers, block_size=d["block_size"], dtype=dtype_from(d["dtype"]), tp=tp)

    # -- memory ----------------------------------------------------------------------
    def allocate(
        self, num_blocks: int, device: str | torch.device = "cpu", fill: str = "zeros"
    ) -> list[dict[str, torch.Tensor]]:
        """Allocate paged caches: one dict per layer, name -> ``[num_blocks, block_size, *token_shape]``.

        States are not allocated here: they belong to a request (see ``allocate_states``).
        """
        _positive_int(num_blocks, "num_blocks")
        make = torch.zeros if fill == "zeros" else torch.empty
        return [
            {
                p.name: make((num_blocks, self.block_size, *p.token_shape), dtype=self.dtype, device=device)
                for p in layer.paged
            }
            for layer in self.layers
        ]

    def allocate_states(self, device: str | torch.device = "cpu") -> dict[int, torch.Tensor]:
        """One zeroed state tensor per layer that has a state, keyed by layer index."""
        return {
            i: torch.zeros(layer.state.shape, dtype=self.dtype, device=device)
            for i, layer in enumerate(self.layers)
            if layer.state is not None
        }

    def check_caches(self, kv_caches: Sequence[Mapping[str, torch.Tensor]], argument: str = "kv_caches") -> int:
        """Validate a serving stack's paged caches against this layout; return ``num_blocks``.

        All paged tensors must share one device and one block count.
        """
        if not isinstance(kv_caches, Sequence) or isinstance(kv_caches, (str, bytes)):
            raise TypeError(f"{argument}: expected a list with one dict of tensors per layer")
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"{argument}: layout has {self.num_layers} layers, got {len(kv_caches)}")
        num_blocks: int | None = None
        device: torch.device | None = None
        for i, (layer, tensors) in enumerate(zip(self.layers, kv_caches)):
            if not isinstance(tensors, Mapping):
                raise TypeError(f"{argument}[{i}]: expected a dict name -> tensor, got {type(tensors).__name__}")
            expected = {p.name for p in layer.paged}
            if set(tensors) != expected:
                raise ValueError(f"{argument}[{i}]: expected tensors {sorted(expected)}, got {sorted(tensors)}")
            for p in layer.paged:
                where = f"{argument}[{i}][{p.name!r}]"
                t = tensors[p.name]
                check_tensor(t, self.dtype, where)
                want_rank = 2 + len(p.token_shape)
                if t.dim() != want_rank:
                    raise ValueError(
                        f"{where}: expected rank {want_rank} [num_blocks, block_size, *{p.token_shape}], "
                        f"got shape {tuple(t.shape)}"
                    )
                if tuple(t.shape[1:]) != (self.block_size, *p.token_shape):
                    raise ValueError(
                        f"{where}: expected shape [num_blocks, {self.block_size}, "
                        f"{', '.join(map(str, p.token_shape))}], got {tuple(t.shape)}"
                    )
                if num_blocks is None:
                    num_blocks, device = t.shape[0], t.device
                elif t.shape[0] != num_blocks:
                    raise ValueError(f"{where}: has {t.shape[0]} blocks, earlier tensors have {num_blocks}")
                elif t.device != device:
                    raise ValueError(f"{where}: on {t.device}, earlier tensors on {device}")
        return num_blocks or 0

    def check_states(self, states: Mapping[int, torch.Tensor] | None, argument: str = "states") -> None:
        """Validate request-level states: one tensor per layer that has a state."""
        wanted = {i for i, layer in enumerate(self.layers) if layer.state is not None}
        got = set(states or {})
        if got != wanted:
            raise ValueError(f"{argument}: expected states for layers {sorted(wanted)}, got {sorted(got)}")
        for i in wanted:
            self.check_state(i, states[i], f"{argument}[{i}]")  # type: ignore[index]

    def check_state(self, layer: object, t: object, where: str) -> torch.Tensor:
        """Validate one request-level state: ``layer`` has a state, and ``t`` its dtype and shape."""
        spec = self.layers[layer].state if isinstance(layer, int) and 0 <= layer < self.num_layers else None
        if spec is None:
            raise ValueError(f"{where}: layer {layer!r} has no state in the layout")
        tensor = check_tensor(t, self.dtype, where)
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{where}: expected shape {spec.shape} for layer {layer}, got {tuple(tensor.shape)}")
        return tensor


def check_tensor(t: object, dtype: torch.dtype, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{where}: dtype {t.dtype} does not match the layout's {dtype}")
    return t


@dataclass(frozen=True)
class Selection:
    """The blocks (in token order) and token count that a transfer covers.

    ``num_tokens`` fills ``block_ids`` in order; only the last block may be partial.
    A state-only transfer (hybrid models) has no blocks and ``num_tokens == 0``.
    """

    block_ids: tuple[int, ...]
    num_tokens: int

    def __post_init__(self) -> None:
        ids = self.block_ids
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = tuple(ids)
        for i, b in enumerate(ids):
            if isinstance(b, bool) or not isinstance(b, int):
                raise TypeError(f"block_ids[{i}]: expected an int, got {type(b).__name__}")
            if b < 0:
                raise ValueError(f"block_ids[{i}]: block id {b} is negative")
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int):
            raise TypeError(f"num_tokens: expected an int, got {type(self.num_tokens).__name__}")
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens: must be >= 0, got {self.num_tokens}")
        object.__setattr__(self, "block_ids", ids)

    @functools.cached_property
    def ids(self) -> np.ndarray:
        """The block ids as an int64 array (made once per selection)."""
        return np.asarray(self.block_ids, dtype=np.int64)

    @functools.cached_property
    def _runs(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        """The block ids as runs of consecutive ids, found once per selection: where each
        run begins (a position in token order; one past the last block at the end), as a
        list and an array, and each run's first block id."""
        ids = np.asarray(self.block_ids, dtype=np.int64)
        starts = np.flatnonzero(np.diff(ids, prepend=-2) != 1)  # -2: block 0 begins a run too
        positions = np.append(starts, len(ids))
        return positions.tolist(), positions, ids[starts]

    def spans(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """Blocks ``[first, last)`` of the selection (positions in token order) as runs of
        consecutive ids: ``(first block id, count)`` arrays, one entry per run. A chunk's
        rows in a contiguous cache are one byte span per run."""
        listed, positions, blocks = self._runs
        i = bisect.bisect_right(listed, first) - 1
        if listed[i + 1] >= last:  # inside one run (blocks allocated in order): no arrays to cut
            return blocks[i : i + 1] + (first - listed[i]), np.array([last - first])
        j = bisect.bisect_left(listed, last)
        lo = np.maximum(positions[i:j], first)
        hi = np.minimum(positions[i + 1 : j + 1], last)
        return blocks[i:j] + (lo - positions[i:j]), hi - lo

    def check(self, block_size: int, num_blocks: int | None = None) -> Selection:
        """Check against a block size and (optionally) a pool size; return self."""
        capacity = len(self.block_ids) * block_size
        if self.num_tokens > capacity:
            raise ValueError(
                f"num_tokens: {self.num_tokens} tokens do not fit in {len(self.block_ids)} blocks "
                f"of {block_size} ({capacity} tokens)"
            )
        if self.block_ids and self.num_tokens <= capacity - block_size:
            raise ValueError(
                f"block_ids: {len(self.block_ids)} blocks given but {self.num_tokens} tokens "
                f"fill only {-(-self.num_tokens // block_size)}; the last block would be empty"
            )
        if num_blocks is not None:
            for i, b in enumerate(self.block_ids):
                if b >= num_blocks:
                    raise ValueError(f"block_ids[{i}]: block id {b} is out of range for {num_blocks} blocks")
        if len(set(self.block_ids)) != len(self.block_ids):
            raise ValueError("block_ids: a block id appears twice")
        return self
