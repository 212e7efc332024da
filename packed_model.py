"""
packed_model.py: the packed model at inference -- what lcd.py's quantize() and freeze() produce, what
save_quantized writes and load_quantized reads. Read top to bottom it follows a weight from the file to
an output:

  1. the packed format - b-bit indices packed along K into 32-bit words; fp16 codebooks (N, G, 2^b)
  2. LUTLinear         - the inference layer: y = x W_hat^T from the packed indices and the codebooks
                         (PyTorch reference here; kernels.c / kernels.cu through lcd_kernels.py when built)
  3. Q8Linear          - the output head in GGUF's Q8_0 format (int8 blocks of 32 with an fp16 scale)
  4. a packed model    - which layers are packed, how many bits each stores (footprint)
  5. save / load       - one file: a validated header describing each layer, then the state_dict; atomic
                         writes, and cache entries written once under a lock and checked on read

This file knows nothing of how the codebooks were found (lcd.py); it imports only the kernels' loader.
A linear layer computes y = x W^T with W of shape (N, K): N outputs, K inputs.
"""

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time

try:
    import fcntl          # POSIX file locks (flock); elsewhere files are written unlocked, one writer assumed
except ImportError:
    fcntl = None

import torch
import torch.nn as nn
import torch.nn.functional as F

import lcd_kernels

ENTRIES_PER_WORD = {2: 16, 3: 10, 4: 8}  # b-bit indices per 32-bit word (3-bit: 10 a word, 2 bits spare)
FORMAT_VERSION = 1      # version of the file written by save_quantized
FP16_MAX = 65504.0      # largest finite fp16: every stored codebook, outlier and scale must stay within it


# ==== 1. the packed format =========================================================================
# The stored layout, shared exactly by this file and kernels.cu:
#
#   E = ENTRIES_PER_WORD[b] indices per 32-bit word: b=2 -> 16, b=3 -> 10 (top 2 bits unused, zero),
#   b=4 -> 8.  n_words = ceil(K / E).  packed: (N, n_words) int32, row-major, read as uint32 bit patterns.
#   The index of weight (n, k) sits in word packed[n, k // E] at bits [(k % E) * b, (k % E) * b + b):
#   entry 0 in the lowest bits. Entries past the end of a row (k >= K) are 0.
#
#       b = 2:  bit 31 ........................................ bit 0
#               | k=15 | k=14 | ... | k=2 | k=1 | k=0 |           (16 x 2 bits)
#       b = 3:  | 00 | k=9 | k=8 | ... | k=1 | k=0 |               (2 spare + 10 x 3 bits)
#       b = 4:  | k=7 | k=6 | ... | k=1 | k=0 |                    (8 x 4 bits)
#
#   codebook: (N, G, 2^b) fp16 row-major, G = ceil(K / group_size); weight (n, k) is
#   codebook[n, k // group_size, idx[n, k]]. Unpacking: idx = (word >> ((k % E) * b)) & (2^b - 1).


def check_group_size(group_size, K):
    """None means one codebook per row (group_size = K). A last group shorter than group_size is padded."""
    if group_size is None:
        return K
    if not isinstance(group_size, int) or not 0 < group_size <= K:
        raise ValueError(f"group_size must be an int in 1..K={K} (None for one codebook per row), got "
                         f"{group_size!r}")
    return group_size


def check_weight(W, name="weight"):
    if not torch.isfinite(W).all():
        raise ValueError(f"{name} holds NaN or inf values: fix or retrain the model before quantizing it")


def check_fp16(t, what, remedy="keep the layer in full precision (quantize(..., skip=[its name])) or rescale it"):
    """Values stored in fp16 (codebooks, outliers, scales) must be finite there, |v| <= FP16_MAX: a bf16 or
    fp32 model may hold weights past 65504, which fp16 would store as inf. Such a layer is an error that
    names the largest value (no per-row scale is added: the format and bits/weight stay as documented)."""
    t = t.detach()
    if t.numel() and not (t.float().abs() <= FP16_MAX).all():          # NaN fails the comparison too
        largest = t.float().abs().nan_to_num(math.inf).max().item()
        raise ValueError(f"{what} reaches |value| {largest:.6g}, past fp16's largest finite value {FP16_MAX:g}: "
                         f"stored as fp16 it would become inf; {remedy}")

def check_bits(bits):
    if type(bits) is not int or bits not in ENTRIES_PER_WORD:
        raise ValueError(f"bits must be 2, 3 or 4 (2^bits centroids a codebook), got {bits!r}")


def pack_indices(idx, bits):
    """(N, K) integer indices in [0, 2^bits) -> (N, ceil(K / E)) int32 words in the layout above."""
    check_bits(bits)
    N, K = idx.shape
    if idx.numel() and (idx.min() < 0 or idx.max() >= 2 ** bits):
        raise ValueError(f"indices must lie in [0, {2 ** bits}) for {bits}-bit packing, got "
                         f"[{idx.min().item()}, {idx.max().item()}]")
    E = ENTRIES_PER_WORD[bits]
    n_words = math.ceil(K / E)
    entries = F.pad(idx.long(), (0, n_words * E - K)).view(N, n_words, E)          # padding entries are 0
    shifts = torch.arange(E, device=idx.device) * bits                             # (E,)
    words = (entries << shifts).sum(-1)       # disjoint bit fields, so the sum is their OR: in [0, 2^32)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # same bits as uint32


def codebook_storage_bits(N, K, bits, group_size=None):
    """Bits that an (N, K) layer's indices and codebooks take in this format: the packed 32-bit words as they
    are (b = 3 holds 10 indices in 32 bits, so 3.2 bits an index) and N * G codebooks of 2^b fp16 centroids.
    LUTLinear.storage_bits adds outliers and the input scale; lcd.allocate_bits plans a budget with it."""
    check_bits(bits)
    G = math.ceil(K / check_group_size(group_size, K))
    return 32 * N * math.ceil(K / ENTRIES_PER_WORD[bits]) + 16 * N * G * 2 ** bits


