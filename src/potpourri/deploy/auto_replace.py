"""Automatic FC→Conv / attention replacement: the talk's "can this be automated?", answered as a tool.

For a token model (a timm ViT: blocks with ``attn`` and ``mlp`` sub-blocks on ``(B, N, C)`` tokens):
1. find the replaceable sites and their real shapes with forward hooks;
2. exact rewrites, verified by parity: token-wise ``Linear`` ↔ 1×1 ``Conv2d`` on the patch grid (``ConvMlp``);
3. approximate rewrites: cheaper candidates per site (EfficientMod modulation, depthwise-conv MLP, narrower MLP,
   drop the sub-block), each trained by **local distillation** on the teacher's cached activations at that site;
4. each candidate's latency measured on this machine at its real shape (interleaved, threads pinned);
5. one candidate per site chosen to minimise total distillation loss under a latency budget (exact enumeration
   when small, ``scipy.optimize.milp`` otherwise). The same idea as LANA (Molchanov et al., ECCV 2022).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from potpourri.core.distributed import current_group
from potpourri.core.errors import PotpourriError
from potpourri.core.timing import interleaved_timings
from potpourri.models.efficientmod import ContextModulation

__all__ = [
    "Candidate",
    "ConvMlp",
    "ReplacementPlan",
    "Site",
    "auto_replace",
    "choose_under_budget",
    "find_sites",
    "mlp_to_conv",
]


# --- candidates: every one maps (B, N, C) tokens to (B, N, C), prefix tokens (CLS) included -----------------


def on_grid(
    x: torch.Tensor,
    grid: tuple[int, int],
    prefix: int,
    grid_op: Callable[[torch.Tensor], torch.Tensor],
    prefix_op: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """Apply ``grid_op`` to the patch tokens as a (B, C, h, w) map and ``prefix_op`` to the prefix (CLS) tokens."""
    B, _, C = x.shape
    h, w = grid
    patches = x[:, prefix:].transpose(1, 2).reshape(B, C, h, w)  # (B, C, h, w)
    out = grid_op(patches).flatten(2).transpose(1, 2)  # (B, h·w, C)
    if prefix_op is None:
        return out
    return torch.cat([prefix_op(x[:, :prefix]), out], dim=1)  # (B, N, C)


class GridOp(nn.Module):
    """Run a channels-first grid op on the patch tokens and a linear map on the prefix (CLS) tokens."""

    def __init__(self, op: nn.Module, dim: int, grid: tuple[int, int], prefix: int):
        super().__init__()
        self.op, self.grid, self.prefix = op, grid, prefix
        self.prefix_proj = nn.Linear(dim, dim) if prefix else None

    def forward(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        return on_grid(x, self.grid, self.prefix, self.op, self.prefix_proj)  # (B, N, C)


class ModulationOp(nn.Module):
    """EfficientMod's context modulation (channels-last inside) as a channels-first grid op."""

    def __init__(self, dim: int, ratio: int, kernel_size: int):
        super().__init__()
        self.modulation = ContextModulation(dim, ratio, kernel_size=kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modulation(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, h, w)


class DWConvMlp(nn.Module):
    """1×1 expand → depthwise k×k → GELU → 1×1 project, on the grid."""

    def __init__(self, dim: int, hidden: int, kernel_size: int = 3):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dw = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.dw(self.fc1(x))))  # (B, C, h, w)


