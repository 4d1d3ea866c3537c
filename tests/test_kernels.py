"""Every kernel through impl="triton" against its torch reference: outputs and every gradient, odd shapes, 3 dtypes.

On a machine without a GPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), on CPU
tensors and small odd shapes. On a GPU the same tests run on CUDA tensors; the tests marked `cuda` add the
Qwen2-1.5B shapes and the memory budget of the log-prob kernel.
"""

import logging
import sys

import pytest
import torch

from lessons_lib.kernels import (
    INTERPRETED, apply_rope, logprobs_and_entropy, nf4_dequantize, rms_norm, selective_log_softmax, swiglu,
)
from lessons_lib.kernels import _common
from lessons_lib.kernels._common import use_triton
from lessons_lib.kernels.checking import assert_close, check_against_reference, run
from lessons_lib.kernels.logprobs import LogprobsEntropyFunction
from lessons_lib.nf4 import dequantize_nf4, quantize_nf4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not INTERPRETED:
    pytest.skip("no GPU and the kernels were not defined under TRITON_INTERPRET=1", allow_module_level=True)
# On a GPU every test here runs compiled kernels on CUDA tensors: mark them all, so `pytest -m cuda` selects them.
pytestmark = [pytest.mark.cuda] if DEVICE == "cuda" else []

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # tolerances: lessons_lib/kernels/checking.py


@pytest.fixture(autouse=True)
def _first_config_only(monkeypatch):
    """On a GPU, autotuning every odd shape would compile every config dozens of times: use each launcher's first
    config here; test_every_launch_config checks all the others, test_cuda_autotuned_path the tuner."""
    monkeypatch.setattr(_common, "AUTOTUNE", False)


# ------------------------------------------------------------------------------------------------ RMSNorm

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 37, 133), (5, 123, 123), (2, 1000)], ids=str)
def test_rms_norm(shape, dtype):
    x = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], device=DEVICE)).to(dtype).requires_grad_()
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    check_against_reference("rms_norm", rms_norm, [x, w], [dy], dtype, eps=1e-5)


def test_rms_norm_mixed_dtypes_and_strided_rows():
    """bf16 activations with an fp32 weight give fp32 (transformers' promotion); rows may be strided views."""
    x = torch.randn(4, 8, 77 + 5, device=DEVICE).to(torch.bfloat16)[..., :77].requires_grad_()  # row stride 82
    w = torch.randn(77, device=DEVICE).requires_grad_()
    dy = torch.randn(4, 8, 77, device=DEVICE)
    check_against_reference("rms_norm", rms_norm, [x, w], [dy], torch.bfloat16, eps=1e-6)
    (y,), (dx, dw) = run(rms_norm, [x, w], [dy], "triton", eps=1e-6)
    assert y.dtype == torch.float32 and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32


def test_rms_norm_frozen_weight():
    """LoRA freezes the norms: no weight gradient is computed, dx is unchanged."""
    x = torch.randn(3, 7, 96, device=DEVICE, requires_grad=True)
    w = torch.randn(96, device=DEVICE)  # requires_grad=False
    dy = torch.randn_like(x)
    check_against_reference("rms_norm", rms_norm, [x, w], [dy], torch.float32)
    y = rms_norm(x, w, impl="triton")
    assert torch.autograd.grad(y, [x], dy)[0].shape == x.shape


@pytest.mark.parametrize("rows", [0, 1, 700])
def test_rms_norm_weight_gradient_sums_every_program(rows):
    """dw is summed over the backward programs' partial rows by a second kernel: no rows (dw = 0), one row, and
    more rows than programs (each program walks several)."""
    x = torch.randn(rows, 40, device=DEVICE, requires_grad=True)
    w = (1 + 0.3 * torch.randn(40, device=DEVICE)).requires_grad_()
    dy = torch.randn_like(x)
    rms_norm(x, w, impl="triton").backward(dy)
    grad_w, w.grad = w.grad, None
    rms_norm(x.detach(), w, impl="torch").backward(dy)
    assert_close("dw", grad_w, w.grad, torch.float32)
    if rows == 0:
        assert torch.equal(grad_w, torch.zeros_like(w))


