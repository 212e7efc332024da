"""What a new user meets: --help, config checks before any work, a teacher reused for other data, Ctrl-C,
output names and file modes, a packed student that loads by itself from its header, generated text."""
import json
import os
import re
import stat

import pytest
import torch

import configurator
import bench
import lcd
import packed_model
import model as model_lib
import prepare
import train_kd
from conftest import TEXT
from model import GPT, SIZES


def tiny_gpt(seed=0, vocab_size=256):
    torch.manual_seed(seed)
    return GPT(dict(SIZES["tiny"], vocab_size=vocab_size)).eval()


# ---- the config: --help and the checks that come before any work -------------------------------------

def test_help_lists_every_key_with_its_default_and_meaning(capsys):
    train_kd.main(["--help"])
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("  --")]
    assert len(lines) == len(train_kd.CONFIG_KEYS)
    for key in train_kd.CONFIG_KEYS:
        default = getattr(train_kd, key)
        shown = default if isinstance(default, str) and default and default.isprintable() and " " not in default \
            else (repr(default) if isinstance(default, str) else default)
        line, = [line for line in lines if line.startswith(f"  --{key}=")]
        assert line.startswith(f"  --{key}={shown} "), (key, line)
        assert line[len(f"  --{key}={shown} "):].strip(), f"{key} has no meaning"   # the comment follows
    assert "teacher training:" in text                                    # the groups' headings
    train_kd.main(["-h"])
    assert capsys.readouterr().out == text


def test_describe_config_reads_name_value_comment_lines(tmp_path):
    source = tmp_path / "script.py"
    source.write_text('# sizes\nwidth = 8   # channels\nname = "a b"  # a name\n\ndef f():\n    width = 3  # no\n')
    text = configurator.describe_config(str(source), {"width": 8, "name": "a b"})
    assert text.splitlines() == ["sizes:", "  --width=8".ljust(34) + " channels",
                                 "  --name='a b'".ljust(34) + " a name"]


@pytest.mark.parametrize("arg, words", [
    ("--group_size=0", "positive number of inputs"), ("--group_size=-3", "positive number of inputs"),
    ("--group_size=1000", "wider than the model's narrowest layer input \\(128"),
    ("--group_size=7", "multiple of 16.*9.1 bits a weight"), ("--group_size=40", "multiple of 16"),
    ("--kd_tau=0", "--kd_tau must be > 0"), ("--kd_tau=-1", "--kd_tau must be > 0"),
    ("--learning_rate=0", "--learning_rate must be > 0"), ("--kd_lr=1e999", "finite"),
    ("--block_lr=0", "--block_lr must be > 0"), ("--block_latent_lr=-1e-3", "--block_latent_lr must be > 0"),
    ("--batch_size=0", "--batch_size must be >= 1"), ("--calib_batches=0", "--calib_batches must be >= 1"),
    ("--eval_batches=0", "--eval_batches must be >= 1"), ("--max_iters=0", "--max_iters must be >= 1"),
    ("--kd_steps=0", "--kd_steps must be >= 1"), ("--n_layer=0", "--n_layer must be >= 1"),
    ("--final_frac=0", "final_frac must lie in \\(0.0, 1.0\\]"), ("--dropout=1", "dropout must lie in"),
    ("--warmup_iters=-1", ">= 0"), ("--min_lr=1", "above --learning_rate"), ("--ablate=2", "0 or 1"),
    ("--stop_after=kdd", "--stop_after must be one of"), ("--device=gpu", "not a torch device"),
    ("--n_head=3", "not divisible by n_head=3"), ("--init_from=/no/such/dir", "not a checkpoint name.*a .gguf file.*model.safetensors"),
    ("--sample_top_k=-1", "--sample_top_k must be >= 0"),
])
def test_bad_values_are_refused_before_any_work(arg, words):
    with pytest.raises(ValueError, match=words):
        train_kd.parse_config([arg])


def test_group_sizes_that_are_accepted_and_the_width_of_the_preset():
    assert train_kd.parse_config(["--group_size=64"])["group_size"] == 64
    assert train_kd.parse_config(["--group_size=32", "--preset=tiny"])["group_size"] == 32
    assert train_kd.parse_config(["--group_size=None"])["group_size"] is None
    with pytest.raises(ValueError, match="at least 48"):                       # 16 * 8 / 32 = 4 > 3 bits
        train_kd.parse_config(["--group_size=32", "--bits=3"])
    with pytest.raises(ValueError, match="narrowest layer input \\(32"):       # tiny's n_embd is 32
        train_kd.parse_config(["--group_size=64", "--preset=tiny"])
    with pytest.raises(ValueError, match="narrowest layer input \\(48"):       # an explicit width wins
        train_kd.parse_config(["--group_size=64", "--preset=tiny", "--n_embd=48"])


