"""Data-parallel PPO on several processes (lesson 09, docs/SCALING.md): what is split, what is shared, and how.

Start the same script N times (`accelerate launch --num_processes N train.py`, `torchrun --nproc_per_node N`, or
`accelerate.notebook_launcher`). `PPOTrainer` sees the launcher's environment (WORLD_SIZE > 1), sets up the process
group through `accelerate.PartialState` (NCCL on GPUs, each process on the GPU of its LOCAL_RANK; gloo on CPUs) and
keeps a `DistributedContext` in `trainer.dist`. Every collective below is a plain `torch.distributed` call.

Nothing wraps the model (no DDP): DDP hooks into every backward pass, which fights with the reference pass under
peft's `disable_adapter()`, gradient checkpointing, the separate value head and 4-bit weights. Instead the trainer
sums the gradients itself, once per optimizer step. The config describes the *algorithm*, not the hardware:
`batch_size` and `mini_batch_size` are global, so N processes run the same PPO as one process. Process r

  1. draws the same global batch from the same DifficultySampler (same seed, same statistics) and keeps its slice,
     rows [r * B/N, (r + 1) * B/N)                                                      (`ShardedPromptLoader`)
  2. samples with its own seed, seed + 100003 * r ([N] "different seeds per process"), and scores its responses
  3. computes log-probs, values, KL-shaped rewards and GAE for its own rows: per-row math, nothing to share
  4. whitens rewards and advantages with the mean and variance of the *global* batch, from all-reduced sums
     n, sum(x), sum(x^2) (old TRL whitened per process; global whitening equals one process)      (`masked_whiten`)
  5. runs the PPO epochs on its rows in minibatches of mini_batch_size / N (one shuffle, the same on every process);
     global minibatch k is the union of every process's minibatch k. Each process weights its loss by its share of
     the minibatch's tokens, and before every optimizer step the gradients are summed across processes, so every
     process takes the single-process step over that union       (`token_shares`, `sum_gradients`, then clipping)
  6. reports statistics of the global batch, reduced from sums and counts (a per-token mean is weighted by token
     counts, a variance combines means and second moments); only `time/*` stay per process   (`rollout_stats`)
  7. feeds every process's (prompt, score, entropy) to the sampler, the scores to the running normalisation and the
     global KL to the KL controller, so all of them stay identical across processes
  8. checkpoints: every process calls `save_checkpoint` (a collective); the main process writes, including every
     process's RNG state, and any number of processes can resume from it                    (checkpoint.py)
"""

from __future__ import annotations

import atexit
import os
import warnings
from dataclasses import dataclass

import torch

from .sampler import PromptLoader

SEED_STRIDE = 100003   # [N] "different seeds per process": local_seed = seed + rank * 100003


def sampling_seed(seed: int, rank: int) -> int:
    """The seed of process `rank`'s sampling RNG ([N]); process 0 keeps `seed`, so one process is unchanged."""
    return int(seed) + SEED_STRIDE * int(rank)


