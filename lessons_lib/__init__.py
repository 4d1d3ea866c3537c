"""lessons_lib: the library behind the RLHF-with-PPO notebook curriculum.

The seed-compatible surface (see README):

    from lessons_lib import load_model, get_peft_model, is_bfloat16_supported, PPOConfig, PPOTrainer

Names are resolved lazily, so `import lessons_lib` (and the health check, `python -m lessons_lib`) stays fast and
works even when a heavy dependency such as torch is missing or broken.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "load_model": "lessons_lib.models",
    "get_peft_model": "lessons_lib.models",
    "is_bfloat16_supported": "lessons_lib.models",
    "merge_lora": "lessons_lib.models",
    "PPOConfig": "lessons_lib.ppo",
    "PPOTrainer": "lessons_lib.ppo",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lessons_lib' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next lookup is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
