"""lessons_lib.nf4 against bitsandbytes: byte-for-byte quantization, equal dequantization, on fresh random tensors."""

import logging
import zlib

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # the CPU "kernels-community" notice
bnb_f = pytest.importorskip("bitsandbytes.functional")

from lessons_lib.nf4 import (  # noqa: E402
    ABSMAX_BLOCKSIZE, NF4State, dequantize_nf4, dynamic_code, nf4_code, quantize_nf4,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# odd shapes: 1 element, odd counts, rows shorter / longer than a block, a partial last block, 3-D
SHAPES = [(1,), (3,), (7, 13), (64, 64), (33, 65), (5, 123, 123), (2053,), (96, 48), (4, 4096 + 17)]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def random_weight(shape, dtype, gen):
    """Normal weights at a random scale, with a few outliers and an all-zero stretch (zero blocks)."""
    w = torch.randn(shape, generator=gen) * (10 ** (torch.rand((), generator=gen) * 4 - 3))
    flat = w.view(-1)
    if flat.numel() > 8:
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=gen)
        flat[idx] *= 20  # outliers
        flat[: min(flat.numel() // 3, 300)] = 0  # zeros (whole blocks for small blocksizes)
    return w.to(dtype)


def reference_dequantize(packed, quant_state):
    """bitsandbytes' dequantization of the *flat* tensor, reshaped.

    bitsandbytes 0.50.2's AVX512 CPU kernel indexes absmax per row and is wrong when a row is not a whole number of
    blocks (docs/LOADING.md); with one flat row its indexing is right, so that is the reference we compare against.
    """
    shape = quant_state.shape
    flat = bnb_f.QuantState(absmax=quant_state.absmax, shape=torch.Size([shape.numel()]), dtype=quant_state.dtype,
                            blocksize=quant_state.blocksize, code=quant_state.code, quant_type="nf4",
                            offset=quant_state.offset, state2=quant_state.state2)
    return bnb_f.dequantize_4bit(packed, flat).reshape(shape)


def test_codes_match_bitsandbytes():
    assert torch.equal(nf4_code(), bnb_f.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnb_f.create_dynamic_map())
    code = nf4_code()
    assert code[0] == -1 and code[-1] == 1 and code[7] == 0 and torch.all(code[1:] > code[:-1])


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_and_dequantize_match_bitsandbytes(shape, dtype, double_quant):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape}{dtype}{double_quant}".encode()))
    for blocksize in [64, BLOCKSIZES[int(torch.randint(0, len(BLOCKSIZES), (), generator=gen))]]:
        w = random_weight(shape, dtype, gen)
        packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        ref_packed, ref_state = bnb_f.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                                    quant_type="nf4")
        where = f"shape {shape} {dtype} blocksize {blocksize}"
        assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape, where
        assert torch.equal(packed, ref_packed), f"packed bytes differ ({where}): {(packed != ref_packed).sum()} bytes"
        assert torch.equal(state.code, ref_state.code)
        if double_quant:
            assert state.absmax is None and state.double_quant
            assert torch.equal(state.absmax_offset, ref_state.offset), where
            assert torch.equal(state.absmax_q, ref_state.absmax), \
                f"8-bit absmax differ ({where}): {(state.absmax_q != ref_state.absmax).sum()} of {state.n_blocks}"
            assert torch.equal(state.absmax_scale, ref_state.state2.absmax), where
            assert torch.equal(state.absmax_code, ref_state.state2.code)
        else:
            assert torch.equal(state.absmax, ref_state.absmax), where

        out = dequantize_nf4(packed, state)
        assert out.dtype == dtype and out.shape == w.shape
        ref = reference_dequantize(ref_packed, ref_state)
        assert torch.equal(out, ref), f"dequantized values differ ({where}): max {(out - ref).abs().max()}"
        # where bitsandbytes' own multi-row kernel is right, it agrees too (through NF4State.to_bnb)
        if len(shape) == 1 or shape[-1] % blocksize == 0 or shape[-1] % 16:
            assert torch.equal(bnb_f.dequantize_4bit(packed, state.to_bnb()).reshape(shape), out), where


def test_rounding_at_the_edges_matches_bitsandbytes():
    """Random data never lands exactly on a rounding boundary; build values that do.

    Block 1 (absmax 1.0): every midpoint between two codes, exactly (a tie must take the lower code).
    Block 2 (partial, absmax 3.0): values next to 3 * midpoint where x / 3 and x * (1/3) round to different
    codes (bitsandbytes divides in the last, partial block).
    """
    code = nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    absmax = torch.tensor(3.0)
    tricky = []
    for m in midpoints:
        x = m * absmax
        for _ in range(20):
            x = torch.nextafter(x, torch.tensor(float("inf")))
            by_div = torch.bucketize((x / absmax).clamp(-1, 1), midpoints)
            by_mul = torch.bucketize((x * (1.0 / absmax)).clamp(-1, 1), midpoints)
            if by_div != by_mul:
                tricky.append(x.item())
    assert len(tricky) >= 3, "the search for double-rounding cases found too few; the test would prove nothing"
    block1 = torch.cat([torch.tensor([1.0]), midpoints, -midpoints, torch.zeros(64 - 1 - 30)])
    block2 = torch.tensor([3.0, *tricky])
    w = torch.cat([block1, block2])
    packed, state = quantize_nf4(w, blocksize=64, double_quant=False)
    ref_packed, ref_state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax)


