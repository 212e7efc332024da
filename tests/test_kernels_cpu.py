"""kernels.c (the CPU twin of kernels.cu) against the PyTorch reference: every version, b = 2, 3, 4, odd and
tiny shapes, batch 1 and more, outliers and bias, one codebook per row and groups; the fallback when the
compiler fails; the Q8_0 head against its dequantized weight; greedy tokens of a tiny Llama, kernels vs
reference. Skipped without a C compiler. No timing here (bench.py --cpu measures)."""
import shlex
import shutil

import pytest
import torch

import lcd_kernels
import lcd
import packed_model
import model as model_lib
from test_lut_cpu import random_layer

pytestmark = pytest.mark.skipif(shutil.which((shlex.split(lcd_kernels.CPU_COMPILER) or [""])[0]) is None,
                                reason=f"no C compiler ({lcd_kernels.CPU_COMPILER}): kernels.c cannot be built")


@pytest.fixture(scope="module")
def library():
    lib = lcd_kernels.cpu_library()
    if lib is None:
        pytest.skip(f"kernels.c did not build: {lcd_kernels._cpu_failure}")
    return lib


def reference(layer, x, monkeypatch):
    """LUTLinear's PyTorch reference path (the C kernels forced off)."""
    monkeypatch.setattr(lcd_kernels, "CPU_KERNELS", False)
    with torch.no_grad():
        y = layer(x)
    monkeypatch.setattr(lcd_kernels, "CPU_KERNELS", True)
    return y


def close(y, ref):
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    return (y - ref).abs().max().item() <= tol


SHAPES = [(1, 1), (3, 3), (100, 100), (1, 100), (100, 3), (7, 403)]     # (N, K): odd, tiny, a partial last word
GROUPS = [None, 8, 6]                                                   # per row; whole vectors; odd bytes (v2/v0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("N, K", SHAPES)
@pytest.mark.parametrize("group_size", GROUPS)
def test_every_version_equals_the_reference(library, bits, N, K, group_size, monkeypatch):
    gs = None if group_size is None or group_size >= K else group_size
    layer = random_layer(N, K, bits, gs, bias=False, seed=N * K + bits)
    for batch in (1, 5):
        x = torch.randn(batch, K, generator=torch.Generator().manual_seed(batch))
        ref = reference(layer, x, monkeypatch)
        for version in lcd_kernels.CPU_VERSIONS:
            y = lcd_kernels.lut_matmul_cpu(version, bits, layer.group_size, layer.packed, layer.codebook, x)
            assert y.shape == (batch, N) and close(y, ref), (version, batch)


