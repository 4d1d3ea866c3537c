"""lessons_lib.fast_train: FastDecoder's loss and every LoRA gradient equal transformers + peft's; the offload
bookkeeping; compile_train_step (eager here, CUDA graphs in the cuda-marked tests)."""

import contextlib
import logging
import warnings

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from lessons_lib.fast_train import FastDecoder, compile_train_step  # noqa: E402
from lessons_lib.models import get_peft_model, load_model, save_random_model  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# sizes unlike the defaults (multiples of 64 for the bitsandbytes AVX512 CPU kernel, docs/LOADING.md), 3 layers
SIZES = dict(hidden_size=192, num_attention_heads=6, num_key_value_heads=2, intermediate_size=320,
             num_hidden_layers=3)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_models")
    return {arch: save_random_model(root / arch, arch=arch, seed=11 + i, **SIZES)
            for i, arch in enumerate(["qwen2", "llama"])}


def lora_model(path, load_in_4bit=True, targets=ALL, r=4, device=None, dtype=None, checkpointing=False, **kw):
    """A model with random A *and* B (peft's default B = 0 would leave A's gradient zero: a weak test)."""
    model, _ = load_model(path, load_in_4bit=load_in_4bit, device=device, dtype=dtype,
                          gradient_checkpointing=checkpointing)
    peft_model = get_peft_model(model, r=r, target_modules=targets, init_lora_weights=False, verbose=False, **kw)
    return peft_model.train()


def batch(B=3, T=37, vocab=300, padded=False, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    mask = None
    if padded:  # left padding of different lengths, one row without
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, :5] = 0
        mask[-1, :11] = 0
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(ids), to(mask), to(labels)


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(got, ref, loss_tol, grad_tol):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    torch.testing.assert_close(loss, ref_loss, rtol=loss_tol, atol=loss_tol)
    assert grads.keys() == ref_grads.keys() and ref_grads
    for name, ref_grad in ref_grads.items():
        scale = ref_grad.abs().max().item()
        assert scale > 0, f"{name}: reference gradient is zero (the test would be weak)"
        torch.testing.assert_close(grads[name], ref_grad, rtol=grad_tol, atol=grad_tol * scale, msg=name)


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left-padded"])
@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["4bit", "fp32"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_loss_and_every_lora_gradient_equal_transformers(model_dirs, arch, load_in_4bit, padded):
    model = lora_model(model_dirs[arch], load_in_4bit)
    ids, mask, labels = batch(padded=padded)
    ref = loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    # odd chunks: 111 rows = 3 MLP chunks of 29 + 24, and 7 loss chunks of 17 + 9
    dec = FastDecoder(model, mlp_chunk_tokens=29, loss_chunk_tokens=17)
    assert_same(loss_and_grads(model, lambda: dec.loss(ids, mask, labels)), ref, 1e-5, 1e-4)


def test_position_ids_of_left_padded_rows(model_dirs):
    """PPO gives left-padded rows positions that start at their first real token (cumsum of the mask - 1)."""
    model = lora_model(model_dirs["qwen2"])
    ids, mask, labels = batch(padded=True)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    ref = loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss)
    dec = FastDecoder(model)
    assert_same(loss_and_grads(model, lambda: dec.loss(ids, mask, labels, position_ids=pos)), ref, 1e-5, 1e-4)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["gate_proj", "down_proj"], ["o_proj", "up_proj"]])
def test_some_projections_without_adapters(model_dirs, targets):
    """Layers whose attention (or MLP) has nothing trainable take other branches of the backward."""
    model = lora_model(model_dirs["qwen2"], targets=targets)
    ids, _, _ = batch(B=2, T=20)
    ref = loss_and_grads(model, lambda: model(input_ids=ids, labels=ids).loss)
    dec = FastDecoder(model, mlp_chunk_tokens=16)
    assert_same(loss_and_grads(model, lambda: dec.loss(ids)), ref, 1e-5, 1e-4)


