"""GPTQ calibration (Frantar et al., 2022, arXiv 2210.17323) onto the M0E4 grid.

For a Linear with weight W (N, K) and calibration inputs X (n, K), GPTQ rounds W one input column at a
time and spreads each column's rounding error over the columns not yet rounded, through the inverse of the
Hessian H = 2 X^T X / n of the layer's squared output error, so that ||X W^T - X Q^T|| stays small (plain
rounding to nearest minimises ||W - Q|| instead). Group parameters (S, c) are set, as in the reference
code, from the min and max of each group's (error-updated) weights when the sweep reaches the group.

`gptq_quantize_jamba` runs it layer after layer: each decoder layer's Linears see inputs produced by the
already-quantized layers below it (the mixer's Linears first, then the feed-forward's, which see the
quantized mixer's output), as the GPTQ paper does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from quintet.deploy.quantize import QuantConfig, quantizable_modules
from quintet.io import iter_jsonl
from quintet.kernels.m0e4 import M0E4Tensor, check_group_size, params_from_range, quantize_rtn


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
    name: str = "weight",
) -> M0E4Tensor:
    """M0E4 codes of `weight` (N, K) minimising the output error under `hessian` (K, K) = X^T X (any scale).

    Columns that never saw a non-zero input (zero diagonal) are set to zero, as in the reference code.
    `damp` adds `damp * mean(diag(H))` to the diagonal (numerical stability).
    """
    n, k = weight.shape
    check_group_size(group_size, k, name)
    W = weight.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    groups = k // group_size
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, groups, dtype=torch.float16)
    offsets = torch.zeros(n, groups, dtype=torch.float16)
    block_size = max(group_size, block_size - block_size % group_size)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                group = W1[:, i : i + group_size]
                S, c = params_from_range(group.amin(-1), group.amax(-1))
                scales[:, g], offsets[:, g] = S, c
                S64, c64 = S.double(), c.double()
            w = W1[:, i]
            q = torch.round(16.0 * (w / S64 + c64 - 1.0)).clamp_(0, 15)
            dq = (1.0 + q / 16.0 - c64) * S64
            codes[:, col] = q.to(torch.uint8)
            err = (w - dq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return M0E4Tensor(codes, scales, offsets, group_size)


class HessianCollector:
    """Forward hooks that accumulate X^T X of the inputs of the given Linear modules."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]
        for name, m in modules.items():
            self.hessians[name] = torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
            self.counts[name] = 0

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            self.hessians[name] += (x.t() @ x).double()
            self.counts[name] += x.shape[0]

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def _quantize_group(
    modules: dict[str, nn.Linear],
    run: Callable[[], None],
    config: QuantConfig,
    out: dict[str, M0E4Tensor],
) -> None:
    """Collect the inputs of `modules` by calling `run`, GPTQ them, write the dequantized weights back."""
    collector = HessianCollector(modules)
    try:
        run()
    finally:
        collector.remove()
    for name, module in modules.items():
        if collector.counts[name] == 0:  # e.g. an expert no calibration token was routed to
            q = quantize_rtn(module.weight.float(), config.group_size, name)
        else:
            q = gptq_quantize_weight(module.weight, collector.hessians[name], config.group_size, name=name)
        out[name] = q
        module.weight.copy_(q.dequantize(module.weight.dtype))


@torch.no_grad()
def gptq_quantize_jamba(
    model: nn.Module, samples: list[torch.Tensor], config: QuantConfig
) -> dict[str, M0E4Tensor]:
    """GPTQ codes for every Linear `quantize` would swap in a `JambaForCausalLM`, from calibration token
    sequences `samples` (each (1, L)); the embedding is rounded to nearest (it has no input to calibrate on).

    The model's float weights are replaced by their dequantized values as it goes; pass the result to
    `quantize(model, config, quantized=...)` to swap the modules.
    """
    targets = quantizable_modules(model, config)
    out: dict[str, M0E4Tensor] = {}
    xs = [model.model.embed_tokens(ids).float() for ids in samples]

    def named(prefix: str, module: nn.Module) -> dict[str, nn.Linear]:
        return {
            f"{prefix}.{n}": m
            for n, m in module.named_modules()
            if f"{prefix}.{n}" in targets and isinstance(m, nn.Linear)
        }

    for i, layer in enumerate(tqdm(model.model.layers, desc="GPTQ layers", leave=False)):
        prefix = f"model.layers.{i}"
        mixer = layer.self_attn if layer.is_attention else layer.mamba
        mixer_name = f"{prefix}.{'self_attn' if layer.is_attention else 'mamba'}"

        def forward_all(layer: nn.Module = layer, xs: list[torch.Tensor] = xs) -> None:
            for x in xs:
                layer(x, None, None, None)

        _quantize_group(named(mixer_name, mixer), forward_all, config, out)
        _quantize_group(named(f"{prefix}.feed_forward", layer.feed_forward), forward_all, config, out)
        xs = [layer(x, None, None, None)[0] for x in xs]
    if "lm_head" in targets:
        head_input = [model.model.final_layernorm(x) for x in xs]
        _quantize_group(
            {"lm_head": model.lm_head}, lambda: [model.lm_head(h) for h in head_input], config, out
        )
    return out


def read_calibration(
    path: str | os.PathLike, encode: Callable[[str], list[int]], seq_len: int = 256, num_samples: int = 32
) -> list[torch.Tensor]:
    """Calibration sequences from a JSONL file of documents (`text` field): the texts' tokens are joined
    and cut into `num_samples` pieces of `seq_len` tokens (fewer if the file is shorter)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such calibration file")
    tokens: list[int] = []
    need = seq_len * num_samples
    for where, _, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{where}: expected an object with a string 'text' field")
        tokens.extend(encode(row["text"]))
        if len(tokens) >= need:
            break
    if len(tokens) < seq_len:
        raise ValueError(f"{path}: only {len(tokens)} tokens; calibration needs at least seq_len = {seq_len}")
    ids = torch.tensor(tokens[: (len(tokens) // seq_len) * seq_len][:need], dtype=torch.long)
    return list(ids.view(-1, 1, seq_len))