# ------------------------------------------------------------------------------------------------ RoPE

def rope_inputs(B, nh, nkv, T, hs, dtype, transposed=True, cos_batch=None):
    def heads(n):  # attention makes (B, T, n, hs) -> (B, n, T, hs) transposed views
        if transposed:
            return torch.randn(B, T, n, hs, device=DEVICE).to(dtype).transpose(1, 2)
        return torch.randn(B, n, T, hs, device=DEVICE).to(dtype)

    angles = torch.randn(cos_batch or B, T, hs, device=DEVICE) * 3  # halves differ: the general formula is tested
    return heads(nh).requires_grad_(), heads(nkv).requires_grad_(), angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, nh, nkv, T, hs", [(2, 6, 2, 7, 10), (1, 3, 3, 5, 64), (3, 5, 1, 9, 6), (1, 1, 1, 1, 2)])
def test_rope(B, nh, nkv, T, hs, dtype):
    q, k, cos, sin = rope_inputs(B, nh, nkv, T, hs, dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    check_against_reference("rope", apply_rope, [q, k, cos, sin], [dq, dk], dtype)


@pytest.mark.parametrize("transposed", [True, False], ids=["transposed", "contiguous"])
def test_rope_layouts_and_broadcast_positions(transposed):
    """Contiguous and transposed q/k; cos/sin with batch 1 broadcast over B; outputs keep the input layout."""
    q, k, cos, sin = rope_inputs(3, 4, 2, 11, 16, torch.float32, transposed=transposed, cos_batch=1)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    check_against_reference("rope", apply_rope, [q, k, cos, sin], [dq, dk], torch.float32)
    q_out, k_out = apply_rope(q, k, cos, sin, impl="triton")
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()


def test_rope_rejects_bad_inputs():
    q, k, cos, sin = rope_inputs(1, 2, 2, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="even"):
        apply_rope(q, k, cos, sin, impl="triton")
    q, k, cos, sin = rope_inputs(1, 2, 2, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, k, cos.requires_grad_(), sin, impl="triton")
    with pytest.raises(ValueError, match="shapes disagree"):
        apply_rope(q, k[:, :, :2], cos, sin, impl="triton")


# ------------------------------------------------------------------------------------------------ SwiGLU

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (3, 37, 133), (5, 123, 123), (1001,)], ids=str)
def test_swiglu(shape, dtype):
    gate = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_()
    up = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    check_against_reference("swiglu", swiglu, [gate, up], [dy], dtype)


# ------------------------------------------------------------------------------------------------ log-probs

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, T, V, temperature", [(2, 7, 1001, 0.7), (1, 3, 5, 1.0), (2, 3, 20011, 1.3)])
def test_logprobs_and_entropy(B, T, V, temperature, dtype):
    """V = 20011 spans several vocabulary blocks, so the online max/sum rescaling is exercised."""
    logits = (torch.randn(B, T, V, device=DEVICE) * 4).to(dtype).requires_grad_()
    index = torch.randint(0, V, (B, T), device=DEVICE)
    dlogprobs, dentropy = torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE)
    check_against_reference("logprobs_and_entropy", logprobs_and_entropy, [logits, index], [dlogprobs, dentropy],
                            dtype, output_tol=torch.float32, temperature=temperature)
    logprobs, entropy = logprobs_and_entropy(logits, index, temperature, impl="triton")
    assert logprobs.dtype == entropy.dtype == torch.float32  # whatever the logits' dtype


