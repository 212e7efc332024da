"""bench.py: the figures (smoothing, each figure drawn from run outputs of the right shape), the quality
table, the command line."""
import json
import math
import os
import shutil
import subprocess

import pytest
import torch

import bench
import train_kd
from conftest import ROOT


def test_smoothed_is_unbiased_and_follows_a_step():
    assert bench.smoothed([2.0] * 5) == pytest.approx([2.0] * 5)        # no pull towards 0 at the start
    curve = bench.smoothed([1.0] * 50 + [0.0] * 400)
    assert curve[49] == pytest.approx(1.0) and curve[-1] < 1e-3
    assert all(b <= a + 1e-12 for a, b in zip(curve, curve[1:]))       # never rises after the step down


def test_figures_are_drawn_from_the_runs_json(tiny_data, tiny_teacher, tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot", reason="matplotlib is an optional dependency")
    rows = [dict(method="teacher", bits=32, bits_per_weight=32.0, val_loss=1.0, ppl=2.7, trained=False, seconds=0)]
    rows += [dict(method=m, bits=b, bits_per_weight=b + 0.3, val_loss=1.1, ppl=3.0 + 1 / b, trained=m == "lcd",
                  seconds=1.0) for m in ("rtn", "lcd") for b in (2, 3)]
    curves = {"kd": dict(loss=[1.0 / (i + 1) for i in range(60)], stages=[[0, 4]]),
              "lcd+progressive": dict(loss=[1.0 / (i + 2) for i in range(60)], stages=[[0, 8], [20, 4]])}
    (tmp_path / "quality.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "results.json").write_text(json.dumps({"curves": curves}))
    bench.figure_ppl_vs_bits(plt, rows, tmp_path / "ppl.png")
    bench.figure_kd_curves(plt, curves, tmp_path / "curves.png")
    teacher, meta = tiny_teacher
    calib, _ = train_kd.calibration_data(train_kd.load_tokens(meta["dir"], "train"),
                                         dict(seed=0, batch_size=4, calib_batches=2, kd_batch_size=4), 32)
    bench.figure_centroids(plt, teacher, calib, 2, tmp_path / "centroids.png")
    for name in ("ppl.png", "curves.png", "centroids.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bare_flags_switch_a_part_on_and_bad_keys_are_refused():
    saved = dict(quality=bench.quality, bits=bench.bits, quality_bits=bench.quality_bits)
    try:
        bench.apply_overrides(["--quality", "--bits=3"])
        assert bench.quality == 1 and bench.bits == 3
        for bad in (["--bits"], ["--nope=1"], ["--bits=two"], ["--bits=5"]):
            with pytest.raises(SystemExit):
                bench.apply_overrides(bad)
        for bad in ("x", "5", "2,,3"):
            with pytest.raises(SystemExit, match="--quality_bits"):
                bench.apply_overrides([f"--quality_bits={bad}"])
    finally:
        for key, value in saved.items():
            setattr(bench, key, value)


# ---- the quality comparison -----------------------------------------------------------------------

def test_quality_table_rows(tiny_teacher, tmp_path):
    teacher, meta = tiny_teacher
    train_kd.save_teacher(teacher, str(tmp_path / "teacher.pt"))        # quality_table loads it from out_dir
    so_far = []                                                          # what --json saves as rows finish
    rows = bench.quality_table(bits_list=(2,), methods=("teacher", "rtn", "gptq"), trained=False,
                               log=lambda *a: None, on_row=lambda r: so_far.append([x["method"] for x in r]),
                               dataset=meta["dir"], out_dir=str(tmp_path),
                               preset="tiny", device="cpu", eval_batches=2, calib_batches=1, batch_size=4)
    assert [r["method"] for r in rows] == ["teacher", "rtn", "gptq"]
    for r in rows:
        assert set(r) == {"method", "bits", "bits_per_weight", "bytes", "val_loss", "ppl", "trained", "seconds"}
        assert r["val_loss"] > 0 and r["ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["trained"] is False
    assert rows[0]["bits_per_weight"] == 32 and all(2 < r["bits_per_weight"] < 4 for r in rows[1:])
    assert rows[2]["val_loss"] < rows[1]["val_loss"]          # GPTQ beats RTN at the same bits
    assert so_far == [["teacher"], ["teacher", "rtn"], ["teacher", "rtn", "gptq"]]


# ---- the command line: --help, group_size, prerequisites first -------------------------------------

def test_help_lists_every_key_with_its_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.apply_overrides(["-h"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    lines = {line.split()[0].split("=")[0]: line for line in text.splitlines() if line.startswith("  --")}
    assert sorted(lines) == sorted(f"--{key}" for key in bench.CONFIG_KEYS)
    assert "--group_size=None" in lines["--group_size"] and "one codebook per row" in lines["--group_size"]
    assert f"--cpu_reps={bench.cpu_reps}" in lines["--cpu_reps"] and "repetitions" in lines["--cpu_reps"]


def test_describe_config_reads_the_comments_and_refuses_a_key_without_one(tmp_path):
    source = tmp_path / "script.py"
    source.write_text('name = "a # b"   # what it means\ncount = 3\nratio = 0.5  # a ratio\n')
    text = bench.configurator.describe_config(str(source), {"name": "a # b", "ratio": 0.5})
    assert text.splitlines() == ["  --name='a # b'".ljust(34) + " what it means", "  --ratio=0.5".ljust(34) + " a ratio"]
    with pytest.raises(ValueError, match="count"):
        bench.configurator.describe_config(str(source), {"count": 3})


def test_group_size_none_is_one_codebook_per_row_and_zero_is_refused():
    saved = bench.group_size
    try:
        bench.apply_overrides(["--group_size=64"])
        assert bench.group_size == 64
        bench.apply_overrides(["--group_size=None"])
        assert bench.group_size is None
        for bad in ("0", "-3", "1.5", "x"):
            with pytest.raises(SystemExit, match="group_size"):
                bench.apply_overrides([f"--group_size={bad}"])
    finally:
        bench.group_size = saved


def test_figures_check_their_inputs_before_any_work(tmp_path, capsys):
    try:
        import matplotlib  # noqa: F401
        has_matplotlib = True
    except ImportError:
        has_matplotlib = False
    saved = dict(out_dir=bench.out_dir, quality=bench.quality, json=bench.json)
    try:
        bench.out_dir, bench.quality, bench.json = str(tmp_path), 0, ""
        with pytest.raises(SystemExit, match="nothing to draw"):
            bench.check_figures()
        capsys.readouterr()
        (tmp_path / "results.json").write_text(json.dumps({"curves": {}}))
        if has_matplotlib:
            bench.check_figures()                                 # one input is there: no exit
        else:
            with pytest.raises(SystemExit, match="pip install matplotlib"):
                bench.check_figures()
        out = capsys.readouterr().out
        assert "skipping ppl_vs_bits.png" in out and "skipping centroids.png" in out and "kd_curves" not in out
    finally:
        for key, value in saved.items():
            setattr(bench, key, value)


def test_cpu_table_times_every_shape_and_batch(capsys):
    saved = dict(cpu_shapes=bench.cpu_shapes, cpu_batches=bench.cpu_batches, cpu_reps=bench.cpu_reps)
    try:
        bench.cpu_shapes, bench.cpu_batches, bench.cpu_reps = "48x64,30x40", "1,5", 2
        numbers = bench.bench_reference_cpu()
    finally:
        for key, value in saved.items():
            setattr(bench, key, value)
    assert [(tuple(r["shape"]), r["batch"]) for r in numbers] == [((48, 64), 1), ((48, 64), 5), ((30, 40), 1),
                                                                   ((30, 40), 5)]
    assert all(r["dense_ms"] > 0 and r["lut_reference_ms"] > 0 for r in numbers)
    assert [r["path"] for r in numbers] == ["partial sums", "built W"] * 2
    assert "CPU, measured here" in capsys.readouterr().out


def test_figures_never_write_over_tracked_files():
    """--figures writes into out_dir (out/ by default), which git ignores: a student's clone stays clean."""
    for figure, source, command in bench.figure_inputs():
        assert os.path.dirname(os.path.join(bench.out_dir, figure)) == bench.out_dir
    if shutil.which("git") and os.path.isdir(os.path.join(ROOT, ".git")):
        tracked = subprocess.run(["git", "ls-files", bench.out_dir], cwd=ROOT, capture_output=True, text=True)
        ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(bench.out_dir, "ppl_vs_bits.png")], cwd=ROOT)
        assert tracked.stdout == "" and ignored.returncode == 0


class Writes:
    """A stream that keeps each write apart (to see an answer arrive token by token)."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def test_the_chat_loop_streams_each_answer_and_stops_at_an_empty_line(monkeypatch):
    import io

    import checkpoints
    import lcd_kernels
    from test_llama import tiny_llama
    by_byte = sorted(checkpoints.gpt2_byte_alphabet().items(), key=lambda kv: kv[1])   # the 256 single bytes
    enc = checkpoints.bpe_tokenizer("t", [c for c, _ in by_byte] + ["<|im_start|>", "<|im_end|>"], [], {256, 257},
                                    "gpt2")
    enc.chat = {"form": "chatml", "system": None, "end": "<|im_end|>"}
    monkeypatch.setattr(train_kd, "get_tokenizer", lambda name: enc)
    model = tiny_llama(vocab_size=258, block_size=128)
    lcd_kernels.attach_decode_step(model)                                   # the C step, where kernels.c builds
    out = Writes()
    results = bench.chat_loop({"student": model}, "t", 12, lines=io.StringIO("Hi there\nWhat is 1+1?\n\nunread\n"),
                              out=out)
    assert [r["question"] for r in results] == ["Hi there", "What is 1+1?"]   # the empty line ended the loop
    for r in results:
        ids = checkpoints.chat_ids(enc, [{"role": "user", "content": r["question"]}])
        new = model.generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
        new = new[:next((i for i, t in enumerate(new) if t == 257), len(new))]
        answer = r["answers"]["student"]
        assert answer["text"] == enc.decode(new).strip() and answer["tokens"] >= len(new) >= 1
    text = "".join(out.writes)
    assert text.count("tokens/s") == 2 and text.count("you: ") == 3
    streamed = [w for w in out.writes if w and w not in ("student: ",) and "tokens/s" not in w and "you" not in w]
    assert len(streamed) >= len(new)                                    # one write a token, not one an answer
    assert bench.chat_loop({"student": model}, "t", 5, lines=io.StringIO(""), out=Writes()) == []   # EOF at once


def test_bytes_per_token_counts_what_a_token_reads():
    """One row of the input embedding; a tied head's whole table once; the Q8_0 head whole; 3-bit layers as
    the C kernels read them (R3, 3 words per 32 weights); the KV cache up to the position."""
    import lcd
    import packed_model
    from test_llama import tiny_llama
    teacher = tiny_llama(tie_embeddings=True)
    c = teacher.config
    kv = 2 * 4 * c.n_layer * c.n_kv_head * (c.n_embd // c.n_head) * 10
    row = 4 * c.n_embd
    weights = sum(p.numel() * 4 for p in teacher.parameters())          # parameters() lists a tied table once
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight
    assert bench.bytes_per_token(teacher, 10) == weights + row + kv
    for bits in (2, 3):
        student = packed_model.quantize_head(lcd.quantize(tiny_llama(tie_embeddings=True), bits, method="rtn"))
        table = student.model.embed_tokens.weight
        stored = {t.data_ptr(): t for t in list(student.parameters()) + list(student.buffers())}
        expect = sum(t.numel() * t.element_size() for t in stored.values()) - table.numel() * 4 + row + kv
        for m in student.modules():
            if isinstance(m, packed_model.LUTLinear) and bits == 3:     # 10 a word stored, 32 per 3 words read
                expect += 4 * m.out_features * (3 * -(-m.in_features // 32) - -(-m.in_features // 10))
        assert isinstance(student.lm_head, packed_model.Q8Linear)
        assert bench.bytes_per_token(student, 10) == expect
