"""
lcd_kernels.py: the loaders of the LUT kernels, beside the kernels they load. packed_model.py's LUTLinear hands its
product here when a faster path than its PyTorch reference exists:

  1. CUDA path  - kernels.cu compiled by CuPy (NVRTC) at first use, launched on torch's own tensors
  2. CPU path   - kernels.c compiled by the system C compiler at first use, called through ctypes
  3. the decode step in C - a Llama's whole token (or prompt) in one kernels.c call, for generate()

The packed format these kernels read is packed_model.py section 1 (drawn there, followed exactly by kernels.cu):
b-bit indices packed along K into int32 words, 32 // b entries a word (3-bit: 10, 2 bits spare), entry 0
in the lowest bits; fp16 codebooks (N, G, 2^b). kernels.c's fast CPU kernels read 3-bit rows repacked at load
(R3, cpu_packed: 32 entries in 3 words, no cross-lane permute to decode). This file imports no project file: a layer reaches it as
any object with LUTLinear's attributes (packed, codebook, bits, group_size, a_bits, bias, outliers).
"""
import ctypes
import functools
import hashlib
import os
import re
import shlex
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
    """Per-token symmetric quantization with the rule of packed_model.fake_quantize_per_token (packed_model.py section 2), returning the
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
# of its source, the compiler, the flags and this CPU's instruction sets (cpu_features), loaded with
# ctypes and called on torch's own tensors (data_ptr: no copies), with torch's thread count for OpenMP.
# Outliers and the bias are added here, in torch, as on the GPU. Without a compiler, or when compiling
# fails, one line on stderr says why, once, and every call returns None: LUTLinear then runs its PyTorch
# reference (packed_model.py section 2), as it does with CPU_KERNELS off.
#
# -march=native bakes this CPU's instruction sets into the library: one built on an AVX-512 machine dies
# of SIGILL (illegal instruction) on an AVX2 machine. So the features are part of the cache key, and each
# library has a record of the features it was built for beside it (kernels-<key>.features); a library
# whose record is missing or names other features is never loaded: it is built again.
KERNELS_C = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.c")
CPU_KERNELS = os.environ.get("LCD_CPU_KERNELS", "1") != "0"   # False (or LCD_CPU_KERNELS=0): the torch reference
CPU_COMPILER = os.environ.get("CC", "cc")                     # the system C compiler, maybe with arguments ("ccache gcc")
CPU_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC") + tuple(shlex.split(os.environ.get("LCD_CFLAGS", "")))
# LCD_CFLAGS: more flags (in the cache key), e.g. -DLCD_PROFILE for llama_step's timers (decode_step_profile)
CPU_LIBS = ("-lm",)                                           # after the source: expf, sqrtf of the decode step
CPU_CACHE_DIR = os.environ.get("LCD_KERNEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lcd-kernels"))
CPU_VERSIONS = ("v0", "v1", "v2", "v3", "v4", "sgemm")   # naive to fast (kernels.c); sgemm: v3-decoded blocks, torch.mm
CPU_KERNEL = "v3"            # the kernel LUTLinear uses on a CPU up to CPU_GEMV_ROWS activation rows ...
CPU_BATCH_KERNEL = "v4"      # ... and past them (bench.py --cpu measures both against dense F.linear)
CPU_GEMV_ROWS = 1            # v3 decodes a row again for every activation row: more rows go to v4
CPU_DECODE_BYTES = 2 ** 20   # sgemm: fp32 bytes of weight rows decoded at a time (to stay in L2)
Q8_BLOCK = 32                # GGUF Q8_0: weights per block, each block an fp16 scale + 32 int8 (34 bytes)

_cpu_library = None      # the loaded kernels.c, or None
_cpu_failure = None      # why it is unavailable (said once), or None


def compiler_command():
    """CPU_COMPILER as a command: a list of words, split as a shell (and make, CMake, setuptools) would,
    so that CC="ccache gcc" or CC="gcc -pthread" work; the first word resolved on PATH. Raises
    RuntimeError naming CC when it is empty or its program is not on PATH."""
    try:
        words = shlex.split(CPU_COMPILER)
    except ValueError as e:
        raise RuntimeError(f"CC={CPU_COMPILER!r} cannot be split into words ({e}): fix its quotes") from None
    if not words:
        raise RuntimeError("CC is empty: set it to a C compiler (e.g. CC=gcc) or unset it for 'cc'")
    program = shutil.which(words[0])
    if program is None:
        raise RuntimeError(f"no C compiler: {words[0]!r} (from CC={CPU_COMPILER!r}) is not on PATH")
    return [program, *words[1:]]


def cpu_features(command):
    """This CPU's instruction sets as the compiler sees them with -march=native: the preprocessor macros
    -march=native adds to a plain compile ("#define __AVX2__ 1", "#define __AVX512F__ 1", "#define __F16C__
    1", ...), sorted. These are what a library built here may use. Raises RuntimeError when the compiler
    cannot tell."""
    def macros(flags):
        done = subprocess.run([*command, *flags, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise RuntimeError(f"{CPU_COMPILER} cannot list what -march=native means on this CPU: {first}")
        return set(done.stdout.splitlines())
    return sorted(macros(["-march=native"]) - macros([]))


def cpu_library_path(command, features):
    """(library path, features record path) in CPU_CACHE_DIR for this source, compiler, flags and CPU."""
    with open(KERNELS_C, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + repr((command, CPU_FLAGS, CPU_LIBS, features)).encode()).hexdigest()[:16]
    path = os.path.join(CPU_CACHE_DIR, f"kernels-{key}.so")
    return path, path[:-3] + ".features"


def _recorded_features(record):
    try:
        with open(record) as f:
            return f.read().splitlines()
    except OSError:
        return None


def _build_cpu_library():
    """Compile kernels.c into CPU_CACHE_DIR (once per source, compiler, flags and CPU features) and load it;
    raises with the reason. A cached library is loaded only when its record names this CPU's features."""
    command = compiler_command()
    features = cpu_features(command)
    path, record = cpu_library_path(command, features)
    if not (os.path.exists(path) and _recorded_features(record) == features):   # missing, or built for another CPU
        os.makedirs(CPU_CACHE_DIR, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=CPU_CACHE_DIR)
        os.close(fd)
        fd, tmp_record = tempfile.mkstemp(suffix=".features", dir=CPU_CACHE_DIR)
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in features))
        try:
            done = subprocess.run([*command, *CPU_FLAGS, KERNELS_C, "-o", tmp, *CPU_LIBS], capture_output=True, text=True)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
                raise RuntimeError(f"{CPU_COMPILER} failed on kernels.c: {first}")
            os.replace(tmp_record, record)   # the record first: a library is never there without its own
            os.replace(tmp, path)            # atomic: a concurrent build never loads half a file
        finally:
            for leftover in (tmp, tmp_record):
                if os.path.exists(leftover):
                    os.remove(leftover)
    lib = ctypes.CDLL(path)
    p, i = ctypes.c_void_p, ctypes.c_int
    for version in CPU_VERSIONS[:5]:
        name = "lut_gemm_v4" if version == "v4" else f"lut_gemv_{version}"
        getattr(lib, name).argtypes = [p, p, p, p] + [i] * 6
    lib.lut_decode_rows.argtypes = [p, p, p] + [i] * 6
    lib.lut_repack3.argtypes = [p, p] + [i] * 3
    lib.q8_gemv.argtypes = [p, p, p] + [i] * 4
    lib.copy_bytes.argtypes = [p, p, ctypes.c_int64, i]
    lib.llama_step.argtypes = [p, p, i, i, i, p, p, p, i]
    lib.llama_step.restype = i
    lib.llama_profile.argtypes = [p]
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