@pytest.mark.parametrize("double_quant", [False, True])
def test_error_is_within_half_a_code_gap(double_quant):
    """|w - dequant(w)| <= absmax * (largest half-gap of the code) (+ the absmax's own 8-bit error)."""
    w = torch.randn(37, 300) * 0.02
    packed, state = quantize_nf4(w, blocksize=64, double_quant=double_quant)
    err = (dequantize_nf4(packed, state) - w).abs().reshape(-1)
    code = nf4_code()
    half_gap = ((code[1:] - code[:-1]) / 2).max()
    flat = torch.nn.functional.pad(w.reshape(-1), (0, state.n_blocks * 64 - w.numel()))
    true_absmax = flat.view(-1, 64).abs().amax(1).repeat_interleave(64)[: w.numel()]
    scale_err = (state.scales() - flat.view(-1, 64).abs().amax(1)).abs().repeat_interleave(64)[: w.numel()]
    assert torch.all(err <= true_absmax * half_gap + scale_err + 1e-7)
    # and it is really lossy, not an identity
    assert err.mean() > 1e-4


def test_state_from_a_bitsandbytes_linear4bit():
    bnb = pytest.importorskip("bitsandbytes")
    layer = torch.nn.Linear(192, 96)
    q = bnb.nn.Linear4bit(192, 96, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
    q.load_state_dict(layer.state_dict())
    q = q.to("cpu")  # quantizes
    weight = q.weight
    state = NF4State.from_bnb(weight.quant_state)
    assert state.double_quant and state.shape == (96, 192)
    assert torch.equal(dequantize_nf4(weight.data, state), bnb_f.dequantize_4bit(weight.data, weight.quant_state))
    packed, mine = quantize_nf4(layer.weight.data, blocksize=64, double_quant=True)
    assert torch.equal(packed, weight.data.view(-1, 1))


def test_state_roundtrips_through_bnb_quant_state():
    w = torch.randn(10, 64)
    for dq in (False, True):
        packed, state = quantize_nf4(w, double_quant=dq)
        back = NF4State.from_bnb(state.to_bnb())
        assert torch.equal(dequantize_nf4(packed, back), dequantize_nf4(packed, state))


def test_clear_errors():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(10), blocksize=48)
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        quantize_nf4(torch.arange(10))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.randn(0))
    packed, state = quantize_nf4(torch.randn(10))
    with pytest.raises(ValueError, match="needs 5"):
        dequantize_nf4(packed[:3], state)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_nf4(packed.float(), state)
    assert ABSMAX_BLOCKSIZE == 256


