"""A fast, memory-lean LoRA training step for Qwen2/Llama models, 4-bit or not (lesson 09, docs/LOADING.md).

    from lessons_lib.fast_train import FastDecoder, compile_train_step

    dec = FastDecoder(model)                                   # the model's own tensors, read in place
    optimizer = torch.optim.AdamW(dec.trainable_parameters(), lr=1e-4, capturable=True)
    step = compile_train_step(lambda input_ids: dec.loss(input_ids), optimizer, {"input_ids": batch})
    loss = step({"input_ids": batch})                          # forward + backward + AdamW, one CUDA graph replay

Modules: `proj.py` (a LoRA projection over a 4-bit weight, forward and backward written out), `layer.py` (one
decoder layer: forward without autograd, backward by recomputation with the MLP fused per chunk), `offload.py`
(checkpoints in pinned host memory), `decoder.py` (`FastDecoder`), `step.py` (`compile_train_step`).
"""

from .decoder import FastDecoder
from .step import TrainStep, compile_train_step

__all__ = ["FastDecoder", "TrainStep", "compile_train_step"]
