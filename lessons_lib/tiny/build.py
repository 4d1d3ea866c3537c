"""Build the tiny world, deterministically: datasets -> tokenizer -> SFT model -> reward model.

    python -m lessons_lib.tiny build            # whatever is missing
    python -m lessons_lib.tiny build --force    # everything again (make tiny-world)
    python -m lessons_lib.tiny measure          # SFT compliance and reward-model accuracy tables (docs/TINY_WORLD.md)

Everything is seeded; on the same machine a rebuild writes the same bytes (tests check the data, the tokenizer
and a short model build). A checkout ships the results in data/tiny/, so notebooks and CI never wait for this.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from lessons_lib.tiny.datasets import read_jsonl, write_datasets
from lessons_lib.tiny.sft import SFTConfig

SEED = 0
TOKENIZER_DIR = "tokenizer"
SFT_CONFIG = SFTConfig(epochs=4, batch_size=32, lr=3e-3, seed=SEED)
RM_EPOCHS, RM_LR = 3, 1e-3


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


def build_reward_model(out_dir: Path, tiny_dir: Path, epochs: int = RM_EPOCHS, lr: float = RM_LR,
                       progress: bool = True) -> None:
    """tiny-qwen2-reward: the SFT backbone with a fresh head, Bradley-Terry on the preference pairs."""
    from lessons_lib.data import load_instruction_data
    from lessons_lib.reward import RewardModel, RewardTrainingConfig, evaluate_reward_model, train_reward_model
    from lessons_lib.tiny import data_file

    rm = RewardModel.from_backbone("tiny-qwen2-sft", seed=SEED)
    config = RewardTrainingConfig(epochs=epochs, lr=lr, batch_size=32, seed=SEED, progress=progress)
    train_reward_model(rm, load_instruction_data(data_file("preferences")), config=config)
    metrics = {}
    for split in ("preferences_val", "preferences_heldout"):
        m = evaluate_reward_model(rm, load_instruction_data(data_file(split)))
        metrics[split] = {k: round(v, 4) for k, v in m.items() if k != "calibration"}
    rm.save(out_dir, metrics=metrics)
    copy_tokenizer(tiny_dir, out_dir)


def build_all(force: bool = False) -> dict[str, float]:
    """Build what is missing (everything with `force`); returns the seconds each step took."""
    from lessons_lib.tiny import build_model, data_file, is_built, tiny_dir

    times = {}
    t = time.perf_counter()
    if force or not (tiny_dir() / TOKENIZER_DIR / "tokenizer.json").is_file():
        build_data(tiny_dir())
    data_file("sft")
    times["data + tokenizer"] = time.perf_counter() - t
    for name in ("tiny-qwen2-sft", "tiny-qwen2-reward", "tiny-qwen2-ppo"):  # in dependency order
        t = time.perf_counter()
        if force or not is_built(tiny_dir() / name):
            build_model(name)
        times[name] = time.perf_counter() - t
    return times
