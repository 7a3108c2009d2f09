"""potpourri: ICLR 2024 vision methods as real, tested, interchangeable parts behind one API."""

from potpourri import models  # noqa: F401  (registers our models, also into timm)
from potpourri.deploy.reparam import reparameterize
from potpourri.errors import PotpourriError
from potpourri.registry import create_model, get_pretrained_cfg, list_models, model_info, register_model
from potpourri.weights import PretrainedCfg, resolve_weights

__version__ = "0.1.0"

__all__ = [
    "PotpourriError",
    "PretrainedCfg",
    "__version__",
    "create_model",
    "get_pretrained_cfg",
    "list_models",
    "model_info",
    "register_model",
    "reparameterize",
    "resolve_weights",
]
