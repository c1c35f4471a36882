"""Prompts and captions to the UNet's text conditioning, the way the WebUI encodes them.

One recipe for the trainer and the previewer, so a preview sees exactly the conditioning the LoRA was trained on:
- token ids in chunks of 75 between start and end tokens, padded to 77 (the WebUI's long-prompt split);
- SD1: the last layer, or with clip skip n the n-th from last through the final layer norm;
- SD2: the last layer (its OpenCLIP encoder already ends at the penultimate block; clip skip does not apply);
- SDXL: both encoders' penultimate layers side by side, no final layer norm, and the second encoder's pooled
  projection of the first chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch


def text_transformer(te: torch.nn.Module) -> torch.nn.Module:
    """The CLIP transformer inside a text encoder: transformers 5 dropped the ``text_model`` wrapper of
    CLIPTextModel (the projection variant keeps it), the WebUI hosts' 4.x has it everywhere."""
    return getattr(te, "text_model", te)


def token_rows(tokenizer: Any, prompt_ids: Sequence[Sequence[int]], chunks: int) -> torch.Tensor:
    """(B, chunks*77) ids: each prompt's ids (no special tokens) cut into ``chunks`` chunks of 75, each between
    the start and end tokens and padded with the tokenizer's pad token (SDXL's second one pads with "!")."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for ids in prompt_ids:
        row: list[int] = []
        for c in range(chunks):
            body = [bos, *ids[75 * c : 75 * (c + 1)], eos]
            row += body + [pad] * (77 - len(body))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def encode_chunk(
    te: torch.nn.Module, ids: torch.Tensor, *, sdxl: bool, clip_skip: int = 1, base: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled projection or None) of one 77-token chunk through one encoder.

    ``clip_skip`` > 1 applies (SD1 only: callers pass 1 for the others); ``base`` is the unwrapped encoder when
    ``te`` is wrapped (DDP), for its final layer norm.
    """
    if sdxl:
        out = te(ids, output_hidden_states=True)
        return out.hidden_states[-2], getattr(out, "text_embeds", None)
    if clip_skip > 1:
        out = te(ids, output_hidden_states=True)
        norm = cast(torch.nn.LayerNorm, text_transformer(base if base is not None else te).final_layer_norm)
        # In the norm's dtype: accelerate hands a trained encoder's outputs back in fp32 (upcast, so nothing is
        # lost), and a CPU's layer norm refuses fp32 input with fp16/bf16 weights, autocast or not.
        return norm(out.hidden_states[-clip_skip].to(norm.weight.dtype)), None
    return te(ids)[0], None


def encode_ids(
    te: torch.nn.Module, ids: torch.Tensor, *, sdxl: bool, clip_skip: int = 1, base: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every 77-token chunk of ``ids`` through one encoder: hidden states one after the other (B, n*77, C) and
    the pooled projection of the first chunk (or None)."""
    hidden, pooled = [], None
    for index, chunk in enumerate(ids.split(77, dim=1)):
        h, p = encode_chunk(te, chunk, sdxl=sdxl, clip_skip=clip_skip, base=base)
        hidden.append(h)
        if index == 0 and p is not None:
            pooled = p
    return torch.cat(hidden, dim=1), pooled


@dataclass
class Conditioning:
    """What the UNet sees besides the noisy latents: the text encoders' hidden states (B, tokens, context)
    and, for SDXL, the pooled text embedding (B, P) and the six size/crop numbers (B, 6) that go to the UNet
    as ``added_cond_kwargs``."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Conditioning:
        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Conditioning(self.hidden.to(device), moved(self.pooled), moved(self.time_ids))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """One batch from several (e.g. the cached batches of one)."""
        pooled = [p.pooled for p in parts if p.pooled is not None]
        times = [p.time_ids for p in parts if p.time_ids is not None]
        return Conditioning(
            torch.cat([p.hidden for p in parts]),
            torch.cat(pooled) if len(pooled) == len(parts) else None,
            torch.cat(times) if len(times) == len(parts) else None,
        )

    def added_cond_kwargs(self, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """SDXL's extra UNet inputs, or None for a UNet that takes only the hidden states."""
        if self.pooled is None and self.time_ids is None:
            return None
        if self.pooled is None or self.time_ids is None:
            raise ValueError("An SDXL UNet needs both the pooled text embedding and the size/crop numbers.")
        return {"text_embeds": self.pooled.to(dtype), "time_ids": self.time_ids.to(dtype)}