def test_selective_log_softmax_2d_sliced_int32_and_logprob_grad_only():
    """(N, V) input; PPO-style slice of (B, T, V) logits (strided rows, not copied); int32 ids."""
    full = (torch.randn(3, 9, 301, device=DEVICE) * 2).requires_grad_()
    index = torch.randint(0, 301, (3, 6), device=DEVICE, dtype=torch.int32)
    lp = selective_log_softmax(full[:, 2:-1], index, impl="triton")
    lp.backward(torch.ones_like(lp))
    grad, full.grad = full.grad, None
    ref = selective_log_softmax(full[:, 2:-1], index.long(), impl="torch")
    ref.backward(torch.ones_like(ref))
    assert_close("logprobs", lp, ref, torch.float32)
    assert_close("dlogits", grad, full.grad, torch.float32)

    flat = torch.randn(13, 77, device=DEVICE)
    idx = torch.randint(0, 77, (13,), device=DEVICE)
    assert_close("2-D logprobs", selective_log_softmax(flat, idx, impl="triton"),
                 selective_log_softmax(flat, idx, impl="torch"), torch.float32)


def test_logprobs_with_masked_vocabulary():
    """-inf logits (a masked vocabulary) give exact zeros of probability, finite entropy, and no NaN."""
    logits = torch.randn(2, 5, 300, device=DEVICE)
    logits[..., 150:] = float("-inf")
    index = torch.randint(0, 150, (2, 5), device=DEVICE)
    lp, ent = logprobs_and_entropy(logits, index, impl="triton")
    p = torch.softmax(logits, -1)
    assert_close("logprobs", lp, torch.log_softmax(logits, -1).gather(-1, index[..., None])[..., 0], torch.float32)
    assert_close("entropy", ent, torch.special.entr(p).sum(-1), torch.float32)


def test_logprobs_inplace_backward():
    """The gradient lands in the logits' storage; a later use of the overwritten logits raises."""
    V = 257
    base = torch.randn(4, 6, V, device=DEVICE, requires_grad=True)
    index = torch.randint(0, V, (4, 6), device=DEVICE)
    expected_lp, expected_ent = logprobs_and_entropy(base, index, impl="torch")
    (expected_lp.sum() + 0.5 * expected_ent.sum()).backward()
    expected, base.grad = base.grad.clone(), None

    logits = base * 1.0  # a non-leaf, like lm_head's output
    lp, ent = logprobs_and_entropy(logits, index, impl="triton", inplace_backward=True)
    (lp.sum() + 0.5 * ent.sum()).backward()
    assert_close("dlogits", base.grad, expected, torch.float32)
    assert torch.equal(logits.detach(), base.grad), "the gradient should have been written into the logits"

    logits = base * 1.0
    other = (logits * logits).sum()  # saves the logits for its backward, which runs after ours
    lp = selective_log_softmax(logits, index, impl="triton", inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + other).backward()


def test_logprobs_saves_no_vocabulary_sized_fp32():
    """Memory discipline, checked on any device: besides the input logits, autograd keeps O(B*T) numbers."""
    B, T, V = 3, 4, 5003
    logits = torch.randn(B, T, V, device=DEVICE, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logprobs_and_entropy(logits, torch.randint(0, V, (B, T), device=DEVICE), impl="triton")
    others = [t for t in saved if t.data_ptr() != logits.data_ptr()]
    assert sum(t.numel() for t in others) <= 4 * B * T, [tuple(t.shape) for t in others]


def test_logprobs_rejects_bad_inputs():
    logits = torch.randn(2, 3, 10, device=DEVICE)
    if DEVICE == "cpu":  # on a GPU the check would cost a host sync per call: test_logprobs_out_of_range_ids_give_nan
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            selective_log_softmax(logits, torch.full((2, 3), 10, device=DEVICE), impl="triton")
    with pytest.raises(ValueError, match="index must have shape"):
        selective_log_softmax(logits, torch.zeros(2, 4, dtype=torch.long, device=DEVICE), impl="triton")
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(logits, torch.zeros(2, 3, dtype=torch.long, device=DEVICE), temperature=0.0)


def test_logprobs_out_of_range_ids_give_nan():
    """The kernels never read an id outside [0, V): its row gets a NaN log-prob and a NaN gradient, the other rows
    are exact. (Called below the host-side check, which runs for CPU tensors only.)"""
    V = 37
    logits = torch.randn(2, 3, V, device=DEVICE, requires_grad=True)
    index = torch.randint(0, V, (2, 3), device=DEVICE)
    index[0, 1], index[1, 2] = V, -1
    lp, ent = LogprobsEntropyFunction.apply(logits, index, 1.0, True, False)
    (lp.sum() + ent.sum()).backward()
    bad = torch.zeros(2, 3, dtype=torch.bool, device=DEVICE)
    bad[0, 1] = bad[1, 2] = True
    assert lp[bad].isnan().all() and not lp[~bad].isnan().any()
    assert logits.grad[bad].isnan().all() and not logits.grad[~bad].isnan().any()
    good = logits.detach()[~bad].requires_grad_()  # (4, V): the good rows alone, through the reference
    ref_lp, ref_ent = logprobs_and_entropy(good, index[~bad], impl="torch")
    (ref_lp.sum() + ref_ent.sum()).backward()
    assert_close("logprobs", lp[~bad].detach(), ref_lp, torch.float32)
    assert_close("entropy", ent[~bad].detach(), ref_ent, torch.float32)
    assert_close("dlogits", logits.grad[~bad], good.grad, torch.float32)
    if DEVICE == "cuda":  # no host-side check on a GPU: the public function gives the NaN too
        assert selective_log_softmax(logits.detach(), index)[bad].isnan().all()


# ------------------------------------------------------------------------------------------------ NF4

@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, blocksize", [((1,), 64), ((3,), 32), ((37, 1001), 64), ((5, 123, 123), 128),
                                              ((300, 40), 256)], ids=str)
