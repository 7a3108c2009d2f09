"""All-Seeing-style region–text alignment: region tokens (RoIAlign + box embedding) against caption embeddings.

After the All-Seeing Project (Wang et al., ICLR 2024, arXiv 2308.01907; ``OpenGVLab/all-seeing``), whose ASM model
pools ViT tokens of a box with ``RoIAlign``, adds a learned box position embedding and trains a CLIP-style
contrastive loss between region and text for region–text retrieval. Our toy version (our own code, no ASM weights):

* **Region tokens** (``pool_regions`` + ``RegionTextHead.encode_regions``): ``torchvision.ops.roi_align`` on frozen
  ImageNet EfficientNet-Lite0 features (``potpourri.detect.simdetr.lite0_feature_maps``) plus a Fourier box
  embedding, through a small MLP.
* **Text** (``encode_texts``): frozen MiniLM-L6 sentence embeddings of region captions built from DS-Synth's masks
  and drawing parameters (``region_caption_pairs``: "a long dark scratch in the upper left of the brick"), with the
  All-Seeing v2 region text ``<ref>…</ref><box>[[x1, y1, x2, y2]]</box>`` (``potpourri.core.textgeo.region_to_text``)
  kept next to each pair, as AS-1B stores region annotations.
* **Loss** ``info_nce``: symmetric InfoNCE with a learnable temperature (CLIP's ``logit_scale``); captions that are
  the same string count as positives of each other.

``potpourri reproduce all-seeing`` trains the head on DS-Synth train regions and reports region-to-caption retrieval
(top-1/top-5 over the distinct test captions) against chance, an untrained head and feature-only / box-only heads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.training import Trainer, TrainOptions
from potpourri.models.allseeing import RegionTextHead
from potpourri.vlm.train import model_device

__all__ = [
    "RegionPair",
    "info_nce",
    "pool_regions",
    "region_caption_pairs",
    "retrieval_accuracy",
    "train_head",
]


# ----------------------------------------------------------------------------------------------- data
@dataclass
class RegionPair:
    """One region–caption pair of a DS-Synth image: pixel box, caption, its parts and the ASMv2 region text."""

    image_index: int
    box: tuple[float, float, float, float]
    caption: str
    defect: str
    location: str
    asm_text: str


def region_caption_pairs(samples: Sequence) -> list[RegionPair]:
    """One pair per visible defect of each ``SynthSample``: the box of that class's mask pixels and the caption
    "<drawn phrase> <location> of the <category>" (e.g. "a small hole in the center of the brick")."""
    from potpourri.core.textgeo import mask_to_box, region_to_text
    from potpourri.data.synth import CLASSES

    pairs = []
    for index, sample in enumerate(samples):
        height, width = sample.mask.shape
        for defect in sample.defects:
            box = mask_to_box(sample.mask == CLASSES.index(defect.name))
            if box is None:
                continue
            caption = f"{defect.phrase} of the {sample.category}"
            location = defect.phrase.split(" in the ")[-1].split(" at the ")[-1].split(" on the ")[-1]
            asm = region_to_text(caption, [box], (width, height))
            pairs.append(RegionPair(index, box, caption, defect.name, location, asm))
    return pairs


# ----------------------------------------------------------------------------------------------- model
def pool_regions(
    feature_maps: torch.Tensor,
    image_index: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    *,
    output_size: int = 3,
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """RoIAlign of pixel boxes ``(N, 4)`` on ``feature_maps`` (B, C, h, w), box ``i`` on image ``image_index[i]``:
    ``(N, C, output_size, output_size)``; continuous coordinates (``aligned=True``: cell j spans [j, j+1))."""
    from torchvision.ops import roi_align

    if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(boxes) != len(image_index):
        raise PotpourriError(f"boxes must be (N, 4) with N image indices, got {tuple(boxes.shape)}, {len(image_index)}")
    scale = feature_maps.shape[-1] / image_size[1]
    rois = torch.cat([image_index.float()[:, None], boxes.float()], 1)  # (N, 5): batch index, x1, y1, x2, y2
    return roi_align(feature_maps.float(), rois, output_size=output_size, spatial_scale=scale,
                     sampling_ratio=sampling_ratio, aligned=True)  # fmt: skip


def info_nce(
    region: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE of unit embeddings (N, E) × (N, E) with logits ``exp(logit_scale) · cos``; ``positives``
    (N, N) bool spreads each row's target uniformly over its positives (default: the diagonal)."""
    logits = logit_scale.clamp(max=math.log(100.0)).exp() * region @ text.T  # (N, N); CLIP caps the scale at 100
    if positives is None:
        target = torch.arange(len(region), device=region.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    weights = positives.float()
    row = -(weights / weights.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    col = -(weights.T / weights.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (row + col) / 2


def retrieval_accuracy(similarity: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy of ranking a gallery: ``similarity`` (N, G), ``targets`` (N,) the right gallery index;
    ties go against the query (a target tied with a wrong item counts as ranked below it)."""
    if len(targets) == 0:
        return {k: float("nan") for k in ks}
    right = similarity.gather(1, targets[:, None])  # (N, 1)
    rank = (similarity >= right).sum(1) - 1  # items scoring at least as well as the target, the target excluded
    return {k: float((rank < k).float().mean()) for k in ks}


def train_head(
    head: RegionTextHead,
    pooled: torch.Tensor,
    boxes01: torch.Tensor,
    text: torch.Tensor,
    caption_ids: torch.Tensor,
    *,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> list[float]:
    """Train ``head`` by InfoNCE on (pooled, box, text) triples, equal ``caption_ids`` being positives; the losses.

    ``options``: device, precision, checkpoint cadence, resume from ``checkpoints`` (a folder). Under torchrun each
    process encodes its slice of every batch; the InfoNCE runs on the gathered embeddings (``Trainer.unshard``).
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    options = options or TrainOptions(device=model_device(head), progress=False)  # fp32 where the head is
    trainer = Trainer(head, optimizer, total_steps=steps, options=options,
                      folder=checkpoints, generators={"batches": generator}, desc="region-text head")  # fmt: skip
    if not trainer.state:
        trainer.state["losses"] = []
    losses = trainer.state["losses"]  # checkpointed: a resumed run returns every step's loss
    device = trainer.device
    pooled, boxes01, text, caption_ids = (t.to(device) for t in (pooled, boxes01, text, caption_ids))
    head.train()
    for step in trainer.steps():
        index = torch.randperm(len(pooled), generator=generator)[:batch_size].to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        local, _ = trainer.shard(index)  # under torchrun: this process encodes index[rank::world]
        with trainer.autocast():
            # the loss runs on the gathered embeddings in every process: negatives of the whole batch
            region = trainer.unshard(head.encode_regions(pooled[local], boxes01[local]))
            words = trainer.unshard(head.encode_texts(text[local]))
            positives = caption_ids[index][:, None] == caption_ids[index][None, :]
            loss = info_nce(region.float(), words.float(), head.logit_scale, positives)
        losses.append(loss.item())
        trainer.update(loss)
    trainer.finish()
    head.eval()
    return list(losses)
