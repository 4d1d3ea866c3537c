"""Fast rollouts for PPO: a static-cache, CUDA-graph decoding engine for Qwen2/Llama policies (lesson 08).

`lessons_lib.fast_generate` is the public entry point; the pieces, each readable on its own:

- `weights.py`  reading a (peft / 4-bit) model's projections: dense merged copies or lean 4-bit, refreshed in place
- `model.py`    the Qwen2/Llama forward with a static KV cache: `prefill` and a graph-safe `decode`
- `sampling.py` temperature / top-k / top-p and Gumbel-max sampling, all on the device
- `inputs.py`   left padding, prompt buckets, EOS and pad ids
- `refresh.py`  building the copy within a memory budget; noticing (cheaply) when the model changed
- `engine.py`   `RolloutEngine`: workspaces, graph capture, the generate loop
"""

from .engine import RolloutEngine, RolloutOutput

__all__ = ["RolloutEngine", "RolloutOutput"]
