"""The decode step in C (kernels.c's llama_step, lcd_kernels.py section 3) against the Python forward, the
reference: tiny Llamas packed at 2, 3 and 4 bits, with codebook groups, odd widths, grouped-query attention,
a long KV cache and generation past block_size; dense and Q8_0 heads, a bias; the same greedy tokens, and the
logits of every step within fp32 rounding. Then what it refuses (and generate() still right), the fallback
when kernels.c cannot be built, the build cache keyed by CPU features, CC with arguments, and the width
checks of the C entry points. No timing here (bench.py --cpu measures)."""
import copy
import os
import shutil
import stat

import pytest
import torch

import lcd_kernels
import lcd
import packed_model
import model as model_lib
from test_llama import tiny_gpt, tiny_llama
from test_lut_cpu import random_layer

from test_kernels_cpu import library, pytestmark  # noqa: F401  (the built library, or skip without a compiler)


def packed_llama(bits, group_size=None, head="q8", seed=0, **config):
    """A tiny Llama (test_llama.tiny_llama, norms away from 1) with every block matrix packed at `bits`
    (RTN: fast, and quality does not matter here) and the head in Q8_0, dense, or packed ("lut")."""
    m = tiny_llama(seed=seed, **config)
    if bits is not None:
        lcd.quantize(m, bits, group_size=group_size, method="rtn")
    if head == "q8":
        packed_model.quantize_head(m)
    elif head == "lut":
        m.lm_head = lcd.quantize_linear(m.lm_head, 4)
    return m


def close(a, b, atol=1e-4):
    """Equal to fp32 rounding: |a - b| <= atol times the scale of b."""
    return (a - b).abs().max().item() <= atol * max(1.0, b.abs().max().item())


def lockstep(m, prompt, n_steps, max_len):
    """Run the C step and the Python forward side by side on their own caches: the prompt, then n_steps
    tokens (the reference's greedy choice fed to both); returns the largest logit difference relative to
    the logits' scale, and the final cache positions."""
    step = m.decode_step
    c_cache, py_cache = model_lib.KVCache(max_len), model_lib.KVCache(max_len)
    worst, new = 0.0, prompt
    with torch.no_grad():
        for _ in range(n_steps + 1):
            c = step(new, c_cache)
            if c is None and new.shape[1] > 1 and not step._prompt_in_c:   # a dense model's prompt: as generate()
                c = m(new, kv_cache=c_cache)[0][:, -1, :]                  # does, the Python forward fills the cache
            py = m(new, kv_cache=py_cache)[0][:, -1, :]
            assert c is not None and c.shape == py.shape == (1, m.config.vocab_size)
            worst = max(worst, (c - py).abs().max().item() / max(1.0, py.abs().max().item()))
            new = py.argmax(-1, keepdim=True)
    return worst, c_cache.pos, py_cache.pos


CASES = [  # (bits, group_size, config): odd widths, GQA 3:1, MHA, groups of whole vectors and of odd sizes
    (2, None, {}),
    (3, None, {}),
    (4, None, {}),
    (2, 16, dict(n_embd=48, n_head=6, n_kv_head=2, intermediate_size=80)),
    (3, 8, dict(n_embd=36, n_head=3, n_kv_head=3, intermediate_size=50)),    # 36, 50: not multiples of 8
    (4, 6, dict(n_embd=36, n_head=3, n_kv_head=1, intermediate_size=42)),    # groups of 6: the portable decoder
    (3, None, dict(n_embd=20, n_head=2, n_kv_head=1, intermediate_size=37)),
    (3, 24, dict(n_embd=72, n_head=6, n_kv_head=2, intermediate_size=88)),   # R3: groups end inside 32-blocks
]


