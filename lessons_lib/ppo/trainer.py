"""`PPOTrainer`: the article's stepped PPO loop, made real (lesson 04 dissects it, lesson 08 extends it).

    for epoch, batch in enumerate(trainer.dataloader):
        responses = trainer.generate(batch["input_ids"], return_prompt=False, generate_kwargs={...})   # step 1-2
        rewards = trainer.compute_reward(responses=responses, queries=batch["input_ids"])             # step 5
        stats = trainer.step(queries=batch["input_ids"], responses=responses, rewards=rewards)        # steps 2-9

`step()` runs the numbered steps of DESIGN.md "The PPO loop", one public method each (the lesson's widget
calls them one at a time):
  2   `prepare_rollout`  pad, cut after EOS                                  (rollout.truncate_after_eos)
  3-4 `score_tokens`     policy/reference log-probs, entropy, values          (no grad, one minibatch at a time)
  5   `final_scores`     score normalisation / clipping, EOS-trick penalty
  6-7 `kl_rewards`       per-token KL-shaped rewards, optional reward whitening   (core.compute_rewards)
  8   `advantages`       GAE, advantage whitening                              (core.compute_gae)
  9   `update`           minibatch epochs, gradient accumulation, clipped losses, diagnostics
      `finish_step`      stats, adaptive KL, difficulty statistics, step counter, checkpoint, log line
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections import defaultdict
from contextlib import nullcontext

import torch

from lessons_lib.data import left_pad

from .config import PPOConfig
from .core import (AdaptiveKLController, FixedKLController, RunningMoments, compute_gae, compute_rewards,
                   masked_whiten, policy_loss, value_loss)
from .distributed import init_distributed, sampling_seed
from .rollout import (Rollout, ValueHead, critic_forward, disable_dropout, fix_bnb_cpu_repacking, pad_right,
                      sample_responses, sampling_kwargs, truncate_after_eos)
from .sampler import DifficultySampler, PromptLoader, prepare_prompts
from .scoring import as_reward_fn, critic_source, rule_fn, to_scores
from .speed import FastPaths, pad_columns, round_up
from .stats import log_line, rollout_stats


class NonFiniteError(FloatingPointError):
    """Training met a NaN or inf (reward, loss or gradient) and stopped before applying it."""


class PPOTrainer(FastPaths):
    """PPO for causal LMs with an explicit loop; see the module docstring and docs/PPO.md."""

    def __init__(self, config: PPOConfig | None = None, model=None, ref_model=None, tokenizer=None, dataset=None,
                 reward_model=None, reward_fns=(), optimizer=None):
        if model is None or tokenizer is None:
            raise ValueError("PPOTrainer needs a model and its tokenizer")
        self.config = config = config or PPOConfig()
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("PPOTrainer: the tokenizer needs both a pad token and an EOS token")
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            warnings.warn("PPOTrainer: the pad token is the EOS token. Rollouts stay correct here (masks come from the "
                          "first EOS, not from padding), but a model trained with pad = EOS often learns to never "
                          "stop [N+]: give the tokenizer its own pad token", stacklevel=2)
        # several processes (accelerate launch / torchrun): docs/SCALING.md; None with one process
        self.dist = init_distributed()
        if self.dist is not None:
            self.dist.check_config(config)
            if not self.dist.is_main_process:      # one progress bar and one log line: the main process's
                config = self.config = config.replace(progress=False, log_every=0)
        torch.manual_seed(config.seed if self.dist is None else sampling_seed(config.seed, self.dist.rank))
        self.model, self.tokenizer = model, tokenizer
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.device = next(model.parameters()).device
        self.is_peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        if config.disable_dropout:
            disable_dropout(model)
        fix_bnb_cpu_repacking(model)
        self.ref_model = self._reference(ref_model)
        self.reward_model = reward_model
        self.reward_fn = as_reward_fn(reward_model, tokenizer)
        pairs = [entry if isinstance(entry, (tuple, list)) else (entry, 1.0) for entry in reward_fns]
        self.reward_fns = [(fn, rule_fn(fn), float(w)) for fn, w in pairs]
        self.value_head, self.critic = self._value_function(reward_model)
        value = self.value_head if self.value_head is not None else self.critic
        self._params = [p for p in model.parameters() if p.requires_grad] + [
            p for p in value.parameters() if p.requires_grad]
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("PPOTrainer: the model has no trainable parameters (attach LoRA adapters or unfreeze it)")
        if self.dist is not None:                  # every process starts from the main process's trainable weights
            self.dist.check_device(self.device)
            self.dist.check_same([p for p in model.parameters() if not p.requires_grad], "the frozen weights")
            self.dist.broadcast_parameters(self._params)
        self.optimizer = optimizer or self._optimizer()
        self.kl_ctl = (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
                       if config.adaptive_kl else FixedKLController(config.kl_coef))
        self.score_moments = RunningMoments()
        self.shuffle_generator = torch.Generator().manual_seed(config.seed + 1)
        self.current_step = 0
        self.sampling_temperature = config.temperature
        self.last_checkpoint, self.current_step_saved = None, None
        self.last_reward_parts: dict = {}
        self.last_rollout: Rollout | None = None
        self._queries: dict[tuple, dict] = {}
        self._warned: set = set()
        self._setup_speed()
        self.dataloader = None
        if dataset is not None:
            dataset = prepare_prompts(dataset, tokenizer, config.max_prompt_length)
            sampler = DifficultySampler(len(dataset), config.batch_size, config.seed, config.difficulty_ema,
                                        config.difficulty_explore)
            loader = PromptLoader if self.dist is None else self.dist.prompt_loader   # a process: its slice
            self.dataloader = loader(dataset, config.batch_size, sampler, config.remove_unused_columns,
                                     on_batch=self._remember_batch)

    # ------------------------------------------------------------------------------------------ construction
    def _reference(self, ref_model):
        if ref_model is None and self.is_peft:
            return None                       # the policy with its adapters disabled: no second copy in memory
        ref = ref_model if ref_model is not None else copy.deepcopy(self.model)
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _value_function(self, reward_model):
        if self.config.value_model == "head":
            return ValueHead(self.model.config.hidden_size).to(self.device), None
        critic = copy.deepcopy(critic_source(reward_model, self.reward_fn)).to(self.device)
        if critic.config.vocab_size != self.model.config.vocab_size:
            raise ValueError("value_model='reward' needs a reward model that shares the policy's tokenizer")
        for p in critic.parameters():
            p.requires_grad_(True)
        disable_dropout(critic)
        return None, critic.train()

    @property
    def is_main_process(self) -> bool:
        """True on the process that logs and writes checkpoints (always, with one process)."""
        return self.dist is None or self.dist.is_main_process

    def _optimizer(self):
        from .optim import AdamTFStyle

        cfg = self.config
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else AdamTFStyle
        return cls(self._params, lr=cfg.learning_rate, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)

    def _remember_batch(self, batch: dict) -> None:
        """Map each prompt's token ids to its instruction and dataset row, for compute_reward and the sampler."""
        self._queries = {tuple(ids.tolist()): {"instruction": text, "prompt_id": pid}
                         for ids, text, pid in zip(batch["input_ids"], batch["instruction"], batch["prompt_id"])}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------------------------------ step 1: generate
    def generate(self, query_tensor, return_prompt: bool = True, generate_kwargs: dict | None = None,
                 batch_size: int | None = None, **kwargs):
        """Sample one response per query (pure sampling at the config temperature unless overridden), cut after EOS.

        `query_tensor`: a 1-D tensor or a list of them. Returns the same structure: response tensors (with the
        prompt in front when `return_prompt`). `generate_kwargs` and extra keyword arguments go to `model.generate`.
        """
        single = isinstance(query_tensor, torch.Tensor) and query_tensor.ndim == 1
        queries = [query_tensor] if single else [q[q != self.pad_id] if self.pad_id != self.eos_id else q
                                                 for q in query_tensor]
        gen = {**(generate_kwargs or {}), **kwargs}
        self.sampling_temperature = float(gen.get("temperature", self.config.temperature))
        if self.sampling_temperature != self.config.temperature:
            self._warn_once("temperature", f"generate: temperature {self.sampling_temperature} differs from "
                            f"config.temperature {self.config.temperature}; step() will use "
                            f"{self.sampling_temperature}, the one the responses were sampled with")
        gen_kwargs = sampling_kwargs(gen, self.config.temperature, self.config.max_new_tokens, self.eos_id, self.pad_id)
        queries_cpu, chunk = [q.cpu() for q in queries], batch_size or len(queries)
        engine = self._rollout_engine(gen_kwargs)
        try:
            responses = sample_responses(self.model, queries_cpu, gen_kwargs, chunk, self.config.progress, engine)
        except NotImplementedError as err:    # e.g. an adapter type the engine cannot merge
            if engine is None or self.config.fast_rollout is True:
                raise
            self._engine = False
            self._warn_once("engine", f"generate: the rollout engine cannot run this model ({err}); using "
                            "model.generate from now on")
            responses = sample_responses(self.model, queries_cpu, gen_kwargs, chunk, self.config.progress)
        out = [torch.cat([q.cpu(), r]) for q, r in zip(queries, responses)] if return_prompt else responses
        return out[0] if single else out

    # ------------------------------------------------------------------------------------------ step 5: rewards
    def prompt_texts(self, queries) -> list[str]:
        """The instruction behind each query (known for dataloader batches; otherwise the decoded prompt)."""
        texts = []
        for q in queries:
            info = self._queries.get(tuple(q.tolist()))
            texts.append(info["instruction"] if info else self.tokenizer.decode(q, skip_special_tokens=True))
        return texts

    def compute_reward(self, responses, queries, scores=None) -> torch.Tensor:
        """One score per response, (B,): the reward model's, plus weighted rule rewards (hybrid).

        Given `scores` are returned as they are. Beware: a dataset's `score` column rates the dataset's own
        answer, not these freshly sampled responses (see docs/PPO.md, "the score trap").
        """
        if scores is not None:
            self._warn_once("scores", "compute_reward(scores=...) uses the given scores as they are; a dataset's "
                            "score rates the dataset's answer, not the freshly sampled responses")
            return to_scores(scores, len(responses), "compute_reward(scores=...)")
        if self.reward_fn is None and not self.reward_fns:
            raise ValueError("compute_reward: no reward_model, no reward_fns and no scores; nothing to score with")
        prompts = self.prompt_texts(queries)
        texts = self.tokenizer.batch_decode([r.cpu() for r in responses], skip_special_tokens=True)
        total = torch.zeros(len(texts))
        self.last_reward_parts = {}
        if self.reward_fn is not None:
            rm = to_scores(self.reward_fn(prompts, texts), len(texts), "reward model")
            self.last_reward_parts["reward_model"] = rm
            total += rm
        for fn, two_argument_fn, weight in self.reward_fns:
            rule = torch.tensor([float(two_argument_fn(p, r)) for p, r in zip(prompts, texts)])
            self.last_reward_parts[getattr(fn, "__name__", "rule")] = rule
            total += weight * rule
        return total

    # ------------------------------------------------------------------------------------------ steps 2-9
    def step(self, queries, responses, rewards=None, scores=None) -> dict:
        """One PPO iteration on a batch of (query, response, reward); returns a flat dict of float stats."""
        t0 = time.perf_counter()
        raw = self.check_scores(queries, responses, rewards if rewards is not None else scores)
        self._anneal_lr()
        roll = self.prepare_rollout(queries, responses)                   # step 2
        t1 = time.perf_counter()
        self.score_tokens(roll)                                           # steps 3-4
        roll.scores = self.final_scores(raw, roll.has_eos)                # step 5
        self.kl_rewards(roll)                                             # steps 6-7
        self.advantages(roll)                                             # step 8
        t2 = time.perf_counter()
        stats = self.update(roll)                                         # step 9
        t3 = time.perf_counter()
        return self.finish_step(queries, roll, raw, stats, {"time/ppo/forward": t2 - t1, "time/ppo/optimize": t3 - t2,
                                                            "time/ppo/total": t3 - t0})

    def check_scores(self, queries, responses, rewards) -> torch.Tensor:
        """One finite float per response, as a (B,) tensor; raises a clear error otherwise."""
        if rewards is None:
            raise ValueError("step: pass rewards= (or scores=), one per response")
        raw = to_scores(rewards, len(responses), "step(rewards)")
        size = self.config.batch_size if self.dist is None else self.config.batch_size // self.dist.world_size
        if len(queries) != size or len(responses) != len(queries):
            per_process = "" if self.dist is None else f" ({size} per process)"
            raise ValueError(f"step: got {len(queries)} queries and {len(responses)} responses, config.batch_size is "
                             f"{self.config.batch_size}{per_process}")
        seen = raw if self.dist is None else self.dist.gather(raw)   # the global batch: every process stops together
        if not torch.isfinite(seen).all():
            bad = torch.nonzero(~torch.isfinite(seen)).flatten().tolist()
            self._stop(f"reward(s) of response(s) {bad} of the global batch: {seen[bad].tolist()}")
        return raw

    def finish_step(self, queries, roll: Rollout, raw: torch.Tensor, stats: dict, times: dict | None = None) -> dict:
        """After the update: rollout statistics, the KL controller, the sampler, the step counter, saving, logging."""
        cfg = self.config
        reduce = rollout_stats if self.dist is None else self.dist.rollout_stats   # of the global batch
        stats.update(reduce(roll, raw, self.kl_ctl.value, self.last_reward_parts))
        self.kl_ctl.update(stats["objective/kl"], cfg.batch_size)
        self._update_sampler(queries, roll)
        self.last_rollout = roll
        self.current_step += 1
        stats.update(times or {})
        if cfg.save_every and self.current_step % cfg.save_every == 0:
            self.save_checkpoint(cfg.checkpoint_dir)
        if cfg.log_every and self.current_step % cfg.log_every == 0:
            print(f"step {self.current_step:>4} | " + self.log_line(stats))
        return stats

    def _stop(self, what: str, during_update: bool = False):
        n = self.current_step + 1
        where = (f"the last good checkpoint is {self.last_checkpoint} (step {self.current_step_saved})"
                 if self.last_checkpoint else "no checkpoint was saved (set checkpoint_dir and save_every)")
        partly = " (earlier optimizer steps of this PPO step were applied: resume from the checkpoint)" \
            if during_update else ""
        raise NonFiniteError(f"step {n}: non-finite {what}. Training stopped before applying it{partly}; {where}.")

    def _anneal_lr(self) -> None:
        if not self.config.anneal_lr:
            return
        total = self.config.total_steps or (len(self.dataloader) if self.dataloader else None)
        if not total:
            raise ValueError("anneal_lr needs config.total_steps (or a dataset, to default to one pass over it)")
        frac = max(0.0, 1.0 - self.current_step / total)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate * frac

    def prepare_rollout(self, queries, responses) -> Rollout:
        """Step 2: cut every response after its first EOS, pad queries left and responses right."""
        cut = [truncate_after_eos(r.cpu(), self.eos_id, self.pad_id) for r in responses]
        empty = [i for i, (r, _) in enumerate(cut) if len(r) == 0]
        if empty:
            raise ValueError(f"step: response(s) {empty} are empty; every response needs at least one token")
        q_ids, q_mask = left_pad([q.cpu() for q in queries], self.pad_id)            # (B, Tq)
        r_ids, r_mask = pad_right([r for r, _ in cut], self.pad_id)                  # (B, Tr)
        has_eos = torch.tensor([e for _, e in cut])
        d = self.device
        return Rollout(q_ids.to(d), q_mask.to(d), r_ids.to(d), r_mask.to(d), has_eos.to(d))

    @torch.no_grad()
    def score_tokens(self, roll: Rollout) -> None:
        """Steps 3-4: log-probs under the policy and the reference, entropy, values; one minibatch at a time."""
        if not self._forward_checked:
            self._check_forward(roll)
        mb, T = self.config.forward_batch_size or max(self.config.mini_batch_size, 32), self.sampling_temperature
        parts = defaultdict(list)
        names = ("query_ids", "query_mask", "response_ids", "response_mask")
        tensors, Tr = {n: getattr(roll, n) for n in names}, roll.response_ids.shape[1]
        if self._scoring is not None:    # widths rounded up to buckets: one captured graph serves many steps
            bucket = self.config.length_bucket or 32
            tensors = pad_columns(tensors, round_up(roll.query_ids.shape[1], bucket), round_up(Tr, bucket), self.pad_id)
        padded = not bool(tensors["query_mask"].all() and tensors["response_mask"].all())
        self.model.eval()
        for start in range(0, roll.query_ids.shape[0], mb):
            chunk = {n: t[start:start + mb] for n, t in tensors.items()}
            run = self._scoring if self._scoring is not None else lambda c, **kw: self._score_passes(**c, **kw)
            for name, t in run(chunk, temperature=T, padded=padded).items():
                parts[name].append(t[:, :Tr].float())
        self.model.train()
        mask = roll.response_mask.float()
        for name, chunks in parts.items():
            setattr(roll, name, torch.cat(chunks) * mask)                           # (B, Tr)

    def _score_passes(self, query_ids, query_mask, response_ids, response_mask, temperature: float,
                      padded: bool = True) -> dict:
        """The no-grad passes of one chunk of rows: policy log-probs, entropy and values, then reference log-probs."""
        rows = (query_ids, query_mask, response_ids, response_mask)
        logprobs, entropy, hidden = self.forward(*rows, temperature, with_entropy=True,
                                                 with_hidden=self.value_head is not None, padded=padded)
        ref, context = (self.ref_forward, nullcontext) if self.ref_model is not None else \
            (self.forward, self.model.disable_adapter)     # the reference: adapters off, no second copy
        with context():
            ref_logprobs = ref(*rows, temperature, padded=padded)[0]
        values = self.value_head(hidden) if self.value_head is not None else critic_forward(self.critic, *rows)
        return {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "entropy": entropy, "values": values}

    def final_scores(self, raw: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        """Step 5: optional running normalisation and clipping, then the EOS trick for unfinished responses."""
        cfg, scores = self.config, raw.to(self.device)
        if cfg.score_norm:
            self.score_moments.update(raw if self.dist is None else self.dist.gather(raw))
            scores = (scores - self.score_moments.mean) / max(self.score_moments.std, 1e-8)
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, torch.full_like(scores, cfg.missing_eos_penalty))
        return scores

    def kl_rewards(self, roll: Rollout) -> None:
        """Steps 6-7: per-token rewards -beta * KL_t, plus the score at the last token; optional reward whitening."""
        cfg, mask = self.config, roll.response_mask
        roll.rewards, roll.kl = compute_rewards(roll.scores, roll.logprobs, roll.ref_logprobs, mask,
                                                self.kl_ctl.value, cfg.kl_estimator)
        whiten = masked_whiten if self.dist is None else self.dist.masked_whiten   # moments of the global batch
        if cfg.whiten_rewards:
            roll.rewards = whiten(roll.rewards, mask, shift_mean=False)

    def advantages(self, roll: Rollout) -> None:
        """Step 8: GAE over the response tokens, then advantage whitening."""
        cfg, mask = self.config, roll.response_mask
        roll.advantages, roll.returns = compute_gae(roll.rewards, roll.values, mask, cfg.gamma, cfg.lam)
        whiten = masked_whiten if self.dist is None else self.dist.masked_whiten
        if cfg.whiten_advantages:
            roll.advantages = whiten(roll.advantages, mask)

    def _minibatch_loss(self, roll: Rollout, idx: torch.Tensor):
        """The PPO loss of rollout rows `idx` (padding columns trimmed) and its diagnostics."""
        return self._loss(**roll.rows(idx))

    def _loss(self, query_ids, query_mask, response_ids, response_mask, logprobs, values, advantages, returns,
              temperature: float | None = None, padded: bool = True):
        """Clipped policy loss + vf_coef * clipped value loss of one minibatch (old log-probs and values in)."""
        cfg, rows = self.config, (query_ids, query_mask, response_ids, response_mask)
        new_logprobs, _, hidden = self.forward(*rows, temperature or self.sampling_temperature,
                                               with_hidden=self.value_head is not None, padded=padded)
        new_values = self.value_head(hidden) if self.value_head is not None else critic_forward(self.critic, *rows)
        pg_loss, pg = policy_loss(new_logprobs, logprobs, advantages, response_mask, cfg.cliprange)
        vf_loss, vf = value_loss(new_values, values, returns, response_mask, cfg.cliprange_value)
        loss = pg_loss + cfg.vf_coef * vf_loss
        stats = {"ppo/loss/policy": pg_loss.detach(), "ppo/loss/value": vf_loss.detach(), "ppo/loss/total": loss.detach(),
                 "ppo/policy/approxkl": pg["approxkl"], "ppo/policy/clipfrac": pg["clipfrac"],
                 "ppo/policy/ratio": pg["ratio"], "ppo/val/clipfrac": vf["clipfrac"], "ppo/val/error": vf["error"]}
        return loss, stats

    def update(self, roll: Rollout) -> dict:
        """Step 9: `ppo_epochs` passes in random order; `gradient_accumulation_steps` minibatches per optimizer step."""
        from tqdm.auto import tqdm

        cfg, B = self.config, roll.query_ids.shape[0]
        mb, bbs, tokens = cfg.mini_batch_size, cfg.backward_batch_size, []
        if self.dist is not None:             # each process takes its 1/N of every minibatch (docs/SCALING.md)
            mb, bbs = mb // self.dist.world_size, bbs // self.dist.world_size
        collected = defaultdict(list)
        bar = tqdm(total=cfg.ppo_epochs * cfg.num_mini_batches, desc=f"ppo step {self.current_step + 1}", unit="mb", leave=False,
                   disable=not cfg.progress)
        static, padded = self._static_rows(roll) if self._graphed is not None else (None, True)
        orders = [torch.randperm(B, generator=self.shuffle_generator).to(self.device) for _ in range(cfg.ppo_epochs)]
        starts = [(epoch, mb_start) for epoch in range(cfg.ppo_epochs) for start in range(0, B, bbs)
                  for mb_start in range(start, start + bbs, mb)]
        if self.dist is not None:             # weight: this process's share of each global minibatch's tokens
            counts = torch.stack([roll.response_mask[orders[e][i:i + mb]].sum() for e, i in starts])
            tokens, shares = counts.tolist(), self.dist.token_shares(counts).tolist()
        n_mb = 0                              # minibatches so far: the index into starts and shares
        self.model.train()
        with bar:
            for epoch in range(cfg.ppo_epochs):
                order, bad = orders[epoch], None
                for start in range(0, B, bbs):
                    self.optimizer.zero_grad(set_to_none=static is None)   # graphs keep writing into the same .grad
                    for mb_start in range(start, start + bbs, mb):
                        idx = order[mb_start:mb_start + mb]
                        weight = 1.0 if self.dist is None else shares[n_mb]
                        n_mb += 1
                        if static is not None:        # forward + backward: one CUDA graph replay (graphs.py)
                            batch = {key: v[idx] for key, v in static.items()}
                            if self.dist is not None:  # a graph input, so one graph serves every weight
                                batch["weight"] = torch.tensor(weight, dtype=torch.float32, device=self.device)
                            loss, stats = self._graphed(batch, temperature=self.sampling_temperature, padded=padded)
                        else:
                            loss, stats = self._minibatch_loss(roll, idx)
                            loss = loss * weight
                        if not bool(torch.isfinite(loss)):
                            bad = bad or (f"loss in PPO epoch {epoch + 1}, minibatch {mb_start // mb + 1}"
                                          f" ({', '.join(f'{k}={float(v):.4g}' for k, v in stats.items() if 'loss' in k)})")
                            if self.dist is None:
                                self._stop(bad, during_update=True)
                        if static is None:
                            (loss / cfg.gradient_accumulation_steps).backward()
                        for key, value in stats.items():
                            collected[key].append(value)
                        bar.update(1)
                    if self.dist is not None:         # sum the weighted gradients before clipping; stop together
                        if self.dist.sum_gradients(self._params, nonfinite=int(bad is not None)):
                            self._stop(bad or f"loss on another process in PPO epoch {epoch + 1}", during_update=True)
                    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
                    grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm)
                    if not torch.isfinite(grad_norm):
                        self._stop(f"gradient norm ({float(grad_norm)}) in PPO epoch {epoch + 1}", during_update=True)
                    self.optimizer.step()
                    collected["ppo/grad_norm"].append(grad_norm.detach())
        if self.dist is None:
            out = {key: float(torch.stack(values).float().mean()) for key, values in collected.items()}
        else:                                 # token-weighted over the processes: the global minibatches' numbers
            out = self.dist.reduce_update_stats(collected, tokens)
        out["ppo/learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        return out

    # ------------------------------------------------------------------------------------------ after a step
    def _update_sampler(self, queries, roll: Rollout) -> None:
        if self.dataloader is None:
            return
        mask = roll.response_mask.float()
        entropy = (roll.entropy * mask).sum(1) / mask.sum(1)
        ids, rewards, entropies = [], [], []
        for i, q in enumerate(queries):
            info = self._queries.get(tuple(q.tolist()))
            if info is not None:
                ids.append(info["prompt_id"])
                rewards.append(float(roll.scores[i]))
                entropies.append(float(entropy[i]))
        if self.dist is not None:             # every process folds in the whole global batch: samplers stay equal
            ids, rewards, entropies = self.dist.gather_sampler_updates(ids, rewards, entropies)
        self.dataloader.sampler.update(ids, rewards, entropies)

    log_line = staticmethod(log_line)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory) -> str:
        """Save everything needed to continue exactly (see lessons_lib.ppo.checkpoint); returns the folder."""
        from .checkpoint import save_checkpoint

        return save_checkpoint(self, directory)

    @classmethod
    def from_checkpoint(cls, directory, model, tokenizer, dataset=None, reward_model=None, ref_model=None,
                        reward_fns=(), **config_overrides) -> "PPOTrainer":
        """Rebuild a trainer from `save_checkpoint`'s folder around a freshly loaded base `model`."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(cls, directory, model, tokenizer, dataset=dataset, reward_model=reward_model,
                               ref_model=ref_model, reward_fns=reward_fns, **config_overrides)