@pytest.mark.parametrize("offload", [False, True], ids=["on-device", "offload"])
def test_first_layer_without_adapters(model_dirs, offload):
    """Layer 0 has nothing trainable and its input needs no gradient: it runs without autograd and saves nothing
    (with offload, nothing is prefetched for it either)."""
    model = lora_model(model_dirs["llama"], layers_to_transform=[1, 2])
    ids, mask, labels = batch(padded=True)
    ref = loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert not any(".layers.0." in name for name in ref[1])
    dec = FastDecoder(model, offload=offload)
    assert_same(loss_and_grads(model, lambda: dec.loss(ids, mask, labels)), ref, 1e-5, 1e-4)
    assert 0 not in dec._offloader.loaded  # no copy of a checkpoint that was never saved (a graph would not join it)


def test_hidden_states_without_grad_and_with_adapters_disabled(model_dirs):
    model = lora_model(model_dirs["llama"])
    ids, mask, _ = batch(padded=True)
    dec = FastDecoder(model)
    with torch.no_grad():
        torch.testing.assert_close(dec(ids, mask), model(input_ids=ids, attention_mask=mask,
                                                          output_hidden_states=True).hidden_states[-1])
        with model.disable_adapter():  # PPO's reference pass: the base model
            base = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            torch.testing.assert_close(dec(ids, mask), base)
        assert (dec(ids, mask) - base).abs().max() > 1e-3  # the adapters do change the output


def test_offload_bookkeeping(model_dirs):
    """offload=True (host copies + two slots; on a CPU plain copies) gives exactly the same gradients, and a second
    forward before the backward of the first is refused instead of silently mixing their checkpoints."""
    model = lora_model(model_dirs["qwen2"])
    ids, mask, labels = batch(padded=True)
    ref = loss_and_grads(model, lambda: FastDecoder(model).loss(ids, mask, labels))
    dec = FastDecoder(model, offload=True)
    assert_same(loss_and_grads(model, lambda: dec.loss(ids, mask, labels)), ref, 0, 0)
    assert dec._offloader.nbytes()["host"] == 3 * ids.numel() * SIZES["hidden_size"] * 4
    first = dec.loss(ids, mask, labels)
    dec.loss(ids, mask, labels)
    with pytest.raises(RuntimeError, match="another forward pass"):
        first.backward()


def test_clear_errors(model_dirs, tmp_path):
    model = lora_model(model_dirs["qwen2"], lora_dropout=0.1)
    with pytest.raises(NotImplementedError, match="lora_dropout"):
        FastDecoder(model).loss(*batch()[:1])
    model.eval()  # dropout is off in eval mode: fine
    FastDecoder(model)(batch()[0])
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(NotImplementedError, match="supports"):
        FastDecoder(gpt2)
    full = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"])  # every weight trainable
    with pytest.raises(NotImplementedError, match="trainable"):
        FastDecoder(full)


# ---------------------------------------------------------------------------------------------- the step


def test_compile_train_step_equals_a_plain_loop(model_dirs):
    """On a CPU the step runs eagerly: same losses and parameters as the usual loop; update=False accumulates."""
    results = []
    for use_step in (False, True):
        torch.manual_seed(0)
        model = lora_model(model_dirs["llama"], load_in_4bit=False)
        dec = FastDecoder(model)
        opt = torch.optim.AdamW(dec.trainable_parameters(), lr=1e-2)
        ids = [batch(B=2, T=16, seed=s)[0] for s in range(3)]
        losses = []
        if use_step:
            step = compile_train_step(lambda input_ids: dec.loss(input_ids), opt, {"input_ids": ids[0]},
                                      max_grad_norm=1.0)
            assert not step.graphed
            losses.append(step({"input_ids": ids[0]}))
            step({"input_ids": ids[1]}, update=False)  # accumulate two batches, one update
            losses.append(step({"input_ids": ids[2]}))
        else:
            for i, update in ((0, True), (1, False), (2, True)):
                loss = dec.loss(ids[i])
                loss.backward()
                if update:
                    torch.nn.utils.clip_grad_norm_(dec.trainable_parameters(), 1.0)
                    opt.step()
                    opt.zero_grad()
                    losses.append(loss.detach())
        results.append((losses, [p.detach().clone() for p in dec.trainable_parameters()]))
    (ref_losses, ref_params), (losses, params) = results
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=0)
    torch.testing.assert_close(params, ref_params, rtol=0, atol=0)


