"""Differential tests: unionfs against kernel overlayfs (see backends.py, compare.py)."""
