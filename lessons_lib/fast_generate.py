"""Fast rollout generation for PPO (issue 8): `RolloutEngine` and a one-call `fast_generate`.

    from lessons_lib.fast_generate import RolloutEngine
    engine = RolloutEngine(model)                        # plain, peft LoRA, or 4-bit + LoRA Qwen2 / Llama
    out = engine.generate(query_ids, attention_mask, max_new_tokens=128, temperature=0.7)
    out.responses                                        # list of 1-D tensors, cut after the first EOS
    # ... PPO update of the LoRA weights ... then generate again: the engine notices and re-merges.

Same sampling distribution as `model.generate(do_sample=True, top_k=0, top_p=1.0, temperature=T)`; the logits
differ from the model's only by rounding (exact in fp32 up to summation order). The design and the measured
speed-ups are in docs/FAST_ROLLOUT.md; the code is in `lessons_lib/fastgen/`.
"""

from __future__ import annotations

import weakref

from .fastgen import RolloutEngine, RolloutOutput

__all__ = ["RolloutEngine", "RolloutOutput", "engine_for", "fast_generate"]

_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_for(model, **options) -> RolloutEngine:
    """The engine cached for `model` (built on first use; rebuilt if `options` differ from the cached one's)."""
    cached = _ENGINES.get(model)
    if cached is None or cached[0] != options:
        cached = (options, RolloutEngine(model, **options))
        _ENGINES[model] = cached
    return cached[1]


def fast_generate(model, input_ids, attention_mask=None, engine_options: dict | None = None,
                  **generate_kwargs) -> RolloutOutput:
    """`RolloutEngine(model).generate(...)` with the engine cached per model."""
    return engine_for(model, **(engine_options or {})).generate(input_ids, attention_mask, **generate_kwargs)
