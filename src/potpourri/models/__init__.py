"""Architectures only: ``nn.Module`` classes with ``@register_model`` builders and pretrained configs, plus shared
pieces (``blocks``: a model's named blocks). No training loops, no CLI; importing this package registers every family.

Contract: imports core/ and data/ only.
"""

from potpourri.models import clip_small, efficientmod, efficientnet, fastervit, frozen_lm, minilm, rep, smollm2, yolo  # noqa: F401  (registration side effects)
