"""FasterViT (Hatamizadeh et al., "FasterViT: Fast Vision Transformers with Hierarchical Attention", ICLR 2024).

A conv stem (two strided 3×3 conv-BN-ReLU, 1/4 resolution), two conv stages, then two transformer stages of
hierarchical attention (HAT) blocks over 7×7 windows. In a HAT stage, a few *carrier tokens* per window summarise
it: they are initialised once per stage (depthwise 3×3 conv + an overlapping average pool), attend to each other
globally with their own position bias, and are then prepended to their window's tokens for local attention.
Downsampling (LayerNorm2d + strided 3×3 conv, channels ×2) sits at the *end* of stages 1–3.

Parameter and buffer names equal the ``fastervit`` package's (``levels.2.blocks.0.hat_attn.qkv.weight``, ...),
so its state dict loads into ours with ``strict=True``. Unlike the package, geometry is derived from the input at
run time: maps are zero-padded to window multiples (as ``faster_vit_any_res`` does), the window shrinks to the map
when the map is smaller than one window (64 px inputs work), and the position-bias MLPs are evaluated for the
actual grid; at the construction size (224 px) every step is the package's.

Length: one model family in the timm layout (blocks → model → variants); parity with the ``fastervit`` package
is easier to audit in one file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_

from potpourri.core.registry import register_model
from potpourri.models._base import ClassifierMixin

__all__ = [
    "FasterViT",
    "FasterViTCfg",
    "carrier_pool_geometry",
    "faster_vit_0",
    "faster_vit_1",
    "faster_vit_2",
]

CPB_HIDDEN = 512  # width of the position-bias MLPs (2 → 512 → heads / dim)


# --------------------------------------------------------------------------------------------------- geometry
def carrier_pool_geometry(size: int, window: int, ct_size: int) -> tuple[int, int, int]:
    """``(output, stride, kernel)`` of the carrier-token average pool along one axis of a ``size``-long map.

    Example:
        carrier_pool_geometry(14, 7, 2) == (4, 3, 5)  # overlapping windows: not a per-window mean
    """
    output = int(ct_size * size / window)
    stride = int(size / output)
    kernel = size - (output - 1) * stride
    return output, stride, kernel


class Grid(NamedTuple):
    """Window layout of one HAT stage: square ``window``, ``rows × cols`` windows, ``ct_size²`` CTs per window."""

    window: int
    rows: int
    cols: int
    ct_size: int

    @property
    def num_windows(self) -> int:
        return self.rows * self.cols

    @property
    def ct_grid(self) -> tuple[int, int]:
        return self.rows * self.ct_size, self.cols * self.ct_size


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B·nW, window², C)``, windows in row-major order."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // window, window, W // window, window)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """``(B·nW, window², C)`` → ``(B, C, H, W)``; inverse of :func:`window_partition`."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, C, H, W)


def _log_relative_coords(rows: int, cols: int) -> torch.Tensor:
    """SwinV2 log-spaced relative offsets of a ``rows × cols`` grid, ``(1, 2rows-1, 2cols-1, 2)``, |·| ≤ log₈ 9."""
    dh = torch.arange(-(rows - 1), rows, dtype=torch.float32) / max(rows - 1, 1)  # max(): a 1-wide grid has no offset
    dw = torch.arange(-(cols - 1), cols, dtype=torch.float32) / max(cols - 1, 1)
    table = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), dim=-1).unsqueeze(0) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def _relative_position_index(rows: int, cols: int) -> torch.Tensor:
    """Index into the ``(2rows-1)·(2cols-1)`` offset table for every token pair, ``(rows·cols, rows·cols)``."""
    coords = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")).flatten(1)  # (2, N)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    return (relative[..., 0] + rows - 1) * (2 * cols - 1) + relative[..., 1] + cols - 1