# ---- a saved teacher is not reused for other data ----------------------------------------------------

def test_a_teacher_of_other_data_is_refused(tiny_data, tiny_teacher, tmp_path, capsys):
    data_dir, meta = tiny_data
    other = prepare.prepare(name="other", tokenizer="bytes", input=str(_write(tmp_path / "o.txt", TEXT[::-1])),
                            out_root=str(tmp_path))
    path = str(tmp_path / "out" / "teacher.pt")
    train_kd.save_teacher(tiny_teacher[0], path, train_kd.teacher_data(dict(dataset=data_dir), meta))
    args = [f"--dataset={other}", f"--out_dir={tmp_path / 'out'}", "--preset=tiny", "--stop_after=teacher",
            "--batch_size=4", "--eval_batches=1"]
    with pytest.raises(RuntimeError, match=f"trained on other data \\(dataset='{re.escape(data_dir)}'.*than this "
                                           f"run reads \\(dataset='{re.escape(other)}'.*another --out_dir.*delete"):
        train_kd.main(args)
    train_kd.main(args[1:] + [f"--dataset={data_dir}"])                       # its own data: reused
    assert "teacher: loaded" in capsys.readouterr().out

    wanted = train_kd.teacher_data(dict(dataset="gpt2data"), dict(tokenizer="gpt2", vocab_size=50257))
    with pytest.raises(RuntimeError, match="vocabulary of 256 tokens.*'gpt2' tokens \\(vocabulary 50257\\)"):
        train_kd.check_teacher_data(None, wanted, 256, path)                 # an old teacher.pt, no record
    old = train_kd.teacher_data(dict(dataset=data_dir), meta)
    train_kd.check_teacher_data(None, old, 256, path)                         # old and fitting: a note
    assert "does not record the dataset" in capsys.readouterr().out


def _write(path, text):
    path.write_text(text)
    return path


# ---- Ctrl-C, progress lines -------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["get_batch", "after the update"])
def test_ctrl_c_in_the_teacher_saves_that_step_and_says_where(tiny_data, tmp_path, monkeypatch, where):
    data_dir, meta = tiny_data
    args = ["--preset=tiny", "--max_iters=6", "--ckpt_interval=100", "--batch_size=4", "--warmup_iters=2"]
    straight = train_kd.train_teacher(train_kd.parse_config(args + [f"--out_dir={tmp_path / 'a'}"]), meta)
    config = train_kd.parse_config(args + [f"--out_dir={tmp_path / 'b'}"])
    real_get_batch, real_update, calls = train_kd.get_batch, train_kd.Progress.update, []

    def ctrl_c_in_step_5(*a, **kw):        # before step 5's update: saved at its start, step 4
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_get_batch(*a, **kw)

    def ctrl_c_after_update_5(self, step, *a, **kw):   # after step 5's update: saved as 5 steps done
        if step == 4:
            raise KeyboardInterrupt
        return real_update(self, step, *a, **kw)

    if where == "get_batch":
        monkeypatch.setattr(train_kd, "get_batch", ctrl_c_in_step_5)
    else:
        monkeypatch.setattr(train_kd.Progress, "update", ctrl_c_after_update_5)
    saved_at = 4 if where == "get_batch" else 5
    with pytest.raises(train_kd.Interrupted, match=f"teacher_ckpt.pt \\(step {saved_at} of 6\\); run the same"):
        train_kd.train_teacher(config, meta)                  # no periodic checkpoint came (interval 100)
    monkeypatch.undo()
    assert train_kd.load_checkpoint(str(tmp_path / "b" / "teacher_ckpt.pt"))["step"] == saved_at
    resumed = train_kd.train_teacher(config, meta)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_ctrl_c_elsewhere_says_what_is_done(tiny_data, tiny_teacher, tmp_path, monkeypatch):
    data_dir, _ = tiny_data
    train_kd.save_teacher(tiny_teacher[0], str(tmp_path / "teacher.pt"))

    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_kd, "calibration_data", ctrl_c)
    with pytest.raises(train_kd.Interrupted, match=f"saves nothing; what is done is in {re.escape(str(tmp_path))}/"):
        train_kd.main([f"--dataset={data_dir}", f"--out_dir={tmp_path}", "--preset=tiny", "--eval_batches=1",
                       "--batch_size=4"])


