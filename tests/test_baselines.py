"""Tests of baselines.py: each baseline does what its paper's method says, on tiny shapes (seconds)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import baselines
import lcd
import packed_model
from model import GPT, SIZES


def correlated_hessian(K, seed=0, tokens=2000):
    """H = X^T X / n of inputs whose channels are correlated, with a few large channels (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, K, generator=g) @ (0.3 * torch.randn(K, K, generator=g) + torch.eye(K))
    X[:, :3] *= 5.0
    return X.T @ X / tokens


def rtn(W, bits, group_size):
    """lcd.py's RTN: the min/max grid of every row/group and rounding to the nearest level."""
    c = lcd.cluster(W, torch.ones(W.shape[1]), 2 ** bits, group_size=group_size, init="uniform", max_iters=0)
    return c["codebook"], c["idx"]


def heavy_tailed(N, K, seed=0):
    """Student-t (3 degrees of freedom) weights: heavy tails like real LLM weights."""
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(3, N, K, generator=g).pow(2).sum(0) / 3
    return torch.randn(N, K, generator=g) / chi2.sqrt()


# ---- GPTQ -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [None, 32, 40])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_is_rtn(group_size, act_order):
    # with H = I nothing is compensated (H^-1 is diagonal): GPTQ must round exactly as RTN does
    W = torch.randn(24, 96, generator=torch.Generator().manual_seed(1))
    codebook, idx = baselines.gptq_quantize(W, torch.eye(96), 3, group_size, act_order=act_order)
    rtn_codebook, rtn_idx = rtn(W, 3, group_size)
    assert torch.equal(idx, rtn_idx)
    assert torch.allclose(codebook, rtn_codebook)


@pytest.mark.parametrize("group_size", [None, 40])
def test_gptq_lazy_batches_change_nothing(group_size):
    # deferring the update of later columns to once per block is exact, also with act-order + groups
    W = torch.randn(16, 96, generator=torch.Generator().manual_seed(2))
    H = correlated_hessian(96)
    one_block = baselines.gptq_quantize(W, H, 2, group_size, block_size=96)
    small_blocks = baselines.gptq_quantize(W, H, 2, group_size, block_size=7)
    assert torch.equal(one_block[1], small_blocks[1])
    assert torch.allclose(one_block[0], small_blocks[0], atol=1e-6)


@pytest.mark.parametrize("bits,group_size", [(2, None), (3, None), (3, 32)])
def test_gptq_reduces_output_error_versus_rtn(bits, group_size):
    W = torch.randn(32, 96, generator=torch.Generator().manual_seed(3))
    H = correlated_hessian(96)
    codebook, idx = baselines.gptq_quantize(W, H, bits, group_size)
    gptq_error = baselines.output_error(W, packed_model.dequantize(codebook.half(), idx, group_size), H)
    rtn_codebook, rtn_idx = rtn(W, bits, group_size)
    rtn_error = baselines.output_error(W, packed_model.dequantize(rtn_codebook.half(), rtn_idx, group_size), H)
    assert gptq_error < 0.8 * rtn_error


# ---- LCQ ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [None, 32])
def test_lcq_rank_one_without_steps_is_the_uniform_grid(group_size):
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    grid, rtn_idx = rtn(W, 3, group_size)
    C, idx, params = baselines.lcq_fit(W, torch.ones(64), 3, group_size, rank=1, steps=0, fp16=False)
    assert params["S"].shape[-1] == 1 and params["V"].shape == (1, 8)
    assert torch.allclose(C, grid, atol=1e-6)
    assert torch.equal(idx, rtn_idx)
    # stored in fp16, S and B move each level by at most a few fp16 roundings of the largest level
    C16, idx16, _ = baselines.lcq_fit(W, torch.ones(64), 3, group_size, rank=1, steps=0)
    assert torch.allclose(C16, grid, atol=4 * 2 ** -11 * 8 * grid.abs().max().item())
    spacing = C16[..., 1:] - C16[..., :-1]
    assert torch.allclose(spacing, spacing[..., :1].expand_as(spacing), atol=1e-6)   # still uniform
    assert torch.equal(idx16, baselines.nearest(W, C16, group_size))


def test_lcq_learning_lowers_the_weighted_error():
    W = heavy_tailed(32, 64)
    h = correlated_hessian(64).diag()
    def error(rank, steps):
        C, idx, _ = baselines.lcq_fit(W, h, 2, None, rank=rank, steps=steps)
        return (h * (W - packed_model.dequantize(C, idx, None)) ** 2).sum()
    rtn_error = error(1, 0)
    assert error(1, 100) < rtn_error and error(2, 100) < rtn_error


