"""The LLM *writes* images: SEED codes as new vocabulary, ``[generate] caption`` -> ``<img_k>`` x 32 -> nearest image.

As in SEED-LLaMA, the discrete visual tokenizer's codebook (``potpourri.models.visual_tokenizer``) becomes part of
the LM's vocabulary (``<img_0>``..``<img_{K-1}>``, special tokens, never split). The LM is trained with next-token
cross-entropy, on the answer only, to answer ``[generate] a brick surface with a long scratch`` with the image's
32 codes and the end token. What trains: the new vocabulary rows (input embeddings and, when untied, the output
layer; the old rows keep their values exactly, their gradient is masked) and LoRA on q/v. Generation is greedy,
either free (the LM must choose image tokens itself) or constrained to image tokens for exactly ``num_tokens``
steps; the codes are decoded by the tokenizer into features and the nearest real image is retrieved.

Example:
    writer = ImageTokenWriter(lm, tokenizer, codebook_size=256)
    train_image_writer(writer, captions, codes, ImageWriterTrainConfig(steps=100))
    codes = writer.generate_codes(["a scratched brick"], num_tokens=32)          # (1, 32)
    nearest = retrieve_nearest(seed_tokenizer, codes, gallery_features)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.training import Trainer, TrainOptions, lr_at
from potpourri.models.visual_tokenizer import add_image_tokens
from potpourri.models.vlm import IGNORE, cache_kwarg, new_cache, token_ids

__all__ = ["GENERATE", "ImageTokenWriter", "ImageWriterTrainConfig", "train_image_writer"]

GENERATE = "[generate]"


class ImageTokenWriter(nn.Module):
    """A causal LM with the visual tokenizer's codes in its vocabulary; trains the new rows (+ LoRA on q/v)."""

    def __init__(
        self,
        lm: nn.Module,
        tokenizer: Any,
        codebook_size: int,
        *,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_targets: Sequence[str] = ("q_proj", "v_proj"),
        system: str = "",
    ) -> None:
        super().__init__()
        self.lm = getattr(lm, "lm", lm)  # a potpourri CausalLM wraps the Hugging Face model
        self.tokenizer = tokenizer
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise PotpourriError("the tokenizer has no end-of-sequence token; pass a Hugging Face causal-LM tokenizer")
        self.system = system
        self.first_new = self.lm.get_input_embeddings().weight.shape[0]  # rows from here on are image tokens
        self.vocab = add_image_tokens(self.lm, tokenizer, codebook_size)
        if min(self.vocab.ids) < self.first_new:
            raise PotpourriError("the image tokens did not get new embedding rows; extend a fresh tokenizer")
        self.lm.requires_grad_(False)
        if lora_rank:
            try:
                from peft import LoraConfig, inject_adapter_in_model
            except ImportError as exc:
                raise PotpourriError("LoRA needs peft: pip install 'potpourri[vlm]'") from exc
            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                target_modules=list(lora_targets), bias="none")  # fmt: skip
            inject_adapter_in_model(config, self.lm)
            for name, param in self.lm.named_parameters():
                param.requires_grad_(".lora_" in name)
        self._hooks = []
        for table in self.vocabulary_tables():
            table.requires_grad_(True)
            keep = torch.zeros(table.shape[0], 1, dtype=table.dtype)
            keep[self.first_new :] = 1.0
            self._hooks.append(table.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device)))

    def vocabulary_tables(self) -> list[nn.Parameter]:
        """The input embedding matrix and, when not tied to it, the output layer's weight (rows = vocabulary)."""
        tables = [self.lm.get_input_embeddings().weight]
        output = self.lm.get_output_embeddings()
        if output is not None and output.weight is not tables[0]:
            tables.append(output.weight)
        return tables

    def prompt_text(self, caption: str) -> str:
        """``[generate] caption`` as a user turn in the LM's chat template, ready for the assistant's answer."""
        user = f"{GENERATE} {caption}"
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": self.system}, {"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{getattr(self.tokenizer, 'bos_token', None) or ''}[INST] {user} [/INST] "

    def _batch(self, captions: Sequence[str], codes: torch.Tensor | None, pad: str) -> tuple[torch.Tensor, ...]:
        eos = self.tokenizer.eos_token_id
        rows = []
        for b, caption in enumerate(captions):
            prompt = token_ids(self.tokenizer, self.prompt_text(caption))
            answer = [*self.vocab.codes_to_ids(codes[b]).tolist(), eos] if codes is not None else []
            rows.append((prompt, answer))
        total = max(len(p) + len(a) for p, a in rows)
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        ids = torch.full((len(rows), total), eos if pad_id is None else pad_id, dtype=torch.long)
        labels = torch.full((len(rows), total), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), total), dtype=torch.long)
        for b, (prompt, answer) in enumerate(rows):
            length = len(prompt) + len(answer)
            start = total - length if pad == "left" else 0
            ids[b, start : start + length] = torch.tensor(prompt + answer)
            mask[b, start : start + length] = 1
            if answer:
                labels[b, start + len(prompt) : start + length] = torch.tensor(answer)
        return ids, mask, labels

    def forward(
        self,
        captions: Sequence[str],
        codes: torch.Tensor,
        *,
        normaliser: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer (the image's codes as ``<img_k>`` tokens, then the end);
        with ``normaliser`` the sum divided by ``normaliser(count)`` (under torchrun: the global batch's count)."""
        if codes.ndim != 2 or codes.shape[0] != len(captions):
            raise PotpourriError(
                f"give one (num_tokens,) code row per caption; got codes of shape {tuple(codes.shape)}"
            )
        ids, mask, labels = self._batch(captions, codes, "right")
        device = self.lm.get_input_embeddings().weight.device
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        hidden = getattr(self.lm, self.lm.base_model_prefix)(input_ids=ids, attention_mask=mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep])  # only where an answer token is predicted
        if normaliser is not None:
            return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / normaliser(keep.sum().float())
        return F.cross_entropy(logits.float(), targets[keep])

    @torch.no_grad()
    def generate_codes(
        self, captions: Sequence[str], num_tokens: int, *, constrained: bool = True, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy codes ``(B, num_tokens)`` and a ``(B,)`` validity flag.

        ``constrained``: only image tokens may be chosen, so every row is a valid image; ``allowed`` (num_tokens,
        codebook) bool narrows that per position (e.g. semantic codes first, then colour tokens). Free: any token; a
        row is valid when its first ``num_tokens`` tokens are all image tokens (other positions read as code -1).
        """
        if allowed is not None and (not constrained or allowed.shape != (num_tokens, len(self.vocab.ids))):
            raise PotpourriError(f"allowed must be ({num_tokens}, {len(self.vocab.ids)}) bool, with constrained=True")
        if allowed is not None and not bool(allowed.any(1).all()):
            raise PotpourriError("allowed leaves a position without any image token")
        ids, mask, _ = self._batch(captions, None, "left")
        device = self.lm.get_input_embeddings().weight.device
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        image_ids = torch.tensor(self.vocab.ids, device=device)
        cache = {cache_kwarg(self.lm): new_cache(self.lm)}
        out = self.lm(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **cache)
        chosen = []
        for step in range(num_tokens):
            logits = out.logits[:, -1]  # (B, V)
            if allowed is not None:
                scores = logits[:, image_ids].masked_fill(~allowed[step].to(device), float("-inf"))
                next_ids = image_ids[scores.argmax(-1)]
            else:
                next_ids = image_ids[logits[:, image_ids].argmax(-1)] if constrained else logits.argmax(-1)
            chosen.append(next_ids)
            if step + 1 == num_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = self.lm(input_ids=next_ids[:, None], attention_mask=mask, position_ids=position_ids,
                          use_cache=True, **cache)  # fmt: skip
        codes = self.vocab.ids_to_codes(torch.stack(chosen, dim=1))  # (B, num_tokens), -1 for non-image tokens
        return codes, (codes >= 0).all(1)


@dataclass
class ImageWriterTrainConfig:
    """Knobs of the image-token loop: AdamW, warm-up + cosine, separate lr for the new vocabulary rows."""

    steps: int = 100
    batch_size: int = 8
    lr: float = 2e-4  # LoRA
    vocab_lr: float = 5e-3  # the new <img_k> rows
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    progress: bool = True


def train_image_writer(
    writer: ImageTokenWriter,
    captions: Sequence[str],
    codes: torch.Tensor,
    cfg: ImageWriterTrainConfig,
    *,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> list[dict[str, float]]:
    """Train the new vocabulary rows and LoRA to answer ``[generate] caption`` with the codes; returns the log.

    ``options``: device, precision, checkpoint cadence, resume from ``checkpoints`` (a folder; only the trained
    parameters, the optimizer, the data order and the RNGs are written, not the frozen LM). Default: the config's
    ``grad_clip`` and ``progress``, fp32 on the writer's device. Under torchrun each process trains on its slice of
    every batch.
    """
    from potpourri.vlm.train import TrainableParts, token_normaliser, train_options

    if not captions or len(captions) != len(codes):
        raise PotpourriError(f"give one code row per caption ({len(captions)} captions, {len(codes)} code rows)")
    tables = writer.vocabulary_tables()
    table_ids = {id(t) for t in tables}
    lora = [p for p in writer.parameters() if p.requires_grad and id(p) not in table_ids]
    groups = [{"params": tables, "lr": cfg.vocab_lr, "weight_decay": 0.0, "base": cfg.vocab_lr}]
    if lora:
        groups.append({"params": lora, "lr": cfg.lr, "weight_decay": 0.0, "base": cfg.lr})
    optimizer = torch.optim.AdamW(groups)  # no decay: masked old rows must stay exactly as they are
    generator = torch.Generator().manual_seed(cfg.seed)
    options = train_options(options, writer, grad_clip=cfg.grad_clip, checkpoint_every=0, progress=cfg.progress)
    trainer = Trainer(
        TrainableParts(writer), optimizer, total_steps=cfg.steps, options=options, folder=checkpoints,
        params=[p for g in groups for p in g["params"]], generators={"order": generator}, desc="image tokens",
    )  # fmt: skip
    state = trainer.state  # data order and log, checkpointed with the weights
    if not state:
        state.update(order=[], history=[], running=0.0, seen=0)
    started = time.perf_counter()
    writer.train()
    for step in trainer.steps():
        if len(state["order"]) < cfg.batch_size:
            state["order"] += torch.randperm(len(captions), generator=generator).tolist()
        batch, state["order"] = state["order"][: cfg.batch_size], state["order"][cfg.batch_size :]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, base=group["base"], total=cfg.steps, warmup=cfg.warmup_steps)
        local, _ = trainer.shard(batch)  # under torchrun: batch[rank::world]; the loss counts the global batch's tokens
        with trainer.autocast():
            loss = writer([captions[i] for i in local], codes[local], normaliser=token_normaliser(trainer))
        logged = trainer.mean_over_processes(loss.item())
        state["running"], state["seen"] = state["running"] + logged, state["seen"] + 1  # before the checkpoint
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, "loss": state["running"] / state["seen"], "seconds": time.perf_counter() - started}
            state["history"].append(row)
            state["running"], state["seen"] = 0.0, 0
        trainer.update(loss)
    trainer.finish()
    writer.eval()
    return [dict(row) for row in state["history"]]
