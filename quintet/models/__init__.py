"""Model families: `jamba` (hybrid Transformer-Mamba-MoE language model)."""
