"""Shared test fixtures: a small text dataset and a tiny trained teacher, made once per test session."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))

import prepare  # noqa: E402  (data/prepare.py)
import train_kd  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

# Something with structure to learn: rhythmic, repetitive lines
TEXT = "".join(f"{name}:\nO {word}, thou art the {word} of {place}.\nAnd {place} is {word}.\n\n"
               for name in ("ROMEO", "JULIET", "HAMLET", "LEAR") for word in ("light", "night", "sun", "moon")
               for place in ("Verona", "Denmark", "the sea", "the heath")) * 6


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(data_dir, meta) of a byte-level dataset made from TEXT."""
    root = tmp_path_factory.mktemp("data")
    src = root / "tiny.txt"
    src.write_text(TEXT)
    data_dir = prepare.prepare(name="tiny", tokenizer="bytes", input=str(src), out_root=str(root))
    return data_dir, train_kd.ensure_data(data_dir)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_data, tmp_path_factory):
    """(teacher, meta): a `tiny` GPT trained for a few hundred steps on the tiny dataset."""
    data_dir, meta = tiny_data
    out = tmp_path_factory.mktemp("teacher")
    teacher, meta = train_kd.ensure_teacher(dataset=data_dir, out_dir=str(out), preset="tiny", max_iters=150,
                                            batch_size=16, warmup_iters=10, device="cpu")
    return teacher, meta
