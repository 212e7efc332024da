"""Bad inputs from the field, round 2: generation, the tokenizer, GGUF / Hugging Face metadata,
resume, NaN, full disks. Each kind is a small input a new user would try; messages are matched by their
key words.

  1. an empty prompt                    8. an untied HF config without its head
  2. top_k / temperature out of range   9. resume with other bits, group size, method or shape
  3. a dataset of another tokenizer    10. NaN in the middle of distillation
  4. every encode path of the tokenizer 11. a full disk while saving; stale temp files
  5. a GGUF without tokenizer.ggml.pre  12. an unwritable --out_dir
  6. a big-endian GGUF                  13. saving a student before freeze()
  7. GGUF / HF metadata vs the tensors  14. safetensors dtypes; integers in float weights
"""
import copy
import errno
import json
import math
import os
import struct

import numpy as np
import pytest
import torch

import bench
import checkpoints
import lcd
import packed_model
import train_kd
from conftest import ROOT
from model import GPT, SIZES, Llama, LlamaConfig
from test_gguf import STRING, gguf_file
from test_llama import hf_config, hf_tensors, llama_gguf_parts, tiny_llama
from test_model import write_safetensors


def tiny_gpt(seed=0, vocab=64):
    torch.manual_seed(seed)
    return GPT(dict(SIZES["tiny"], vocab_size=vocab)).eval()


def small_llama(seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                             intermediate_size=24)).eval()


def calib(vocab=64, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(n)]


def stream(vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab, (2, 16), generator=g)


# ---- 1. an empty prompt ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_gpt, small_llama])
def test_an_empty_prompt_is_one_clear_error_for_both_models(make):
    m = make()
    with pytest.raises(ValueError, match="the prompt is empty"):
        m.generate(torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match=r"\(B, T\) tensor of token ids"):
        m.generate(torch.zeros(3, dtype=torch.long), 5)


def test_bench_and_train_kd_refuse_an_empty_prompt_before_any_work(tmp_path, monkeypatch):
    for key in ("generate", "teacher", "prompt", "json", "_GIVEN"):
        monkeypatch.setattr(bench, key, getattr(bench, key))
    with pytest.raises(SystemExit, match="prompt is empty"):        # before the (missing) file is opened
        bench.main([f"--generate={tmp_path / 'nothing.pt'}", "--prompt="])
    with pytest.raises(ValueError, match="--sample_prompt is empty"):
        train_kd.parse_config(["--sample_prompt="])
    assert train_kd.parse_config(["--sample_prompt=", "--sample_tokens=0"])["sample_prompt"] == ""


# ---- 2. top_k and temperature ------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_gpt, small_llama])
def test_top_k_zero_none_and_larger_than_the_vocabulary_all_mean_off(make):
    m, idx = make(), torch.tensor([[1, 2, 3]])
    off = m.generate(idx, 6, top_k=None, seed=3)
    assert torch.equal(m.generate(idx, 6, top_k=0, seed=3), off)
    assert torch.equal(m.generate(idx, 6, top_k=10 ** 6, seed=3), off)
    assert torch.equal(m.generate(idx, 6, top_k=np.int64(64), seed=3), off)
    one = m.generate(idx, 6, top_k=1, seed=3)                           # k = 1 is greedy
    assert torch.equal(one, m.generate(idx, 6, temperature=0))
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="top_k must be an int >= 1.*0 / None"):
            m.generate(idx, 3, top_k=bad)


