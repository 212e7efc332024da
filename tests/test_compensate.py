"""LCD's compensated start (baselines.gptq_cluster, the "lcd-gptq" row): LCD's per-row / per-group codebooks assigned
with GPTQ's error feedback, then refit under the Hessian. Every claim is checked on random layers with a
random, correlated positive-definite Hessian, where compensation has something to gain."""
import math

import pytest
import torch

import baselines
import lcd
import packed_model


def problem(N=48, K=96, seed=0):
    """W (N, K) heavy-tailed like trained weights; H = X^T X / n of correlated inputs, a few channels 10x."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(K) + 0.3 * torch.randn(K, K, generator=g)
    X = torch.randn(4 * K, K, generator=g) @ mix                          # (n, K) correlated inputs
    X[:, :3] *= 10                                                        # outlier channels
    H = X.T @ X / X.shape[0]                                              # (K, K) positive definite
    W = 0.02 * torch.distributions.StudentT(4.0).sample((N, K))
    return W, H


def output_error(W, codebook, idx, group_size, H):
    return float(baselines.output_sse(W, packed_model.dequantize(codebook, idx, group_size), H).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 32, 40])   # 40: a last group shorter than the others
def test_compensated_beats_uncompensated_and_gptq_with_the_same_codebooks(bits, group_size):
    torch.manual_seed(bits)
    W, H = problem(seed=bits)
    N, K = W.shape
    gs = group_size or K
    plain = lcd.cluster(W, torch.diag(H), 2 ** bits, group_size)           # lcd-init: no compensation
    plain_cb = plain["codebook"].half().float()                           # as stored
    e_plain = output_error(W, plain_cb, plain["idx"], gs, H)
    # GPTQ's loop with the same (fixed) codebooks, no refit
    cb, idx, compensated = baselines.gptq_assign(W, H, plain_cb, group_size)
    e_fixed = output_error(W, cb, idx, gs, H)
    out = baselines.gptq_cluster(W, H, 2 ** bits, group_size)
    e_comp = output_error(W, out["codebook"], out["idx"], gs, H)
    assert out["codebook"].shape == (N, math.ceil(K / gs), 2 ** bits) and out["idx"].shape == (N, K)
    assert out["idx"].min() >= 0 and out["idx"].max() < 2 ** bits
    assert torch.equal(out["codebook"], out["codebook"].half().float())   # fp16-exact: what is stored
    assert e_fixed < e_plain                       # error feedback alone helps
    assert e_comp <= e_fixed * (1 + 1e-9)          # ... and the refit (and its rounds) on top never hurt
    assert e_comp < 0.9 * e_plain                  # a real gain, not round-off
    assert out["errors"][-1] == pytest.approx(e_comp) and e_comp <= min(out["errors"][:-1]) * (1 + 1e-9)
    # the student's latent weights: each one's nearest centroid is its assignment (LCDLinear re-assigns)
    assert torch.equal(lcd._nearest(out["latent"], out["codebook"], gs), out["idx"])
    # the compensated values of gptq_assign have its assignment as nearest centroid too
    assert torch.equal(lcd._nearest(compensated, cb, gs), idx)


@pytest.mark.parametrize("group_size", [None, 24])
def test_refit_helps_or_keeps_row_by_row(group_size):
    W, H = problem(N=32, K=72, seed=3)
    gs = group_size or W.shape[1]
    c = lcd.cluster(W, torch.diag(H), 4, group_size)
    before = baselines.output_sse(W, packed_model.dequantize(c["codebook"].half().float(), c["idx"], gs), H)      # (N,)
    refit = baselines.refit_codebook(W, H, c["codebook"].half().float(), c["idx"], group_size)
    after = baselines.output_sse(W, packed_model.dequantize(refit, c["idx"], gs), H)
    assert (after <= before * (1 + 1e-9)).all()
    assert after.sum() < 0.95 * before.sum()       # correlated inputs: the least-squares centroids differ
    # an already optimal codebook stays put: refitting twice changes (almost) nothing
    again = baselines.output_sse(W, packed_model.dequantize(baselines.refit_codebook(W, H, refit, c["idx"], group_size), c["idx"], gs), H)
    assert float(again.sum()) == pytest.approx(float(after.sum()), rel=1e-3)


def test_refit_is_the_least_squares_solution_on_a_small_row():
    """One row, two centroids, a diagonal H: the refit centroid is the h-weighted mean of its members."""
    W = torch.tensor([[1.0, 2.0, 10.0, 12.0]])
    H = torch.diag(torch.tensor([1.0, 3.0, 1.0, 1.0]))
    idx = torch.tensor([[0, 0, 1, 1]])
    cb = baselines.refit_codebook(W, H, torch.tensor([[[0.0, 0.0]]]), idx)
    torch.testing.assert_close(cb[0, 0], torch.tensor([1.75, 11.0]))
    # a centroid no weight uses keeps its value
    cb = baselines.refit_codebook(W, H, torch.tensor([[[0.0, 5.0, 7.0, 9.0]]]), torch.tensor([[0, 0, 3, 3]]))
    assert cb[0, 0, 1] == 5.0 and cb[0, 0, 2] == 7.0


def test_more_rounds_never_end_worse_and_diagonal_hessian_needs_no_compensation():
    W, H = problem(seed=5)
    one = baselines.gptq_cluster(W, H, 4, rounds=1)
    three = baselines.gptq_cluster(W, H, 4, rounds=3)
    assert len(three["errors"]) == 5 and three["errors"][-1] <= one["errors"][-1] * (1 + 1e-9)
    # uncorrelated inputs: the compensated result is no worse than the plain clustering (within round-off)
    h = torch.rand(W.shape[1]) + 0.1
    out = baselines.gptq_cluster(W, torch.diag(h), 4)
    plain = lcd.cluster(W, h, 4)
    e_plain = output_error(W, plain["codebook"].half().float(), plain["idx"], W.shape[1], torch.diag(h))
    assert out["errors"][-1] <= e_plain * 1.02


def test_lcd_gptq_row_and_student_start():
    W, H = problem(N=16, K=64, seed=7)
    stats = {"h": torch.diag(H), "H": H, "n": 256}
    layer = baselines.METHODS["lcd-gptq"](W, stats, 2)
    plain = lcd.quantize_linear(torch.nn.Linear(64, 16, bias=False).requires_grad_(False).float(), 2)
    assert layer.storage_bits() == plain.storage_bits()        # the same bits per weight as lcd-init
    assert "lcd-gptq" in [r[0] for r in baselines.quality_rows(2)] and "lcd-gptq" in baselines.NEEDS_HESSIAN


def test_prepare_student_compensated_start_is_nearer_the_teacher():
    from model import GPT, SIZES
    torch.manual_seed(0)
    teacher = GPT(SIZES["tiny"] | {"vocab_size": 64}).eval()
    calib = [torch.randint(0, 64, (8, 32)) for _ in range(2)]
    x = torch.randint(0, 64, (4, 32))
    gaps = {}
    for compensate in (False, True):
        student = lcd.prepare_student(teacher, 2, calib=calib, start=baselines.gptq_cluster if compensate else None)
        with torch.no_grad():
            # the latent weights keep the compensated assignment: a re-assignment changes nothing
            assert sum(m.reassign_() for m in lcd.lcd_layers(student).values()) == 0
            gaps[compensate] = lcd.kd_loss(lcd.freeze(student)(x)[0], teacher(x)[0]).item()
    assert gaps[True] < gaps[False]


def test_bad_input_is_a_clear_error():
    W, H = problem(N=8, K=16)
    with pytest.raises(ValueError, match=r"Hessian must be a \(16, 16\)"):
        baselines.gptq_cluster(W, H[:8, :8], 4)
    with pytest.raises(ValueError, match="NaN or inf"):
        baselines.gptq_cluster(W, H * float("nan"), 4)
    with pytest.raises(ValueError, match="power of two"):
        baselines.gptq_cluster(W, H, 3)
    with pytest.raises(ValueError, match="rounds"):
        baselines.gptq_cluster(W, H, 4, rounds=0)
    with pytest.raises(ValueError, match="group_size"):
        baselines.gptq_cluster(W, H, 4, group_size=17)
    with pytest.raises(ValueError, match="do not fit"):
        baselines.refit_codebook(W, H, torch.zeros(8, 2, 4), torch.zeros(8, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="negative diagonal"):
        baselines.gptq_cluster(W, -torch.eye(16), 4)
    indefinite = 1.9 * torch.eye(16) - 0.9          # diagonal 1, eigenvalue 1 - 0.9 * 15 < 0
    with pytest.raises(ValueError, match="not positive definite"):
        baselines.gptq_cluster(W, indefinite, 4)
