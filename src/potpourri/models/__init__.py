"""Registered models; importing this package registers every family."""

from potpourri.models import efficientnet, minilm  # noqa: F401  (registration side effects)
