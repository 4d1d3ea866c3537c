"""The tiny offline world: data, tokenizer and ~1M-parameter models a laptop CPU trains in minutes (lesson 00+).

    from lessons_lib.tiny import resolve, data_file
    resolve("tiny-qwen2-sft")      # -> Path of a normal HF model folder (built on first use if missing)
    resolve("Qwen/Qwen2-0.5B")     # -> None: not a tiny-world id
    data_file("sft")               # -> Path of data/tiny/sft.jsonl

Where the files live, first match wins: the folder named by the environment variable `LESSONS_LIB_DATA`; the
repository's `data/` next to the package (a checkout ships everything built); a cache folder
(`~/.cache/lessons_lib`, or `$XDG_CACHE_HOME/lessons_lib`) where everything is built on first use.

The registry `MODELS` maps a tiny id to its builder, given as "module:function" so nothing heavy is imported
until a model is actually built. A builder is called as `builder(out_dir, tiny_dir)` and writes a complete model
folder into `out_dir`. `tiny-qwen2-ppo` is built by the PPO lesson's recipe; more ids can be added with `register`.
"""

from __future__ import annotations

import importlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

MODELS: dict[str, str] = {
    "tiny-qwen2-sft": "lessons_lib.tiny.build:build_sft_model",
    "tiny-qwen2-reward": "lessons_lib.tiny.build:build_reward_model",
    "tiny-qwen2-ppo": "lessons_lib.ppo.tiny:build_ppo_model",   # lesson 04's recipe applied to tiny-qwen2-sft
}
SPLITS = ("sft", "preferences", "preferences_val", "preferences_heldout", "eval_indist", "eval_heldout")
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def register(name: str, builder: str) -> None:
    """Add a tiny-world id; `builder` is "module:function" (called as `function(out_dir, tiny_dir)`)."""
    if ":" not in builder:
        raise ValueError(f"register({name!r}): builder must look like 'package.module:function', got {builder!r}")
    MODELS[name] = builder


def data_root() -> Path:
    """The folder that holds `tiny/` (see the module docstring for the order in which places are tried)."""
    if os.environ.get("LESSONS_LIB_DATA"):
        return Path(os.environ["LESSONS_LIB_DATA"]).expanduser().resolve()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "data").is_dir():
        return repo / "data"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lessons_lib"


def tiny_dir() -> Path:
    return data_root() / "tiny"


def data_file(split: str) -> Path:
    """The jsonl file of a split (building the datasets first if they are missing)."""
    if split not in SPLITS:
        raise ValueError(f"data_file: unknown split {split!r}; expected one of {SPLITS}")
    path = tiny_dir() / f"{split}.jsonl"
    if not path.is_file():
        with _build_lock():
            if not path.is_file():
                from lessons_lib.tiny.build import build_data

                build_data(tiny_dir())
    return path


def is_built(folder: Path) -> bool:
    return all((folder / f).is_file() for f in MODEL_FILES)


def resolve(name: str) -> Path | None:
    """The local folder of a tiny-world model (built if missing), or None when `name` is not a tiny-world id."""
    if not isinstance(name, (str, os.PathLike)) or str(name) not in MODELS:
        return None
    folder = tiny_dir() / str(name)
    if not is_built(folder):
        with _build_lock():
            if not is_built(folder):
                build_model(str(name))
    return folder


def build_model(name: str) -> Path:
    """(Re)build one tiny model into a temporary folder, then move it into place (never a half-written folder)."""
    module, function = MODELS[name].split(":")
    builder = getattr(importlib.import_module(module), function)
    folder = tiny_dir() / name
    tmp = folder.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the same bytes on every machine, and ~10x faster than 2 threads on a busy 2-core CPU
    try:
        builder(tmp, tiny_dir())
        missing = [f for f in MODEL_FILES if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"builder {MODELS[name]} for {name!r} did not write {missing} into {tmp}")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


_lock_depth = 0


@contextmanager
def _build_lock():
    """One builder at a time across processes (pytest-xdist workers may ask for the same model at once).

    Re-entrant within a process: the reward model's builder resolves the SFT model while holding the lock.
    """
    global _lock_depth
    tiny_dir().mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock; builds still write atomically
        fcntl = None
    if _lock_depth or fcntl is None:
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
        return
    with open(tiny_dir() / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
            fcntl.flock(f, fcntl.LOCK_UN)