def codes_of(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit codes in packed bytes, high nibble first, as int64 on the CPU."""
    packed = packed.reshape(-1).cpu()
    return torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n].long()


def explain_bitsandbytes_cuda_codes(w, ours_packed, bnb_packed, bnb_absmax, blocksize) -> tuple[int, int]:
    """Check, code by code, that ours (= bitsandbytes' CPU quantizer) and bitsandbytes' CUDA quantizer differ only
    where its kernel (csrc/kernels.cu: kQuantizeBlockwise, dQuantizeNF4) is known to decide differently:

    1. an all-zero block: the kernel scales by 1 / absmax = 1 / 0 = inf; 0 * inf is NaN, NaN fails every `x > m`
       test of dQuantizeNF4's comparison tree, which then returns code 0 (-1.0), where we give code 7 (0.0).
       Both decode to code * absmax = 0.
    2. a value on the edge between two codes: the library is compiled with --use_fast_math, so 1.0f / absmax is an
       approximate reciprocal (within 2 ulp), and x * (1 / absmax) can fall on the other side of a midpoint when
       x / absmax is within a few ulp of it. Then the two codes are neighbours and the exact x / absmax lies within
       4 fp32 ulp of their midpoint (the literals in dQuantizeNF4 equal our fp32 midpoints: test_codes_match...).
    Every other code must be equal. Returns the number of differing codes of each kind.
    """
    n = w.numel()
    ours, theirs = codes_of(ours_packed, n), codes_of(bnb_packed, n)
    block = torch.arange(n) // blocksize
    absmax = bnb_absmax.cpu()[block]
    differ = ours != theirs
    zero = differ & (absmax == 0)
    assert (theirs[zero] == 0).all() and (ours[zero] == 7).all(), "an all-zero block got codes other than 0 / 7"
    edge = differ & (absmax != 0)
    assert ((ours[edge] - theirs[edge]).abs() == 1).all(), \
        f"codes more than one step apart: ours {ours[edge].tolist()[:8]}, bitsandbytes {theirs[edge].tolist()[:8]}"
    code = nf4_code()
    midpoint = ((code[:-1] + code[1:]) / 2)[torch.minimum(ours[edge], theirs[edge])]  # (n_edge,) fp32
    ulp = (torch.nextafter(midpoint.abs(), torch.tensor(float("inf"))) - midpoint.abs()).double()
    exact = w.reshape(-1).cpu().double()[edge] / absmax[edge].double()  # x / absmax, exactly
    ulps = (exact - midpoint.double()).abs() / ulp
    assert (ulps <= 4).all(), f"{int((ulps > 4).sum())} codes differ for values {ulps.max():.1f} ulp from a midpoint"
    return int(zero.sum()), int(edge.sum())


def explain_bitsandbytes_cuda_absmax(absmax, ours: NF4State, theirs: NF4State):
    """Double quantization of the fp32 `absmax` (n_blocks,) on CUDA: bitsandbytes' kernel picks the nearest 8-bit
    code, our (CPU-equal) path a lookup that is nearest or its neighbour. Same offset and per-256 scales; every
    8-bit value theirs is at least as near as ours, and the two are the same or adjacent codes."""
    torch.testing.assert_close(ours.absmax_offset.cpu(), theirs.absmax_offset.cpu(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.absmax_scale.cpu(), theirs.absmax_scale.cpu(), rtol=1e-6, atol=0)
    code = theirs.absmax_code.cpu().float()
    assert torch.equal(ours.absmax_code.cpu().float(), code)
    block = torch.arange(absmax.numel()) // theirs.absmax_blocksize
    exact = (absmax.cpu().double() - theirs.absmax_offset.cpu().double()) / theirs.absmax_scale.cpu().double()[block]
    mine, bnb = code[ours.absmax_q.cpu().long()].double(), code[theirs.absmax_q.cpu().long()].double()
    assert ((bnb - exact).abs() <= (mine - exact).abs() + 1e-6).all(), "bitsandbytes' 8-bit code is not the nearest"
    rank = torch.argsort(torch.argsort(code))  # position of each code in sorted order
    apart = (rank[ours.absmax_q.cpu().long()] - rank[theirs.absmax_q.cpu().long()]).abs()
    assert (apart <= 1).all(), f"{int((apart > 1).sum())} 8-bit absmax codes more than one step apart"
    return int((apart == 1).sum())


def test_cuda_absmax_explanation_can_fail():
    """The double-quantization check above accepts our own state and rejects a code two steps off."""
    gen = torch.Generator().manual_seed(3)
    w = random_weight((64, 256), torch.float32, gen)
    _, state = quantize_nf4(w, blocksize=64, double_quant=True)
    absmax = quantize_nf4(w, blocksize=64, double_quant=False)[1].absmax
    assert explain_bitsandbytes_cuda_absmax(absmax, state, state) == 0
    code = state.absmax_code.float()
    order = torch.argsort(code)
    rank = torch.argsort(order)
    bad_q = state.absmax_q.clone()
    bad_q[5] = order[(rank[bad_q[5].long()] + 2).clamp(max=255)].to(bad_q.dtype)
    from dataclasses import replace
    with pytest.raises(AssertionError):
        explain_bitsandbytes_cuda_absmax(absmax, replace(state, absmax_q=bad_q), state)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_bitsandbytes_on_cuda(dtype):
    """On CUDA bitsandbytes quantizes with its own kernel, which differs from its CPU twin (that we match byte for
    byte) in exactly two explained ways, checked code by code (explain_bitsandbytes_cuda_codes); the 8-bit absmax
    of double quantization is true nearest there rather than the CPU lookup table (close, not equal)."""
    gen = torch.Generator().manual_seed(1)
    for shape in [(4096, 1536), (33, 65), (2053,)]:
        w = random_weight(shape, dtype, gen).cuda()
        packed, state = quantize_nf4(w, blocksize=64, double_quant=False)
        ref_packed, ref_state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        assert torch.equal(state.absmax, ref_state.absmax)
        ref_absmax = ref_state.absmax
        zero, edge = explain_bitsandbytes_cuda_codes(w, packed, ref_packed, ref_state.absmax, 64)
        print(f"{shape} {dtype}: {zero} codes differ in all-zero blocks, {edge} on a midpoint, of {w.numel()}")
        out = dequantize_nf4(ref_packed, NF4State.from_bnb(ref_state))
        assert torch.equal(out, bnb_f.dequantize_4bit(ref_packed, ref_state).reshape(shape))
        packed, state = quantize_nf4(w, blocksize=64, double_quant=True)
        ref_packed, ref_state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        explain_bitsandbytes_cuda_absmax(ref_absmax, state, NF4State.from_bnb(ref_state))
        out = dequantize_nf4(ref_packed, NF4State.from_bnb(ref_state))
        assert torch.equal(out, bnb_f.dequantize_4bit(ref_packed, ref_state).reshape(shape))
