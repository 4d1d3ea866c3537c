"""What one training step costs, measured on a CPU: operators dispatched per step, and the loss's memory.

    python benchmarks/train_step_cpu.py --ops           # operators per step, per stack (Qwen2-1.5B's structure)
    python benchmarks/train_step_cpu.py --loss-memory   # peak memory of the loss alone, transformers vs chunked

--ops: a model with Qwen2-1.5B's structure (28 layers, NF4 + LoRA r=16 on q, k, v, o, AdamW) but tiny widths and
a tiny batch (2 x 64), so that the arithmetic is negligible and what remains is the framework: every operator
PyTorch dispatches in one step (forward + backward + AdamW) that launches work (views and allocations excluded)
is counted with a TorchDispatchMode, and the CPU time of a step on one thread is measured. On a GPU each counted
operator is at least one kernel launch and 5-30 us of CPU time in eager mode; a CUDA graph replays them all
without the CPU. A bitsandbytes operator counts once although on a GPU `gemm_4bit` is 4 kernels (scales, offset,
dequantize, matmul): FastDecoder calls those pieces itself, so its count is the honest one and the transformers
rows undercount by 3 per 4-bit matmul. Widths and batch do not change the counts; the number of MLP and loss
chunks does, so FastDecoder runs with the real run's chunk counts (4 MLP chunks, 32 loss chunks).

--loss-memory: CPU, one process per variant: the rise of peak RSS during one forward + backward of the loss, on a
small body with Qwen2's 151,936-word vocabulary (4 x 256 tokens), where the logits dominate memory.
Results go to benchmarks/results/train_step_cpu_ops.md / train_step_cpu_loss.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
STRUCTURE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=28, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512)
NO_KERNEL = {"aten._unsafe_view", "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
             "aten.lift_fresh", "aten._reshape_alias"}
OPS_BATCH, OPS_SEQ = 2, 64  # N = 128 rows: the counts need only the structure; small N keeps arithmetic negligible
OPS_STACKS = {
    "hf_peft": "transformers + peft, non-reentrant checkpointing, transformers loss",
    "lessons": "lessons_lib load_model + get_peft_model, transformers loss",
    "lessons_lean": "lessons_lib + causal_lm_loss (fused linear cross-entropy)",
    "fast": "lessons_lib FastDecoder (recompute with MLP fused per chunk)",
}


def ops_child(stack: str, model_dir: str, steps: int = 5) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step as ts

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if not (func.is_view or name in NO_KERNEL):  # views and allocations launch nothing
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    torch.set_num_threads(1)
    device = torch.device("cpu")
    if stack == "fast":
        from lessons_lib.fast_train import FastDecoder
        from lessons_lib.models import get_peft_model, load_model

        model, _ = load_model(model_dir, dtype=torch.float32, gradient_checkpointing=False)
        model = get_peft_model(model, r=16, target_modules=TARGETS, lora_alpha=16, verbose=False)
        n = OPS_BATCH * OPS_SEQ  # the real run's chunk counts: 4 MLP chunks (1,024 of 4,096), 32 loss chunks (128)
        dec = FastDecoder(model, mlp_chunk_tokens=n // 4, loss_chunk_tokens=n // 32)
        loss_fn = lambda m, ids: dec.loss(ids)  # noqa: E731
    else:
        model, loss_fn = ts.build_stack(stack, model_dir, device, torch.float32, OPS_SEQ, gradient_checkpointing=True)
        if stack == "lessons":
            loss_fn = lambda m, ids: m(input_ids=ids, labels=ids).loss  # noqa: E731
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, STRUCTURE["vocab_size"], (OPS_BATCH, OPS_SEQ), generator=torch.Generator().manual_seed(0))
    model.train()

    def step():
        loss = loss_fn(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step()
    with Count() as counter:
        loss = step()
    times = []
    for _ in range(steps):
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    ops = counter.ops
    bnb = sum(n for k, n in ops.items() if k.startswith("bitsandbytes"))
    return dict(stack=stack, description=OPS_STACKS[stack], ops=sum(ops.values()), bnb_ops=bnb,
                cpu_ms=1000 * statistics.median(times), loss=loss.item(), top=ops.most_common(8), all=dict(ops))


def run_ops(out: Path) -> int:
    from lessons_lib.models import save_random_model

    model_dir = Path("/tmp/train_step_cpu_structure")
    if not (model_dir / "config.json").exists():
        save_random_model(model_dir, "qwen2", **STRUCTURE)
    rows = []
    for stack in OPS_STACKS:
        proc = subprocess.run([sys.executable, __file__, "--ops-child", stack, str(model_dir)], capture_output=True,
                              text=True, env={"HF_HUB_OFFLINE": "1", **__import__("os").environ})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(proc.stderr[-3000:])
            return 1
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"{stack}: {rows[-1]['ops']:,} ops, {rows[-1]['cpu_ms']:.0f} ms CPU", flush=True)
    base = rows[0]
    lines = ["# Operators dispatched per training step (CPU count; Qwen2-1.5B structure, tiny widths)", "",
             f"- command: `python benchmarks/train_step_cpu.py --ops`",
             f"- 28 layers, B={OPS_BATCH}, T={OPS_SEQ}, fp32, NF4 + LoRA r=16 on q, k, v, o, AdamW; one step "
             "counted with a TorchDispatchMode (views and allocations excluded); CPU time = median process time of "
             "5 steps on one thread (the machine is shared: noisy)", "",
             "| stack | operators / step | of which bitsandbytes | vs transformers + peft | "
             "CPU ms / step (1 thread) | loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['description']} | {r['ops']:,} | {r['bnb_ops']:,} | {r['ops'] / base['ops']:.2f}x | "
                     f"{r['cpu_ms']:.0f} | {r['loss']:.4f} |")
    lines += ["", "Most frequent operators:", ""]
    for r in rows:
        lines.append(f"- {r['stack']}: " + ", ".join(f"{k} {n}" for k, n in r["top"]))
    text = "\n".join(lines) + "\n"
    print(text)
    out.write_text(text)
    return 0


def loss_memory(variant: str, chunk_tokens: int) -> dict:
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lessons_lib.loss import causal_lm_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, target_modules=TARGETS))
    ids = torch.randint(0, cfg.vocab_size, (4, 256))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    loss = (model(input_ids=ids, labels=ids).loss if variant == "transformers"
            else causal_lm_loss(model, ids, chunk_tokens=chunk_tokens))
    loss.backward()
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    return dict(variant=variant, chunk_tokens=chunk_tokens, loss=loss.item(), peak_rise_gib=rise)


def run_loss_memory(out: Path) -> int:
    rows = []
    for variant, chunk in [("transformers", 0), ("causal_lm_loss", 1024), ("causal_lm_loss", 256),
                           ("causal_lm_loss", 128)]:
        proc = subprocess.run([sys.executable, __file__, "--loss-memory-child", f"{variant}:{chunk}"],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(proc.stderr[-2000:])
            return 1
        rows.append(json.loads(line[len("RESULT "):]))
    lines = ["| loss | positions per chunk | loss value | peak RSS rise, GiB |", "|---|---|---|---|"]
    for r in rows:
        chunk = "all (1,024)" if r["variant"] == "transformers" else f"{r['chunk_tokens']:,}"
        lines.append(f"| {r['variant']} | {chunk} | {r['loss']:.4f} | {r['peak_rise_gib']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out.write_text("`python benchmarks/train_step_cpu.py --loss-memory` (4 x 256 tokens, Qwen2 vocabulary, one "
                   "process per row)\n\n" + text)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", action="store_true")
    parser.add_argument("--loss-memory", action="store_true")
    parser.add_argument("--ops-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--loss-memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    results = ROOT / "benchmarks" / "results"
    if args.ops_child:
        print("RESULT " + json.dumps(ops_child(*args.ops_child)))
        return 0
    if args.loss_memory_child:
        variant, chunk = args.loss_memory_child.split(":")
        print("RESULT " + json.dumps(loss_memory(variant, int(chunk))))
        return 0
    if args.loss_memory:
        return run_loss_memory(results / "train_step_cpu_loss.md")
    if args.ops:
        return run_ops(results / "train_step_cpu_ops.md")
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
