"""train_kd.py stage 1: config parsing, teacher training, resume after an interruption, torchrun."""
import os
import subprocess
import sys

import pytest
import torch

import train_kd
from conftest import ROOT


def test_config_overrides_are_type_checked():
    c = train_kd.parse_config(["--max_iters=7", "--learning_rate=1", "--preset=tiny", "--n_layer=3"])
    assert c["max_iters"] == 7 and c["learning_rate"] == 1.0 and c["preset"] == "tiny" and c["n_layer"] == 3
    with pytest.raises(ValueError, match=r"unknown option --max_iter: did you mean --max_iters\b"):
        train_kd.parse_config(["--max_iter=7"])
    with pytest.raises(ValueError, match=r"did you mean --kd_steps\b"):
        train_kd.parse_config(["--kd_step=100"])
    with pytest.raises(ValueError, match="unknown option --zzz .*--help"):    # nothing near: no guess
        train_kd.parse_config(["--zzz=1"])
    with pytest.raises(ValueError, match="wants an integer"):
        train_kd.parse_config(["--max_iters=1.5"])
    with pytest.raises(ValueError, match="--bits wants an integer"):
        train_kd.parse_config(["--bits=two"])
    with pytest.raises(ValueError, match="--bits needs a value"):
        train_kd.parse_config(["--bits"])
    with pytest.raises(ValueError, match="unknown preset"):
        train_kd.parse_config(["--preset=huge"])
    with pytest.raises(ValueError, match="--key=value"):
        train_kd.parse_config(["max_iters=7"])
    for bad in ("--bits=5", "--a_bits=16", "--lcd_init=random", "--block_loss=mse"):   # refused before any training
        with pytest.raises(ValueError, match="must be one of"):
            train_kd.parse_config([bad])


def test_tiny_teacher_learns(tiny_teacher):
    teacher, meta = tiny_teacher
    val = train_kd.load_tokens(meta["dir"], "val")
    assert train_kd.evaluate(teacher, val, teacher.config.block_size) < 1.5  # ln(256) = 5.5 at the start


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    data_dir, meta = tiny_data
    config = train_kd.parse_config(["--preset=tiny", "--max_iters=6", "--ckpt_interval=3", "--batch_size=4",
                                    "--warmup_iters=2", f"--out_dir={tmp_path / 'a'}"])
    straight = train_kd.train_teacher(config, meta)

    config["out_dir"] = str(tmp_path / "b")
    real_get_batch, calls = train_kd.get_batch, []

    def dies_at_step_5(*args, **kw):  # the process "is killed" during step 5
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_get_batch(*args, **kw)

    monkeypatch.setattr(train_kd, "get_batch", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_kd.train_teacher(config, meta)
    monkeypatch.setattr(train_kd, "get_batch", real_get_batch)
    assert os.path.exists(tmp_path / "b" / "teacher_ckpt.pt")
    resumed = train_kd.train_teacher(config, meta)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_torchrun_two_processes(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(ROOT, "train_kd.py"), f"--dataset={data_dir}", f"--out_dir={tmp_path}",
           "--preset=tiny", "--max_iters=4", "--batch_size=4", "--warmup_iters=1", "--device=cpu",
           "--stop_after=teacher"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "val loss" in result.stdout
    assert os.path.exists(tmp_path / "teacher.pt")


def test_a_dataset_of_other_tokens_is_refused(tiny_data):
    data_dir, _ = tiny_data
    with pytest.raises(ValueError, match="holds 'bytes' tokens, not 'gpt2'"):
        train_kd.ensure_data(data_dir, "gpt2")
