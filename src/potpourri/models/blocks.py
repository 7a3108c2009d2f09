"""A model's named blocks, stem to head (``block_map``): what strategies freeze, what SubTuning and the layer choice
select, and what the segmenter fine-tunes.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch.nn as nn

from potpourri.core.errors import PotpourriError

BlockMap = OrderedDict[str, list[str]]  # entry name -> module/parameter name prefixes, stem to head


_CONTAINER_NAMES = re.compile(r"^(blocks|layers|stages|features|layer\d+)$")


def _classifier_name(model: nn.Module) -> str | None:
    """Name of the classifier module: timm's pretrained_cfg / get_classifier, else the last Linear child."""
    cfg_name = getattr(model, "pretrained_cfg", {}).get("classifier") if hasattr(model, "pretrained_cfg") else None
    modules = dict(model.named_modules())
    if isinstance(cfg_name, str) and cfg_name in modules:
        return cfg_name
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, module in modules.items():
            if module is head and name:
                return name
    children = [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
    return children[-1][0] if children else None


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _expand_container(name: str, container: nn.Module) -> list[str]:
    """Blocks of a container: one level down, two when its children are stages (EfficientNet ``blocks.i.j``)."""
    children = [(n, m) for n, m in container.named_children() if _has_params(m)]
    if children and all(isinstance(m, nn.Sequential | nn.ModuleList) for _, m in children):
        return [f"{name}.{c}.{g}" for c, stage in children for g, m in stage.named_children() if _has_params(m)]
    return [f"{name}.{c}" for c, _ in children]


def block_map(model: nn.Module, override: dict[str, list[str]] | None = None) -> OrderedDict[str, list[str]]:
    """Ordered ``{entry: [name prefixes]}`` from stem to head; every parameter belongs to exactly one entry.

    Example:
        list(block_map(create_model("efficientnet_lite0")))  # ['stem', 'blocks.0.0', …, 'blocks.6.0', 'neck', 'head']
    """
    if override is not None:
        bmap = OrderedDict((k, list(v)) for k, v in override.items())
        _check_covers(model, bmap)
        return bmap
    head = _classifier_name(model)
    children = [(n, m) for n, m in model.named_children() if _has_params(m) and n != head]
    containers = [n for n, m in children if _CONTAINER_NAMES.match(n) and isinstance(m, nn.Sequential | nn.ModuleList)]
    bmap: BlockMap = OrderedDict()
    direct = [n for n, _ in model.named_parameters(recurse=False)]
    if not containers:  # a plain stack (e.g. nn.Sequential): every child with parameters is one entry
        for name, _ in children:
            bmap[name] = [name]
        if direct:
            bmap["tokens"] = direct
    else:
        first = next(i for i, (n, _) in enumerate(children) if n in containers)
        last = max(i for i, (n, _) in enumerate(children) if n in containers)
        if first > 0:
            bmap["stem"] = [n for n, _ in children[:first]]
        if direct:
            bmap["tokens"] = direct  # ViT cls_token / pos_embed: trainable under freeze-embed, as in Kumar et al.
        for name, module in children[first : last + 1]:
            if name in containers:
                for block in _expand_container(name, module):
                    bmap[block] = [block]
            else:
                bmap[name] = [name]
        if last + 1 < len(children):
            bmap["neck"] = [n for n, _ in children[last + 1 :]]
    if head is not None:
        bmap["head"] = [head]
    _check_covers(model, bmap)
    return bmap


def entry_of(param_name: str, bmap: dict[str, list[str]]) -> str | None:
    """The block-map entry a parameter belongs to (longest matching prefix)."""
    best, best_len = None, -1
    for entry, prefixes in bmap.items():
        for prefix in prefixes:
            if (param_name == prefix or param_name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = entry, len(prefix)
    return best


def _check_covers(model: nn.Module, bmap: dict[str, list[str]]) -> None:
    orphans = [n for n, _ in model.named_parameters() if entry_of(n, bmap) is None]
    if orphans:
        raise PotpourriError(
            f"block map leaves parameter '{orphans[0]}' (and {len(orphans) - 1} more) in no entry; "
            "add its module name to one entry of the block map"
        )


def check_blocks(names: list[str], bmap: dict[str, list[str]]) -> None:
    """Raise one line naming the first unknown block and listing the valid ones."""
    for name in names:
        if name not in bmap:
            raise PotpourriError(f"unknown block '{name}'; valid blocks: {', '.join(bmap)}")
