"""Build the tiny world, deterministically: datasets -> tokenizer -> SFT model -> reward model.

    python -m lessons_lib.tiny build            # whatever is missing
    python -m lessons_lib.tiny build --force    # everything again (make tiny-world)
    python -m lessons_lib.tiny build --force --only tiny-qwen2-ppo   # one model again (the others as they are)
    python -m lessons_lib.tiny normalize-reward # refit tiny-qwen2-reward's mean/std only (weights untouched)
    python -m lessons_lib.tiny measure          # SFT compliance and reward-model accuracy tables (docs/TINY_WORLD.md)

The reward model's normalisation is fitted on the SFT policy's own answers to PPO's training prompts (the distinct
instructions of the `sft` split, one answer each, sampled as PPOConfig.tiny()'s rollouts: T=0.7, 48 new tokens),
so PPO starts with rewards of mean 0 and std 1 [N].

Everything is seeded; on the same machine a rebuild writes the same bytes (tests check the data, the tokenizer
and a short model build). A checkout ships the results in data/tiny/, so notebooks and CI never wait for this.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from lessons_lib.tiny.datasets import read_jsonl, write_datasets
from lessons_lib.tiny.sft import SFTConfig

SEED = 0
TOKENIZER_DIR = "tokenizer"
SFT_CONFIG = SFTConfig(epochs=4, batch_size=32, lr=3e-3, seed=SEED)
RM_EPOCHS, RM_LR = 3, 1e-3
RM_NORM_TEMPERATURE, RM_NORM_MAX_NEW_TOKENS = 0.7, 48   # PPOConfig.tiny()'s rollouts (tests/test_tiny_world.py)


def build_data(tiny_dir: Path) -> None:
    """The jsonl splits and the tokenizer trained on them."""
    from lessons_lib.tiny.tokenizer import build_tokenizer

    paths = write_datasets(tiny_dir, seed=SEED)
    build_tokenizer(read_jsonl(paths["sft"]), read_jsonl(paths["preferences"]), tiny_dir / TOKENIZER_DIR)


def load_tokenizer(tiny_dir: Path):
    from transformers import AutoTokenizer

    from lessons_lib.tiny import data_file

    data_file("sft")   # builds data + tokenizer if missing
    return AutoTokenizer.from_pretrained(tiny_dir / TOKENIZER_DIR)


def copy_tokenizer(tiny_dir: Path, out_dir: Path) -> None:
    """Put the tokenizer files into a model folder as they are (a re-save would record how they were loaded)."""
    for f in (tiny_dir / TOKENIZER_DIR).iterdir():
        shutil.copyfile(f, out_dir / f.name)


def build_sft_model(out_dir: Path, tiny_dir: Path, config: SFTConfig = SFT_CONFIG, progress: bool = True) -> None:
    """tiny-qwen2-sft: a fresh tiny Qwen2 trained on the score-mode data (response + EOS loss)."""
    from lessons_lib.tiny import data_file
    from lessons_lib.tiny.sft import train_sft

    tokenizer = load_tokenizer(tiny_dir)
    model, _ = train_sft(tokenizer, read_jsonl(data_file("sft")), config, progress=progress)
    model.save_pretrained(out_dir)
    copy_tokenizer(tiny_dir, out_dir)


def policy_prompts() -> list[str]:
    """PPO's training prompts: the distinct instructions of the `sft` split, in file order."""
    from lessons_lib.tiny import data_file

    return list(dict.fromkeys(row["instruction"] for row in read_jsonl(data_file("sft"))))


def load_sft_policy():
    """(model, tokenizer) of tiny-qwen2-sft, the policy PPO starts from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lessons_lib.tiny import resolve

    folder = resolve("tiny-qwen2-sft")
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def build_reward_model(out_dir: Path, tiny_dir: Path, epochs: int = RM_EPOCHS, lr: float = RM_LR,
                       progress: bool = True) -> None:
    """tiny-qwen2-reward: the SFT backbone with a fresh head, Bradley-Terry on the preference pairs, normalised on
    the SFT policy's answers to PPO's training prompts."""
    from lessons_lib.data import load_instruction_data
    from lessons_lib.reward import RewardModel, RewardTrainingConfig, evaluate_reward_model, train_reward_model
    from lessons_lib.tiny import data_file

    rm = RewardModel.from_backbone("tiny-qwen2-sft", seed=SEED)
    config = RewardTrainingConfig(epochs=epochs, lr=lr, batch_size=32, seed=SEED, progress=progress,
                                  norm_temperature=RM_NORM_TEMPERATURE, norm_max_new_tokens=RM_NORM_MAX_NEW_TOKENS)
    policy, policy_tokenizer = load_sft_policy()
    train_reward_model(rm, load_instruction_data(data_file("preferences")), config=config, policy=policy,
                       policy_tokenizer=policy_tokenizer, normalization_prompts=policy_prompts())
    metrics = {}
    for split in ("preferences_val", "preferences_heldout"):
        m = evaluate_reward_model(rm, load_instruction_data(data_file(split)))
        metrics[split] = {k: round(v, 4) for k, v in m.items() if k != "calibration"}
    rm.save(out_dir, metrics=metrics)
    copy_tokenizer(tiny_dir, out_dir)


def normalize_reward_model(folder: Path | None = None, progress: bool = True) -> tuple[float, float]:
    """Refit a built tiny-qwen2-reward's normalisation as `build_reward_model` does, rewriting only `mean` and
    `std` in its reward_model.json (the weights are not touched); returns (mean, std)."""
    import torch

    from lessons_lib.reward import META_FILE, RewardModel
    from lessons_lib.tiny import resolve

    folder = Path(folder) if folder is not None else resolve("tiny-qwen2-reward")
    rm = RewardModel.from_pretrained(folder)
    policy, policy_tokenizer = load_sft_policy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as every builder runs (lessons_lib.tiny.build_model): the same samples
    try:
        mean, std = rm.fit_normalization_on_policy(policy, policy_tokenizer, policy_prompts(),
                                                   temperature=RM_NORM_TEMPERATURE,
                                                   max_new_tokens=RM_NORM_MAX_NEW_TOKENS, seed=SEED,
                                                   progress=progress)
    finally:
        torch.set_num_threads(threads)
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text())
    meta.update(mean=mean, std=std)
    tmp = meta_path.with_name(f".{META_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, meta_path)
    return mean, std


MODEL_ORDER = ("tiny-qwen2-sft", "tiny-qwen2-reward", "tiny-qwen2-ppo")   # dependency order


def build_all(force: bool = False, only: list[str] | None = None) -> dict[str, float]:
    """Build what is missing (everything with `force`); `only`: just these models (not the data or tokenizer,
    unless missing). Returns the seconds each step took."""
    from lessons_lib.tiny import build_model, data_file, is_built, tiny_dir

    unknown = sorted(set(only or ()) - set(MODEL_ORDER))
    if unknown:
        raise ValueError(f"build: unknown model(s) {unknown}; expected some of {MODEL_ORDER}")
    times = {}
    t = time.perf_counter()
    if (force and not only) or not (tiny_dir() / TOKENIZER_DIR / "tokenizer.json").is_file():
        build_data(tiny_dir())
    data_file("sft")
    times["data + tokenizer"] = time.perf_counter() - t
    for name in MODEL_ORDER:
        if only and name not in only:
            continue
        t = time.perf_counter()
        if force or not is_built(tiny_dir() / name):
            build_model(name)
        times[name] = time.perf_counter() - t
    return times
