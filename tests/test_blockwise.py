"""Block-wise reconstruction (lcd.reconstruct_blocks): each student block learns the teacher block's output."""
import pytest
import torch
import torch.nn as nn

import lcd
from model import GPT, SIZES


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(SIZES["tiny"] | {"vocab_size": 64}).eval()


def test_find_blocks_and_block_inputs():
    model = tiny_gpt()
    name, blocks = lcd.find_blocks(model)
    assert name == "transformer.h" and blocks is model.transformer.h
    calib = [torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (2, 16))]
    X, args, kwargs = lcd.block_inputs(model, calib)
    assert X.shape == (5, 16, 32)                      # args, kwargs: what the model passes besides x
    pos = torch.arange(16)
    expected = model.transformer.wte(calib[0]) + model.transformer.wpe(pos)
    torch.testing.assert_close(X[:3], expected)
    with pytest.raises(ValueError, match="no nn.ModuleList of blocks"):
        lcd.find_blocks(nn.Sequential(nn.Linear(4, 4)))


def test_reconstruction_lowers_every_block_error_and_the_logit_gap():
    teacher = tiny_gpt()
    calib = [torch.randint(0, 64, (8, 32)) for _ in range(2)]
    student = lcd.prepare_student(teacher, 2, calib=calib)
    x = torch.randint(0, 64, (4, 32))

    def gap(model):
        with torch.no_grad():
            return lcd.kd_loss(model(x)[0], teacher(x)[0]).item()

    before = gap(student)
    student, history = lcd.reconstruct_blocks(teacher, student, calib, steps=40)
    assert len(history["loss"]) == 80 and len(history["blocks"]) == 2
    for name, err_before, err_after in history["blocks"]:
        assert err_after < err_before, name
    assert gap(student) < before
    assert not any(p.requires_grad for p in student.parameters())   # nothing left trainable by accident
    trained = gap(student)
    assert abs(gap(lcd.freeze(student)) - trained) < 1e-5            # still a normal LCD student: freezes exactly


def test_reconstruction_checks_its_arguments():
    teacher = tiny_gpt()
    calib = [torch.randint(0, 64, (2, 8))]
    student = lcd.prepare_student(teacher, 2, calib=calib)
    with pytest.raises(ValueError, match="steps must be an int"):
        lcd.reconstruct_blocks(teacher, student, calib, steps=-1)
    with pytest.raises(ValueError, match="calibration data is empty"):
        lcd.reconstruct_blocks(teacher, student, [], steps=1)


def test_the_block_loss_per_batch_and_per_token():
    target = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])               # (1, T=2, C=2): mean squares 12.5 and 0.5
    out = torch.tensor([[[3.0, 5.0], [0.0, 0.0]]])                  # squared errors per token: 0.5 and 0.5
    assert abs(lcd.block_loss(out, target).item() - 0.5 / 6.5) < 1e-7             # 'batch': over the mean 6.5
    assert abs(lcd.block_loss(out, target, scale=torch.tensor(2.0)).item() - 0.25) < 1e-7
    assert abs(lcd.block_loss(out, target, "token").item() - (0.5 / 12.5 + 0.5 / 0.5) / 2) < 1e-7
    # an attention sink (one token 1000x the others, as in a pretrained model's residual stream): with the
    # same relative error on every token, 'token' does not change, while 'batch' sees only the sink's error
    torch.manual_seed(0)
    y = torch.randn(2, 16, 8)
    noise = 0.1 * torch.randn_like(y) * y.pow(2).mean(-1, keepdim=True).sqrt()
    sunk, only_rest = y.clone(), y + noise
    sunk[:, 0] *= 1000
    only_rest[:, 0] = sunk[:, 0]                                     # the sink exact, every other token off
    plain = lcd.block_loss(y + noise, y, "token")
    assert lcd.block_loss(only_rest, sunk, "token") > 0.9 * plain
    assert lcd.block_loss(only_rest, sunk, "batch") < 1e-4 * lcd.block_loss(y + noise, y, "batch")


def test_reconstruction_with_the_per_token_loss():
    teacher = tiny_gpt()
    calib = [torch.randint(0, 64, (8, 32)) for _ in range(2)]
    student = lcd.prepare_student(teacher, 2, calib=calib)
    student, history = lcd.reconstruct_blocks(teacher, student, calib, steps=40, loss="token")
    for name, err_before, err_after in history["blocks"]:
        assert err_after < err_before, name
    with pytest.raises(ValueError, match="loss must be one of"):
        lcd.reconstruct_blocks(teacher, student, calib, steps=1, loss="mse")
