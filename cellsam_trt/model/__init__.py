"""PyTorch modules of CellSAM (checkpoint-compatible), checkpoint loading, synthetic weights."""