# ---- CLAQ -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [2.0, 2.1, 3.0, 3.1, 4.0])
def test_claq_bit_allocation_averages_to_target(target):
    K = 200
    W = heavy_tailed(64, K)
    col_bits, _ = baselines.claq_column_bits(W, target)
    assert set(col_bits.tolist()) <= ({2, 4} if target < 3 else {3, 4})
    assert abs(col_bits.float().mean().item() - target) <= 1.0 / K


def test_claq_gives_the_extra_bits_to_outlier_columns():
    W = torch.randn(64, 100, generator=torch.Generator().manual_seed(5))
    heavy = torch.tensor([3, 17, 42, 77, 90])
    W[:8, heavy] = 40.0                                       # far above 13 * mean|W|
    col_bits, counts = baselines.claq_column_bits(W, 2.1)     # 5 % of 100 columns get 4 bits
    assert torch.equal((col_bits == 4).nonzero()[:, 0], heavy)
    assert (counts[heavy] == 8).all()


def test_claq_layer_stores_what_it_counts():
    N, K = 48, 80
    W = heavy_tailed(N, K)
    H = correlated_hessian(K)
    bias = torch.randn(N)
    layer = baselines.claq(W, {"h": H.diag(), "H": H, "n": 2000}, 2, target_bits=2.1, bias=bias)
    col_bits = layer.col_bits.long()
    assert abs(col_bits.float().mean().item() - 2.1) <= 1.0 / K
    # reserved outliers: 1.4 % of the 10 % heaviest columns, 0.4 % of the others (rounded per column)
    n_outliers = layer.outlier_pos.numel()
    assert n_outliers == 8 * round(0.014 * N) + 72 * round(0.004 * N)
    expected = 0
    for b, per_word in [(2, 16), (3, 10), (4, 8)]:
        K_b = int((col_bits == b).sum())
        expected += 32 * N * -(-K_b // per_word) + 16 * K_b * 2 ** b   # packed indices + column codebooks
    expected += 8 * K + 48 * n_outliers     # widths; outliers: int32 position + fp16 value; no bias
    assert layer.storage_bits() == expected
    # the quantized weight takes at most 2^b_k values per column outside the reserved outliers
    W_hat = layer.weight_dequantized()
    mask = torch.ones(N * K, dtype=torch.bool)
    mask[layer.outlier_pos.long()] = False
    mask = mask.view(N, K)
    for k in range(K):
        assert W_hat[mask[:, k], k].unique().numel() <= 2 ** col_bits[k]
    # outlier reservation lowers the output error
    without = baselines.claq(W, {"h": H.diag(), "H": H, "n": 2000}, 2, target_bits=2.1, outliers=False)
    assert baselines.output_error(W, W_hat, H) < baselines.output_error(W, without.weight_dequantized(), H)


# ---- LBLLM ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [None, 32])
def test_lbllm_weights_take_only_their_four_values(group_size):
    N, K = 16, 64
    W = heavy_tailed(N, K)
    H = correlated_hessian(K)
    layer = baselines.lbllm(W, {"h": H.diag(), "H": H, "n": 2000}, 2, group_size, steps=30, act_steps=10)
    W_hat = layer.weight_dequantized()
    gs = group_size or K
    codebook = layer.codebook.float()                                   # (N, G, 4) = (-a2, -a1, a1, a2)
    a1, a2 = codebook[..., 2], codebook[..., 3]
    assert torch.equal(codebook[..., 0], -a2) and torch.equal(codebook[..., 1], -a1)
    assert (a1 >= 0).all() and (a2 >= a1).all()
    for n in range(N):
        for g in range(K // gs):
            values = W_hat[n, g * gs:(g + 1) * gs].unique()
            allowed = torch.stack([-a2[n, g], -a1[n, g], a1[n, g], a2[n, g]])
            assert values.numel() <= 4 and torch.isin(values, allowed).all()
    G = K // gs
    assert layer.storage_bits() == 2 * N * K + 2 * 16 * N * G + 16    # bits + two scales/group + clip
    assert 0.05 <= layer.act_clip.item() <= 1.0


def test_lbllm_distillation_lowers_output_error():
    W = heavy_tailed(32, 64)
    H = correlated_hessian(64)
    init = baselines.lbllm_fit(W, H, 32, steps=0)
    trained = baselines.lbllm_fit(W, H, 32, steps=100)
    errors = [baselines.output_error(W, packed_model.dequantize(baselines.lbllm_codebook(s), i, 32), H)
              for s, i in (init, trained)]
    assert errors[1] < errors[0]


def test_lbllm_learned_clip_beats_no_clip_on_heavy_tailed_inputs():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(256, 64, generator=g)
    X[:, 5] *= 20.0                                       # one huge channel swamps a token's 4-bit range
    W_hat = torch.randn(16, 64, generator=g)
    clip = baselines.lbllm_clip(W_hat, X, a_bits=4, steps=100)
    def error(c):
        return (baselines.fake_quantize_clipped(X, 4, torch.tensor(c)) @ W_hat.T - X @ W_hat.T).pow(2).mean()
    assert clip < 1.0 and error(clip) < error(1.0)


def test_lbllm_is_two_bits_only():
    with pytest.raises(ValueError, match="2 bits"):
        baselines.lbllm(torch.randn(8, 16), {"h": torch.ones(16), "H": torch.eye(16), "n": 1}, 3)


# ---- every method: its inference layer and lcd.quantize -------------------------------------------

FAST = {"lcq": dict(steps=20), "lbllm": dict(steps=20, act_steps=10)}


@pytest.mark.parametrize("name", sorted(baselines.METHODS))
def test_layer_forward_is_linear_with_its_dequantized_weight(name):
    N, K = 24, 64
    W = heavy_tailed(N, K)
    H = correlated_hessian(K)
    bias = torch.randn(N)
    bits = 2 if name == "lbllm" else 3
    layer = baselines.METHODS[name](W, {"h": H.diag(), "H": H, "n": 2000}, bits, None, bias=bias,
                                    **FAST.get(name, {}))
    x = torch.randn(5, 7, K)
    x_in = baselines.fake_quantize_clipped(x, layer.act_bits, layer.act_clip.float()) \
        if name == "lbllm" else x
    expected = F.linear(x_in, layer.weight_dequantized(), bias)
    assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-4)
    assert (W - layer.weight_dequantized()).abs().mean() < W.abs().mean()   # it is an approximation of W
    assert bits * N * K < layer.storage_bits() < 16 * N * K


@pytest.mark.parametrize("name", sorted(baselines.METHODS))
def test_lcd_quantize_dispatches_to_every_baseline(name):
    torch.manual_seed(0)
    model = GPT(SIZES["tiny"] | {"vocab_size": 64})
    calib = [torch.randint(0, 64, (2, 32))]
    x = torch.randint(0, 64, (1, 16))
    bits = 2 if name == "lbllm" else 3
    biases = {n: m.bias.detach().clone() for n, m in packed_model.find_linears(model).items()}
    quantized = lcd.quantize(model, bits, calib=calib, method=baselines.METHODS[name], **FAST.get(name, {}))
    layers = {n: m for n, m in quantized.named_modules() if hasattr(m, "storage_bits")}
    assert sorted(layers) == sorted(biases)                  # 4 linears in each of the 2 blocks
    for n, layer in layers.items():
        assert layer.bias is not None and torch.equal(layer.bias.detach(), biases[n])
    logits = lcd.model_logits(quantized(x))
    assert torch.isfinite(logits).all()
    report = packed_model.footprint(quantized)
    assert bits < report["bits_per_weight"] < 16


def test_lcq_counts_its_parameters_not_the_materialized_codebook():
    N, K, bits, rank, group_size = 16, 64, 2, 2, 32
    W = heavy_tailed(N, K)
    layer = baselines.lcq(W, {"h": torch.ones(K), "H": None, "n": 0}, bits, group_size, rank=rank, steps=5)
    G = K // group_size
    # 2-bit indices (16 a word) + fp16 S (N, G, r), V (r, 2^b), B (N, G)
    assert layer.storage_bits() == 2 * N * K + 16 * (N * G * rank + rank * 2 ** bits + N * G)
    C = torch.einsum("ngr,rl->ngl", layer.lcq_S.float(), layer.lcq_V.float()) - layer.lcq_B.float()[..., None]
    assert torch.allclose(layer.codebook.float(), C.half().float())      # the codebook comes from S, V, B


def test_methods_by_name_go_through_baselines_quantize():
    torch.manual_seed(0)
    model = GPT(SIZES["tiny"] | {"vocab_size": 64})
    calib = [torch.randint(0, 64, (2, 32))]
    with pytest.raises(ValueError, match=r"baselines.METHODS\['gptq'\]"):   # lcd.py resolves its own names only
        lcd.quantize(copy.deepcopy(model), 2, calib=calib, method="gptq")
    with pytest.raises(ValueError, match="unknown method"):
        baselines.quantize(copy.deepcopy(model), 2, calib=calib, method="no-such-method")
    by_name = baselines.quantize(copy.deepcopy(model), 2, calib=calib, method="gptq")
    by_function = lcd.quantize(copy.deepcopy(model), 2, calib=calib, method=baselines.gptq)
    x = torch.randint(0, 64, (1, 16))
    assert torch.equal(lcd.model_logits(by_name(x)), lcd.model_logits(by_function(x)))
    rtn = baselines.quantize(copy.deepcopy(model), 2, method="rtn")              # lcd.py's own names pass through
    same = lcd.quantize(copy.deepcopy(model), 2, method="rtn")
    assert torch.equal(lcd.model_logits(rtn(x)), lcd.model_logits(same(x)))
