"""Exports (lessons_lib.export): merged weights are right, every export reloads with equal outputs, GGUF files read
back tensor-for-tensor, interrupted exports leave nothing behind, and the Modelfile template matches the chat
template. Models are random tiny Qwen2/Llama from `lessons_lib.models.save_random_model` with random LoRA weights."""

import copy
import json

import numpy as np
import pytest
import torch

from lessons_lib.export import (TOLERANCE, ExportVerificationError, chat_markers, compare_outputs, gguf_name,
                                merged_state_dict, modelfile_text, permute_for_ggml_rope, probe_ids, read_gguf,
                                save_adapter, save_gguf, save_merged)
from lessons_lib.models import get_peft_model, load_model, save_random_model

QV = ["q_proj", "v_proj"]  # LoRA on two projections: the MLP keeps plain (or plain 4-bit) weights


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"qwen2": save_random_model(root / "qwen2", arch="qwen2", seed=1),
            # tied embeddings, and an embedding matrix larger than the tokenizer (rows no token uses)
            "llama": save_random_model(root / "llama", arch="llama", seed=2, vocab_size=384,
                                       tie_word_embeddings=True)}


def lora_model(folder, load_in_4bit: bool, seed: int = 0, targets=QV):
    """A LoRA model whose adapters really change the outputs (B is random instead of zero)."""
    model, tokenizer = load_model(str(folder), max_seq_length=256, load_in_4bit=load_in_4bit)
    model = get_peft_model(model, r=4, lora_alpha=8, target_modules=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, tokenizer


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    return [(name, m) for name, m in base.named_modules() if isinstance(m, LoraLayer)]


# --------------------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_merged_4bit_weights_are_dequantized_base_plus_scaled_BA(folders, arch):
    import bitsandbytes.functional as bnbf

    model, _ = lora_model(folders[arch], load_in_4bit=True)
    state = merged_state_dict(model)
    layers = lora_layers(model)
    assert len(layers) == 2 * 2  # q and v in two layers
    for name, layer in layers:
        w = layer.base_layer.weight
        expected = bnbf.dequantize_4bit(w.data, w.quant_state).float() + layer.scaling["default"] * (
            layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float())
        torch.testing.assert_close(state[f"{name}.weight"], expected, rtol=0, atol=1e-6)
        if layer.base_layer.bias is not None:
            torch.testing.assert_close(state[f"{name}.bias"], layer.base_layer.bias.float(), rtol=0, atol=0)
    up = model.get_base_model().model.layers[1].mlp.up_proj  # 4-bit, no adapter: dequantized only
    torch.testing.assert_close(state["model.layers.1.mlp.up_proj.weight"],
                               bnbf.dequantize_4bit(up.weight.data, up.weight.quant_state).float(), rtol=0, atol=0)


def test_merge_equals_peft_merge_and_leaves_the_model_untouched(folders):
    model, _ = lora_model(folders["qwen2"], load_in_4bit=False, targets=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    for _ in range(2):  # merging twice gives the same weights: nothing was merged into the model itself
        state = merged_state_dict(model)
        assert set(state) == set(reference)
        for key in reference:
            torch.testing.assert_close(state[key], reference[key].float(), rtol=1e-6, atol=1e-7)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------------------------- adapter, merged


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_save_merged_from_4bit_reloads_with_equal_outputs(folders, tmp_path, dtype):
    from safetensors import safe_open

    model, tokenizer = lora_model(folders["llama"], load_in_4bit=True)
    result = save_merged(model, tokenizer, tmp_path / "merged", dtype=dtype)
    assert result.checks["rel_diff"] <= TOLERANCE[dtype] and result.checks["argmax_agreement"] == 1.0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain 16-bit model, not a 4-bit one
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    assert (tmp_path / "merged" / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (tmp_path / "merged" / "tokenizer_config.json").read_text())
    reloaded, reloaded_tokenizer = load_model(str(tmp_path / "merged"), max_seq_length=256, load_in_4bit=False,
                                              dtype=torch.float32)
    checks = compare_outputs(model, reloaded, probe_ids(reloaded_tokenizer), max_new_tokens=12)
    assert checks["rel_diff"] <= TOLERANCE[dtype]
    if dtype == torch.float32:
        assert checks["rel_diff"] < 1e-5 and checks["same_greedy_tokens"]


def test_save_merged_catches_a_wrong_merge(folders, tmp_path, monkeypatch):
    import lessons_lib.models as models

    model, tokenizer = lora_model(folders["qwen2"], load_in_4bit=False)
    real_merge = models.merge_lora

    def merge_scaled_twice(m, dtype=None):  # a classic bug: alpha / r applied twice
        m = copy.deepcopy(m)
        m.peft_config["default"].lora_alpha *= 2
        return real_merge(m, dtype=dtype)

    def merge_forgetting_the_adapter(m, dtype=None):
        m = copy.deepcopy(m)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.data.zero_()
        return real_merge(m, dtype=dtype)

    for wrong in (merge_scaled_twice, merge_forgetting_the_adapter):
        monkeypatch.setattr(models, "merge_lora", wrong)
        with pytest.raises(ExportVerificationError, match="reloaded logits differ"):
            save_merged(model, tokenizer, tmp_path / "bad", dtype=torch.float16)
        assert list(tmp_path.iterdir()) == []  # nothing on disk, not even a temporary folder


def test_save_adapter_reloads_with_load_model(folders, tmp_path):
    model, tokenizer = lora_model(folders["qwen2"], load_in_4bit=True)
    result = save_adapter(model, tokenizer, tmp_path / "adapter")
    assert result.checks["tensors"] == 2 * 2 * 2 and result.checks["max_abs_diff"] == 0.0  # A and B, q and v, 2 layers
    assert result.size_bytes < save_merged(model, tokenizer, tmp_path / "merged").size_bytes
    reloaded, _ = load_model(str(tmp_path / "adapter"), max_seq_length=256, load_in_4bit=True)
    checks = compare_outputs(model, reloaded, probe_ids(tokenizer), max_new_tokens=12)
    assert checks["max_abs_diff"] < 1e-5 and checks["same_greedy_tokens"]
    with pytest.raises(TypeError, match="needs a PeftModel"):
        save_adapter(model.get_base_model(), tokenizer, tmp_path / "other")


# --------------------------------------------------------------------------------------------- safe writes


def test_refuses_non_empty_folder_unless_overwrite(folders, tmp_path):
    model, tokenizer = lora_model(folders["qwen2"], load_in_4bit=False)
    target = tmp_path / "out"
    target.mkdir()
    save_merged(model, tokenizer, target, verify=False)  # an empty folder is fine
    (target / "notes.txt").write_text("keep me?")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        save_merged(model, tokenizer, target)
    assert (target / "notes.txt").read_text() == "keep me?"
    save_merged(model, tokenizer, target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "config.json").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        save_gguf(model, tokenizer, tmp_path / "file", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_interrupted_exports_leave_nothing_behind(folders, tmp_path, monkeypatch):
    import gguf

    model, tokenizer = lora_model(folders["llama"], load_in_4bit=False)
    original = gguf.GGUFWriter.write_tensors_to_file

    def write_half_then_fail(self, *args, **kwargs):
        self.write_ti_data_to_file()
        self.fout[0].write(b"\0" * 1000)  # some tensor bytes reach the disk ...
        self.fout[0].flush()
        raise OSError("No space left on device")  # ... then the write fails

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_gguf(model, tokenizer, tmp_path / "gguf")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", original)
    first = save_gguf(model, tokenizer, tmp_path / "gguf", out_type="f32", verify=False)
    saved = first.path.read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after the model files are written, before the tokenizer's
    monkeypatch.setattr(type(tokenizer), "save_pretrained", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_merged(model, tokenizer, tmp_path / "merged")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_half_then_fail)
    with pytest.raises(OSError):
        save_gguf(model, tokenizer, tmp_path / "gguf", out_type="f16", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf"]  # no partial folders, the old export intact
    assert first.path.read_bytes() == saved


# --------------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("arch,out_type,in_4bit", [("qwen2", "f32", True), ("llama", "f32", False),
                                                   ("llama", "f16", True), ("qwen2", "bf16", False),
                                                   ("qwen2", "q8_0", True), ("llama", "q8_0", False)])
def test_gguf_reads_back_and_reloads_with_equal_outputs(folders, tmp_path, arch, out_type, in_4bit):
    model, tokenizer = lora_model(folders[arch], load_in_4bit=in_4bit, targets=["q_proj", "k_proj", "v_proj"])
    result = save_gguf(model, tokenizer, tmp_path / "gguf", out_type=out_type)
    assert result.path.name == f"model-{out_type}.gguf" and (tmp_path / "gguf" / "Modelfile").exists()
    meta, tensors = read_gguf(result.path)
    config = model.get_base_model().config
    assert meta["general.architecture"] == arch and meta[f"{arch}.block_count"] == config.num_hidden_layers
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == config.vocab_size and tokens[tokenizer.eos_token_id] == "<|im_end|>"
    assert types[tokenizer.eos_token_id] == 3  # CONTROL
    assert ("output.weight" in tensors) == (not config.tie_word_embeddings)
    # the tensors equal the merged float32 weights, up to the storage type's rounding
    state = merged_state_dict(model)
    q = state["model.layers.1.self_attn.q_proj.weight"]
    if arch == "llama":
        q = permute_for_ggml_rope(q, config.num_attention_heads)
    stored = tensors["blk.1.attn_q.weight"][2]
    scale = {"f32": 0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2}[out_type]
    assert np.abs(stored - q.numpy()).max() <= scale * np.abs(q.numpy()).max()
    assert result.checks["rel_diff"] <= {"f32": 1e-5, "f16": 1e-2, "bf16": 5e-2, "q8_0": 8e-2}[out_type]
    reloaded, reloaded_tokenizer = load_model(str(result.path), max_seq_length=256, load_in_4bit=False,
                                              dtype=torch.float32)
    text = "Write a bullet list of three fruits."
    assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    if out_type == "f32":
        assert compare_outputs(model, reloaded, probe_ids(tokenizer), max_new_tokens=12)["same_greedy_tokens"]


def test_gguf_names_match_the_gguf_library(folders):
    import gguf

    for arch, folder in folders.items():
        model, _ = load_model(str(folder), max_seq_length=256, load_in_4bit=False)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                         model.config.num_hidden_layers)
        for key in model.state_dict():
            module, kind = key.rsplit(".", 1)
            assert gguf_name(key) == f"{names.get_name(module)}.{kind}", key
    with pytest.raises(NotImplementedError, match="no GGUF name"):
        gguf_name("model.layers.0.self_attn.rotary.weight")


def test_llama_rope_permutation(folders, tmp_path, monkeypatch):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    g = torch.Generator().manual_seed(3)
    for n_heads, head_dim, cols in [(4, 16, 64), (2, 6, 5), (3, 32, 1)]:
        w = torch.randn(n_heads * head_dim, cols, generator=g)
        permuted = permute_for_ggml_rope(w, n_heads)
        assert not torch.equal(permuted, w)
        back = LlamaTensorProcessor()._reverse_permute_weights(permuted.numpy(), n_heads, n_heads)
        np.testing.assert_array_equal(back, w.numpy())  # transformers' reader undoes exactly our permutation
    # without the permutation the reloaded Llama computes something else, and the export refuses to finish
    import lessons_lib.export.gguf_file as gguf_file

    model, tokenizer = lora_model(folders["llama"], load_in_4bit=False)
    monkeypatch.setattr(gguf_file, "permute_for_ggml_rope", lambda w, n: w)
    with pytest.raises(ExportVerificationError, match="reloaded logits differ"):
        save_gguf(model, tokenizer, tmp_path / "gguf", out_type="f32")
    assert list(tmp_path.iterdir()) == []


def test_gguf_rejects_what_it_cannot_write(folders, tmp_path):
    model, tokenizer = lora_model(folders["qwen2"], load_in_4bit=False)
    with pytest.raises(ValueError, match="out_type"):
        save_gguf(model, tokenizer, tmp_path / "a", out_type="q4_k")
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(NotImplementedError, match="supports"):
        save_gguf(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400)), tokenizer,
                  tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- Modelfile


LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
QWEN_DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
                       "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                       "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM_LAST = ("{% for m in messages %}{% if m['role'] != 'system' %}[{{ m['role'] }}] {{ m['content'] }}\n{% endif %}"
               "{% endfor %}{% for m in messages %}{% if m['role'] == 'system' %}(system: {{ m['content'] }}){% endif %}"
               "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


# SmolLM2's template: a default system turn written inside the loop, and its BOS token is <|im_start|> itself
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
           "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template", ["chatml", LLAMA3, QWEN_DEFAULT_SYSTEM, SMOLLM2])
def test_chat_markers_reproduce_the_chat_template(folders, template):
    _, tokenizer = load_model(str(folders["qwen2"]), max_seq_length=256, load_in_4bit=False)
    tokenizer = copy.deepcopy(tokenizer)
    if template != "chatml":
        tokenizer.chat_template = template
        tokenizer.bos_token = "<|im_start|>" if template == SMOLLM2 else "<|endoftext|>"
    markers = chat_markers(tokenizer)
    assert markers.head == ("<|endoftext|>" if template == LLAMA3 else "")
    rng = np.random.default_rng(0)
    for _ in range(20):  # random conversations, with and without a system turn
        turns = [{"role": ("user", "assistant")[i % 2], "content": f"msg {rng.integers(1000)}\nline"}
                 for i in range(int(rng.integers(1, 6)) * 2 - 1)]
        if rng.random() < 0.5:
            turns.insert(0, {"role": "system", "content": "Answer briefly."})
        expected = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        assert markers.render(turns) == expected
    text = modelfile_text(tokenizer, "./model-f16.gguf")
    assert text.splitlines()[1] == "FROM ./model-f16.gguf" and "{{ .Content }}" in text
    assert f'PARAMETER stop "{tokenizer.eos_token}"' in text
    if template in (QWEN_DEFAULT_SYSTEM, SMOLLM2):
        assert 'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ else }}<|im_start|>system\n' in text


