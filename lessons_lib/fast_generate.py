"""Fast rollout generation for PPO (issue 8): `RolloutEngine` and a one-call `fast_generate`.

    from lessons_lib.fast_generate import RolloutEngine
    engine = RolloutEngine(model)                        # plain, peft LoRA, or 4-bit + LoRA Qwen2 / Llama
    out = engine.generate(query_ids, attention_mask, max_new_tokens=128, temperature=0.7)
    out.responses                                        # list of 1-D tensors, cut after the first EOS
    # ... PPO update of the LoRA weights ... then generate again: the engine notices and re-merges.

    # or with `generate`'s keyword arguments, the engine cached per model:
    out = fast_generate(model, queries, max_new_tokens=128, do_sample=True, temperature=0.7, top_k=0)

Same sampling distribution as `model.generate(do_sample=True, top_k=0, top_p=1.0, temperature=T)`; the logits
differ from the model's only by rounding (in fp32, by summation order). Unlike `generate`, whose default is
top_k=50, the engine samples from the full distribution unless told otherwise. The design and the measured
speed-ups are in docs/FAST_ROLLOUT.md; the code is in `lessons_lib/fastgen/`.
"""

from __future__ import annotations

import weakref

from .fastgen import RolloutEngine, RolloutOutput

__all__ = ["RolloutEngine", "RolloutOutput", "engine_for", "engine_kwargs", "fast_generate"]

_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# `generate` options the engine implements, and the values of those it does not implement that change nothing
_SUPPORTED = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
              "pad_token_id", "return_logprobs", "progress"}
_NEUTRAL = {"min_p": None, "typical_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "use_cache": True, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def engine_kwargs(generate_kwargs: dict) -> dict:
    """`generate`-style keyword arguments -> `RolloutEngine.generate` ones; unsupported options that would change
    the output raise a ValueError naming them (rather than being silently ignored)."""
    unknown = {k: v for k, v in generate_kwargs.items() if k not in _SUPPORTED and k not in _NEUTRAL}
    distorting = {k: v for k, v in generate_kwargs.items() if k in _NEUTRAL and v != _NEUTRAL[k]}
    if unknown or distorting:
        raise ValueError(f"fast_generate does not support {sorted({**unknown, **distorting})} "
                         f"(got {dict(**unknown, **distorting)}); use model.generate for these")
    kwargs = {k: v for k, v in generate_kwargs.items() if k in _SUPPORTED}
    for key, neutral in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0)):
        if kwargs.get(key, neutral) is None:
            kwargs[key] = neutral
    return kwargs


def engine_for(model, **options) -> RolloutEngine:
    """The engine cached for `model` (built on first use; rebuilt if `options` differ from the cached one's)."""
    cached = _ENGINES.get(model)
    if cached is None or cached[0] != options:
        cached = (options, RolloutEngine(model, **options))
        _ENGINES[model] = cached
    return cached[1]


def fast_generate(model, input_ids, attention_mask=None, engine_options: dict | None = None,
                  **generate_kwargs) -> RolloutOutput:
    """`engine_for(model).generate(...)`, taking `generate`'s keyword arguments (see `engine_kwargs`)."""
    engine = engine_for(model, **(engine_options or {}))
    return engine.generate(input_ids, attention_mask, **engine_kwargs(generate_kwargs))
