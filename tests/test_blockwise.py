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
