"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic learnable prompts for zero-shot anomaly detection.

Reading order: the glocal losses → (V-V "diagonally prominent" attention and the dual-path image forward on an
open_clip ViT: ``models.dpam``) → learnable object-agnostic prompts with deep text tokens → the open_clip towers (their
loader: ``models.open_clip_loader``) → the prompt-training loop → config and the ``AnomalyCLIP`` method (fit on
auxiliary categories, score unseen ones).

What matches the reference repo (``zqhang/AnomalyCLIP``): ``[V1..V12] object.`` / ``[W1..W12] damaged object.``
prompts initialised N(0, 0.02); learnable tokens replacing positions 1..4 of text layers 1..depth-1; a dual path in
the last blocks whose V-V branch attends with q = k = v computed from the original path and skips the FFN; patch
maps from several layers (softmax over {normal, anomalous} at temperature 0.07, bilinear upsampling, summed over
layers, Gaussian σ=4); image score = softmax of the global embedding against the two prompts; loss =
4 · Σ_layers [focal + dice(p_abn, gt) + dice(p_norm, 1-gt)] + cross-entropy; Adam(1e-3, betas 0.5/0.999), batch 8.
Departures: the global embedding goes through ``ln_post`` exactly as vanilla open_clip does (the repo skips it;
its issue #14 reports no difference), the model's native input size is used (no positional-embedding
interpolation to 518), and intermediate maps are computed without in-place updates (the repo's issues #18/#64).
No real CLIP weights exist offline: ``--towers standin`` (``anomalyclip_standin.py``) is the measured variant.

Length: one method (prompts, DPAM, losses, training, the InspectionMethod) read top to bottom; the towers and the
stand-in are already apart (``towers``, ``anomalyclip_standin``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from potpourri.core.distributed import ProcessGroup
from potpourri.core.errors import PotpourriError
from potpourri.core.imaging import ImageInput, as_rgb
from potpourri.inspect.base import InspectionMethod
from potpourri.inspect.towers import OBJECT_PROMPTS, PromptLearner, Towers, replace_prefix
from potpourri.models.dpam import dual_path_image_features, vv_attention, vv_attention_logits  # re-exported
from potpourri.models.layers import dice_loss, multiclass_focal_loss
from potpourri.models.open_clip_loader import (  # the one loader; its names stay importable from here
    build_clip_from_config,
    load_open_clip,
    open_clip_module,
    open_clip_tokenizer,
)

OWN_CLIP = "clip_vit_tiny_minilm"  # --clip with this name: our own CLIP-style model (--clip-weights RUN_FOLDER)

__all__ = [
    "METHOD",
    "AnomalyCLIP",
    "AnomalyCLIPConfig",
    "ClipTowers",
    "build_clip_from_config",
    "dual_path_image_features",
    "glocal_loss",
    "load_open_clip",
    "train_prompts",
    "vv_attention",
    "vv_attention_logits",
]


# ----------------------------------------------------------------------------------------------- losses
def glocal_loss(
    image_logits: torch.Tensor,
    labels: torch.Tensor,
    layer_probs: Sequence[torch.Tensor],
    masks: torch.Tensor,
    *,
    local_weight: float = 4.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """AnomalyCLIP's loss: local_weight · Σ_layers (focal + 2 Dice terms) on maps + cross-entropy on image logits.

    ``layer_probs``: per layer (B, 2, H, W) softmax maps (channel 0 normal, 1 anomalous); ``masks`` (B, H, W) 0/1.
    """
    local = image_logits.new_zeros(())
    for probs in layer_probs:
        local = (
            local
            + multiclass_focal_loss(probs, masks)
            + dice_loss(probs[:, 1], masks)
            + dice_loss(probs[:, 0], 1 - masks)
        )
    image = F.cross_entropy(image_logits, labels.long())
    total = local_weight * local + image
    return total, {"loss": total.item(), "local": local.item(), "image": image.item()}


class ClipTowers(Towers):
    """A frozen open_clip model with the dual-path image forward and a prompt-learned text forward.

    Implements the towers contract shared with the stand-in: ``frozen_image_features`` / ``project_image`` /
    ``prompt_text_features`` / ``encode_texts`` / ``window_embeddings`` / ``trainable``.
    Example:
        towers = ClipTowers(load_open_clip("ViT-B-16", "ViT-B-16.safetensors"), model_name="ViT-B-16")
    """

    def __init__(
        self,
        clip: nn.Module,
        *,
        model_name: str | None = None,
        n_ctx: int = 12,
        depth: int = 9,
        deep_length: int = 4,
        dual_from: int | None = None,
        feature_layers: Sequence[int] = (),
        tokenizer: Callable | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        open_clip = open_clip_module()
        visual = getattr(clip, "visual", None)
        if not hasattr(visual, "transformer") or not hasattr(visual, "grid_size"):
            raise PotpourriError("AnomalyCLIP needs an open_clip ViT image tower (not ResNet or timm towers)")
        from open_clip.transformer import ResidualAttentionBlock

        if not all(isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks):
            raise PotpourriError("AnomalyCLIP's V-V path needs open_clip's default attention blocks (block_type)")
        self.clip = clip.eval().requires_grad_(False)
        self.text = clip.text if hasattr(clip, "text") else clip  # CustomTextCLIP keeps its text tower apart
        if getattr(self.text, "cls_emb", None) is not None:
            raise PotpourriError("text towers with a class embedding (CoCa) are not supported by AnomalyCLIP")
        n_visual = len(visual.transformer.resblocks)
        n_text = len(self.text.transformer.resblocks)
        self.dual_from = dual_from or max(1, n_visual // 4)  # ViT-L/14: 6, i.e. the repo's DPAM_layer=20
        self.feature_layers = tuple(feature_layers) or tuple(sorted({max(1, n_visual * q // 4) for q in (1, 2, 3, 4)}))
        if not all(1 <= layer <= n_visual for layer in self.feature_layers):
            raise PotpourriError(f"feature layers {self.feature_layers} must lie in 1..{n_visual}")
        width = self.text.token_embedding.weight.shape[1]
        self.prompts = PromptLearner(width, n_ctx=n_ctx, depth=min(depth, n_text), deep_length=deep_length, seed=seed)
        self.tokenizer = tokenizer or open_clip_tokenizer(clip, model_name)
        placeholder = " ".join(["X"] * n_ctx)
        ids = self.tokenizer([f"{placeholder} {name}" for name in OBJECT_PROMPTS])  # (2, T)
        self.register_buffer("prompt_ids", ids, persistent=False)
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self.image_size = int(visual.image_size[0])

    @torch.no_grad()
    def frozen_image_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the frozen image tower contributes: global (B, D) and per-layer V-V patch maps (B, h, w, D)."""
        global_embedding, maps = dual_path_image_features(
            self.clip.visual, images, dual_from=self.dual_from, layers=self.feature_layers
        )
        return {"global": global_embedding, **{f"layer{i}": m for i, m in enumerate(maps)}}

    def project_image(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(global (B, D), [patch maps (B, h, w, D)]) in the joint space; CLIP needs no bridge."""
        return features["global"], [features[f"layer{i}"] for i in range(len(self.feature_layers))]

    def prompt_text_features(self) -> torch.Tensor:
        """Text embeddings (2, D) of the learned normal / anomalous prompts, deep tokens included."""
        text, ids = self.text, self.prompt_ids
        x = self.prompts.insert(text.token_embedding(ids)) + text.positional_embedding[: ids.shape[1]]  # (2, T, W)
        attn_mask = text.attn_mask[: ids.shape[1], : ids.shape[1]] if text.attn_mask is not None else None
        for index, block in enumerate(text.transformer.resblocks):
            x = block(replace_prefix(x, self.prompts.deep_tokens(index)), attn_mask=attn_mask)
        x = text.ln_final(x)
        from open_clip.transformer import text_global_pool

        pooled = text_global_pool(x, ids, text.text_pool_type if text is self.clip else text.pool_type, **_eos(text))
        projection = text.text_projection
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection  # (2, D)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Frozen embeddings (N, D) of hand-written sentences."""
        return self.clip.encode_text(self.tokenizer(list(texts)))

    @torch.no_grad()
    def window_embeddings(self, images: torch.Tensor, scale: int) -> torch.Tensor:
        """WinCLIP window embeddings (B, h-k+1, w-k+1, D): the class token run over each k×k window of patches only."""
        visual = self.clip.visual
        gh, gw = visual.grid_size
        if not 1 <= scale <= min(gh, gw):
            raise PotpourriError(f"window scale {scale} must be in 1..{min(gh, gw)} patches")
        x = visual._embeds(images)  # (B, 1+N, W)
        b, width = x.shape[0], x.shape[-1]
        grid = torch.arange(gh * gw).view(gh, gw)
        windows = grid.unfold(0, scale, 1).unfold(1, scale, 1).reshape(-1, scale * scale)  # (n_win, k*k)
        out = []
        for chunk in windows.split(256):
            tokens = torch.cat(
                [x[:, :1].expand(-1, chunk.shape[0], -1).unsqueeze(2), x[:, 1 + chunk]], dim=2
            )  # (B, n, 1+k*k, W)
            pooled, _ = visual._pool(visual.transformer(tokens.reshape(-1, tokens.shape[2], width)))
            out.append((pooled @ visual.proj).view(b, chunk.shape[0], -1))
        return torch.cat(out, 1).view(b, gh - scale + 1, gw - scale + 1, -1)


def _eos(text: nn.Module) -> dict[str, Any]:
    eos = getattr(text, "text_eos_id", None) or getattr(text, "eos_id", None)
    return {"eos_token_id": eos}


# ----------------------------------------------------------------------------------------------- training
def layer_probabilities(
    patch_maps: Sequence[torch.Tensor], text: torch.Tensor, size: int, temperature: float
) -> list[torch.Tensor]:
    """Per layer: softmax over {normal, anomalous} of patch·text/τ, bilinearly upsampled: (B, 2, S, S)."""
    text = F.normalize(text, dim=-1)
    out = []
    for patches in patch_maps:
        logits = F.normalize(patches, dim=-1) @ text.T / temperature  # (B, h, w, 2)
        probs = logits.softmax(-1).permute(0, 3, 1, 2)  # (B, 2, h, w)
        out.append(F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False))
    return out


def image_logits(global_embedding: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Image-level logits (B, 2) of the global embedding against the normal / anomalous text."""
    return F.normalize(global_embedding, dim=-1) @ F.normalize(text, dim=-1).T / temperature


def batched_features(
    towers: nn.Module, tensors: torch.Tensor, batch_size: int, *, group: ProcessGroup | None = None
) -> dict[str, torch.Tensor]:
    """``towers.frozen_image_features`` of ``tensors`` in batches; with a ``group`` of several processes each runs its
    block of the batches one process would run, and every process gets all of them (gathered in order)."""
    from tqdm.auto import tqdm

    first, stop = 0, len(tensors)
    sharded = group is not None and group.distributed and -(-len(tensors) // batch_size) >= group.world
    if sharded:
        first, stop = group.batch_block(len(tensors), batch_size)
    parts: list[dict[str, torch.Tensor]] = []
    for start in tqdm(range(first, stop, batch_size), desc="frozen features", unit="batch", leave=False):
        parts.append(towers.frozen_image_features(tensors[start : min(start + batch_size, stop)]))
    features = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if sharded:  # the blocks in rank order are the whole set in order
        features = {k: torch.cat(group.all_gather(v.contiguous())) for k, v in features.items()}
    return features


def train_prompts(
    towers: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    *,
    text_fn: Callable[[], torch.Tensor] | None = None,
    params: Sequence[nn.Parameter] | None = None,
    features: dict[str, torch.Tensor] | None = None,
    epochs: int = 15,
    batch_size: int = 8,
    lr: float = 1e-3,
    local_weight: float = 4.0,
    temperature: float = 0.07,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Train ``towers.trainable`` with the glocal loss on labelled auxiliary data; returns per-epoch mean losses.

    ``images`` (N, 3, S, S) normalised, ``masks`` (N, S, S) 0/1, ``labels`` (N,). The frozen image features are
    computed once (the image tower never changes). ``text_fn`` gives the (2, D) text (default: the learned
    prompts), ``params`` what to optimise (default: ``towers.trainable``) and ``features`` precomputed
    ``frozen_image_features`` of ``images`` (then ``images`` only sets the count). Under torchrun each process
    trains on its slice of every batch (a batch shorter than the process count runs whole in each) and embeds
    its block of the images.
    """
    from tqdm.auto import tqdm

    text_fn = text_fn or towers.prompt_text_features
    params = list(params) if params is not None else towers.trainable
    if not params:
        raise PotpourriError("nothing to train: these towers have no trainable parameters")
    from potpourri.core.training import Trainer, TrainOptions

    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))
    generator = torch.Generator().manual_seed(seed)
    batches = -(-len(labels) // batch_size)
    trainer = Trainer(
        nn.ParameterList(params), optimizer, total_steps=epochs * batches, params=list(params),
        options=TrainOptions(device="cpu", progress=False), generators={"order": generator}, desc="prompt training",
    )  # fmt: skip
    # under torchrun each process embeds its block of the images, and all of them train on the whole set
    features = features if features is not None else batched_features(towers, images, batch_size, group=trainer.group)
    size = masks.shape[-1]
    history = []
    for _ in tqdm(range(epochs), desc="prompt training", unit="epoch", leave=False):
        order = torch.randperm(len(labels), generator=generator)
        sums: dict[str, float] = {}
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            rows, share = index, 1.0
            if trainer.group.distributed and len(index) >= trainer.group.world:  # a short last batch: all of it
                # every term (focal per pixel, Dice per image, CE) is a mean over equal-sized images: shares add up
                rows, share = trainer.shard(index)
            global_embedding, patch_maps = towers.project_image({k: v[rows] for k, v in features.items()})
            text = text_fn()  # (2, D)
            probs = layer_probabilities(patch_maps, text, size, temperature)
            loss, parts = glocal_loss(
                image_logits(global_embedding, text, temperature),
                labels[rows],
                probs,
                masks[rows].float(),
                local_weight=local_weight,
            )
            if trainer.group.distributed:  # the global batch's parts: the mean of the processes' shares
                sums_now = trainer.sums_over_processes({k: v * share for k, v in parts.items()})
                parts = {k: v / trainer.group.world for k, v in sums_now.items()}
            trainer.update(loss * share)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(index)
        history.append({k: v / len(labels) for k, v in sums.items()})
    return history


# ----------------------------------------------------------------------------------------------- method
@dataclass
class AnomalyCLIPConfig:
    """Everything that defines an AnomalyCLIP model (saved in ``metadata.json``)."""

    # "standin" (Lite0 + MiniLM + bridge), "open_clip" (clip_model + clip_weights) or "own" (clip_weights = a
    # `reproduce clip-small` model folder: our ViT + MiniLM trained on DS-Synth brick/grass/gravel + clutter)
    towers: str = "standin"
    clip_model: str | None = None  # open_clip architecture name, or a .json model config
    clip_weights: str | None = None  # local open_clip checkpoint
    aux_data: tuple[str, ...] = ()  # labelled auxiliary sets, e.g. ("ds-synth:brick", "ds-synth:gravel")
    image_size: int = 224  # stand-in input size; open_clip uses the model's own size
    n_ctx: int = 12
    depth: int = 9  # text layers that get prompts: layer 0 the context vectors, layers 1..depth-1 deep tokens
    deep_length: int = 4
    dual_from: int | None = None  # first (1-based) visual block with the V-V path; None = layers // 4
    feature_layers: tuple[int, ...] = ()  # open_clip: 1-based blocks giving maps; () = the four quarters
    standin_taps: tuple[int, ...] = (2, 4)  # stand-in: EfficientNet-Lite0 blocks giving maps
    temperature: float = 0.07
    local_weight: float = 4.0
    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    sigma: float = 4.0  # Gaussian smoothing of the summed maps, in input pixels
    seed: int = 0


def load_aux_data(specs: Sequence[str], size: int) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Labelled auxiliary images (test split of each ``--aux-data`` folder) with (N, S, S) masks and (N,) labels."""
    from potpourri.data.folders import read_folder, truth_masks

    paths: list[Path] = []
    masks, labels = [], []
    for spec in specs:
        data = read_folder(spec)
        if not data.test:
            raise PotpourriError(f"--aux-data '{spec}' has no labelled test/ images with ground_truth masks")
        truth, notes = truth_masks(data, size)
        if truth is None:
            raise PotpourriError(f"--aux-data '{spec}': {notes[0]}; AnomalyCLIP trains on masks")
        paths += data.test
        masks.append(truth)
        labels.append(np.asarray(data.labels))
    return paths, np.concatenate(masks), np.concatenate(labels)


class AnomalyCLIP(InspectionMethod):
    """Zero-shot anomaly detection: prompts learned on auxiliary categories, applied unchanged to unseen ones.

    Example:
        model = AnomalyCLIP(AnomalyCLIPConfig(aux_data=("ds-synth:brick",))).fit([]); results = model.predict(paths)
    """

    name = "anomalyclip"
    config_class = AnomalyCLIPConfig

    def __init__(self, config: AnomalyCLIPConfig | None = None, *, towers: Towers | None = None) -> None:
        super().__init__(config or AnomalyCLIPConfig())
        self._towers = towers
        self.history: list[dict[str, float]] = []
        self.n_train_images = 0
        self.timings: dict[str, float] = {}

    @property
    def towers(self) -> Towers:
        if self._towers is None:
            self._towers = build_towers(self.config)
        self.config.image_size = self._towers.image_size  # open_clip models fix their own input size
        return self._towers

    @property
    def image_size(self) -> int:
        return self.towers.image_size

    def tensor(self, image: ImageInput) -> torch.Tensor:
        """One image as a normalised (3, S, S) tensor at the towers' input size."""
        size, towers = self.image_size, self.towers
        rgb = as_rgb(image)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
        return (x - torch.tensor(towers.mean).view(3, 1, 1)) / torch.tensor(towers.std).view(3, 1, 1)

    def fit(self, images: Sequence[ImageInput] = ()) -> AnomalyCLIP:
        """Train the prompts on ``config.aux_data``; target ``images`` are not used (the method is zero-shot)."""
        if not self.config.aux_data:
            raise PotpourriError(
                "AnomalyCLIP trains on labelled auxiliary categories: pass --aux-data ds-synth:brick,gravel "
                "(or folders with test/ and ground_truth/), none of them the target category"
            )
        if len(images):
            self.notes.append("zero-shot: the target category's normal images were not used for fitting")
        paths, masks, labels = load_aux_data(self.config.aux_data, self.image_size)
        return self.fit_auxiliary(paths, masks, labels)

    def fit_auxiliary(self, images: Sequence[ImageInput], masks: np.ndarray, labels: np.ndarray) -> AnomalyCLIP:
        """Train the prompts on labelled images with (N, S, S) 0/1 masks at the towers' input size."""
        start = time.perf_counter()
        tensors = torch.stack([self.tensor(i) for i in images])
        masks_t = torch.as_tensor(np.asarray(masks), dtype=torch.float32)
        if masks_t.shape[-1] != self.image_size:
            masks_t = (F.interpolate(masks_t[:, None], size=self.image_size, mode="nearest")[:, 0] > 0.5).float()
        torch.manual_seed(self.config.seed)
        self.history = train_prompts(
            self.towers,
            tensors,
            masks_t,
            torch.as_tensor(np.asarray(labels)),
            epochs=self.config.epochs,
            batch_size=self.config.batch_size,
            lr=self.config.lr,
            local_weight=self.config.local_weight,
            temperature=self.config.temperature,
            seed=self.config.seed,
        )
        self.n_train_images = len(images)
        self.timings["train_s"] = time.perf_counter() - start
        return self

    def text_features(self) -> torch.Tensor:
        return self.towers.prompt_text_features()

    @torch.no_grad()
    def score(self, images: Sequence[ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (N,) = P(anomalous | global) and maps (N, S, S) = Σ_layers P(anomalous | patch), smoothed."""
        from potpourri.models.layers import gaussian_blur

        if not len(images):
            raise PotpourriError(f"{self.name}.score got no images")
        text = self.text_features()
        scores, maps = [], []
        for start in range(0, len(images), self.config.batch_size):
            batch = torch.stack([self.tensor(i) for i in images[start : start + self.config.batch_size]])
            global_embedding, patch_maps = self.towers.project_image(self.towers.frozen_image_features(batch))
            probs = layer_probabilities(patch_maps, text, self.image_size, self.config.temperature)
            maps.append(gaussian_blur(torch.stack([p[:, 1] for p in probs]).sum(0), self.config.sigma))
            scores.append(image_logits(global_embedding, text, self.config.temperature).softmax(-1)[:, 1])
        return torch.cat(scores).numpy(), torch.cat(maps).numpy()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.towers.named_trainable().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.towers.named_trainable()
        if set(tensors) != set(own):
            raise PotpourriError(f"saved tensors {sorted(tensors)[:4]} do not match this {self.name} model; refit")
        with torch.no_grad():
            for name, param in own.items():
                if tensors[name].shape != param.shape:
                    raise PotpourriError(f"saved '{name}' {tuple(tensors[name].shape)} != {tuple(param.shape)}; refit")
                param.copy_(tensors[name])

    def fit_summary(self) -> dict[str, Any]:
        """Numbers for the run summary: training images, final losses, timings."""
        return {
            "aux_data": list(self.config.aux_data),
            "towers": self.config.towers,
            "trainable_parameters": sum(p.numel() for p in self.towers.trainable),
            "loss_first_epoch": self.history[0] if self.history else None,
            "loss_last_epoch": self.history[-1] if self.history else None,
            **{k: round(v, 3) for k, v in self.timings.items()},
        }


def build_towers(config: Any) -> Towers:
    """The towers a config names: the offline stand-in, or open_clip from ``clip_model`` + ``clip_weights``."""
    prompt_shape = {k: getattr(config, k, v) for k, v in (("n_ctx", 12), ("depth", 9), ("deep_length", 4))}
    if config.towers == "standin":
        from potpourri.inspect.anomalyclip_standin import StandInTowers

        return StandInTowers.pretrained(
            taps=config.standin_taps, image_size=config.image_size, seed=config.seed, **prompt_shape
        )
    if config.towers == "open_clip":
        if not config.clip_model:
            raise PotpourriError("towers 'open_clip' needs --clip MODEL (an open_clip architecture) and --clip-weights")
        clip = load_open_clip(config.clip_model, config.clip_weights)
        name = config.clip_model if not str(config.clip_model).endswith(".json") else None
        return ClipTowers(
            clip,
            model_name=name,
            dual_from=getattr(config, "dual_from", None),
            feature_layers=getattr(config, "feature_layers", ()),
            seed=config.seed,
            **prompt_shape,
        )
    if config.towers == "own":  # our clip_vit_tiny_minilm, trained by `reproduce clip-small`; DPAM on its ViT
        from potpourri.inspect.clip_towers import OwnClipTowers

        if not config.clip_weights:
            raise PotpourriError(f"--clip {OWN_CLIP} needs --clip-weights RUN: a `reproduce clip-small` model folder")
        return OwnClipTowers.from_run(
            config.clip_weights, dual_from=getattr(config, "dual_from", None),
            feature_layers=getattr(config, "feature_layers", ()), seed=config.seed, **prompt_shape,
        )  # fmt: skip
    raise PotpourriError(f"unknown towers '{config.towers}'; use 'standin', 'open_clip' or 'own'")


def config_from_args(args: Any) -> AnomalyCLIPConfig:
    """The CLI's ``inspect fit --method anomalyclip`` options as a config."""
    return AnomalyCLIPConfig(**common_args(args))


def common_args(args: Any) -> dict[str, Any]:
    aux = tuple(_expand_aux(getattr(args, "aux_data", None) or ""))
    clip = getattr(args, "clip", None)
    out = {
        "towers": "own" if clip == OWN_CLIP else "open_clip" if clip else "standin",
        "clip_model": clip,
        "clip_weights": getattr(args, "clip_weights", None),
        "aux_data": aux,
        "image_size": args.image_size,
        "seed": args.seed,
    }
    if getattr(args, "epochs", None):
        out["epochs"] = args.epochs
    return out


def _expand_aux(spec: str) -> list[str]:
    """'ds-synth:brick,gravel' -> ['ds-synth:brick', 'ds-synth:gravel']; folders separated by commas too."""
    out: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        out.append(part if ":" in part or not out or not out[-1].startswith("ds-synth:") else f"ds-synth:{part}")
    return out


METHOD = AnomalyCLIP
