"""How well does a model follow the tiny world's instructions? Sample answers, judge them with the rule checkers.

    from lessons_lib.tiny.measure import sample_responses, compliance_table
    responses = sample_responses(model, tokenizer, [r["instruction"] for r in rows], num_samples=4)
    table = compliance_table(rows, responses)   # {"overall": {...}, "bullet": {...}, ...}

Used by the tiny world's build (to record how mediocre the SFT model is) and by the tests. The evaluation lesson
(05) builds its SFT-vs-PPO comparison on the same checkers.
"""

from __future__ import annotations

import torch

from lessons_lib.data import chat_prompt
from lessons_lib.tiny.tasks import FAMILIES, check


@torch.no_grad()
def sample_responses(model, tokenizer, instructions: list[str], num_samples: int = 1, temperature: float = 0.7,
                     do_sample: bool = True, max_new_tokens: int = 64, batch_size: int = 64,
                     seed: int = 0, progress: bool = False) -> list[list[str]]:
    """`num_samples` answers per instruction (chat-formatted, left-padded, stopping at EOS), as decoded text.

    Seeds torch's global generator with `seed` first, so the same call gives the same answers on the same machine
    (and thread count). `progress`: a tqdm bar over the batches of `batch_size` instructions.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[list[str]] = []
    bar = tqdm(total=len(instructions), desc="sampling", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(instructions), batch_size):
            prompts = [chat_prompt(tokenizer, x) for x in instructions[start:start + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(
                do_sample=False)
            seqs = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **kwargs)                                # (B * num_samples, Tq + Tr)
            texts = tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [texts[i:i + num_samples] for i in range(0, len(texts), num_samples)]
            bar.update(len(prompts))
    finally:
        bar.close()
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def compliance_table(rows: list[dict], responses: list[list[str]]) -> dict[str, dict[str, float]]:
    """Per family and overall: constraint, strict and refusal rates, and the mean 1-5 score.

    For harmful requests `constraint` = `strict` = refused. `overall` averages over every (prompt, sample);
    `benign` over benign prompts only, where `refused` is the over-refusal rate.
    """
    if len(rows) != len(responses):
        raise ValueError(f"compliance_table: {len(rows)} rows but {len(responses)} lists of responses")
    verdicts: dict[str, list] = {f: [] for f in FAMILIES}
    for row, answers in zip(rows, responses):
        verdicts[row["family"]] += [check(row, a) for a in answers]

    def summary(vs):
        k = max(1, len(vs))
        return {"constraint": sum(v.constraint for v in vs) / k, "strict": sum(v.strict for v in vs) / k,
                "refused": sum(v.refused for v in vs) / k, "score": sum(v.score for v in vs) / k, "count": len(vs)}

    table = {f: summary(vs) for f, vs in verdicts.items() if vs}
    table["benign"] = summary([v for f, vs in verdicts.items() if f != "harmful" for v in vs])
    table["overall"] = summary([v for vs in verdicts.values() for v in vs])
    return table


def format_table(tables: dict[str, dict[str, dict[str, float]]], key: str = "constraint") -> str:
    """A plain-text table: one row per family, one column per named table (e.g. {"sampled": t1, "greedy": t2})."""
    names = list(tables)
    families = [f for f in (*FAMILIES, "benign", "overall") if any(f in t for t in tables.values())]
    lines = [f"{'family':<11}" + "".join(f"{n:>14}" for n in names)]
    for f in families:
        lines.append(f"{f:<11}" + "".join(f"{tables[n][f][key]:>14.2f}" if f in tables[n] else f"{'-':>14}"
                                          for n in names))
    return "\n".join(lines)
