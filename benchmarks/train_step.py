"""One LoRA training step on a 4-bit model: lessons_lib against transformers + peft, Liger-Kernel and Unsloth.

    python benchmarks/train_step.py            # GPU: Qwen2-1.5B config, random weights, B=8, T=512, NF4 + LoRA r=16 qkvo
    python benchmarks/train_step.py --quick    # CPU, tiny config, seconds: checks that every stack runs
    python benchmarks/train_step.py --stacks hf_peft,fast_graph   # any subset (names below)

Every stack runs in its own subprocess (Liger and Unsloth patch transformers globally; peak memory must not
carry over), on the same randomly initialised weights saved once: speed and memory do not depend on the values.
Per stack: load time and memory after load; then, for the CUDA-graph stacks, `compile_train_step` (eager warm-up
steps + capture: its time is reported as compile time); then `--warmup` steps (not timed) and the median of
`--steps` steps (forward + backward + AdamW, synchronised), tokens/s, and the peak of
torch.cuda.max_memory_allocated from the end of loading to the end of the timed steps (so it covers the warm-up
and the capture: a graph's replays allocate nothing, the capture is where its memory shows). Also the peak
reserved by the caching allocator (what nvidia-smi would roughly see). Ratios are against "transformers + peft,
no upcast" measured in the same run. Results go to benchmarks/results/train_step.md and .json
(train_step_quick.* for --quick) with the command, date and hardware. CPU-only measurements (operator counts per
step, the loss's memory) are in benchmarks/train_step_cpu.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import common  # noqa: E402  (this checkout on sys.path, offline)

ROOT = common.REPO
QWEN2_1_5B = dict(common.QWEN2_1_5B, max_position_embeddings=32768)  # Qwen2-1.5B's own context length
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

STACKS = {  # name -> (description, needs)
    "hf_peft_upcast": ("transformers + peft, prepare_model_for_kbit_training (fp32 upcast)", None),
    "hf_peft": ("transformers + peft, no upcast, non-reentrant checkpointing", None),
    "hf_peft_liger": ("same + Liger-Kernel (apply_liger_kernel_to_qwen2)", "liger_kernel"),
    "unsloth": ("Unsloth FastLanguageModel, use_gradient_checkpointing='unsloth'", "unsloth"),
    "lessons": ("lessons_lib load_model + get_peft_model + causal_lm_loss (fused linear cross-entropy)", None),
    "lessons_graph": ("same, whole step in a CUDA graph (compile_train_step)", None),
    "lessons_kernels": ("lessons_lib + causal_lm_loss + kernels.patch_model (Triton)", "triton"),
    "fast": ("lessons_lib FastDecoder (fused q|k|v, LoRA by hand, MLP fused per chunk), eager", None),
    "fast_graph": ("FastDecoder, whole step in a CUDA graph", None),
    "fast_graph_offload": ("FastDecoder + checkpoints offloaded to pinned CPU memory, CUDA graph", None),
    "bf16_lora": ("for scale: bf16 (no 4-bit) + LoRA, transformers + peft", None),
}
DEFAULT_STACKS = ["hf_peft", "hf_peft_liger", "unsloth", "bf16_lora", "lessons_graph", "fast", "fast_graph",
                  "fast_graph_offload"]
GRAPHED = {"lessons_graph", "fast_graph", "fast_graph_offload"}
BASELINE = "hf_peft"


# ------------------------------------------------------------------------------------------ one stack


def bnb_config(dtype):
    from transformers import BitsAndBytesConfig
    import torch

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)


def build_stack(name, model_dir, device, dtype, seq_len, gradient_checkpointing):
    """Load + attach LoRA r=16 (alpha 16) on q, k, v, o. Returns (model, loss_fn(model, ids) -> loss)."""
    import torch

    def hf_loss(model, ids):
        return model(input_ids=ids, labels=ids).loss

    if name == "unsloth":
        import unsloth  # noqa: F401  (must come first: it patches transformers)
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=seq_len, dtype=dtype,
                                                     load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=16, target_modules=TARGETS, lora_alpha=16, lora_dropout=0,
                                                 bias="none", use_gradient_checkpointing="unsloth")
        return model, hf_loss
    if name.startswith(("lessons", "fast")):
        from lessons_lib.models import causal_lm_loss, get_peft_model, load_model

        fast = name.startswith("fast")  # FastDecoder recomputes layers itself: no transformers checkpointing
        model, _ = load_model(model_dir, max_seq_length=seq_len, dtype=dtype, device=device,
                              gradient_checkpointing=gradient_checkpointing and not fast)
        if name == "lessons_kernels":
            from lessons_lib.kernels import patch_model

            patch_model(model)
        model = get_peft_model(model, r=16, target_modules=TARGETS, lora_alpha=16, verbose=False)
        if fast:
            from lessons_lib.fast_train import FastDecoder

            decoder = FastDecoder(model, offload=name.endswith("offload"))
            return model, lambda m, ids: decoder.loss(ids)
        return model, lambda m, ids: causal_lm_loss(m, ids)

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    if name == "hf_peft_liger":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2()
    kwargs = dict(dtype=dtype, device_map={"": device})
    if name != "bf16_lora":
        kwargs["quantization_config"] = bnb_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if name == "hf_peft_upcast":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config), hf_loss


def run_stack(args) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    cuda = device.type == "cuda"
    dtype = (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def gib(n):
        return n / 2**30

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, loss_fn = build_stack(args.stack, args.model_dir, device, dtype, args.seq_len, gradient_checkpointing=True)
    sync()
    load_s = time.perf_counter() - start
    mem_load = gib(torch.cuda.memory_allocated()) if cuda else float("nan")
    if cuda:  # from here on: warm-up, capture and timed steps
        torch.cuda.reset_peak_memory_stats()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size if hasattr(model, "config") else model.get_base_model().config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(device)
    model.train()

    compile_s, graphed = 0.0, False
    if args.stack in GRAPHED:
        from lessons_lib.fast_train import compile_train_step

        t0 = time.perf_counter()
        train = compile_train_step(lambda input_ids: loss_fn(model, input_ids), optimizer, {"input_ids": ids})
        sync()
        compile_s, graphed = time.perf_counter() - t0, train.graphed

        def step():
            return train({"input_ids": ids})
    else:
        def step():
            loss = loss_fn(model, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

    losses = [step().item() for _ in range(args.warmup)]
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    ms = 1000 * statistics.median(times)
    nan = float("nan")
    return dict(stack=args.stack, description=STACKS[args.stack][0], ms_per_step=ms,
                tokens_per_s=args.batch * args.seq_len / (ms / 1000),
                peak_gib=gib(torch.cuda.max_memory_allocated()) if cuda else nan,
                reserved_gib=gib(torch.cuda.max_memory_reserved()) if cuda else nan, load_gib=mem_load,
                load_s=load_s, compile_s=compile_s, graphed=graphed, trainable_params=sum(p.numel() for p in trainable),
                first_loss=losses[0], last_loss=losses[-1], step_ms_all=[1000 * t for t in times])


# ------------------------------------------------------------------------------------------ the driver


def save_model(model_dir: Path, quick: bool):
    """Random weights of the configuration, saved once (built on the GPU in bf16 where there is one: ~20 s)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if (model_dir / "config.json").exists():
        return
    from lessons_lib.models import save_random_model

    if quick:
        save_random_model(model_dir, "qwen2", **TINY)
        return
    config = Qwen2Config(**QWEN2_1_5B)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    # a tokenizer for stacks that insist on one (Unsloth); its vocabulary size is irrelevant to the timing
    save_random_model(model_dir / "_tok", "qwen2", **TINY)
    for f in (model_dir / "_tok").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.rename(model_dir / f.name)