def test_modelfile_without_template_for_unusual_chat_templates(folders):
    _, tokenizer = load_model(str(folders["qwen2"]), max_seq_length=256, load_in_4bit=False)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = SYSTEM_LAST
    with pytest.raises(ValueError, match="not append-only|plain turn"):
        chat_markers(tokenizer)
    text = modelfile_text(tokenizer, "./model-f16.gguf")
    assert "TEMPLATE" not in text.split("\n", 2)[2] and "chat template stored in the GGUF" in text


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_exports_of_a_4bit_lora_model_on_cuda(tmp_path):
    """On the GPU: NF4 base + LoRA in bf16, merged bf16 folder and (if gguf is installed) a GGUF, all verified."""
    root = save_random_model(tmp_path / "base", arch="qwen2", seed=4, hidden_size=256, intermediate_size=512,
                             num_attention_heads=8, num_key_value_heads=2)
    model, tokenizer = load_model(str(root), max_seq_length=256, load_in_4bit=True, dtype=torch.bfloat16)
    assert next(model.parameters()).is_cuda
    model = get_peft_model(model, r=8, lora_alpha=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    merged = save_merged(model, tokenizer, tmp_path / "merged")
    assert merged.checks["dtype"] == "bfloat16" and merged.checks["rel_diff"] <= TOLERANCE[torch.bfloat16]
    pytest.importorskip("gguf")
    result = save_gguf(model, tokenizer, tmp_path / "gguf", out_type="bf16")
    assert result.checks["rel_diff"] <= TOLERANCE[torch.bfloat16]


def test_pre_tokenizer_names_for_llama_cpp():
    """Our split-regex table names Qwen2 and Llama 3 style tokenizers as llama.cpp does, and equals the table
    transformers keeps for reading GGUF files back."""
    from lessons_lib.export.gguf_file import PRE_TOKENIZER_SPLITS, _pre_tokenizer_name
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    theirs = getattr(mapping, "GGUF_PRE_TOKENIZER_SPLITS", None)
    if theirs is not None:  # present in transformers >= 5.2x; the CI pin has it
        for name, regex in PRE_TOKENIZER_SPLITS.items():
            assert theirs[name] == regex, name

    def spec(regex):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}

    assert _pre_tokenizer_name(spec(PRE_TOKENIZER_SPLITS["qwen2"])) == "qwen2"
    assert _pre_tokenizer_name(spec(PRE_TOKENIZER_SPLITS["llama-bpe"])) == "llama-bpe"
    assert _pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    with pytest.raises(NotImplementedError, match="unknown pre-tokenizer"):
        _pre_tokenizer_name(spec(r"\s+"))


def test_tokenizer_round_trip_reports_what_the_reader_kept_and_rejects_another_encoding():
    """The chat template and EOS token live in the GGUF metadata (compared by check_gguf_file); whether transformers'
    reader carried them onto its tokenizer is reported. Encoding differently is an error."""
    from lessons_lib.export.gguf_file import check_tokenizer_round_trip

    tok = load_model("tiny-qwen2-sft", load_in_4bit=False)[1]
    assert check_tokenizer_round_trip(tok, copy.deepcopy(tok)) == {"reader_kept_chat_template": True,
                                                                  "reader_kept_eos_token": True}
    dropped = copy.deepcopy(tok)
    dropped.chat_template = None
    assert check_tokenizer_round_trip(tok, dropped)["reader_kept_chat_template"] is False

    class Shifted:  # a reader whose tokenizer encodes every text one id off
        chat_template, eos_token = tok.chat_template, tok.eos_token

        def __call__(self, text):
            return {"input_ids": [i + 1 for i in tok(text)["input_ids"]]}
    with pytest.raises(ExportVerificationError, match="encodes"):
        check_tokenizer_round_trip(tok, Shifted())