def test_temperature_zero_is_greedy_and_negative_or_nan_is_an_error():
    m, idx = tiny_gpt(), torch.tensor([[5, 6]])
    greedy = m.generate(idx, 5, temperature=0, seed=1)
    assert torch.equal(greedy, m.generate(idx, 5, temperature=0, seed=2, top_k=3))   # no sampling at all
    x = idx
    for _ in range(5):                                                  # argmax, one token at a time
        x = torch.cat([x, m(x)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, x)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            m.generate(idx, 2, temperature=bad)


# ---- 3. a dataset of another tokenizer --------------------------------------------------------------

class FakeEnc:
    def __init__(self, n_vocab):
        self.n_vocab = n_vocab


def test_a_dataset_of_another_tokenizer_is_refused_naming_both():
    meta = dict(dir="data/shakespeare", tokenizer="bytes", vocab_size=256)
    with pytest.raises(RuntimeError, match=r"'bytes' tokens \(vocabulary 256\).*'smollm2''s tokenizer "
                                           r"\(vocabulary 49152\).*do not match.*--tokenizer=smollm2"):
        train_kd.check_teacher_tokenizer(meta, "smollm2", "smol.gguf", 49152, FakeEnc(49152))
    with pytest.raises(RuntimeError, match=r"vocabulary 256.*model vocabulary 300.*do not match"):
        train_kd.check_teacher_tokenizer(meta, "/some/dir", "/some/dir", 300, None)   # a 300-id GPT, no tokenizer
    train_kd.check_teacher_tokenizer(meta, "/some/dir", "/some/dir", 256, None)       # its own: accepted
    smol = dict(meta, tokenizer="smollm2", vocab_size=49152)
    train_kd.check_teacher_tokenizer(smol, "smollm2", "smol.gguf", 49152, FakeEnc(49152))


def test_decoding_a_sample_never_crashes_on_an_id_the_tokenizer_lacks(monkeypatch):
    enc = train_kd.get_tokenizer("bytes")
    assert train_kd.decode_safely(enc, [72, 105, 289]) == ("Hi\ufffd", [289])
    m = tiny_gpt(vocab=300)
    monkeypatch.setattr(m, "generate", lambda idx, n, **kw: torch.cat([idx, torch.full((1, n), 289)], 1))
    lines = []
    out = train_kd.sample_texts({"big": m}, "bytes", "O", 3, log=lines.append)
    assert out["big"]["text"] == "\ufffd" * 3
    assert any("3 token id(s) the 'bytes' tokenizer has no entry for (first 289" in line for line in lines)


# ---- 4. every encode path of the GGUF tokenizer -----------------------------------------------------------

def byte_tokenizer_without(missing=4):
    chars = {b: c for c, b in checkpoints.gpt2_byte_alphabet().items()}
    tokens = [chars[b] for b in range(256) if b != missing]
    return checkpoints.bpe_tokenizer("t.gguf", tokens, [], set(), "gpt2")


@pytest.mark.parametrize("call", [
    lambda e: e.encode("a\x04b"), lambda e: e.encode_ordinary("a\x04b"), lambda e: e.encode_batch(["ok", "a\x04b"]),
    lambda e: e.encode_ordinary_batch(["a\x04b"]), lambda e: e.encode_to_numpy("a\x04b"),
    lambda e: e.encode_with_unstable("a\x04b"), lambda e: e.encode_single_token("\x04"),
    lambda e: e.encode_single_token(b"\x04"), lambda e: e._encode_single_piece("a\x04"),
    lambda e: e._encode_only_native_bpe("a\x04"), lambda e: e._encode_bytes(b"a\x04")])
def test_every_encode_path_gives_the_same_clear_error(call):
    enc = byte_tokenizer_without(4)
    with pytest.raises(ValueError, match="tokenizer t.gguf: the vocabulary has no token for the byte"):
        call(enc)
    assert list(enc.encode_to_numpy("ab")) == enc.encode("ab") and enc.encode_single_token("a") == enc.encode("a")[0]


# ---- 5. a GGUF without tokenizer.ggml.pre -----------------------------------------------------------------

def tokenizer_metadata(**kw):
    chars = {b: c for c, b in checkpoints.gpt2_byte_alphabet().items()}
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [chars[b] for b in range(256)],
            "tokenizer.ggml.merges": [], **kw}


def test_a_gguf_without_or_with_an_unknown_pre_tokenizer_is_never_silent():
    with pytest.warns(UserWarning, match="no tokenizer.ggml.pre.*ASSUMING GPT-2's pre-tokenizer"):
        enc = checkpoints.gguf_tokenizer("old.gguf", tokenizer_metadata())
    assert enc.decode(enc.encode("1. 2 lords")) == "1. 2 lords"
    with pytest.raises(ValueError, match="old.gguf: tokenizer.ggml.pre = 'qwen2'.*does not know.*smollm"):
        checkpoints.gguf_tokenizer("old.gguf", tokenizer_metadata(**{"tokenizer.ggml.pre": "qwen2"}))
    smol = checkpoints.gguf_tokenizer("new.gguf", tokenizer_metadata(**{"tokenizer.ggml.pre": "smollm"}))
    gpt2 = checkpoints.gguf_tokenizer("new.gguf", tokenizer_metadata(**{"tokenizer.ggml.pre": "gpt-2"}))
    assert smol._pat_str == checkpoints.SMOLLM_PATTERN and gpt2._pat_str == checkpoints.GPT2_PATTERN


