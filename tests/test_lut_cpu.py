"""The CPU reference of LUTLinear (packed_model.py section 2) against the formula it had before it was made fast,
written out plainly here: unpack every index with int64 shifts, gather its centroid, put the outliers
back, then x / in_scale, fake-quantize, F.linear. Both of its paths (partial sums for few rows, the
built weight otherwise) must give the same numbers, to fp32 rounding."""
import pytest
import torch
import torch.nn.functional as F

import packed_model


def old_weight(layer, outliers=True):
    """W_hat (N, K) float32 as LUTLinear.weight_dequantized computed it originally (outliers=False: from
    the codebooks alone)."""
    N, K, b = layer.out_features, layer.in_features, layer.bits
    E = packed_model.ENTRIES_PER_WORD[b]
    words = layer.packed.long() & 0xFFFFFFFF                                   # uint32 values
    entries = (words[:, :, None] >> (torch.arange(E) * b)) & (2 ** b - 1)      # (N, n_words, E)
    idx = entries.reshape(N, -1)[:, :K]
    G, C = layer.codebook.shape[1:]
    group_of = torch.arange(K) // layer.group_size
    W = layer.codebook.float().reshape(N, G * C).gather(1, group_of * C + idx)
    if outliers and layer.outlier_vals is not None:
        W[layer.outlier_rows.long(), layer.outlier_cols.long()] = layer.outlier_vals.float()
    return W


def old_forward(layer, x):
    if layer.in_scale is not None:
        x = x / layer.in_scale.to(x.dtype)
    if layer.a_bits:
        x = packed_model.fake_quantize_per_token(x, layer.a_bits)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, old_weight(layer).to(x.dtype), bias)


def random_layer(N, K, bits, group_size, n_outliers=0, in_scale=False, a_bits=None, bias=True, seed=0):
    """A LUTLinear with random packed words (every pattern valid), codebooks, outliers, scale and bias."""
    g = torch.Generator().manual_seed(seed)
    layer = packed_model.LUTLinear(K, N, bits, group_size, bias=bias, n_outliers=n_outliers, in_scale=in_scale,
                          a_bits=a_bits)
    idx = torch.randint(0, 2 ** bits, (N, K), generator=g)
    layer.packed.copy_(packed_model.pack_indices(idx, bits))
    layer.codebook.copy_(torch.randn(layer.codebook.shape, generator=g).half())
    if bias:
        layer.bias.data.copy_(torch.randn(N, generator=g))
    if n_outliers:
        flat = torch.randperm(N * K, generator=g)[:n_outliers]
        layer.outlier_rows.copy_(flat // K)
        layer.outlier_cols.copy_(flat % K)
        layer.outlier_vals.copy_((3 * torch.randn(n_outliers, generator=g)).half())
    if in_scale:
        layer.in_scale.copy_((0.5 + torch.rand(K, generator=g)).half())
    return layer.eval()


CASES = [  # (N, K, bits, group_size, n_outliers, in_scale, a_bits, bias)
    (24, 64, 2, None, 0, False, None, True),
    (24, 64, 2, 16, 7, True, None, False),
    (17, 75, 2, None, 5, False, 8, True),       # odd K: padding entries in the last word and byte
    (17, 75, 2, 20, 0, True, None, True),       # groups of a multiple of 4, a short last group
    (17, 75, 2, 6, 3, False, None, True),       # groups not made of whole bytes: the built weight only
    (20, 50, 3, None, 4, True, 4, True),
    (20, 50, 3, 10, 0, False, None, False),
    (9, 33, 3, 7, 2, False, None, True),
    (16, 40, 4, None, 6, False, None, True),
    (16, 41, 4, 8, 0, True, 8, True),
    (16, 41, 4, 5, 3, False, None, False),
]


@pytest.mark.parametrize("block_bytes", [packed_model.WEIGHT_BLOCK_BYTES, 300])   # 300: blocks of a row or a few
@pytest.mark.parametrize("N, K, bits, group_size, n_outliers, in_scale, a_bits, bias", CASES)
def test_reference_equals_the_old_formula(N, K, bits, group_size, n_outliers, in_scale, a_bits, bias, block_bytes,
                                          monkeypatch):
    monkeypatch.setattr(packed_model, "WEIGHT_BLOCK_BYTES", block_bytes)
    layer = random_layer(N, K, bits, group_size, n_outliers, in_scale, a_bits, bias)
    assert torch.equal(layer.weight_rows(), old_weight(layer, outliers=False))
    assert torch.equal(layer.weight_rows(3, 11), old_weight(layer, outliers=False)[3:11])
    assert torch.equal(layer.weight_dequantized(), old_weight(layer))          # the weight: bit-exact
    g = torch.Generator().manual_seed(1)
    for shape in ((1, K), (3, K), (2, 2, K), (packed_model.PARTIAL_SUM_ROWS + 1, K), (2, 9, K)):   # both paths
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            y, expected = layer(x), old_forward(layer, x)
        assert y.shape == expected.shape == (*shape[:-1], N)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_partial_sums_serve_few_rows_only_and_match_the_built_weight():
    layer = random_layer(64, 128, 2, 32, n_outliers=9)
    x = torch.randn(packed_model.PARTIAL_SUM_ROWS, 128)
    assert layer.partial_sums_apply(x) and not layer.partial_sums_apply(torch.randn(packed_model.PARTIAL_SUM_ROWS + 1, 128))
    assert not layer.partial_sums_apply(x.double()) and not random_layer(8, 64, 3, None).partial_sums_apply(x[:, :64])
    for rows in (1, 3, 8):                      # the tables serve any number of rows when called directly
        x = torch.randn(rows, 128)
        expected = x @ old_weight(layer, outliers=False).T                       # outliers are forward's
        torch.testing.assert_close(layer.partial_sums_forward(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.blocked_forward(x), expected, rtol=1e-5, atol=1e-5)


def test_half_activations_keep_the_old_arithmetic():
    layer = random_layer(12, 48, 2, None)
    x = torch.randn(1, 48).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), old_forward(layer, x))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_unpack_indices_matches_the_shift_formula_on_every_bit_pattern(bits):
    g = torch.Generator().manual_seed(bits)
    words = torch.randint(-2 ** 31, 2 ** 31, (5, 7), generator=g, dtype=torch.int64)
    if bits == 3:
        words &= 0x3FFFFFFF                     # 3-bit words keep their 2 spare bits 0
    packed = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    E = packed_model.ENTRIES_PER_WORD[bits]
    K = 7 * E - 3
    expected = ((words[:, :, None] & 0xFFFFFFFF) >> (torch.arange(E) * bits)) & (2 ** bits - 1)
    expected = expected.reshape(5, -1)[:, :K]
    for dtype in (torch.int64, torch.int32):
        got = packed_model.unpack_indices(packed, bits, K, dtype)
        assert got.dtype == dtype and torch.equal(got.long(), expected)


def test_gradients_reach_the_activations_as_before():
    layer = random_layer(10, 40, 2, None, n_outliers=2)
    for rows in (1, 6):                                    # the partial-sum and the blocked shapes
        x = torch.randn(rows, 40, requires_grad=True)
        x_old = x.detach().clone().requires_grad_(True)
        layer(x).square().sum().backward()
        old_forward(layer, x_old).square().sum().backward()
        torch.testing.assert_close(x.grad, x_old.grad, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            assert layer(x).is_contiguous()
