"""Bad inputs from the field, round 1: each kind fails with a clear error before any work, or gives the
right answer. Every test is a small input a new user would try; messages are matched by their key words.

  1. calibration with no tokens; a Hessian that is all zero or singular
  2. weights past the fp16 range (65504)
  3. adaptive smoothing on a layer that outputs zero
  4. the distillation temperature (tau <= 0, and accuracy at large tau); every numeric hyperparameter
  6. truncated or empty files (quantized model, teacher, distillation checkpoint)
  7. token ids outside the vocabulary
  8. batches that run out, alone and under DDP
(kind 5, an untied head in model.py's loaders, has its own tests.)
"""
import copy
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
import lcd_kernels
import lcd
import packed_model
import train_kd
from conftest import ROOT
from model import GPT, SIZES


def tiny_gpt(seed=0, vocab=64):
    torch.manual_seed(seed)
    return GPT(dict(SIZES["tiny"], vocab_size=vocab)).eval()


def calib_batches(vocab=64, seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 24), generator=g) for _ in range(n)]


FAST = {"lcq": dict(steps=5), "lbllm": dict(steps=5, act_steps=5)}   # small budgets: the tests check errors


@pytest.fixture(scope="module")
def prepared():
    """(teacher, student) made once: the tests below copy the student and expect an error before any work."""
    teacher = tiny_gpt()
    return teacher, lcd.prepare_student(teacher, 2, calib=calib_batches())


def quantized_layers(model):
    return [n for n, m in model.named_modules() if hasattr(m, "storage_bits")]


# ---- 1. calibration with no tokens; degenerate Hessians -----------------------------------------------

@pytest.mark.parametrize("method", ["lcd", "rtn", "kmeans", "gptq", "claq", "squeezellm", "lcq", "lbllm"])
def test_calibration_without_tokens_is_one_clear_error_for_every_method(method):
    model = tiny_gpt()
    with pytest.raises(ValueError, match="calibration batches hold no tokens"):
        baselines.quantize(model, 2, calib=[torch.zeros(0, 16, dtype=torch.long)], method=method)
    assert quantized_layers(model) == []                       # before any work: the model is untouched
    with pytest.raises(ValueError, match="calibration data is empty"):
        baselines.quantize(model, 2, calib=[], method=method)


def test_prepare_student_and_collect_stats_reject_calibration_without_tokens():
    teacher = tiny_gpt()
    for empty in ([torch.zeros(0, 16, dtype=torch.long)], [torch.zeros(3, 0, dtype=torch.long)]):
        with pytest.raises(ValueError, match="hold no tokens"):
            lcd.prepare_student(teacher, 2, calib=empty)
        with pytest.raises(ValueError, match="hold no tokens"):
            lcd.collect_stats(teacher, empty, ["transformer.h.0.mlp.c_fc"])
    # an empty batch among real ones is simply skipped: the statistics are those of the real ones
    real = calib_batches()
    name = "transformer.h.0.mlp.c_fc"
    with_empty = lcd.collect_stats(teacher, [torch.zeros(0, 24, dtype=torch.long)] + real, [name])[name]
    torch.testing.assert_close(with_empty["h"], lcd.collect_stats(teacher, real, [name])[name]["h"])