def _centred_coords(rows: int, cols: int) -> torch.Tensor:
    """Absolute positions of a ``rows × cols`` grid centred and scaled to about [-1, 1], ``(1, rows·cols, 2)``."""
    h = (torch.arange(rows, dtype=torch.float32) - rows // 2) / max(rows // 2, 1)
    w = (torch.arange(cols, dtype=torch.float32) - cols // 2) / max(cols // 2, 1)
    return torch.stack(torch.meshgrid(h, w, indexing="ij"), dim=-1).reshape(1, rows * cols, 2)


# ----------------------------------------------------------------------------------------- position encodings
class _CachedPosition(nn.Module):
    """Loading weights leaves deploy mode: a cache from a checkpoint may belong to other MLP weights."""

    deploy: bool

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.deploy = False


class ContinuousPositionBias(_CachedPosition):
    """SwinV2 attention bias ``16·sigmoid(MLP(log offsets))`` over a grid, zero for prepended carrier tokens.

    ``reparameterize()`` caches the bias of the construction grid in ``relative_bias`` (deploy mode).
    """

    def __init__(self, num_heads: int, grid: tuple[int, int], *, num_carrier: int = 0):
        super().__init__()
        self.num_heads, self.grid, self.num_carrier = num_heads, grid, num_carrier
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, CPB_HIDDEN), nn.ReLU(inplace=True), nn.Linear(CPB_HIDDEN, num_heads, bias=False)
        )
        self.register_buffer("relative_coords_table", _log_relative_coords(*grid))
        self.register_buffer("relative_position_index", _relative_position_index(*grid))
        seq = grid[0] * grid[1] + num_carrier
        self.register_buffer("relative_bias", torch.zeros(1, num_heads, seq, seq))
        self.deploy = False

    def _compute(self, grid: tuple[int, int], num_carrier: int) -> torch.Tensor:
        if grid == self.grid:
            table, index = self.relative_coords_table, self.relative_position_index
        else:
            like = self.relative_coords_table
            table = _log_relative_coords(*grid).to(device=like.device, dtype=like.dtype)
            index = _relative_position_index(*grid).to(like.device)
        n = grid[0] * grid[1]
        bias = self.cpb_mlp(table).view(-1, self.num_heads)[index.view(-1)].view(n, n, self.num_heads)
        bias = 16 * torch.sigmoid(bias.permute(2, 0, 1))  # (heads, n, n)
        return F.pad(bias, (num_carrier, 0, num_carrier, 0)).unsqueeze(0)  # (1, heads, n + L, n + L)

    def forward(self, grid: tuple[int, int], num_carrier: int) -> torch.Tensor:
        if self.deploy and grid == self.grid and num_carrier == self.num_carrier:
            return self.relative_bias
        return self._compute(grid, num_carrier)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Cache the construction-grid bias; the MLP is no longer run for that grid. Idempotent."""
        self.relative_bias.copy_(self._compute(self.grid, self.num_carrier))
        self.deploy = True


class PositionEmbedding(_CachedPosition):
    """Absolute position embedding ``x + MLP(centred grid coords)`` added to a grid of tokens."""

    def __init__(self, dim: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.cpb_mlp = nn.Sequential(nn.Linear(2, CPB_HIDDEN), nn.ReLU(), nn.Linear(CPB_HIDDEN, dim, bias=False))
        self.register_buffer("relative_bias", torch.zeros(1, grid[0] * grid[1], dim))
        self.deploy = False

    def _compute(self, grid: tuple[int, int]) -> torch.Tensor:
        coords = _centred_coords(*grid).to(device=self.relative_bias.device, dtype=self.relative_bias.dtype)
        return self.cpb_mlp(coords)  # (1, N, C)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.deploy and grid == self.grid:
            return x + self.relative_bias  # (B, N, C)
        return x + self._compute(grid)  # (B, N, C)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Cache the construction-grid embedding. Idempotent."""
        self.relative_bias.copy_(self._compute(self.grid))
        self.deploy = True


