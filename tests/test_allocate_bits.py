"""Bits where the error is (lcd.output_fisher, lcd.layer_sensitivity, lcd.allocate_bits) and a student whose
layers have different bits: prepared, distilled, frozen, saved, loaded and decoded like any other."""
import math

import pytest
import torch
import torch.nn.functional as F

import lcd
import packed_model
from model import GPT, SIZES


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(SIZES["tiny"] | {"vocab_size": 64}).eval()


def calib(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 16), generator=g) for _ in range(n)]


def test_output_fisher_is_the_mean_squared_gradient_of_each_output():
    model = tiny_gpt()
    batches = calib()
    name = "transformer.h.1.mlp.c_proj"
    fisher = lcd.output_fisher(model, batches, [name, "transformer.h.0.attn.c_attn"])
    # the same by hand: the gradient of the summed next-token loss wrt the layer's output, squared, averaged
    captured, total, tokens = [], 0.0, 0
    layer = model.get_submodule(name)
    handle = layer.register_forward_hook(lambda m, i, o: captured.append(o.retain_grad() or o))
    for x in batches:
        model.zero_grad()
        logits = model(x)[0][:, :-1]
        F.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1), reduction="sum").backward()
        g = captured.pop().grad
        total = total + g.reshape(-1, g.shape[-1]).square().sum(0)
        tokens += x[:, 1:].numel()
    handle.remove()
    torch.testing.assert_close(fisher[name], total / tokens, rtol=1e-4, atol=1e-12)
    assert fisher["transformer.h.0.attn.c_attn"].shape == (96,)
    assert not any(p.grad is not None and p.grad.abs().sum() > 0 and p.requires_grad is False
                   for p in model.parameters())
    with pytest.raises(ValueError, match="at least 2 tokens"):
        lcd.output_fisher(model, [torch.zeros(2, 1, dtype=torch.long)], [name])
    with pytest.raises(ValueError, match="no modules named"):
        lcd.output_fisher(model, batches, ["nope"])


def test_sensitivity_falls_with_bits_and_scales_with_the_fisher():
    torch.manual_seed(0)
    W, h, f = torch.randn(16, 64), torch.rand(64) + 0.1, torch.rand(16) + 0.1
    s2, s3, s4 = (lcd.layer_sensitivity(W, h, f, 2 ** b) for b in (2, 3, 4))
    assert s2 > s3 > s4 > 0
    assert lcd.layer_sensitivity(W, h, 3 * f, 4) == pytest.approx(3 * s2, rel=1e-5)


def test_allocate_bits_spends_the_budget_on_the_most_sensitive_layers():
    model = tiny_gpt()
    linears = packed_model.find_linears(model)
    n_weights = sum(m.weight.numel() for m in linears.values())
    cost = {n: [packed_model.codebook_storage_bits(m.out_features, m.in_features, b) for b in (2, 3)]
            for n, m in linears.items()}
    uniform = sum(c[0] for c in cost.values()) / n_weights
    budget = uniform + 0.4
    lines = []
    plan, table = lcd.allocate_bits(model, calib(), 2, 0.4, log=lines.append)
    assert set(plan) == set(linears) and set(plan.values()) <= {2, 3} and 3 in plan.values()
    spent = sum(cost[n][plan[n] - 2] for n in plan)
    assert spent <= budget * n_weights
    # greedy: no layer left at 2 bits that still fits the budget has a better gain per bit than an upgraded one
    gain = {name: (s2 - s3) / (cost[name][1] - cost[name][0]) for name, s2, s3, _ in table}
    left = [n for n in plan if plan[n] == 2 and spent + cost[n][1] - cost[n][0] <= budget * n_weights]
    assert not left or max(gain[n] for n in left) <= 0
    assert plan[max(gain, key=gain.get)] == 3                        # the best gain per bit goes first
    assert "layers get 3 bits" in lines[0]
    # exactly the uniform budget: nothing to spend
    plan0, _ = lcd.allocate_bits(model, calib(), 2, 0.0)
    assert set(plan0.values()) == {2}
    with pytest.raises(ValueError, match="extra"):
        lcd.allocate_bits(model, calib(), 2, -0.1)
    with pytest.raises(ValueError, match="bits must be 2 or 3"):
        lcd.allocate_bits(model, calib(), 4, 1.0)


