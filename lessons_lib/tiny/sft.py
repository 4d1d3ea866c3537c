"""The tiny Qwen2 and its supervised fine-tuning (SFT) on the score-mode data.

The model is a real `Qwen2ForCausalLM` (the same code path as Qwen2/Qwen2.5), only small: hidden 128, 4 layers,
4 query heads sharing 2 key-value heads, MLP 384, tied embeddings, vocab 1024: about 0.9M parameters. SFT trains
it from random weights to answer the instructions like the data does, with the loss on the response and the
end-of-turn token only (the prompt is context, not something to imitate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lessons_lib.data import chat_prompt


def tiny_qwen2_config(tokenizer, **overrides):
    """The tiny Qwen2 configuration for `tokenizer` (ids of pad/eos come from it)."""
    from transformers import Qwen2Config

    kwargs = dict(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=384, max_position_embeddings=256, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


@dataclass
class SFTConfig:
    epochs: int = 4
    """passes over the data"""
    batch_size: int = 32
    """sequences per optimizer step"""
    lr: float = 3e-3
    """peak learning rate (a 1M-parameter model from scratch takes a large one)"""
    warmup_steps: int = 50
    """linear warm-up, then cosine decay to 10% of `lr`"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    max_steps: int | None = None
    """stop early after this many steps (tests use it for a short, still deterministic, build)"""
    seed: int = 0
    """seeds the weights and the batch order"""


def encode_sft(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per row; prompt and response are tokenized apart, as generation sees them."""
    out = []
    for row in rows:
        prompt = tokenizer(chat_prompt(tokenizer, row["instruction"]), add_special_tokens=False)["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((prompt, response))
    return out


def collate_sft(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded batch; labels are -100 on the prompt and on padding, so only the response is learned."""
    T = max(len(p) + len(r) for p, r in pairs)
    input_ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)     # (B, T)
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)          # (B, T)
    attention_mask = torch.zeros((len(pairs), T), dtype=torch.long)       # (B, T)
    for b, (p, r) in enumerate(pairs):
        ids = p + r
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, len(p):len(ids)] = torch.tensor(r)
        attention_mask[b, :len(ids)] = 1
    return input_ids, attention_mask, labels


def lr_at(step: int, total: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_sft(tokenizer, rows: list[dict], cfg: SFTConfig = SFTConfig(), progress: bool = True):
    """Train a fresh tiny Qwen2 on `rows` (instruction, response); returns (model, list of per-step losses)."""
    from tqdm.auto import tqdm
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(tiny_qwen2_config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    data = encode_sft(tokenizer, rows)
    steps_per_epoch = len(data) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed)
    losses, step = [], 0
    model.train()
    bar = tqdm(total=total, desc="SFT", disable=not progress)
    while step < total:
        perm = torch.randperm(len(data), generator=order).tolist()
        for k in range(steps_per_epoch):
            if step >= total:
                break
            input_ids, attention_mask, labels = collate_sft([data[i] for i in perm[k * cfg.batch_size:
                                                                                    (k + 1) * cfg.batch_size]],
                                                            tokenizer.pad_token_id)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model, losses