# kernels.c's fast kernels (v3, v4, lut_decode_rows, llama_step) read b = 3 rows in R3, not in the file's
# 10-a-word layout: 32 entries in 3 words, so that 8 lanes decode with a broadcast and a shift, no
# cross-lane permute (kernels.c, "R3"). The repacked copy (3.0 bits a weight) is made once per packed
# tensor and kept while that tensor lives and is not changed in place (its data pointer and version).
CPU_LAYOUT_VERSIONS = ("v3", "v4", "sgemm")   # the versions that read the CPU layout (b = 2, 4: the file's)
_repacked = {}   # id(packed) -> (weakref to packed, data_ptr, _version, R3 tensor)


def cpu_packed(packed, bits, K):
    """packed (N, ceil(K / E)) int32 in the file's layout -> the same indices in kernels.c's CPU layout:
    itself at b = 2, 4; at b = 3 R3, (N, 3 * ceil(K / 32)) int32, made by kernels.c's lut_repack3 at the first
    call and cached. Raises RuntimeError when kernels.c is unavailable."""
    if bits != 3:
        return packed
    key = id(packed)
    hit = _repacked.get(key)
    if hit is not None and hit[0]() is packed and hit[1:3] == (packed.data_ptr(), packed._version):
        return hit[3]
    lib = cpu_library()
    if lib is None:
        raise RuntimeError(f"kernels.c is unavailable: {_cpu_failure}")
    src = packed.contiguous()
    out = torch.empty(packed.shape[0], 3 * -(-K // 32), dtype=torch.int32)
    lib.lut_repack3(src.data_ptr(), out.data_ptr(), packed.shape[0], K, torch.get_num_threads())
    _repacked[key] = (weakref.ref(packed, lambda _, key=key: _repacked.pop(key, None)), packed.data_ptr(),
                      packed._version, out)
    return out


def lut_matmul_cpu(version, bits, group_size, packed, codebook, x, threads=None):
    """y (B, N) float32 = x (B, K) float32 @ W^T through one kernels.c version (CPU_VERSIONS), W[n, k] =
    codebook[n, k // group_size, index of (n, k) in packed] (packed in the file's layout; v3, v4, sgemm at
    b = 3 read its cached R3 copy, cpu_packed); fp32 arithmetic throughout. threads: OpenMP threads (None:
    torch.get_num_threads()). Raises RuntimeError when kernels.c is unavailable."""
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
    if version in CPU_LAYOUT_VERSIONS:
        packed = cpu_packed(packed, bits, K)
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
    N, K = layer.out_features, layer.in_features
    if x.dim() == 0 or x.shape[-1] != K:   # the reference fails too, less clearly; a reshape must not hide it
        raise ValueError(f"a packed layer of in_features={K} got input of shape {tuple(x.shape)}: its last "
                         f"dimension must be {K}")
    if (not CPU_KERNELS or x.dtype != torch.float32 or x.is_cuda or (x.requires_grad and torch.is_grad_enabled())
            or cpu_library() is None):
        return None
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
# with their pointers, until the layer's buffers are other tensors (model.to(), a new packed tensor) or, at
# b = 3, packed is changed in place (its R3 copy is then made again).
_prepared = weakref.WeakKeyDictionary()   # layer -> {version: (packed, codebook (weak), (pointers, version), call)}


def _prepared_call(layer, version):
    """fn(x_ptr, y_ptr, B) running kernels.c's `version` (v0 .. v4) on layer's packed weights; built, and
    the operands checked, at the first call and again whenever layer.packed or layer.codebook has changed.
    Each version keeps its own (a prompt runs v4, the tokens after it v3)."""
    packed, codebook = layer.packed, layer.codebook
    cached = _prepared.setdefault(layer, {}).get(version)
    if (cached is not None and cached[0]() is packed and cached[1]() is codebook
            and cached[2] == (packed.data_ptr(), codebook.data_ptr(), packed._version if layer.bits == 3 else 0)):
        return cached[3]
    if version not in CPU_VERSIONS[:5]:
        raise ValueError(f"unknown CPU kernel version {version!r}; choose one of {CPU_VERSIONS}")
    N, K, bits = layer.out_features, layer.in_features, layer.bits
    _check_kernel_operands(bits, layer.group_size, packed, codebook, K)
    fn = cpu_library().lut_gemm_v4 if version == "v4" else getattr(cpu_library(), f"lut_gemv_{version}")
    rows = cpu_packed(packed, bits, K) if version in CPU_LAYOUT_VERSIONS else packed   # b = 3: R3, kept alive here
    rows_ptr, codebook_ptr, group = rows.data_ptr(), codebook.data_ptr(), min(layer.group_size, K)

    def call(x_ptr, y_ptr, B, rows=rows):
        fn(rows_ptr, codebook_ptr, x_ptr, y_ptr, N, K, B, bits, group, torch.get_num_threads())
    key = (packed.data_ptr(), codebook.data_ptr(), packed._version if bits == 3 else 0)   # b = 3: a copy to renew
    _prepared[layer][version] = (weakref.ref(packed), weakref.ref(codebook), key, call)
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


def q8_forward_cpu(blocks, x, N, K=None):
    """x (..., K) float32 -> x W^T (..., N) float32 with W the Q8_0 blocks (N, nb * 34) through kernels.c's
    q8_gemv (x zero-padded to 32 nb columns when K is not a multiple of 32); None when kernels.c cannot
    serve the call (as lut_forward_cpu): the caller multiplies by q8_dequantize instead.
    K: the layer's in_features. The blocks alone know K only to a block (32 columns): without K an input
    whose width needs another number of blocks is refused, with K any other width is. ValueError, naming
    the expected width, for a wrong width and for blocks that are not contiguous uint8 (N, nb * 34)."""
    nb = blocks.shape[1] // (2 + Q8_BLOCK) if blocks.dim() == 2 else 0
    if (blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[0] != N or nb < 1
            or blocks.shape[1] != nb * (2 + Q8_BLOCK) or not blocks.is_contiguous()):
        raise ValueError(f"Q8_0 blocks must be contiguous uint8 (N={N}, blocks * {2 + Q8_BLOCK}), got {blocks.dtype} "
                         f"{tuple(blocks.shape)}{'' if blocks.is_contiguous() else ' (not contiguous)'}")
    width = x.shape[-1] if x.dim() else None
    if K is not None and width != K:
        raise ValueError(f"a Q8_0 layer of in_features={K} got input of shape {tuple(x.shape)}: its last dimension "
                         f"must be {K}")
    if width is None or -(-width // Q8_BLOCK) != nb:
        raise ValueError(f"a Q8_0 layer of {nb} blocks a row (in_features {Q8_BLOCK * nb - Q8_BLOCK + 1} to "
                         f"{Q8_BLOCK * nb}) got input of shape {tuple(x.shape)}: its last dimension must be the "
                         f"layer's in_features")
    if (not CPU_KERNELS or x.dtype != torch.float32 or x.is_cuda or (x.requires_grad and torch.is_grad_enabled())
            or cpu_library() is None):
        return None
    K_pad = nb * Q8_BLOCK
    x2 = F.pad(x.reshape(-1, x.shape[-1]), (0, K_pad - x.shape[-1])).contiguous()   # (B, K_pad)
    y = torch.empty(x2.shape[0], N)
    cpu_library().q8_gemv(blocks.data_ptr(), x2.data_ptr(), y.data_ptr(), N, K_pad, x2.shape[0],
                          torch.get_num_threads())
    return y.reshape(*x.shape[:-1], N)


# ==== 3. the decode step in C ====================================================================
# generate() of a Llama (model.py) can run each of its steps -- the prompt once, then one token at a time --
# as ONE call of kernels.c's llama_step: every block (norms, q/k/v sharing one pass over their input,
# rotary, grouped-query attention over torch's KVCache, SwiGLU, residuals), then the final norm and the
# head, instead of ~210 module calls a token. attach_decode_step(model) sets model.decode_step, which
# CausalLM.generate calls when the attribute is there (model.py imports nothing of this file). At the
# first step of every generate() the step builds its tables of pointers to the model's own tensors
# (ctypes structures mirroring kernels.c's Matrix, LlamaBlock, LlamaModel: no copies), so a model changed
# between two generate() calls (quantized, loaded, moved) is seen. It serves fp32 Llamas on the CPU whose
# matrices are packed (LUTLinear without activation quantization, input scale or outliers), dense fp32
# nn.Linear or Q8_0 (Q8Linear); for anything else it answers None and generate() runs the Python forward,
# which stays the reference.

MATRIX_KINDS = ("lut", "dense", "q8")   # kernels.c's MAT_LUT, MAT_DENSE, MAT_Q8, in this order
BLOCK_MATRICES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                  "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class _Matrix(ctypes.Structure):         # kernels.c's Matrix
    _fields_ = [("kind", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int), ("bits", ctypes.c_int),
                ("group_size", ctypes.c_int), ("weight", ctypes.c_void_p), ("codebook", ctypes.c_void_p),
                ("bias", ctypes.c_void_p)]


class _LlamaBlock(ctypes.Structure):     # kernels.c's LlamaBlock
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p)] + [(k, _Matrix) for k in BLOCK_MATRICES]


class _LlamaModel(ctypes.Structure):     # kernels.c's LlamaModel
    _fields_ = [(name, ctypes.c_int) for name in ("n_layer", "dim", "n_head", "n_kv_head", "head_dim", "hidden",
                                                  "vocab", "n_rotary")] + [
               ("norm_eps", ctypes.c_float), ("embedding", ctypes.c_void_p), ("rotary_cos", ctypes.c_void_p),
               ("rotary_sin", ctypes.c_void_p), ("final_norm", ctypes.c_void_p), ("head", _Matrix),
               ("blocks", ctypes.POINTER(_LlamaBlock))]


class Refused(Exception):
    """Why the C decode step cannot serve a model (decode_step_refusal says it)."""


def _fp32_cpu(t, what, shape):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.is_cuda or tuple(t.shape) != shape \
            or not t.is_contiguous():
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise Refused(f"{what} must be a contiguous fp32 CPU tensor {shape}, got {got}")
    return t


def _matrix(module, where, N, K):
    """(kernels.c Matrix of one linear layer (N, K), the tensors it points into); Refused if not served."""
    if getattr(module, "in_features", None) != K or getattr(module, "out_features", None) != N:
        raise Refused(f"{where} is not a {N}x{K} linear layer: {module!r}")
    bias = getattr(module, "bias", None)
    tensors = [] if bias is None else [_fp32_cpu(bias, f"{where}.bias", (N,))]
    if hasattr(module, "packed") and hasattr(module, "codebook"):             # LUTLinear (lcd.py)
        if getattr(module, "a_bits", None):
            raise Refused(f"{where} quantizes its activations (a_bits={module.a_bits}): the C step does not")
        if getattr(module, "in_scale", None) is not None:
            raise Refused(f"{where} has a smoothing input scale (in_scale): the C step does not apply it")
        if getattr(module, "outlier_vals", None) is not None:
            raise Refused(f"{where} keeps outliers: the C step does not add them")
        if module.packed.is_cuda or module.codebook.is_cuda:
            raise Refused(f"{where} is on {module.packed.device}: the C step runs on the CPU")
        try:
            _check_kernel_operands(module.bits, module.group_size, module.packed, module.codebook, K)
        except ValueError as e:
            raise Refused(f"{where}: {e}") from None
        if module.bits == 3 and cpu_library() is None:
            raise Refused(f"kernels.c is unavailable: {_cpu_failure}")
        rows = cpu_packed(module.packed, module.bits, K)                    # b = 3: R3 (kernels.c's CPU layout)
        spec = _Matrix(0, N, K, module.bits, min(module.group_size, K), rows.data_ptr(),
                       module.codebook.data_ptr(), None)
        tensors += [rows, module.codebook]
    elif hasattr(module, "blocks"):                                            # Q8Linear (lcd.py)
        blocks = module.blocks
        shape = (N, -(-K // Q8_BLOCK) * (2 + Q8_BLOCK))
        if blocks.dtype != torch.uint8 or blocks.is_cuda or tuple(blocks.shape) != shape or not blocks.is_contiguous():
            raise Refused(f"{where}: Q8_0 blocks must be contiguous uint8 {shape} on the CPU, got {blocks.dtype} "
                          f"{tuple(blocks.shape)} on {blocks.device}")
        spec = _Matrix(2, N, K, 0, 0, blocks.data_ptr(), None, None)
        tensors.append(blocks)
    elif isinstance(module, torch.nn.Linear):
        spec = _Matrix(1, N, K, 0, 0, _fp32_cpu(module.weight, f"{where}.weight", (N, K)).data_ptr(), None, None)
        tensors.append(module.weight)
    else:
        raise Refused(f"{where} is a {type(module).__name__}: the C step serves LUTLinear, Q8Linear and nn.Linear")
    if bias is not None:
        spec.bias = bias.data_ptr()
    return spec, tensors


def _rmsnorm_weight(module, where, dim, eps):
    if getattr(module, "eps", None) != eps:
        raise Refused(f"{where} has eps {getattr(module, 'eps', None)}, the config norm_eps {eps}")
    return _fp32_cpu(getattr(module, "weight", None), f"{where}.weight", (dim,))


def rotary_tables(n_positions, hs, theta):
    """(cos, sin), each (n_positions, hs / 2) float32: model.rotary_cos_sin's angles for positions 0 .. n-1,
    computed by the same operations (so the same numbers) for the C step."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, hs, 2).float() / hs))                  # (hs/2,)
    angles = torch.arange(n_positions).float()[:, None] * inv_freq[None, :]            # (n, hs/2)
    return angles.cos().contiguous(), angles.sin().contiguous()


def llama_tables(model, n_positions):
    """(LlamaModel structure, [tensors it points into]) of a Llama for kernels.c's llama_step, its rotary
    tables covering n_positions; Refused naming what the C step does not serve."""
    if getattr(model, "architecture", None) != "llama":
        raise Refused(f"a {type(model).__name__} (architecture {getattr(model, 'architecture', None)!r}): the C step "
                      "runs the Llama family only")
    c = model.config
    dim, n_head, n_kv_head = c.n_embd, c.n_head, c.n_kv_head
    hs = dim // n_head
    qd, kvd, vocab = n_head * hs, n_kv_head * hs, c.vocab_size
    body, tensors = model.model, []
    embedding = _fp32_cpu(body.embed_tokens.weight, "model.embed_tokens.weight", (vocab, dim))
    cos, sin = rotary_tables(n_positions, hs, c.rope_theta)
    tensors += [embedding, cos, sin]
    blocks = (_LlamaBlock * c.n_layer)()
    for i, layer in enumerate(body.layers):
        where = f"model.layers.{i}"
        hidden = getattr(layer.mlp.gate_proj, "out_features", None)
        shapes = {"q": (qd, dim), "k": (kvd, dim), "v": (kvd, dim), "o": (dim, qd), "gate": (hidden, dim),
                  "up": (hidden, dim), "down": (dim, hidden)}
        for key, path in BLOCK_MATRICES.items():
            spec, used = _matrix(layer.get_submodule(path), f"{where}.{path}", *shapes[key])
            setattr(blocks[i], key, spec)
            tensors += used
        for key, name in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
            weight = _rmsnorm_weight(getattr(layer, name), f"{where}.{name}", dim, c.norm_eps)
            setattr(blocks[i], key, weight.data_ptr())
            tensors.append(weight)
    if hidden != c.intermediate_size:
        raise Refused(f"the MLP is {hidden} wide, the config's intermediate_size {c.intermediate_size}")
    final_norm = _rmsnorm_weight(body.norm, "model.norm", dim, c.norm_eps)
    head, used = _matrix(model.lm_head, "lm_head", vocab, dim)
    tensors += [final_norm, *used, blocks]
    table = _LlamaModel(c.n_layer, dim, n_head, n_kv_head, hs, hidden, vocab, n_positions, c.norm_eps,
                        embedding.data_ptr(), cos.data_ptr(), sin.data_ptr(), final_norm.data_ptr(), head, blocks)
    return table, tensors


def _all_packed(table):
    """Whether every block matrix is packed: then the prompt runs in C (v4); a dense one is faster in torch's
    BLAS at T > 1 than in kernels.c's row by row products, so a model with one reads its prompt in Python."""
    return all(getattr(table.blocks[i], k).kind == 0 for i in range(table.n_layer) for k in BLOCK_MATRICES)


class DecodeStep:
    """model.decode_step: generate()'s step in C (attach_decode_step).

        logits = step(idx, cache)   # idx (1, T) int64: the new tokens; cache: model.KVCache

    runs the T new positions cache.pos .. cache.pos+T-1 through the model in one kernels.c call, stores
    their keys and values in `cache` (the same tensors KVCache.update would make, so the Python forward
    can continue from them), advances cache.pos and returns the logits of the last position, (1, vocab)
    float32. Returns None, with nothing changed, where it does not serve the call: a gradient wanted,
    CPU_KERNELS off, a batch of several sequences, token ids outside the vocabulary, a cache too short,
    a prompt (T > 1) of a model with dense block matrices (torch's BLAS reads it faster), or a model it
    does not serve (see `refusal`); generate() then runs the Python forward, whose errors are the clear
    ones, and the next steps continue from the cache it filled."""

    def __init__(self, model):
        self.model = model
        self.refusal = None      # why the model is not served, as of the last generate(); None: served
        self._reset()

    def _reset(self):
        self._cache = None       # weakref to the KVCache of the generate() the tables below were built for
        self._table = self._tensors = self._keys = self._values = None
        self._prompt_in_c = False

    def __getstate__(self):      # copy.deepcopy(model), torch.save(model): ctypes pointers are not copied,
        return {"model": self.model, "refusal": self.refusal}   # the copy builds its own tables

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def _start(self, cache):
        """A new generate(): (re)build the tables for the model as it is now and for this cache."""
        self._reset()
        self._cache = weakref.ref(cache)
        try:
            table, tensors = llama_tables(self.model, cache.max_len)
        except Refused as e:
            self.refusal = str(e)
            return
        c = self.model.config
        hs = c.n_embd // c.n_head
        keys, values = [], []
        for layer in self.model.model.layers:        # the cache's tensors, made as KVCache.update makes them
            attn = layer.self_attn
            if attn not in cache.kv:
                cache.kv[attn] = (torch.zeros(1, c.n_kv_head, cache.max_len, hs), torch.zeros(1, c.n_kv_head, cache.max_len, hs))
            for t, out in zip(cache.kv[attn], (keys, values)):
                if t.dtype != torch.float32 or t.is_cuda or tuple(t.shape) != (1, c.n_kv_head, cache.max_len, hs) \
                        or not t.is_contiguous():
                    self.refusal = f"the KV cache holds {t.dtype} {tuple(t.shape)}: not one fp32 sequence"
                    return
                out.append(t.data_ptr())
        self.refusal = None
        self._table, self._tensors, self._prompt_in_c = table, tensors, _all_packed(table)
        self._keys = (ctypes.c_void_p * len(keys))(*keys)
        self._values = (ctypes.c_void_p * len(values))(*values)

    def __call__(self, idx, cache):
        if not CPU_KERNELS or torch.is_grad_enabled() or cpu_library() is None:
            return None
        if self._cache is None or self._cache() is not cache:
            if idx.shape[0] != 1:                    # several sequences: the Python forward fills the cache
                return None
            self._start(cache)
        if self._table is None or idx.dtype != torch.int64 or idx.is_cuda or idx.dim() != 2 or idx.shape[0] != 1:
            return None
        T, pos = idx.shape[1], cache.pos
        if T < 1 or pos + T > cache.max_len or (T > 1 and not self._prompt_in_c):
            return None
        tokens = idx[0].contiguous()                                        # (T,)
        logits = torch.empty(1, self._table.vocab)
        status = cpu_library().llama_step(ctypes.byref(self._table), tokens.data_ptr(), T, pos, cache.max_len,
                                          self._keys, self._values, logits.data_ptr(), torch.get_num_threads())
        if status != 0:                              # an id outside the vocabulary: nothing was written
            return None
        cache.pos += T
        return logits


PROFILE_PARTS = ("q k v", "attention", "o", "gate up", "down", "head", "rest")   # kernels.c's PART_*, in order


def decode_step_profile():
    """{part: seconds} llama_step spent in each of PROFILE_PARTS since the last call (then zeroed); all 0
    unless kernels.c was built with -DLCD_PROFILE (LCD_CFLAGS=-DLCD_PROFILE). None without kernels.c."""
    lib = cpu_library()
    if lib is None:
        return None
    seconds = (ctypes.c_double * len(PROFILE_PARTS))()
    lib.llama_profile(seconds)
    return dict(zip(PROFILE_PARTS, seconds))


def decode_step_refusal(model):
    """Why the C decode step cannot serve `model` (a str), or None when it can."""
    try:
        llama_tables(model, 1)            # the model's shape and layers first: a GPT needs no compiler
    except Refused as e:
        return str(e)
    if cpu_library() is None:
        return f"kernels.c is unavailable: {_cpu_failure}"
    return None


def attach_decode_step(model):
    """Give a Llama (packed, Q8_0 head, or plain fp32; on the CPU) its decode step in C: sets and returns
    model.decode_step, a DecodeStep that generate() then calls for every step (the prompt, then each
    token). Returns None, and removes an earlier step, when the C step cannot serve the model (a GPT,
    activation quantization, an input scale, outliers, not fp32, not on the CPU: decode_step_refusal(model)
    says why) or kernels.c cannot be built: generate() then runs the Python forward as before."""
    model.__dict__.pop("decode_step", None)
    if decode_step_refusal(model) is not None:
        return None
    model.decode_step = DecodeStep(model)
    return model.decode_step
