"""Inference backends: one file each, all implementing ``engine.base.Backend``."""