@pytest.mark.parametrize("bits, group_size, config", CASES)
def test_the_c_step_equals_the_python_forward(library, bits, group_size, config):
    m = packed_llama(bits, group_size, block_size=128, **config)
    assert lcd_kernels.attach_decode_step(m) is m.decode_step is not None
    prompt = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(bits))
    worst, c_pos, py_pos = lockstep(m, prompt, 100, 128)                # 107 positions: a long cache
    assert c_pos == py_pos == 107 and worst <= 1e-4, worst


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_greedy_tokens_equal_the_reference_also_past_block_size(library, bits, monkeypatch):
    m = packed_llama(bits, 8, block_size=48)
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(10 + bits))
    with torch.no_grad():
        ref = m.generate(prompt, 60, temperature=0)                     # past 48: the uncached path takes over
        calls = []
        step = lcd_kernels.attach_decode_step(m)
        m.decode_step = lambda idx, cache: calls.append(idx.shape[1]) or step(idx, cache)
        out = m.generate(prompt, 60, temperature=0)
        assert calls == [5] + [1] * (48 - 5)                            # the prompt at once, then token by token
        assert step._prompt_in_c                                        # (all packed: the prompt ran in C)
        monkeypatch.setattr(lcd_kernels, "CPU_KERNELS", False)              # the kernels off: the Python reference
        assert step(prompt, model_lib.KVCache(8)) is None
        off = m.generate(prompt, 60, temperature=0)
    assert torch.equal(out, ref) and torch.equal(off, ref)


@pytest.mark.parametrize("head", ["dense", "lut", "q8"])
def test_heads_dense_packed_q8_and_the_fp32_model(library, head):
    for bits in (None, 3):                                              # None: the fp32 teacher itself
        m = packed_llama(bits, head=head, tie_embeddings=head != "dense")
        assert lcd_kernels.attach_decode_step(m) is not None
        worst, _, _ = lockstep(m, torch.tensor([[3, 1, 4, 1, 5]]), 12, 32)
        assert worst <= 1e-4, (bits, head, worst)


def test_a_bias_is_added(library):
    m = packed_llama(2)
    m.model.layers[0].self_attn.q_proj = random_layer(32, 32, 3, None, bias=True, seed=5)
    m.model.layers[1].mlp.down_proj = random_layer(32, 48, 2, 16, bias=True, seed=6)
    lcd_kernels.attach_decode_step(m)
    worst, _, _ = lockstep(m, torch.tensor([[1, 2, 3]]), 8, 16)
    assert worst <= 1e-4


def test_sampling_with_the_c_step_equals_the_reference(library, monkeypatch):
    m = packed_llama(2)
    prompt = torch.tensor([[7, 8, 9]])
    lcd_kernels.attach_decode_step(m)
    with torch.no_grad():
        out = m.generate(prompt, 30, temperature=0.8, top_k=20, seed=3)
        monkeypatch.setattr(lcd_kernels, "CPU_KERNELS", False)
        ref = m.generate(prompt, 30, temperature=0.8, top_k=20, seed=3)
    assert torch.equal(out, ref)


# ---- what it refuses: attach gives None (or the step None), generate() runs the Python forward -------

def refused(m):
    return lcd_kernels.attach_decode_step(m) is None and not hasattr(m, "decode_step")


def test_what_the_c_step_refuses(library):
    assert refused(tiny_gpt()) and "Llama family" in lcd_kernels.decode_step_refusal(tiny_gpt())
    assert refused(packed_llama(2).half())
    m = packed_llama(2)
    m.model.layers[1].mlp.up_proj = random_layer(48, 32, 2, None, bias=False, a_bits=8)
    assert refused(m) and "a_bits" in lcd_kernels.decode_step_refusal(m)
    m.model.layers[1].mlp.up_proj = random_layer(48, 32, 2, None, bias=False, in_scale=True)
    assert refused(m) and "in_scale" in lcd_kernels.decode_step_refusal(m)
    m.model.layers[0].mlp.up_proj = random_layer(48, 32, 2, None, bias=False, n_outliers=3)
    assert "outliers" in lcd_kernels.decode_step_refusal(m)


def test_a_model_changed_after_attaching_is_seen_or_refused(library, monkeypatch):
    m = packed_llama(None, head="dense")
    lcd_kernels.attach_decode_step(m)                                       # attached to the fp32 model ...
    packed_model.quantize_head(lcd.quantize(m, 2, method="rtn"))                 # ... then quantized: new tensors
    prompt = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = m.generate(prompt, 20, temperature=0)
        assert m.decode_step.refusal is None and m.decode_step._table is not None   # served, from the new layers
        twin = copy.deepcopy(m)                                         # a copy builds its own tables
        assert torch.equal(twin.generate(prompt, 20, temperature=0), out) and twin.decode_step.model is twin
        m.half()                                                        # no longer fp32: refused, Python runs
        half = m.generate(prompt, 3, temperature=0)
        assert "fp32" in m.decode_step.refusal and half.shape == (1, 6)
        monkeypatch.setattr(lcd_kernels, "CPU_KERNELS", False)
        m.float()
        assert torch.equal(m.generate(prompt, 20, temperature=0), out)