class TokenMlp(nn.Module):
    """A plain (narrower) token MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # (B, N, C)


class DropBranch(nn.Module):
    """Remove the sub-block: its residual branch contributes zero."""

    def forward(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        return torch.zeros_like(x)


class ConvMlp(nn.Module):
    """Exact rewrite of a timm ``Mlp``: token-wise Linear layers as 1×1 convs on the patch grid."""

    def __init__(self, mlp: nn.Module, grid: tuple[int, int], prefix: int):
        super().__init__()
        self.grid, self.prefix = grid, prefix
        self.fc1, self.fc2 = _linear_to_conv1x1(mlp.fc1), _linear_to_conv1x1(mlp.fc2)
        self.act = mlp.act
        self.prefix_mlp = mlp if prefix else None  # CLS tokens keep the original Linear path

    def forward(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        return on_grid(x, self.grid, self.prefix, lambda p: self.fc2(self.act(self.fc1(p))), self.prefix_mlp)


def _linear_to_conv1x1(linear: nn.Linear) -> nn.Conv2d:
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


# --- sites ---------------------------------------------------------------------------------------------------


@dataclass
class Site:
    """A replaceable sub-block: where it is, what kind, and its real token shape."""

    path: str
    kind: str  # "attn" or "mlp"
    tokens: int
    dim: int
    grid: tuple[int, int]
    prefix: int


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def find_sites(model: nn.Module, example: torch.Tensor) -> list[Site]:
    """Every ``blocks.i.attn`` / ``blocks.i.mlp`` of a ViT-like model, with shapes recorded by forward hooks."""
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    shapes: dict[str, torch.Size] = {}
    hooks = []
    for path, module in model.named_modules():
        kind = path.rsplit(".", 1)[-1]
        if kind in ("attn", "mlp") and ".blocks." in f".{path}":
            hooks.append(module.register_forward_hook(lambda m, i, o, p=path: shapes.__setitem__(p, o.shape)))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    if not shapes:
        raise PotpourriError(f"{type(model).__name__} has no blocks.*.attn / blocks.*.mlp sites to replace")
    sites = []
    for path, shape in shapes.items():
        tokens, dim = int(shape[1]), int(shape[2])
        side = math.isqrt(tokens - prefix)
        if side * side != tokens - prefix:
            raise PotpourriError(f"site {path}: {tokens - prefix} patch tokens do not form a square grid")
        sites.append(Site(path, path.rsplit(".", 1)[-1], tokens, dim, (side, side), prefix))
    return sites


class GridChannelNorm(nn.Module):
    """Exact rewrite of a token ``LayerNorm``: a channel norm (timm ``LayerNorm2d``) on the patch grid."""

    def __init__(self, norm: nn.LayerNorm, grid: tuple[int, int], prefix: int):
        super().__init__()
        from timm.layers import LayerNorm2d

        self.grid, self.prefix = grid, prefix
        self.norm = LayerNorm2d(norm.normalized_shape[0], eps=norm.eps)
        self.norm.load_state_dict(norm.state_dict())
        self.prefix_norm = norm if prefix else None  # CLS tokens keep the token LayerNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return on_grid(x, self.grid, self.prefix, self.norm, self.prefix_norm)  # (B, N, C)


def mlp_to_conv(
    model: nn.Module, example: torch.Tensor, *, inplace: bool = False, norms: bool = True
) -> tuple[nn.Module, float]:
    """Exact FC→Conv rewrite of every MLP site (and, with ``norms``, of the LayerNorm before it into a channel
    norm on the grid); returns the new model and the max output difference against the original."""
    new = model if inplace else copy.deepcopy(model)
    for site in find_sites(new, example):
        if site.kind == "mlp":
            _set(new, site.path, ConvMlp(_get(new, site.path), site.grid, site.prefix))
            norm_path = site.path.rsplit(".", 1)[0] + ".norm2"
            if norms and isinstance(_get(new, norm_path), nn.LayerNorm):
                _set(new, norm_path, GridChannelNorm(_get(new, norm_path), site.grid, site.prefix))
    with torch.no_grad():
        diff = float((new.eval()(example) - model.eval()(example)).abs().max())
    return new, diff


# --- candidates per site, local distillation, latency ----------------------------------------------------------


@dataclass
class Candidate:
    """One option for a site: its module, distillation loss (relative MSE) and latency (ms) at the real shape."""

    name: str
    module: nn.Module | None  # None = keep the original sub-block
    loss: float = 0.0
    latency_ms: float = 0.0


def candidate_modules(site: Site, original: nn.Module) -> dict[str, nn.Module]:
    """The candidate library for one site (the original excluded)."""
    dim, grid, prefix = site.dim, site.grid, site.prefix
    library: dict[str, nn.Module] = {
        "modulation_r1_k3": GridOp(ModulationOp(dim, 1, 3), dim, grid, prefix),
        "modulation_r1_k7": GridOp(ModulationOp(dim, 1, 7), dim, grid, prefix),
        "dwconv_mlp_x1": GridOp(DWConvMlp(dim, dim), dim, grid, prefix),
        "drop": DropBranch(),
    }
    if site.kind == "mlp":
        hidden = getattr(getattr(original, "fc1", None), "out_features", 4 * dim)
        library["narrow_mlp_half"] = TokenMlp(dim, max(hidden // 2, 8))
        library["modulation_r4_k7"] = GridOp(ModulationOp(dim, 4, 7), dim, grid, prefix)
    return library


def _cache_site_io(model: nn.Module, sites: Sequence[Site], images: torch.Tensor, batch_size: int):
    """The teacher's (input, output) tokens at every site, for all images."""
    store: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {s.path: ([], []) for s in sites}

    def recorder(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            store[path][0].append(inputs[0].detach())  # a hook that returned a value would replace the output
            store[path][1].append(output.detach())

        return hook

    hooks = [_get(model, s.path).register_forward_hook(recorder(s.path)) for s in sites]
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(images[start : start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
    return {p: (torch.cat(i), torch.cat(o)) for p, (i, o) in store.items()}


def _regress(
    forward: Callable[[torch.Tensor], torch.Tensor],
    params: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    desc: str | None = None,
) -> None:
    """AdamW with a cosine schedule on random mini-batches, minimising MSE(forward(inputs), targets)."""
    if steps <= 0 or not params:
        return
    from potpourri.core.training import Trainer, TrainOptions

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    options = TrainOptions(device="cpu", progress=desc is not None)  # the search is about CPU latency
    trainer = Trainer(
        nn.ParameterList(params), optimizer, total_steps=steps, options=options, schedulers={"cosine": schedule},
        generators={"batches": generator}, desc=desc or "distil",
    )  # fmt: skip
    for _ in trainer.steps():
        index = torch.randint(len(inputs), (min(batch_size, len(inputs)),), generator=generator)
        local, share = trainer.shard(index)  # under torchrun: this process's slice of the batch
        trainer.update(F.mse_loss(forward(inputs[local]), targets[local]) * share)


def distill_locally(
    module: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = 100,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> float:
    """Train ``module`` to map cached inputs to outputs (MSE); returns held-out MSE / target variance."""
    split = max(1, len(inputs) // 5)
    train_x, train_y, val_x, val_y = inputs[split:], targets[split:], inputs[:split], targets[:split]
    module.train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    _regress(module, trainable, train_x, train_y, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    module.eval()
    with torch.no_grad():
        return float(F.mse_loss(module(val_x), val_y) / val_y.var().clamp_min(1e-12))


def distill_globally(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    params: list[nn.Parameter],
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> None:
    """Fine-tune ``params`` of the assembled student so its outputs match the teacher's on ``images`` (MSE)."""
    if steps <= 0 or not params:
        return
    with torch.no_grad():
        targets = torch.cat([teacher(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    student.train()
    _regress(
        student,
        params,
        images,
        targets,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        desc="global distillation",
    )
    student.eval()


def _latency_ms(modules: dict[str, nn.Module], example: torch.Tensor, rounds: int) -> dict[str, float]:
    def runner(module: nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return module(example)

        return call

    timings = interleaved_timings({n: runner(m) for n, m in modules.items()}, rounds=rounds, min_time_s=0.01)
    return {n: float(np.median(v)) * 1e3 for n, v in timings.items()}


# --- selection -------------------------------------------------------------------------------------------------


def choose_under_budget(options: Sequence[Sequence[Candidate]], budget_ms: float) -> list[int]:
    """Pick one option per site minimising total loss with total latency ≤ ``budget_ms`` (sites' share only).

    Exact enumeration when the product of option counts is small, otherwise a mixed-integer program.
    """
    fastest = sum(min(c.latency_ms for c in opts) for opts in options)
    if fastest > budget_ms + 1e-9:
        raise PotpourriError(
            f"latency budget {budget_ms:.2f} ms is below the fastest possible {fastest:.2f} ms for these sites"
        )
    if math.prod(len(o) for o in options) <= 200_000:
        best, best_loss = None, math.inf
        for combo in itertools.product(*(range(len(o)) for o in options)):
            latency = sum(options[s][i].latency_ms for s, i in enumerate(combo))
            loss = sum(options[s][i].loss for s, i in enumerate(combo))
            if latency <= budget_ms + 1e-9 and loss < best_loss - 1e-15:
                best, best_loss = combo, loss
        return list(best)
    return _choose_milp(options, budget_ms)


def _choose_milp(options: Sequence[Sequence[Candidate]], budget_ms: float) -> list[int]:
    from scipy.optimize import Bounds, LinearConstraint, milp

    flat = [(s, i, c) for s, opts in enumerate(options) for i, c in enumerate(opts)]
    cost = np.array([c.loss for _, _, c in flat])
    one_per_site = np.zeros((len(options), len(flat)))
    for k, (s, _, _) in enumerate(flat):
        one_per_site[s, k] = 1
    latency = np.array([[c.latency_ms for _, _, c in flat]])
    constraints = [LinearConstraint(one_per_site, 1, 1), LinearConstraint(latency, -np.inf, budget_ms)]
    result = milp(cost, constraints=constraints, integrality=np.ones(len(flat)), bounds=Bounds(0, 1))
    if not result.success:
        raise PotpourriError(f"no selection fits the latency budget {budget_ms:.2f} ms ({result.message})")
    chosen = [0] * len(options)
    for k, (s, i, _) in enumerate(flat):
        if result.x[k] > 0.5:
            chosen[s] = i
    return chosen


# --- the whole tool --------------------------------------------------------------------------------------------


@dataclass
class ReplacementPlan:
    """What ``auto_replace`` decided: per-site options and choices, and the assembled student."""

    sites: list[Site]
    options: list[list[Candidate]]
    chosen: list[int]
    student: nn.Module
    teacher_ms: float
    student_ms: float
    agreement: float  # held-out images (the first 20 %) where student and teacher predict the same class
    output_rel_error: float  # held-out ‖student − teacher‖ / ‖teacher‖ of the outputs
    rows: list[dict[str, Any]] = field(default_factory=list)


def auto_replace(
    model: nn.Module,
    images: torch.Tensor,
    *,
    budget_ms: float | None = None,
    speedup: float = 1.5,
    steps: int = 100,
    rounds: int = 5,
    batch_size: int = 16,
    seed: int = 0,
    sites: Sequence[str] | None = None,
    global_steps: int = 0,
) -> ReplacementPlan:
    """Replace ViT sub-blocks by cheaper, locally distilled candidates under a latency budget.

    ``budget_ms`` bounds the summed latency of the sites at batch 1 (default: their original total / ``speedup``);
    ``global_steps`` then fine-tunes the new modules of the assembled student against the teacher's outputs.
    Example:
        plan = auto_replace(timm.create_model("deit_tiny_patch16_224"), images, speedup=1.5)
    """
    torch.manual_seed(seed)
    teacher = model.eval()
    all_sites = find_sites(teacher, images[:1])
    chosen_sites = [s for s in all_sites if sites is None or s.path in sites]
    if not chosen_sites:
        raise PotpourriError(f"none of {list(sites or [])} is a site; sites are {[s.path for s in all_sites]}")
    cache = _cache_site_io(teacher, chosen_sites, images, batch_size)
    options: list[list[Candidate]] = []
    for site in tqdm(chosen_sites, desc="sites", unit="site"):
        original = _get(teacher, site.path)
        inputs, outputs = cache[site.path]
        example = inputs[:1]
        library = candidate_modules(site, original)
        # under torchrun rank 0's timings for every process, so all choose the same candidates
        latency = current_group().broadcast_object(_latency_ms({"original": original, **library}, example, rounds))
        site_options = [Candidate("original", None, 0.0, latency["original"])]
        for name, module in library.items():
            loss = distill_locally(module, inputs, outputs, steps=steps, batch_size=batch_size, seed=seed)
            site_options.append(Candidate(name, module, loss, latency[name]))
        options.append(site_options)
    original_total = sum(o[0].latency_ms for o in options)
    budget = budget_ms if budget_ms is not None else original_total / speedup
    chosen = choose_under_budget(options, budget)

    student = copy.deepcopy(teacher)
    rows, new_params = [], []
    for site, site_options, index in zip(chosen_sites, options, chosen, strict=True):
        pick = site_options[index]
        if pick.module is not None:
            _set(student, site.path, copy.deepcopy(pick.module))
            new_params += list(_get(student, site.path).parameters())
        rows.append(
            {
                "site": site.path,
                "chosen": pick.name,
                "local_loss": pick.loss,
                "latency_ms": pick.latency_ms,
                "saved_ms": site_options[0].latency_ms - pick.latency_ms,
            }
        )
    held_out = images[: max(1, len(images) // 5)]  # the same images distill_locally held out
    distill_globally(
        student, teacher, images[len(held_out) :], new_params, steps=global_steps, batch_size=batch_size, seed=seed
    )
    student.eval()
    example = images[:1]
    whole = _latency_ms({"teacher": teacher, "student": student}, example, rounds)
    with torch.no_grad():
        reference, approx = teacher(held_out), student(held_out)
    agree = float((reference.argmax(-1) == approx.argmax(-1)).float().mean())
    rel_error = float((approx - reference).norm() / reference.norm().clamp_min(1e-12))
    return ReplacementPlan(
        chosen_sites, options, chosen, student, whole["teacher"], whole["student"], agree, rel_error, rows
    )
