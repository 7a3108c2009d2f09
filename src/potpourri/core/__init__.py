"""The bottom rung: errors, imaging, atomic I/O and tensor bundles, weights, the model registry, runs, metrics,
box/mask text codecs and training helpers (lr schedule, batches, checkpoints, EMA, device).

Contract: imports nothing else of potpourri; every other folder may import it.
"""
