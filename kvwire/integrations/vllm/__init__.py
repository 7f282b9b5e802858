"""kvwire inside vLLM: ``KvwireConnector``, a KV connector for disaggregated prefill and
decode that streams each layer's KV from the prefill to the decode while the prefill
still computes (docs/vllm.md).

``kv_connector_module_path = "kvwire.integrations.vllm"`` makes vLLM import this package
and take ``KvwireConnector`` from it. The connector needs vLLM; the settings and the
router (``python -m kvwire.integrations.vllm.proxy``) do not, so the class is imported
on first use.
"""

from __future__ import annotations

from typing import Any

from kvwire.integrations.vllm.config import KEYS, PROTOCOL, Settings, decode_params, prefill_params

__all__ = ["KEYS", "PROTOCOL", "KvwireConnector", "Settings", "decode_params", "prefill_params"]


def __getattr__(name: str) -> Any:
    if name == "KvwireConnector":
        from kvwire.integrations.vllm.connector import KvwireConnector

        return KvwireConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
