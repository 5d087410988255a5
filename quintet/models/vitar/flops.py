"""Counted FLOPs of one forward pass (torch.utils.flop_counter), with CPU SDPA counted too.

FlopCounterMode counts matmuls, convolutions and einsum (it lowers to bmm), but in torch 2.x it has no
formula for the CPU flash-attention kernel that `scaled_dot_product_attention` dispatches to, so CPU
attention would count as zero; we add the standard SDPA formula for it. One multiply-add = 2 FLOPs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_cpu_flop} if op is not None else {}


def count_flops(model: nn.Module, images: torch.Tensor) -> int:
    """FLOPs of `model(images)` in inference mode (the model's training flag is left as it is)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        model(images)
    return int(counter.get_total_flops())


def count_flops_by_module(model: nn.Module, images: torch.Tensor) -> dict[str, int]:
    """FLOPs per top-level submodule name (e.g. patch_embed, merger, blocks, head)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        model(images)
    out: dict[str, int] = {}
    prefix = type(model).__name__
    for name, counts in counter.get_flop_counts().items():
        parts = name.split(".")
        if parts[0] != prefix or len(parts) < 2:
            continue
        # a direct child, or an item of a ModuleList child (which is never called itself)
        if len(parts) == 2 or (len(parts) == 3 and parts[2].isdigit()):
            out[parts[1]] = out.get(parts[1], 0) + int(sum(counts.values()))
    return out
