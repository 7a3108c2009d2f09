"""The vision-language model's training and evaluation (MiniGPT-v2-style), the SEED image writer, and the
All-Seeing region-text head's training.

Contract: imports core/, data/, models/, report/ only; never another task folder.
"""
