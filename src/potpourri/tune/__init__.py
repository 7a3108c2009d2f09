"""Adapting pretrained models: one training loop, every strategy, and the choice of layers to fine-tune.

Contract: imports core/, data/, models/, report/ only; never another task folder.

Example:
    from potpourri.tune import fit
    result = fit(model, train_set, val_set, strategy="sgd-freeze-embed", epochs=5, lr=1e-2)
"""

from potpourri.models.blocks import block_map
from potpourri.tune.layer_select import finetuning_profile, greedy_select, proxy_scores, rank_correlation
from potpourri.tune.strategies import STRATEGIES, Plan, Strategy, get_strategy
from potpourri.tune.trainer import TuneConfig, TuneResult, fit, train

__all__ = [
    "STRATEGIES",
    "Plan",
    "Strategy",
    "TuneConfig",
    "TuneResult",
    "block_map",
    "finetuning_profile",
    "fit",
    "get_strategy",
    "greedy_select",
    "proxy_scores",
    "rank_correlation",
    "train",
]
