"""Registered models; importing this package registers every family."""

from potpourri.models import efficientmod, efficientnet, fastervit, frozen_lm, minilm, rep, smollm2, yolo  # noqa: F401  (registration side effects)
