"""The GPU half of the codecs: fused gather + encode and decode + scatter kernels.

``kvwire.cuda.kernels`` holds the launchers. The engine uses them whenever the caches
are on a GPU and CuPy is installed (``pip install 'kvwire[cuda]'``); otherwise it falls
back to the CPU reference, which produces the same bytes.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def available() -> bool:
    """True when a CUDA device and CuPy are both usable."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True
