"""Hooks for tracing a Jamba forward on fake tensors (symbolic shapes: `quintet.deploy.shapes`).

Two things in a Jamba step depend on the data rather than the shapes: which experts a token chooses and
how many tokens each expert gets. While a `tracing(hooks)` block is active the MoE block asks `hooks` for
them, and the Mamba mixer runs its scans as single registered ops (`quintet.kernels.selective_scan_ops`)
instead of the C++ kernels, which cannot run on fake tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch


class TraceHooks:
    """What a traced forward asks for the data-dependent values of the MoE dispatch."""

    def expert_counts(self, layer: int, flat_experts: torch.Tensor, num_experts: int) -> list:
        """Tokens routed to each expert of MoE layer `layer` (`flat_experts`: the chosen expert ids)."""
        raise NotImplementedError

    def decode_experts(self, layer: int, experts: torch.Tensor) -> list:
        """The k experts one decoding token chose (`experts`: (1, k))."""
        raise NotImplementedError


_TRACE: ContextVar[TraceHooks | None] = ContextVar("quintet_jamba_trace", default=None)


def current_trace() -> TraceHooks | None:
    """The hooks of the active `tracing` block, or None when running for real."""
    return _TRACE.get()


@contextlib.contextmanager
def tracing(hooks: TraceHooks) -> Iterator[None]:
    token = _TRACE.set(hooks)
    try:
        yield
    finally:
        _TRACE.reset(token)
