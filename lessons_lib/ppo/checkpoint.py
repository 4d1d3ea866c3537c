"""Save PPO training state and continue it exactly (lesson 04, "nothing lost").

A checkpoint folder holds:

    policy/              the LoRA adapters (peft `save_pretrained`), or the full model when trained without LoRA
    value.safetensors    the value head (or the separate critic)
    optimizer.pt         the optimizer state (Adam moments, step counts)
    state.pt             step, KL controller, score statistics, sampler statistics and position, every RNG state
    config.json          the PPOConfig, readable

It is written to a temporary folder and renamed into place, so an interrupted save never damages the previous
checkpoint. With several processes (docs/SCALING.md) every process calls `save_checkpoint`: the main process
writes, with every process's RNG state in `state.pt`; a run resumed with the same number of processes continues
exactly, and any other number resumes the same training (ranks without a saved RNG state get fresh seeds).
On CPU a run resumed with `PPOTrainer.from_checkpoint` reproduces the uninterrupted run's stats exactly
(tests/test_ppo_checkpoint.py checks this).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_model

from .config import PPOConfig


def _rng_state(trainer) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "shuffle": trainer.shuffle_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(trainer, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    trainer.shuffle_generator.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(trainer, directory) -> str:
    """Write `trainer`'s full training state to `directory` (replaced atomically); returns the folder path.

    With several processes, call it on every process (it gathers their RNG states); only the main process writes.
    """
    directory = Path(directory)
    dist = getattr(trainer, "dist", None)
    rng_by_rank = [_rng_state(trainer)] if dist is None else dist.gather_objects(_rng_state(trainer))
    if dist is not None and not dist.is_main_process:
        dist.barrier()                           # the main process writes; wait until the folder is complete
        trainer.last_checkpoint, trainer.current_step_saved = str(directory), trainer.current_step
        return str(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainer.model.save_pretrained(tmp / "policy")
    value = trainer.value_head if trainer.value_head is not None else trainer.critic
    save_model(value, str(tmp / "value.safetensors"))
    torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
    state = {"step": trainer.current_step, "kl_ctl": trainer.kl_ctl.state_dict(),
             "score_moments": trainer.score_moments.state_dict(), "sampling_temperature": trainer.sampling_temperature,
             "peft": trainer.is_peft, "rng": rng_by_rank[0], "rng_by_rank": rng_by_rank,
             "sampler": trainer.dataloader.sampler.state_dict() if trainer.dataloader is not None else None}
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(trainer.config.to_dict(), indent=2) + "\n")
    if directory.exists():
        old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    trainer.last_checkpoint, trainer.current_step_saved = str(directory), trainer.current_step
    if dist is not None:
        dist.barrier()
    return str(directory)


def load_checkpoint(cls, directory, model, tokenizer, dataset=None, reward_model=None, ref_model=None,
                    reward_fns=(), **config_overrides):
    """Rebuild a trainer around a freshly loaded base `model` and restore every piece of saved state."""
    directory = Path(directory)
    if not (directory / "state.pt").exists():
        raise FileNotFoundError(f"{directory} is not a PPO checkpoint (no state.pt)")
    config = PPOConfig.from_dict(json.loads((directory / "config.json").read_text()))
    if config_overrides:
        config = config.replace(**config_overrides)
    state = torch.load(directory / "state.pt", weights_only=False)
    is_peft = hasattr(model, "peft_config")
    if state["peft"] and not is_peft:   # a plain base model: attach the saved adapters to it
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(directory / "policy"), is_trainable=True)
    trainer = cls(config=config, model=model, ref_model=ref_model, tokenizer=tokenizer, dataset=dataset,
                  reward_model=reward_model, reward_fns=reward_fns)
    if state["peft"] and is_peft:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(trainer.model, load_file(str(directory / "policy" / "adapter_model.safetensors")))
    elif not state["peft"]:
        load_model(trainer.model, str(directory / "policy" / "model.safetensors"), strict=False)
    value = trainer.value_head if trainer.value_head is not None else trainer.critic
    load_model(value, str(directory / "value.safetensors"))
    trainer.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=False))
    trainer.kl_ctl.load_state_dict(state["kl_ctl"])
    trainer.score_moments.load_state_dict(state["score_moments"])
    trainer.sampling_temperature = state["sampling_temperature"]
    trainer.current_step = trainer.current_step_saved = state["step"]
    trainer.last_checkpoint = str(directory)
    if state["sampler"] is not None and trainer.dataloader is not None:
        trainer.dataloader.sampler.load_state_dict(state["sampler"])
    rank = trainer.dist.rank if getattr(trainer, "dist", None) is not None else 0
    saved = state.get("rng_by_rank") or [state["rng"]]
    _set_rng_state(trainer, saved[min(rank, len(saved) - 1)])
    if rank >= len(saved):   # more processes than saved: fresh sampling seeds for the new ranks (docs/SCALING.md)
        from .distributed import sampling_seed

        torch.manual_seed(sampling_seed(trainer.config.seed + trainer.current_step, rank))
    return trainer


__all__ = ["save_checkpoint", "load_checkpoint"]