def test_compile_train_step_errors(model_dirs):
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    with pytest.raises(ValueError, match="no parameter"):
        compile_train_step(lambda: frozen.sum(), torch.optim.SGD([frozen], lr=1.0))
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="CUDA device"):
        compile_train_step(lambda: p.sum(), torch.optim.SGD([p], lr=1.0), cuda_graph=True)


# ---------------------------------------------------------------------------------------------- CUDA (GPU machine)


@contextlib.contextmanager
def warnings_as_errors():
    """A failed capture falls back to eager with a warning: here that must fail the test."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compile_train_step")
        yield


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_cuda_bf16_4bit_matches_transformers(model_dirs, arch):
    """bf16 on the GPU: fused q|k|v matmul, chunked MLP and loss, bitsandbytes' own 4-bit GEMM kernel for small
    batches on the transformers side: rounding differs, so compare whole tensors (relative error of each LoRA
    gradient's norm)."""
    model = lora_model(model_dirs[arch], device="cuda", dtype=torch.bfloat16)
    ids, _, _ = batch(B=4, T=64, device="cuda")
    ref_loss, ref = loss_and_grads(model, lambda: model(input_ids=ids, labels=ids).loss)
    dec = FastDecoder(model, mlp_chunk_tokens=100, loss_chunk_tokens=48)
    loss, grads = loss_and_grads(model, lambda: dec.loss(ids))
    assert abs(loss.item() - ref_loss.item()) < 0.01 * ref_loss.item()
    worst = max((_rel(grads[n], ref[n]), n) for n in ref)
    assert worst[0] < 0.05, worst  # bf16 rounding in a different order; a real bug (a scale, a slice) is >> 5%


def _train(model_dir, graph: bool, offload: bool, steps: int = 3):
    torch.manual_seed(0)
    model = lora_model(model_dir, device="cuda", dtype=torch.bfloat16)
    dec = FastDecoder(model, offload=offload, mlp_chunk_tokens=100)
    opt = torch.optim.AdamW(dec.trainable_parameters(), lr=1e-3, capturable=True)

    def loss_fn(input_ids):  # PPO-style: a loss and statistics, one of them from a no-grad pass
        with torch.no_grad():
            hidden = dec(input_ids)
        return dec.loss(input_ids), {"hidden_rms": hidden.float().pow(2).mean().sqrt()}

    batches = [batch(B=4, T=64, device="cuda", seed=s)[0] for s in range(steps)]
    step = compile_train_step(loss_fn, opt, {"input_ids": batches[0]}, cuda_graph=graph, max_grad_norm=1.0)
    assert step.graphed == graph
    out = [step({"input_ids": b}) for b in batches]
    return out, [p.detach().float().clone() for p in dec.trainable_parameters()], step


@pytest.mark.cuda
@pytest.mark.parametrize("offload", [False, True], ids=["on-gpu", "offload"])
def test_cuda_graph_step_equals_eager(model_dirs, offload):
    """The captured step (forward, backward, clip, AdamW) replays what the eager step computes. Not bit for bit:
    flash attention's backward accumulates with atomics (PyTorch's default, non-deterministic), so gradients
    differ in their last bits from run to run; a stale input or a missed update would differ by far more (the
    batches differ, and each AdamW step moves every LoRA value by ~lr = 1e-3)."""
    with warnings_as_errors():
        graphed, graphed_params, step = _train(model_dirs["qwen2"], graph=True, offload=offload)
    eager, eager_params, _ = _train(model_dirs["qwen2"], graph=False, offload=offload)
    assert step.capture_s > 0
    for (loss, stats), (ref_loss, ref_stats) in zip(graphed, eager):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats["hidden_rms"], ref_stats["hidden_rms"], rtol=1e-4, atol=1e-4)
    assert graphed[0][0] != graphed[-1][0]  # the steps did train
    torch.testing.assert_close(graphed_params, eager_params, rtol=1e-4, atol=2e-5)


