"""Benchmarks run locally: the NoW protocol (``now``), exact mesh distances (``geometry``),
similarity Procrustes (``procrustes``) and occluded photo variants (``occlusion``)."""
