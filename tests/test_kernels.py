"""
kernels.cu without a GPU: every kernel, compiled unchanged for the CPU (tests/cuda_emulation.h), launched
with the grids lcd.py uses, against a PyTorch reference written from the documented packed layout. Then
the GPU compiler's verdict (registers, spills, shared memory) and, where a GPU exists, the real thing.
"""

import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TESTS))
sys.path.insert(0, TESTS)
import cuda_emulation  # noqa: E402
import lcd_kernels  # noqa: E402
import packed_model

VERSIONS = ("v1", "v2", "v3", "dequant")
ENTRIES = {2: 16, 3: 10, 4: 8}   # the layout in the notes, restated here on purpose


@pytest.fixture(scope="module")
def emulated():
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the CPU emulation of kernels.cu needs it")
    return cuda_emulation.EmulatedKernels()


def pack_by_layout(idx, bits):
    """The documented layout, written independently of lcd.py: index (n, k) in word k // E at bit
    (k % E) * bits, entry 0 lowest, padding 0, words as int32 bit patterns."""
    E = ENTRIES[bits]
    N, K = idx.shape
    n_words = -(-K // E)
    padded = torch.zeros(N, n_words * E, dtype=torch.int64)
    padded[:, :K] = idx
    words = (padded.view(N, n_words, E) << (torch.arange(E) * bits)).sum(-1)   # (N, n_words) in [0, 2^32)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def random_layer(N, K, bits, group_size, generator, identity=False):
    """(packed, codebook fp16 (N, G, 2^b), W float32 (N, K)) for random indices."""
    C, G = 2 ** bits, -(-K // group_size)
    idx = torch.randint(0, C, (N, K), generator=generator)
    if identity:   # centroid j has the value j: integer arithmetic that must come out exact
        codebook = torch.arange(C, dtype=torch.float16).expand(N, G, C).contiguous()
    else:
        codebook = torch.randn(N, G, C, generator=generator).to(torch.float16)
    W = codebook.float()[torch.arange(N)[:, None], torch.arange(K)[None, :] // group_size, idx]
    return packed_model.pack_indices(idx, bits), codebook, W


def assert_close_to_fp16_rounding(y, reference, magnitude):
    """y (fp16) may differ from the exact result by one fp16 rounding plus fp32 summation error."""
    tolerance = reference.abs() * 2.0 ** -10 + magnitude * 1e-5 + 1e-6
    error = (y.float() - reference).abs()
    assert (error <= tolerance).all(), f"max error {error.max().item():.3g} (tolerance {tolerance.min().item():.3g}+)"


def run_version(version, bits, group_size, packed, codebook, x, emulated, exact_int8=None):
    """Run one version through lcd_kernels.lut_matmul on the emulator; returns (y, activations it used)."""
    if version == "v3":
        q, scale = exact_int8 if exact_int8 is not None else lcd_kernels.quantize_activations(x, 8)
        y = lcd_kernels.lut_matmul("v3", bits, group_size, packed, codebook, q, emulated.launch, x_scale=scale)
        return y, q.float() * scale[:, None]
    return lcd_kernels.lut_matmul(version, bits, group_size, packed, codebook, x, emulated.launch), x.float()


# ---- the layout and the fp16 emulation ----

@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("K", [1, 15, 16, 17, 100, 333])
def test_lcd_packing_is_the_documented_layout(bits, K):
    generator = torch.Generator().manual_seed(K * 10 + bits)
    idx = torch.randint(0, 2 ** bits, (5, K), generator=generator)
    packed = packed_model.pack_indices(idx, bits)
    assert packed.dtype == torch.int32
    assert torch.equal(packed, pack_by_layout(idx, bits))


def test_emulated_float2half_rounds_like_torch(emulated):
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([
        torch.randn(2000, generator=generator) * 10.0 ** torch.randint(-9, 6, (2000,), generator=generator),
        torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                      2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -12), 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11,
                      float("inf"), float("-inf")]),
    ])
    expected = values.half().view(torch.int16).to(torch.int64) & 0xFFFF
    got = torch.tensor([emulated.float_to_half_bits(v) for v in values.tolist()])
    assert torch.equal(got, expected), values[got != expected][:5]