def test_the_real_smollm2_gguf_names_its_pre_tokenizer():
    path = os.path.join(ROOT, "data", "cache", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        pytest.skip("the SmolLM2 GGUF is not in data/cache")
    metadata, _ = checkpoints.read_gguf(path, dequantize=False)
    assert checkpoints.gguf_pre_tokenizer(path, metadata) == "smollm"


# ---- 6. a big-endian GGUF ---------------------------------------------------------------------------------

def test_a_big_endian_gguf_is_named_as_such(tmp_path):
    raw = bytearray(gguf_file([("general.architecture", STRING, "llama")]))
    raw[4:8] = struct.pack(">I", 3)
    (tmp_path / "be.gguf").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="be.gguf: a big-endian GGUF file.*50331648 little-endian, 3 swapped"):
        checkpoints.read_gguf(str(tmp_path / "be.gguf"))


# ---- 7. metadata that contradicts the tensors ----------------------------------------------------------

def llama_gguf(src, **override):
    return gguf_file(*llama_gguf_parts(src, **override))


@pytest.mark.parametrize("override, words", [
    (dict({"attention.head_count": 3}), r"llama.attention.head_count = 3 does not divide llama.embedding_length = 32"),
    (dict({"attention.head_count": 8}), r"tensor 'blk.0.attn_k.weight' has shape \(16, 32\), but "
                                        r"llama.attention.head_count_kv = 2 \(heads of 4"),
    (dict({"attention.head_count_kv": 3}), r"head_count_kv = 3 does not divide llama.attention.head_count = 4"),
    (dict(feed_forward_length=40), r"tensor 'blk.0.ffn_gate.weight' has shape \(48, 32\), but "
                                   r"llama.feed_forward_length = 40"),
    (dict(block_count=3), r"llama.block_count = 3, but the file holds the tensors of blocks \[0, 1\]"),
    (dict(embedding_length=16), r"tensor 'token_embd.weight' has shape \(97, 32\), but llama.embedding_length = 16"),
])
def test_gguf_metadata_contradicting_the_tensors_names_key_tensor_and_file(tmp_path, override, words):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(llama_gguf(tiny_llama(), **override))
    with pytest.raises(ValueError, match=rf"tiny.gguf:.*{words}.*metadata contradicts the tensors"):
        checkpoints.llama_from_gguf(str(path))


@pytest.mark.parametrize("override, words", [
    (dict(num_attention_heads=3), r"head_dim|does not divide"),
    (dict(num_key_value_heads=4), r"'model.layers.0.self_attn.k_proj.weight' has shape \(16, 32\), but "
                                  r"num_key_value_heads = 4"),
    (dict(intermediate_size=40), r"'model.layers.0.mlp.gate_proj.weight' has shape \(48, 32\), but intermediate_size = 40"),
    (dict(num_hidden_layers=3), r"num_hidden_layers = 3, but the file holds the tensors of blocks \[0, 1\]"),
    (dict(vocab_size=100), r"'model.embed_tokens.weight' has 97 rows, but vocab_size = 100"),
])
def test_hf_config_contradicting_the_tensors_names_key_tensor_and_file(tmp_path, override, words):
    src = tiny_llama()
    cfg = dict(hf_config(src), **override)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_safetensors(tmp_path / "model.safetensors", hf_tensors(src))
    with pytest.raises(ValueError, match=rf"config.json.*({words})"):
        checkpoints.load_pretrained(str(tmp_path))


# ---- 8. an untied config without its head --------------------------------------------------------------

