"""Which ops a forward without gradients runs: the inference paths, or exactly those of a training forward.

A forward in eval mode without gradients takes faster paths that give the same result to rounding: the
fused causal conv (`quintet.kernels`, inference only) and attention with the query heads of a KV group
folded into one matrix. Within `training_numerics()` it takes the training forward's ops instead, so a
frozen copy of a model gives the same numbers, to the last bit, as the model being trained: a DPO
reference equals its policy at step 0 (`quintet.align.dpo`). Dropout still follows train/eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_INFERENCE_PATHS: ContextVar[bool] = ContextVar("quintet_jamba_inference_paths", default=True)


def inference_paths() -> bool:
    """False inside a `training_numerics()` block."""
    return _INFERENCE_PATHS.get()


@contextlib.contextmanager
def training_numerics() -> Iterator[None]:
    token = _INFERENCE_PATHS.set(False)
    try:
        yield
    finally:
        _INFERENCE_PATHS.reset(token)
