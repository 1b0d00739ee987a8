"""Whole-slide image access, tissue detection and hierarchical multi-magnification tiling."""
