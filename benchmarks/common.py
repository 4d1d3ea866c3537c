"""What the benchmark scripts share: this checkout on sys.path, the offline environment, the Qwen2-1.5B
configuration, and a saved random Qwen2 with a word-level tokenizer.

Each script does `import common` before anything else (a script's own folder is first on sys.path).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # lessons_lib from this checkout, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Qwen2-1.5B's shapes (the weights are random: speed and memory do not depend on them)
QWEN2_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                  rms_norm_eps=1e-6, max_position_embeddings=4096)
PAD, EOS, UNK = 0, 1, 2


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with one word per id ("w123"), so that any sampled ids decode to text and re-encode to
    the same ids (the reward model re-tokenizes decoded text, as with a real tokenizer), and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                  padding_side="left")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


def build_model(folder: Path, config: dict, device: str, words: int | None = None) -> Path:
    """A random bf16 Qwen2 (built on the device: seconds) and a word tokenizer of `words` words (default: the whole
    vocabulary), saved once to `folder`."""
    import torch
    import transformers

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    cfg = transformers.Qwen2Config(**config, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(folder)
    word_tokenizer(words or config["vocab_size"]).save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder
