"""The engine's weights in transparent huge pages: one arena of 2 MiB pages instead of 4 KiB ones.

A decode step streams every weight it uses once (30 MB for jamba-small in FP4), more than the CPU's TLB
covers with 4 KiB pages (a Zen 4's second-level TLB holds 3,072 entries: 12 MB), so the GEMVs also wait on
page walks. Where the kernel's transparent huge pages are on or on request (`madvise`, the default of most
distributions), `move_to_huge_pages` copies the module's CPU tensors into one anonymous mapping marked
`MADV_HUGEPAGE` and points the parameters and buffers at views of it: the same values, the same memory
(each tensor is copied, then its old storage freed), in pages the TLB covers 512 times as far.
`benchmarks/vs_llamacpp.py` measures the engine with it. Elsewhere (no Linux madvise, huge pages off) it
does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Linux with transparent huge pages on ("always" or "madvise")."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[never]" not in setting


def huge_page_bytes(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` starting on a huge page of an anonymous mapping marked `MADV_HUGEPAGE`
    (the tensor and its views keep the mapping alive). Needs `huge_pages_available()`."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # one page more, to start on a page boundary
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


def move_to_huge_pages(module: nn.Module, min_bytes: int = 0) -> int:
    """Copy `module`'s contiguous CPU parameters and buffers of at least `min_bytes` into one huge-page arena
    (a tensor shared by several modules stays shared); returns the bytes moved (0 where huge pages are
    unavailable)."""
    if not huge_pages_available():
        return 0
    slots: list[tuple[nn.Module, str, torch.Tensor, int]] = []  # owner, name, tensor, its address now
    for owner in module.modules():
        for name, t in list(owner.named_parameters(recurse=False)) + list(owner.named_buffers(recurse=False)):
            if t is not None and t.device.type == "cpu" and t.is_contiguous() and t.nbytes >= min_bytes:
                slots.append((owner, name, t, t.data_ptr()))
    unique: dict[int, torch.Tensor] = {}
    for _, _, t, ptr in slots:
        unique.setdefault(ptr, t)
    if not unique:
        return 0
    arena = huge_page_bytes(sum(-(-t.nbytes // ALIGN) * ALIGN for t in unique.values()))
    offset = 0
    moved: dict[int, torch.Tensor] = {}
    for ptr, t in unique.items():
        view = arena[offset : offset + t.nbytes].view(t.dtype).view(t.shape)
        view.copy_(t.detach())
        moved[ptr] = view
        offset += -(-t.nbytes // ALIGN) * ALIGN
    for owner, name, t, ptr in slots:
        view = moved[ptr]
        if isinstance(t, nn.Parameter):
            t.data = view
        else:
            setattr(owner, name, view)
    nbytes = sum(t.nbytes for t in unique.values())
    del slots, unique, t
    _release_freed_memory()
    return nbytes


def _release_freed_memory() -> None:
    """Hand the old copies' memory back to the system: glibc's malloc keeps freed blocks of up to its
    (growing) mmap threshold in its heap, so without this the process would hold the weights twice."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
