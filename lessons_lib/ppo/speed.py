"""What makes `PPOTrainer` fast on a GPU (docs/PPO.md "Performance"), kept apart from the loop in trainer.py:

- `_setup_speed`: the forward of steps 3-4 and 9 (`PPOConfig.fast_forward`: FastDecoder or transformers, always
  with `forward.linear_logprobs`), the reward model through FastDecoder, CUDA graphs for the scoring passes and the
  minibatch updates (`cuda_graphs`, one memory pool for all of them);
- `_check_forward`: with fast_forward="auto", FastDecoder checked once against transformers (fallback on failure);
- `_rollout_engine`: step 1's RolloutEngine (`fast_rollout`), built on first use;
- `_graph_loss`, `_static_rows`: what the captured update runs, on minibatches padded to bucketed lengths.
"""

from __future__ import annotations

import warnings

from .forward import PolicyForward, check_fast_forward, choose_backend, pad_columns, round_up
from .graphs import GraphedBackward, GraphedForward, GraphPool
from .rollout import Rollout, rollout_engine_problem
from .scoring import fast_reward_fn

__all__ = ["FastPaths", "pad_columns", "round_up"]


class FastPaths:
    """The speed levers of PPOTrainer (a mixin: it reads the trainer's model, config, device and parameters)."""

    def _setup_speed(self, backend: tuple[str, str] | None = None) -> None:
        """The forward of steps 3-4 and 9 (PPOConfig.fast_forward), CUDA graphs for the update (cuda_graphs); step 1's
        RolloutEngine is built on first use (fast_rollout). docs/PPO.md "Performance" says what each buys."""
        cfg = self.config
        self.forward_backend, self.forward_reason = backend or choose_backend(self.model, cfg.fast_forward,
                                                                              self.device)
        self._forward_checked = self.forward_backend != "fast" or cfg.fast_forward is True
        self.forward = PolicyForward(self.model, self.forward_backend, cfg.logprob_chunk_tokens)
        self.ref_forward = None if self.ref_model is None else PolicyForward(
            self.ref_model, choose_backend(self.ref_model, False, self.device)[0], cfg.logprob_chunk_tokens)
        graphs = cfg.cuda_graphs is True or (cfg.cuda_graphs == "auto" and self.forward_backend == "fast")
        if graphs and self.device.type != "cuda":
            if cfg.cuda_graphs is True:
                raise ValueError(f"PPOConfig.cuda_graphs=True needs the model on a CUDA device, it is on {self.device}")
            graphs = False
        pool = GraphPool()                  # one memory pool for every graph: the largest one's memory, not the sum
        # a RewardModel's backbone through FastDecoder too, when the policy's runs through it (or fast_forward=True)
        self._plain_reward_fn = getattr(self, "_plain_reward_fn", self.reward_fn)
        fast_rm = cfg.fast_forward if self.forward_backend == "fast" or cfg.fast_forward is True else False
        self.reward_fn = fast_reward_fn(self.reward_model, self._plain_reward_fn, fast_rm, graphs, pool)
        # minibatches padded to bucketed lengths, forward + backward replayed from a CUDA graph (eager on a CPU)
        self._graphed = GraphedBackward(self._graph_loss, self._params, enabled=graphs, pool=pool) \
            if graphs or cfg.length_bucket else None
        # the scoring passes too (policy + reference + values as one replay), with the value head and LoRA reference
        self._scoring = GraphedForward(self._score_passes, enabled=graphs, pool=pool) if self._graphed is not None \
            and self.value_head is not None and self.ref_model is None else None
        self._engine = getattr(self, "_engine", None)

    def _check_forward(self, roll: Rollout) -> None:
        """fast_forward="auto": once, FastDecoder's forward and backward on two rows against transformers'; on any
        failure, a warning and transformers' forward from then on (check_fast_forward)."""
        self._forward_checked = True
        rows = (roll.query_ids[:2], roll.query_mask[:2], roll.response_ids[:2], roll.response_mask[:2])
        problem = check_fast_forward(self.forward, PolicyForward(self.model, "hf"), rows, self.sampling_temperature)
        for p in self._params:
            p.grad = None
        if problem is not None:
            warnings.warn(f"PPOTrainer: FastDecoder failed its check on this machine ({problem}); using transformers' "
                          "forward (fast_forward=False) from now on", stacklevel=3)
            self._setup_speed(("hf", f"FastDecoder failed its check: {problem}"))

    def _rollout_engine(self, gen_kwargs: dict):
        """Step 1's RolloutEngine (PPOConfig.fast_rollout), built on first use; None means `model.generate`."""
        setting = self.config.fast_rollout
        problem = "the engine failed earlier" if self._engine is False else \
            rollout_engine_problem(self.model, setting, gen_kwargs)
        if problem is not None:
            if setting is True:
                raise ValueError(f"PPOConfig.fast_rollout=True, but the rollout engine cannot be used: {problem}")
            if setting == "auto" and "does not support" in problem:
                self._warn_once("engine-kwargs", f"generate: using model.generate for these rollouts: {problem}")
            return None
        if self._engine is None:
            from lessons_lib.fast_generate import RolloutEngine

            options = {**self._engine_defaults(), **(self.config.rollout_engine or {})}
            self._engine = RolloutEngine(self.model, **options)
        return self._engine

    def _engine_defaults(self) -> dict:
        """On a GPU with Triton: the engine's RMSNorm and RoPE as lessons_lib kernels (one kernel each; measured
        faster in benchmarks/results/rollout.md). PPOConfig.rollout_engine overrides."""
        from lessons_lib.kernels._common import HAS_TRITON

        return {"kernels": "triton"} if self.device.type == "cuda" and HAS_TRITON else {}

    def _graph_loss(self, temperature: float, padded: bool, weight: torch.Tensor | None = None, **minibatch):
        """What `GraphedBackward` runs and differentiates: the minibatch loss / gradient_accumulation_steps, times
        this process's token share `weight` (a 0-d tensor, an input of the graph) when several processes train."""
        loss, stats = self._loss(**minibatch, temperature=temperature, padded=padded)
        loss = loss / self.config.gradient_accumulation_steps
        return (loss if weight is None else loss * weight), stats

    def _static_rows(self, roll: Rollout) -> tuple[dict, bool]:
        """The rollout's tensors widened to lengths rounded up to `length_bucket` (32 by default), so that every
        minibatch of this step, and of later steps with lengths in the same buckets, has one shape; and whether
        there is any padding (if not, attention runs without a mask)."""
        bucket = self.config.length_bucket or 32
        names = ("query_ids", "query_mask", "response_ids", "response_mask", "logprobs", "values", "advantages",
                 "returns")
        static = pad_columns({n: getattr(roll, n) for n in names}, round_up(roll.query_ids.shape[1], bucket),
                             round_up(roll.response_ids.shape[1], bucket), self.pad_id)
        return static, not bool(static["query_mask"].all() and static["response_mask"].all())