def test_an_untied_hf_config_without_lm_head_is_an_error(tmp_path):
    src = tiny_llama()                                                  # tied: the files hold no head
    (tmp_path / "config.json").write_text(json.dumps(dict(hf_config(src), tie_word_embeddings=False)))
    write_safetensors(tmp_path / "model.safetensors", hf_tensors(src))
    with pytest.raises(ValueError, match="tie_word_embeddings: false.*hold no lm_head.weight"):
        checkpoints.load_pretrained(str(tmp_path))
    gpt = tmp_path / "gpt2"                                             # the GPT-2 reader too
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps(dict(model_type="gpt2", tie_word_embeddings=False)))
    from test_model import gpt2_style_tensors
    write_safetensors(gpt / "model.safetensors", gpt2_style_tensors(tiny_gpt()))
    with pytest.raises(ValueError, match="tie_word_embeddings: false.*hold no lm_head.weight"):
        checkpoints.load_pretrained(str(gpt))


# ---- 9. resume with other bits, group size, method or model shape ------------------------------------

@pytest.fixture(scope="module")
def teacher():
    return tiny_gpt(seed=2)


def a_state(teacher, bits, group_size=None, steps=2):
    states = []
    student = lcd.prepare_student(teacher, bits, group_size, calib=calib())
    lcd.distill(teacher, student, stream(), steps, checkpoint=states.append, checkpoint_every=1)
    return states[0]


def test_resume_with_other_bits_or_group_size_is_refused_naming_both(teacher):
    three_bit = a_state(teacher, 3)
    assert three_bit["signature"]["bits"] is None or three_bit["signature"]["method"] == "distill"
    state3 = []
    s3 = lcd.prepare_student(teacher, 3, calib=calib())
    lcd.distill(teacher, s3, stream(), 2, bits=3, checkpoint=state3.append, checkpoint_every=1)
    with pytest.raises(ValueError, match=r"distill: the resume state is of a run with bits=3, this run asks bits=2"):
        lcd.distill(teacher, lcd.prepare_student(teacher, 2, calib=calib()), stream(), 4, bits=2, state=state3[0])
    per_row = a_state(teacher, 2)
    with pytest.raises(ValueError, match=r"layer 'transformer.h.0.attn.c_attn' has group_size 32 in the resume "
                                         r"state, 16 in this student"):
        lcd.distill(teacher, lcd.prepare_student(teacher, 2, 16, calib=calib()), stream(), 4, state=per_row)
    wider = tiny_gpt(seed=2, vocab=64)
    other = GPT(dict(SIZES["tiny"], vocab_size=64, n_layer=1))
    with pytest.raises(ValueError, match="another model shape"):
        lcd.distill(other, lcd.prepare_student(other, 2, calib=calib()), stream(), 4, state=per_row)
    del per_row["signature"]
    with pytest.raises(ValueError, match="records no signature"):
        lcd.distill(wider, lcd.prepare_student(wider, 2, calib=calib()), stream(), 4, state=per_row)


def test_block_states_record_their_method_and_shape_too(teacher):
    states = []
    student = lcd.prepare_student(teacher, 2, calib=calib())
    lcd.reconstruct_blocks(teacher, student, calib(), 1, checkpoint=states.append)
    assert states[0]["signature"]["method"] == "blocks"
    with pytest.raises(ValueError, match="reconstruct_blocks: layer .* group_size 32 in the resume state, 16"):
        lcd.reconstruct_blocks(teacher, lcd.prepare_student(teacher, 2, 16, calib=calib()), calib(), 1,
                               state=states[0])
    e2e = a_state(teacher, 2)
    with pytest.raises(ValueError, match="method='distill', this run asks method='blocks'"):
        lcd.reconstruct_blocks(teacher, lcd.prepare_student(teacher, 2, calib=calib()), calib(), 1, state=e2e)


def test_train_kd_checkpoints_of_another_run_name_both_values(capsys):
    wanted = dict(bits=2, group_size=64, kd_lr=1e-4, method="lcd")
    with pytest.raises(RuntimeError, match=r"bits: 3 in the checkpoint, 2 now; group_size: None in the checkpoint, 64"):
        train_kd.check_fingerprint(dict(wanted, bits=3, group_size=None), wanted, "distill_lcd_w2.pt", "lcd")
    train_kd.check_fingerprint(dict(wanted, kd_lr=1e-3), wanted, "distill_lcd_w2.pt", "lcd")   # a lower rate
    assert "resuming with --kd_lr=0.0001 (the checkpoint was written at 0.001)" in capsys.readouterr().out