class RoutedLM(nn.Module):
    """Token ids -> logits, with one linear layer ('expert') that no token is routed to."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(16, 8)
        self.dense = nn.Linear(8, 8)
        self.expert = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, idx):
        x = self.dense(self.wte(idx))                                  # (B, T, 8)
        chosen = x.reshape(-1, 8)[:0]                                  # the expert's tokens: none
        return self.head(x + self.expert(chosen).sum() * 0)


def test_a_layer_no_token_reached_gets_zero_statistics_not_nan():
    model = RoutedLM()
    stats = lcd.collect_stats(model, [torch.randint(0, 16, (2, 5))], ["dense", "expert"], full_hessian=True)
    assert stats["expert"]["n"] == 0 and stats["dense"]["n"] == 10
    assert torch.equal(stats["expert"]["h"], torch.zeros(8)) and torch.equal(stats["expert"]["H"], torch.zeros(8, 8))
    for method in ("lcd", "gptq", "lbllm"):                            # and every method quantizes it
        q = baselines.quantize(copy.deepcopy(model), 2, calib=[torch.randint(0, 16, (2, 5))], method=method,
                         **FAST.get(method, {}))
        assert torch.isfinite(q.expert.weight_dequantized()).all()


def test_hessian_methods_fall_back_on_an_all_zero_hessian():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 32, generator=g)
    dead = {"h": torch.zeros(32), "H": torch.zeros(32, 32), "n": 0}
    # GPTQ's reference fallback: dead inputs get H_kk = 1 and their weight column 0 (exact: x_k is 0)
    layer = baselines.gptq(W, dead, 2)
    assert torch.equal(layer.weight_dequantized(), torch.zeros(8, 32))
    assert torch.isfinite(baselines.claq(W, dead, 2).weight_dequantized()).all()
    lbllm = baselines.lbllm(W, dead, 2)                                # its surrogate inputs need chol(H)
    assert torch.isfinite(lbllm.weight_dequantized()).all() and torch.isfinite(lbllm.act_clip).all()
    # half the inputs dead: their weights become 0 before rounding, so each takes its row's grid point
    # nearest 0; the live columns are quantized as usual
    h = torch.cat([torch.ones(16), torch.zeros(16)])
    layer = baselines.gptq(W, {"h": h, "H": torch.diag(h)}, 2)
    W_hat, grid = layer.weight_dequantized(), layer.codebook.float()[:, 0]             # (8, 32), (8, 4)
    nearest_zero = grid.gather(1, grid.abs().argmin(1, keepdim=True))                 # (8, 1)
    assert torch.equal(W_hat[:, 16:], nearest_zero.expand(8, 16)) and W_hat[:, :16].abs().sum() > 0


def test_a_singular_hessian_is_damped_more_until_it_factors():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 24, generator=g)
    v = torch.randn(24, 1, generator=g)
    H = v @ v.T                                                        # rank one: collinear inputs
    with pytest.raises(torch.linalg.LinAlgError):                      # what plain damping 1e-12 meets
        torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(
            H.double() + 1e-12 * H.diag().mean() * torch.eye(24, dtype=torch.double))), upper=True)
    layer = baselines.gptq(W, {"h": H.diag(), "H": H}, 2, damp=1e-12)  # retried with 10x, 100x, ...
    assert torch.isfinite(layer.weight_dequantized()).all()
    with pytest.raises(ValueError, match="not positive definite even damped"):
        baselines.damped_factor(-torch.eye(4, dtype=torch.double), 1e-3, torch.linalg.cholesky)
    with pytest.raises(ValueError, match="Hessian holds NaN"):
        baselines.gptq(W, {"h": torch.ones(24), "H": torch.full((24, 24), float("nan"))}, 2)


# ---- 2. weights past the fp16 range ---------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lcd", "kmeans", "rtn", "gptq", "squeezellm", "claq", "lcq", "lbllm"])
def test_a_weight_past_fp16_is_an_error_naming_the_layer_and_the_value(method):
    model = tiny_gpt()
    model.transformer.h[1].mlp.c_fc.weight.data[3, 5] = 6e5
    with pytest.raises(ValueError, match=r"'transformer\.h\.1\.mlp\.c_fc'.*600000.*fp16.*skip="):
        baselines.quantize(model, 2, calib=calib_batches(), method=method)
    assert quantized_layers(model) == []                               # nothing changed
    # the remedy the message gives works: the layer stays in full precision, everything stored is finite
    baselines.quantize(model, 2, calib=calib_batches(), method=method, skip="h.1.mlp.c_fc", **FAST.get(method, {}))
    assert isinstance(model.transformer.h[1].mlp.c_fc, nn.Linear)
    with torch.no_grad():
        assert torch.isfinite(model(calib_batches()[0])[0]).all()


def test_an_outlier_past_fp16_is_an_error_and_one_inside_is_kept_exactly():
    model = tiny_gpt()
    model.transformer.h[0].attn.c_proj.weight.data[0, 0] = 1e5
    with pytest.raises(ValueError, match=r"attn\.c_proj.*100000.*65504"):
        baselines.quantize(model, 2, calib=calib_batches(), outlier_frac=0.01)
    model.transformer.h[0].attn.c_proj.weight.data[0, 0] = 6e4         # representable: kept exactly
    baselines.quantize(model, 2, calib=calib_batches(), outlier_frac=0.01)
    layer = model.transformer.h[0].attn.c_proj
    assert layer.weight_dequantized()[0, 0].item() == 6e4
    assert all(torch.isfinite(b).all() for b in layer.buffers())


def test_every_fp16_store_refuses_a_value_it_would_make_inf():
    idx = torch.zeros(2, 8, dtype=torch.long)
    codebook = torch.tensor([[[0.0, 1.0, 2.0, 7e4]], [[0.0, 1.0, 2.0, 3.0]]])
    with pytest.raises(ValueError, match="codebook reaches .*70000"):
        packed_model.LUTLinear.from_clustered(codebook, idx, 2, None)
    ok = codebook.clamp(max=3.0)
    with pytest.raises(ValueError, match="outlier .*1e\\+06"):
        packed_model.LUTLinear.from_clustered(ok, idx, 2, None, outliers=(torch.tensor([0]), torch.tensor([1]),
                                                                 torch.tensor([1e6])))
    with pytest.raises(ValueError, match="scale reaches .*inf"):
        packed_model.LUTLinear.from_clustered(ok, idx, 2, None, in_scale=torch.full((8,), float("inf")))
    with pytest.raises(ValueError, match="codebook of column 1 reaches"):
        baselines.CLAQLinear(2, 2, torch.tensor([2, 2]), [torch.zeros(4), torch.full((4,), 1e5)],
                             torch.zeros(2, 2, dtype=torch.long))
    # a student whose teacher holds such a weight, and freeze() of a trained codebook that drifted past it
    teacher = tiny_gpt()
    teacher.transformer.h[0].mlp.c_fc.weight.data[0, 0] = -7e4
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.mlp\.c_fc'.*70000"):
        lcd.prepare_student(teacher, 2, calib=calib_batches())
    student = lcd.prepare_student(tiny_gpt(), 2, calib=calib_batches())
    student.transformer.h[0].attn.c_attn.codebook.data[0, 0, 0] = 1e5
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.c_attn'.*codebook.*100000"):
        lcd.freeze(student)


def test_smoothing_never_picks_a_scale_that_pushes_the_weights_past_fp16():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 16, generator=g)
    W[:, 0] = 3e4                                                      # in range, but any s_0 > 2.2 is not
    X = torch.randn(64, 16, generator=g)
    X[:, 0] *= 1e4                                                     # an outlier channel: s_0 >> 1
    s, errors = lcd.choose_smoothing(W, X, (X ** 2).mean(0), 4, None, 8)
    assert errors[0.8] == float("inf")
    assert s is None or ((W * s).abs() <= packed_model.FP16_MAX).all()


def test_kernel_path_falls_back_to_the_reference_when_fp16_would_overflow(monkeypatch):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the CPU emulation of kernels.cu needs it")
    import cuda_emulation
    emulated = cuda_emulation.EmulatedKernels()
    monkeypatch.setattr(lcd_kernels, "cuda_launch", emulated.launch)           # the GPU path, replayed on the CPU
    monkeypatch.setattr(lcd_kernels, "_cuda_available", True)
    layer = lcd.quantize_linear(nn.Linear(64, 4), 2)
    x = torch.full((1, 64), 1e5)                                       # fp32 activations past fp16
    assert lcd_kernels.lut_forward_cuda(layer, x) is None                      # -> LUTLinear's reference
    y = lcd_kernels.lut_forward_cuda(layer, torch.ones(1, 64))                 # in range: the kernel's answer
    torch.testing.assert_close(y, F.linear(torch.ones(1, 64), layer.weight_dequantized(), layer.bias),
                               rtol=2e-3, atol=2e-3)


def test_load_quantized_rejects_a_file_with_non_finite_codebooks(tmp_path):
    model = baselines.quantize(tiny_gpt(), 2)
    model.transformer.h[0].mlp.c_fc.codebook[0, 0, 0] = float("inf")   # written behind the API's back
    path = str(tmp_path / "q.pt")
    packed_model.save_quantized(model, path)
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.mlp\.c_fc'.*non-finite codebook.*corrupt"):
        packed_model.load_quantized(tiny_gpt(), path)


# ---- 3. adaptive smoothing on a layer that outputs zero ----------------------------------------------

def test_smoothing_a_layer_that_outputs_zero_gives_no_smoothing_and_the_run_goes_on():
    teacher = tiny_gpt()
    dead = teacher.transformer.h[1].mlp.c_proj
    dead.weight.data.zero_()
    dead.bias.data.zero_()
    lines = []
    student = lcd.prepare_student(teacher, 2, calib=calib_batches(), a_bits=8, smoothing=True, log=lines.append)
    assert student.transformer.h[1].mlp.c_proj.in_scale is None
    assert any("h.1.mlp.c_proj: alpha off" in line for line in lines)
    s, errors = lcd.choose_smoothing(torch.zeros(4, 8), torch.randn(16, 8), torch.ones(8), 4, None, 8)
    assert s is None and set(errors.values()) == {0.0}                 # exact: no error where Y = 0
    s, errors = lcd.choose_smoothing(torch.randn(4, 8), torch.zeros(16, 8), torch.ones(8), 4, None, 8)
    assert s is None and errors["off"] == 0.0                          # no input at all: nothing to smooth
    with torch.no_grad():
        assert torch.isfinite(lcd.freeze(student)(calib_batches()[0])[0]).all()


# ---- 4. distillation temperature and every numeric hyperparameter -------------------------------------

def kl_reference(student_logits, teacher_logits, tau):
    """tau^2 KL(p_t || p_s) per token in float64, the textbook formula."""
    log_p_s = F.log_softmax(student_logits.double() / tau, -1)
    log_p_t = F.log_softmax(teacher_logits.double() / tau, -1)
    return float((log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * tau ** 2)


@pytest.mark.parametrize("tau", [1.0, 100.0, 10000.0])
def test_kd_loss_is_accurate_at_large_temperatures(tau):
    g = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(4, 8, 256, generator=g)
    student = teacher + 0.01 * torch.randn(4, 8, 256, generator=g)
    assert lcd.kd_loss(student, teacher, tau).item() == pytest.approx(kl_reference(student, teacher, tau),
                                                                      rel=1e-2)
    far = teacher + 30 * torch.randn(4, 8, 256, generator=g)           # far apart: the log-sum-exp branch
    assert lcd.kd_loss(far, teacher, tau).item() == pytest.approx(kl_reference(far, teacher, tau), rel=1e-2)
    mixed = torch.cat([student[:2], far[2:]])                          # near and far tokens in one batch
    assert lcd.kd_loss(mixed, teacher, tau).item() == pytest.approx(kl_reference(mixed, teacher, tau), rel=1e-2)
    for logits in (student, mixed):                                    # and its gradient is the KL's
        x = logits.clone().requires_grad_()
        lcd.kd_loss(x, teacher, tau).backward()
        x64 = logits.double().requires_grad_()
        log_p_t = F.log_softmax(teacher.double() / tau, -1)
        ((log_p_t.exp() * (log_p_t - F.log_softmax(x64 / tau, -1))).sum(-1).mean() * tau ** 2).backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-3, atol=1e-3 * x64.grad.abs().max().item())


@pytest.mark.parametrize("tau", [0, -1.0, float("nan"), float("inf")])
def test_a_temperature_that_is_not_positive_is_refused_before_any_step(tau, prepared):
    teacher, student = prepared[0], copy.deepcopy(prepared[1])
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ValueError, match="tau"):
        lcd.distill(teacher, student, iter(calib_batches(n=4)), 2, tau=tau)
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="temperature tau must be a finite number > 0"):
        lcd.kd_loss(torch.zeros(2, 4), torch.zeros(2, 4), tau)


@pytest.mark.parametrize("kwargs, words", [
    (dict(steps=-1), "steps must be an int"), (dict(steps=2.5), "steps must be an int"),
    (dict(lr=-1e-3), "lr must be"), (dict(latent_lr=float("nan")), "latent_lr must be"),
    (dict(other_lr="big"), "other_lr must be"), (dict(warmup=-5), "warmup must be"),
    (dict(final_frac=0.0), "final_frac must be"), (dict(final_frac=1.5), "final_frac must be"),
    (dict(ce_weight=-1), "ce_weight must be"), (dict(speculative_every=-1), "speculative_every must be"),
    (dict(reassign_every=0.5), "reassign_every must be"), (dict(checkpoint_every=-2), "checkpoint_every must be"),
    (dict(bits=5), "bits must be 2, 3 or 4"), (dict(speculative_paths=("keep", "magic")), "speculative_paths"),
])
def test_distill_checks_every_numeric_hyperparameter_first(kwargs, words, prepared):
    teacher, student = prepared[0], copy.deepcopy(prepared[1])
    args = dict(dict(steps=2), **kwargs)
    with pytest.raises(ValueError, match=words):
        lcd.distill(teacher, student, iter(calib_batches(n=4)), args.pop("steps"), **args)


def test_prepare_student_and_quantize_check_their_hyperparameters_first():
    teacher = tiny_gpt()
    for kwargs, words in ((dict(progressive_p=-1), "progressive_p"), (dict(init="magic"), "init must be"),
                          (dict(alphas=()), "alphas must hold"), (dict(alphas=(0.5, 2.0)), "alpha must be"),
                          (dict(group_size=0), "group_size must be")):
        with pytest.raises(ValueError, match=words):
            lcd.prepare_student(teacher, 2, calib=calib_batches(), **kwargs)
    for kwargs, words in ((dict(outlier_frac=1.5), "outlier_frac must be"), (dict(outlier_frac=-0.1), "outlier_frac"),
                          (dict(max_iters=-1), "max_iters must be an int"), (dict(group_size=7.5), "group_size")):
        model = tiny_gpt()
        with pytest.raises(ValueError, match=words):
            baselines.quantize(model, 2, calib=calib_batches(), **kwargs)
        assert quantized_layers(model) == []
    for method, kwargs, words in (("gptq", dict(damp=0.0), "damp must be"), ("gptq", dict(block_size=0), "block_size"),
                                  ("lcq", dict(rank=0), "rank must be"), ("lcq", dict(lr=-1.0), "lr must be"),
                                  ("lbllm", dict(steps=-3), "steps must be")):
        with pytest.raises(ValueError, match=words):
            baselines.quantize(tiny_gpt(), 2, calib=calib_batches(), method=method, **kwargs)


# ---- 6. truncated or empty files ------------------------------------------------------------------------

def cut(path, fraction):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * fraction)])


@pytest.mark.parametrize("fraction, words", [(0.5, "incomplete or corrupt"), (0.0, "empty")])
def test_load_quantized_names_a_truncated_or_empty_file(tmp_path, fraction, words):
    path = str(tmp_path / "q.pt")
    packed_model.save_quantized(baselines.quantize(tiny_gpt(), 2), path)
    cut(path, fraction)
    with pytest.raises(ValueError, match=f"q.pt.*{words}.*save the quantized model again"):
        packed_model.load_quantized(tiny_gpt(), path)
    with pytest.raises(FileNotFoundError, match="nothing.pt not found"):
        packed_model.load_quantized(tiny_gpt(), str(tmp_path / "nothing.pt"))


@pytest.mark.parametrize("fraction", [0.5, 0.0])
def test_teacher_and_checkpoints_name_a_truncated_file_and_what_to_do(tmp_path, fraction):
    teacher_path = str(tmp_path / "teacher.pt")
    train_kd.save_teacher(tiny_gpt(), teacher_path)
    cut(teacher_path, fraction)
    with pytest.raises(RuntimeError, match="teacher.pt.*(incomplete or corrupt|empty).*delete it to train the teacher"):
        train_kd.load_teacher(teacher_path)
    ckpt = str(tmp_path / "ckpt.pt")
    train_kd.atomic_save({"step": 1, "w": torch.ones(1000)}, ckpt)
    cut(ckpt, fraction)
    with pytest.raises(RuntimeError, match="ckpt.pt.*(incomplete or corrupt|empty).*delete it to restart"):
        train_kd.load_checkpoint(ckpt)
    train_kd.atomic_save({"step": 1}, ckpt)                            # readable, but not of this stage
    with pytest.raises(RuntimeError, match=r"lacks \['state'\].*delete it"):
        train_kd.load_checkpoint(ckpt, ("step", "state"))


def test_a_truncated_distillation_checkpoint_stops_the_run_and_is_left_as_it_was(tiny_teacher, tmp_path):
    teacher, meta = tiny_teacher
    config = dict({k: getattr(train_kd, k) for k in train_kd.CONFIG_KEYS}, out_dir=str(tmp_path), preset="tiny",
                  device="cpu", kd_steps=2, kd_batch_size=2, batch_size=4, calib_batches=1)
    train = train_kd.load_tokens(meta["dir"], "train")
    calib, calib_x = train_kd.calibration_data(train, config, teacher.config.block_size)
    path = tmp_path / "distill_kd_w2.pt"
    train_kd.atomic_save({"state": {}, "rng": [], "config": {}}, str(path))
    cut(str(path), 0.5)
    data = path.read_bytes()
    with pytest.raises(RuntimeError, match="distill_kd_w2.pt.*incomplete or corrupt.*delete it to restart the kd"):
        train_kd.run_distillation("kd", teacher, config, train, calib, calib_x, 0, 1, "cpu")
    assert path.read_bytes() == data and os.listdir(tmp_path) == ["distill_kd_w2.pt"]


def test_a_writer_that_fails_midway_leaves_the_old_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    train_kd.atomic_save({"step": 1}, path)
    with pytest.raises(Exception):
        train_kd.atomic_save({"step": 2, "bad": lambda: None}, path)   # torch.save cannot pickle it
    assert train_kd.load_checkpoint(path) == {"step": 1} and os.listdir(tmp_path) == ["ckpt.pt"]
    json_path = str(tmp_path / "results.json")
    train_kd.write_json({"rows": 1}, json_path)
    with pytest.raises(TypeError):
        train_kd.write_json({"rows": object()}, json_path)
    assert open(json_path).read() == '{\n "rows": 1\n}' and sorted(os.listdir(tmp_path)) == ["ckpt.pt", "results.json"]


# ---- 7. token ids outside the vocabulary ----------------------------------------------------------------

def test_token_ids_outside_the_vocabulary_name_the_id_the_vocabulary_and_the_cause(prepared):
    bad = [torch.arange(60, 100).view(2, 20)]                          # ids 60..99, vocabulary 64
    words = r"token id 99 is outside the model's vocabulary of 64.*another tokenizer"
    model = tiny_gpt()
    for method in ("lcd", "gptq", "rtn"):
        with pytest.raises(ValueError, match=words):
            baselines.quantize(model, 2, calib=bad, method=method)
    assert quantized_layers(model) == []
    with pytest.raises(ValueError, match=words):
        lcd.prepare_student(model, 2, calib=bad)
    with pytest.raises(ValueError, match=words):
        lcd.collect_stats(model, bad, ["transformer.h.0.mlp.c_fc"])
    with pytest.raises(ValueError, match="token id -1 is outside"):
        baselines.quantize(model, 2, calib=[torch.full((1, 4), -1)])
    student = copy.deepcopy(prepared[1])
    with pytest.raises(ValueError, match="batch of step 1: " + words):
        lcd.distill(model, student, iter(calib_batches(n=1) + bad), 2)
    with pytest.raises(ValueError, match="calib_x: " + words):
        lcd.distill(model, student, iter(calib_batches(n=2)), 2, calib_x=bad[0], speculative_every=1)


class HFStyleLM(nn.Module):
    """A model that says which embedding holds its tokens (Hugging Face's get_input_embeddings)."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(128, 8)                                # first, but not the token table
        self.tok = nn.Embedding(32, 8)
        self.proj = nn.Linear(8, 32)

    def get_input_embeddings(self):
        return self.tok

    def forward(self, idx):
        return self.proj(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))


