"""Tests of lcd.py's core: clustering, the packed format, LUTLinear, quantize(), footprint, save / load."""
import copy
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lcd  # noqa: E402
import packed_model
from model import GPT, SIZES  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# clustering against the exact optimum

def optimal_weighted_kmeans_1d(x, w, k):
    """Exact 1-D weighted k-means by dynamic programming, O(k n^2), written independently of lcd.py:
    on the sorted values the clusters are contiguous runs; best[j] = least SSE of the first j values."""
    order = np.argsort(x)
    x, w = x[order].astype(np.float64), w[order].astype(np.float64)
    n = len(x)
    P, Q, S = (np.concatenate([[0.0], np.cumsum(t)]) for t in (w, w * x, w * x * x))
    i, j = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    mass = P[j] - P[i]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = S[j] - S[i] - np.where(mass > 0, (Q[j] - Q[i]) ** 2 / mass, 0.0)
    cost = np.where(j > i, cost, np.inf)     # cost[i, j]: values i..j-1 as one cluster
    best = cost[0]
    for _ in range(k - 1):
        best = np.min(best[:, None] + cost, axis=0)
    return best[n]


def sample_rows(dist, rows, n, rng):
    if dist == "gaussian":
        return rng.standard_normal((rows, n))
    if dist == "laplacian":
        return rng.laplace(size=(rows, n))
    return rng.standard_t(3, size=(rows, n))          # heavy tails


def row_sse(W, h, init, n_centroids, group_size=None):
    out = lcd.cluster(W, h, n_centroids, group_size, init=init)
    return lcd.weighted_sse(W, h, out["codebook"], out["idx"], group_size).numpy()   # (N, G)


