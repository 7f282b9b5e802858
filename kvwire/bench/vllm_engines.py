"""Two real vLLM 0.33 engines without a GPU, for the connector's tests and ``kvwire-bench vllm``.

Each :class:`Engine` is vLLM's real ``Scheduler`` (with its KV cache manager and the
connector's scheduler side, built by vLLM's connector factory from the
``kv_connector_module_path``) plus the connector's worker side over caches that vLLM's own
``allocate_kv_cache`` lays out (LBNHC, LBHNC, MLA; bf16 or fp8 bytes). :meth:`Engine.step`
calls the worker hooks in the order vLLM's model runner does; the "model" writes each
scheduled token's K/V (a deterministic function of the prompt, the layer and the position)
into the request's slots, layer by layer, between ``wait_for_layer_load`` and
``save_kv_layer``. Nothing is mocked on the connector's path: real kvwire transfers over
127.0.0.1.

A tensor-parallel instance is one engine per rank (``Options(tp_size=N, tp_rank=r)``),
each with its own scheduler: given the same requests they schedule alike, as one
scheduler driving N workers would. Rank r's caches hold its heads of the model
(``kv_heads`` is the model's total), and the only thing stood in for is vLLM's
distributed state, which tells the connector its rank.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
from vllm import SamplingParams
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    MLAAttentionSpec,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.utils import allocate_kv_cache

SECRET = "kvwire-vllm-test-secret"
BLOCK = 16
LAYERS = 3
KV_HEADS = 2
HEAD = 32
EOS = 999
MAX_LEN = 65536
init_none_hash(sha256)


def model_dir(root: str, layers: int = LAYERS, kv_heads: int = KV_HEADS, head_dim: int = HEAD) -> str:
    """A config-only tiny Llama (no weights, no tokenizer)."""
    path = os.path.join(root, f"llama-{layers}x{kv_heads}x{head_dim}")
    os.makedirs(path, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": kv_heads * 2 * head_dim,
        "intermediate_size": 256, "num_attention_heads": kv_heads * 2, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "num_hidden_layers": layers, "vocab_size": 1000, "max_position_embeddings": 65536,
        "torch_dtype": "bfloat16", "eos_token_id": EOS,
    }  # fmt: skip
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


@dataclass
class Options:
    role: str  # kv_producer | kv_consumer
    extra: dict
    layers: int = LAYERS
    kv_heads: int = KV_HEADS  # the model's; a tensor-parallel rank holds its share
    head_dim: int = HEAD
    layout: str = "LBNHC"  # LBNHC | LBHNC
    kind: str = "gqa"  # gqa | mla
    cache_dtype: str = "auto"  # auto (bf16) | fp8 (uint8 bytes)
    num_blocks: int = 256
    max_batched_tokens: int = 2048
    max_num_seqs: int = 128
    failure_policy: str = "fail"
    prefix_caching: bool = False
    tp_size: int = 1
    tp_rank: int = 0

    @property
    def heads(self) -> tuple[int, int]:
        """(first, count) of the model's KV heads this rank's caches hold (as vLLM splits
        them: contiguous and equal, one replicated head per rank past the head count)."""
        if self.kind == "mla":
            return 0, 1
        return self.tp_rank * self.kv_heads // self.tp_size, max(1, self.kv_heads // self.tp_size)


def _kv_cache_config(opts: Options, names: list[str]) -> KVCacheConfig:
    dtype = torch.uint8 if opts.cache_dtype == "fp8" else torch.bfloat16
    if opts.kind == "mla":
        spec = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=96, dtype=dtype)
    else:
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=opts.heads[1], head_size=opts.head_dim, dtype=dtype)
    page = spec.page_size_bytes
    tensor = KVCacheTensor(size=len(names) * opts.num_blocks * page, layers=names,
                           layer_stride=opts.num_blocks * page, block_stride=page)  # fmt: skip
    return KVCacheConfig(num_blocks=opts.num_blocks, kv_cache_tensors=[tensor],
                         kv_cache_groups=[KVCacheGroupSpec(names, spec)])  # fmt: skip


def _attn_metadata(slots: torch.Tensor):
    return SimpleNamespace(slot_mapping=slots)  # all the connector may look at


class FakeModel:
    """K/V of token ``t`` of a prompt at layer ``l``: random bytes seeded by the prompt and ``l``."""

    def __init__(self) -> None:
        self._cache: dict = {}

    def rows(self, prompt: tuple, layer: int, row_bytes: int, upto: int) -> torch.Tensor:
        key = (zlib.crc32(str(prompt).encode()), layer, row_bytes)
        have = self._cache.get(key)
        if have is None or have.shape[0] < upto:
            g = torch.Generator().manual_seed(key[0] * 131 + layer)
            have = torch.randint(0, 256, (max(upto, len(prompt) + 64), row_bytes), generator=g, dtype=torch.uint8)
            self._cache[key] = have
        return have


@dataclass
class Engine:
    opts: Options
    config: VllmConfig
    scheduler: Scheduler
    worker: Any  # the connector's worker side (KvwireConnector, WORKER role)
    caches: dict[str, torch.Tensor]
    model: FakeModel = field(default_factory=FakeModel)
    layer_delay_s: float = 0.0
    finished: dict = field(default_factory=dict)  # request id -> finish reason / status
    outputs: dict = field(default_factory=dict)  # request id -> output token ids
    recving_done: list = field(default_factory=list)  # request ids reported in finished_recving
    sending_done: list = field(default_factory=list)
    load_errors: list = field(default_factory=list)
    scheduled: dict = field(default_factory=dict)  # request id -> list of token counts per step
    stats: list = field(default_factory=list)
    preempted: list = field(default_factory=list)  # request ids vLLM preempted, in order
    on_recving: Any = None  # called with (engine, request id) when a receive is reported

    @property
    def free_blocks(self) -> int:
        return self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()

    @property
    def total_blocks(self) -> int:
        return self.opts.num_blocks - 1  # block 0 is vLLM's null block

    def add(self, request_id: str, prompt: list[int], params: dict | None, max_tokens: int) -> Request:
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        sp.update_from_generation_config({}, EOS)
        req = Request(request_id=request_id, prompt_token_ids=list(prompt), sampling_params=sp, pooling_params=None,
                      block_hasher=get_request_block_hasher(BLOCK, sha256))  # fmt: skip
        req.kv_transfer_params = params
        self.scheduler.add_request(req)
        return req

    def abort(self, request_id: str) -> None:
        self.scheduler.finish_requests(request_id, RequestStatus.FINISHED_ABORTED)

    def row_bytes(self, t: torch.Tensor) -> int:
        return t.shape[1] * t.shape[3] * t.element_size()

    def model_rows(self, prompt: list[int] | tuple, layer: int, t: torch.Tensor, upto: int) -> torch.Tensor:
        """The model's K/V bytes of tokens [0, upto) at ``layer``, this rank's heads only."""
        first, count = self.opts.heads
        per_head = self.row_bytes(t) // count
        total = 1 if self.opts.kind == "mla" else self.opts.kv_heads
        rows = self.model.rows(tuple(prompt), layer, per_head * total, upto)
        return rows[:, first * per_head : (first + count) * per_head]

    def _token_major(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8).transpose(1, 2)  # [B, N, H, C bytes], a view whatever the layout

    def write_tokens(self, layer_name: str, layer: int, req: Request, start: int, count: int) -> torch.Tensor:
        """The model's attention layer: store K/V of tokens [start, start + count) in the slots."""
        t = self.caches[layer_name]
        ids = torch.tensor(self.scheduler.kv_cache_manager.get_block_ids(req.request_id)[0], dtype=torch.long)
        rows = self.model_rows(req.prompt_token_ids, layer, t, start + count)
        pos = torch.arange(start, start + count)
        blocks, offsets = ids[pos // BLOCK], pos % BLOCK
        self._token_major(t)[blocks, offsets] = rows[start : start + count].reshape(count, t.shape[1], -1)
        return blocks * BLOCK + offsets

    def expected(self, req_prompt: list[int], layer: int) -> torch.Tensor:
        t = self.caches[next(iter(self.caches))]
        return self.model_rows(req_prompt, layer, t, len(req_prompt))[: len(req_prompt)]

    def tokens_in_blocks(self, layer_name: str, block_ids: list[int], count: int) -> torch.Tensor:
        t = self.caches[layer_name]
        pos = torch.arange(count)
        blocks = torch.tensor(block_ids, dtype=torch.long)[pos // BLOCK]
        return self._token_major(t)[blocks, pos % BLOCK].reshape(count, -1)

    def step(self) -> int:
        """One engine step; returns the number of tokens scheduled."""
        so = self.scheduler.schedule()
        w = self.worker
        meta = so.kv_connector_metadata
        self.preempted.extend(sorted(so.preempted_req_ids or ()))
        w.handle_preemptions(meta)
        w.bind_connector_metadata(meta)
        if so.has_sync_kv_loads:
            w.start_load_kv(None)
        reqs = self.scheduler.requests
        for req_id, n in so.num_scheduled_tokens.items():
            self.scheduled.setdefault(req_id, []).append(n)
        if so.total_num_scheduled_tokens:
            for layer, name in enumerate(self.caches):
                w.wait_for_layer_load(name)
                slots = []
                for req_id, n in so.num_scheduled_tokens.items():
                    req = reqs[req_id]
                    start = req.num_computed_tokens - n  # the scheduler already advanced it
                    count = max(0, min(n, len(req.prompt_token_ids) - start))  # prompt tokens only
                    if count:
                        slots.append(self.write_tokens(name, layer, req, start, count))
                if self.layer_delay_s:
                    time.sleep(self.layer_delay_s)
                meta_slots = torch.cat(slots) if slots else torch.empty(0, dtype=torch.long)
                w.save_kv_layer(name, self.caches[name], _attn_metadata(meta_slots))
        if not so.has_sync_kv_loads:
            w.start_load_kv(None)
        w.wait_for_save()
        results = w.get_transfer_results(so.finished_req_ids)
        errors = w.get_block_ids_with_load_errors()
        stats = w.get_kv_connector_stats()
        w.clear_connector_metadata()
        if stats is not None:
            self.stats.append(stats)
        self.load_errors.extend(errors)
        req_ids = list(so.num_scheduled_tokens)
        sampled = []
        for req_id in req_ids:
            req = reqs[req_id]
            sampled.append([] if req.num_computed_tokens < req.num_tokens else [7])
        for req_id in results.finished_recving:
            self.recving_done.append(req_id)
            if self.on_recving is not None:
                self.on_recving(self, req_id)
        self.sending_done.extend(results.finished_sending)
        output = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)}, sampled_token_ids=sampled,
            logprobs=None, prompt_logprobs_dict={}, pooler_output=None,
            kv_connector_output=KVConnectorOutput(
                finished_sending=results.finished_sending or None, finished_recving=results.finished_recving or None,
                failed_recving=results.failed_recving, invalid_block_ids=errors,
            ),
        )  # fmt: skip
        engine_outputs = self.scheduler.update_from_output(so, output)
        for outs in engine_outputs.values():
            for o in outs.outputs:
                self.outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finish_reason is not None:
                    self.finished[o.request_id] = o.finish_reason
        return so.total_num_scheduled_tokens

    def idle(self) -> bool:
        """Nothing left: no request, no block held, nothing the connector still has to say."""
        s = self.scheduler
        return not s.requests and self.free_blocks == self.total_blocks and not s.connector.has_pending_push_work()

    def close(self) -> None:
        self.worker.shutdown()


