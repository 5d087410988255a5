"""Alignment: SFT, DPO and stepwise DPO (sDPO)."""
