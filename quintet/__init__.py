"""quintet: one PyTorch toolkit for the model lifecycle (curate, pretrain, align, red-team, deploy)."""

__version__ = "0.1.0"
