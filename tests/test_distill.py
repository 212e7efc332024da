"""lcd.py section 4 and train_kd.py stages 3-7: the trainable LCD layer, progressive merging, speculative
steps, adaptive smoothing, freezing to LUTLinear, and the whole pipeline end to end (with resume)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lcd
import packed_model
import train_kd
from conftest import ROOT


def random_layer(N=6, K=20, C=4, group_size=8, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    h = torch.rand(K, generator=g) + 0.1
    cl = lcd.cluster(W, h, C, group_size)
    return lcd.LCDLinear(W, cl["codebook"], cl["idx"], group_size, bias=torch.randn(N, generator=g),
                         importance=h, **kw), W, h


def calib_of(meta, n=2, batch_size=4, T=32, seed=0):
    tokens = train_kd.load_tokens(meta["dir"], "train")
    g = torch.Generator().manual_seed(seed)
    return [train_kd.get_batch(tokens, batch_size, T, g)[0] for _ in range(n)]


def test_straight_through_gradients_reach_centroids_and_latent_weights():
    layer, W, h = random_layer()
    x = torch.randn(5, 20)
    target = torch.randn(5, 6)
    ((layer(x) - target) ** 2).sum().backward()
    # the gradient a dense layer with the quantized weight would get
    W_q = packed_model.dequantize(layer.codebook.detach().half().float(), layer.idx, 8).requires_grad_(True)
    ((F.linear(x, W_q, layer.bias.detach()) - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, W_q.grad)              # latent: the identity
    expected = torch.zeros_like(layer.codebook)                          # centroid: sum over its weights
    for n in range(6):
        for k in range(20):
            expected[n, k // 8, int(layer.idx[n, k])] += W_q.grad[n, k]
    torch.testing.assert_close(layer.codebook.grad, expected)
    assert layer.codebook.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0


def test_merging_halves_the_codebook_by_the_cheapest_merge():
    g = torch.Generator().manual_seed(1)
    W = torch.cat([torch.randn(4, 64, generator=g), torch.distributions.StudentT(3).sample((4, 64))])
    h = torch.rand(64, generator=g) + 0.05
    cl = lcd.cluster(W, h, 8, group_size=32)                   # Lloyd-converged: centroids are member means
    before = lcd.weighted_sse(W, h, cl["codebook"], cl["idx"], 32)      # (N, G)
    # one merge: the error rises by exactly the cheapest adjacent merge cost, and by no more than any
    # other adjacent merge would raise it (each alternative tried by brute force)
    codebook1, idx1 = lcd.merge_codebook(cl["codebook"], cl["idx"], h, 32, n_merges=1)
    rise = lcd.weighted_sse(W, h, codebook1, idx1, 32) - before
    for n in range(W.shape[0]):
        for grp in range(2):
            c, order = cl["codebook"][n, grp].sort()
            idx = cl["idx"][n, grp * 32:(grp + 1) * 32]
            alternatives = []
            for j in range(7):  # merge sorted centroids j and j + 1 into their weighted mean
                members = (idx == order[j]) | (idx == order[j + 1])
                w, m = W[n, grp * 32:(grp + 1) * 32], h[grp * 32:(grp + 1) * 32]
                old = cl["codebook"][n, grp][idx]
                merged = torch.where(members, (m * w)[members].sum() / m[members].sum(), old)
                alternatives.append(float((m * (w - merged) ** 2).sum() - (m * (w - old) ** 2).sum()))
            assert rise[n, grp] == pytest.approx(min(alternatives), rel=1e-3, abs=1e-5)
    # halving: 8 -> 4 centroids, sorted, every index in range, error no lower than before
    codebook, idx = lcd.merge_codebook(cl["codebook"], cl["idx"], h, 32)
    assert codebook.shape == (8, 2, 4) and int(idx.max()) < 4
    assert (codebook.diff(dim=-1) >= 0).all()
    assert (lcd.weighted_sse(W, h, codebook, idx, 32) >= before - 1e-5).all()


def test_speculative_step_never_commits_a_worse_student(tiny_teacher, tiny_data):
    teacher, meta = tiny_teacher
    calib = calib_of(meta)
    student = lcd.prepare_student(teacher, 2, None, calib, progressive_p=0)
    t_logits = lcd.teacher_logits_of(teacher, calib[1])
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():   # knock the centroids and latent weights about, so candidates differ
            for layer in lcd.lcd_layers(student).values():
                layer.codebook.add_(0.02 * torch.randn(layer.codebook.shape, generator=g))
                layer.weight.add_(0.02 * torch.randn(layer.weight.shape, generator=g))
        previous = {n: p.detach().clone() - 0.01 for n, p in student.named_parameters() if p.requires_grad}
        best, scores = lcd.speculative_step(student, calib[1], t_logits, 1.0, previous=previous)
        after = lcd.kd_loss(lcd.model_logits(student(calib[1])), t_logits).item()
        assert after <= scores["keep"] + 1e-6
        assert after == pytest.approx(scores[best], rel=1e-5)
        assert scores[best] == min(scores.values())
    assert len(scores) > 1   # candidates were really built and scored


def test_smoothing_leaves_the_fp_layer_unchanged(tiny_teacher, tiny_data):
    teacher, meta = tiny_teacher
    calib = calib_of(meta)
    student = lcd.prepare_student(teacher, 2, None, calib, a_bits=4, smoothing=True)
    teacher_linears = packed_model.find_linears(teacher)
    smoothed = [n for n, m in lcd.lcd_layers(student).items() if m.in_scale is not None]
    assert smoothed, "no layer chose smoothing on this teacher; the test checks nothing"
    inputs = lcd.collect_inputs(teacher, calib, smoothed)
    for name in smoothed:
        layer, linear = lcd.lcd_layers(student)[name], teacher_linears[name]
        # before quantization: (x / s) (W s)^T + b == x W^T + b, the latent weight being W s
        y_smoothed = F.linear(inputs[name] / layer.in_scale, layer.weight, layer.bias)
        torch.testing.assert_close(y_smoothed, linear(inputs[name]), rtol=1e-4, atol=1e-5)
        s = lcd.smoothing_scale(inputs[name].abs().amax(0), linear.weight, 0.5)
        torch.testing.assert_close(F.linear(inputs[name] / s, linear.weight * s), F.linear(inputs[name], linear.weight),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("a_bits", [None, 8])
def test_freeze_equals_the_training_layer(tiny_teacher, tiny_data, a_bits):
    teacher, meta = tiny_teacher
    calib = calib_of(meta)
    student = lcd.prepare_student(teacher, 2, 16, calib, a_bits=a_bits, progressive_p=1, smoothing=True)

    def batches():
        while True:
            yield from calib
    student, history = lcd.distill(teacher, student, batches(), 6, calib_x=calib[1], bits=2,
                                   speculative_every=2)
    assert [c for _, c in history["stages"]] == [8, 4]
    layers = lcd.lcd_layers(student)
    student.eval()
    logits = lcd.model_logits(student(calib[0]))
    for name, layer in layers.items():
        x = torch.randn(3, 7, layer.in_features)
        frozen = layer.freeze()
        assert isinstance(frozen, packed_model.LUTLinear)
        torch.testing.assert_close(frozen(x), layer(x), rtol=1e-5, atol=1e-5)
    frozen_model = lcd.freeze(student)
    assert not lcd.lcd_layers(frozen_model)
    torch.testing.assert_close(lcd.model_logits(frozen_model(calib[0])), logits, rtol=1e-4, atol=1e-4)


def pipeline_args(data_dir, out_dir, *extra):
    return [f"--dataset={data_dir}", f"--out_dir={out_dir}", "--preset=tiny", "--device=cpu", "--kd_steps=8",
            "--kd_batch_size=4", "--batch_size=8", "--calib_batches=2", "--eval_batches=2",
            "--speculative_every=3", "--kd_ckpt_interval=2", "--kd_warmup=2", "--progressive_p=1",
            "--final_frac=0.5", *extra]


@pytest.fixture
def teacher_dir(tiny_teacher, tmp_path):
    """A fresh out_dir holding the tiny teacher as out_dir/teacher.pt."""
    def make(name):
        out = tmp_path / name
        train_kd.save_teacher(tiny_teacher[0], str(out / "teacher.pt"))
        return out
    return make


def test_pipeline_writes_results_json(tiny_data, teacher_dir):
    data_dir, _ = tiny_data
    out = teacher_dir("run")
    train_kd.main(pipeline_args(data_dir, out, "--ablate=1"))
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["teacher", "rtn", "kmeans", "lcd-init", "kd", "lcd"]
    for r in results["rows"]:
        assert set(r) >= {"method", "bits", "val_loss", "ppl", "bits_per_weight", "bytes", "seconds"}
        assert r["val_loss"] > 0 and r["ppl"] == pytest.approx(2.718281828 ** r["val_loss"], rel=1e-6)
        assert r["bytes"] > 0 and r["bits_per_weight"] > 0
    fp, lcd_row = results["rows"][0], results["rows"][-1]
    assert 2 < lcd_row["bits_per_weight"] < fp["bits_per_weight"] and lcd_row["bytes"] < fp["bytes"]
    assert results["config"]["bits"] == 2 and results["config"]["kd_steps"] == 8
    assert {r["method"] for r in results["ablation"]} == {"lcd-no-density", "lcd-no-progressive",
                                                         "lcd-no-speculative", "lcd+blocks", "lcd+compensate",
                                                         "lcd-no-kd"}
    assert os.path.exists(out / "lcd_w2.pt")
    assert not [f for f in os.listdir(out) if f.startswith("distill_")]   # checkpoints cleaned up


def test_pipeline_resumes_after_interruption(tiny_data, teacher_dir, monkeypatch):
    data_dir, _ = tiny_data
    straight = teacher_dir("straight")
    train_kd.main(pipeline_args(data_dir, straight))

    resumed = teacher_dir("resumed")
    real_get_batch, calls = train_kd.get_batch, []

    def dies_in_lcd_step_6(*args, **kw):   # 3 calibration draws, 8 KD steps, then LCD's steps
        calls.append(1)
        if len(calls) == 3 + 8 + 6:
            raise KeyboardInterrupt
        return real_get_batch(*args, **kw)

    monkeypatch.setattr(train_kd, "get_batch", dies_in_lcd_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_kd.main(pipeline_args(data_dir, resumed))
    monkeypatch.setattr(train_kd, "get_batch", real_get_batch)
    ckpt = train_kd.load_checkpoint(str(resumed / "distill_lcd_w2.pt"))
    assert ckpt["state"]["step"] == 4 and ckpt["state"]["stage"] == 0  # the merge comes on resume
    assert not (resumed / "results.json").exists()
    train_kd.main(pipeline_args(data_dir, resumed))
    a = json.loads((straight / "results.json").read_text())["rows"]
    b = json.loads((resumed / "results.json").read_text())["rows"]
    for ra, rb in zip(a, b):
        assert ra["method"] == rb["method"] and ra["val_loss"] == rb["val_loss"], (ra, rb)
    with pytest.raises(RuntimeError, match="another configuration"):   # a checkpoint of another run
        train_kd.atomic_save(dict(ckpt, config={}), str(resumed / "distill_kd_w2.pt"))
        train_kd.main(pipeline_args(data_dir, resumed))


def test_distillation_under_torchrun(tiny_data, tiny_teacher, tmp_path):
    data_dir, _ = tiny_data
    train_kd.save_teacher(tiny_teacher[0], str(tmp_path / "teacher.pt"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
           os.path.join(ROOT, "train_kd.py"), *pipeline_args(data_dir, tmp_path, "--kd_steps=4")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows][-2:] == ["kd", "lcd"]