def make_engine(opts: Options, root: str) -> Engine:
    model = ModelConfig(model=model_dir(root, opts.layers, opts.kv_heads, opts.head_dim), skip_tokenizer_init=True,
                        dtype="bfloat16", max_model_len=MAX_LEN, seed=0)  # fmt: skip
    sched = SchedulerConfig(max_num_seqs=opts.max_num_seqs, max_num_batched_tokens=opts.max_batched_tokens,
                            max_model_len=MAX_LEN, enable_chunked_prefill=True, is_encoder_decoder=False)  # fmt: skip
    cache = CacheConfig(block_size=BLOCK, cache_dtype=opts.cache_dtype, enable_prefix_caching=opts.prefix_caching)
    cache.kv_cache_layout = opts.layout
    ktc = KVTransferConfig(kv_connector="KvwireConnector", kv_connector_module_path="kvwire.integrations.vllm",
                           kv_role=opts.role, kv_connector_extra_config=dict(opts.extra),
                           kv_load_failure_policy=opts.failure_policy)  # fmt: skip
    config = VllmConfig(model_config=model, cache_config=cache, scheduler_config=sched,
                        device_config=DeviceConfig("cpu"), kv_transfer_config=ktc)  # fmt: skip
    config.parallel_config.tensor_parallel_size = opts.tp_size
    config.cache_config.num_gpu_blocks = opts.num_blocks
    names = [f"model.layers.{i}.self_attn.attn" for i in range(opts.layers)]
    kv_cache_config = _kv_cache_config(opts, names)
    scheduler = Scheduler(vllm_config=config, kv_cache_config=kv_cache_config, log_stats=True,
                          structured_output_manager=StructuredOutputManager(config), block_size=BLOCK)  # fmt: skip
    with ExitStack() as stack:
        if opts.tp_size > 1:  # what vLLM's distributed state would say in a rank's process
            from kvwire.integrations.vllm import connector

            stack.enter_context(mock.patch.object(connector, "_tp_rank", lambda: opts.tp_rank))
        worker = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, kv_cache_config)
    caches = allocate_kv_cache(kv_cache_config, torch.device("cpu"), KVCacheLayout[opts.layout])
    worker.register_kv_caches(caches)
    return Engine(opts, config, scheduler, worker, caches)