def test_log_interval_is_the_configs(tiny_data, tmp_path, capsys):
    _, meta = tiny_data
    for interval, lines in ((0.0, 4), (1000.0, 2)):    # every step, or only the first and the last
        config = train_kd.parse_config(["--preset=tiny", "--max_iters=4", "--batch_size=2", "--warmup_iters=1",
                                        f"--log_interval={interval}", f"--out_dir={tmp_path / str(interval)}"])
        train_kd.train_teacher(config, meta)
        assert capsys.readouterr().out.count("teacher ") == lines


# ---- file modes, output names -----------------------------------------------------------------------

def test_every_atomic_writer_gives_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        model = lcd.quantize(tiny_gpt(), 2, method="rtn")
        packed_model.save_quantized(model, str(tmp_path / "packed.pt"))
        train_kd.atomic_save({"a": 1}, str(tmp_path / "ckpt.pt"))
        train_kd.write_json({"a": 1}, str(tmp_path / "results.json"))
        bench.write_json(str(tmp_path / "bench.json"), {"a": 1})
    finally:
        os.umask(old)
    for name in ("packed.pt", "ckpt.pt", "results.json", "bench.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "ckpt.pt", "packed.pt", "results.json"]  # no temp left


def test_outputs_are_named_by_bits_group_and_activation_bits(tmp_path):
    assert train_kd.run_tag(dict(bits=2, group_size=None, a_bits=None)) == "w2"      # the old name stays
    assert train_kd.run_tag(dict(bits=2, group_size=64, a_bits=None)) == "w2_g64"
    assert train_kd.run_tag(dict(bits=3, group_size=None, a_bits=8)) == "w3_a8"
    assert train_kd.replaced(str(tmp_path / "x")) == ""
    (tmp_path / "x").write_text("")
    assert "replaced" in train_kd.replaced(str(tmp_path / "x"))


def test_pipeline_names_its_outputs_and_ends_with_a_text_sample(tiny_data, tiny_teacher, tmp_path, capsys):
    data_dir, meta = tiny_data
    train_kd.save_teacher(tiny_teacher[0], str(tmp_path / "teacher.pt"))
    train_kd.main([f"--dataset={data_dir}", f"--out_dir={tmp_path}", "--preset=tiny", "--device=cpu",
                   "--kd_steps=3", "--kd_batch_size=2", "--batch_size=4", "--calib_batches=1", "--eval_batches=1",
                   "--speculative_every=0", "--kd_warmup=1", "--group_size=32", "--sample_tokens=12"])
    out = capsys.readouterr().out
    assert {"lcd_w2_g32.pt", "results_w2_g32.json", "results.json"} <= set(os.listdir(tmp_path))
    results = json.loads((tmp_path / "results_w2_g32.json").read_text())
    assert results == json.loads((tmp_path / "results.json").read_text())
    sample = results["sample"]
    assert sample["prompt"] == train_kd.sample_prompt and sample["seed"] == train_kd.seed
    assert len(sample["texts"]) == 2 and all(t["tokens"] == 12 and t["text"] for t in sample["texts"].values())
    assert "--- teacher:" in out and "--- packed 2-bit student" in out and out.index("text sample") > out.index(
        "LCD report")
    header = packed_model.quantized_header(str(tmp_path / "lcd_w2_g32.pt"))
    assert header["tokenizer"] == "bytes" and header["version"] == 1
    assert header["model_config"] == dict(architecture="gpt", **vars(tiny_teacher[0].config))


# ---- a packed student is a checkpoint on its own ----------------------------------------------------

def test_a_packed_student_loads_by_itself_from_its_header(tmp_path):
    model = lcd.quantize(tiny_gpt(), 2, 32, method="kmeans")
    path = str(tmp_path / "lcd_w2.pt")
    packed_model.save_quantized(model, path, model_config=model_lib.config_dict(model), tokenizer="bytes")
    loaded = packed_model.load_quantized(model_lib.from_config, path)           # no architecture built by hand
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(loaded(x)[0], model(x)[0])
    student, tokenizer = train_kd.load_student(path)
    assert tokenizer == "bytes" and torch.equal(student(x)[0], model(x)[0])

    old = str(tmp_path / "old.pt")                                     # a file as written before: no config
    packed_model.save_quantized(model, old)
    with pytest.raises(ValueError, match="stores no model configuration.*build the original architecture"):
        packed_model.load_quantized(model_lib.from_config, old)
    assert torch.equal(packed_model.load_quantized(tiny_gpt(seed=1), old)(x)[0], model(x)[0])   # into a given model
    teacher = str(tmp_path / "teacher.pt")
    train_kd.save_teacher(tiny_gpt(seed=2), teacher)
    student, tokenizer = train_kd.load_student(old, teacher_path=teacher)          # its teacher's architecture
    assert tokenizer == "bytes" and torch.equal(student(x)[0], model(x)[0])

    for bad, words in ((dict(n_layer=2), "no architecture"), (dict(architecture="gpt", f=[1]), "plain values")):
        with pytest.raises(ValueError, match=words):
            packed_model.save_quantized(model, path, model_config=bad)
    with pytest.raises(ValueError, match="architecture one of.*got 'llama9'"):
        packed_model.save_quantized(model, path, model_config=dict(architecture="llama9"))
        packed_model.load_quantized(model_lib.from_config, path)


# ---- generated text ---------------------------------------------------------------------------------

def test_sample_texts_same_seed_same_text_and_clear_errors(capsys):
    a, b = tiny_gpt(seed=3), tiny_gpt(seed=3)
    samples = train_kd.sample_texts({"a": a, "b": b}, "bytes", "O Romeo", 10, temperature=1.0, top_k=5, seed=7)
    assert samples["a"]["text"] == samples["b"]["text"] and samples["a"]["tokens_per_s"] > 0
    again = train_kd.sample_texts({"a": a}, "bytes", "O Romeo", 10, temperature=1.0, top_k=5, seed=7)
    assert again["a"]["text"] == samples["a"]["text"]
    torch.manual_seed(7)
    ids = a.generate(torch.tensor([list(b"O Romeo")]), 10, temperature=1.0, top_k=5)[0, 7:]
    assert samples["a"]["text"] == bytes(ids.tolist()).decode("utf-8", errors="replace")
    assert "--- a:" in capsys.readouterr().out
    with pytest.raises(ValueError, match="prompt is empty"):
        train_kd.sample_texts({"a": a}, "bytes", "", 5)
    with pytest.raises(ValueError, match="token id 122 is outside the vocabulary of 64"):
        train_kd.sample_texts({"small": tiny_gpt(vocab_size=64)}, "bytes", "z", 5)


def test_bench_generate_from_a_student_file_and_its_teacher(tmp_path, monkeypatch, capsys):
    teacher = tiny_gpt(seed=4)
    train_kd.save_teacher(teacher, str(tmp_path / "teacher.pt"))
    student = lcd.quantize(tiny_gpt(seed=4), 2, method="rtn")
    packed_model.save_quantized(student, str(tmp_path / "lcd_w2.pt"), model_config=model_lib.config_dict(student),
                       tokenizer="bytes")
    for key in ("generate", "teacher", "prompt", "max_new_tokens", "seed", "json"):
        monkeypatch.setattr(bench, key, getattr(bench, key))           # restored after the test
    results = bench.main([f"--generate={tmp_path / 'lcd_w2.pt'}", f"--teacher={tmp_path / 'teacher.pt'}",
                          "--prompt=ROMEO:\\nO", "--max_new_tokens=6", "--seed=5"])
    texts = results["generate"]["texts"]
    assert results["generate"]["prompt"] == "ROMEO:\nO" and len(texts) == 2
    assert all(t["tokens"] == 6 and t["tokens_per_s"] > 0 for t in texts.values())
    assert capsys.readouterr().out.count("tokens/s ---") == 2
    packed_model.save_quantized(student, str(tmp_path / "old.pt"))
    with pytest.raises(SystemExit, match="stores no model configuration.*--teacher="):
        bench.main([f"--generate={tmp_path / 'old.pt'}", "--teacher="])


def test_bench_flags_say_did_you_mean_and_help_has_no_empty_header(capsys):
    with pytest.raises(SystemExit, match=r"unknown option --figure: did you mean --figures\b"):
        bench.apply_overrides(["--figure"])
    with pytest.raises(SystemExit, match=r"did you mean --quality\b"):
        bench.apply_overrides(["--qualty=1"])
    text = bench.usage()
    assert "options:\nconfig" not in text and "\n\n\n" not in text
    assert text.splitlines()[3].startswith("  --") or text.splitlines()[3].endswith(":")   # a heading or a key