def test_nf4_dequantize_equals_reference(shape, blocksize, dtype, double_quant):
    w = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    packed, state = packed.to(DEVICE), state.to(DEVICE)
    out = nf4_dequantize(packed, state, impl="triton")
    ref = dequantize_nf4(packed, state)
    assert out.dtype == dtype and out.shape == torch.Size(shape)
    assert torch.equal(out, ref), f"max diff {(out.float() - ref.float()).abs().max().item():.3g}"


def test_nf4_dequantize_reads_a_bitsandbytes_quant_state():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    # rows of whole blocks: bitsandbytes 0.50.2's CPU dequantization is wrong otherwise (see tests/test_nf4.py)
    w = torch.randn(48, 192, dtype=torch.bfloat16, device=DEVICE)
    packed, quant_state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    out = nf4_dequantize(packed, quant_state, impl="triton")
    assert torch.equal(out, bnb_f.dequantize_4bit(packed, quant_state))


# ------------------------------------------------------------------------------------------------ impl switch

def test_impl_switch(monkeypatch):
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="impl must be one of"):
        rms_norm(x, torch.ones(8, device=DEVICE), impl="cuda")
    assert use_triton("auto", x, op="t") is True  # a GPU, or the interpreter (else this module was skipped)
    assert use_triton("torch", x, op="t") is False
    calls = []
    original = LogprobsEntropyFunction.apply
    monkeypatch.setattr(LogprobsEntropyFunction, "apply", lambda *a: calls.append(1) or original(*a))
    selective_log_softmax(x, torch.zeros(3, dtype=torch.long, device=DEVICE), impl="auto")
    selective_log_softmax(x, torch.zeros(3, dtype=torch.long, device=DEVICE), impl="torch")
    assert calls == [1]


# ------------------------------------------------------------------------------------------------ Launcher

class _FakeJit:
    """Stands in for a @triton.jit function: records how it was launched."""

    arg_names = ["x_ptr", "N", "M"]

    def __init__(self, calls):
        self.calls = calls

    def run(self, *args, grid, warmup, **kwargs):
        self.calls.append(("jit", args, grid, kwargs))


class _FakeHeuristics:
    """What @triton.heuristics makes: the function under it in .fn, the rules in .values."""

    def __init__(self, calls, values):
        self.fn, self.values = _FakeJit(calls), values