def available(module: str | None) -> bool:
    if module is None:
        return True
    import importlib.util

    return importlib.util.find_spec(module) is not None


def hardware() -> dict:
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    for pkg in ("transformers", "peft", "bitsandbytes", "triton", "liger_kernel", "unsloth"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg.replace("_", "-"))
        except Exception:
            info[pkg] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def render(results: list[dict], meta: dict) -> str:
    ok = {r["stack"]: r for r in results if "error" not in r}
    base, unsloth = ok.get(BASELINE), ok.get("unsloth")
    lines = [f"# One training step: NF4 4-bit + LoRA r=16 on q, k, v, o ({meta['config']})", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}",
             f"- hardware: {meta['hardware'].get('gpu', meta['hardware']['cpu'])}; "
             + ", ".join(f"{k} {v}" for k, v in meta["hardware"].items() if k not in ("gpu", "cpu") and v),
             f"- batch {meta['batch']} x {meta['seq_len']} tokens, warm-up {meta['warmup']} steps, median of "
             f"{meta['steps']} timed steps; peak = torch.cuda.max_memory_allocated from the end of loading to the end "
             f"of the timed steps (warm-up and graph capture included); reserved = the same for "
             f"max_memory_reserved; compile = compile_train_step's warm-up + capture", "",
             "| stack | ms/step | tokens/s | peak GiB | reserved GiB | after load GiB | compile s | "
             "speed vs baseline | speed vs Unsloth | peak vs Unsloth | loss first → last |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratio = lambda a, b: f"{a / b:.2f}x" if b and a == a and b == b else "-"  # noqa: E731  (nan-safe)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['description']} | failed: {r['error'][:120]} |" + " |" * 9)
            continue
        graph = ("" if r["stack"] not in GRAPHED else " (graph)" if r.get("graphed") else
                 " (no GPU: eager)" if meta.get("quick") else " (capture failed: eager)")
        lines.append(
            f"| {r['description']}{graph} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | "
            f"{r.get('reserved_gib', float('nan')):.2f} | {r['load_gib']:.2f} | {r.get('compile_s', 0):.1f} | "
            f"{ratio(base['ms_per_step'], r['ms_per_step']) if base else '-'} | "
            f"{ratio(unsloth['ms_per_step'], r['ms_per_step']) if unsloth else '-'} | "
            f"{ratio(r['peak_gib'], unsloth['peak_gib']) if unsloth else '-'} | "
            f"{r['first_loss']:.3f} → {r['last_loss']:.3f} |")
    skipped = meta.get("skipped")
    if skipped:
        lines += ["", "Not run (package not importable): " + ", ".join(skipped)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config on CPU, a few steps: checks the script")
    parser.add_argument("--stacks", default=",".join(DEFAULT_STACKS),
                        help="comma-separated subset of " + ",".join(STACKS) + " (default: " + ",".join(DEFAULT_STACKS)
                        + ")")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="results path without extension")
    parser.add_argument("--stack", help=argparse.SUPPRESS)  # internal: run one stack, print its JSON
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch = args.batch or (2 if quick else 8)
    args.seq_len = args.seq_len or (32 if quick else 512)
    args.steps = args.steps or (3 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.model_dir = args.model_dir or Path("/tmp") / ("train_step_tiny" if quick else "train_step_qwen2_1.5b")

    if args.stack:  # child
        print("RESULT " + json.dumps(run_stack(args)))
        return 0

    save_model(args.model_dir, quick)
    results, skipped = [], []
    for name in args.stacks.split(","):
        if name not in STACKS:
            parser.error(f"unknown stack {name!r}; choose from {', '.join(STACKS)}")
        if not available(STACKS[name][1]):
            skipped.append(f"{name} ({STACKS[name][1]})")
            continue
        cmd = [sys.executable, __file__, "--stack", name, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--model-dir", str(args.model_dir)]
        cmd += ["--quick"] if quick else []
        print(f"== {name}: {STACKS[name][0]}", flush=True)
        env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)  # offline: the GPU machine has no network
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            results.append(dict(stack=name, description=STACKS[name][0], error=tail[0]))
            print(f"   failed: {tail[0]}\n" + "\n".join(proc.stderr.strip().splitlines()[-15:]), flush=True)
            continue
        result = json.loads(line[len("RESULT "):])
        results.append(result)
        print(f"   {result['ms_per_step']:.1f} ms/step, {result['tokens_per_s']:,.0f} tokens/s, "
              f"peak {result['peak_gib']:.2f} GiB, compile {result['compile_s']:.1f} s (graphed: {result['graphed']}), "
              f"loss {result['first_loss']:.3f} → {result['last_loss']:.3f}", flush=True)

    meta = dict(command="python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *(argv or sys.argv[1:])]),
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), hardware=hardware(),
                config="tiny Qwen2 config (--quick, CPU)" if quick else "Qwen2-1.5B config, random weights",
                batch=args.batch, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup, skipped=skipped,
                quick=quick)
    table = render(results, meta)
    print("\n" + table)
    out = args.out or ROOT / "benchmarks" / "results" / ("train_step_quick" if quick else "train_step")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print(f"wrote {out.with_suffix('.md')} and .json")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
