"""The fast paths (cost at real scale) against the plain computations they replace."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lcd  # noqa: E402
import packed_model


@pytest.mark.parametrize("group_size", [None, 8, 12])
def test_straight_through_weight_matches_the_autograd_expression(group_size):
    """LCDLinear's one-function straight-through weight: the value and both gradients of the plain expression
    dequantize(fp16 codebook + (p - p.detach()), idx) + (weight - weight.detach())."""
    g = torch.Generator().manual_seed(0)
    N, K, C = 6, 20, 4
    gs = packed_model.check_group_size(group_size, K)
    G = -(-K // gs)
    weight = torch.randn(N, K, generator=g, requires_grad=True)
    codebook = torch.randn(N, G, C, generator=g, requires_grad=True)
    idx = torch.randint(0, C, (N, K), generator=g)
    upstream = torch.randn(N, K, generator=g)

    fast = lcd._StraightThrough.apply(weight, codebook, idx, gs)
    fast_grads = torch.autograd.grad(fast, (weight, codebook), upstream)
    rounded = codebook.detach().half().float() + (codebook - codebook.detach())
    plain = packed_model.dequantize(rounded, idx, gs) + (weight - weight.detach())
    plain_grads = torch.autograd.grad(plain, (weight, codebook), upstream)
    assert torch.equal(fast, plain)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_lcd_linear_trains_both_parameters_and_equals_its_frozen_layer():
    torch.manual_seed(0)
    W = torch.randn(8, 16)
    cl = lcd.cluster(W, torch.ones(16), 4)
    layer = lcd.LCDLinear(W, cl["codebook"], cl["idx"], None, bias=torch.zeros(8))
    x = torch.randn(3, 16)
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.codebook.grad is not None and layer.codebook.grad.abs().sum() > 0
    with torch.no_grad():   # the same weight; LUTLinear's CPU path sums in another order (fp32 tolerance)
        assert torch.equal(layer.quantized_weight(), layer.freeze().weight_dequantized())
        torch.testing.assert_close(layer(x), layer.freeze()(x), rtol=1e-5, atol=1e-5)


def exact_sse_over_atoms(P, Q, S, C):
    """The least SSE of C runs of atoms from prefix sums (M+1,), by the plain O(C M^2) recursion in float64,
    written independently of lcd.py."""
    P, Q, S = (t.double() for t in (P, Q, S))
    M = len(P) - 1
    i, j = torch.arange(M + 1)[:, None], torch.arange(M + 1)[None, :]
    mass = P[j] - P[i]
    cost = S[j] - S[i] - torch.where(mass > 0, (Q[j] - Q[i]) ** 2 / mass.clamp_min(1e-300), 0.0)
    cost = torch.where(j > i, cost, torch.inf)
    best = cost[0]
    for _ in range(C - 1):
        best = (best[:, None] + cost).amin(0)
    return best[M].item()


@pytest.mark.parametrize("C", [2, 4, 8, 16])
def test_optimal_cuts_are_the_exact_optimum_over_atoms(C):
    """_optimal_cuts (the DP density_init uses) against a float64 reference, on heavy-tailed rows with empty
    atoms and random masses: the SSE of its cuts equals the optimum within float tolerance."""
    g = torch.Generator().manual_seed(C)
    R, n, M = 24, 200, 40
    z = torch.randn(5, R, n, generator=g)
    v = (z[0] / (z[1:] ** 2).mean(0).sqrt()).sort(1).values                # Student-t rows, sorted
    m = torch.exp(2 * torch.randn(R, n, generator=g))
    m[:, ::5] = 0
    v = v - (m * v).sum(1, keepdim=True) / m.sum(1)[:, None]
    atom = (torch.rand(R, n, generator=g).cumsum(1) / n * M * 0.999).long().clamp(max=M - 1)  # some empty

    def prefix(t):
        return F.pad(torch.zeros(R, M).scatter_add_(1, atom, t).cumsum(1), (1, 0))

    P, Q, S = prefix(m), prefix(m * v), prefix(m * v * v)
    cuts = lcd._optimal_cuts(P, Q, S, C)
    assert cuts.shape == (R, C + 1) and (cuts[:, 1:] > cuts[:, :-1]).all()   # C non-empty runs of atoms
    run = lambda t: t.double().gather(1, cuts[:, 1:]) - t.double().gather(1, cuts[:, :-1])  # noqa: E731
    sse = (run(S) - run(Q) ** 2 / run(P).clamp_min(1e-300)).sum(1)
    for r in range(R):
        optimum = exact_sse_over_atoms(P[r], Q[r], S[r], C)
        assert sse[r].item() == pytest.approx(optimum, rel=1e-4, abs=1e-6 * S[r, -1].item())


def test_cost_table_runs_every_part_on_a_small_heavy_tailed_model():
    """bench.py --cost's table on model.py's 'tiny' GPT: every method and part gives a row (no timing asserts:
    the seconds are whatever this machine takes)."""
    import bench
    model = bench.cost_stand_in("tiny").eval()
    W = next(iter(packed_model.find_linears(model).values())).weight
    kurtosis = ((W - W.mean()) ** 4).mean() / W.var() ** 2
    assert kurtosis > 4                                        # heavy-tailed, unlike the Gaussian init (3)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 256, (2, 16), generator=g) for _ in range(2)]
    batch = torch.randint(0, 256, (2, 16), generator=g)
    out = bench.cost_table(model, calib, batch, (2,), ("lcd", "prepare", "gptq", "kd"), log=lambda s: None)
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"lcd", "prepare_student", "gptq", "kd step"}
    assert all(r["seconds"] > 0 for r in rows.values())
    assert 2 < rows["lcd"]["bits_per_weight"] < 4 and rows["kd step"]["ratio"] > 0