def test_a_student_with_bits_by_layer_distills_freezes_and_round_trips(tmp_path):
    teacher = tiny_gpt()
    names = list(packed_model.find_linears(teacher))
    plan = {n: 3 if i % 2 else 2 for i, n in enumerate(names)}
    student = lcd.prepare_student(teacher, plan, calib=calib())
    assert {n: m.n_centroids for n, m in lcd.lcd_layers(student).items()} == {n: 2 ** b for n, b in plan.items()}
    stream = iter(calib(seed=1, n=8))
    student, history = lcd.distill(teacher, student, stream, 4, bits=2)        # one stage: no merge
    frozen = lcd.freeze(student)
    bits = {n: m.bits for n, m in frozen.named_modules() if isinstance(m, packed_model.LUTLinear)}
    assert bits == plan
    fp = packed_model.footprint(frozen)
    expected = sum(packed_model.codebook_storage_bits(frozen.get_submodule(n).out_features,
                                                      frozen.get_submodule(n).in_features, b) for n, b in plan.items())
    assert math.isclose(fp["bits_per_weight"] * sum(l["params"] for l in fp["layers"].values()), expected)
    path = tmp_path / "mixed.pt"
    packed_model.save_quantized(frozen, path)
    loaded = packed_model.load_quantized(tiny_gpt(seed=5), path)
    x = calib(seed=2, n=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], frozen(x)[0])


def test_bits_by_layer_are_checked():
    teacher = tiny_gpt()
    names = list(packed_model.find_linears(teacher))
    with pytest.raises(ValueError, match="must name exactly the layers"):
        lcd.prepare_student(teacher, {names[0]: 2}, calib=calib())
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        lcd.prepare_student(teacher, dict.fromkeys(names, 5), calib=calib())
    plan = {n: 3 if i % 2 else 2 for i, n in enumerate(names)}
    with pytest.raises(ValueError, match="progressive_p=0"):
        lcd.distill(teacher, lcd.prepare_student(teacher, plan, calib=calib(), progressive_p=1),
                    iter(calib(n=4)), 2, bits=2)


# ---- train_kd: the tuning split and block-wise reconstruction's distinct sequences --------------------

def test_the_tuning_split_is_disjoint_from_what_is_distilled(tmp_path, monkeypatch):
    import numpy as np
    import train_kd
    monkeypatch.setattr(train_kd, "DATA_ROOT", str(tmp_path))
    torch.manual_seed(0)
    teacher, meta = GPT(dict(SIZES["tiny"], vocab_size=256)).eval(), {"tokenizer": "bytes"}
    T = 16
    config = dict(train_kd.DEFAULTS, preset="tiny", distill_data="mix", teacher_text_seqs=64, block_size=T)
    plays = np.random.default_rng(0).integers(0, 256, 64 * 200).astype(np.uint16)    # no two windows alike
    mix = train_kd.distillation_tokens(config, teacher, meta, plays)
    tune = train_kd.tuning_tokens(config, teacher, meta)
    assert len(tune) == train_kd.TUNING_SEQS * T
    distilled = {mix[i:i + T].tobytes() for i in range(0, len(mix), T)}
    assert not distilled & {tune[i:i + T].tobytes() for i in range(0, len(tune), T)}   # no sequence in both
    # the same split for every distillation setting (settings are compared on it)
    assert np.array_equal(train_kd.tuning_tokens(dict(config, teacher_text_seqs=8, distill_data="teacher"),
                                                 teacher, meta), tune)
    # block-wise reconstruction: distinct whole windows, in batches; too many is a clear error
    batches = train_kd.block_calibration(mix, dict(config, block_seqs=40, batch_size=8), T, calib=None)
    rows = torch.cat(batches)
    assert rows.shape == (40, T) and len(batches) == 5
    assert len({tuple(r.tolist()) for r in rows}) == 40
    assert all(r.numpy().astype(np.uint16).tobytes() in distilled for r in rows)
    assert train_kd.block_calibration(mix, dict(config, block_seqs=0), T, calib="calib") == "calib"
    with pytest.raises(ValueError, match="--block_seqs=129"):
        train_kd.block_calibration(mix, dict(config, block_seqs=129), T, calib=None)


def test_flags_of_bits_by_layer_and_block_seqs_are_checked():
    import train_kd
    for argv, words in ((["--extra_bits=-0.1"], "--extra_bits must be >= 0"),
                        (["--extra_bits=0.2", "--bits=4"], "at --bits=4"),
                        (["--extra_bits=0.2", "--progressive_p=1"], "give one of them 0"),
                        (["--block_seqs=-1"], "--block_seqs must be >= 0")):
        with pytest.raises(ValueError, match=words):
            train_kd.check_config(train_kd.parse_config(argv))
