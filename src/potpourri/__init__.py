"""potpourri: ICLR 2024 vision methods as real, tested, interchangeable parts behind one API."""

from potpourri import models  # noqa: F401  (registers our models, also into timm)
from potpourri.core.errors import PotpourriError
from potpourri.core.registry import create_model, get_pretrained_cfg, list_models, model_info, register_model
from potpourri.core.version import __version__
from potpourri.core.weights import PretrainedCfg, resolve_weights
from potpourri.deploy.runs import load_run
from potpourri.models.reparam import reparameterize

__all__ = [
    "PotpourriError",
    "PretrainedCfg",
    "__version__",
    "create_model",
    "get_pretrained_cfg",
    "list_models",
    "load_run",
    "model_info",
    "register_model",
    "reparameterize",
    "resolve_weights",
]
