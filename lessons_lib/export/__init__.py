"""Export a fine-tuned model three ways, each verified and reloaded (lesson 06).

    from lessons_lib.export import save_adapter, save_merged, save_gguf
    save_adapter(model, tokenizer, "out/adapter")   # LoRA weights only (MB): needs the base model to run
    save_merged(model, tokenizer, "out/merged")     # one standard HF folder, 16-bit: vLLM, TGI, transformers
    save_gguf(model, tokenizer, "out/gguf")         # model-f16.gguf + Ollama Modelfile: llama.cpp, Ollama

Every export is written to a temporary folder next to the target and renamed into place only when complete and
verified, so an interrupted export leaves nothing behind; a non-empty target is replaced only with overwrite=True.

- `core`: merging (through `lessons_lib.models.merge_lora`), staged writes, output checks, adapter and merged.
- `gguf_file`: GGUF for Qwen2/Llama -- tensor names, the Llama rope permutation, the tokenizer as metadata,
  read-back checks with `gguf.GGUFReader` and with transformers' GGUF loader.
- `modelfile`: an Ollama Modelfile whose template reproduces the model's chat template.
"""

from .core import (TOLERANCE, ExportResult, ExportVerificationError, compare_outputs, folder_size, merged_model,
                   merged_state_dict, probe_ids, reload, save_adapter, save_merged, staged_folder)
from .gguf_file import gguf_name, permute_for_ggml_rope, read_gguf, save_gguf
from .modelfile import ChatMarkers, chat_markers, modelfile_text, write_modelfile

__all__ = ["ExportResult", "ExportVerificationError", "TOLERANCE", "ChatMarkers", "chat_markers", "compare_outputs",
           "folder_size", "gguf_name", "merged_model", "merged_state_dict", "modelfile_text",
           "permute_for_ggml_rope", "probe_ids", "read_gguf", "reload", "save_adapter", "save_gguf", "save_merged",
           "staged_folder", "write_modelfile"]
