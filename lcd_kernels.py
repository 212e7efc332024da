"""
lcd_kernels.py: the loaders of the LUT kernels, beside the kernels they load. lcd.py's LUTLinear hands its
product here when a faster path than its PyTorch reference exists:

  1. CUDA path  - kernels.cu compiled by CuPy (NVRTC) at first use, launched on torch's own tensors
  2. CPU path   - kernels.c compiled by the system C compiler at first use, called through ctypes

The packed format these kernels read is lcd.py section 3 (drawn there, followed exactly by kernels.cu):
b-bit indices packed along K into int32 words, 32 // b entries a word (3-bit: 10, 2 bits spare), entry 0
in the lowest bits; fp16 codebooks (N, G, 2^b). This file imports no project file: a layer reaches it as
any object with LUTLinear's attributes (packed, codebook, bits, group_size, a_bits, bias, outliers).
"""
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import weakref

import numpy as np
import torch
import torch.nn.functional as F


# ==== 1. CUDA path ==============================================================================
# On a GPU, LUTLinear.forward hands its work to lut_forward_cuda(): kernels.cu, compiled by CuPy (NVRTC) at
# first use, runs on torch's own CUDA tensors and stream (raw pointers, no copies). Only the LUT product
# runs in kernels.cu; the rest stays in torch: LUTLinear.forward applies the smoothing scale and the
# activation fake-quantization before it calls us, lut_forward adds the outlier corrections and the bias.
# The launch geometry is plain Python (kernel_launches), so tests/cuda_emulation.py replays on the CPU
# exactly the launches CuPy makes on the GPU. Without CuPy or a GPU, LUTLinear keeps its PyTorch reference.
KERNELS_CU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cu")
KERNEL_VERSIONS = ("v1", "v2", "v3", "v4", "dequant")   # naive to fast; dequant = dense fp16 W, then a matmul
CUDA_KERNEL = "v2"        # the GEMV kernel LUTLinear uses on a GPU for fp16 activations ...
CUDA_KERNEL_2BIT = "v4"   # ... and at 2 bits and batch 1 where v4's shape rules hold (v4_supports)
CUDA_KERNEL_INT8 = "v3"   # ... and when the layer quantizes its activations to 8 bits (same result, no multiplies)
GEMV_BATCH_LIMIT = 8      # more activation rows than this: dequant + fp16 matmul (an unmeasured guess: bench.py)


@functools.lru_cache(maxsize=None)
def kernel_constants():
    """The #define'd integers of kernels.cu (MAX_BATCH, WARPS_PER_BLOCK, ...): one source of truth."""
    with open(KERNELS_CU) as f:
        constants = {name: int(value) for name, value in re.findall(r"^#define (\w+) (\d+)\b", f.read(), re.M)}
    constants["ROW_THREADS"] = constants["WARPS_PER_BLOCK"] * constants["WARP_SIZE"]
    constants["V4_THREADS"] = constants["V4_WARPS_PER_BLOCK"] * constants["WARP_SIZE"]
    return constants


def v4_supports(bits, group_size, K):
    """Whether kernels.cu's v4 can serve a layer: 2 bits, K a multiple of V4_COLUMNS (64: one 128-bit load of
    indices), one codebook per row or groups of a multiple of V4_COLUMNS. Else v2 does (see kernels.cu)."""
    columns = kernel_constants()["V4_COLUMNS"]
    return bits == 2 and K % columns == 0 and (group_size >= K or group_size % columns == 0)


