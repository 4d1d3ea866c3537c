"""Turning `generate`'s arguments into what the rollout engine runs on (lesson 08, fast rollouts)."""

from __future__ import annotations

import torch


def special_ids(eos_token_id, pad_token_id, generation_config, vocab_size: int) -> tuple[list[int], int]:
    """EOS ids (a list: [] never stops) and the pad id, defaulting to the model's generation config like `generate`."""
    if eos_token_id is None:
        eos_token_id = getattr(generation_config, "eos_token_id", None)
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(generation_config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    bad = [t for t in [*eos, pad_token_id] if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad} are outside the vocabulary (size {vocab_size})")
    return [int(t) for t in eos], int(pad_token_id)


def left_padded(input_ids, attention_mask, pad: int, bucket: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as left-padded (ids, mask), both (B, Tq) with Tq a multiple of `bucket`, on `device`.

    input_ids: a (B, Tq) (or (Tq,)) tensor with an optional attention_mask, or a list of 1-D token sequences.
    Rounding Tq up adds masked columns only: the outputs do not change, but shapes repeat across batches, so a
    captured graph is reused.
    """
    if isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("pass attention_mask only with a padded (B, Tq) tensor of input_ids")
        rows = [torch.as_tensor(r, dtype=torch.long).flatten() for r in input_ids]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if len(r):
                ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    else:
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        mask = mask if mask.dim() == 2 else mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"empty batch of prompts: input_ids has shape {tuple(ids.shape)}")
    mask = mask.to(torch.bool)
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"prompts {empty} have no tokens (attention_mask all 0)")
    holes = (mask[:, :-1] & ~mask[:, 1:]).any(1).nonzero().flatten().tolist()
    if holes:
        raise ValueError(f"prompts {holes} are not left-padded (a 0 follows a 1 in attention_mask); "
                         "pad on the left, e.g. tokenizer.padding_side = 'left'")
    B, Tq = ids.shape
    extra = -Tq % max(1, bucket)
    if extra:
        ids = torch.cat([torch.full((B, extra), pad, dtype=ids.dtype, device=ids.device), ids], dim=1)
        mask = torch.cat([torch.zeros((B, extra), dtype=torch.bool, device=mask.device), mask], dim=1)
    return ids.to(device, torch.long), mask.to(device)
