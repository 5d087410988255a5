"""Hot loops that plain PyTorch runs badly on CPU, each with a PyTorch fallback."""

from quintet.kernels.selective_scan_cpu import (
    fused_scan_available,
    selective_scan_fused,
    selective_state_update_fused,
)

__all__ = ["fused_scan_available", "selective_scan_fused", "selective_state_update_fused"]