def test_the_token_embedding_is_found_generically():
    model = HFStyleLM()
    assert lcd.input_embedding(model) is model.tok
    with pytest.raises(ValueError, match="token id 40 is outside the model's vocabulary of 32"):
        baselines.quantize(model, 2, calib=[torch.tensor([[1, 40]])])
    baselines.quantize(model, 2, calib=[torch.tensor([[1, 31]])])            # 31 < 32 (though < 128 too)


def test_evaluate_checks_the_split_against_the_model(tmp_path):
    tokens = np.arange(0, 100, dtype=np.uint16).repeat(20)             # ids up to 99
    with pytest.raises(ValueError, match="evaluate: the split: token id 99 is outside .* of 64.*tokenizer"):
        train_kd.evaluate(tiny_gpt(), tokens, 16, 4, 2)
    assert np.isfinite(train_kd.evaluate(tiny_gpt(vocab=100), tokens, 16, 4, 2))


# ---- 8. batches that run out ------------------------------------------------------------------------------

def test_a_batch_iterator_shorter_than_steps_is_a_clear_error(prepared):
    teacher, student = prepared[0], copy.deepcopy(prepared[1])
    with pytest.raises(ValueError, match="the batch iterator ran out after 3 of 5 steps"):
        lcd.distill(teacher, student, iter(calib_batches(n=3)), 5)
    _, history = lcd.distill(teacher, student, calib_batches(n=2), 2)  # a list does as well as an iterator
    assert len(history["loss"]) == 2


DDP_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
import lcd
from model import GPT, SIZES

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
teacher = GPT(dict(SIZES["tiny"], vocab_size=64)).eval()
g = torch.Generator().manual_seed(rank)
batches = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(3 if rank == 0 else 5)]  # uneven
student = lcd.prepare_student(teacher, 2, calib=batches[:1])
try:
    lcd.distill(teacher, student, iter(batches), 5, ddp=True)
    message = "no error"
except ValueError as e:
    message = str(e)
open(os.path.join({out!r}, f"rank{{rank}}.txt"), "w").write(message)
del student
dist.barrier()                                   # both done before the group is torn down
dist.destroy_process_group()
"""


def test_uneven_batches_under_ddp_stop_every_process_with_the_same_error(tmp_path):
    script = tmp_path / "uneven.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=ROOT, out=str(tmp_path))))
    with socket.socket() as s:                                         # a free port: other runs may share the host
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]   # nobody hung or died
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "the batch iterator ran out after 3 of 5 steps on process(es) [0]" in message, message