def _check_kernel_operands(bits, group_size, packed, codebook, K):
    if bits not in (2, 3, 4):
        raise ValueError(f"bits must be 2, 3 or 4, got {bits}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int (K for one codebook per row), got {group_size!r}")
    N, n_words = packed.shape
    if packed.dtype != torch.int32 or n_words != -(-K // (32 // bits)):
        raise ValueError(f"packed must be int32 (N, ceil(K / {32 // bits})) for K={K}, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    G = -(-K // group_size)
    if codebook.dtype != torch.float16 or tuple(codebook.shape) != (N, G, 2 ** bits):
        raise ValueError(f"codebook must be fp16 (N, G, 2^b) = {(N, G, 2 ** bits)}, got {codebook.dtype} "
                         f"{tuple(codebook.shape)}")
    if not (packed.is_contiguous() and codebook.is_contiguous()):
        raise ValueError("packed and codebook must be contiguous")


def kernel_launches(version, bits, group_size, packed, codebook, x, out, x_scale=None):
    """The launches [(kernel name, grid, block, args)] that make one kernels.cu version compute
        v1, v2, v4: out (B, N) fp16 = x (B, K) fp16 @ W^T   (v4: only where v4_supports)
        v3:       out (B, N) fp16 = x_scale[:, None] * (x (B, K) int8 @ W^T), x_scale (B,) float32
        dequant:  out (N, K) fp16 = W
    with W[n, k] = codebook[n, k // group_size, index of (n, k) in packed]. Args are tensors (passed by
    pointer) and ints (C int), all on one device and contiguous."""
    if version not in KERNEL_VERSIONS:
        raise ValueError(f"unknown kernel version {version!r}; choose one of {KERNEL_VERSIONS}")
    c = kernel_constants()
    N, K = packed.shape[0], (out.shape[1] if version == "dequant" else x.shape[1])
    _check_kernel_operands(bits, group_size, packed, codebook, K)
    if version == "dequant":
        n_words = packed.shape[1]
        grid = (-(-N * n_words // c["DEQUANT_THREADS"]), 1, 1)
        return [(f"lut_dequant_b{bits}", grid, (c["DEQUANT_THREADS"], 1, 1), (packed, codebook, out, N, K, group_size))]
    B = x.shape[0]
    want_dtype = torch.int8 if version == "v3" else torch.float16
    if x.dtype != want_dtype or not x.is_contiguous() or tuple(out.shape) != (B, N) or not out.is_contiguous():
        raise ValueError(f"{version} takes x contiguous {want_dtype} (B, K) and out contiguous fp16 (B, N)")
    if version == "v3" and (x_scale is None or x_scale.dtype != torch.float32 or tuple(x_scale.shape) != (B,)):
        raise ValueError("v3 takes x_scale, a float32 (B,) tensor: one scale per activation row")
    if version == "v4":   # a warp per V4_ROWS_PER_WARP rows, one grid row per batch row (indices re-read)
        if not v4_supports(bits, group_size, K):
            raise ValueError(f"v4 takes 2-bit layers with K a multiple of {c['V4_COLUMNS']} and one codebook per row "
                             f"or groups of a multiple of {c['V4_COLUMNS']}; got bits={bits}, K={K}, "
                             f"group_size={group_size}: use v2")
        if any(t.data_ptr() % 16 for t in (packed, x)) or codebook.data_ptr() % 8:
            raise ValueError("v4 reads packed and x 16 bytes at a time and the codebook 8: their data must be "
                             "16- and 8-byte aligned (pass a fresh .contiguous() copy)")
        rows_per_block = c["V4_WARPS_PER_BLOCK"] * c["V4_ROWS_PER_WARP"]
        grid = (-(-N // rows_per_block), B, 1)
        return [(f"lut_gemv_v4_b{bits}", grid, (c["V4_THREADS"], 1, 1), (packed, codebook, x, out, N, K, B, group_size))]
    if version == "v1":   # one thread per output, one grid row per batch row
        grid = (-(-N // c["V1_THREADS"]), B, 1)
        return [(f"lut_gemv_v1_b{bits}", grid, (c["V1_THREADS"], 1, 1), (packed, codebook, x, out, N, K, B, group_size))]
    grid, block = (-(-N // c["WARPS_PER_BLOCK"]), 1, 1), (c["ROW_THREADS"], 1, 1)
    launches = []
    for start in range(0, B, c["MAX_BATCH"]):   # a launch takes at most MAX_BATCH rows
        rows = slice(start, start + c["MAX_BATCH"])
        b = x[rows].shape[0]
        if version == "v2":
            args = (packed, codebook, x[rows], out[rows], N, K, b, group_size)
        else:
            args = (packed, codebook, x[rows], x_scale[rows], out[rows], N, K, b, group_size)
        launches.append((f"lut_gemv_{version}_b{bits}", grid, block, args))
    return launches


def quantize_activations(x, a_bits):
    """Per-token symmetric quantization with the rule of packed_model.fake_quantize_per_token (lcd.py section 4), returning the
    integers: x (B, K) ~ scale[:, None] * q, q int8 in [-(2^(a-1) - 1), 2^(a-1) - 1], scale (B,) float32."""
    q_max = 2 ** (a_bits - 1) - 1
    scale = x.float().abs().amax(dim=1).clamp_min(1e-8) / q_max
    q = (x.float() / scale[:, None]).round().clamp(-q_max, q_max).to(torch.int8)
    return q, scale


def lut_matmul(version, bits, group_size, packed, codebook, x, launch, x_scale=None):
    """y (B, N) fp16 from x (B, K) (fp16; int8 with x_scale for v3) through one kernels.cu version.
    `launch(name, grid, block, args)` runs a kernel: cuda_launch on a GPU, the CPU emulation in tests."""
    N, device = packed.shape[0], packed.device
    if version == "dequant":
        W = torch.empty(N, x.shape[1], dtype=torch.float16, device=device)   # (N, K)
        for name, grid, block, args in kernel_launches(version, bits, group_size, packed, codebook, None, W):
            launch(name, grid, block, args)
        return F.linear(x, W)
    y = torch.empty(x.shape[0], N, dtype=torch.float16, device=device)       # (B, N)
    for name, grid, block, args in kernel_launches(version, bits, group_size, packed, codebook, x, y, x_scale):
        launch(name, grid, block, args)
    return y


def lut_forward(layer, x, launch, version=None):
    """A LUTLinear's output from its packed format, x (..., K) -> (..., N). x arrives as LUTLinear.forward
    leaves it: already divided by in_scale and, with a_bits, fake-quantized per token. `version` None
    picks the kernel: dequant + fp16 matmul past GEMV_BATCH_LIMIT rows, else v3 when the activations are
    quantized (a_bits), else v4 for one row of a layer v4 supports, else v2; forcing v3 on unquantized
    activations rounds them to int8 first. The
    kernels take fp16 activations and give fp16 outputs (fp32 accumulation); outlier corrections and the
    bias are added here, in fp32."""
    N, K = layer.out_features, layer.in_features
    x2 = x.reshape(-1, K)                                                     # (B, K)
    if version is None:
        quantized = layer.a_bits is not None
        if x2.shape[0] > GEMV_BATCH_LIMIT:
            version = "dequant"
        elif quantized:
            version = CUDA_KERNEL_INT8
        elif x2.shape[0] == 1 and v4_supports(layer.bits, layer.group_size, K):
            version = CUDA_KERNEL_2BIT   # v4 re-reads the indices per batch row: batch 1 only (v2 reads them once)
        else:
            version = CUDA_KERNEL
    if version == "v3":   # fake-quantized activations come back as their exact integers and scale
        q, scale = quantize_activations(x2, layer.a_bits or 8)
        y = lut_matmul("v3", layer.bits, layer.group_size, layer.packed, layer.codebook, q, launch, x_scale=scale)
    else:
        x16 = x2.to(torch.float16).contiguous()
        if version == "v4" and x16.data_ptr() % 16:   # a view into a bigger tensor: v4 needs 16-byte rows
            x16 = x16.clone()
        y = lut_matmul(version, layer.bits, layer.group_size, layer.packed, layer.codebook, x16, launch)
    y = y.float()                                                             # (B, N)
    if layer.outlier_rows is not None:   # an outlier replaces its centroid: add x * (outlier - centroid)
        rows, cols, delta = layer.outlier_corrections()
        y.index_add_(1, rows, x2[:, cols].float() * delta)                    # (B, n_outliers) into (B, N)
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


_cuda_module = None      # kernels.cu compiled by CuPy (NVRTC), loaded on first use
_cuda_functions = {}     # (device index, kernel name) -> CuPy kernel
_cuda_available = None   # cuda_kernels_available(), asked once


def cuda_kernels_available():
    """True when kernels.cu can run here: torch sees a CUDA GPU and CuPy is installed."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_launch(name, grid, block, args):
    """Launch one kernels.cu kernel on torch's current CUDA stream. Tensors go in as raw device pointers
    (no copies, torch keeps ownership), ints as C int."""
    global _cuda_module
    import cupy
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if any(isinstance(a, torch.Tensor) and a.device != device for a in args):
        raise ValueError(f"all tensors of {name} must be on {device}")
    with cupy.cuda.Device(device.index):
        if (device.index, name) not in _cuda_functions:
            if _cuda_module is None:
                with open(KERNELS_CU) as f:
                    _cuda_module = cupy.RawModule(code=f.read(), options=("-std=c++17",))
            _cuda_functions[device.index, name] = _cuda_module.get_function(name)
        values = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else np.int32(a) for a in args)
        with cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
            _cuda_functions[device.index, name](tuple(grid), tuple(block), values)


def lut_forward_cuda(layer, x):
    """LUTLinear.forward on a GPU: the best kernels.cu kernel for the batch (see lut_forward); None when
    CuPy is missing, and LUTLinear runs its PyTorch reference instead. The kernels take and give fp16: for
    fp32 or bf16 activations past fp16's range (65504), or outputs past it, they would give inf where x's own dtype
    holds the value, so such a batch (a non-finite result) also goes back to the reference, in x's dtype."""
    global _cuda_available
    if _cuda_available is None:
        _cuda_available = cuda_kernels_available()
    if not _cuda_available:
        return None
    y = lut_forward(layer, x, cuda_launch)
    if x.dtype != torch.float16 and not torch.isfinite(y).all():   # one check; fp16 x overflows alike in torch
        return None
    return y


# ==== 2. CPU path ===============================================================================
# On a CPU, LUTLinear.forward hands fp32 activations that need no gradient to lut_forward_cpu(): kernels.c,
# built at first use by the system C compiler (no new dependency), cached under CPU_CACHE_DIR by a hash
# of its source and flags, loaded with ctypes and called on torch's own tensors (data_ptr: no copies),
# with torch's thread count for OpenMP. Outliers and the bias are added here, in torch, as on the GPU.
# Without a compiler, or when compiling fails, one line on stderr says why, once, and every call returns
# None: LUTLinear then runs its PyTorch reference (lcd.py section 4), as it does with CPU_KERNELS off.
KERNELS_C = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.c")
CPU_KERNELS = os.environ.get("LCD_CPU_KERNELS", "1") != "0"   # False (or LCD_CPU_KERNELS=0): the torch reference
CPU_COMPILER = os.environ.get("CC", "cc")                     # the system C compiler
CPU_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
CPU_CACHE_DIR = os.environ.get("LCD_KERNEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lcd-kernels"))
CPU_VERSIONS = ("v0", "v1", "v2", "v3", "v4", "sgemm")   # naive to fast (kernels.c); sgemm: v3-decoded blocks, torch.mm
CPU_KERNEL = "v3"            # the kernel LUTLinear uses on a CPU up to CPU_GEMV_ROWS activation rows ...
CPU_BATCH_KERNEL = "v4"      # ... and past them (bench.py --cpu measures both against dense F.linear)
CPU_GEMV_ROWS = 1            # v3 decodes a row again for every activation row: more rows go to v4
CPU_DECODE_BYTES = 2 ** 20   # sgemm: fp32 bytes of weight rows decoded at a time (to stay in L2)
Q8_BLOCK = 32                # GGUF Q8_0: weights per block, each block an fp16 scale + 32 int8 (34 bytes)

_cpu_library = None      # the loaded kernels.c, or None
_cpu_failure = None      # why it is unavailable (said once), or None


def _build_cpu_library():
    """Compile kernels.c into CPU_CACHE_DIR (once per source and flags) and load it; raises with the reason."""
    compiler = shutil.which(CPU_COMPILER)
    if compiler is None:
        raise RuntimeError(f"no C compiler: {CPU_COMPILER!r} is not on PATH")
    with open(KERNELS_C, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + repr((compiler, CPU_FLAGS)).encode()).hexdigest()[:16]
    path = os.path.join(CPU_CACHE_DIR, f"kernels-{key}.so")
    if not os.path.exists(path):
        os.makedirs(CPU_CACHE_DIR, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=CPU_CACHE_DIR)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *CPU_FLAGS, KERNELS_C, "-o", tmp], capture_output=True, text=True)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
                raise RuntimeError(f"{CPU_COMPILER} failed on kernels.c: {first}")
            os.replace(tmp, path)   # atomic: a concurrent build never loads half a file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    lib = ctypes.CDLL(path)
    p, i = ctypes.c_void_p, ctypes.c_int
    for version in CPU_VERSIONS[:5]:
        name = "lut_gemm_v4" if version == "v4" else f"lut_gemv_{version}"
        getattr(lib, name).argtypes = [p, p, p, p] + [i] * 6
    lib.lut_decode_rows.argtypes = [p, p, p] + [i] * 6
    lib.q8_gemv.argtypes = [p, p, p] + [i] * 4
    lib.copy_bytes.argtypes = [p, p, ctypes.c_int64, i]
    return lib


def cpu_library():
    """kernels.c loaded (ctypes.CDLL), or None when it cannot be built: the reason is printed once to stderr."""
    global _cpu_library, _cpu_failure
    if _cpu_library is None and _cpu_failure is None:
        try:
            _cpu_library = _build_cpu_library()
        except (OSError, RuntimeError) as e:
            _cpu_failure = str(e)
            print(f"lcd: CPU kernels unavailable ({_cpu_failure}); using the PyTorch reference", file=sys.stderr)
    return _cpu_library


def lut_matmul_cpu(version, bits, group_size, packed, codebook, x, threads=None):
    """y (B, N) float32 = x (B, K) float32 @ W^T through one kernels.c version (CPU_VERSIONS), W[n, k] =
    codebook[n, k // group_size, index of (n, k) in packed]; fp32 arithmetic throughout. threads: OpenMP
    threads (None: torch.get_num_threads()). Raises RuntimeError when kernels.c is unavailable."""
    lib = cpu_library()
    if lib is None:
        raise RuntimeError(f"kernels.c is unavailable: {_cpu_failure}")
    if version not in CPU_VERSIONS:
        raise ValueError(f"unknown CPU kernel version {version!r}; choose one of {CPU_VERSIONS}")
    K = x.shape[1]
    _check_kernel_operands(bits, group_size, packed, codebook, K)
    if x.dtype != torch.float32 or x.is_cuda or not x.is_contiguous() or x.dim() != 2:
        raise ValueError("the CPU kernels take x as a contiguous (B, K) float32 CPU tensor")
    threads = threads or torch.get_num_threads()
    (N, _), B = packed.shape, x.shape[0]
    if version == "sgemm":   # decode CPU_DECODE_BYTES of rows, multiply them at once (BLAS), next block
        width = -(-K // 8) * 8                                            # kernels.c pads rows to 8 floats
        step = max(1, min(N, CPU_DECODE_BYTES // (4 * width)))
        W, y_t = torch.empty(step, width), torch.empty(N, B)
        for start in range(0, N, step):
            stop = min(start + step, N)
            lib.lut_decode_rows(packed.data_ptr(), codebook.data_ptr(), W.data_ptr(), start, stop, K, bits,
                                min(group_size, K), threads)
            torch.mm(W[:stop - start, :K], x.T, out=y_t[start:stop])
        return y_t.T.contiguous()
    y = torch.empty(B, N)
    kernel = lib.lut_gemm_v4 if version == "v4" else getattr(lib, f"lut_gemv_{version}")
    kernel(packed.data_ptr(), codebook.data_ptr(), x.data_ptr(), y.data_ptr(), N, K, B, bits, min(group_size, K),
           threads)
    return y


def lut_forward_cpu(layer, x, version=None):
    """LUTLinear.forward on a CPU: x (..., K) float32 (after the input scale and activation quantization)
    -> x W_hat^T + bias (..., N) float32, outliers included, from kernels.c (`version` None: CPU_KERNEL up
    to CPU_GEMV_ROWS rows, else CPU_BATCH_KERNEL). None when it cannot serve the call (CPU_KERNELS off, no
    compiler, not fp32 on the CPU, a gradient wanted): LUTLinear then runs its PyTorch reference."""
    if (not CPU_KERNELS or x.dtype != torch.float32 or x.is_cuda or (x.requires_grad and torch.is_grad_enabled())
            or cpu_library() is None):
        return None
    N, K = layer.out_features, layer.in_features
    x2 = x.reshape(-1, K)                                                    # (B, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if version is None:
        version = CPU_KERNEL if x2.shape[0] <= CPU_GEMV_ROWS else CPU_BATCH_KERNEL
    if version == "sgemm":
        y = lut_matmul_cpu(version, layer.bits, layer.group_size, layer.packed, layer.codebook, x2)
    else:                                                                    # v0 .. v4: one C call
        y = torch.empty(x2.shape[0], N)
        _prepared_call(layer, version)(x2.data_ptr(), y.data_ptr(), x2.shape[0])
    if layer.outlier_rows is not None:   # an outlier replaces its centroid: add x * (outlier - centroid)
        rows, cols, delta = layer.outlier_corrections()
        y.index_add_(1, rows, x2[:, cols] * delta)                           # (B, n_outliers) into (B, N)
    if layer.bias is not None:
        y += layer.bias.float()
    return y.view(*x.shape[:-1], N)


# A generated token calls 210 small matrices, where Python's own time per call (checking the operands,
# reading pointers) was as long as the kernel's: so a layer's operands are checked once and its kernel kept
# with their pointers, until the layer's buffers are other tensors (model.to(), a new packed tensor).
_prepared = weakref.WeakKeyDictionary()   # layer -> {version: (packed, codebook (weak), their pointers, call)}


def _prepared_call(layer, version):
    """fn(x_ptr, y_ptr, B) running kernels.c's `version` (v0 .. v4) on layer's packed weights; built, and
    the operands checked, at the first call and again whenever layer.packed or layer.codebook has changed.
    Each version keeps its own (a prompt runs v4, the tokens after it v3)."""
    packed, codebook = layer.packed, layer.codebook
    cached = _prepared.setdefault(layer, {}).get(version)
    if (cached is not None and cached[0]() is packed and cached[1]() is codebook
            and cached[2] == packed.data_ptr() and cached[3] == codebook.data_ptr()):
        return cached[4]
    if version not in CPU_VERSIONS[:5]:
        raise ValueError(f"unknown CPU kernel version {version!r}; choose one of {CPU_VERSIONS}")
    N, K, bits = layer.out_features, layer.in_features, layer.bits
    _check_kernel_operands(bits, layer.group_size, packed, codebook, K)
    fn = cpu_library().lut_gemm_v4 if version == "v4" else getattr(cpu_library(), f"lut_gemv_{version}")
    packed_ptr, codebook_ptr, group = packed.data_ptr(), codebook.data_ptr(), min(layer.group_size, K)

    def call(x_ptr, y_ptr, B):
        fn(packed_ptr, codebook_ptr, x_ptr, y_ptr, N, K, B, bits, group, torch.get_num_threads())
    _prepared[layer][version] = (weakref.ref(packed), weakref.ref(codebook), packed_ptr, codebook_ptr, call)
    return call


def q8_quantize(W):
    """W (N, K) float -> GGUF Q8_0 blocks (N, ceil(K / 32) * 34) uint8: per block of 32 weights (the row
    zero-padded to a multiple of 32) d = max|w| / 127 stored as fp16, then q = round(w / d) int8, as
    llama.cpp's quantize_row_q8_0 (q computed with the fp32 d). The weight is then fp16(d) * q."""
    N, K = W.shape
    w = F.pad(W.float(), (0, -K % Q8_BLOCK)).view(N, -1, Q8_BLOCK)          # (N, nb, 32)
    d = w.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, w / torch.where(d > 0, d, 1), 0).round().clamp(-127, 127).to(torch.int8)
    blocks = torch.cat((d.half().view(torch.uint8).view(N, -1, 2), q.view(torch.uint8)), -1)   # (N, nb, 34)
    return blocks.reshape(N, -1).contiguous()


def q8_dequantize(blocks, K):
    """Q8_0 blocks (N, nb * 34) uint8 -> W (N, K) float32 = fp16 scale * int8 weight, padding dropped."""
    b = blocks.view(blocks.shape[0], -1, 2 + Q8_BLOCK)
    d = b[..., :2].contiguous().view(torch.float16).float()                 # (N, nb, 1)
    return (d * b[..., 2:].contiguous().view(torch.int8).float()).reshape(blocks.shape[0], -1)[:, :K]


def q8_forward_cpu(blocks, x, N):
    """x (..., K) float32 -> x W^T (..., N) float32 with W the Q8_0 blocks (N, nb * 34) through kernels.c's
    q8_gemv (x zero-padded to 32 nb columns when K is not a multiple of 32); None when kernels.c cannot
    serve the call (as lut_forward_cpu): the caller multiplies by q8_dequantize instead."""
    if (not CPU_KERNELS or x.dtype != torch.float32 or x.is_cuda or (x.requires_grad and torch.is_grad_enabled())
            or cpu_library() is None):
        return None
    K_pad = blocks.shape[1] // (2 + Q8_BLOCK) * Q8_BLOCK
    x2 = F.pad(x.reshape(-1, x.shape[-1]), (0, K_pad - x.shape[-1])).contiguous()   # (B, K_pad)
    y = torch.empty(x2.shape[0], N)
    cpu_library().q8_gemv(blocks.data_ptr(), x2.data_ptr(), y.data_ptr(), N, K_pad, x2.shape[0],
                          torch.get_num_threads())
    return y.reshape(*x.shape[:-1], N)
