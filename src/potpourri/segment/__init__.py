"""Defect segmentation: the multi-class segmenter, one-shot (SLiMe-style) segmentation, SAM training and prompts,
SAM-CLIP merging, and the generators that add defects to images (copy-paste, Defect-Gen).

Contract: imports core/, data/, models/, report/ only; never another task folder.
"""