def run(engines: list[Engine], until, timeout: float = 60.0, what: str = "condition") -> None:
    """Step the engines until ``until()`` holds; fail after ``timeout`` seconds. As vLLM's
    engine loop does, an engine steps only while its scheduler ``has_requests()``: one
    that has nothing to do waits for a new request, whatever its connector still holds."""
    end = time.monotonic() + timeout
    while not until():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        busy = sum(e.step() for e in engines if e.scheduler.has_requests())
        if not busy:
            time.sleep(0.003)  # only background transfers left: let them run


def prefill_child(conn, root: str, extra: dict, tokens: list[int], tid: str, peer: str, layer_delay_s: float) -> None:
    """A prefill engine in its own process (to be killed mid-transfer): says "sending" once
    its first layer is on the wire, then keeps computing slowly."""
    engine = make_engine(Options("kv_producer", extra), root)
    engine.layer_delay_s = layer_delay_s
    worker = engine.worker
    save = worker.save_kv_layer

    def save_and_tell(name, kv, meta, **kw):
        save(name, kv, meta, **kw)
        conn.send("sending")

    worker.save_kv_layer = save_and_tell
    from kvwire.integrations.vllm import prefill_params

    engine.add("p-killed", tokens, prefill_params(tid, peer), max_tokens=1)
    run([engine], lambda: False, timeout=120, what="being killed")