# ---- every kernel against the reference ----

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("bits", [2, 3, 4])
# one codebook per row; groups of 32 (not a multiple of the 3-bit word); groups that end inside a
# lane's second word, and a last group shorter than the others
@pytest.mark.parametrize("N, K, group_size", [(37, 100, 100), (37, 333, 32), (13, 1000, 600)])
@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_matches_reference(emulated, version, bits, N, K, group_size, batch):
    generator = torch.Generator().manual_seed(N + K + bits + batch)
    packed, codebook, W = random_layer(N, K, bits, group_size, generator)
    x = torch.randn(batch, K, generator=generator).to(torch.float16)
    y, x_used = run_version(version, bits, group_size, packed, codebook, x, emulated)
    assert y.shape == (batch, N) and y.dtype == torch.float16
    assert_close_to_fp16_rounding(y, x_used @ W.T, x_used.abs() @ W.abs().T)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_identity_codebook_is_exact(emulated, version, bits):
    # codebook[n, g, j] = j and integer activations: every product and sum is an exact integer in fp32,
    # so the only rounding is the final one to fp16, the same on both sides
    N, K, group_size, batch = 37, 333, 32, 3
    generator = torch.Generator().manual_seed(bits)
    packed, codebook, W = random_layer(N, K, bits, group_size, generator, identity=True)
    xi = torch.randint(-3, 4, (batch, K), generator=generator)
    exact_int8 = (xi.to(torch.int8), torch.ones(batch))
    y, _ = run_version(version, bits, group_size, packed, codebook, xi.half(), emulated, exact_int8)
    assert torch.equal(y, (xi.double() @ W.double().T).half())


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_batch_above_max_batch_is_split(emulated, version):
    max_batch = lcd_kernels.kernel_constants()["MAX_BATCH"]
    N, K, bits, group_size, batch = 19, 200, 3, 200, max_batch + 2
    generator = torch.Generator().manual_seed(7)
    packed, codebook, W = random_layer(N, K, bits, group_size, generator)
    x = torch.randn(batch, K, generator=generator).to(torch.float16)
    assert len(lcd_kernels.kernel_launches(version, bits, group_size, packed, codebook,
                                   x if version == "v2" else x.to(torch.int8), torch.empty(batch, N).half(),
                                   torch.ones(batch))) == 2
    y, x_used = run_version(version, bits, group_size, packed, codebook, x, emulated)
    assert_close_to_fp16_rounding(y, x_used @ W.T, x_used.abs() @ W.abs().T)


