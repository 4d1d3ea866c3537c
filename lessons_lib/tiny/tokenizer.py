"""The tiny world's tokenizer: byte-level BPE (vocab 1024) with a ChatML chat template (lesson 02 peeks inside).

Special tokens, as in Qwen2: `<|endoftext|>` pads, `<|im_start|>` opens a turn, `<|im_end|>` closes one and is the
end-of-sequence token generation stops at. Padding is on the left, as generation wants. Saved as an ordinary
Hugging Face tokenizer folder, so `AutoTokenizer.from_pretrained(folder)` loads it.
"""

from __future__ import annotations

from pathlib import Path

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VOCAB_SIZE = 1024

# ChatML, like Qwen2's template without the default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE on `texts`; return a transformers fast tokenizer with the chat template set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=IM_END, pad_token=PAD,
                                        padding_side="left", model_max_length=512, chat_template=CHAT_TEMPLATE,
                                        clean_up_tokenization_spaces=False)
    return tokenizer


def build_tokenizer(sft_rows: list[dict], preference_rows: list[dict], out_dir: Path):
    """Train on every instruction and response of the training files and save to `out_dir`."""
    from lessons_lib.data import chat_text

    # plain texts (special tokens are added whole, never learned from pieces)
    texts = ["user\n", "assistant\n", "system\n"] * 100
    for row in sft_rows:
        texts += [row["instruction"], row["response"]]
    for row in preference_rows:
        texts += [row["prompt"], row["chosen"], row["rejected"]]
    tokenizer = train_tokenizer(texts)
    # the template is the one place chat formatting is defined; make sure it writes what we trained on
    assert chat_text(tokenizer, "x", "y") == f"{IM_START}user\nx{IM_END}\n{IM_START}assistant\ny{IM_END}"
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