def test_calls_it_does_not_serve_go_to_the_python_forward(library):
    m = packed_llama(3)
    step = lcd_kernels.attach_decode_step(m)
    with torch.no_grad():
        cache = model_lib.KVCache(16)
        assert step(torch.tensor([[3, 97]]), cache) is None and cache.pos == 0   # an id outside the vocabulary
        with pytest.raises(IndexError):
            m.generate(torch.tensor([[3, 97]]), 2)                      # ... the Python forward's own error
        batch = torch.tensor([[1, 2, 3], [4, 5, 6]])
        out = m.generate(batch, 10, temperature=0)                      # two sequences: the Python forward
        ref = torch.cat([m.generate(batch[i:i + 1], 10, temperature=0) for i in range(2)])
        assert torch.equal(out, ref)
    with torch.enable_grad():
        assert step(torch.tensor([[1]]), model_lib.KVCache(4)) is None  # a gradient wanted


def test_a_failed_build_leaves_the_python_path(monkeypatch, tmp_path, capfd):
    m = packed_llama(2)
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        ref = m.generate(prompt, 15, temperature=0)
    monkeypatch.setattr(lcd_kernels, "CPU_COMPILER", "/nonexistent/cc")
    monkeypatch.setattr(lcd_kernels, "CPU_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lcd_kernels, "_cpu_library", None)
    monkeypatch.setattr(lcd_kernels, "_cpu_failure", None)
    assert lcd_kernels.attach_decode_step(m) is None
    assert "kernels.c is unavailable" in lcd_kernels.decode_step_refusal(m)
    with torch.no_grad():
        assert torch.equal(m.generate(prompt, 15, temperature=0), ref)
    assert "/nonexistent/cc" in capfd.readouterr().err


# ---- the build: a cache keyed by CPU features, CC with arguments --------------------------------------

def fresh_build(monkeypatch, cache, cc=None):
    monkeypatch.setattr(lcd_kernels, "CPU_CACHE_DIR", str(cache))
    monkeypatch.setattr(lcd_kernels, "_cpu_library", None)
    monkeypatch.setattr(lcd_kernels, "_cpu_failure", None)
    if cc is not None:
        monkeypatch.setattr(lcd_kernels, "CPU_COMPILER", cc)


def works(lib):
    """A real kernels.c: a 1x1 Q8_0 product of 2 * 3."""
    x, y = torch.full((1, 32), 0.0), torch.empty(1, 1)
    x[0, 0] = 3.0
    blocks = lcd_kernels.q8_quantize(torch.tensor([[2.0] + [0.0] * 31]))
    lib.q8_gemv(blocks.data_ptr(), x.data_ptr(), y.data_ptr(), 1, 32, 1, 1)
    return y.item() == pytest.approx(6.0, rel=1e-3)


def test_a_cached_library_built_for_other_cpu_features_is_rebuilt_not_loaded(library, monkeypatch, tmp_path):
    fresh_build(monkeypatch, tmp_path)
    command = lcd_kernels.compiler_command()
    features = lcd_kernels.cpu_features(command)
    assert any("__" in f for f in features)                             # -march=native says something here
    path, record = lcd_kernels.cpu_library_path(command, features)
    other_path, _ = lcd_kernels.cpu_library_path(command, features + ["#define __AVX512F__ 1"])
    assert other_path != path                                           # other features, another file
    os.makedirs(tmp_path, exist_ok=True)
    for recorded in (["#define __AVX512F__ 1", *features], None):      # another CPU's library; one without a record
        with open(tmp_path / "fake", "wb") as f:                         # (a SIGILL waiting to happen)
            f.write(b"not a library: loading this would fail")
        os.replace(tmp_path / "fake", path)                             # a new file: the loaded one stays mapped
        if recorded is None:
            os.remove(record)
        else:
            with open(record, "w") as f:
                f.write("".join(line + "\n" for line in recorded))
        fresh_build(monkeypatch, tmp_path)
        lib = lcd_kernels.cpu_library()
        assert lib is not None and works(lib), lcd_kernels._cpu_failure    # rebuilt, not loaded
        with open(path, "rb") as f:
            assert f.read(4) == b"\x7fELF"
        assert lcd_kernels._recorded_features(record) == features
    mtime = os.stat(path).st_mtime_ns                                   # a matching record: loaded as it is
    fresh_build(monkeypatch, tmp_path)
    assert works(lcd_kernels.cpu_library()) and os.stat(path).st_mtime_ns == mtime


def test_cc_with_arguments(library, monkeypatch, tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    wrapper = tmp_path / "bin" / "fake-ccache"                          # a launcher as ccache is: runs its arguments
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\nexec \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    for i, cc in enumerate((f"fake-ccache {compiler}", f"{compiler} -pthread", f"'{compiler}'  -O2")):
        fresh_build(monkeypatch, tmp_path / f"cache{i}", cc)
        lib = lcd_kernels.cpu_library()
        assert lib is not None and works(lib), (cc, lcd_kernels._cpu_failure)
    assert "kernels.c" in (tmp_path / "calls").read_text()              # the launcher did run the compiler
    for cc, words in (("", "CC is empty"), ("no-such-compiler -O2", "'no-such-compiler'"), ("gcc 'x", "quotes")):
        fresh_build(monkeypatch, tmp_path / "never", cc)
        with pytest.raises(RuntimeError, match=words):
            lcd_kernels.compiler_command()
        assert lcd_kernels.cpu_library() is None and words.strip("'") in lcd_kernels._cpu_failure


# ---- every C entry point checks the width, dtype and layout its reference checks ---------------------

@pytest.mark.parametrize("K", [32, 100])
def test_the_q8_head_refuses_inputs_of_the_wrong_width(library, K):
    head = packed_model.Q8Linear.from_linear(torch.nn.Linear(K, 5, bias=False))
    for width in (K + 32, K + 40, 2 * K + 64):                          # another number of blocks: via Q8Linear
        with torch.no_grad(), pytest.raises(ValueError, match="last dimension must be"):
            head(torch.randn(2, width))
    for width in (K - 1, K + 1, K + 31):                                # any other width, given the layer's K
        with pytest.raises(ValueError, match=f"in_features={K} got input of shape \\(2, {width}\\)"):
            lcd_kernels.q8_forward_cpu(head.blocks, torch.randn(2, width), 5, K)
    with torch.no_grad():
        assert lcd_kernels.q8_forward_cpu(head.blocks, torch.randn(2, K), 5, K).shape == (2, 5)
    with pytest.raises(ValueError, match="contiguous uint8"):
        lcd_kernels.q8_forward_cpu(head.blocks.t().contiguous().t(), torch.randn(1, K), 5, K)
    with pytest.raises(ValueError, match="contiguous uint8"):
        lcd_kernels.q8_forward_cpu(head.blocks.view(torch.int8), torch.randn(1, K), 5, K)


def test_a_packed_layer_refuses_inputs_of_the_wrong_width(library):
    layer = random_layer(6, 40, 2, None)
    for x in (torch.randn(2, 41), torch.randn(4, 20), torch.randn(80), torch.tensor(1.0)):
        with torch.no_grad(), pytest.raises(ValueError, match="in_features=40 got input of shape"):
            layer(x)
    with torch.no_grad():
        assert layer(torch.randn(3, 40)).shape == (3, 6)


def test_the_step_profile_counts_time_only_when_built_for_it(library, monkeypatch, tmp_path):
    m = packed_llama(2)
    lcd_kernels.attach_decode_step(m)
    with torch.no_grad():
        m.generate(torch.tensor([[1, 2, 3]]), 4, temperature=0)
    plain = lcd_kernels.decode_step_profile()
    assert list(plain) == list(lcd_kernels.PROFILE_PARTS) and not any(plain.values())   # no -DLCD_PROFILE: zeros
    fresh_build(monkeypatch, tmp_path)
    monkeypatch.setattr(lcd_kernels, "CPU_FLAGS", lcd_kernels.CPU_FLAGS + ("-DLCD_PROFILE",))
    lcd_kernels.attach_decode_step(m)
    with torch.no_grad():
        m.generate(torch.tensor([[1, 2, 3]]), 4, temperature=0)
    timed = lcd_kernels.decode_step_profile()
    assert all(t >= 0 for t in timed.values()) and timed["q k v"] > 0 and timed["head"] > 0
    assert not any(lcd_kernels.decode_step_profile().values())          # handed over, then zeroed
