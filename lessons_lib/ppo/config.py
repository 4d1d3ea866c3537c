"""`PPOConfig`: every PPO knob, documented once (lesson 04 reads it field by field; docs/PPO.md has the table).

The first block of fields is the article's (section 3.3, the old TRL `PPOConfig` names); the rest are the PPO
choices from "The N Implementation Details of RLHF with PPO" and its TL;DR sequel, each switchable.

How the batch sizes relate (the old TRL semantics, which the article's numbers assume):

    batch_size                    responses per `step()`: one rollout of that many prompts
    mini_batch_size               responses per forward/backward pass (what must fit in memory)
    gradient_accumulation_steps   forward/backward passes summed into one optimizer step
    backward_batch_size           = mini_batch_size * gradient_accumulation_steps: responses per optimizer step
    ppo_epochs                    passes over the rollout, each in a fresh random order

So one `step()` makes ppo_epochs * batch_size / backward_batch_size optimizer steps. The article's
(32, 8, 4, 4) gives 1 optimizer step per epoch, 4 per `step()`; `PPOConfig.tiny()`'s (32, 8, 1, 4) gives 16.
`batch_size` must be a multiple of `backward_batch_size`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

KL_ESTIMATORS = ("k1", "k3")
VALUE_MODELS = ("head", "reward")
OPTIMIZERS = ("adamw", "adam_tf")
SWITCHES = ("auto", True, False)


@dataclass
class PPOConfig:
    # ------------------------------------------------------------------ the article's fields (section 3.3)
    model_name: str = "ppo-model"
    """A name for the run (used in logs and checkpoints); the model itself is passed to PPOTrainer."""
    learning_rate: float = 1.41e-5
    """Optimizer learning rate. Full fine-tuning wants ~1e-5, LoRA adapters ~1e-4 (they start at zero)."""
    batch_size: int = 32
    """Responses per `step()`: the dataloader yields this many prompts, one response each."""
    mini_batch_size: int = 8
    """Responses per forward/backward pass during the PPO update (and per no-grad scoring pass)."""
    gradient_accumulation_steps: int = 1
    """Forward/backward passes summed before one optimizer step (see the module docstring)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch, in a fresh random order each time."""
    remove_unused_columns: bool = False
    """True: batches carry only input_ids, instruction, query and prompt_id. False: every dataset column is kept."""

    # ------------------------------------------------------------------ rollout
    max_prompt_length: int = 512
    """Prompts longer than this many tokens are dropped from the dataset, with a warning (a cut would cut the template)."""
    temperature: float = 0.7
    """Sampling temperature; log-probs are computed from logits / temperature so they match the sampler."""
    max_new_tokens: int = 128
    """Default response length limit for `generate()` (a `max_new_tokens` in generate_kwargs wins)."""
    missing_eos_penalty: float | None = -1.0
    """EOS trick [N+]: a response that hit the length limit without EOS gets this score. None: keep its score."""
    disable_dropout: bool = True
    """Set every dropout (LoRA dropout included) to p=0, so log-probs are the same in rollout and update [N]."""

    # ------------------------------------------------------------------ reward shaping
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty -beta * KL_t in the reward (the initial value when adaptive)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: 'k1' = log(p/p_ref) (as [Z19]) or 'k3' (always >= 0)."""
    adaptive_kl: bool = False
    """Adapt beta towards `kl_target` [Z19]; False keeps beta fixed."""
    kl_target: float = 6.0
    """Target KL (nats per response) for the adaptive controller."""
    kl_horizon: float = 10000.0
    """Adaptive controller horizon, in episodes: larger = slower changes of beta."""
    score_norm: bool = False
    """Standardise scores with a running mean and std before use (reward normalisation, [N])."""
    score_clip: float | None = None
    """Clip scores to [-score_clip, score_clip] (after normalisation). None: no clipping."""
    whiten_rewards: bool = False
    """Scale the per-token rewards of a batch to unit variance, keeping the mean ([N]; [N+] turns it on)."""

    # ------------------------------------------------------------------ advantages and losses
    gamma: float = 1.0
    """Discount factor; 1 for RLHF (the reward arrives once, at the end) [N]."""
    lam: float = 0.95
    """GAE lambda: 1 = Monte-Carlo returns, 0 = one-step TD."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the batch [N]."""
    cliprange: float = 0.2
    """PPO policy clip epsilon: the ratio pi/pi_old is clipped to [1 - eps, 1 + eps]."""
    cliprange_value: float = 0.2
    """Value clip: new values may move at most this far from the rollout values [N]."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    value_model: str = "head"
    """'head': a linear value head on the policy's last hidden state (one shared forward, zero-initialised [N]).
    'reward': a separate critic warm-started from the reward model [N+] (more memory, better start)."""

    # ------------------------------------------------------------------ optimisation
    optimizer: str = "adamw"
    """'adamw' (PyTorch) or 'adam_tf' (TensorFlow's epsilon placement, as the original [Z19] code; [N])."""
    adam_eps: float = 1e-5
    """Adam epsilon (1e-5 as [Z19]/[N+])."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value. None: no clipping (the norm is still checked for NaN/inf)."""
    anneal_lr: bool = False
    """Decay the learning rate linearly to 0 over `total_steps` [N]."""
    total_steps: int | None = None
    """Number of `step()` calls the run will make (for `anneal_lr`); default: one pass over the dataloader."""

    # ------------------------------------------------------------------ dynamic difficulty (lesson 08)
    difficulty_ema: float = 0.5
    """Per-prompt statistics are EMAs: new = ema * old + (1 - ema) * observed."""
    difficulty_explore: float = 0.25
    """With a difficulty set, this share of each batch is drawn uniformly (unseen prompts keep being tried)."""

    # ------------------------------------------------------------------ speed and memory (docs/PPO.md "Performance")
    fast_rollout: bool | str = "auto"
    """Step 1 with `lessons_lib.fast_generate.RolloutEngine` (static KV cache, CUDA-graph decoding) instead of
    `model.generate`; same sampling law. "auto": on for Qwen2/Llama policies on a GPU (falls back to `generate`, with a
    warning, for options the engine lacks); True: always (errors instead of falling back); False: `generate`."""
    rollout_engine: dict | None = None
    """Keyword arguments for the RolloutEngine (weights="auto"|"dense"|"lean", max_extra_memory, kernels,
    keep_weights, prompt_bucket, ...; docs/FAST_ROLLOUT.md). None: its defaults."""
    fast_forward: bool | str = "auto"
    """Steps 3-4 and 9 through `lessons_lib.fast_train.FastDecoder` (fused 4-bit projections, one autograd node per
    layer, recomputation in the backward) instead of the transformers model. "auto": on for LoRA Qwen2/Llama
    policies on a GPU; True: always (errors if the model is not supported); False: the transformers model. Either
    way the LM head is applied a chunk of positions at a time: no (B, T, V) logits."""
    cuda_graphs: bool | str = "auto"
    """Capture each minibatch's forward + backward in a CUDA graph, replayed without per-kernel CPU cost.
    "auto": on with fast_forward on a GPU; True: on a GPU with any forward; False: eager."""
    length_bucket: int | None = None
    """Pad update minibatches to query/response lengths that are multiples of this, so one captured graph serves
    many steps. None: 32 with CUDA graphs, otherwise each minibatch is trimmed to its own longest row."""
    forward_batch_size: int | None = None
    """Responses per no-grad scoring pass (steps 3-4). None: mini_batch_size, at least 32. No activations are kept
    for a backward there, so it can be larger than mini_batch_size: fewer, bigger passes."""
    logprob_chunk_tokens: int | None = None
    """Response positions whose logits exist at once while log-probs are computed (None: about 2**25 logits)."""

    # ------------------------------------------------------------------ bookkeeping
    seed: int = 0
    """Seeds the dataloader order, the minibatch shuffles and (via torch) sampling."""
    progress: bool = True
    """tqdm progress bars for rollouts and updates."""
    log_every: int = 0
    """Print a one-line summary every N steps (0: never)."""
    checkpoint_dir: str | None = None
    """Where `save_every` writes checkpoints (the last good one is kept when training stops on a non-finite value)."""
    save_every: int = 0
    """Save a checkpoint to `checkpoint_dir` every N steps (0: only when you call `save_checkpoint`)."""

    # ------------------------------------------------------------------ derived (computed, not set)
    backward_batch_size: int = field(init=False)
    """mini_batch_size * gradient_accumulation_steps: responses per optimizer step."""

    def __post_init__(self):
        self.backward_batch_size = self.mini_batch_size * self.gradient_accumulation_steps
        self.validate()

    def validate(self) -> None:
        """Check the fields together; raise ValueError naming the field(s) at fault."""
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.backward_batch_size:
            raise ValueError(
                f"PPOConfig: batch_size ({self.batch_size}) must be a multiple of mini_batch_size * "
                f"gradient_accumulation_steps ({self.mini_batch_size} * {self.gradient_accumulation_steps} = "
                f"{self.backward_batch_size}), the number of responses per optimizer step")
        if self.whiten_rewards and self.batch_size < 8:
            raise ValueError(f"PPOConfig: whiten_rewards needs batch_size >= 8 for a usable variance, got {self.batch_size}")
        checks = [("kl_estimator", KL_ESTIMATORS), ("value_model", VALUE_MODELS), ("optimizer", OPTIMIZERS)]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"PPOConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ("learning_rate", "temperature", "cliprange", "cliprange_value", "kl_target", "kl_horizon", "adam_eps")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"PPOConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "lam", "difficulty_ema", "difficulty_explore"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PPOConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.kl_coef < 0:
            raise ValueError(f"PPOConfig.kl_coef must be >= 0, got {self.kl_coef}")
        for name in ("fast_rollout", "fast_forward", "cuda_graphs"):
            if getattr(self, name) not in SWITCHES:
                raise ValueError(f"PPOConfig.{name} must be 'auto', True or False, got {getattr(self, name)!r}")
        for name in ("length_bucket", "forward_batch_size", "logprob_chunk_tokens"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"PPOConfig.{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.rollout_engine is not None and not isinstance(self.rollout_engine, dict):
            raise ValueError(f"PPOConfig.rollout_engine must be a dict of RolloutEngine options or None, got "
                             f"{type(self.rollout_engine).__name__}")
        if self.save_every and not self.checkpoint_dir:
            raise ValueError("PPOConfig.save_every needs checkpoint_dir")

    @property
    def num_mini_batches(self) -> int:
        """Forward/backward passes per PPO epoch."""
        return self.batch_size // self.mini_batch_size

    @property
    def optimizer_steps_per_step(self) -> int:
        """Optimizer steps made by one `step()` call."""
        return self.ppo_epochs * self.batch_size // self.backward_batch_size

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, values: dict) -> "PPOConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"PPOConfig: unknown field(s) {unknown}")
        return cls(**values)

    def replace(self, **changes) -> "PPOConfig":
        """A copy with some fields changed (validated again)."""
        return self.from_dict({**self.to_dict(), **changes})

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **overrides) -> "PPOConfig":
        """The tiny offline world on a CPU: a 1M-parameter policy with LoRA r=16 on every linear layer, ~1 s per step
        (learning rate and KL coefficient from a sweep: scripts/tiny_ppo_win.py, docs/PPO.md)."""
        values = dict(model_name="tiny-qwen2-ppo", learning_rate=5e-4, batch_size=32, mini_batch_size=8,
                      gradient_accumulation_steps=1, ppo_epochs=4, temperature=0.7, max_new_tokens=48,
                      kl_coef=0.1, missing_eos_penalty=-1.0)
        return cls(**{**values, **overrides})

    @classmethod
    def article(cls, **overrides) -> "PPOConfig":
        """Exactly the article's section 3.3 values (Qwen2-1.5B on a GPU)."""
        values = dict(model_name="qwen2-1.5b-ppo", learning_rate=1.41e-5, batch_size=32, mini_batch_size=8,
                      gradient_accumulation_steps=4, ppo_epochs=4, remove_unused_columns=False)
        return cls(**{**values, **overrides})