def init_distributed() -> "DistributedContext | None":
    """The `DistributedContext` of this process when a launcher started several, else None (one process).

    Uses a process group that already exists; otherwise, when WORLD_SIZE > 1, creates one with
    `accelerate.PartialState` (NCCL + this process's GPU where CUDA is available, gloo on CPUs).
    """
    import torch.distributed as dist

    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
        atexit.register(_destroy_process_group)
    if dist.get_world_size() == 1:
        return None
    rank = dist.get_rank()
    if torch.cuda.is_available() and "nccl" in str(dist.get_backend()):
        local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistributedContext(rank=rank, world_size=dist.get_world_size(), device=device)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class ShardedPromptLoader(PromptLoader):
    """One process's `PromptLoader`: the sampler draws the global batch (identical on every process: same seed, same
    statistics) and this process keeps its contiguous slice, rows [rank * B/N, (rank + 1) * B/N)."""

    def __init__(self, *args, rank: int, world_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.world_size = rank, world_size

    def collate(self, indices: list[int]) -> dict:
        share = len(indices) // self.world_size
        return super().collate(indices[self.rank * share:(self.rank + 1) * share])


@dataclass
class DistributedContext:
    """This process's place in the group and the collectives data-parallel PPO needs (see the module docstring)."""
    rank: int
    """This process's index, 0 .. world_size - 1 (0 is the main process: it logs and writes checkpoints)."""
    world_size: int
    """How many processes train together."""
    device: torch.device
    """Where collective tensors live: this process's GPU with NCCL, the CPU with gloo."""

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------ sizes and setup
    def local_size(self, size: int, name: str) -> int:
        """This process's share of a global size (batch_size, mini_batch_size); raises unless N divides it."""
        if size % self.world_size:
            raise ValueError(f"PPOConfig.{name} ({size}) must be a multiple of the number of processes "
                             f"({self.world_size}): each process takes {name} / {self.world_size} of it")
        return size // self.world_size

    def check_config(self, config) -> None:
        """batch_size and mini_batch_size are global: every process needs an equal, non-empty share of both."""
        self.local_size(config.mini_batch_size, "mini_batch_size")   # then batch_size and the backward batch divide too
        self.local_size(config.batch_size, "batch_size")

    def prompt_loader(self, *args, **kwargs) -> ShardedPromptLoader:
        return ShardedPromptLoader(*args, rank=self.rank, world_size=self.world_size, **kwargs)

    def check_device(self, device: torch.device, what: str = "the model") -> None:
        if self.device.type == "cuda" and torch.device(device) != self.device:
            raise ValueError(f"process {self.rank}: {what} is on {device}, but this process owns {self.device}. Load "
                             f"it with load_model(..., device='{self.device}') (load_model picks cuda:LOCAL_RANK by "
                             "itself under a launcher)")

    @torch.no_grad()
    def broadcast_parameters(self, params) -> None:
        """Copy the main process's values of `params` (the trainable weights) to every process, in place; warn when
        they differed (fine for fresh LoRA adapters, but a frozen reference copied from them would differ too)."""
        import torch.distributed as dist

        params = list(params)
        everyone = self.gather(self._checksums(params)).view(self.world_size, -1)      # (N, tensors)
        if any(not torch.equal(row, everyone[0]) for row in everyone[1:]):
            warnings.warn("PPOTrainer: the trainable weights differed between processes (e.g. adapters initialised "
                          "with different seeds); process 0's are used everywhere. Without LoRA the reference model "
                          "is a copy made before this: load the same weights on every process", stacklevel=3)
        for p in params:
            buffer = p.data.to(self.device)
            dist.broadcast(buffer, src=0)
            p.data.copy_(buffer)

    @torch.no_grad()
    def check_same(self, tensors, what: str) -> None:
        """Raise unless `tensors` hold the same values on every process (compared through a checksum per tensor)."""
        tensors = list(tensors)
        if any(type(t).__name__ == "DTensor" for t in tensors):
            raise NotImplementedError("PPOTrainer replicates the model on every process (data parallel); a model "
                                      "sharded with FSDP/ZeRO-3 is not supported: see docs/SCALING.md, "
                                      "'Larger than one GPU'")
        if not tensors:
            return
        everyone = self.gather(self._checksums(tensors)).view(self.world_size, -1)        # (N, tensors)
        differ = [r for r in range(self.world_size) if not torch.equal(everyone[r], everyone[0])]
        if differ:
            raise ValueError(f"{what} differ between process 0 and process(es) {differ}: every process must load the "
                             "same model (same checkpoint, same dtype, same quantization)")

    @staticmethod
    def _checksums(tensors) -> torch.Tensor:
        """One float64 number per tensor (its sum, times a small position weight), on the CPU: (tensors,)."""
        return torch.stack([t.detach().sum(dtype=torch.float64).cpu() * (i % 7 + 1) for i, t in enumerate(tensors)])

    # ------------------------------------------------------------------------------------------ collectives
    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over processes of a float64 copy of `values` (on this process's collective device)."""
        import torch.distributed as dist

        total = values.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(total)
        return total

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's `x` (same shape on every process) in rank order: (n, ...) -> (N * n, ...)."""
        import torch.distributed as dist

        local = x.detach().to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(x.device)

    def gather_objects(self, obj) -> list:
        """Every process's picklable `obj`, in rank order."""
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    # ------------------------------------------------------------------------------------------ step 7-8: whitening
    @torch.no_grad()
    def masked_moments(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (biased) variance of `x` over the real positions of *every* process's batch, from three sums."""
        m, xd = mask.double(), x.detach().double()
        n, s1, s2 = self.all_reduce(torch.stack([m.sum(), (xd * m).sum(), (xd * xd * m).sum()]))
        if n == 0:
            raise ValueError("masked_whiten: the mask is all zeros on every process; nothing to average over")
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0.0)
        return mean.to(x.device, x.dtype), var.to(x.device, x.dtype)

    def masked_whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                      eps: float = 1e-8) -> torch.Tensor:
        """`core.masked_whiten` with the moments of the global batch (what one process with all rows computes)."""
        mean, var = self.masked_moments(x, mask)
        whitened = (x - mean) * torch.rsqrt(var + eps)
        if not shift_mean:
            whitened = whitened + mean
        return whitened * mask.to(x.dtype)

    # ------------------------------------------------------------------------------------------ step 9: the update
    def token_shares(self, counts: torch.Tensor) -> torch.Tensor:
        """This process's share of every global minibatch's tokens: counts (minibatches,) -> n_r / n (float64, CPU).

        A process's loss is a mean over its own tokens; the single-process loss is the mean over all of them, so
        process r's loss gets the weight n_r / n and the gradients are then *summed*. (With equal token counts the
        weight is 1/N: the usual gradient average.) The minibatches of a whole update are known after the shuffle,
        so one all-reduce carries all their counts.
        """
        local = counts.detach().double().cpu()
        total = self.all_reduce(local).cpu()
        if (total == 0).any():
            raise ValueError("token_shares: a global minibatch has no response token on any process")
        return local / total

    @torch.no_grad()
    def sum_gradients(self, params, nonfinite: int = 0, bucket_numel: int = 1 << 24) -> int:
        """Sum every trainable parameter's gradient over the processes, in place, in flat buckets of up to
        `bucket_numel` values (one all-reduce per bucket instead of one per tensor, as DDP's buckets). This
        process's count of non-finite losses rides along in the last bucket; returns the count over all processes,
        so every process stops together when any one meets a NaN."""
        import torch.distributed as dist

        grads = []
        for p in params:
            if p.grad is None:            # every process must send the same layout
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        bucket, size, total_bad = [], 0, 0
        for i, g in enumerate(grads):
            bucket.append(g)
            size += g.numel()
            last = i == len(grads) - 1
            if last or size >= bucket_numel or grads[i + 1].dtype != g.dtype or grads[i + 1].device != g.device:
                parts = [t.reshape(-1) for t in bucket]
                if last:
                    parts.append(torch.full((1,), float(nonfinite), dtype=g.dtype, device=g.device))
                flat = torch.cat(parts).to(self.device)
                dist.all_reduce(flat)
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
                if last:
                    total_bad = int(flat[-1].item())
                bucket, size = [], 0
        return total_bad

    def reduce_update_stats(self, collected: dict, tokens: list[float]) -> dict:
        """The update's statistics for the global batch: each minibatch statistic (a token mean on this process) is
        weighted by the process's token count; statistics that are already global (the clipped gradient norm,
        computed after the gradients were summed) are averaged as they are."""
        per_minibatch = [k for k, v in collected.items() if len(v) == len(tokens)]
        local = torch.tensor([[float(collected[k][i]) for k in per_minibatch] for i in range(len(tokens))],
                             dtype=torch.float64)                                        # (minibatches, stats)
        n = torch.tensor(tokens, dtype=torch.float64)[:, None]                           # (minibatches, 1)
        total = self.all_reduce(torch.cat([local * n, n], dim=1)).cpu()
        means = total[:, :-1] / total[:, -1:]                                            # global per minibatch
        out = {k: float(means[:, j].mean()) for j, k in enumerate(per_minibatch)}
        for key, values in collected.items():
            if key not in out:
                out[key] = float(torch.stack([torch.as_tensor(v) for v in values]).float().mean())
        return out

    # ------------------------------------------------------------------------------------------ statistics
    @torch.no_grad()
    def rollout_stats(self, roll, raw: torch.Tensor, kl_coef: float, reward_parts: dict) -> dict:
        """`stats.rollout_stats` of the global batch, from sums and counts reduced across processes (exact).

        Means over responses: sum / number of responses (every process has the same number). Means over tokens:
        sum / number of tokens (processes differ). Variances: E[x^2] - E[x]^2 from the global sums. Any statistic
        not listed here is taken as a mean over responses.
        """
        from .stats import rollout_stats

        out = rollout_stats(roll, raw, kl_coef, reward_parts)
        mask = roll.response_mask.float()
        non_score = (-kl_coef * roll.kl).sum(1)
        per_response = {
            "objective/kl": roll.kl.sum(1), "objective/entropy": roll.entropy.sum(1),
            "objective/scores": roll.scores, "objective/raw_scores": raw,
            "objective/non_score_reward": non_score, "objective/rlhf_reward": roll.scores + non_score,
            "env/response_length": mask.sum(1), "env/eos_rate": roll.has_eos.float(),
            **{f"env/reward/{name}": part.float() for name, part in reward_parts.items()},
        }
        per_token = {"entropy": roll.entropy, "returns": roll.returns, "values": roll.values,
                     "advantages": roll.advantages, "residual": roll.returns - roll.values}
        B = len(raw)
        other = sorted(k for k in out if k not in per_response and k != "objective/kl_coef"
                       and k not in _PER_TOKEN_KEYS)
        sums = [torch.tensor(float(B))] + [v.double().sum().cpu() for v in per_response.values()]
        sums += [torch.tensor(out[k] * B, dtype=torch.float64) for k in other]
        sums += [mask.double().sum().cpu()]
        for v in per_token.values():
            v, m = v.double(), mask.double()
            sums += [(v * m).sum().cpu(), (v * v * m).sum().cpu()]
        total = self.all_reduce(torch.stack(sums)).cpu().tolist()
        B_all, i = total[0], 1
        for key in [*per_response, *other]:
            out[key] = total[i] / B_all
            i += 1
        n = total[i]
        mean, var = {}, {}
        for j, name in enumerate(per_token):
            s1, s2 = total[i + 1 + 2 * j], total[i + 2 + 2 * j]
            mean[name] = s1 / n
            var[name] = max(s2 / n - mean[name] ** 2, 0.0)
        out.update({"objective/entropy_per_token": mean["entropy"], "ppo/returns/mean": mean["returns"],
                    "ppo/returns/var": var["returns"], "ppo/val/mean": mean["values"], "ppo/val/var": var["values"],
                    "ppo/advantages/mean": mean["advantages"],
                    "ppo/val/explained_variance": 1 - var["residual"] / max(var["returns"], 1e-8)})
        return out

    def gather_sampler_updates(self, prompt_ids: list, rewards: list, entropies: list) -> tuple[list, list, list]:
        """Every process's (prompt id, score, entropy) triples in rank order, i.e. in the global batch's order, so
        every process's DifficultySampler folds in the same statistics and stays identical."""
        parts = self.gather_objects((list(prompt_ids), list(rewards), list(entropies)))
        return tuple([x for part in parts for x in part[k]] for k in range(3))


_PER_TOKEN_KEYS = ("objective/entropy_per_token", "ppo/returns/mean", "ppo/returns/var", "ppo/val/mean",
                   "ppo/val/var", "ppo/advantages/mean", "ppo/val/explained_variance")

__all__ = ["DistributedContext", "ShardedPromptLoader", "init_distributed", "sampling_seed", "SEED_STRIDE"]