def r3_reference(idx):
    """kernels.c's R3 layout of 3-bit indices (N, K), written from its description: per block of 32
    entries 3 words; word j's bits 0..23 = vector j's 8 entries at 3 bits each (entry 0 lowest), its
    bits 24..31 = byte j of vector 3's 24 bits; entries past K are 0."""
    N, K = idx.shape
    n_blocks = -(-K // 32)
    e = torch.nn.functional.pad(idx.long(), (0, 32 * n_blocks - K)).view(N, n_blocks, 4, 8)
    field = (e << (3 * torch.arange(8))).sum(-1)                            # (N, n_blocks, 4) 24-bit fields
    words = field[..., :3] | (((field[..., 3:] >> (8 * torch.arange(3))) & 0xFF) << 24)
    words = words.reshape(N, 3 * n_blocks)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


@pytest.mark.parametrize("K", [1, 8, 10, 31, 32, 33, 72, 100, 403])
def test_r3_repacking_follows_its_description(library, K):
    idx = torch.randint(0, 8, (5, K), generator=torch.Generator().manual_seed(K))
    packed = packed_model.pack_indices(idx, 3)
    r3 = lcd_kernels.cpu_packed(packed, 3, K)
    assert r3.shape == (5, 3 * -(-K // 32)) and torch.equal(r3, r3_reference(idx))
    assert lcd_kernels.cpu_packed(packed, 3, K) is r3                   # cached while packed lives unchanged
    assert lcd_kernels.cpu_packed(packed, 2, K) is packed               # b = 2, 4: the file's layout itself


@pytest.mark.parametrize("N, K, group_size", [(5, 72, 24), (6, 40, 8), (3, 96, 16), (4, 136, None), (2, 24, 8),
                                              (7, 65, None), (9, 88, 40)])
def test_three_bits_in_r3_across_blocks_and_groups(library, N, K, group_size, monkeypatch):
    """b = 3 through the CPU layout R3: groups that end inside a 32-entry block (24, 40), partial last
    blocks, batch 1 and more (v3, v4, the sgemm path and LUTLinear itself)."""
    layer = random_layer(N, K, 3, group_size, bias=True, seed=N + K)
    for batch in (1, 3, 6):
        x = torch.randn(batch, K, generator=torch.Generator().manual_seed(batch))
        ref = reference(layer, x, monkeypatch)
        with torch.no_grad():
            assert close(layer(x), ref), batch
        for version in lcd_kernels.CPU_LAYOUT_VERSIONS:
            y = lcd_kernels.lut_matmul_cpu(version, 3, layer.group_size, layer.packed, layer.codebook, x) + layer.bias
            assert close(y, ref), (version, batch)


def test_three_bit_weights_changed_in_place_are_repacked(library, monkeypatch):
    """The R3 copy is kept per packed tensor: an in-place change of layer.packed must make a new one."""
    a, b = random_layer(9, 50, 3, None, bias=False, seed=1), random_layer(9, 50, 3, None, bias=False, seed=2)
    x = torch.randn(1, 50)
    x4 = torch.randn(4, 50)
    with torch.no_grad():
        before, before4 = a(x), a(x4)                                   # v3 and v4: both keep the R3 copy
        assert close(before, reference(a, x, monkeypatch)) and close(before4, reference(a, x4, monkeypatch))
        a.packed.copy_(b.packed)                                        # same tensor, same pointer, new values
        assert close(a(x), reference(a, x, monkeypatch)) and not close(a(x), before)
        assert close(a(x4), reference(a, x4, monkeypatch)) and not close(a(x4), before4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_forward_with_outliers_bias_scale_and_batches(library, bits, monkeypatch):
    layer = random_layer(37, 75, bits, None, n_outliers=9, in_scale=True, bias=True, seed=bits)
    for shape in ((75,), (1, 75), (2, 3, 75), (16, 75)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
        with torch.no_grad():
            y = layer(x)
        assert lcd_kernels.lut_forward_cpu(layer, x) is not None            # the C path really served it
        ref = reference(layer, x, monkeypatch)
        assert y.shape == ref.shape and close(y, ref)


def test_a_layer_whose_buffers_change_is_served_from_its_new_buffers(library, monkeypatch):
    """The prepared call keeps a layer's pointers: new tensors (load_state_dict from another layer, a copy
    moved back and forth) must be seen, never the freed old ones; each version keeps its own call."""
    a, b = random_layer(9, 40, 2, None, bias=False, seed=1), random_layer(9, 40, 2, None, bias=False, seed=2)
    x = torch.randn(1, 40)
    with torch.no_grad():
        before = a(x)
        a.packed, a.codebook = b.packed.clone(), b.codebook.clone()     # other tensors, other values
        assert close(a(x), reference(b, x, monkeypatch)) and not close(a(x), before)
        a.codebook.mul_(2)                                              # in place: the same tensor
        assert close(a(x), 2 * reference(b, x, monkeypatch))
        assert close(lcd_kernels.lut_forward_cpu(a, x, version="v0"), lcd_kernels.lut_forward_cpu(a, x, version="v3"))
    with pytest.raises(ValueError, match="unknown CPU kernel version"):
        lcd_kernels.lut_forward_cpu(a, x, version="v9")


def test_the_reference_serves_what_the_kernels_do_not(library):
    layer = random_layer(5, 16, 2, None)
    x = torch.randn(2, 16)
    assert lcd_kernels.lut_forward_cpu(layer, x.double()) is None           # not fp32
    assert lcd_kernels.lut_forward_cpu(layer, x.requires_grad_()) is None   # a gradient is wanted
    with torch.no_grad():
        assert lcd_kernels.lut_forward_cpu(layer, x) is not None


def test_a_failed_build_says_why_once_and_the_reference_runs(monkeypatch, tmp_path, capfd):
    monkeypatch.setattr(lcd_kernels, "CPU_COMPILER", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(lcd_kernels, "CPU_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lcd_kernels, "_cpu_library", None)
    monkeypatch.setattr(lcd_kernels, "_cpu_failure", None)
    layer = random_layer(9, 21, 3, None, n_outliers=2)
    x = torch.randn(2, 21)
    with torch.no_grad():
        y1, y2 = layer(x), layer(x)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "CPU kernels unavailable" in lines[0] and "no-such-cc" in lines[0]
    monkeypatch.setattr(lcd_kernels, "CPU_KERNELS", False)
    with torch.no_grad():
        assert torch.equal(y1, layer(x)) and torch.equal(y2, y1)


def test_a_compile_error_is_reported(monkeypatch, tmp_path, capfd):
    bad = tmp_path / "kernels.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(lcd_kernels, "KERNELS_C", str(bad))
    monkeypatch.setattr(lcd_kernels, "CPU_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lcd_kernels, "_cpu_library", None)
    monkeypatch.setattr(lcd_kernels, "_cpu_failure", None)
    assert lcd_kernels.cpu_library() is None
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "failed on kernels.c" in err


@pytest.mark.parametrize("K", [32, 100, 576])
def test_q8_head_equals_its_dequantized_weight(library, K, monkeypatch):
    g = torch.Generator().manual_seed(K)
    linear = torch.nn.Linear(K, 45, bias=False)
    linear.weight.data.copy_(torch.randn(45, K, generator=g))
    head = packed_model.Q8Linear.from_linear(linear)
    W = head.weight_dequantized()
    assert W.shape == (45, K) and (W - linear.weight).abs().max() <= linear.weight.abs().max() / 127
    for batch in (1, 7):
        x = torch.randn(batch, K, generator=g)
        with torch.no_grad():
            y = head(x)
        assert close(y, x @ W.T)
        monkeypatch.setattr(lcd_kernels, "CPU_KERNELS", False)
        with torch.no_grad():
            assert close(head(x), y)
        monkeypatch.setattr(lcd_kernels, "CPU_KERNELS", True)


def test_q8_blocks_are_gguf_q8_0():
    W = torch.tensor([[0.0] * 31 + [-2.54]])                           # one block: d = 2.54 / 127 = 0.02
    blocks = lcd_kernels.q8_quantize(W)
    assert blocks.shape == (1, 34)
    assert blocks[0, :2].view(torch.float16).item() == torch.tensor(0.02).half().item()
    assert blocks[0, 2:].view(torch.int8).tolist() == [0] * 31 + [-127]


def test_greedy_tokens_of_a_tiny_llama_equal_the_reference(library, monkeypatch):
    torch.manual_seed(0)
    config = model_lib.LlamaConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=120)
    for bits in (2, 3, 4):
        student = packed_model.quantize_head(lcd.quantize(model_lib.Llama(config).eval(), bits, method="rtn"))
        assert isinstance(student.lm_head, packed_model.Q8Linear)
        prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(bits))
        with torch.no_grad():
            fast_logits, _ = student(prompt)
            fast = student.generate(prompt, 20, temperature=0)
            monkeypatch.setattr(lcd_kernels, "CPU_KERNELS", False)
            ref_logits, _ = student(prompt)
            ref = student.generate(prompt, 20, temperature=0)
            monkeypatch.setattr(lcd_kernels, "CPU_KERNELS", True)
        assert torch.equal(fast, ref)
        assert close(fast_logits, ref_logits)
