"""``KvwireConnector``: kvwire as a vLLM KV connector (vLLM 0.33's ``KVConnectorBase_V1``).

Load it with::

    --kv-transfer-config '{"kv_connector": "KvwireConnector",
                           "kv_connector_module_path": "kvwire.integrations.vllm",
                           "kv_role": "kv_producer",          # prefill; "kv_consumer" on the decode
                           "kv_connector_extra_config": {"secret": "...", "listen": "0.0.0.0:7600"}}'

vLLM builds the class twice: with ``KVConnectorRole.SCHEDULER`` in the scheduler (which
only plans: :mod:`~kvwire.integrations.vllm.scheduler`) and with ``KVConnectorRole.WORKER``
in each worker (which moves bytes: :mod:`~kvwire.integrations.vllm.worker`). Nothing is
process-wide: a prefill and a decode connector may live in one process. See docs/vllm.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvwire.integrations.vllm.config import Settings
from kvwire.integrations.vllm.metadata import KvwireConnectorMetadata
from kvwire.integrations.vllm.scheduler import SchedulerSide
from kvwire.integrations.vllm.worker import WorkerSide, new_stats

LIST_STATS = ("send_ms", "exposed_ms", "receive_ms")


@dataclass
class KvwireStats(KVConnectorStats):
    """Per interval: segments and bytes sent and received, failures, and the lists of
    per-segment times (``send_ms``: open to acknowledgement; ``exposed_ms``: last layer
    queued to acknowledgement; ``receive_ms``: first to last byte on the decode)."""

    def reset(self) -> None:
        self.data = dict(new_stats())

    def aggregate(self, other: KVConnectorStats) -> KvwireStats:
        for key, value in other.data.items():
            if key in LIST_STATS:
                self.data.setdefault(key, []).extend(value)
            else:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: v for k, v in self.data.items() if k not in LIST_STATS}
        for key in LIST_STATS:
            values = sorted(self.data.get(key, ()))
            if values:
                out[f"{key}_p50"] = round(values[len(values) // 2], 3)
                out[f"{key}_max"] = round(values[-1], 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, model_parallel_is_initialized

        return get_tensor_model_parallel_rank() if model_parallel_is_initialized() else 0
    except (ImportError, AssertionError):
        return 0


def _total_kv_heads(vllm_config) -> int | None:
    """The model's KV heads before tensor parallelism splits them (None if unknown)."""
    try:
        return int(vllm_config.model_config.get_total_num_kv_heads())
    except (AttributeError, TypeError, ValueError):
        return None


class KvwireConnector(KVConnectorBase_V1):
    """Streams a prefill's KV cache to the decode, layer by layer, through kvwire."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = self._kv_transfer_config
        producer, consumer = ktc.is_kv_producer, ktc.is_kv_consumer
        self.settings = Settings.from_extra_config(ktc.kv_connector_extra_config, needs_listen=consumer)
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise ValueError("KvwireConnector: pipeline parallelism is not supported yet")
        if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) > 1:
            raise ValueError("KvwireConnector: hybrid KV cache groups (hybrid-memory models) are not supported yet")
        block_size = vllm_config.cache_config.block_size
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(self.settings, block_size, producer, consumer)
        else:
            self.settings.check_block_size(block_size)
            spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec if kv_cache_config is not None else None
            mla = type(spec).__name__.startswith("MLA") or bool(getattr(vllm_config.model_config, "use_mla", False))
            self._worker = WorkerSide(
                self.settings, producer=producer, consumer=consumer, tp_size=parallel.tensor_parallel_size,
                tp_rank=_tp_rank(), mla=mla, head_size_v=getattr(spec, "head_size_v", None),
                num_blocks=kv_cache_config.num_blocks if kv_cache_config is not None else 0,
                kv_heads=_total_kv_heads(vllm_config),
            )  # fmt: skip

    @property
    def worker(self) -> WorkerSide:
        assert self._worker is not None, "a worker-side method called on the scheduler-side connector"
        return self._worker

    @property
    def scheduler(self) -> SchedulerSide:
        assert self._scheduler is not None, "a scheduler-side method called on the worker-side connector"
        return self._scheduler

    # -- class-level answers -------------------------------------------------------------
    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # save_kv_layer runs between layers; a captured graph would skip it

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> str | None:
        return None  # strided views take any physical order

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KvwireStats(data=dict(data)) if data is not None else KvwireStats(data=dict(new_stats()))

    # -- worker side ---------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, KvwireConnectorMetadata)
        self.worker.bind(connector_metadata)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert isinstance(kv_connector_metadata, KvwireConnectorMetadata)
        self.worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self.worker.start_load()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: a request runs only once all of its KV is in place

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        self.worker.save_layer(layer_name)

    def wait_for_save(self) -> None:
        self.worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending = self.worker.finished_sending(finished_req_ids)
        recving = self.worker.finished_recving()
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._worker is None:
            return None
        stats = KvwireStats(data=self._worker.take_stats())
        return None if stats.is_empty() else stats

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()

    # -- scheduler side ------------------------------------------------------------------
    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        return self._scheduler is not None and self._scheduler.has_pending_work()