@functools.lru_cache(maxsize=None)
def byte_entries(bits, device="cpu"):
    """(256, 8 // bits) int32: the b-bit entries of every byte value, entry 0 in the lowest bits. At b = 2
    and 4 a word is 4 bytes of whole entries, so byte j of word w holds the entries 8j/b .. 8j/b + 8/b - 1."""
    values = torch.arange(256, dtype=torch.int32, device=device)[:, None]
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=device)
    return (values >> shifts) & (2 ** bits - 1)


@functools.lru_cache(maxsize=None)
def byte_one_hot(device="cpu"):
    """(4, 256 * 4) float32: [p, 4 v + c] = 1 where entry p of byte value v is the 2-bit index c, so that
    (4 activations) @ byte_one_hot gives, for every byte value, the sum of the activations of each centroid."""
    entries = byte_entries(2, device).long()                                      # (256, 4): v, p
    return F.one_hot(entries, 4).float().permute(1, 0, 2).reshape(4, 256 * 4)     # (p, v c)


def unpack_indices(packed, bits, K, dtype=torch.int64):
    """(N, n_words) int32 words -> (N, K) indices of `dtype` (int32 halves the memory written): the
    inverse of pack_indices. At b = 2 and 4 every byte of the words (little-endian: byte 0 holds the lowest
    bits) is looked up in byte_entries, one F.embedding over N * 4 * n_words bytes; 3-bit entries straddle
    bytes and are shifted out of the words in int32 (an arithmetic shift: the mask drops the sign copies)."""
    check_bits(bits)
    E = ENTRIES_PER_WORD[bits]
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != math.ceil(K / E):
        raise ValueError(f"packed must be int32 (N, {math.ceil(K / E)}) for K={K}, b={bits}; got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    N = packed.shape[0]
    if bits in (2, 4) and sys.byteorder == "little":
        entries = F.embedding(packed.view(torch.uint8).int(), byte_entries(bits, packed.device))  # (N, 4 n_words, 8/b)
    else:
        shifts = torch.arange(E, dtype=torch.int32, device=packed.device) * bits
        entries = (packed[:, :, None] >> shifts) & (2 ** bits - 1)                 # (N, n_words, E)
    return entries.reshape(N, -1)[:, :K].to(dtype)


def dequantize(codebook, idx, group_size):
    """W_hat[n, k] = codebook[n, k // group_size, idx[n, k]]: codebook (N, G, C), idx (N, K) of any integer
    dtype -> (N, K) float32. One flat look-up: the centroid of (n, k) is entry (n G + k // group_size) C + idx[n, k]
    of the flattened codebook (int32 idx keeps that index half the size: the CPU reference's choice)."""
    N, G, C = codebook.shape
    K = idx.shape[1]
    group_size = check_group_size(group_size, K)
    if codebook.numel() >= 2 ** 31:           # a flat position would not fit in int32
        idx = idx.long()
    elif idx.dtype not in (torch.int32, torch.int64):   # LCDLinear's uint8 assignments
        idx = idx.int()
    row_start = torch.arange(N, dtype=idx.dtype, device=idx.device)[:, None] * (G * C)      # (N, 1)
    group_start = (torch.arange(K, dtype=idx.dtype, device=idx.device) // group_size) * C  # (K,)
    flat = idx + row_start
    flat += group_start                       # in place: (N, K) is written twice, not three times
    return codebook.float().reshape(-1).index_select(0, flat.reshape(-1)).view(N, K)


# ==== 2. LUTLinear ================================================================================
# The CPU reference computes y = x W_hat^T in one of two ways, both without keeping any dense weight:
# up to PARTIAL_SUM_ROWS rows of fp32 x at 2 bits, from look-up tables of partial sums of x (no W_hat at
# all, LUTLinear.partial_sums_forward); otherwise W_hat is built by table look-ups of the packed bytes a
# cache-sized block of rows at a time, each block multiplied at once (LUTLinear.blocked_forward).
# Outliers and the bias are added to either. Non-fp32 activations: F.linear with W_hat in their dtype.
WEIGHT_BLOCK_BYTES = 2 ** 20  # fp32 bytes of W_hat built at a time by blocked_forward (to stay in L2 cache)
PARTIAL_SUM_ROWS = 1    # most activation rows served by the partial-sum tables (measured on 2 busy cores:
                        # 2 rows won on 2048x2048 and lost on 576x1536 to building W; the tables grow with rows)

def fake_quantize_per_token(x, bits):
    """Symmetric per-token activation quantization, kept in floating point: round(x / s) * s with
    s = max|x| / (2^(bits-1) - 1) over the last dimension. The gradient passes straight through."""
    q_max = 2 ** (bits - 1) - 1
    scale = x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-8) / q_max
    x_q = (x / scale).round().clamp(-q_max, q_max) * scale
    return x_q.detach() + (x - x.detach())    # value exactly x_q (x - x is exactly 0), gradient 1 to x


# LUTLinear is longer than the rest (~190 lines): it is one layer seen from every side a reader needs in one
# place - its buffers, how clustering fills them (from_clustered), the two CPU reference paths and the
# dispatch to the kernels (forward), and what it stores (storage_bits, config). Each method is short.
class LUTLinear(nn.Module):
    """A linear layer served from look-up tables: y = x W_hat^T + bias with
    W_hat[n, k] = codebook[n, k // group_size, idx[n, k]], the indices packed as in section 1.

    Buffers: packed (N, n_words) int32, codebook (N, G, 2^b) fp16; optional: outlier_rows, outlier_cols
    int32 and outlier_vals fp16 (sparse weights kept exactly: they replace the codebook value there),
    in_scale (K,) fp16 (smoothing: the layer computes LUT(x / in_scale); round s to fp16 before folding it
    into W). bias is an ordinary parameter. a_bits (None, 8 or 4): per-token activation fake-quant."""

    def __init__(self, in_features, out_features, bits, group_size=None, bias=True, n_outliers=0,
                 in_scale=False, a_bits=None, device=None):
        super().__init__()
        check_bits(bits)
        if a_bits not in (None, 4, 8):
            raise ValueError(f"a_bits must be None (weight-only), 8 or 4, got {a_bits!r}")
        self.in_features, self.out_features, self.bits, self.a_bits = in_features, out_features, bits, a_bits
        self.group_size = check_group_size(group_size, in_features)
        n_words = math.ceil(in_features / ENTRIES_PER_WORD[bits])
        G = math.ceil(in_features / self.group_size)
        self.register_buffer("packed", torch.zeros(out_features, n_words, dtype=torch.int32, device=device))
        self.register_buffer("codebook", torch.zeros(out_features, G, 2 ** bits, dtype=torch.float16,
                                                     device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        for name, dtype in (("outlier_rows", torch.int32), ("outlier_cols", torch.int32),
                            ("outlier_vals", torch.float16)):          # None: absent, not in the state_dict
            value = torch.zeros(n_outliers, dtype=dtype, device=device) if n_outliers else None
            self.register_buffer(name, value)
        self.register_buffer("in_scale", torch.ones(in_features, dtype=torch.float16, device=device)
                             if in_scale else None)

    @classmethod
    def from_clustered(cls, codebook, idx, bits, group_size, bias=None, outliers=None, in_scale=None,
                       a_bits=None):
        """Build the layer from cluster()'s output: codebook (N, G, 2^bits), idx (N, K)."""
        N, K = idx.shape
        layer = cls(K, N, bits, group_size, bias=bias is not None,
                    n_outliers=0 if outliers is None else len(outliers[0]), in_scale=in_scale is not None,
                    a_bits=a_bits, device=idx.device)
        if codebook.shape != layer.codebook.shape:
            raise ValueError(f"codebook has shape {tuple(codebook.shape)}, expected "
                             f"{tuple(layer.codebook.shape)} for K={K}, group_size={layer.group_size}, b={bits}")
        check_fp16(codebook, "the codebook")
        if outliers is not None:
            check_fp16(outliers[2], "an outlier kept in full precision (fp16)")
        if in_scale is not None:
            check_fp16(in_scale, "the input (smoothing) scale")
        layer.packed.copy_(pack_indices(idx, bits))
        layer.codebook.copy_(codebook)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        if outliers is not None:
            for buffer, value in zip((layer.outlier_rows, layer.outlier_cols, layer.outlier_vals), outliers):
                buffer.copy_(value)
        if in_scale is not None:
            layer.in_scale.copy_(in_scale)
        return layer

    def weight_rows(self, start=0, stop=None, out=None):
        """Rows start:stop of W_hat from the codebooks alone (outliers not put back): (stop - start, K)
        float32, built anew (nothing is cached). With one codebook per row at b = 2 or 4, a byte of row n
        can only stand for 256 known runs of 8/b weights, so the rows are one look-up of every packed byte
        in a table of each row's 256 runs (256 * 8/b floats a row while it lives: 4 KiB at b = 2), written
        into `out` (a float32 buffer of at least (stop - start) * 32 n_words / b elements) when given;
        otherwise the indices are unpacked and looked up in the codebooks (dequantize; `out` unused)."""
        stop = self.out_features if stop is None else min(stop, self.out_features)
        n, K, b = stop - start, self.in_features, self.bits
        packed, codebook = self.packed[start:stop], self.codebook[start:stop]
        if codebook.shape[1] == 1 and b in (2, 4) and sys.byteorder == "little":
            runs = codebook.float().view(n, 2 ** b).index_select(1, byte_entries(b, packed.device).view(-1))
            rows = packed.view(torch.uint8).int() + torch.arange(0, 256 * n, 256, dtype=torch.int32,
                                                                 device=packed.device)[:, None]   # (n, J)
            if out is not None:
                out = out[:rows.numel() * (8 // b)].view(-1, 8 // b)
            W = torch.index_select(runs.view(256 * n, 8 // b), 0, rows.view(-1), out=out)   # (n J, 8/b)
            return W.view(n, -1)[:, :K]                                        # (n, K): padding entries dropped
        return dequantize(codebook, unpack_indices(packed, b, K, torch.int32), self.group_size)

    def weight_dequantized(self):
        """The (N, K) float32 weight this layer computes with: unpack, look up, put the outliers back.
        Built anew at every call (4 N K bytes while it lives); forward() never builds it whole at fp32."""
        W = self.weight_rows().contiguous()                                   # (N, K)
        if self.outlier_vals is not None:
            W[self.outlier_rows.long(), self.outlier_cols.long()] = self.outlier_vals.float()
        return W

    def blocked_forward(self, x):
        """x (R, K) float32 -> x W_hat^T (R, N) float32 from the codebooks alone (outliers are forward's
        corrections): W_hat is built WEIGHT_BLOCK_BYTES of rows at a time into one reused buffer and each
        block multiplied while it is still in cache, so W_hat never exists whole (on the shared 2-core
        machine, 2048x2048 at batch 16: 3-4x faster than building all of it first, then multiplying)."""
        N, K = self.out_features, self.in_features
        row_bytes = 4 * 4 * self.packed.shape[1] * (8 // self.bits) if self.bits in (2, 4) else 4 * K
        step = max(1, min(N, WEIGHT_BLOCK_BYTES // row_bytes))               # rows per block
        buffer = torch.empty(step * row_bytes // 4, device=x.device)
        y_t = torch.empty(N, x.shape[0], device=x.device)                     # (N, R): blocks of rows of y^T
        for start in range(0, N, step):
            stop = min(start + step, N)
            torch.mm(self.weight_rows(start, stop, out=buffer), x.T, out=y_t[start:stop])
        return y_t.T

    def outlier_corrections(self):
        """(rows, cols, delta) int64, int64, float32 (n_outliers,): an outlier replaces its centroid, so a
        product from the codebook alone is corrected by adding x[:, col] * delta to y[:, row]."""
        rows, cols = self.outlier_rows.long(), self.outlier_cols.long()
        E = ENTRIES_PER_WORD[self.bits]
        words = self.packed[rows, cols // E].long() & 0xFFFFFFFF
        j = (words >> ((cols % E) * self.bits)) & (2 ** self.bits - 1)
        delta = self.outlier_vals.float() - self.codebook[rows, cols // self.group_size, j].float()
        return rows, cols, delta

    def partial_sums_apply(self, x):
        """Whether forward() takes the partial-sum path for x (..., K): fp32 activations on the CPU, 1 to
        PARTIAL_SUM_ROWS rows, 2-bit indices, codebook groups made of whole bytes (4 entries). Other
        fp32 activations on the CPU take blocked_forward (0 rows too: its empty product is the (0, N) result,
        where the tables' look-ups would index an empty P); other dtypes, and x that needs a gradient,
        F.linear with weight_dequantized() (the out= buffers of the fast paths have no autograd)."""
        return (x.dtype == torch.float32 and not x.is_cuda and 0 < x.numel() <= PARTIAL_SUM_ROWS * self.in_features
                and self.bits == 2 and sys.byteorder == "little"
                and (self.group_size >= self.in_features or self.group_size % 4 == 0))

    def partial_sums_forward(self, x):
        """x (R, K) float32 -> x W_hat^T (R, N) float32 without building W_hat, T-MAC's idea (Wei et al.,
        "T-MAC: CPU Renaissance via Table Lookup for Low-Bit LLM Deployment on Edge", arXiv:2407.00088:
        tables of precomputed partial sums of groups of 4 activations, there indexed by 4 weight bits of one
        bit-plane) applied to codebooks: a packed byte holds the 2-bit indices of 4 consecutive weights, so
        for the 4 activations it meets there are only 256 possible byte values, and for each the sums of the
        activations that go to centroid c = 0..3:
            P[j, v, c] = sum_{p < 4: entry p of v is c} x[4j + p]
        (a tiny matmul with byte_one_hot; K * 256 * R floats in all, while the call lasts).
        Then S[n, g, c] = sum of P[j, byte[n, j], c] over the bytes j of row n's group g: one
        F.embedding_bag over N * K / 4 bytes (each a 4R-float row of P), and y[n] = sum_{g, c} S * codebook.
        From the codebooks alone (outliers are forward's corrections): x @ weight_rows().T, summed in
        another order."""
        N, K, R = self.out_features, self.in_features, x.shape[0]
        n_bytes = 4 * self.packed.shape[1]                                   # J = 4 n_words >= K / 4
        G = self.codebook.shape[1]
        xg = F.pad(x, (0, 4 * n_bytes - K)).view(R, n_bytes, 4).transpose(0, 1)   # (J, R, 4); padding meets 0
        P = (xg @ byte_one_hot(x.device)).transpose(1, 2).reshape(n_bytes * 256, 4 * R)  # (J * 256, 4R)
        rows_of_P = self.packed.view(torch.uint8).int() + torch.arange(0, 256 * n_bytes, 256, dtype=torch.int32,
                                                                       device=x.device)  # (N, J): row j * 256 + byte
        bytes_per_group = n_bytes if G == 1 else self.group_size // 4        # the last group also takes the padding
        bag_starts = (torch.arange(N, dtype=torch.int32, device=x.device)[:, None] * n_bytes
                      + torch.arange(0, G * bytes_per_group, bytes_per_group, dtype=torch.int32, device=x.device))
        S = F.embedding_bag(rows_of_P.view(-1), P, bag_starts.view(-1), mode="sum")   # (N G, 4R)
        return (S.view(N, 4 * G, R) * self.codebook.float().view(N, 4 * G, 1)).sum(1).T   # (R, N)

    def storage_bits(self):
        """Every bit stored for the weight: the packed words as they are (b=3 holds 10 indices in 32 bits,
        so 3.2 bits an index), fp16 codebooks, outliers (fp16 value + two int32 positions = 80 bits each)
        and the fp16 input scale. The bias is not counted: it is kept as in the original layer."""
        bits = codebook_storage_bits(self.out_features, self.in_features, self.bits, self.group_size)
        if self.outlier_vals is not None:
            bits += (16 + 32 + 32) * self.outlier_vals.numel()
        if self.in_scale is not None:
            bits += 16 * self.in_scale.numel()
        return bits

    def forward(self, x):                                                   # x: (..., K)
        if self.in_scale is not None:
            x = x / self.in_scale.to(x.dtype)
        if self.a_bits:
            x = fake_quantize_per_token(x, self.a_bits)
        # On a GPU, lcd_kernels.py serves the layer from the packed format (kernels.cu): it gets x after the
        # input scale and activation quantization and returns x W_hat^T + bias (outliers included), or
        # None when it cannot (no CuPy, a case it does not cover): then the PyTorch reference below runs.
        # On a CPU, fp32 activations without autograd go to kernels.c the same way (lcd_kernels.lut_forward_cpu).
        y = lcd_kernels.lut_forward_cuda(self, x) if x.is_cuda else lcd_kernels.lut_forward_cpu(self, x)
        if y is not None:
            return y
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.dtype != torch.float32 or x.is_cuda or (x.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, self.weight_dequantized().to(x.dtype), bias)    # (..., N): x's dtype, autograd
        x2 = x.reshape(-1, self.in_features)                                # (R, K)
        y = self.partial_sums_forward(x2) if self.partial_sums_apply(x2) else self.blocked_forward(x2)
        y = y.contiguous()                                                  # (R, N), row-major like F.linear's
        if self.outlier_vals is not None:
            rows, cols, delta = self.outlier_corrections()
            y = y.index_add(1, rows, x2[:, cols] * delta)                   # (R, n_outliers) into (R, N)
        y = y if bias is None else y + bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def config(self):
        """The constructor arguments that rebuild this layer's shape (save_quantized's header)."""
        return dict(in_features=self.in_features, out_features=self.out_features, bits=self.bits,
                    group_size=self.group_size, bias=self.bias is not None, a_bits=self.a_bits,
                    n_outliers=0 if self.outlier_vals is None else len(self.outlier_vals),
                    in_scale=self.in_scale is not None)

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in self.config().items())


class GridLinear(LUTLinear):
    """A LUTLinear whose codebooks are uniform grids lo + step * j (RTN, GPTQ). Such a quantizer stores one
    fp16 lo and one fp16 step per row or group (its scale and zero point) and the LUT is derived from them
    at load time, so storage_bits counts those two numbers, not the 2^b entries. save_quantized writes it
    as the plain LUTLinear it also is (same outputs; the file holds the derived codebook)."""

    def storage_bits(self):
        return super().storage_bits() - 16 * self.codebook.numel() + 32 * self.codebook[..., 0].numel()


# ==== 3. the Q8_0 output head ====================================================================
class Q8Linear(nn.Module):
    """An inference-only linear layer in GGUF's Q8_0 format: along K, blocks of 32 int8 weights with one fp16
    scale each (34 bytes, 8.5 bits a weight; lcd_kernels.q8_quantize), served on a CPU by kernels.c's q8_gemv,
    elsewhere (or for a gradient) by F.linear with the dequantized weight. Buffer: blocks (N, ceil(K / 32) * 34)
    uint8. Made by quantize_head for the output head, which LUTLinear's codebooks leave out."""

    def __init__(self, in_features, out_features, bias=False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        n_blocks = math.ceil(in_features / lcd_kernels.Q8_BLOCK)
        self.register_buffer("blocks", torch.zeros(out_features, n_blocks * (2 + lcd_kernels.Q8_BLOCK), dtype=torch.uint8,
                                                   device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear):
        """nn.Linear (N, K) -> Q8Linear of its weight (the bias, if any, kept in fp32)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device)
        layer.blocks.copy_(lcd_kernels.q8_quantize(linear.weight.detach()))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def weight_dequantized(self):
        """(N, K) float32: fp16 scale * int8 weight, block by block."""
        return lcd_kernels.q8_dequantize(self.blocks, self.in_features)

    def storage_bits(self):
        return 8 * self.blocks.numel()

    def forward(self, x):                                                   # x: (..., K) -> (..., N)
        y = lcd_kernels.q8_forward_cpu(self.blocks, x, self.out_features, self.in_features) if not x.is_cuda else None
        if y is None:
            return F.linear(x, self.weight_dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, Q8_0"


def quantize_head(model, name="lm_head"):
    """Replace the output head `name` (an nn.Linear) by a Q8Linear of its weight, for inference: the head of a
    small model is its biggest matrix (SmolLM2-135M: 49152 x 576, 113 MB in fp32, read whole for every token).
    A tied input embedding keeps its own fp32 weight (one row read per token): only the head is quantized.
    Returns the model, changed in place."""
    head = model.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{name} is a {type(head).__name__}, not an nn.Linear: nothing to quantize to Q8_0")
    set_module(model, name, Q8Linear.from_linear(head))
    return attach_decode_step(model)      # generate() in C where the kernels serve the model


# ==== 4. a packed model: which layers, how many bytes =============================================
def is_conv1d(module):
    """Hugging Face GPT-2's Conv1D: a linear layer y = x W + b with its weight stored (in, out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def as_linear(module):
    """The module as an nn.Linear: itself, or for a Conv1D a new nn.Linear computing the same function."""
    if isinstance(module, nn.Linear):
        return module
    K, N = module.weight.shape
    linear = nn.Linear(K, N, bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)
    linear.weight.data.copy_(module.weight.detach().t())
    if module.bias is not None:
        linear.bias.data.copy_(module.bias.detach())
    return linear


def find_linears(model, skip=None):
    """{qualified name: nn.Linear} of the layers to quantize, in module order (a Conv1D comes as the
    nn.Linear it is equivalent to, see as_linear; the model itself is not changed).

    Always left out: the output head (a Linear named lm_head) and every Linear whose weight is shared with
    an nn.Embedding (tied embeddings). `skip` leaves out more: a name substring or a list of them."""
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    embedding_weights = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name: as_linear(m) for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or is_conv1d(m)) and name.split(".")[-1] != "lm_head"
            and m.weight.data_ptr() not in embedding_weights and not any(s in name for s in skip)}


def set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def footprint(model):
    """Bytes and effective bits per weight of every quantized layer (any module with storage_bits()) and
    in total. params = in_features * out_features of the layer."""
    layers, total_bits, total_params = {}, 0, 0
    for name, m in model.named_modules():
        if hasattr(m, "storage_bits") and not any(name.startswith(outer + ".") for outer in layers):
            bits, params = m.storage_bits(), m.in_features * m.out_features
            layers[name] = {"bytes": math.ceil(bits / 8), "bits_per_weight": bits / params, "params": params}
            total_bits, total_params = total_bits + bits, total_params + params
    return {"layers": layers, "total_bytes": sum(l["bytes"] for l in layers.values()),
            "bits_per_weight": total_bits / total_params if total_params else 0.0}


def attach_decode_step(model):
    """Let a packed model's own generate() run each step as one C call (lcd_kernels.attach_decode_step: every
    block, the norms, rotary, GQA attention over the KV cache and the head in kernels.c) where that serves
    it -- a Llama, fp32, on the CPU, kernels built; anything else keeps the Python forward, which stays the
    reference. quantize(), freeze() and load_quantized() call it. Returns the model."""
    lcd_kernels.attach_decode_step(model)
    return model


# ==== 5. save / load ==============================================================================
def atomic_write(path, write):
    """Write `path` atomically: write(tmp) fills a temporary file beside it, flushed to disk, which is then
    renamed over `path`: a crash, a full disk or an error midway leaves the old file (or none) as it was,
    never a half-written one. The file gets the mode a plain open() would give (0666 minus the umask,
    usually 0644), not mkstemp's private 0600.

    A full disk (OSError ENOSPC, or torch.save's "unexpected pos" RuntimeError) is an OSError(ENOSPC)
    saying "no space left on the device holding <path>; the previous file is intact". The writer holds an
    exclusive flock on its temp file until the rename, so that a writer killed before its cleanup (SIGKILL,
    SIGTERM) is told from a live one: the next write of the same path removes the temp files of dead writers
    only (stale_temp_files); two live writers of one path both finish (the later rename wins)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    for stale in stale_temp_files(path):
        try:
            os.remove(stale)
        except OSError:
            pass
    existed = os.path.exists(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:
        raise _write_error(e, path, existed) from None
    try:
        _try_lock(fd)                        # held until close: this temp file's writer is alive
        umask = os.umask(0)
        os.umask(umask)                      # reading the umask means setting it: put it straight back
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())          # the data on disk before the rename makes it the file
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        err = _write_error(e, path, existed)
        if err is e:
            raise
        raise err from None
    finally:
        os.close(fd)
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(directory, what):
    """Raise OSError naming `what` (e.g. "--out_dir=out") unless files can be created in `directory`
    (created if missing): a real probe file, so that a read-only filesystem, a path under a regular file or
    a directory without write permission are found before any work, as root too (where access() says yes)."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OSError(e.errno, f"{what}: cannot write in {directory} ({type(e).__name__}: "
                               f"{e.strerror or e}): choose a writable directory before any work is done") from None


STALE_GRACE_S = 10.0   # an empty temp file this young may be a live writer's between mkstemp and its flock


def stale_temp_files(path):
    """The temp files atomic_write(path) leaves when killed: <basename>.XXXXXXXX.tmp beside `path`, with
    XXXXXXXX as tempfile.mkstemp names them (8 of a-z, 0-9, _), whose writer is dead: nobody holds its flock
    (a live writer holds it from creation to rename; an empty file younger than STALE_GRACE_S counts as
    live, as its writer may not have locked it yet)."""
    directory, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(base) + r"\.[a-z0-9_]{8}\.tmp")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, n) for n in sorted(names)
            if pattern.fullmatch(n) and not _writer_alive(os.path.join(directory, n))]


def _try_lock(fd):
    """Take an exclusive flock on fd without waiting: True if taken (or without POSIX locks), False if
    another open file holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _writer_alive(tmp):
    """Whether the temp file `tmp` of atomic_write is being written: its flock is held, or it is empty and
    younger than STALE_GRACE_S."""
    try:
        info = os.stat(tmp)
        if info.st_size == 0 and time.time() - info.st_mtime < STALE_GRACE_S:
            return True
        fd = os.open(tmp, os.O_RDONLY)
    except OSError:
        return True                       # gone already, or not ours to judge: leave it
    try:
        return not _try_lock(fd)
    except OSError:                       # a filesystem without flock on a read-only file: cannot tell, keep it
        return True
    finally:
        os.close(fd)                      # drops the lock taken to look


# ---- caches: written once, by whichever process comes first ------------------------------------------
# A cache entry (the teacher's text, a prepared dataset, a download) may be wanted by several processes at
# once: the ranks of one torchrun, or the runs of a seed sweep started together. The first to come takes an
# exclusive flock on <entry>.lock and writes the entry; the others wait for the lock (a line when they start
# waiting and every LOCK_NOTE_S), then find the entry ready. The kernel drops a lock when its holder dies,
# however it dies, so a wait never outlives the writer; and it is never a collective of torch.distributed,
# whose timeout would end a rank that waits for another's long work (36 minutes of text, on a slow machine).
# Each entry has a record beside it, <entry>.sha256.json = {"bytes", "sha256"}, written after the data: an
# entry is used only when its record vouches for it; a missing, truncated or altered one is written again.
LOCK_POLL_S = 0.5     # seconds between tries of a held lock
LOCK_NOTE_S = 60.0    # seconds between the lines of a process waiting for one
RECORD_SUFFIX = ".sha256.json"


@contextlib.contextmanager
def exclusive(path, what, log=print):
    """Hold the exclusive lock of the cache entry `path` (the file <path>.lock, created if missing) for the
    body of the with-statement, waiting for it while another process holds it: one line when the wait starts,
    naming `what`, `path` and the holder's pid, and one every LOCK_NOTE_S (log None: silent)."""
    if fcntl is None:                     # no POSIX locks here: one writer assumed, as atomic_write does
        yield
        return
    lock_path = path + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        t0, noted = time.time(), None
        while not _try_lock(fd):
            waited = time.time() - t0
            if log and (noted is None or waited - noted >= LOCK_NOTE_S):
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                log(f"waiting for process {holder} to finish writing {what} ({path})"
                    + (f": {waited / 60:.0f} min so far" if noted is not None else ""))
                noted = waited
            time.sleep(LOCK_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)       # the holder, for the lines of those who wait
        yield
    finally:
        os.close(fd)                                     # releases the lock


def file_sha256(path):
    """sha256 hex digest of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(2 ** 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def write_checked(path, write):
    """atomic_write(path, write), then its record <path>.sha256.json {"bytes", "sha256"} (atomically too,
    after the data: a record exists only for complete data)."""
    atomic_write(path, write)
    record = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}

    def write_record(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f)
    atomic_write(path + RECORD_SUFFIX, write_record)


def cache_problem(path, expect_bytes=None):
    """None when `path` is a complete cache entry (write_checked): it has a record, and the record's length
    (and expect_bytes, when given) and sha256; otherwise what is wrong with it, as words to follow its path."""
    if not os.path.exists(path):
        return "is missing"
    try:
        with open(path + RECORD_SUFFIX) as f:
            record = json.load(f)
        want_bytes, want_sha = int(record["bytes"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return (f"has no valid record {os.path.basename(path)}{RECORD_SUFFIX} of its length and checksum (cut off "
                "before it was complete, or written by an older version)")
    size = os.path.getsize(path)
    if size != want_bytes or (expect_bytes is not None and size != expect_bytes):
        want = want_bytes if size != want_bytes else expect_bytes
        return f"holds {size:,} bytes, not the {want:,} it should: truncated or cut off"
    digest = file_sha256(path)
    if digest != want_sha:
        return f"has sha256 {digest[:16]}..., not the recorded {want_sha[:16]}...: corrupt"
    return None


def cached(path, produce, what, log=print, expect_bytes=None):
    """The cache entry `path`, written by produce(tmp) once: a complete entry (cache_problem) is used as it
    is; otherwise, under exclusive(path), the entry is checked again (another process may have written it
    meanwhile), a bad one is removed with one line naming it and what is wrong, and produce writes it
    (write_checked). Returns `path`."""
    if cache_problem(path, expect_bytes) is None:
        return path
    with exclusive(path, what, log):
        problem = cache_problem(path, expect_bytes)
        if problem is None:
            return path
        if os.path.exists(path):
            if log:
                log(f"{what}: {path} {problem}: removed; writing it again")
            for stale in (path, path + RECORD_SUFFIX):
                if os.path.exists(stale):
                    os.remove(stale)
        write_checked(path, produce)
    return path


def _write_error(e, path, existed):
    """The clear error for a failed atomic write: a full disk says so and that the old file is intact;
    an unwritable place names the path; anything else is returned as it is."""
    kept = "the previous file is intact" if existed else "no file was written there"
    text = str(e)
    if getattr(e, "errno", None) == errno.ENOSPC or any(
            words in text for words in ("unexpected pos", "No space left", "file write failed")):
        return OSError(errno.ENOSPC, f"no space left on the device holding {path}; {kept}: free some space (or "
                                     f"write elsewhere) and run again ({type(e).__name__}: {text})")
    if getattr(e, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        return OSError(e.errno, f"cannot write {path} ({os.strerror(e.errno)}); {kept}: choose a writable "
                                f"location")
    return e


def read_torch_file(path, remedy, mmap=False):
    """torch.load(path, weights_only=True, mmap=mmap) onto the CPU. A missing file is a FileNotFoundError; an empty,
    truncated or otherwise unreadable one a ValueError naming the file as incomplete or corrupt, followed
    by `remedy` (what to do)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): an incomplete or corrupt file (an interrupted copy or "
                         f"a full disk?); {remedy}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:   # truncated zip: OSError/RuntimeError; cut pickle: EOFError/UnpicklingError
        raise ValueError(f"{path} ({size} bytes) is incomplete or corrupt: it cannot be read as a torch file "
                         f"of tensors ({type(e).__name__}: {e}); {remedy}") from None


def _check_model_config(model_config, where):
    """A model configuration as a header holds it: a dict of str keys with plain JSON values (str, int,
    float, bool, None), naming its "architecture"; returned as a plain dict."""
    plain = (str, int, float, bool, type(None))
    if not isinstance(model_config, dict) or not all(
            isinstance(k, str) and isinstance(v, plain) for k, v in model_config.items()):
        raise ValueError(f"{where}: model_config must be a dict of str keys and plain values "
                         f"(str, int, float, bool, None), got {model_config!r}")
    if not isinstance(model_config.get("architecture"), str):
        raise ValueError(f"{where}: model_config names no architecture (a str, e.g. 'gpt'): {model_config!r}")
    return dict(model_config)


def save_quantized(model, path, model_config=None, tokenizer=None):
    """Write the quantized model's state_dict and a header describing each LUTLinear (atomically).
    model_config: optional dict(architecture=..., **sizes) of plain values that rebuilds the architecture
    (model.config_dict(model)), so that load_quantized can build the model from the file alone;
    tokenizer: optional name of the tokenizer its token ids come from (e.g. 'bytes', 'gpt2')."""
    layers = {}
    # a student still being distilled (lcd.LCDLinear, named here because lcd.py sits above this file)
    distilled = [name for name, m in model.named_modules() if type(m).__name__ == "LCDLinear"]
    if distilled:
        raise ValueError(f"save_quantized: {len(distilled)} layer(s) are LCDLinear, still being distilled (first "
                         f"{distilled[0]!r}): call lcd.freeze(model) first, or save a frozen copy: "
                         "packed_model.save_quantized(lcd.freeze(copy.deepcopy(model)), path)")
    for name, m in model.named_modules():
        if isinstance(m, LUTLinear):
            layers[name] = m.config()
        elif hasattr(m, "storage_bits"):
            raise ValueError(f"save_quantized stores LUTLinear layers only; {name!r} is a {type(m).__name__}")
    header = {"format": "lcd-quantized", "version": FORMAT_VERSION, "layers": layers}
    if model_config is not None:        # optional keys: a reader of version 1 that predates them ignores them
        header["model_config"] = _check_model_config(model_config, "save_quantized")
    if tokenizer is not None:
        if not isinstance(tokenizer, str):
            raise ValueError(f"save_quantized: tokenizer must be a name (str), got {tokenizer!r}")
        header["tokenizer"] = tokenizer
    atomic_write(path, lambda tmp: torch.save({"header": header, "state_dict": model.state_dict()}, tmp))


def _read_quantized(path, mmap=False):
    """save_quantized's file as (header, state_dict), the header validated before anything in it is used."""
    blob = read_torch_file(path, "save the quantized model again (packed_model.save_quantized)", mmap=mmap)
    header = blob.get("header") if isinstance(blob, dict) else None
    if not isinstance(header, dict) or header.get("format") != "lcd-quantized" or "state_dict" not in blob:
        raise ValueError(f"{path} is not a file written by packed_model.save_quantized")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {header.get('version')!r}; this lcd.py reads "
                         f"version {FORMAT_VERSION}: re-save it with a matching lcd.py")
    if not isinstance(header.get("layers"), dict):
        raise ValueError(f"{path}: the header lists no layers: not a file written by packed_model.save_quantized")
    if "model_config" in header:
        _check_model_config(header["model_config"], path)
    if not isinstance(header.get("tokenizer", ""), str):
        raise ValueError(f"{path}: malformed tokenizer name in the header: {header['tokenizer']!r}")
    return header, blob["state_dict"]


def quantized_header(path):
    """The validated header of save_quantized's file: format, version, layers, and where stored
    model_config and tokenizer. Memory-maps the file, so the tensors are not read."""
    return _read_quantized(path, mmap=True)[0]


def load_quantized(model, path):
    """Load save_quantized's file into `model`, a freshly built copy of the original architecture: its
    nn.Linear layers named in the header become LUTLinear of the stored shape first. Returns the model.
    `model` may instead be a function model_config -> nn.Module (e.g. model.from_config): it builds the
    architecture from the model_config stored in the file's header.
    Errors: FileNotFoundError; ValueError for an empty, truncated or corrupt file, a file of another
    kind or version, a header that does not match the model, or non-finite stored codebooks or scales."""
    header, state_dict = _read_quantized(path)
    if not isinstance(model, nn.Module):
        if "model_config" not in header:
            raise ValueError(f"{path} stores no model configuration (it was saved without model_config, "
                             "by an older train_kd.py): it cannot be loaded by itself; build the original "
                             "architecture first (e.g. from the teacher.pt beside it) and pass that model")
        model = model(dict(header["model_config"]))
    modules, keys = dict(model.named_modules()), set(LUTLinear(1, 1, 2).config())
    for name, spec in header["layers"].items():
        if not isinstance(spec, dict) or set(spec) != keys:
            raise ValueError(f"{path}: malformed header entry for layer {name!r}: {spec!r}")
        old = modules.get(name)
        old = as_linear(old) if is_conv1d(old) else old
        if not isinstance(old, (nn.Linear, LUTLinear)) or \
                (old.in_features, old.out_features) != (spec["in_features"], spec["out_features"]):
            raise ValueError(f"{path}: layer {name!r} ({spec['out_features']}x{spec['in_features']}) does "
                             f"not match the model's {old!r}: build the same architecture before loading")
        device = old.weight.device if isinstance(old, nn.Linear) else old.packed.device
        set_module(model, name, LUTLinear(**spec, device=device))
    model.load_state_dict(state_dict)
    for name in header["layers"]:
        layer = model.get_submodule(name)
        for buffer in ("codebook", "outlier_vals", "in_scale"):
            if getattr(layer, buffer) is not None and not torch.isfinite(getattr(layer, buffer)).all():
                raise ValueError(f"{path}: layer {name!r} stores non-finite {buffer} values: the file is corrupt")
    return attach_decode_step(model)


def check_resume_state(state, signature, where):
    """Refuse to resume `state` into a run of another signature (student_signature), naming what differs
    and both values: another bits, group size, method or model shape would resume silently wrong (a
    3-bit student returned for bits=2) or die in a raw size mismatch."""
    stored = state.get("signature") if isinstance(state, dict) else None
    if not isinstance(stored, dict):
        raise ValueError(f"{where}: the resume state records no signature (bits, group size, method, model "
                         "shape): it was written by an older lcd.py; restart this stage without it")
    remedy = ("resume with the settings the state was written with, or start this stage afresh (state=None; "
              "train_kd.py: delete the checkpoint or use another --out_dir)")
    for key in ("method", "bits"):
        if stored.get(key) != signature[key]:
            raise ValueError(f"{where}: the resume state is of a run with {key}={stored.get(key)!r}, this run "
                             f"asks {key}={signature[key]!r}: {remedy}")
    theirs, ours = stored.get("layers") or {}, signature["layers"]
    if sorted(theirs) != sorted(ours):
        only_s, only_o = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        raise ValueError(f"{where}: the resume state is of another model shape (layers only in the state: "
                         f"{only_s[:4]}; only in this student: {only_o[:4]}; {len(theirs)} vs {len(ours)} LCD "
                         f"layers): {remedy}")
    for name, mine in ours.items():
        for key in ("shape", "group_size", "centroids"):
            if theirs[name].get(key) != mine[key]:
                what = {"shape": "model shape (out, in)", "group_size": "group_size",
                        "centroids": "starting centroids (2^(bits + progressive_p))"}[key]
                raise ValueError(f"{where}: layer {name!r} has {what} {theirs[name].get(key)!r} in the resume "
                                 f"state, {mine[key]!r} in this student: {remedy}")