@pytest.mark.parametrize("dist", ["gaussian", "laplacian", "student-t"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n", [128, 320])
def test_density_init_and_lloyd_near_optimum(dist, bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    C, rows = 2 ** bits, 16
    X = sample_rows(dist, rows, n, rng)
    h_np = np.exp(rng.standard_normal(n))             # random positive importance, a few large channels
    W, h = torch.tensor(X, dtype=torch.float32), torch.tensor(h_np, dtype=torch.float32)
    optimum = np.array([optimal_weighted_kmeans_1d(X[r], h_np, C) for r in range(rows)])
    density = row_sse(W, h, "density", C)[:, 0]
    assert density.sum() <= 1.01 * optimum.sum(), f"density+Lloyd {density.sum() / optimum.sum():.4f}x optimum"
    assert (density >= optimum * (1 - 1e-4)).all()    # nothing beats the exact optimum: the DP is right
    assert density.mean() < row_sse(W, h, "uniform", C)[:, 0].mean()
    assert density.mean() < row_sse(W, h, "kmeans++", C)[:, 0].mean()


def test_groups_each_near_optimum():
    rng = np.random.default_rng(0)
    X = rng.standard_t(3, size=(4, 200))              # K = 200 with group_size 64: the last group has 8
    h_np = rng.uniform(0.1, 2.0, 200)
    W, h = torch.tensor(X, dtype=torch.float32), torch.tensor(h_np, dtype=torch.float32)
    sse = row_sse(W, h, "density", 4, group_size=64)  # (4, 4)
    assert sse.shape == (4, 4)
    for r in range(4):
        for g in range(4):
            cols = slice(64 * g, min(64 * g + 64, 200))
            opt = optimal_weighted_kmeans_1d(X[r, cols], h_np[cols], 4)
            assert sse[r, g] <= 1.01 * opt + 1e-9


def test_cluster_output_and_lloyd_fixed_point():
    torch.manual_seed(0)
    W, h = torch.randn(5, 40), torch.rand(40) + 0.1
    out = lcd.cluster(W, h, 8, group_size=16)
    assert out["codebook"].shape == (5, 3, 8) and out["idx"].shape == (5, 40) and out["outliers"] is None
    assert out["idx"].dtype == torch.int64 and out["codebook"].dtype == torch.float32
    # converged: every weight sits at its nearest centroid, and another Lloyd pass changes nothing
    W_hat = packed_model.dequantize(out["codebook"], out["idx"], 16)
    groups = torch.arange(40) // 16
    dist = (W[:, :, None] - out["codebook"][:, groups, :]).abs()          # (5, 40, 8)
    assert torch.allclose((W - W_hat).abs(), dist.amin(-1))
    codebook, idx = lcd.lloyd(W, h, out["codebook"], out["idx"], 16)
    assert torch.equal(idx, out["idx"]) and torch.allclose(codebook, out["codebook"])
    # rtn rounds to the uniform min/max grid without any refinement; lo and the step are stored in fp16
    rtn = lcd.cluster(W, torch.ones(40), 4, init="uniform", max_iters=0)
    lo, step = W.amin(1).half().float(), ((W.amax(1) - W.amin(1)) / 3).half().float()
    grid = torch.stack([lo + step * t for t in range(4)], 1)
    assert torch.allclose(rtn["codebook"][:, 0], grid, atol=1e-6)


def test_lloyd_never_raises_the_error_from_a_poor_start():
    torch.manual_seed(1)
    W, h = torch.randn(6, 64), torch.rand(64)
    start = lcd.cluster(W, h, 4, init="uniform", max_iters=0)
    before = lcd.weighted_sse(W, h, start["codebook"], start["idx"], None).sum()
    codebook, idx = lcd.lloyd(W, h, start["codebook"], start["idx"], None)
    assert lcd.weighted_sse(W, h, codebook, idx, None).sum() < before


def test_outliers_are_the_most_important_weights_and_exact():
    torch.manual_seed(2)
    W = torch.randn(8, 50)
    W[3, 7] = 40.0                                    # a huge weight
    h = torch.ones(50)
    h[20] = 1000.0                                    # a huge input channel
    out = lcd.cluster(W, h, 4, outlier_frac=0.03)     # 12 of 400 weights
    rows, cols, vals = out["outliers"]
    positions = set(zip(rows.tolist(), cols.tolist()))
    top = (h * W * W).flatten().topk(12).indices      # the definition: largest h_k * w^2
    assert positions == {(i // 50, i % 50) for i in top.tolist()}
    assert (3, 7) in positions and (cols == 20).sum() >= 6
    assert torch.equal(vals, W[rows, cols])
    with_outliers = lcd.weighted_sse(W, h, out["codebook"], out["idx"], None, out["outliers"]).sum()
    plain = lcd.cluster(W, h, 4)
    assert with_outliers < lcd.weighted_sse(W, h, plain["codebook"], plain["idx"], None).sum()


def test_importance_weighting_lowers_the_layer_output_error():
    """With a few huge input channels (as in real LLMs), weighting by h = mean x^2 must pay off in the
    error of the layer's output, which is what matters: lcd beats unweighted k-means and RTN."""
    torch.manual_seed(3)
    K, N = 96, 64
    X = torch.randn(512, K)
    X[:, :4] *= 30.0                                  # outlier channels
    layer = nn.Linear(K, N, bias=False)
    layer.weight.data = torch.distributions.StudentT(3.0).sample((N, K)) * 0.02
    h = (X * X).mean(0)
    errors = {}
    for method in ("lcd", "kmeans", "rtn"):
        q = lcd.quantize_linear(layer, 2, h=h, method=method)
        errors[method] = ((q(X) - layer(X)) ** 2).mean().item()
    assert errors["lcd"] < errors["kmeans"] and errors["lcd"] < errors["rtn"], errors


# ---------------------------------------------------------------------------------------------------
# packed format

@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("K", [1, 7, 15, 17, 33, 100])
def test_pack_unpack_round_trip(bits, K):
    g = torch.Generator().manual_seed(K * 10 + bits)
    idx = torch.randint(0, 2 ** bits, (3, K), generator=g)
    packed = packed_model.pack_indices(idx, bits)
    E = packed_model.ENTRIES_PER_WORD[bits]
    assert packed.dtype == torch.int32 and packed.shape == (3, -(-K // E))
    assert torch.equal(packed_model.unpack_indices(packed, bits, K), idx)
    # the documented layout, read independently: entry e of word w at bits [e*b, e*b + b); padding is 0
    words = packed.long() & 0xFFFFFFFF
    for n in range(3):
        for k in range(-(-K // E) * E):
            entry = (words[n, k // E].item() >> (k % E) * bits) & (2 ** bits - 1)
            assert entry == (idx[n, k].item() if k < K else 0)
    if bits == 3:
        assert (words >> 30 == 0).all()               # the 2 spare bits stay zero


def test_pack_known_words():
    assert packed_model.pack_indices(torch.full((1, 16), 3), 2).item() == -1        # all 32 bits set
    assert packed_model.pack_indices(torch.tensor([[1, 2, 3]]), 2).item() == 1 + (2 << 2) + (3 << 4)
    assert packed_model.pack_indices(torch.full((1, 10), 7), 3).item() == 2 ** 30 - 1
    assert packed_model.pack_indices(torch.tensor([[0] * 7 + [15]]), 4).item() == -(2 ** 28)  # 0xF0000000


# ---------------------------------------------------------------------------------------------------
# LUTLinear

def make_lut(N=12, K=37, bits=3, group_size=16, bias=True, outlier_frac=0.0, in_scale=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    out = lcd.cluster(W, torch.rand(K, generator=g) + 0.5, 2 ** bits, group_size, outlier_frac=outlier_frac)
    return packed_model.LUTLinear.from_clustered(
        out["codebook"], out["idx"], bits, group_size, bias=torch.randn(N, generator=g) if bias else None,
        outliers=out["outliers"], in_scale=torch.rand(K, generator=g) + 0.5 if in_scale else None), W, out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("outlier_frac", [0.0, 0.05])
@pytest.mark.parametrize("in_scale", [False, True])
def test_lut_linear_equals_dense_layer(bias, outlier_frac, in_scale):
    layer, W, out = make_lut(bias=bias, outlier_frac=outlier_frac, in_scale=in_scale)
    W_hat = layer.weight_dequantized()
    expected = packed_model.dequantize(out["codebook"].half(), out["idx"], 16)           # fp16 codebook, as stored
    if out["outliers"] is not None:
        rows, cols, vals = out["outliers"]
        expected[rows, cols] = vals.half().float()
        assert torch.equal(W_hat[rows, cols], vals.half().float())
    assert torch.equal(W_hat, expected)
    x = torch.randn(2, 5, 37)
    x_in = x / layer.in_scale.float() if in_scale else x
    torch.testing.assert_close(layer(x), F.linear(x_in, W_hat, layer.bias), rtol=1e-5, atol=1e-5)


def test_lut_linear_activation_fake_quant():
    layer, _, _ = make_lut()
    layer.a_bits = 8
    x = torch.randn(4, 37)
    scale = x.abs().amax(-1, keepdim=True) / 127
    x_q = (x / scale).round() * scale
    torch.testing.assert_close(layer(x), F.linear(x_q, layer.weight_dequantized(), layer.bias))
    assert len(torch.unique((x_q / scale).round()[0])) <= 255


def test_storage_bits_counts_everything():
    layer, _, _ = make_lut(N=4, K=64, bits=2, group_size=None, bias=True)
    assert layer.storage_bits() == 4 * 64 * 2 + 4 * 4 * 16         # b + 16 * 2^b / K bits a weight, exact
    layer, _, _ = make_lut(N=4, K=60, bits=3, group_size=20, outlier_frac=0.05, in_scale=True)
    n_outliers = round(0.05 * 240)
    assert layer.storage_bits() == 4 * 6 * 32 + 4 * 3 * 8 * 16 + n_outliers * 80 + 60 * 16
    # RTN's grid is stored as an fp16 lo and step per row/group (32 bits; test_cluster_output_and_lloyd_fixed_point
    # checks that the grid is built from exactly those two fp16 numbers)
    rtn = lcd.quantize_linear(nn.Linear(60, 4), 3, group_size=20, method="rtn")
    assert isinstance(rtn, packed_model.GridLinear) and rtn.storage_bits() == 4 * 6 * 32 + 4 * 3 * 32


# ---------------------------------------------------------------------------------------------------
# quantize() on two different model structures

def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(dict(SIZES["tiny"], vocab_size=64)).eval()


def calib_batches(vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 24), generator=g) for _ in range(2)]


@pytest.mark.parametrize("method", ["lcd", "rtn", "kmeans"])
def test_quantize_gpt(method):
    model = tiny_gpt()
    names = list(packed_model.find_linears(model))
    assert len(names) == 4 * model.config.n_layer and "lm_head" not in names
    x = calib_batches()[0]
    with torch.no_grad():
        ref = lcd.model_logits(model(x))
    lcd.quantize(model, 3, calib=calib_batches(), method=method)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], packed_model.LUTLinear) for n in names)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        logits = lcd.model_logits(model(x))
    assert torch.isfinite(logits).all() and logits.shape == ref.shape
    assert (logits - ref).abs().mean() < ref.abs().mean()         # close to the original, not garbage
    fp = packed_model.footprint(model)
    assert set(fp["layers"]) == set(names)
    assert 3 < fp["bits_per_weight"] < 3.2 + 16 * 8 / 32 + 1e-9   # K = 32 or 128, one codebook a row


class Inner(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)                 # biases everywhere
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class OtherLM(nn.Module):
    """Not model.py's GPT: nested module lists, an untied output head, and a forward returning an
    object with .logits (like Hugging Face models)."""

    def __init__(self, vocab=50, d=24):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([nn.ModuleDict({"mix": nn.Linear(d, d), "ffn": Inner(d)}) for _ in range(2)])
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer["ffn"](x + torch.tanh(layer["mix"](x)))
        return SimpleNamespace(logits=self.lm_head(x))


def test_quantize_other_structure_and_outliers():
    torch.manual_seed(0)
    model = OtherLM().eval()
    x = torch.randint(0, 50, (3, 10))
    with torch.no_grad():
        ref = model(x).logits
    lcd.quantize(model, 2, group_size=8, calib=[x], outlier_frac=0.01)
    replaced = [n for n, m in model.named_modules() if isinstance(m, packed_model.LUTLinear)]
    assert sorted(replaced) == sorted(f"layers.{i}.{s}" for i in range(2) for s in ("mix", "ffn.up", "ffn.down"))
    assert type(model.lm_head) is nn.Linear and type(model.embed) is nn.Embedding
    assert model.layers[0]["ffn"].up.bias is not None and model.layers[0]["ffn"].up.outlier_vals is not None
    with torch.no_grad():
        logits = model(x).logits
    assert torch.isfinite(logits).all() and (logits - ref).abs().mean() < ref.abs().mean()


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D, written out: y = x W + b with W stored (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class HFStyleGPT2(nn.Module):
    """A GPT-2-like module tree with Conv1D projections, returning a tuple (logits, ...)."""

    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.c_fc, self.c_proj = Conv1D(4 * d, d), Conv1D(d, 4 * d)

    def forward(self, input_ids):
        x = self.wte(input_ids)
        x = x + self.c_proj(torch.tanh(self.c_fc(x)))
        return x @ self.wte.weight.T, None


def test_conv1d_layers_are_quantized_like_linears(tmp_path):
    torch.manual_seed(0)
    model = HFStyleGPT2().eval()
    x = torch.randint(0, 50, (2, 9))
    linear = packed_model.find_linears(model)["c_fc"]
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (128, 32)     # (N, K): the transpose
    torch.testing.assert_close(linear(torch.ones(3, 32)), model.c_fc(torch.ones(3, 32)))
    assert isinstance(model.c_fc, Conv1D)                                         # the model is untouched
    with torch.no_grad():
        ref = model(x)[0]
        quantized = lcd.quantize(copy.deepcopy(model), 4, calib=[x])
        assert isinstance(quantized.c_fc, packed_model.LUTLinear) and isinstance(quantized.c_proj, packed_model.LUTLinear)
        logits = quantized(x)[0]
    assert (logits - ref).abs().mean() < 0.1 * ref.abs().mean()
    path = str(tmp_path / "q.pt")
    packed_model.save_quantized(quantized, path)
    loaded = packed_model.load_quantized(HFStyleGPT2(), path)                              # a Conv1D skeleton
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], logits)


def test_distillation_works_on_other_model_structures():
    # prepare_student / distill / freeze on a model that is not model.py's GPT: Conv1D layers, a tuple
    # output; and on one returning an object with .logits
    for teacher in (HFStyleGPT2().eval(), OtherLM().eval()):
        batches = [torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(i)) for i in range(20)]
        student = lcd.prepare_student(teacher, 2, calib=batches[:2])
        with torch.no_grad():
            before = lcd.kd_loss(lcd.model_logits(student(batches[0])), lcd.model_logits(teacher(batches[0])))
        student, history = lcd.distill(teacher, student, iter(batches), 20, calib_x=batches[1])
        frozen = lcd.freeze(student)
        assert not lcd.lcd_layers(frozen) and any(isinstance(m, packed_model.LUTLinear) for m in frozen.modules())
        with torch.no_grad():
            after = lcd.kd_loss(lcd.model_logits(frozen(batches[0])), lcd.model_logits(teacher(batches[0])))
        assert len(history["loss"]) == 20 and after < before


def test_skip_and_model_logits():
    model = OtherLM()
    assert "layers.0.mix" not in packed_model.find_linears(model, skip="mix")
    assert set(packed_model.find_linears(model, skip=["ffn", "layers.1"])) == {"layers.0.mix"}
    t = torch.zeros(2)
    assert lcd.model_logits(t) is t and lcd.model_logits((t, None)) is t
    assert lcd.model_logits(SimpleNamespace(logits=t)) is t
    with pytest.raises(TypeError, match="logits"):
        lcd.model_logits({"x": t})


def test_collect_stats_matches_the_layer_inputs():
    torch.manual_seed(0)
    model = OtherLM().eval()
    x = torch.randint(0, 50, (2, 7))
    stats = lcd.collect_stats(model, [x, x[:1]], ["layers.0.mix"], full_hessian=True)["layers.0.mix"]
    inputs = torch.cat([model.embed(x).reshape(-1, 24), model.embed(x[:1]).reshape(-1, 24)])   # (21, 24)
    assert stats["n"] == 21 and stats["X"] is None
    torch.testing.assert_close(stats["h"], (inputs ** 2).mean(0))
    torch.testing.assert_close(stats["H"], inputs.T @ inputs / 21)
    assert model.training is False
    for keep in (5, 16, 100):                  # the first `keep` input rows, across batches; all if fewer
        X = lcd.collect_stats(model, [x, x[:1]], ["layers.0.mix"], keep_inputs=keep)["layers.0.mix"]["X"]
        torch.testing.assert_close(X, inputs[:keep])


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_gpt()
    lcd.quantize(model, 2, group_size=16, calib=calib_batches(), outlier_frac=0.01)
    model.transformer.h[0].mlp.c_fc.a_bits = 8
    path = str(tmp_path / "q.pt")
    packed_model.save_quantized(model, path)
    assert os.listdir(tmp_path) == ["q.pt"]                       # no temp file left behind
    loaded = packed_model.load_quantized(tiny_gpt(seed=1), path)           # a skeleton with other weights
    x = calib_batches(seed=5)[0]
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])
    assert loaded.transformer.h[0].mlp.c_fc.a_bits == 8
    assert packed_model.footprint(loaded) == packed_model.footprint(model)


def test_load_rejects_bad_files(tmp_path):
    bad = str(tmp_path / "bad.pt")
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="save_quantized"):
        packed_model.load_quantized(tiny_gpt(), bad)
    model = tiny_gpt()
    lcd.quantize(model, 2)
    good = str(tmp_path / "good.pt")
    packed_model.save_quantized(model, good)
    with pytest.raises(ValueError, match="same architecture"):
        packed_model.load_quantized(OtherLM(), good)
    torch.save({"header": {"format": "lcd-quantized", "version": packed_model.FORMAT_VERSION}, "state_dict": {}}, bad)
    with pytest.raises(ValueError, match="lists no layers"):
        packed_model.load_quantized(tiny_gpt(), bad)


# ---------------------------------------------------------------------------------------------------
# clear errors

def test_clear_errors():
    for bits in (5, 2.0, True):
        with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
            lcd.quantize(tiny_gpt(), bits)
    with pytest.raises(ValueError, match="group_size"):
        lcd.quantize(tiny_gpt(), 2, group_size=0)
    with pytest.raises(ValueError, match="group_size"):
        lcd.quantize(tiny_gpt(), 2, group_size=64)               # larger than K = 32
    with pytest.raises(ValueError, match="unknown method"):
        lcd.quantize(tiny_gpt(), 2, method="no-such-method")
    model = tiny_gpt()
    model.transformer.h[1].attn.c_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        lcd.quantize(model, 2)
    assert not any(isinstance(m, packed_model.LUTLinear) for m in model.modules())   # nothing changed
    for bad in ([torch.randint(0, 64, (24,))], [torch.rand(2, 24)], [[1, 2, 3]], []):
        with pytest.raises(ValueError, match="calibration"):
            lcd.quantize(tiny_gpt(), 2, calib=bad)
    with pytest.raises(ValueError, match="power of two"):
        lcd.cluster(torch.randn(2, 8), torch.ones(8), 6)
    with pytest.raises(ValueError, match="importance"):
        lcd.cluster(torch.randn(2, 8), torch.ones(7), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        packed_model.pack_indices(torch.tensor([[4]]), 2)


def test_collect_stats_keeps_no_layer_input_alive():
    """The statistics are sums: no layer's input may outlive its forward (a kept slice, even an empty one,
    holds all of it: SmolLM2's 210 layers over 8 calibration batches came to 10 GB)."""
    import gc
    import weakref
    torch.manual_seed(0)
    model = GPT(dict(SIZES["tiny"], vocab_size=32))
    name = "transformer.h.0.mlp.c_fc"
    inputs, alive = [], []       # the storage of the layer's input on each batch; how many earlier ones live

    def remember(module, args, out):
        inputs.append(weakref.ref(args[0].untyped_storage()))

    def count(module, args, out):   # later in the same forward: the earlier batches' inputs must be gone
        gc.collect()
        alive.append(sum(ref() is not None for ref in inputs[:-1]))

    hooks = [model.get_submodule(name).register_forward_hook(remember),
             model.transformer.h[1].register_forward_hook(count)]
    calib = [torch.randint(0, 32, (2, 16)) for _ in range(3)]
    for keep in (0, 5):
        inputs.clear(), alive.clear()
        stats = lcd.collect_stats(model, calib, [name], full_hessian=True, keep_inputs=keep)[name]
        assert alive == [0, 0, 0]
        assert (stats["X"] is None) if keep == 0 else stats["X"].shape == (5, model.config.n_embd)
    for hook in hooks:
        hook.remove()