# --------------------------------------------------------------------------------------------------- blocks
class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` on the last dimension."""

    def __init__(self, dim: int, hidden: int, *, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))  # (..., C)


class WindowAttention(nn.Module):
    """Multi-head self-attention with a continuous position bias over a token grid (plus prepended CTs)."""

    def __init__(
        self, dim: int, num_heads: int, grid: tuple[int, int], *, num_carrier: int = 0, attn_drop: float = 0.0
    ):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.pos_emb_funct = ContinuousPositionBias(num_heads, grid, num_carrier=num_carrier)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_carrier: int = 0) -> torch.Tensor:
        B, N, C = x.shape
        bias = self.pos_emb_funct(grid, num_carrier)  # (1, heads, N, N), N = num_carrier + grid tokens
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


def _layer_scale(dim: int, value: float | None) -> nn.Parameter | None:
    return nn.Parameter(torch.full((dim,), float(value))) if value is not None else None


def _scaled(x: torch.Tensor, gamma: nn.Parameter | None) -> torch.Tensor:
    return x if gamma is None else gamma * x


class ConvBlock(nn.Module):
    """``x + drop_path(γ · BN(conv3x3(GELU(BN(conv3x3(x))))))`` (stages 1–2)."""

    def __init__(self, dim: int, *, drop_path: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(dim)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.gamma = _layer_scale(dim, layer_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))  # (B, C, H, W)
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)


class HAT(nn.Module):
    """Hierarchical attention block: CT attention + MLP, then window attention + MLP over ``cat(ct, window)``.

    Without carrier tokens (``carrier=False``) this is a plain windowed transformer block with position bias.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: Grid,
        *,
        carrier: bool,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        propagate: bool = False,
    ):
        super().__init__()
        window, ct_per_window = grid.window, grid.ct_size**2 if carrier else 0
        hidden = int(dim * mlp_ratio)
        self.carrier, self.propagate = carrier, propagate
        self.pos_embed = PositionEmbedding(dim, (window, window))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, (window, window), num_carrier=ct_per_window, attn_drop=attn_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden, drop=drop)
        self.gamma3, self.gamma4 = _layer_scale(dim, layer_scale), _layer_scale(dim, layer_scale)
        if carrier:
            self.hat_norm1 = nn.LayerNorm(dim)
            self.hat_norm2 = nn.LayerNorm(dim)
            self.hat_attn = WindowAttention(dim, num_heads, grid.ct_grid, attn_drop=attn_drop)
            self.hat_mlp = Mlp(dim, hidden, drop=drop)
            self.hat_drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
            self.hat_pos_embed = PositionEmbedding(dim, grid.ct_grid)
            self.gamma1, self.gamma2 = _layer_scale(dim, layer_scale), _layer_scale(dim, layer_scale)

    def _carrier_step(self, ct: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Global attention among all CTs: window order ``(B, nW·L, C)`` → per-window ``(B·nW, L, C)``."""
        B, _, C = ct.shape
        c, (ct_rows, ct_cols) = grid.ct_size, grid.ct_grid
        ct = ct.view(B, grid.rows, grid.cols, c, c, C).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, C)  # raster order
        ct = self.hat_pos_embed(ct, (ct_rows, ct_cols))
        ct = ct + self.hat_drop_path(_scaled(self.hat_attn(self.hat_norm1(ct), (ct_rows, ct_cols)), self.gamma1))
        ct = ct + self.hat_drop_path(_scaled(self.hat_mlp(self.hat_norm2(ct)), self.gamma2))
        ct = ct.view(B, grid.rows, c, grid.cols, c, C).permute(0, 1, 3, 2, 4, 5)  # (B, rows, cols, c, c, C)
        return ct.reshape(B * grid.num_windows, c * c, C)

    def forward(
        self, x: torch.Tensor, carrier_tokens: torch.Tensor | None, grid: Grid, *, last: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        BW, _, C = x.shape  # (B·nW, window², C)
        T, L = grid.window**2, grid.ct_size**2 if self.carrier else 0  # Python ints: static under tracing
        x = self.pos_embed(x, (grid.window, grid.window))
        if self.carrier:
            B = carrier_tokens.shape[0]
            ct = self._carrier_step(carrier_tokens, grid)  # (B·nW, L, C)
            x = torch.cat((ct, x), dim=1)  # (B·nW, L + window², C)
        x = x + self.drop_path(_scaled(self.attn(self.norm1(x), (grid.window, grid.window), L), self.gamma3))
        x = x + self.drop_path(_scaled(self.mlp(self.norm2(x)), self.gamma4))
        if not self.carrier:
            return x, None
        ct, x = x.split([L, T], dim=1)  # (B·nW, L, C), (B·nW, window², C)
        if last and self.propagate:  # each window's CTs, upsampled (nearest), are added to its tokens
            ct_map = ct.transpose(1, 2).reshape(BW, C, grid.ct_size, grid.ct_size)
            ct_map = F.interpolate(ct_map, size=(grid.window, grid.window), mode="nearest")
            x = x + _scaled(ct_map.flatten(2).transpose(1, 2), self.gamma1)
        return x, ct.reshape(B, -1, C)  # CTs back in window order (B, nW·L, C)


class TokenInitializer(nn.Module):
    """Carrier tokens from a stage input: depthwise 3×3 conv, overlapping average pool, regroup per window."""

    def __init__(self, dim: int, grid: Grid, size: tuple[int, int]):
        super().__init__()
        self.ct_size = grid.ct_size
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        (_, s_h, k_h), (_, s_w, k_w) = (carrier_pool_geometry(n, grid.window, grid.ct_size) for n in size)
        # `pos` is shared with `pos_embed`: both names are in the package's state dict
        self.to_global_feature = nn.Sequential()
        self.to_global_feature.add_module("pos", self.pos_embed)
        self.to_global_feature.add_module("pool", nn.AvgPool2d((k_h, k_w), (s_h, s_w)))

    def forward(self, x: torch.Tensor, window: int) -> torch.Tensor:
        B, (C, H, W) = x.shape[0], map(int, x.shape[1:])  # padded to window multiples; static under tracing
        (o_h, s_h, k_h), (o_w, s_w, k_w) = (carrier_pool_geometry(n, window, self.ct_size) for n in (H, W))
        x = F.avg_pool2d(self.pos_embed(x), (k_h, k_w), (s_h, s_w))  # (B, C, rows·c, cols·c)
        c, rows, cols = self.ct_size, o_h // self.ct_size, o_w // self.ct_size
        x = x.view(B, C, rows, c, cols, c).permute(0, 2, 4, 3, 5, 1)  # (B, rows, cols, c, c, C)
        return x.reshape(B, -1, C)  # (B, nW·c², C) in window order


class Downsample(nn.Module):
    """LayerNorm2d then a strided 3×3 conv without bias that doubles the channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(x))  # (B, 2C, H/2, W/2)


class PatchEmbed(nn.Module):
    """Stem: two strided 3×3 conv-BN-ReLU, to 1/4 resolution."""

    def __init__(self, in_chans: int, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Identity()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_down(x)  # (B, dim, H/4, W/4)


class FasterViTLayer(nn.Module):
    """One stage: conv blocks or HAT blocks (with a carrier-token initialiser), then optional downsampling."""

    def __init__(
        self,
        dim: int,
        depth: int,
        *,
        conv: bool,
        size: int,
        num_heads: int,
        window: int,
        ct_size: int,
        hat: bool,
        drop_paths: list[float],
        downsample: bool,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        layer_scale: float | None = None,
        layer_scale_conv: float | None = None,
        do_propagation: bool = False,
    ):
        super().__init__()
        self.conv, self.window, self.ct_size = conv, window, ct_size
        windows = -(-size // window)  # per side, after padding to a window multiple
        # CTs exist when the construction-size map holds more than one window (the package's rule)
        self.do_gt = not conv and hat and windows > 1
        if conv:
            self.blocks = nn.ModuleList(
                [ConvBlock(dim, drop_path=dp, layer_scale=layer_scale_conv) for dp in drop_paths[:depth]]
            )
        else:
            grid = Grid(window, windows, windows, ct_size)
            self.blocks = nn.ModuleList(
                [
                    HAT(
                        dim,
                        num_heads,
                        grid,
                        carrier=self.do_gt,
                        mlp_ratio=mlp_ratio,
                        drop=drop,
                        attn_drop=attn_drop,
                        drop_path=dp,
                        layer_scale=layer_scale,
                        propagate=do_propagation,
                    )
                    for dp in drop_paths[:depth]
                ]
            )
        self.downsample = Downsample(dim) if downsample else None
        if self.do_gt:
            self.global_tokenizer = TokenInitializer(dim, grid, (windows * window, windows * window))

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's blocks without the downsampling: ``(B, C, H, W)`` → ``(B, C, H, W)``."""
        if self.conv:
            for block in self.blocks:
                x = block(x)
            return x
        H, W = int(x.shape[-2]), int(x.shape[-1])  # Python ints: geometry stays static under ONNX tracing
        window = min(self.window, max(H, W))  # a map smaller than one window is one (smaller) window
        pad_b, pad_r = (-H) % window, (-W) % window
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))  # zero padding, as faster_vit_any_res
        Hp, Wp = H + pad_b, W + pad_r
        grid = Grid(window, Hp // window, Wp // window, self.ct_size)
        ct = self.global_tokenizer(x, window) if self.do_gt else None  # (B, nW·L, C)
        x = window_partition(x, window)  # (B·nW, window², C)
        for i, block in enumerate(self.blocks):
            x, ct = block(x, ct, grid, last=i == len(self.blocks) - 1)
        x = window_reverse(x, window, Hp, Wp)  # (B, C, Hp, Wp)
        return x[:, :, :H, :W].contiguous() if pad_b or pad_r else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)  # (B, 2C, H/2, W/2) unless last


# ---------------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class FasterViTCfg:
    """One FasterViT variant (the package's ``faster_vit_*_224`` arguments)."""

    dim: int
    in_dim: int
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    window_size: tuple[int, int, int, int] = (7, 7, 7, 7)
    ct_size: int = 2
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    layer_scale: float | None = None
    layer_scale_conv: float | None = None
    hat: tuple[bool, bool, bool, bool] = (False, False, True, False)
    do_propagation: bool = False
    layer_norm_last: bool = False


class FasterViT(ClassifierMixin, nn.Module):
    """FasterViT backbone + classifier with timm's contract; ``reparameterize()`` caches position biases.

    Example:
        model = FasterViT(CONFIGS["0"]).eval().reparameterize()
    """

    def __init__(
        self,
        cfg: FasterViTCfg,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = cfg.dim * 2 ** (len(cfg.depths) - 1)
        self.patch_embed = PatchEmbed(in_chans, cfg.in_dim, cfg.dim)
        rate = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        schedule = torch.linspace(0, rate, sum(cfg.depths), device="cpu").tolist()  # stochastic depth grows with depth
        self.levels = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(cfg.depths):
            dim, start = cfg.dim * 2**i, sum(cfg.depths[:i])
            self.levels.append(
                FasterViTLayer(
                    dim,
                    depth,
                    conv=i < 2,
                    size=img_size // 2 ** (i + 2),
                    num_heads=cfg.num_heads[i],
                    window=cfg.window_size[i],
                    ct_size=cfg.ct_size,
                    hat=cfg.hat[i],
                    drop_paths=schedule[start : start + depth],
                    downsample=i < len(cfg.depths) - 1,
                    mlp_ratio=cfg.mlp_ratio,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    layer_scale=cfg.layer_scale,
                    layer_scale_conv=cfg.layer_scale_conv,
                    do_propagation=cfg.do_propagation,
                )
            )
            # dense features are taken before the stage's downsampling
            self.feature_info.append({"num_chs": dim, "reduction": 4 * 2**i, "module": f"levels.{i}"})
        self.norm = LayerNorm2d(self.num_features) if cfg.layer_norm_last else nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm | nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of each stage before its downsampling, for dense tasks: strides 4, 8, 16, 32."""
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))  # (B, dim, H/4, W/4)
        outputs = []
        for level in self.levels:
            x = level.forward_blocks(x)
            outputs.append(x)  # (B, Ci, H/s, W/s)
            if level.downsample is not None:
                x = level.downsample(x)
        return outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last convs are ~5-10 % faster on CPU (oneDNN); window partitioning then reads NHWC memory
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))  # (B, dim, H/4, W/4)
        for level in self.levels:
            x = level(x)
        return self.norm(x)  # (B, 8·dim, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean((2, 3)))  # (B, C)
        return x if pre_logits else self.head(x)

    def reparameterize(self) -> FasterViT:
        """Deploy mode: cache every MLP-generated position bias/embedding of the construction grid (idempotent).

        Loading a state dict leaves deploy mode again; call this after loading weights.
        """
        for module in self.modules():
            if isinstance(module, ContinuousPositionBias | PositionEmbedding):
                module.reparameterize()
        return self

    switch_to_deploy = reparameterize


# The package's configurations (faster_vit_{0..3}_224): 31.4 M, 53.4 M, 75.9 M, 159.5 M parameters. "3" is not
# registered (every registered model is built, trained and exported in the suite; 159.5 M costs ~20 s there):
# build it with FasterViT(CONFIGS["3"]).
CONFIGS = {
    "0": FasterViTCfg(dim=64, in_dim=64, depths=(2, 3, 6, 5), num_heads=(2, 4, 8, 16)),
    "1": FasterViTCfg(dim=80, in_dim=32, depths=(1, 3, 8, 5), num_heads=(2, 4, 8, 16)),
    "2": FasterViTCfg(dim=96, in_dim=64, depths=(3, 3, 8, 5), num_heads=(2, 4, 8, 16)),
    "3": FasterViTCfg(
        dim=128,
        in_dim=64,
        depths=(3, 3, 12, 5),
        num_heads=(2, 4, 8, 16),
        drop_path_rate=0.3,
        layer_scale=1e-5,
        do_propagation=True,
    ),
}


def _build(variant: str, pretrained: bool, **kwargs: Any) -> FasterViT:
    # no pretrained_cfg is registered, so create_model refuses pretrained=True before we get here
    return FasterViT(CONFIGS[variant], **kwargs)


@register_model(tags=("efficient", "hybrid"))
def faster_vit_0(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-0: 31.4 M params, 82.1 % ImageNet top-1 in the paper."""
    return _build("0", pretrained, **kwargs)


@register_model(tags=("efficient", "hybrid"))
def faster_vit_1(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-1: 53.4 M params, 83.2 % ImageNet top-1 in the paper."""
    return _build("1", pretrained, **kwargs)


@register_model(tags=("efficient", "hybrid"))
def faster_vit_2(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-2: 75.9 M params, 84.2 % ImageNet top-1 in the paper."""
    return _build("2", pretrained, **kwargs)
