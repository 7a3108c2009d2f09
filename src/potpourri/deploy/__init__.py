"""Deployment: re-parameterisation, the FC->Conv rewrite, ONNX export with parity checks, and latency benchmarks.

Contract: imports core/, data/, models/, report/ and the task folders; nothing below imports deploy/.
"""