def lut_layer_with_everything(N, K, bits, group_size, generator):
    """A LUTLinear with groups, outliers, a bias and a smoothing scale, and its dense weight (N, K)."""
    C, G = 2 ** bits, -(-K // group_size)
    idx = torch.randint(0, C, (N, K), generator=generator)
    codebook = torch.randn(N, G, C, generator=generator)
    rows = torch.randint(0, N, (12,), generator=generator)
    cols = torch.randperm(K, generator=generator)[:12]   # distinct positions
    vals = 5 * torch.randn(12, generator=generator)
    layer = packed_model.LUTLinear.from_clustered(codebook, idx, bits, group_size, bias=torch.randn(N, generator=generator),
                                         outliers=(rows, cols, vals),
                                         in_scale=torch.rand(K, generator=generator) + 0.5)
    return layer.eval()


@pytest.mark.parametrize("version, a_bits", [("v1", None), ("v2", None), ("dequant", None), (None, None),
                                             ("v2", 8), ("v3", 8), (None, 8), ("v3", 4)])
def test_lut_forward_matches_lutlinear_reference(emulated, version, a_bits):
    # lcd_kernels.lut_forward is what LUTLinear runs on a GPU (with cuda_launch); here the same launches run on
    # the emulator and must agree with LUTLinear's PyTorch reference, outliers, bias, in_scale and a_bits
    # included. None lets lut_forward choose (10 rows > GEMV_BATCH_LIMIT picks dequant).
    N, K, bits, group_size = 29, 150, 3, 32
    generator = torch.Generator().manual_seed(11)
    layer = lut_layer_with_everything(N, K, bits, group_size, generator)
    layer.a_bits = a_bits
    x = torch.randn(2, 5, K, generator=generator)   # (B, T, K)
    with torch.no_grad():
        reference = layer(x)
        # lut_forward receives x as LUTLinear.forward hands it over on a GPU: smoothed, fake-quantized
        x_in = x / layer.in_scale.float()
        if a_bits:
            x_in = packed_model.fake_quantize_per_token(x_in, a_bits)
        y = lcd_kernels.lut_forward(layer, x_in, emulated.launch, version)
    assert y.shape == reference.shape == (2, 5, N) and y.dtype == x.dtype
    W = layer.weight_dequantized() / layer.in_scale   # what multiplies x
    magnitude = x.abs() @ W.abs().T + reference.abs()
    # the kernels see fp16 activations and round their sum to fp16: a few fp16 ulps of the magnitude
    assert ((y - reference).abs() <= magnitude * 2.0 ** -9 + 1e-4).all()


def test_bad_operands_are_refused():
    packed = torch.zeros(4, 7, dtype=torch.int32)   # K = 100 at 2 bits needs 7 words
    codebook = torch.zeros(4, 1, 4, dtype=torch.float16)
    x = torch.zeros(1, 100, dtype=torch.float16)
    out = torch.empty(1, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="packed"):
        lcd_kernels.kernel_launches("v2", 2, 100, packed[:, :6].contiguous(), codebook, x, out)
    with pytest.raises(ValueError, match="codebook"):
        lcd_kernels.kernel_launches("v2", 2, 100, packed, codebook.float(), x, out)
    with pytest.raises(ValueError, match="unknown kernel version"):
        lcd_kernels.kernel_launches("v9", 2, 100, packed, codebook, x, out)


# ---- v4: 2 bits, PRMT lookups, fp16 partial sums (tests/cuda_emulation.h emulates prmt and HFMA2) ----

# one codebook per row; groups of 64 (one 128-bit load each); K = 33 loads, so lane 0 runs the loop twice
# and a group starts in every load; N leaves the last block's warps with rows past the end
V4_SHAPES = [(37, 128, 128), (37, 192, 64), (21, 2112, 2112), (13, 2112, 128)]


def v4_error_bound(x, W):
    """What fp16 partial sums may cost, at worst: in each 128-bit load a lane adds 16 products per half of
    each of two half2 chains, then the two chains, every step rounded to fp16 (relative 2^-11 of a partial
    sum, itself at most the sum of the absolute products): 17 * 2^-11 of sum |w x|, plus the final rounding
    of y to fp16 and fp32 noise."""
    magnitude = x.float().abs() @ W.abs().T
    return 17 * 2.0 ** -11 * magnitude + 2.0 ** -10 * (x.float() @ W.T).abs() + 1e-6


@pytest.mark.parametrize("N, K, group_size", V4_SHAPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_v4_matches_reference(emulated, N, K, group_size, batch):
    generator = torch.Generator().manual_seed(N + K + group_size + batch)
    packed, codebook, W = random_layer(N, K, 2, group_size, generator)
    x = torch.randn(batch, K, generator=generator).to(torch.float16)
    y = lcd_kernels.lut_matmul("v4", 2, group_size, packed, codebook, x, emulated.launch)
    assert y.shape == (batch, N) and y.dtype == torch.float16
    error = (y.float() - x.float() @ W.T).abs()
    assert (error <= v4_error_bound(x, W)).all(), f"max error {error.max().item():.3g}"


@pytest.mark.parametrize("N, K, group_size", V4_SHAPES)
def test_v4_integer_codebooks_are_exact(emulated, N, K, group_size):
    # small integer centroids, different in every row and group, and integer activations: every fp16 partial
    # sum is an integer below 2048, so v4 must be exact up to the final fp16 rounding. Any slip in the pair
    # order, the selectors, the group or the row indexing changes the result.
    generator = torch.Generator().manual_seed(K + group_size)
    G = -(-K // group_size)
    idx = torch.randint(0, 4, (N, K), generator=generator)
    codebook = torch.randint(-4, 5, (N, G, 4), generator=generator).to(torch.float16)
    W = packed_model.dequantize(codebook.float(), idx, group_size)
    xi = torch.randint(-3, 4, (2, K), generator=generator)
    y = lcd_kernels.lut_matmul("v4", 2, group_size, packed_model.pack_indices(idx, 2), codebook, xi.half(), emulated.launch)
    assert torch.equal(y, (xi.double() @ W.double().T).half())


def test_v4_refuses_what_it_cannot_serve():
    N, K = 4, 128
    packed = torch.zeros(N, K // 16, dtype=torch.int32)
    codebook = torch.zeros(N, 1, 4, dtype=torch.float16)
    out = torch.empty(1, N, dtype=torch.float16)
    with pytest.raises(ValueError, match="use v2"):   # K not a multiple of 64
        lcd_kernels.kernel_launches("v4", 2, 120, packed[:, :8].contiguous(), codebook, torch.zeros(1, 120).half(), out)
    with pytest.raises(ValueError, match="use v2"):   # groups of 32 straddle a 128-bit load
        lcd_kernels.kernel_launches("v4", 2, 32, packed, torch.zeros(N, 4, 4).half(), torch.zeros(1, K).half(), out)
    with pytest.raises(ValueError, match="use v2"):   # 3 bits
        lcd_kernels.kernel_launches("v4", 3, K, torch.zeros(N, 13, dtype=torch.int32), torch.zeros(N, 1, 8).half(),
                            torch.zeros(1, K).half(), out)
    x_unaligned = torch.zeros(K + 1, dtype=torch.float16)[1:].view(1, K)   # starts 2 bytes into its storage
    with pytest.raises(ValueError, match="aligned"):
        lcd_kernels.kernel_launches("v4", 2, K, packed, codebook, x_unaligned, out)


def test_lut_forward_picks_v4_where_it_applies(emulated):
    launched = []

    def recording_launch(name, grid, block, args):
        launched.append(name)
        emulated.launch(name, grid, block, args)

    generator = torch.Generator().manual_seed(5)
    N, K = 24, 192
    for bits, group_size, rows, expected in [(2, 64, 1, "v4"), (2, None, 1, "v4"), (2, 32, 1, "v2"),
                                             (2, None, 2, "v2"), (3, None, 1, "v2")]:
        idx = torch.randint(0, 2 ** bits, (N, K), generator=generator)
        codebook = torch.randn(N, K // (group_size or K), 2 ** bits, generator=generator)
        layer = packed_model.LUTLinear.from_clustered(codebook, idx, bits, group_size, bias=torch.randn(N, generator=generator))
        x = torch.randn(rows, K, generator=generator)
        launched.clear()
        with torch.no_grad():
            reference = layer(x)
            y = lcd_kernels.lut_forward(layer, x, recording_launch)
        assert launched == [f"lut_gemv_{expected}_b{bits}"], (bits, group_size, rows, launched)
        W = layer.weight_dequantized()
        assert ((y - reference).abs() <= v4_error_bound(x, W) + 2.0 ** -9 * reference.abs()).all()


def test_emulated_prmt_and_hfma2(emulated):
    lib = emulated.library
    lib.emulated_prmt.restype = lib.emulated_hfma2_bits.restype = ctypes.c_uint32
    prmt = lambda lo, hi, s: lib.emulated_prmt(ctypes.c_uint32(lo), ctypes.c_uint32(hi), ctypes.c_uint32(s))
    # PTX ISA, prmt default mode: result byte n = byte (selector nibble n & 7) of hi:lo, bit 3 = sign fill
    assert prmt(0x33221100, 0x77665544, 0x3210) == 0x33221100
    assert prmt(0x33221100, 0x77665544, 0x7531) == 0x77553311
    assert prmt(0x33221100, 0x77665544, 0xFFFF0000 | 0x0746) == 0x00774466   # high selector bits ignored
    assert prmt(0x000080FF, 0, 0x9810) == 0xFFFF80FF                         # sign fill of bytes 0 and 1
    # HFMA2: a * b + c rounded once to fp16, on each half, against numpy's correctly rounded float64 -> fp16
    generator = torch.Generator().manual_seed(3)
    a, b, c = ((torch.randn(3000, generator=generator) * 2.0 ** torch.randint(-6, 7, (3000,), generator=generator)).half()
               for _ in range(3))
    exact = (a.double() * b.double() + c.double()).numpy()   # exact: the exponents are close enough
    expected = exact.astype(np.float16).view(np.uint16)
    a16, b16, c16 = ((t.view(torch.int16).to(torch.int64) & 0xFFFF).tolist() for t in (a, b, c))
    got = []
    for i in range(0, 3000, 2):
        pair = lambda t: ctypes.c_uint32(t[i] | t[i + 1] << 16)
        r = lib.emulated_hfma2_bits(pair(a16), pair(b16), pair(c16))
        got += [r & 0xFFFF, r >> 16]
    assert (np.array(got) == expected).all()


# ---- the GPU compiler: registers, spills, shared memory ----

def ptxas_report(arch):
    """{kernel: {"registers", "spill_bytes", "stack_bytes", "smem_bytes"}} from nvcc -Xptxas -v."""
    with tempfile.TemporaryDirectory() as tmp:
        command = ["nvcc", "-cubin", f"-arch={arch}", "-Xptxas", "-v", cuda_emulation.KERNELS_CU,
                   "-o", os.path.join(tmp, "lcd_kernels.cubin")]
        result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed for {arch}:\n{result.stderr}"
    report, kernel = {}, None
    for line in result.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            kernel = m.group(1)
            report[kernel] = {"registers": None, "spill_bytes": 0, "stack_bytes": 0, "smem_bytes": 0}
        elif kernel and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            report[kernel]["stack_bytes"] = int(m.group(1))
            report[kernel]["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        elif kernel and (m := re.search(r"Used (\d+) registers", line)):
            report[kernel]["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                report[kernel]["smem_bytes"] = int(s.group(1))
    return report


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptxas_no_spills(arch, capsys):
    report = ptxas_report(arch)
    with open(cuda_emulation.KERNELS_CU) as f:
        assert sorted(report) == sorted(cuda_emulation.kernel_names(f.read())), "ptxas output not understood"
    with capsys.disabled():
        print(f"\nkernels.cu on {arch}:  kernel  registers  spill bytes  stack bytes  static smem bytes")
        for name, r in sorted(report.items()):
            print(f"  {name:16s} {r['registers']:4d} {r['spill_bytes']:6d} {r['stack_bytes']:6d} {r['smem_bytes']:8d}")
    spilling = {name: r for name, r in report.items() if r["spill_bytes"] > 0}
    assert not spilling, f"register spills on {arch}: {spilling}"
    assert all(r["smem_bytes"] <= 48 * 1024 for r in report.values()), "static shared memory is capped at 48 KiB"


# ---- bench.py --sass: the SASS reader, on a made-up listing; then on kernels.cu where cuobjdump exists ----

def test_sass_loop_blocks_finds_the_loop_body():
    import bench
    listing = [(0x00, "MOV R1, c[0x0][0x28]"), (0x10, "@P0 BRA 0x60"),        # skips the loop
               (0x20, "LDG.E R2, desc[UR4][R4.64]"), (0x30, "FFMA R3, R2, R2, R3"),
               (0x40, "ISETP.GE.AND P1, PT, R5, R6, PT"), (0x50, "@!P1 BRA 0x20"),  # the loop: 0x20-0x50
               (0x60, "EXIT"), (0x70, "BRA 0x70")]                             # the end; a self-loop pad
    blocks = bench.loop_blocks(listing)
    assert (0x20, ["LDG.E R2, desc[UR4][R4.64]", "FFMA R3, R2, R2, R3", "ISETP.GE.AND P1, PT, R5, R6, PT",
                   "@!P1 BRA 0x20"]) in blocks
    assert all(address != 0x00 for address, _ in blocks)
    assert bench.opcode("@!P1 BRA 0x20") == "BRA"
    assert bench.pipe_mix(["FFMA R3, R2, R2, R3", "HFMA2.MMA R1, R2, R3, RZ", "PRMT R1, R2, 0x5410, R3",
                           "IMAD.WIDE.U32 R2, R3, 0x110011, R4", "LDG.E R2, desc[UR4][R4.64]"]) == \
        {"alu": 1, "imad": 1, "fp": 1, "mma": 1, "mem": 1, "other": 0}


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cuobjdump") is None,
                    reason="needs nvcc and cuobjdump")
def test_sass_counts_of_v2_and_v4(capsys):
    import bench
    bench.apply_overrides(["--bits=2"])
    with capsys.disabled():
        result = bench.bench_sass()
    per_weight = {k["kernel"]: k["instructions_per_weight"] for k in result["kernels"]}
    assert set(per_weight) == {"lut_gemv_v2_b2", "lut_gemv_v4_b2"}
    assert per_weight["lut_gemv_v4_b2"] < per_weight["lut_gemv_v2_b2"]


# ---- the real GPU, through CuPy ----

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cupy_launch():
    """lcd_kernels.cuda_launch; on a machine with a GPU, CuPy missing is a failure, not a skip."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        pytest.fail("a CUDA GPU is present but CuPy is not installed: pip install -r requirements.txt")
    return lcd_kernels.cuda_launch


@needs_gpu
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cupy_kernels_on_gpu(cupy_launch, version, bits):
    import bench
    N, K, group_size, batch = 300, 1000, 32, 3
    generator = torch.Generator().manual_seed(bits)
    packed, codebook, _ = random_layer(N, K, bits, group_size, generator)
    x = torch.randn(batch, K, generator=generator).to(torch.float16)
    error, bound = bench.kernel_error(version, bits, group_size, packed.cuda(), codebook.cuda(), x.cuda(),
                                      cupy_launch)
    assert error <= bound


@needs_gpu
@pytest.mark.parametrize("rows, a_bits", [(1, None), (3, None), (10, None), (1, 8), (10, 8)])
def test_lutlinear_on_gpu_runs_the_kernels(cupy_launch, rows, a_bits):
    # LUTLinear.forward on a CUDA tensor goes through kernels.cu (lut_forward_cuda): outliers, bias,
    # in_scale and a_bits included, it must agree with the PyTorch reference on the CPU
    N, K, bits, group_size = 29, 150, 3, 32
    generator = torch.Generator().manual_seed(rows)
    layer = lut_layer_with_everything(N, K, bits, group_size, generator)
    layer.a_bits = a_bits
    x = torch.randn(rows, K, generator=generator)
    with torch.no_grad():
        reference = layer(x)
        y = layer.cuda()(x.cuda()).cpu()
    W = layer.cpu().weight_dequantized() / layer.in_scale.float()
    assert ((y - reference).abs() <= (x.abs() @ W.abs().T + reference.abs()) * 2.0 ** -9 + 1e-4).all()


@needs_gpu
@pytest.mark.parametrize("group_size", [64, 4096])
@pytest.mark.parametrize("batch", [1, 2])
def test_cupy_v4_on_gpu(cupy_launch, group_size, batch):
    N, K = 300, 4096
    generator = torch.Generator().manual_seed(group_size + batch)
    packed, codebook, W = random_layer(N, K, 2, group_size, generator)
    x = torch.randn(batch, K, generator=generator).to(torch.float16)
    y = lcd_kernels.lut_matmul("v4", 2, group_size, packed.cuda(), codebook.cuda(), x.cuda(), cupy_launch)
    torch.cuda.synchronize()
    assert ((y.float().cpu() - x.float() @ W.T).abs() <= v4_error_bound(x, W)).all()