def test_launcher_skips_the_autotuner_once_a_key_is_tuned(monkeypatch):
    """The first launch of a key goes through Triton's autotuner; later ones run the jit function directly, with the
    picked config, the heuristics' values (from the key) and the config's options, the grid computed from them."""
    calls, configs = [], [_common.config(BLOCK_M=1, num_warps=4), _common.config(BLOCK_M=2, num_warps=8)]

    class FakeAutotuner:
        best_config = None

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append(("autotuner", args))
                self.best_config = configs[1]  # as Triton's Autotuner.run records the config it used
            return run

    monkeypatch.setattr(_common, "INTERPRETED", False)
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    monkeypatch.setattr(_common.triton, "autotune", lambda configs, key: (lambda kernel: FakeAutotuner()))
    launcher = _common.Launcher(_FakeHeuristics(calls, {"BLOCK_N": lambda args: 2 * args["N"]}), configs, key=["N"])
    x = torch.zeros(3)
    grid = lambda meta: (12 // meta["BLOCK_M"],)  # noqa: E731
    launcher[grid](x, 5, 7)
    launcher[grid](x, 5, 9)  # same key (N = 5, float32): cached
    launcher[grid](x, 6, 7)  # new N: tuned again
    launcher[grid](x.double(), 5, 7)  # new dtype: tuned again, as Triton's autotuner keys on dtypes too
    assert [c[0] for c in calls] == ["autotuner", "jit", "autotuner", "autotuner"]
    _, args, launched_grid, kwargs = calls[1]
    assert args == (x, 5, 9) and launched_grid == (6,)
    assert kwargs["BLOCK_M"] == 2 and kwargs["BLOCK_N"] == 10 and kwargs["num_warps"] == 8
    assert {k: v for k, v in kwargs.items() if k not in ("BLOCK_N",)} == configs[1].all_kwargs()


def test_launcher_heuristics_may_read_only_the_key_and_the_config(monkeypatch):
    """Heuristics are cached per key, so one that reads another argument would go stale: it must raise."""
    calls = []
    monkeypatch.setattr(_common, "INTERPRETED", False)
    monkeypatch.setattr(_common, "AUTOTUNE", False)
    launcher = _common.Launcher(_FakeHeuristics(calls, {"BLOCK_N": lambda args: args["M"]}),
                                [_common.config(BLOCK_M=1)], key=["N"])
    with pytest.raises(KeyError, match="heuristic BLOCK_N reads 'M'"):
        launcher[(1,)](torch.zeros(3), 5, 7)
    with pytest.raises(ValueError, match=r"key \['K'\] not among"):
        _common.Launcher(_FakeHeuristics(calls, {}), [_common.config(BLOCK_M=1)], key=["K"])
    assert calls == []


# ------------------------------------------------------------------------------------------------ GPU, real shapes

QWEN2_1P5B = dict(hidden=1536, intermediate=8960, nh=12, nkv=2, hs=128, vocab=151936)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [4096, 32768])
def test_cuda_qwen2_shapes_rms_norm_swiglu(rows):
    dtype = torch.bfloat16
    x = torch.randn(rows, QWEN2_1P5B["hidden"], device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(QWEN2_1P5B["hidden"], device="cuda", dtype=dtype, requires_grad=True)
    check_against_reference("rms_norm", rms_norm, [x, w], [torch.randn_like(x)], dtype)
    g = torch.randn(rows // 4, QWEN2_1P5B["intermediate"], device="cuda", dtype=dtype, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    check_against_reference("swiglu", swiglu, [g, u], [torch.randn_like(g)], dtype)


@pytest.mark.cuda
def test_cuda_qwen2_shapes_rope():
    q, k, cos, sin = rope_inputs(8, QWEN2_1P5B["nh"], QWEN2_1P5B["nkv"], 4096, QWEN2_1P5B["hs"], torch.bfloat16)
    check_against_reference("rope", apply_rope, [q, k, cos, sin], [torch.randn_like(q), torch.randn_like(k)],
                            torch.bfloat16)


@pytest.mark.cuda
def test_cuda_logprobs_qwen2_vocab_and_memory():
    """V = 151,936, 1,024 rows: values, gradient, and the memory the op adds (forward; forward + in-place
    backward) <= 1/8 of `log_softmax(logits.float()).gather()`'s (4,096 rows: kernels/results/logprobs.md)."""
    rows, V = 1024, QWEN2_1P5B["vocab"]
    logits = (torch.randn(rows, V, device="cuda") * 3).to(torch.bfloat16).requires_grad_()
    index = torch.randint(0, V, (rows,), device="cuda")
    g = torch.randn(rows, device="cuda")
    check_against_reference("logprobs_and_entropy", logprobs_and_entropy, [logits, index], [g, g], torch.bfloat16,
                            output_tol=torch.float32)

    # Memory, as in a model: logits = hidden @ lm_head.T already exist; measure what the op adds on top of them.
    hidden = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lm_head = torch.randn(V, 256, device="cuda", dtype=torch.bfloat16)

    def peak_extra(op, backward):
        logits = hidden @ lm_head.T  # (rows, V) bf16, part of the graph
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        lp = op(logits)
        if backward:
            lp.backward(g)
        torch.cuda.synchronize()
        hidden.grad = None
        return torch.cuda.max_memory_allocated() - before

    def reference(logits):
        return torch.log_softmax(logits.float(), -1).gather(-1, index[:, None])[:, 0]

    fwd_ref, fwd_ours = peak_extra(reference, False), peak_extra(lambda x: selective_log_softmax(x, index), False)
    assert fwd_ours <= fwd_ref / 8, f"forward: {fwd_ours / 2**20:.0f} MiB vs {fwd_ref / 2**20:.0f} MiB"
    both_ref = peak_extra(reference, True)
    both_ours = peak_extra(lambda x: selective_log_softmax(x, index, inplace_backward=True), True)
    assert both_ours <= both_ref / 8, f"forward + backward: {both_ours / 2**20:.0f} MiB vs {both_ref / 2**20:.0f} MiB"


@pytest.mark.cuda
def test_cuda_nf4_large():
    w = torch.randn(8960, 1536, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(nf4_dequantize(packed, state, impl="triton"), dequantize_nf4(packed, state))


def _config_cases():
    """(launchers, a check going through them) per kernel: moderate bf16 shapes on a GPU, small in the interpreter."""
    gpu = DEVICE == "cuda"
    rows, hidden, inter, heads, V = (64, 1536, 8960, 12, 151936) if gpu else (5, 300, 333, 5, 9001)

    def rms():
        x = torch.randn(rows, hidden, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(hidden, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        check_against_reference("rms_norm", rms_norm, [x, w], [torch.randn_like(x)], torch.bfloat16)

    def rope():
        q, k, cos, sin = rope_inputs(2, heads, 2, rows, 128, torch.bfloat16)
        check_against_reference("rope", apply_rope, [q, k, cos, sin], [torch.randn_like(q), torch.randn_like(k)],
                                torch.bfloat16)

    def glu():
        g = torch.randn(rows, inter, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        u = torch.randn_like(g, requires_grad=True)
        check_against_reference("swiglu", swiglu, [g, u], [torch.randn_like(g)], torch.bfloat16)

    def logprobs():
        logits = (3 * torch.randn(3, V, device=DEVICE)).to(torch.bfloat16).requires_grad_()
        index = torch.randint(0, V, (3,), device=DEVICE)
        g = torch.randn(3, device=DEVICE)
        check_against_reference("logprobs", logprobs_and_entropy, [logits, index], [g, g], torch.bfloat16,
                                output_tol=torch.float32)
        base = logits.detach().clone().requires_grad_()
        selective_log_softmax(base * 1, index, inplace_backward=True).backward(g)
        expected = torch.func.grad(lambda x: (selective_log_softmax(x, index, impl="torch") * g).sum())(
            logits.detach().float())
        assert_close("in-place dlogits", base.grad, expected.to(torch.bfloat16), torch.bfloat16)

    def nf4():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            w = torch.randn(rows * 3, hidden + 1, device=DEVICE, dtype=dtype) * 0.02
            packed, state = quantize_nf4(w, blocksize=64, double_quant=True)
            assert torch.equal(nf4_dequantize(packed, state, impl="triton"), dequantize_nf4(packed, state))

    module = lambda name: sys.modules[f"lessons_lib.kernels.{name}"]  # noqa: E731 (not the same-named functions)
    return {
        "rms_norm": ([module("rms_norm")._fwd, module("rms_norm")._bwd, module("rms_norm")._dw], rms),
        "rope": ([module("rope")._rope], rope),
        "swiglu": ([module("swiglu")._fwd, module("swiglu")._bwd], glu),
        "logprobs": ([module("logprobs")._fwd, module("logprobs")._bwd, module("logprobs")._bwd_inplace], logprobs),
        "nf4_dequantize": ([module("dequant")._dequantize], nf4),
    }


@pytest.mark.parametrize("kernel", ["rms_norm", "rope", "swiglu", "logprobs", "nf4_dequantize"])
def test_every_launch_config(kernel):
    """A GPU autotuner may pick any config of a launcher (block sizes, rows per program): each must be correct."""
    launchers, run_check = _config_cases()[kernel]
    for launcher in launchers:
        for config in launcher.configs:
            with launcher.using(config):
                run_check()


def _graph_case(kernel):
    """(leaves that get gradients, other inputs, the op) at a moderate bf16 shape, for test_cuda_graph_capture."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    if kernel == "rms_norm":
        return [torch.randn(300, 1536, **bf16), torch.randn(1536, **bf16)], [], lambda x, w: rms_norm(x, w)
    if kernel == "rope":
        q, k, cos, sin = rope_inputs(2, 12, 2, 37, 128, torch.bfloat16)
        return [q.detach(), k.detach()], [cos, sin], lambda q, k, cos, sin: apply_rope(q, k, cos, sin)
    if kernel == "swiglu":
        return [torch.randn(300, 8960, **bf16), torch.randn(300, 8960, **bf16)], [], lambda g, u: swiglu(g, u)
    if kernel == "logprobs":
        index = torch.randint(0, 151936, (64,), device="cuda")
        return [3 * torch.randn(64, 151936, **bf16)], [index], lambda x, i: logprobs_and_entropy(x, i, 0.7)
    packed, state = quantize_nf4(torch.randn(1536, 1536, **bf16) * 0.02, blocksize=64, double_quant=True)
    return [], [packed], lambda p: nf4_dequantize(p, state)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["rms_norm", "rope", "swiglu", "logprobs", "nf4_dequantize"])
def test_cuda_graph_capture(kernel):
    """Forward and backward of every op can be captured in a CUDA graph (no host sync in the launch path), and a
    replay on new input values equals an eager call bit for bit: what bench.device_time_ms relies on. (First
    configs, as in the other tests: the launch code after a key is tuned is the same.)"""
    from lessons_lib.kernels import bench

    leaves, others, op = _graph_case(kernel)
    leaves = [t.requires_grad_() for t in leaves]
    grads_out = []

    def step():
        for t in leaves:
            t.grad = None
        outs = op(*leaves, *others)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        if leaves:
            if not grads_out:
                grads_out.extend(torch.randn_like(o) for o in outs)
            torch.autograd.backward(outs, grads_out)
        return [o.detach() for o in outs] + [t.grad for t in leaves]

    step()  # compiles
    assert bench.device_time_ms(step, leaves) > 0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():  # new values in the same tensors
        for t in leaves + [t for t in others if t.is_floating_point()]:
            t.copy_(torch.randn_like(t) * t.abs().max())
        if kernel == "nf4_dequantize":
            others[0].copy_(torch.randint_like(others[0], 0, 256))
    graph.replay()
    replayed = [t.clone() for t in captured]
    eager = step()
    for i, (a, b) in enumerate(zip(replayed, eager)):
        assert torch.equal(a, b), f"{kernel}: tensor {i} of the replay differs from eager"


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["rms_norm", "rope", "swiglu", "logprobs", "nf4_dequantize"])
def test_cuda_autotuned_path(kernel, monkeypatch):
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    _config_cases()[kernel][1]()