# ---- 10. NaN in the middle of distillation -----------------------------------------------------------

def test_a_diverging_distillation_stops_at_the_first_non_finite_step_and_keeps_the_last_checkpoint(teacher):
    student = lcd.prepare_student(teacher, 2, calib=calib())
    states = []
    with pytest.raises(lcd.Diverged, match=r"distill: .*step \d+.*diverged.*last checkpoint is kept.*lower "
                                           r"learning rate: lr=100000 \(try 10000\)"):
        lcd.distill(teacher, student, stream(), 40, lr=1e5, latent_lr=1e5, warmup=1, checkpoint=states.append,
                    checkpoint_every=1)
    assert states, "some steps were finite"
    for state in states:                                              # never a non-finite checkpoint
        assert all(torch.isfinite(t).all() for t in state["student"].values() if t.is_floating_point())
    # the way on: resume from a checkpoint with lower rates; the resumed optimizer takes the new ones
    healthy = lcd.prepare_student(teacher, 2, calib=calib())
    saved = []
    lcd.distill(teacher, healthy, stream(), 4, lr=1e-3, checkpoint=saved.append, checkpoint_every=2)
    resumed, after = lcd.prepare_student(teacher, 2, calib=calib()), []
    _, history = lcd.distill(teacher, resumed, stream(), 6, lr=1e-4, latent_lr=1e-4, state=saved[0],
                             checkpoint=after.append)
    assert all(math.isfinite(v) for v in history["loss"]) and len(history["loss"]) == 6 + 2   # the state carries its 2 steps
    rates = {g["name"]: g["base_lr"] for g in after[-1]["optimizer"]["param_groups"]}
    assert rates["codebook"] == rates["latent"] == 1e-4


def test_a_diverging_block_reconstruction_stops_too(teacher):
    student = lcd.prepare_student(teacher, 2, calib=calib())
    with pytest.raises(lcd.Diverged, match=r"reconstruct_blocks: block 0: .*step \d+.*lower learning rate"):
        lcd.reconstruct_blocks(teacher, student, calib(), 30, lr=1e30, latent_lr=1e30, other_lr=1e30, warmup=1)


# ---- 11. a full disk; stale temp files ----------------------------------------------------------------

@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 14848 vs 14736")])
def test_a_full_disk_says_so_and_keeps_the_previous_file(tmp_path, error):
    path = tmp_path / "lcd_w2.pt"
    path.write_bytes(b"old")

    def write(tmp):
        open(tmp, "wb").write(b"half")
        raise error
    with pytest.raises(OSError, match=r"no space left on the device holding .*lcd_w2.pt; the previous file is intact"):
        packed_model.atomic_write(str(path), write)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["lcd_w2.pt"]


def test_stale_temp_files_of_a_killed_writer_are_removed_on_the_next_write(tmp_path):
    path = tmp_path / "distill_lcd_w2.pt"
    ours = [tmp_path / "distill_lcd_w2.pt.k3_x9a0q.tmp", tmp_path / "distill_lcd_w2.pt.abcdefgh.tmp"]
    others = [tmp_path / "distill_lcd_w2.pt.mine.tmp", tmp_path / "teacher.pt.abcdefgh.tmp", tmp_path / "notes.tmp"]
    for f in ours + others:
        f.write_bytes(b"x")
    assert packed_model.stale_temp_files(str(path)) == sorted(str(f) for f in ours)
    packed_model.atomic_write(str(path), lambda tmp: open(tmp, "wb").write(b"new"))
    assert sorted(os.listdir(tmp_path)) == sorted(["distill_lcd_w2.pt"] + [f.name for f in others])


# ---- 12. an unwritable --out_dir --------------------------------------------------------------------------

