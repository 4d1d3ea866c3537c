"""How a kernel is checked against its torch reference: used by tests/test_kernels.py, the kernels/ scripts, lesson 07.

    report = check_against_reference("rms_norm", rms_norm, [x, w], [dy], dtype=torch.bfloat16, eps=1e-6)

runs `fn(*inputs, impl=...)` three times on fresh leaf copies of the inputs, with a backward pass each:
"triton" (the kernel), "torch" (the reference in the same dtype), and "torch" in float64 (the truth), then checks
every output and every input gradient of the kernel against the truth with

    |triton - truth| <= atol(dtype) + 2 * max |torch - truth| + rtol(dtype) * |truth|

i.e. the dtype's tolerance, widened by the error eager PyTorch itself makes in that dtype: a sum over many rows in
fp16 is only as exact as fp16 allows, and the kernel must be about as good as eager PyTorch. It usually is better:
it computes in fp32 and rounds once, where torch rounds after every op. (In the Triton interpreter the fp32 -> bf16
cast truncates instead of rounding to nearest: up to one bf16 ulp, inside the bf16 tolerance.)
"""

from __future__ import annotations

import torch

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def assert_close(name, actual, expected, dtype, extra_atol: float = 0.0) -> float:
    """Raise AssertionError naming `name` unless actual ~ expected within TOL[dtype] (+ extra_atol).

    Returns the max abs difference."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype}, reference {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)}, reference {tuple(expected.shape)}"
    tol = dict(TOL[dtype], atol=TOL[dtype]["atol"] + extra_atol)
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{name}: {m}")
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def run(fn, inputs, grads_out, impl, dtype=None, **kwargs):
    """fn(*inputs, impl=impl) on fresh leaf copies (cast to `dtype` if given), then backward with grads_out.

    Returns (outputs, gradients of the inputs that require grad), detached.
    """
    def cast(x):
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x

    leaves = [cast(x.detach()).clone().requires_grad_(x.requires_grad) for x in inputs]
    outs = fn(*leaves, impl=impl, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(list(outs), [cast(g) for g in grads_out])
    return [o.detach() for o in outs], [x.grad for x in leaves if x.requires_grad]


def check_against_reference(name, fn, inputs, grads_out, dtype, output_tol=None, **kwargs):
    """Check the Triton path of `fn` against the float64 truth (module docstring). Raises AssertionError if wrong.

    `dtype` picks the tolerance; `output_tol` another one for the outputs (fp32 log-probs of bf16 logits).
    Returns a list of (what, max |triton - truth|, max |torch - truth|): the kernel's error beside eager's.
    """
    tri_outs, tri_grads = run(fn, inputs, grads_out, "triton", **kwargs)
    ref_outs, ref_grads = run(fn, inputs, grads_out, "torch", **kwargs)
    true_outs, true_grads = run(fn, inputs, grads_out, "torch", dtype=torch.float64, **kwargs)
    assert len(tri_grads) == len(ref_grads) == len(true_grads), f"{name}: gradients missing"
    pairs = [(f"output {i}", t, r, x, output_tol or dtype) for i, (t, r, x) in
             enumerate(zip(tri_outs, ref_outs, true_outs))]
    pairs += [(f"grad {i}", t, r, x, dtype) for i, (t, r, x) in enumerate(zip(tri_grads, ref_grads, true_grads))]
    report = []
    for what, tri, ref, truth, tol_dtype in pairs:
        assert tri is not None, f"{name}: no gradient for {what}"
        assert tri.dtype == ref.dtype, f"{name} {what}: dtype {tri.dtype}, torch gives {ref.dtype}"
        ref_err = (ref.double() - truth.double()).abs().max().item() if ref.numel() else 0.0
        err = assert_close(f"{name} {what}", tri.double(), truth.double(), tol_dtype, extra_atol=2 * ref_err)
        report.append((what, err, ref_err))
    return report
