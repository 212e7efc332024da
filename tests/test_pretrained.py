"""train_kd.py on a pretrained Llama-family teacher (--init_from=<directory>): a tiny Llama written as a
Hugging Face directory goes through every stage, block-wise reconstruction and its ablation included."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import train_kd
from conftest import ROOT
from test_llama import hf_config, hf_tensors, tiny_llama
from test_model import write_safetensors


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    src = tiny_llama(vocab_size=256)              # the byte-level dataset of conftest: 256 token ids
    (directory / "config.json").write_text(json.dumps(hf_config(src)))
    write_safetensors(directory / "model.safetensors", hf_tensors(src))
    return str(directory)


def test_pretrained_defaults_fill_only_what_the_command_line_leaves(llama_dir):
    config = train_kd.parse_config([f"--init_from={llama_dir}", "--kd_steps=3"])
    assert config["kd_steps"] == 3                                   # given: wins
    assert config["kd_mode"] == "blocks" and config["block_size"] == train_kd.PRETRAINED_DEFAULTS["block_size"]
    assert config["tokenizer"] == "bytes"                            # a directory brings no named tokenizer
    named = train_kd.parse_config(["--init_from=smollm2"])
    assert (named["tokenizer"], named["dataset"]) == ("smollm2", "shakespeare_smollm2")
    assert named["kd_baseline"] == 0 and train_kd.parse_config([])["kd_baseline"] == 1   # plain KD: one flag away
    assert train_kd.parse_config([])["kd_mode"] == "e2e"             # the baby GPT keeps its own defaults
    with pytest.raises(ValueError, match="--ptq names \\['nope'\\]"):
        train_kd.parse_config(["--ptq=rtn,nope"])


def test_pipeline_on_a_pretrained_llama_directory(llama_dir, tiny_data, tmp_path, capsys):
    data_dir, _ = tiny_data
    out = tmp_path / "out"
    train_kd.main([f"--init_from={llama_dir}", f"--dataset={data_dir}", f"--out_dir={out}", "--device=cpu",
                   "--block_size=32", "--batch_size=4", "--eval_batches=2", "--calib_batches=2", "--block_steps=3",
                   "--kd_steps=4", "--kd_batch_size=2", "--speculative_every=2", "--ptq=rtn,gptq,lcd-init",
                   "--group_size=None", "--ablate=1", "--sample_tokens=5"])
    text = capsys.readouterr().out
    assert "teacher: Llama from" in text and "block model.layers.1: relative output error" in text
    results = json.loads((out / "results_w2.json").read_text())
    methods = [r["method"] for r in results["rows"]]
    assert methods == ["teacher", "rtn", "gptq", "lcd-init", "kd", "lcd"]
    ablation = {r["method"] for r in results["ablation"]}
    assert "lcd-e2e" in ablation and "lcd-no-density" in ablation
    lcd_curve = results["curves"]["lcd"]
    assert len(lcd_curve["blocks"]) == 2 and lcd_curve["blocks_seconds"] > 0
    assert "lcd-e2e: " in text and "end-to-end steps, the wall time of lcd's blocks" in text
    assert os.path.exists(out / "lcd_w2.pt") and not os.path.exists(out / "distill_lcd_w2.pt")
    student, tokenizer = train_kd.load_student(str(out / "lcd_w2.pt"))
    assert type(student).__name__ == "Llama" and tokenizer == "bytes"
    assert "peak memory" in text


def test_block_wise_distillation_resumes_after_its_last_finished_block(llama_dir, tiny_data, tmp_path, monkeypatch):
    data_dir, meta = tiny_data
    config = train_kd.parse_config([f"--init_from={llama_dir}", f"--dataset={data_dir}", f"--out_dir={tmp_path}",
                                    "--block_size=16", "--batch_size=2", "--calib_batches=2", "--block_steps=2",
                                    "--kd_steps=2", "--kd_batch_size=2", "--speculative_every=0", "--device=cpu"])
    teacher = train_kd.load_pretrained_teacher(llama_dir, meta, log=None)
    train = train_kd.load_tokens(meta["dir"], "train")
    calib, calib_x = train_kd.calibration_data(train, config, 16)
    straight, _, _, _ = train_kd.run_distillation("lcd", teacher, config, train, calib, calib_x, 0, 1, "cpu")
    config["out_dir"] = str(tmp_path / "killed")                       # a fresh directory: no checkpoint yet

    real = train_kd.lcd.reconstruct_blocks

    def dies_in_block_1(*args, checkpoint=None, **kw):   # killed while block 1 trains: block 0 is checkpointed
        def checkpoint_then_die(state):
            checkpoint(state)
            if state["block"] == 1:
                raise KeyboardInterrupt
        return real(*args, checkpoint=checkpoint_then_die, **kw)

    monkeypatch.setattr(train_kd.lcd, "reconstruct_blocks", dies_in_block_1)
    with pytest.raises(train_kd.Interrupted, match="block-wise progress is saved .*block 1 done"):
        train_kd.run_distillation("lcd", teacher, config, train, calib, calib_x, 0, 1, "cpu")
    monkeypatch.setattr(train_kd.lcd, "reconstruct_blocks", real)
    resumed, _, _, _ = train_kd.run_distillation("lcd", teacher, config, train, calib, calib_x, 0, 1, "cpu")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_block_wise_and_end_to_end_stages_take_their_own_learning_rates(llama_dir, tiny_data, tmp_path, monkeypatch):
    data_dir, meta = tiny_data
    config = train_kd.parse_config([f"--init_from={llama_dir}", f"--dataset={data_dir}", f"--out_dir={tmp_path}",
                                    "--block_size=16", "--batch_size=2", "--calib_batches=2", "--block_steps=2",
                                    "--kd_steps=2", "--kd_batch_size=2", "--speculative_every=0", "--device=cpu",
                                    "--block_lr=2e-3", "--block_latent_lr=3e-3", "--kd_lr=4e-4", "--kd_latent_lr=5e-4"])
    teacher = train_kd.load_pretrained_teacher(llama_dir, meta, log=None)
    train = train_kd.load_tokens(meta["dir"], "train")
    calib, calib_x = train_kd.calibration_data(train, config, 16)
    seen, real_blocks, real_distill = [], train_kd.lcd.reconstruct_blocks, train_kd.lcd.distill

    def recorded(stage, real):
        def run(*args, lr, latent_lr, **kw):
            seen.append((stage, lr, latent_lr))
            return real(*args, lr=lr, latent_lr=latent_lr, **kw)
        return run
    monkeypatch.setattr(train_kd.lcd, "reconstruct_blocks", recorded("blocks", real_blocks))
    monkeypatch.setattr(train_kd.lcd, "distill", recorded("e2e", real_distill))
    train_kd.run_distillation("lcd", teacher, config, train, calib, calib_x, 0, 1, "cpu")
    assert seen == [("blocks", 2e-3, 3e-3), ("e2e", 4e-4, 5e-4)]

    config.update(out_dir=str(tmp_path / "diverges"), block_lr=1e30, block_latent_lr=1e30, kd_other_lr=1e30,
                  block_steps=30)      # a divergence while the blocks train names the block-wise rates
    with pytest.raises(train_kd.lcd.Diverged, match=r"lower --block_lr \(now 1e\+30\) and --block_latent_lr"):
        train_kd.run_distillation("lcd", teacher, config, train, calib, calib_x, 0, 1, "cpu")


def test_block_wise_pipeline_under_torchrun(llama_dir, tiny_data, tmp_path):
    data_dir, _ = tiny_data
    with socket.socket() as s:                                  # a free port: other runs may share the host
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(ROOT, "train_kd.py"), f"--init_from={llama_dir}", f"--dataset={data_dir}",
           f"--out_dir={tmp_path}", "--device=cpu", "--block_size=16", "--batch_size=2", "--eval_batches=1",
           "--calib_batches=2", "--block_steps=2", "--kd_steps=2", "--kd_batch_size=2", "--speculative_every=1",
           "--ptq=rtn", "--sample_tokens=0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "block model.layers.1: relative output error" in result.stdout and "lcd: val loss" in result.stdout
    assert os.path.exists(tmp_path / "lcd_w2.pt")


def test_without_the_kd_baseline_only_lcd_is_distilled(monkeypatch):
    ran = []

    def fake_run(method, teacher, config, *args):
        ran.append(method)
        history = dict(loss=[], stages=[], spec_wins={}, spec_checks=0, blocks=[], blocks_seconds=0.0, e2e_seconds=0.0)
        return None, history, 0.0, "none"
    monkeypatch.setattr(train_kd, "run_distillation", fake_run)
    monkeypatch.setattr(train_kd, "result_row", lambda method, *a: dict(method=method, val_loss=0.0))
    for kd_baseline, stop_after, want in ((0, "", ["lcd"]), (1, "", ["kd", "lcd"]), (0, "kd", []), (1, "kd", ["kd"])):
        ran.clear()
        config = train_kd.parse_config([f"--kd_baseline={kd_baseline}", f"--stop_after={stop_after}"])
        monkeypatch.setattr(train_kd, "peak_memory_gib", lambda reset=False: 0.0)
        train_kd.distillation_rows(config, None, None, None, None, {}, 0, 1, "cpu")
        assert ran == want, (kd_baseline, stop_after)
    with pytest.raises(ValueError, match="--kd_baseline must be 0 or 1"):
        train_kd.parse_config(["--kd_baseline=2"])
