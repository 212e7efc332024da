"""The fast paths of issue 13 (cost at real scale) against the plain computations they replace."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lcd  # noqa: E402


@pytest.mark.parametrize("group_size", [None, 8, 12])
def test_straight_through_weight_matches_the_autograd_expression(group_size):
    """LCDLinear's one-function straight-through weight: the value and both gradients of the plain expression
    dequantize(fp16 codebook + (p - p.detach()), idx) + (weight - weight.detach())."""
    g = torch.Generator().manual_seed(0)
    N, K, C = 6, 20, 4
    gs = lcd.check_group_size(group_size, K)
    G = -(-K // gs)
    weight = torch.randn(N, K, generator=g, requires_grad=True)
    codebook = torch.randn(N, G, C, generator=g, requires_grad=True)
    idx = torch.randint(0, C, (N, K), generator=g)
    upstream = torch.randn(N, K, generator=g)

    fast = lcd._StraightThrough.apply(weight, codebook, idx, gs)
    fast_grads = torch.autograd.grad(fast, (weight, codebook), upstream)
    rounded = codebook.detach().half().float() + (codebook - codebook.detach())
    plain = lcd.dequantize(rounded, idx, gs) + (weight - weight.detach())
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
    with torch.no_grad():
        assert torch.equal(layer(x), layer.freeze()(x))