@pytest.mark.cuda
def test_cuda_offload_gives_the_same_gradients(model_dirs):
    """Same loss bit for bit (the forward is deterministic); gradients up to flash attention's non-deterministic
    backward (see above). The exact round trip of the checkpoints is checked by the next test."""
    model = lora_model(model_dirs["llama"], device="cuda", dtype=torch.bfloat16)
    ids, _, _ = batch(B=4, T=64, device="cuda")
    ref = loss_and_grads(model, lambda: FastDecoder(model).loss(ids))
    dec = FastDecoder(model, offload=True)
    got = loss_and_grads(model, lambda: dec.loss(ids))
    assert got[0] == ref[0]
    assert_same(got, ref, 0, 1e-2)
    assert dec._offloader.host[0].is_pinned()


@pytest.mark.cuda
def test_cuda_offloader_round_trip_inside_a_graph():
    """Checkpoints saved on a side stream and loaded back (prefetched one ahead) come back bit for bit, eagerly
    and as a captured graph replayed on new data (the side stream must join the capture)."""
    from lessons_lib.fast_train.offload import Offloader

    L, shape = 5, (3, 37, 64)
    xs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
    off = Offloader()

    def round_trip(gen):
        off.prepare(L, xs[0])
        for i in range(L):
            off.save(i, xs[i] * 2, gen)  # a fresh tensor, freed right after: its memory is reused at once
        off.finish_forward(xs[0].device)
        return [off.load(i, gen).clone() for i in reversed(range(L))][::-1]

    for got, x in zip(round_trip(1), xs):
        assert torch.equal(got, x * 2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = round_trip(2)
    for x in xs:
        x.normal_()
    graph.replay()
    torch.cuda.synchronize()
    for got, x in zip(outs, xs):
        assert torch.equal(got, x * 2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, tol, loss_rtol", [(torch.float32, 1e-2, 1e-3), (torch.bfloat16, 0.05, 5e-3)],
                         ids=["fp32", "bf16"])
def test_cuda_graph_of_the_transformers_model(model_dirs, dtype, tol, loss_rtol):
    """compile_train_step also captures the transformers + peft model as load_model + get_peft_model prepare it
    (non-reentrant checkpointing, without RNG bookkeeping since nothing drops out) with causal_lm_loss. Captured on
    one batch and replayed on others, it computes what the eager step computes, up to rounding: inside a capture
    cuBLAS picks other kernels than eagerly, so gradients differ by up to ~1e-3 (relative, the worst tensor) in fp32
    and ~2% in bf16, and bf16 losses by ~1.5e-3 (measured on the H200; two eager runs are bit-identical). SGD keeps the comparison linear (AdamW divides by
    sqrt(v) and turns rounding in near-zero gradients into whole steps); a stale batch or a missed update would
    differ by far more (each step moves the weights by ~1e-2 relative)."""
    from lessons_lib.loss import causal_lm_loss

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    batches = [batch(B=4, T=64, device="cuda", seed=s)[0] for s in range(4)]
    results = []
    for graph in (True, False):
        torch.manual_seed(0)
        model = lora_model(model_dirs["qwen2"], device="cuda", dtype=dtype, checkpointing=True)
        params = [p for p in model.parameters() if p.requires_grad]
        start = [p.detach().float().clone() for p in params]
        step = compile_train_step(lambda input_ids: causal_lm_loss(model, input_ids),
                                  torch.optim.SGD(params, lr=0.05), {"input_ids": batches[0]}, cuda_graph=graph)
        assert step.graphed == graph
        step({"input_ids": batches[1]}, update=False)                   # gradients of a batch not captured
        grads = [p.grad.detach().float().clone() for p in params]
        for p in params:
            p.grad.zero_()
        losses = torch.stack([step({"input_ids": b}) for b in batches[1:]])
        moved = [p.detach().float() - s for p, s in zip(params, start)]
        results.append((grads, losses, moved))
    (grads, losses, moved), (ref_grads, ref_losses, ref_moved) = results
    assert max(rel(g, r) for g, r in zip(grads, ref_grads)) < tol
    torch.testing.assert_close(losses, ref_losses, rtol=loss_rtol, atol=1e-3)
    assert all(float(m.norm()) > 0 for m in ref_moved)
    assert max(rel(m, r) for m, r in zip(moved, ref_moved)) < tol
