"""Detection: the YOLO-style detector's training and evaluation, the Mask Frozen-DETR mask head on a frozen detector,
and SimDETR-style proposals.

Contract: imports core/, data/, models/, report/ only; never another task folder.
"""