def test_an_unwritable_out_dir_is_refused_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"--out_dir=.*a_file/sub: cannot write in .*choose a writable directory"):
        train_kd.main([f"--out_dir={blocker}/sub", "--max_iters=1"])
    with pytest.raises(OSError, match="--out_dir"):
        train_kd.ensure_teacher(out_dir=str(blocker / "sub"))
    for key in ("json", "_GIVEN"):
        monkeypatch.setattr(bench, key, getattr(bench, key))
    with pytest.raises(SystemExit, match=r"--json=.*cannot write"):
        bench.main([f"--json={blocker}/sub/r.json"])

    def read_only(*a, **kw):                          # a read-only filesystem (root ignores chmod)
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(packed_model.tempfile, "mkstemp", read_only)
    with pytest.raises(OSError, match=r"--out_dir=x: cannot write in .*Read-only file system"):
        packed_model.check_writable(str(tmp_path), "--out_dir=x")


# ---- 13. saving a student before freeze() ---------------------------------------------------------------

def test_saving_a_student_before_freeze_is_refused(teacher, tmp_path):
    student = lcd.prepare_student(teacher, 2, calib=calib())
    with pytest.raises(ValueError, match=r"LCDLinear, still being distilled.*call lcd.freeze\(model\) first"):
        packed_model.save_quantized(student, str(tmp_path / "s.pt"))
    assert not os.path.exists(tmp_path / "s.pt")
    packed_model.save_quantized(lcd.freeze(copy.deepcopy(student)), str(tmp_path / "s.pt"))
    assert packed_model.quantized_header(str(tmp_path / "s.pt"))["layers"]


# ---- 14. safetensors dtypes -----------------------------------------------------------------------------

def raw_safetensors(path, entries):
    """entries: {name: (dtype name, shape, raw bytes)}."""
    header, blobs, offset = {}, b"", 0
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        blobs, offset = blobs + raw, offset + len(raw)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + blobs)


def test_every_safetensors_dtype_is_read_or_refused_by_name(tmp_path):
    f8 = torch.tensor([0.5, -2.0, 448.0], dtype=torch.float8_e4m3fn)
    e5 = torch.tensor([1.0, -0.25], dtype=torch.float8_e5m2)
    u16 = np.array([1, 65535], dtype="<u2")
    u32 = np.array([7, 2 ** 32 - 1], dtype="<u4")
    raw_safetensors(tmp_path / "ok.safetensors", {
        "a": ("F8_E4M3", [3], f8.view(torch.uint8).numpy().tobytes()),
        "b": ("F8_E5M2", [2], e5.view(torch.uint8).numpy().tobytes()),
        "c": ("U16", [2], u16.tobytes()), "d": ("U32", [2], u32.tobytes()),
        "e": ("U64", [1], np.array([2 ** 40], "<u8").tobytes())})
    t = checkpoints.load_safetensors(str(tmp_path / "ok.safetensors"))
    assert t["a"].float().tolist() == [0.5, -2.0, 448.0] and t["b"].float().tolist() == [1.0, -0.25]
    assert t["c"].to(torch.int64).tolist() == [1, 65535] and t["d"].to(torch.int64).tolist() == [7, 2 ** 32 - 1]
    assert t["e"].to(torch.int64).tolist() == [2 ** 40]
    for dtype, words in (("F4", "dtype F4, a dtype of the safetensors format this reader does not support"),
                         ("F6_E2M3", "dtype F6_E2M3, a dtype of the safetensors format"),
                         ("F9", "dtype F9, not a dtype of the safetensors format")):
        raw_safetensors(tmp_path / "bad.safetensors", {"model.w": (dtype, [2], b"\x00\x00")})
        with pytest.raises(ValueError, match=rf"tensor 'model.w' has {words}.*convert"):
            checkpoints.load_safetensors(str(tmp_path / "bad.safetensors"))


def test_an_integer_tensor_in_a_float_parameter_is_an_error(tmp_path):
    m = tiny_gpt()
    tensors = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    tensors["transformer.h.0.mlp.c_fc.weight"] = tensors["transformer.h.0.mlp.c_fc.weight"].to(torch.int32)
    with pytest.raises(ValueError, match=r"src.safetensors: tensor 'transformer.h.0.mlp.c_fc.weight' holds "
                                         r"torch.int32 values where the model has a float"):
        checkpoints.load_state(tiny_gpt(), tensors, "src.safetensors")
    tensors["transformer.h.0.mlp.c_fc.weight"] = m.state_dict()["transformer.h.0.mlp.c_fc.weight"].half()
    checkpoints.load_state(tiny_gpt(), tensors, "src.safetensors")        # another float dtype: converted
