"""Registered models; importing this package registers every family."""

from potpourri.models import efficientmod, efficientnet, minilm, rep  # noqa: F401  (registration side effects)
