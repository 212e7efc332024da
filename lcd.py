"""
LCD: clustering-based 2-4-bit weight quantization, distilled from the full-precision teacher,
served from look-up tables. One file, read top to bottom it follows the data's path:

  1. calibration      - run the model on a few batches, record each linear layer's input statistics
  2. clustering       - every weight row (or group) becomes 2^b centroids + b-bit indices
  3. packed format    - indices packed along K into 32-bit words; fp16 codebooks
  4. LUTLinear        - the inference layer (PyTorch reference: unpack, gather, matmul)
  5. quantize()       - swap any model's nn.Linear layers for LUTLinear; footprint; save / load
  6. distillation     - trainable LCD layers, smoothing, progressive + speculative KD, distill()

On a GPU, LUTLinear hands its product to kernels.cu through kernels.py (the kernels' loaders).

Definitions: ../shared/LCD_DESIGN.md. A linear layer computes y = x W^T with W of shape (N, K).
"""

# ==== 1. calibration ============================================================================
import errno
import functools
import math
import numbers
import os
import re
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

LLOYD_MAX_ITERS = 100   # cap on weighted Lloyd iterations; almost every row stops changing long before
DENSITY_ATOMS = 128     # atoms a row/group is cut into before the exact bin search, at 4 centroids (density_atoms)
ENTRIES_PER_WORD = {2: 16, 3: 10, 4: 8}  # b-bit indices per 32-bit word (3-bit: 10 a word, 2 bits spare)
FORMAT_VERSION = 1      # version of the file written by save_quantized
FP16_MAX = 65504.0      # largest finite fp16: every stored codebook, outlier and scale must stay within it


def model_logits(output):
    """The logits in what a model's forward returned: a tensor, a tuple starting with them, or `.logits`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}: forward must "
                    "return a tensor, a tuple starting with the logits, or an object with a .logits tensor")


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


def check_calib_batch(batch):
    """Calibration data is token ids: 2-D int64 tensors (B, T). Anything else is a clear error."""
    if not (isinstance(batch, torch.Tensor) and batch.dim() == 2 and batch.dtype == torch.int64):
        got = f"{batch.dtype} of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) \
            else type(batch).__name__
        raise ValueError(f"calibration batches must be 2-D int64 token ids of shape (B, T), got {got}; "
                         "pass a list of such tensors, e.g. [get_batch(...)[0] for _ in range(8)]")


def check_number(name, value, low=-math.inf, high=math.inf, integer=False, open_low=False, open_high=False):
    """A hyperparameter checked before any work: a finite int (integer=True; a bool is not one) or real
    number in [low, high], an end excluded with open_low / open_high. Returns it; else a ValueError naming
    the argument, the allowed range and the value given."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        left, right = "(" if open_low or low == -math.inf else "[", ")" if open_high or high == math.inf else "]"
        span = f"{left}{low:g}, {high:g}{right}"
        raise ValueError(f"{name} must be {'an int' if integer else 'a finite number'} in {span}, got {value!r}")
    return value


def input_embedding(model):
    """The model's token embedding: get_input_embeddings() where the model has it (Hugging Face), else
    its first nn.Embedding (nanoGPT's wte); None for a model without one."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if isinstance(embedding, nn.Embedding):
        return embedding
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def check_token_ids(model, ids, where):
    """Every id of `ids` (an integer tensor, any shape) must index the model's vocabulary: an id outside
    it would end in F.embedding's bare IndexError. The usual cause is named in the error: data prepared
    with another tokenizer than the model's, or a model (a saved teacher) trained on such data."""
    embedding = input_embedding(model)
    if embedding is None or ids.numel() == 0:
        return
    V, lo, hi = embedding.num_embeddings, int(ids.min()), int(ids.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"{where}: token id {hi if hi >= V else lo} is outside the model's vocabulary of {V} "
                         f"(ids 0..{V - 1}; the ids here span {lo}..{hi}): the data was likely prepared with "
                         "another tokenizer than the model's, or the model (e.g. a saved teacher) was trained "
                         "on a dataset of another tokenizer; use a model and data of the same tokenizer")


def calibration_batches(model, calib):
    """calib (one (B, T) int64 batch or an iterable of them) as a checked list, before any work: token
    ids, at least one batch, at least one token in all, every id inside the model's vocabulary."""
    batches = [calib] if isinstance(calib, torch.Tensor) else list(calib)   # one (B, T) batch is fine too
    for batch in batches:
        check_calib_batch(batch)
    if not batches:
        raise ValueError("calibration data is empty: pass at least one (B, T) batch of token ids")
    if sum(batch.numel() for batch in batches) == 0:
        raise ValueError(f"the calibration batches hold no tokens (shapes {[tuple(b.shape) for b in batches]}): "
                         "every statistic is a mean over tokens; pass at least one non-empty (B, T) batch")
    for i, batch in enumerate(batches):
        check_token_ids(model, batch, f"calibration batch {i}")
    return batches


@torch.no_grad()
def collect_stats(model, calib, names, full_hessian=False, keep_inputs=0):
    """Run the model on the calibration batches and record, with forward hooks, the input statistics of
    the named linear layers: {name: {"h": (K,), "H": (K, K) or None, "n": tokens seen, "X": rows or None}}.
    h_k = mean over tokens of x_k^2 (the diagonal of the layer Hessian X^T X / n); H = X^T X / n in full;
    X = the first keep_inputs input rows themselves (methods that fit activation quantizers want them)."""
    calib = calibration_batches(model, calib)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"collect_stats: the model has no modules named {missing}")
    sums = {}

    def make_hook(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (tokens, K)
            s = sums.setdefault(name, {"h": 0.0, "H": 0.0 if full_hessian else None, "n": 0, "X": []})
            s["h"] = s["h"] + torch.linalg.vector_norm(x, dim=0).square()    # sum of x^2 in one pass, (K,)
            if keep_inputs > s["n"]:   # a copy: a slice of x, even an empty one, would keep all of x alive
                s["X"].append(x[:keep_inputs - s["n"]].clone())
            if full_hessian:
                s["H"] = s["H"] + x.T @ x
            s["n"] += x.shape[0]
        return hook

    device = next(model.parameters()).device
    handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for batch in calib:
            if batch.numel():                                  # an empty batch adds nothing
                model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    unused = [n for n in names if n not in sums]
    if unused:
        raise ValueError(f"the calibration forward never reached layers {unused}: does forward() use them?")
    # a layer reached by no token at all (a routed expert no token chose) has no statistics: h = H = 0,
    # which the clustering reads as no importance (equal weights) and GPTQ as dead inputs
    return {n: {"h": s["h"] / max(1, s["n"]), "H": s["H"] / max(1, s["n"]) if full_hessian else None,
                "n": s["n"], "X": torch.cat(s["X"]) if keep_inputs and s["X"] else None} for n, s in sums.items()}


# ==== 2. clustering =============================================================================
# Every row n of W (or every group of `group_size` consecutive inputs of it) gets its own codebook of C
# centroids. To do all rows and groups of a layer at once, W (N, K) is viewed as R = N * G short rows of
# length group_size ("grouped rows", the last group zero-padded), and everything below works on (R, ...).
# The error of a grouped row is sum_k h_k (w_k - c[idx_k])^2: h_k is the importance of input channel k.

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


def _grouped(t, group_size):
    """(N, K) -> (N * G, group_size): row n * G + g holds group g of row n, the last group zero-padded."""
    N, K = t.shape
    G = math.ceil(K / group_size)
    return F.pad(t, (0, G * group_size - K)).reshape(N * G, group_size)


def _searchsorted(sorted_rows, values, right=False):
    """torch.searchsorted(sorted_rows (R, L), values (R, V), right=right): per value, how many entries of its
    sorted row lie below it (or at most equal, right=True). Small problems count by comparison instead:
    a searchsorted call has a fixed cost of milliseconds (measured on a shared 2-core CPU: 6 ms for 576 rows
    of 3 midpoints, 0.01 ms by comparison), which GPTQ's and CLAQ's column loops pay tens of thousands of
    times. Same integers either way."""
    if sorted_rows.shape[1] * values.numel() <= 2 ** 16:                           # (R, V, L) <= 64 Ki
        rows, vals = sorted_rows[:, None, :], values[:, :, None]
        return (rows <= vals if right else rows < vals).sum(2)                         # (R, V)
    return torch.searchsorted(sorted_rows.contiguous(), values.contiguous(), right=right)


def _assign(w, codebook):
    """Index of the nearest centroid for every weight: w (R, g), codebook (R, C) -> (R, g) int64.
    Binary search among the midpoints of the sorted centroids: O(log C) a weight and no (R, g, C) tensor.
    A weight exactly between two centroids goes to the smaller one."""
    sorted_c, order = codebook.sort(dim=1)
    midpoints = (sorted_c[:, 1:] + sorted_c[:, :-1]) / 2                     # (R, C-1)
    return order.gather(1, _searchsorted(midpoints, w))


def _weighted_means(w, mass, idx, old):
    """Move each centroid to the weighted mean of its members; a centroid with no mass stays where it is."""
    sums = torch.zeros_like(old).scatter_add_(1, idx, mass * w)
    total = torch.zeros_like(old).scatter_add_(1, idx, mass)
    return torch.where(total > 0, sums / total.clamp_min(1e-30), old)


def _optimal_cuts(P, Q, S, C, chunk=2**22):
    """1-D weighted k-means solved exactly by dynamic programming over M atoms, given prefix sums over the
    atoms of mass P, mass * value Q and mass * value^2 S, each (R, M+1). Returns the boundaries (R, C+1)
    of the C runs of atoms with the least total weighted SSE. cost[i, j] = SSE of atoms i..j-1 as one bin;
    best_k[j] = least SSE of atoms 0..j-1 in k bins = min_i best_{k-1}[i] + cost[i, j]. O(C M^2) a row."""
    R, M = P.shape[0], P.shape[1] - 1
    cuts = torch.empty(R, C + 1, dtype=torch.long, device=P.device)
    cuts[:, 0], cuts[:, C] = 0, M
    not_a_bin = torch.ones(M + 1, M + 1, dtype=torch.bool, device=P.device).tril()  # j <= i
    step = max(1, chunk // (M + 1) ** 2)                                            # rows at a time
    for r in range(0, R, step):
        m, q, s = (t[r:r + step, None, :] - t[r:r + step, :, None] for t in (P, Q, S))  # (rows, i, j)
        cost = (s - q * q / m.clamp_min(1e-30)).masked_fill_(not_a_bin, math.inf)
        best = [cost[:, 0]]                                         # best[k-1]: (rows, M+1)
        for _ in range(C - 2):                                      # C bins: only at j = M, in the walk back
            best.append((best[-1][:, :, None] + cost).amin(1))      # amin: 15x faster than min's argmin
        j = torch.full_like(cuts[r:r + step, :1], M)
        for k in range(C - 1, 0, -1):                               # walk back: where did bin k+1 start?
            cost_to_j = cost.gather(2, j[:, None, :].expand(-1, M + 1, 1))[:, :, 0]  # (rows, M+1)
            j = (best[k - 1] + cost_to_j).argmin(1, keepdim=True)
            cuts[r:r + step, k] = j[:, 0]
    return cuts


def density_atoms(C, base=DENSITY_ATOMS):
    """Atoms for C centroids: base up to C = 4, then base * sqrt(4 / C), so that the exact bin search, which
    costs C M^2 a row, costs the same at 3 and 4 bits as at 2 (128, 91, 64 atoms for C = 4, 8, 16). Measured
    (16 rows each of Gaussian, Laplacian, Student-t weights, 128 to 576 wide, random importance): after Lloyd
    at most 0.04 % (C = 8) and 0.73 % (C = 16) above the exact optimum; 128 atoms would give 0.04 % and 0.13 %
    at 2x and 4x the time."""
    return base if C <= 4 else round(base * math.sqrt(4 / C))


def density_init(v, m, C, n_atoms=None):
    """Density-based initialization: bins of the importance-weighted distribution of each grouped row, and
    each centroid at the weighted mean of its bin. v: (R, g) grouped rows sorted ascending, m: their mass.

    The plain reading, C bins of equal weighted mass, then Lloyd, ends 3 % (C=4, Gaussian) to 6x (C=16,
    Student-t) above the optimal weighted SSE (measured: 64 rows of 128 weights, random importance; the
    exact optimum by dynamic programming): equal mass gives the tails too few centroids, and Lloyd stalls
    in a local minimum. So the bins are chosen better, in two steps:
      1. cut the sorted row into M atoms of equal share of p^(1/3), where p is the importance-weighted
         density of the weights (from the spacing of the sorted weights): p^(1/3) is the point density of
         an optimal quantizer (Panter & Dite), denser than equal mass where weights are rare;
      2. merge the atoms into the C runs with the least weighted SSE, exactly (_optimal_cuts).
    A row of at most M weights is its own M atoms, and then the bins are the exact optimum.
    n_atoms: M (None: density_atoms(C))."""
    R, n = v.shape
    mean = (m * v).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1e-30)
    v = v - mean                                               # centred: the sums below stay well conditioned
    M = max(C, min(n, density_atoms(C) if n_atoms is None else n_atoms))
    if n <= M:
        atom = torch.arange(n, device=v.device).expand(R, n)   # one atom a weight
    else:                                                      # compander: grows by p^(1/3) dx, p = dmass/dx
        dG = ((m[:, 1:] + m[:, :-1]) / 2) ** (1 / 3) * (v[:, 1:] - v[:, :-1]) ** (2 / 3)
        G = F.pad(dG.cumsum(1), (1, 0))                        # (R, n)
        atom = (G / G[:, -1:].clamp_min(1e-30) * M).long().clamp(max=M - 1)

    def prefix(t):                                             # per-atom totals, then prefix sums: (R, M+1)
        return F.pad(torch.zeros(R, M, device=v.device).scatter_add_(1, atom, t).cumsum(1), (1, 0))

    P, Q = prefix(m), prefix(m * v)
    cuts = _optimal_cuts(P, Q, prefix(m * v * v), C)           # (R, C+1)
    # each bin's mass and sum straight from its weights, not as differences of the prefix sums: those
    # cancel, and a bin of tiny mass (importance spanning 1e-7..1) got a centroid of 1e20 from round-off
    bin_of = torch.searchsorted(cuts[:, 1:-1].contiguous(), atom.contiguous(), right=True)     # (R, n)
    bin_mass = torch.zeros(R, C, device=v.device).scatter_add_(1, bin_of, m)
    bin_sum = torch.zeros(R, C, device=v.device).scatter_add_(1, bin_of, m * v)
    return torch.where(bin_mass > 0, bin_sum / bin_mass.clamp_min(1e-30), 0.0) + mean


def uniform_init(w, keep, C):
    """RTN's grid: C evenly spaced points from the smallest to the largest weight of each grouped row.
    lo and the step are rounded to fp16 first: a grid is stored as those two numbers (GridLinear)."""
    lo = torch.where(keep, w, torch.inf).amin(1, keepdim=True)
    hi = torch.where(keep, w, -torch.inf).amax(1, keepdim=True)
    lo, hi = lo.nan_to_num(0.0, 0.0, 0.0), hi.nan_to_num(0.0, 0.0, 0.0)       # rows with nothing kept
    step = ((hi - lo) / (C - 1)).half().float()
    return lo.half().float() + step * torch.arange(C, device=w.device)


def kmeanspp_init(w, mass, C, generator):
    """k-means++ seeding: each next centroid is a weight drawn with probability ~ mass * distance^2."""
    def draw(p):
        p = torch.where(p.sum(1, keepdim=True) > 0, p, torch.ones_like(p))   # all distances 0: any will do
        return w.gather(1, torch.multinomial(p, 1, generator=generator))      # (R, 1)
    centroids = [draw(mass)]
    d2 = (w - centroids[0]) ** 2
    for _ in range(C - 1):
        centroids.append(draw(mass * d2))
        d2 = torch.minimum(d2, (w - centroids[-1]) ** 2)
    return torch.cat(centroids, 1)


def _lloyd_sorted(v, m, codebook, max_iters):
    """Weighted Lloyd: weights to their nearest centroid, centroids to the weighted mean of their members,
    until no assignment changes. On sorted rows v (R, g) with mass m, the members of sorted centroid j
    are the run of weights between midpoints j-1 and j (a binary search) and their weighted mean comes
    from prefix sums: O(C log g) a row and iteration instead of O(g). Returns the codebook (R, C).
    A row whose runs did not change is a fixed point (its next means are the same numbers), so it leaves
    the iteration: once at most half the rows still move, the rest are set aside (same result, and the
    cost follows the rows still moving, not the slowest row of the layer)."""
    P, Q = (F.pad(t.double().cumsum(1), (1, 0)) for t in (m, m * v))       # (R, g+1)
    result = codebook.float().clone()
    rows = torch.arange(v.shape[0], device=v.device)                       # the rows still iterating
    ends = None
    for _ in range(max_iters):
        codebook = codebook.sort(dim=1).values
        midpoints = (codebook[:, 1:] + codebook[:, :-1]) / 2               # as in _assign: ties go down
        new_ends = _searchsorted(v, midpoints, right=True)                 # (R, C-1): end of runs 0..C-2
        if ends is not None:
            moving = (new_ends != ends).any(1)
            n_moving = int(moving.sum())
            if n_moving <= len(rows) // 2:                                 # set the fixed points aside
                result[rows] = codebook
                keep = moving.nonzero()[:, 0]
                rows, v, P, Q, codebook, new_ends = (t[keep] for t in (rows, v, P, Q, codebook, new_ends))
            if n_moving == 0:
                return result
        ends = new_ends
        bounds = F.pad(F.pad(ends, (1, 0)), (0, 1), value=v.shape[1])      # (R, C+1): run j = [b_j, b_j+1)
        mass = P.gather(1, bounds[:, 1:]) - P.gather(1, bounds[:, :-1])
        total = Q.gather(1, bounds[:, 1:]) - Q.gather(1, bounds[:, :-1])
        codebook = torch.where(mass > 0, total / mass.clamp_min(1e-300), codebook.double()).float()
    result[rows] = codebook
    return result


def _unit_importance(h):
    """h scaled by a power of two so that its largest value is in [0.5, 1): every weighted sum of the
    clustering keeps its argmin under any common scale of h, and huge activations (h ~ x^2 past 1e19)
    would overflow float32's squares and products of masses (centroids of 1e20 from weights of 0.1)."""
    h = h.float()
    top = h.max() if h.numel() else h.new_zeros(())
    return h if not 0 < top < math.inf else torch.ldexp(h, -torch.frexp(top).exponent)


def _grouped_problem(W, h, group_size, outliers=None):
    """Grouped rows w (R, g) of W, the mask of weights the codebook has to fit (not padding, not outliers)
    and their mass h_k (scaled, _unit_importance); a group with no importance at all (dead input channels)
    gets equal weights."""
    N, K = W.shape
    keep = torch.ones_like(W, dtype=torch.bool)
    if outliers is not None:
        keep[outliers[0], outliers[1]] = False
    w, keep = _grouped(W.detach().float(), group_size), _grouped(keep, group_size)
    mass = _grouped(_unit_importance(h).expand(N, K), group_size) * keep
    return w, keep, torch.where(mass.sum(1, keepdim=True) > 0, mass, keep.float())


def select_outliers(W, h, frac):
    """Dense-and-sparse: the top `frac` of weights by importance-weighted magnitude h_k * w^2, kept in full
    precision. Returns (rows, cols, values) sorted by position, or None."""
    n = round(frac * W.numel())
    if n == 0:
        return None
    flat = (h * W * W).flatten().topk(n).indices.sort().values
    rows, cols = flat // W.shape[1], flat % W.shape[1]
    return rows, cols, W[rows, cols]


def cluster(W, h, n_centroids, group_size=None, init="density", max_iters=LLOYD_MAX_ITERS,
            outlier_frac=0.0, generator=None):
    """Cluster every row (or group) of W (N, K) into n_centroids, minimizing sum_k h_k (w_k - c)^2.

    init: "density" (LCD: see density_init), "uniform" (min/max grid, RTN) or "kmeans++".
    Weighted Lloyd refinement follows (max_iters=0: none, plain nearest-centroid rounding).
    Returns dict(codebook=(N, G, C) float32, idx=(N, K) int64, outliers=(rows, cols, vals) or None)."""
    N, K = W.shape
    group_size = check_group_size(group_size, K)
    if not (isinstance(n_centroids, int) and n_centroids >= 2 and n_centroids & (n_centroids - 1) == 0):
        raise ValueError(f"n_centroids must be a power of two >= 2, got {n_centroids!r}")
    check_weight(W)
    W = W.detach().float()
    h = torch.as_tensor(h).detach().float().to(W.device)
    if h.shape != (K,) or not torch.isfinite(h).all() or (h < 0).any():
        raise ValueError(f"importance h must be a finite non-negative tensor of shape ({K},), got "
                         f"shape {tuple(h.shape)}")
    outliers = select_outliers(W, h, outlier_frac) if outlier_frac > 0 else None
    w, keep, mass = _grouped_problem(W, h, group_size, outliers)     # (R, g) each
    v, order = w.sort(dim=1)
    m = mass.gather(1, order)                                        # density init and Lloyd work sorted
    if init == "density":
        codebook = density_init(v, m, n_centroids)
    elif init == "uniform":
        codebook = uniform_init(w, keep, n_centroids)
    elif init == "kmeans++":
        if generator is None:
            generator = torch.Generator(W.device).manual_seed(0)     # deterministic by default
        codebook = kmeanspp_init(w, mass, n_centroids, generator)
    else:
        raise ValueError(f"unknown init {init!r}: use 'density', 'uniform' or 'kmeans++'")
    codebook = _lloyd_sorted(v, m, codebook, max_iters)
    idx = _assign(w, codebook)
    G = math.ceil(K / group_size)
    return dict(codebook=codebook.view(N, G, n_centroids), idx=idx.view(N, -1)[:, :K].contiguous(),
                outliers=outliers)


def lloyd(W, h, codebook, idx, group_size, max_iters=LLOYD_MAX_ITERS, outliers=None):
    """Weighted Lloyd refinement from a given codebook (N, G, C) and assignment idx (N, K): the first step
    moves the centroids to the weighted means of the given assignment. Returns (codebook, idx)."""
    N, K = W.shape
    group_size = check_group_size(group_size, K)
    w, _, mass = _grouped_problem(W, h, group_size, outliers)
    c = codebook.detach().float().reshape(w.shape[0], -1)                        # (R, C)
    if max_iters > 0:                                                            # first: the given idx
        c = _weighted_means(w, mass, _grouped(idx, group_size), c)
        v, order = w.sort(dim=1)
        c = _lloyd_sorted(v, mass.gather(1, order), c, max_iters - 1)
    return c.view(codebook.shape), _assign(w, c).view(N, -1)[:, :K].contiguous()


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


def weighted_sse(W, h, codebook, idx, group_size, outliers=None):
    """sum_k h_k (w - w_hat)^2 per row and group: (N, G). Outliers, if given, are exact (zero error)."""
    W_hat = dequantize(codebook, idx, group_size)
    if outliers is not None:
        W_hat[outliers[0], outliers[1]] = outliers[2].float()
    err = h.float() * (W.float() - W_hat) ** 2                                     # (N, K)
    return _grouped(err, check_group_size(group_size, W.shape[1])).sum(1).view(W.shape[0], -1)


# ---- the compensated start: LCD's codebooks placed with GPTQ's error feedback ----------------------------
# cluster() fits each row's codebook to the row alone: every weight rounds to its nearest centroid and the
# errors of a row's weights add up in the layer output, however the inputs correlate. GPTQ (Frantar,
# Ashkboos, Hoefler, Alistarh 2022, arXiv:2210.17323) rounds the columns one at a time and pushes each
# column's rounding error onto the columns not yet rounded, through the inverse of the input Hessian
# H = X^T X / n, so that the layer OUTPUT x W^T stays close; CLAQ (Wang et al. 2024, arXiv:2405.17233)
# runs k-means codebooks inside that loop. gptq_cluster does the same with LCD's own per-row (per-group)
# codebooks, then moves the centroids to their least-squares values under H given the assignment
# (refit_codebook), and alternates the two while that lowers the output error. The loop below is GPTQ's,
# shared with baselines.py's GPTQ and CLAQ (lower files do not import higher ones, so it lives here).
GPTQ_DAMP = 0.01         # damping added to diag(H), as a fraction of its mean (GPTQ's percdamp)
GPTQ_BLOCK = 128         # columns per lazy batch update
GPTQ_ACT_ORDER = True    # quantize columns in order of decreasing diag(H)
GPTQ_DAMP_MAX = 1.0      # a failed Cholesky factorization is retried with 10x the damping, up to this much
COMPENSATE_ROUNDS = 2    # gptq_cluster's assign + refit rounds (the 2nd re-assigns with the refit centroids)
REFIT_RIDGE = 1e-6       # refit_codebook's pull toward the old centroid, as a fraction of the mean diagonal


def check_hessian(H, K):
    """H must be a finite (K, K) tensor (the layer input Hessian X^T X / n); returns it as float64."""
    if not isinstance(H, torch.Tensor) or H.shape != (K, K):
        raise ValueError(f"the Hessian must be a ({K}, {K}) tensor, got "
                         f"{tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__}")
    if not torch.isfinite(H).all():
        raise ValueError("the layer Hessian holds NaN or inf: its calibration inputs overflowed or held no "
                         "tokens; check the calibration data")
    if (torch.diag(H) < 0).any():
        raise ValueError("the layer Hessian has a negative diagonal entry (a mean of x_k^2 cannot be): pass "
                         "X^T X / n of the layer's calibration inputs")
    return H.double()


def damped_factor(H, damp, factor):
    """factor(H + lambda I) with lambda = damp * mean diag(H) (damp alone when diag(H) is all 0: no input
    ever active). A factorization that fails (H not positive definite in floating point: collinear
    inputs) is retried with damp 10x larger while damp <= max(GPTQ_DAMP_MAX, damp); then a ValueError."""
    check_number("damp", damp, 0.0, open_low=True)
    mean = float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    tried = damp
    while True:
        try:
            return factor(H + tried * (mean if mean > 0 else 1.0) * eye)
        except torch.linalg.LinAlgError:
            if tried * 10 > max(GPTQ_DAMP_MAX, damp) * (1 + 1e-9):
                break
            tried *= 10
    raise ValueError(f"the layer Hessian is not positive definite even damped by {tried:g} x its mean diagonal: "
                     "the calibration inputs of this layer are degenerate or not a Hessian (check the "
                     "calibration data, or pass a larger damp)")



def gptq_loop(W, H, quantize_column, act_order=GPTQ_ACT_ORDER, block_size=GPTQ_BLOCK, damp=GPTQ_DAMP):
    """Run GPTQ's compensation loop; the caller decides how one column is quantized.

    quantize_column(k, w, current) gets the ORIGINAL index k of the column, its current (compensated)
    values w (N,), and current(ks) -> (N, len(ks)) the current values of any not-yet-quantized original
    columns ks (for grids fit when a group starts); it returns the quantized column (N,).
    Returns the quantized W (N, K) in the original column order.
    """
    check_number("block_size", block_size, 1, integer=True)
    W = W.clone().double()
    H = H.clone().double()
    N, K = W.shape
    dead = torch.diag(H) == 0                                 # inputs never active: weights irrelevant
    H[dead, dead] = 1.0                                       # (the GPTQ reference's fallback: an all-zero
    W[:, dead] = 0.0                                          # Hessian becomes I and W zero, exact on X = 0)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    position = torch.argsort(perm)                            # position[k] = step at which column k is done
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = damped_factor(H, damp, lambda A: torch.linalg.cholesky(       # upper Cholesky factor of H^-1
        torch.cholesky_inverse(torch.linalg.cholesky(A)), upper=True))
    Q = torch.zeros_like(W)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()                              # this block, kept up to date column by column
        Err1 = torch.zeros_like(W1)                           # scaled errors, applied to later blocks at once

        def current(ks, i):
            p = position[torch.as_tensor(ks)]
            vals = W[:, p].clone()
            inside = (p >= i1) & (p < i2)
            vals[:, inside] = W1[:, p[inside] - i1]
            later = p >= i2                                   # pending lazy updates of this block so far
            vals[:, later] -= Err1[:, :i] @ Hinv[i1:i1 + i][:, p[later]]
            return vals.float()

        for i in range(i2 - i1):
            w = W1[:, i]
            q = quantize_column(int(perm[i1 + i]), w.float(), lambda ks: current(ks, i)).double()
            Q[:, i1 + i] = q
            err = (w - q) / Hinv[i1 + i, i1 + i]
            W1[:, i:] -= err[:, None] * Hinv[i1 + i, i1 + i:i2][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, position].float()


def output_sse(W, W_hat, H):
    """Per row n the output error (w_n - w_hat_n) H (w_n - w_hat_n)^T = mean over tokens of (x w_n - x
    w_hat_n)^2: W, W_hat (N, K), H (K, K) -> (N,) float64. Summed over rows: tr(E H E^T), E = W - W_hat."""
    E = (W.double() - W_hat.double())
    return ((E @ H.double()) * E).sum(1)


@torch.no_grad()
def refit_codebook(W, H, codebook, idx, group_size=None, ridge=REFIT_RIDGE, chunk=64):
    """The centroids that minimize the layer output error given the assignment: for every row n,
        min over c_n of (w_n - c_n S_n) H (w_n - c_n S_n)^T,    S_n (G C, K) the one-hot of slot g(k) C + idx[n, k]
    whose normal equations are the (G C) x (G C) system (S_n H S_n^T) c_n = S_n H w_n^T (C = 2^b centroids, G
    groups a row). A centroid no weight uses (a zero row of the system) and any near-singular direction are
    held by a small ridge toward the old value (ridge x the mean diagonal of the system). The solution is
    rounded to fp16 (what LUTLinear stores) and kept only where it lowers the row's error: the result is
    never worse than the given codebook, row by row, as stored in fp16.
    W (N, K), H (K, K), codebook (N, G, C), idx (N, K) -> codebook (N, G, C) float32 (fp16-exact). Cost:
    N K^2 G C multiply-adds (H times the one-hot), rows `chunk` at a time."""
    N, K = W.shape
    group_size = check_group_size(group_size, K)
    G, C = codebook.shape[1], codebook.shape[2]
    if codebook.shape[0] != N or G != math.ceil(K / group_size) or idx.shape != (N, K):
        raise ValueError(f"refit_codebook: codebook {tuple(codebook.shape)} and idx {tuple(idx.shape)} do not fit "
                         f"W {tuple(W.shape)} with group_size {group_size}")
    H = check_hessian(H, K)
    D = G * C
    slot = (torch.arange(K, device=W.device) // group_size) * C + idx.long()      # (N, K) in 0..D-1
    old = codebook.detach().reshape(N, D).double()
    rhs_all = W.double() @ H                                                       # (N, K): (H w_n^T)^T
    new = old.clone()
    Hf = H.float()
    for r in range(0, N, chunk):
        s = slot[r:r + chunk]                                                      # (n, K)
        n = s.shape[0]
        onehot = F.one_hot(s, D).float()                                           # (n, K, D)
        HS = (Hf @ onehot.transpose(0, 1).reshape(K, n * D)).view(K, n, D)         # (K, n, D): H S_n^T
        M = torch.einsum("nkd,kne->nde", onehot, HS).double()                      # (n, D, D)
        rhs = torch.zeros(n, D, dtype=torch.float64, device=W.device).scatter_add_(1, s, rhs_all[r:r + chunk])
        lam = ridge * M.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)          # (n,)
        eye = torch.eye(D, dtype=torch.float64, device=W.device)
        c = torch.linalg.solve(M + lam[:, None, None] * eye, (rhs + lam[:, None] * old[r:r + chunk])[..., None])[..., 0]
        c = c.clamp(-FP16_MAX, FP16_MAX).half().double()                           # as stored
        # row error up to a constant: c^T M c - 2 c^T rhs; keep the new centroids only where it is lower
        def err(x):
            return (x[:, None, :] @ M @ x[:, :, None])[:, 0, 0] - 2 * (x * rhs).sum(1)
        better = err(c) < err(old[r:r + chunk])
        new[r:r + chunk] = torch.where(better[:, None], c, old[r:r + chunk])
    return new.float().view(N, G, C)


@torch.no_grad()
def gptq_assign(W, H, codebook, group_size=None, h=None, act_order=GPTQ_ACT_ORDER, block_size=GPTQ_BLOCK,
                damp=GPTQ_DAMP, fit=False, init="density"):
    """GPTQ's loop (gptq_loop) with LCD's codebooks: column after column, every weight goes to the centroid of
    its row (group) nearest its COMPENSATED value, and the rounding error moves on to the columns not yet
    assigned. fit=True: the codebook of a group is fit (cluster(): `init` + weighted Lloyd, importance h) on
    the group's compensated weights when its first column comes up, as GPTQ fits its grid; then `codebook`
    may be the number of centroids instead. Centroids are used as stored, in fp16.
    W (N, K), H (K, K), codebook (N, G, C) -> (codebook (N, G, C) fp16-exact float32, idx (N, K) int64,
    compensated (N, K): every weight's value when it was assigned, from which it is its centroid's nearest)."""
    N, K = W.shape
    group_size = check_group_size(group_size, K)
    G = math.ceil(K / group_size)
    if fit:
        C = codebook.shape[-1] if isinstance(codebook, torch.Tensor) else int(codebook)
        codebook = torch.zeros(N, G, C)
        h = torch.ones(K) if h is None else h.float()
    else:
        C = codebook.shape[-1]
        codebook = codebook.detach().float().clone()
    idx = torch.zeros(N, K, dtype=torch.long)
    compensated = torch.zeros(N, K)
    sorted_c, midpoints, order = {}, {}, {}

    def quantize_column(k, w, current):
        g = k // group_size
        if g not in midpoints:
            if fit:
                cols = list(range(g * group_size, min(g * group_size + group_size, K)))
                codebook[:, g] = cluster(current(cols), h[cols], C, init=init)["codebook"][:, 0].half().float()
            sorted_c[g], order[g] = codebook[:, g].half().float().sort(dim=1)                      # (N, C)
            midpoints[g] = ((sorted_c[g][:, 1:] + sorted_c[g][:, :-1]) / 2).contiguous()        # as _assign
        j = _searchsorted(midpoints[g], w[:, None])                                             # (N, 1)
        idx[:, k] = order[g].gather(1, j)[:, 0]
        compensated[:, k] = w
        return sorted_c[g].gather(1, j)[:, 0]

    gptq_loop(W, H, quantize_column, act_order, block_size, damp)
    return codebook.half().float(), idx, compensated


@torch.no_grad()
def gptq_cluster(W, H, n_centroids, group_size=None, h=None, rounds=COMPENSATE_ROUNDS, refit=True,
                 act_order=GPTQ_ACT_ORDER, block_size=GPTQ_BLOCK, damp=GPTQ_DAMP, init="density"):
    """LCD's compensated start ("lcd-gptq"): per-row (per-group) codebooks of n_centroids, the assignment made
    with GPTQ's error feedback, the centroids refit to it under the Hessian, `rounds` times:
      round 1: codebooks by `init` (density) + weighted Lloyd (cluster(), importance h: None takes diag(H)) on
               each group's compensated weights as its first column comes up (gptq_assign(fit=True); with
               one codebook a row that is W itself, lcd-init's clustering);
      round r > 1: the same loop with the refit codebooks held fixed (a new assignment);
      after each round (refit=True): refit_codebook, the least-squares centroids under H.
    The output error tr((W - W_hat) H (W - W_hat)^T) is a sum over rows, so every row keeps the best of its
    candidates: the rounds, and the uncompensated clustering (cluster(), refit too). The result is never
    worse than lcd-init's clustering on the calibration Hessian, row by row, and more rounds never hurt.
    Sources: GPTQ (Frantar et al. 2022, arXiv:2210.17323) for the loop, CLAQ (Wang et al. 2024,
    arXiv:2405.17233) for codebooks inside it; the refit is the least squares of the centroids under H.
    W (N, K) float, H (K, K) the layer input Hessian X^T X / n, n_centroids 2, 4, 8 or 16.
    Returns dict(codebook (N, G, C) float32 fp16-exact, idx (N, K) int64, latent (N, K): a weight whose
    nearest centroid is its assignment (the compensated value, or the centroid itself where the refit moved
    the cell), outliers=None, errors: output error of each candidate [uncompensated, round 1, ...] and, last,
    of the result); cluster()'s format plus latent and errors.
    ValueError for bad shapes, a non-finite W or H, or an H that no damping makes positive definite."""
    N, K = W.shape
    group_size = check_group_size(group_size, K)
    if not (isinstance(n_centroids, int) and n_centroids >= 2 and n_centroids & (n_centroids - 1) == 0):
        raise ValueError(f"n_centroids must be a power of two >= 2, got {n_centroids!r}")
    check_number("rounds", rounds, 1, integer=True)
    check_weight(W)
    W = W.detach().float()
    H = check_hessian(H, K)
    h = torch.diag(H).float() if h is None else torch.as_tensor(h).detach().float()
    if h.shape != (K,) or not torch.isfinite(h).all() or (h < 0).any():
        raise ValueError(f"importance h must be a finite non-negative tensor of shape ({K},), got shape {tuple(h.shape)}")

    def candidate(codebook, idx, values):
        """(codebook, idx, values each nearest its centroid, per-row output error (N,)), refit if asked."""
        codebook = codebook.half().float()
        if refit:
            codebook = refit_codebook(W, H, codebook, idx, group_size)
        return codebook, idx, values, output_sse(W, dequantize(codebook, idx, group_size), H)

    plain = cluster(W, h, n_centroids, group_size, init=init)                     # lcd-init's clustering
    best = list(candidate(plain["codebook"], plain["idx"], W))
    errors, codebook = [float(best[3].sum())], n_centroids
    # one codebook a row: round 1 would fit it at the row's first column, before any compensation, on W
    # itself, which is the clustering just done (up to dead inputs, zeroed by the loop): reuse it
    fit = math.ceil(K / group_size) > 1
    if not fit:
        codebook = plain["codebook"]
    for r in range(rounds):
        codebook, idx, compensated = gptq_assign(W, H, codebook, group_size, h, act_order, block_size, damp,
                                                 fit=fit and r == 0, init=init)
        cand = candidate(codebook, idx, compensated)
        codebook = cand[0]
        errors.append(float(cand[3].sum()))
        better = cand[3] < best[3]                                                # (N,) rows this round wins
        for i in range(4):
            best[i] = torch.where(better.view(-1, *[1] * (best[i].dim() - 1)), cand[i], best[i])
    codebook, idx, values, row_errors = best
    errors.append(float(row_errors.sum()))
    # the latent weights of a student (LCDLinear) must have their assignment as nearest centroid: the
    # compensated value has it for the codebook it was assigned with; where the refit moved the cells, the
    # weight starts at its centroid instead (_nearest: section 6's, the student's own re-assignment)
    latent = torch.where(_nearest(values, codebook, group_size) == idx, values, dequantize(codebook, idx, group_size))
    return dict(codebook=codebook, idx=idx, latent=latent, outliers=None, errors=errors)


# ==== 3. packed format ==========================================================================
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


# ==== 4. LUTLinear ==============================================================================
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


class LUTLinear(nn.Module):
    """A linear layer served from look-up tables: y = x W_hat^T + bias with
    W_hat[n, k] = codebook[n, k // group_size, idx[n, k]], the indices packed as in section 3.

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
        """Whether forward() takes the partial-sum path for x (..., K): fp32 activations on the CPU, at
        most PARTIAL_SUM_ROWS rows, 2-bit indices, codebook groups made of whole bytes (4 entries). Other
        fp32 activations on the CPU take blocked_forward; other dtypes, and x that needs a gradient,
        F.linear with weight_dequantized() (the out= buffers of the fast paths have no autograd)."""
        return (x.dtype == torch.float32 and not x.is_cuda and x.numel() <= PARTIAL_SUM_ROWS * self.in_features
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
        bits = 32 * self.packed.numel() + 16 * self.codebook.numel()
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
        # On a GPU, kernels.py serves the layer from the packed format (kernels.cu): it gets x after the
        # input scale and activation quantization and returns x W_hat^T + bias (outliers included), or
        # None when it cannot (no CuPy, a case it does not cover): then the PyTorch reference below runs.
        # On a CPU, fp32 activations without autograd go to kernels.c the same way (kernels.lut_forward_cpu).
        y = kernels.lut_forward_cuda(self, x) if x.is_cuda else kernels.lut_forward_cpu(self, x)
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


# ==== 5. quantize(), footprint, save / load =====================================================
BUILTIN_METHODS = ("lcd", "rtn", "kmeans")  # quantize()'s own names; other quantizers are passed as functions


def _set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantize_linear(linear, bits, group_size=None, h=None, method="lcd", outlier_frac=0.0, **kw):
    """One nn.Linear -> LUTLinear. "lcd": density init + importance-weighted Lloyd (h: mean x_k^2 from
    calibration, None for all ones); "rtn": uniform min/max grid, rounding only, unweighted; "kmeans":
    k-means++ + Lloyd, unweighted. kw go to cluster() (max_iters, generator)."""
    W = linear.weight.detach().float()
    ones = torch.ones(W.shape[1], device=W.device)
    if method == "lcd":
        init, h = "density", ones if h is None else h
    elif method == "kmeans":
        init, h = "kmeans++", ones
    elif method == "rtn":
        init, h, kw = "uniform", ones, {**kw, "max_iters": 0}
    else:
        raise ValueError(f"quantize_linear knows methods {list(BUILTIN_METHODS)}, got {method!r}")
    out = cluster(W, h, 2 ** bits, group_size, init, outlier_frac=outlier_frac, **kw)
    layer_class = GridLinear if method == "rtn" else LUTLinear      # RTN stores its grid as lo + step
    return layer_class.from_clustered(out["codebook"], out["idx"], bits, group_size, bias=linear.bias,
                                      outliers=out["outliers"])


@torch.no_grad()
def quantize(model, bits, group_size=None, calib=None, method="lcd", skip=None, outlier_frac=0.0, **kw):
    """Replace the model's linear layers (find_linears: all but embeddings and the output head, minus
    `skip`) with quantized layers, in place; returns the model.

    bits: 2, 3 or 4; group_size: inputs per codebook (None: one codebook per row); calib: an iterable of
    (B, T) int64 token-id tensors for the importance h_k = mean x_k^2 (None: h = 1, plain magnitude);
    method: "lcd", "rtn", "kmeans", or a per-layer quantizer function
        layer = method(W (N, K) float32, stats, bits, group_size, bias=..., **kw)
    (baselines.METHODS["gptq"], ...; baselines.quantize resolves those names), whose attributes
    needs_hessian (bool: stats["H"] = X^T X / n) and needs_inputs (int: stats["X"], input rows kept) say
    what calibration must record; outlier_frac: fraction of weights kept exactly (dense-and-sparse).
    Works on any model whose forward takes token ids. lcd.py imports no file built on it, so names of
    quantizers outside it are resolved by the caller.

    Errors (ValueError, before any work): bad arguments; calibration data that is not token ids, holds
    no tokens, or has ids outside the model's vocabulary; a layer with NaN/inf weights or weights past
    fp16's range (FP16_MAX: codebooks are stored in fp16), named with its largest value. The model is
    changed only once every layer has been quantized: an error leaves it as it was."""
    check_bits(bits)
    check_number("outlier_frac", outlier_frac, 0.0, 1.0, open_high=True)
    if "max_iters" in kw:
        check_number("max_iters", kw["max_iters"], 0, integer=True)
    if calib is not None:
        calib = calibration_batches(model, calib)
    linears = find_linears(model, skip)
    if not linears:
        raise ValueError("no nn.Linear layers to quantize (embeddings and the output head are always kept)")
    for name, linear in linears.items():                         # check everything before changing anything
        check_group_size(group_size, linear.in_features)
        check_weight(linear.weight, f"layer {name!r}")
        check_fp16(linear.weight, f"layer {name!r}: a weight", f"keep the layer in full precision with "
                   f"skip=[{name!r}], or rescale the model")
    if callable(method):
        baseline = method
        needs_hessian, needs_inputs = bool(getattr(method, "needs_hessian", False)), getattr(method, "needs_inputs", 0)
    elif method in BUILTIN_METHODS:
        baseline, needs_hessian, needs_inputs = None, False, 0
    else:
        raise ValueError(f"unknown method {method!r}: lcd.quantize knows {list(BUILTIN_METHODS)} or takes a per-layer "
                         f"quantizer function; for a baseline pass it, e.g. method=baselines.METHODS[{method!r}] "
                         f"(import baselines), or call baselines.quantize(model, bits, ..., method={method!r})")
    stats = None
    if calib is not None and method not in ("rtn", "kmeans"):     # the plain baselines ignore importance
        stats = collect_stats(model, calib, list(linears), full_hessian=needs_hessian, keep_inputs=needs_inputs)
    quantized = {}
    for name, linear in linears.items():
        try:
            if baseline is None:
                h = stats[name]["h"] if stats else None
                quantized[name] = quantize_linear(linear, bits, group_size, h, method, outlier_frac, **kw)
            else:
                ones = torch.ones(linear.in_features, device=linear.weight.device)
                layer_stats = stats[name] if stats else {"h": ones, "H": None, "n": 0}
                extra = {"outlier_frac": outlier_frac} if outlier_frac else {}
                quantized[name] = baseline(linear.weight.detach().float(), layer_stats, bits, group_size,
                                           bias=linear.bias, **extra, **kw)
        except ValueError as e:                                  # say which layer
            raise ValueError(f"layer {name!r}: {e}") from e
    for name, layer in quantized.items():
        _set_module(model, name, layer)
    return model


class Q8Linear(nn.Module):
    """An inference-only linear layer in GGUF's Q8_0 format: along K, blocks of 32 int8 weights with one fp16
    scale each (34 bytes, 8.5 bits a weight; kernels.q8_quantize), served on a CPU by kernels.c's q8_gemv,
    elsewhere (or for a gradient) by F.linear with the dequantized weight. Buffer: blocks (N, ceil(K / 32) * 34)
    uint8. Made by quantize_head for the output head, which LUTLinear's codebooks leave out."""

    def __init__(self, in_features, out_features, bias=False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        n_blocks = math.ceil(in_features / kernels.Q8_BLOCK)
        self.register_buffer("blocks", torch.zeros(out_features, n_blocks * (2 + kernels.Q8_BLOCK), dtype=torch.uint8,
                                                   device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear):
        """nn.Linear (N, K) -> Q8Linear of its weight (the bias, if any, kept in fp32)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device)
        layer.blocks.copy_(kernels.q8_quantize(linear.weight.detach()))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def weight_dequantized(self):
        """(N, K) float32: fp16 scale * int8 weight, block by block."""
        return kernels.q8_dequantize(self.blocks, self.in_features)

    def storage_bits(self):
        return 8 * self.blocks.numel()

    def forward(self, x):                                                   # x: (..., K) -> (..., N)
        y = kernels.q8_forward_cpu(self.blocks, x, self.out_features) if not x.is_cuda else None
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
    _set_module(model, name, Q8Linear.from_linear(head))
    return model


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


def atomic_write(path, write):
    """Write `path` atomically: write(tmp) fills a temporary file beside it, flushed to disk, which is then
    renamed over `path`: a crash, a full disk or an error midway leaves the old file (or none) as it was,
    never a half-written one. The file gets the mode a plain open() would give (0666 minus the umask,
    usually 0644), not mkstemp's private 0600.

    A full disk (OSError ENOSPC, or torch.save's "unexpected pos" RuntimeError) is an OSError(ENOSPC)
    saying "no space left on the device holding <path>; the previous file is intact". A writer killed
    before its cleanup (SIGKILL, SIGTERM) leaves its temp file behind; the next write of the same path
    removes such stale files of its own (stale_temp_files: <name>.<8 random characters>.tmp, mkstemp's
    pattern for this name, nothing else) -- one writer per file, as every caller here is."""
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
    os.close(fd)
    try:
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


def stale_temp_files(path):
    """The temp files atomic_write(path) leaves when killed: <basename>.XXXXXXXX.tmp beside `path`, with
    XXXXXXXX as tempfile.mkstemp names them (8 of a-z, 0-9, _)."""
    directory, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(base) + r"\.[a-z0-9_]{8}\.tmp")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, n) for n in sorted(names) if pattern.fullmatch(n)]


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
    distilled = [name for name, m in model.named_modules() if isinstance(m, LCDLinear)]
    if distilled:
        raise ValueError(f"save_quantized: {len(distilled)} layer(s) are LCDLinear, still being distilled (first "
                         f"{distilled[0]!r}): call lcd.freeze(model) first, or save a frozen copy: "
                         "lcd.save_quantized(lcd.freeze(copy.deepcopy(model)), path)")
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
    blob = read_torch_file(path, "save the quantized model again (lcd.save_quantized)", mmap=mmap)
    header = blob.get("header") if isinstance(blob, dict) else None
    if not isinstance(header, dict) or header.get("format") != "lcd-quantized" or "state_dict" not in blob:
        raise ValueError(f"{path} is not a file written by lcd.save_quantized")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {header.get('version')!r}; this lcd.py reads "
                         f"version {FORMAT_VERSION}: re-save it with a matching lcd.py")
    if not isinstance(header.get("layers"), dict):
        raise ValueError(f"{path}: the header lists no layers: not a file written by lcd.save_quantized")
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
        _set_module(model, name, LUTLinear(**spec, device=device))
    model.load_state_dict(state_dict)
    for name in header["layers"]:
        layer = model.get_submodule(name)
        for buffer in ("codebook", "outlier_vals", "in_scale"):
            if getattr(layer, buffer) is not None and not torch.isfinite(getattr(layer, buffer)).all():
                raise ValueError(f"{path}: layer {name!r} stores non-finite {buffer} values: the file is corrupt")
    return model


# ==== 6. distillation ===========================================================================
# The clustered model becomes a student that learns from the full-precision teacher (LCD_DESIGN.md 2-5):
#   LCDLinear        - a trainable codebook layer: latent FP weights decide the assignments, learnable
#                      centroids give the forward weight, a straight-through estimator trains both
#   smoothing        - per-layer SmoothQuant scales with alpha chosen from a grid (only with a_bits)
#   prepare_student  - deep-copy the teacher, swap its linears for LCDLinear (calibration + clustering)
#   merge_codebook   - progressive schedule: halve the codebooks by the cheapest adjacent merges
#   speculative step - every S steps try a few candidate students on a held-out batch, keep the best
#   distill()        - the loop: KL(p_teacher || p_student) at temperature tau (+ lambda * CE)
#   freeze()         - LCDLinear -> LUTLinear (packed, fp16 codebooks) for inference
#
# Choices made by measurement (baby teacher, b = 2, one codebook per row, excess val loss over the teacher;
# single runs, so differences below ~0.002 nats are noise):
# - latent-weight lr 1e-3 (1e-4: 0.029, 1e-3: 0.018, 3e-3: 0.029 at 200 steps); centroid lr 1e-3 (3e-3 worse).
# - assignments follow the latent weights every step (reassign_every=1); re-assigning only through the
#   speculative "reassign" candidate was worse (0.034 vs 0.029 at 200 steps).
# - progressive (p = 1) did not pay at these budgets: the 8-centroid stage costs steps the 4-centroid stage
#   needs (600 steps: 0.0118 with p = 1, 0.0109 without; 200 steps: 0.023 vs 0.018). Off by default.
# - speculative: "ema" (the running average of the trajectory) wins almost every check and is what makes
#   LCD beat plain KD; "lloyd" (refit to the latent weights) and "bold" (extrapolation) never won.
# - adaptive smoothing did not help after distillation (600 steps, excess over the teacher: a_bits=8 0.0127
#   with it, 0.0110 without; a_bits=4 0.097 with, 0.074 without), although each layer's alpha (or "off")
#   is the one with the least calibration output error: off by default, kept as a switch.
# - smoothing scales stay an input scale of the layer (LUTLinear.in_scale, 16 bits per input channel,
#   counted in the footprint); folding them into a preceding LayerNorm is left out.
import copy

import torch.distributed as dist

SMOOTHING_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # the per-layer grid of SmoothQuant's migration strength
SPECULATIVE_PATHS = ("keep", "reassign", "lloyd", "bold", "average", "ema")  # candidates of a speculative step
SPECULATIVE_EMA_DECAY = 0.95  # per-step decay of the running average that the "ema" candidate offers
SPECULATIVE_LLOYD_ITERS = 3  # weighted Lloyd iterations of the "lloyd" candidate
SMOOTHING_TOKENS = 4096      # calibration tokens per layer kept to choose the smoothing strength
SMOOTHING_LLOYD_ITERS = 10   # Lloyd iterations of the clustering that ranks the smoothing strengths


def _nearest(W, codebook, group_size):
    """idx (N, K) of the centroid nearest to every weight of W (N, K) in its row/group's codebook (N, G, C)."""
    N, K = W.shape
    C = codebook.shape[-1]
    idx = _assign(_grouped(W.detach().float(), group_size), codebook.detach().float().reshape(-1, C))
    return idx.view(N, -1)[:, :K].contiguous()


def _flat_index(idx, group_size, C):
    """(N, K) positions of idx's centroids in the codebook viewed as (N, G * C)."""
    return idx.long() + torch.arange(idx.shape[1], device=idx.device) // group_size * C


class _StraightThrough(torch.autograd.Function):
    """W_q[n, k] = fp16(codebook)[n, k // group_size, idx[n, k]] (N, K) from weight (N, K), codebook (N, G, C),
    idx (N, K); backward: dL/dweight = dL/dW_q (straight through), dL/dcodebook[n, g, c] = sum of dL/dW_q
    over the weights of row n, group g assigned to c. The same as dequantize(fp16 codebook + (p - p.detach()),
    idx) + (weight - weight.detach()) but without the (N, K) temporaries of that expression."""

    @staticmethod
    def forward(ctx, weight, codebook, idx, group_size):
        N, G, C = codebook.shape
        ctx.save_for_backward(idx)            # not the int64 flat index: backward rebuilds it (memory)
        ctx.codebook_shape, ctx.group_size = codebook.shape, group_size
        return codebook.detach().half().float().reshape(N, G * C).gather(1, _flat_index(idx, group_size, C))

    @staticmethod
    def backward(ctx, grad):
        idx, = ctx.saved_tensors
        N, G, C = ctx.codebook_shape
        grad_codebook = None
        if ctx.needs_input_grad[1]:
            flat = _flat_index(idx, ctx.group_size, C)
            grad_codebook = torch.zeros(N, G * C, dtype=grad.dtype, device=grad.device).scatter_add_(1, flat, grad)
            grad_codebook = grad_codebook.view(N, G, C)
        return grad if ctx.needs_input_grad[0] else None, grad_codebook, None, None


class LCDLinear(nn.Module):
    """A linear layer being distilled into codebook form.

    forward weight:  W_q[n, k] = codebook[n, k // group_size, idx[n, k]]                (the student's weight)
    straight-through: W = W_q + W_lat - W_lat.detach()   (value W_q; gradient dL/dW reaches both the latent
                      weight W_lat, as the identity, and every centroid, as the sum over the weights using it)
    assignments:      idx = the centroid nearest to each latent weight; re-computed by `reassign_()`, which
                      distill() calls every `reassign_every` steps (forward itself never changes state).
    Centroids are rounded to fp16 in the forward (straight-through as well), so the trained layer computes
    exactly what the stored LUTLinear will. Optional: input scale s (smoothing: y = x / s @ W^T, the latent
    weight and codebook live in the smoothed space W * s) and per-token activation fake-quant to a_bits."""

    def __init__(self, weight, codebook, idx, group_size, bias=None, importance=None, in_scale=None,
                 a_bits=None):
        super().__init__()
        N, K = weight.shape
        self.in_features, self.out_features, self.group_size = K, N, check_group_size(group_size, K)
        if codebook.dim() != 3 or codebook.shape[:2] != (N, math.ceil(K / self.group_size)):
            raise ValueError(f"codebook must have shape (N, G, C) = ({N}, {math.ceil(K / self.group_size)}, C),"
                             f" got {tuple(codebook.shape)}")
        self.weight = nn.Parameter(weight.detach().float().clone())       # (N, K) latent weight
        self.codebook = nn.Parameter(codebook.detach().float().clone())   # (N, G, C) learnable centroids
        # (N, K) assignments, one byte each (2^(b+p) <= 256 centroids): an int64 copy of a 135M model's would
        # be 850 MB; the gathers take the int64 index a layer at a time (_flat_index)
        self.register_buffer("idx", idx.detach().to(torch.uint8).clone())
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None
        if importance is None:
            importance = torch.ones(K)
        self.register_buffer("importance", importance.detach().float().clone())  # (K,) h of the input
        # the smoothing scale is a parameter so that distill(train_scales=True) can learn it; off by default
        self.in_scale = nn.Parameter(in_scale.detach().float().clone(), requires_grad=False) \
            if in_scale is not None else None
        self.a_bits = a_bits

    @property
    def n_centroids(self):
        return self.codebook.shape[-1]

    def quantized_weight(self):
        """W_q with the straight-through estimator: (N, K), differentiable wrt codebook and latent weight.
        Its value is the fp16-rounded codebook looked up at idx, bit-equal to LUTLinear (so freeze() changes
        no output); its gradient goes to the latent weight as it is and to each centroid as the sum over the
        weights using it (_StraightThrough: one gather forward, one scatter-add backward)."""
        return _StraightThrough.apply(self.weight, self.codebook, self.idx, self.group_size)

    def forward(self, x):
        if self.in_scale is not None:
            x = x / self.in_scale.to(x.dtype)
        if self.a_bits:
            x = fake_quantize_per_token(x, self.a_bits)        # what LUTLinear does; straight-through
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.quantized_weight().to(x.dtype), bias)

    @torch.no_grad()
    def reassign_(self):
        """Every weight to the centroid nearest its latent weight. Returns how many assignments changed."""
        new = _nearest(self.weight, self.codebook, self.group_size)
        changed = int((new != self.idx).sum())
        self.idx.copy_(new)
        return changed

    @torch.no_grad()
    def lloyd_(self, max_iters=SPECULATIVE_LLOYD_ITERS):
        """Refit: weighted Lloyd on the latent weights, starting from the current centroids and assignments."""
        codebook, idx = lloyd(self.weight, self.importance, self.codebook, self.idx.long(), self.group_size,
                              max_iters=max_iters)
        self.codebook.copy_(codebook)
        self.idx.copy_(idx)

    @torch.no_grad()
    def merge_(self):
        """Halve the codebook (progressive schedule); the codebook parameter is replaced by a smaller one."""
        codebook, idx = merge_codebook(self.codebook, self.idx.long(), self.importance, self.group_size)
        self.codebook = nn.Parameter(codebook, requires_grad=self.codebook.requires_grad)
        self.idx = idx.to(torch.uint8)

    @torch.no_grad()
    def freeze(self):
        """The packed inference layer (LUTLinear) computing what this layer computes in eval mode."""
        bits = int(math.log2(self.n_centroids))
        if 2 ** bits != self.n_centroids:
            raise ValueError(f"cannot freeze a codebook of {self.n_centroids} centroids: not a power of two")
        return LUTLinear.from_clustered(self.codebook.detach(), self.idx, bits, self.group_size,
                                        bias=self.bias.detach() if self.bias is not None else None,
                                        in_scale=self.in_scale.detach() if self.in_scale is not None else None,
                                        a_bits=self.a_bits)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, centroids="
                f"{self.n_centroids}, group_size={self.group_size}, a_bits={self.a_bits}, "
                f"smoothed={self.in_scale is not None}")


# ---- progressive schedule: halve the codebooks by merging the cheapest adjacent centroids --------------

def merge_costs(centroids, masses):
    """Cost of merging each adjacent pair of sorted centroids (R, L) of masses (R, L) into their weighted mean:
    m1 m2 / (m1 + m2) (c1 - c2)^2, the importance-weighted squared change of the weights they quantize."""
    m1, m2 = masses[:, :-1], masses[:, 1:]
    return m1 * m2 / (m1 + m2).clamp_min(1e-30) * (centroids[:, 1:] - centroids[:, :-1]) ** 2  # (R, L-1)


@torch.no_grad()
def merge_codebook(codebook, idx, h, group_size, n_merges=None):
    """Greedy agglomerative merging in 1-D, vectorized over all rows and groups: repeatedly merge the cheapest
    adjacent pair of centroids (mass of a centroid = sum of h_k over the weights assigned to it) into their
    weighted mean. n_merges defaults to C // 2 (halving). Returns (codebook (N, G, C - n_merges) sorted,
    idx (N, K) remapped: the weights of a merged pair now share its new centroid)."""
    N, G, C = codebook.shape
    K = idx.shape[1]
    n_merges = C // 2 if n_merges is None else n_merges
    if not 0 <= n_merges < C:
        raise ValueError(f"cannot merge {n_merges} times a codebook of {C} centroids")
    gidx = _grouped(idx, group_size)                                                  # (R, g), padding -> 0
    weight_mass = _grouped(_unit_importance(h).expand(N, K), group_size)              # padding has mass 0
    masses = torch.zeros(N * G, C, device=idx.device).scatter_add_(1, gidx, weight_mass)  # (R, C)
    c, order = codebook.detach().float().reshape(N * G, C).sort(dim=1)
    m = masses.gather(1, order)
    label = torch.arange(C, device=idx.device).expand(N * G, C).clone()  # sorted old centroid -> current slot
    for _ in range(n_merges):
        j = merge_costs(c, m).argmin(1, keepdim=True)                                 # (R, 1) cheapest pair
        c1, c2, m1, m2 = c.gather(1, j), c.gather(1, j + 1), m.gather(1, j), m.gather(1, j + 1)
        merged_m = m1 + m2
        merged_c = torch.where(merged_m > 0, (m1 * c1 + m2 * c2) / merged_m.clamp_min(1e-30), (c1 + c2) / 2)
        slots = torch.arange(c.shape[1] - 1, device=idx.device).expand(N * G, -1)
        src = slots + (slots > j).long()                                              # drop slot j + 1
        c, m = c.gather(1, src).scatter(1, j, merged_c), m.gather(1, src).scatter(1, j, merged_m)
        label -= (label > j).long()
    old_to_new = torch.empty_like(label).scatter_(1, order, label)                    # (R, C)
    new_idx = old_to_new.gather(1, gidx).view(N, -1)[:, :K].contiguous()
    return c.view(N, G, C - n_merges), new_idx


# ---- adaptive smoothing (SmoothQuant with a per-layer alpha) -----------------------------------------

@torch.no_grad()
def collect_inputs(model, calib, names, max_tokens=SMOOTHING_TOKENS):
    """{name: X (n, K)}: up to max_tokens input rows of each named linear layer, evenly subsampled."""
    modules, rows = dict(model.named_modules()), {n: [] for n in names}
    hooks = [modules[n].register_forward_hook(
        lambda m, inputs, out, n=n: rows[n].append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()))
        for n in names]
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    try:
        for batch in calibration_batches(model, calib):
            if batch.numel():
                model(batch.to(device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    unused = [n for n, xs in rows.items() if not xs]
    if unused:
        raise ValueError(f"the calibration forward never reached layers {unused}: does forward() use them?")
    out = {}
    for n, xs in rows.items():
        X = torch.cat(xs)
        out[n] = X[torch.linspace(0, len(X) - 1, min(max_tokens, len(X))).long()]
    return out


def smoothing_scale(x_absmax, W, alpha):
    """SmoothQuant's s_k = max|x_k|^alpha / max|W[:, k]|^(1 - alpha), kept away from 0 and inf and rounded
    to fp16, as LUTLinear stores it (so W * s and the stored s describe exactly the same function)."""
    w_absmax = W.abs().amax(0).clamp_min(1e-5)                                        # (K,)
    return (x_absmax.clamp_min(1e-5) ** alpha / w_absmax ** (1 - alpha)).clamp(1e-3, 1e3).half().float()


@torch.no_grad()
def choose_smoothing(W, X, h, n_centroids, group_size, a_bits, alphas=SMOOTHING_ALPHAS):
    """The adaptive part: for each alpha of the grid (and for no smoothing at all), cluster W * s and quantize
    x / s to a_bits, and measure the layer's output error on the calibration inputs X (n, K):
    || fq(X / s) W_hat^T - X W^T ||^2. Returns (s or None, {alpha or 'off': relative error}).
    The clustering here only ranks the alphas: a uniform grid + a few weighted Lloyd iterations, about 20x
    cheaper than the density init (which runs once, on the chosen scale).
    A layer whose output is zero on X (||X W^T|| = 0) has relative error 0 where the error is 0 and inf
    elsewhere, so it keeps no smoothing; an alpha whose W * s passes fp16's range (the codebook could not
    be stored) scores inf."""
    W = W.detach().float()
    Y = X @ W.T                                                                       # (n, N) FP output
    energy = (Y ** 2).sum().item()
    x_absmax = X.abs().amax(0)
    errors, best = {}, (math.inf, None)
    for alpha in (None, *alphas):
        s = torch.ones(W.shape[1], device=W.device) if alpha is None else smoothing_scale(x_absmax, W, alpha)
        if not ((W * s).abs() <= FP16_MAX).all():
            errors["off" if alpha is None else alpha] = math.inf
            continue
        cl = cluster(W * s, h / s ** 2, n_centroids, group_size, init="uniform", max_iters=SMOOTHING_LLOYD_ITERS)
        W_hat = dequantize(cl["codebook"].half().float(), cl["idx"], group_size)
        sse = ((fake_quantize_per_token(X / s, a_bits) @ W_hat.T - Y) ** 2).sum().item()
        err = sse / energy if energy > 0 else (0.0 if sse == 0 else math.inf)
        errors["off" if alpha is None else alpha] = err
        if err < best[0]:
            best = (err, None if alpha is None else s)
    return best[1], errors


# ---- the student -------------------------------------------------------------------------------------

def lcd_layers(model):
    """{name: LCDLinear} of a student."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LCDLinear)}


@torch.no_grad()
def prepare_student(teacher, bits, group_size=None, calib=None, progressive_p=0, init="density",
                    weighted=True, smoothing=False, a_bits=None, skip=None, alphas=SMOOTHING_ALPHAS, log=None,
                    compensate=False):
    """A trainable student: a deep copy of the teacher whose selected linear layers (lcd.find_linears) are
    LCDLinear layers, clustered from the teacher's weights into 2^(bits + progressive_p) centroids per row
    (or group). init: 'density' (LCD) or 'kmeans++'/'uniform'; weighted=False clusters without the
    importance h (plain k-means). With a_bits and smoothing, each layer gets the input scale of its best
    alpha (choose_smoothing). The latent weights start at the teacher's (smoothed) weights.
    compensate=True: the compensated start (gptq_cluster, "lcd-gptq"): the codebooks assigned with GPTQ's
    error feedback on the full input Hessian H and refit under it; the latent weights start at the
    compensated values (each nearest its assignment). The same bits per weight; calibration then keeps
    every layer's H (K x K floats a layer: about 0.5 GB for SmolLM2-135M).
    Errors (ValueError, before any work): bad arguments, bad calibration data (see quantize), a layer
    with weights past fp16's range (FP16_MAX: the student computes with fp16 centroids)."""
    if bits not in (2, 3, 4):
        raise ValueError(f"bits must be 2, 3 or 4, got {bits!r}")
    if not (isinstance(progressive_p, int) and 0 <= progressive_p <= 8 - bits):
        raise ValueError(f"progressive_p must be an int in [0, {8 - bits}] at {bits} bits (2^(bits + p) <= 256 "
                         f"centroids, one byte an assignment), got {progressive_p!r}")
    if a_bits not in (None, 8, 4):
        raise ValueError(f"a_bits must be None (weight-only), 8 or 4, got {a_bits!r}")
    if init not in ("density", "kmeans++", "uniform"):
        raise ValueError(f"init must be 'density', 'kmeans++' or 'uniform', got {init!r}")
    alphas = tuple(alphas)
    if not alphas:
        raise ValueError("alphas must hold at least one SmoothQuant migration strength in [0, 1]")
    for alpha in alphas:
        check_number("each smoothing alpha", alpha, 0.0, 1.0)
    if calib is None:
        raise ValueError("prepare_student needs calibration batches (token ids (B, T)) for the importance h")
    calib = calibration_batches(teacher, calib)
    for name, linear in find_linears(teacher, skip).items():
        check_group_size(group_size, linear.in_features)
        check_weight(linear.weight, f"layer {name!r}")
        check_fp16(linear.weight, f"layer {name!r}: a weight", f"keep the layer in full precision with "
                   f"skip=[{name!r}], or rescale the model")
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(False)
    linears = find_linears(student, skip)
    names = list(linears)
    if not names:
        raise ValueError("the model has no nn.Linear layers to quantize (after skip)")
    stats = collect_stats(student, calib, names, full_hessian=bool(compensate))
    inputs = collect_inputs(student, calib, names) if (a_bits is not None and smoothing) else {}
    for name, linear in linears.items():
        W, h = linear.weight.detach().float(), stats[name]["h"]
        s = None
        if name in inputs:
            s, errors = choose_smoothing(W, inputs[name], h, 2 ** bits, group_size, a_bits, alphas)
            if log:
                choice = "off" if s is None else min(errors, key=errors.get)   # the first least error
                log(f"smoothing {name}: alpha {choice} (relative output error "
                    + ", ".join(f"{a}: {e:.4f}" for a, e in errors.items()) + ")")
        H = stats[name]["H"]
        if s is not None:
            W, h = W * s, h / s ** 2                      # y = (x / s) (W s)^T: the same function
            H = None if H is None else H / (s[:, None] * s[None, :])   # the Hessian of the inputs x / s
        C = 2 ** (bits + progressive_p)
        if compensate:
            cl = gptq_cluster(W, H, C, group_size, h=h if weighted else torch.ones_like(h), init=init)
            W = cl["latent"]                              # compensated: each latent nearest its assignment
        else:
            cl = cluster(W, h if weighted else torch.ones_like(h), C, group_size, init=init)
        layer = LCDLinear(W, cl["codebook"], cl["idx"], group_size, bias=linear.bias, importance=h,
                          in_scale=s, a_bits=a_bits)
        _set_module(student, name, layer.to(linear.weight.device))
    return student


@torch.no_grad()
def freeze(model):
    """Swap every LCDLinear of a student for its packed LUTLinear (in place); returns the model."""
    for name, layer in lcd_layers(model).items():
        try:
            frozen = layer.freeze()
        except ValueError as e:                                # say which layer
            raise ValueError(f"layer {name!r}: {e}") from e
        _set_module(model, name, frozen)
    return model.eval()


# ---- the distillation loss ---------------------------------------------------------------------------

KD_FAR = 20.0  # a token whose centred logit difference e passes this takes the log-sum-exp form (no overflow)


class _TemperedKL(torch.autograd.Function):
    """Per token KL(p_t || p_s) of p = softmax(z / tau), z (n, V) float32 -> (n,), and its gradient
    (p_s - p_t) / tau to the student logits (the teacher's get none: the teacher is fixed).

    At a large tau the two distributions are close, KL ~ tau^-2, and the textbook sum p_t (log p_t -
    log p_s) is a small difference of large terms (float32: negative at tau = 100, 2000x too large at
    10 000). Written in the centred differences e = d - E_pt[d], d = (z_s - z_t) / tau, nothing cancels:
        KL = log E_pt[exp(d)] - E_pt[d] = log E_pt[exp(e)] = log1p(E_pt[exp(e) - 1 - e])    (E_pt[e] = 0)
        p_s - p_t = p_t * expm1(e - KL)
    with exp(e) - 1 - e >= 0 from its Taylor series where |e| < 0.01 (expm1(e) - e cancels there). The
    rounding of E_pt[e] (~1e-7 |d|) moves KL only at second order. A token with some e > KD_FAR (far from
    the teacher: nothing to lose to cancellation, but exp(e) could overflow) takes the plain
    KL = logsumexp(log p_t + e) and p_s = exp(log p_t + e - KL) instead. All in float32.
    Memory: the work goes KD_CHUNK_ROWS rows at a time and only the logits are kept for backward, which
    recomputes p_t and e: at 1024 tokens x 49 152 a full-size temporary is 200 MB, and there were ten."""

    @staticmethod
    def forward(ctx, z_s, z_t, tau):
        kl = z_s.new_empty(z_s.shape[0])                                         # (n,)
        for rows in _chunks(z_s.shape[0]):
            log_p_t, p_t, e = _TemperedKL.centred(z_s[rows], z_t[rows], tau)
            excess = torch.where(e.abs() < 0.01, e * e * (0.5 + e / 6), torch.expm1(e) - e)  # exp(e) - 1 - e
            chunk = torch.log1p((p_t * excess).sum(-1))
            far = (e.amax(-1) > KD_FAR).nonzero()[:, 0]                          # rows, usually none
            if len(far):
                chunk[far] = torch.logsumexp(log_p_t[far] + e[far], dim=-1)
            kl[rows] = chunk
        ctx.save_for_backward(z_s, z_t, kl)    # the logits, not p_t and e: backward recomputes them
        ctx.tau = tau
        return kl

    @staticmethod
    def backward(ctx, grad):                                                     # grad (n,)
        z_s, z_t, kl = ctx.saved_tensors
        grad_z = torch.empty_like(z_s)                                           # (n, V)
        for rows in _chunks(z_s.shape[0]):
            log_p_t, p_t, e = _TemperedKL.centred(z_s[rows], z_t[rows], ctx.tau)
            shifted = e - kl[rows, None]
            diff = p_t * torch.expm1(shifted.clamp(max=KD_FAR))                  # p_s - p_t
            far = (e.amax(-1) > KD_FAR).nonzero()[:, 0]
            if len(far):
                diff[far] = (log_p_t[far] + shifted[far]).exp() - p_t[far]
            grad_z[rows] = diff * (grad[rows] / ctx.tau)[:, None]
        return grad_z, None, None

    @staticmethod
    def centred(z_s, z_t, tau):
        """(log p_t, p_t, e) of a chunk of rows: the teacher's tempered log-probabilities and probabilities,
        and the centred difference e = d - E_pt[d] of d = (z_s - z_t) / tau; each (rows, V)."""
        log_p_t = F.log_softmax(z_t / tau, dim=-1)
        p_t = log_p_t.exp()
        d = (z_s - z_t) / tau                                                    # no cancellation
        return log_p_t, p_t, d - (p_t * d).sum(-1, keepdim=True)


KD_CHUNK_ROWS = 64   # token rows the KL works on at a time: its temporaries are (64, V), not (n, V)


def _chunks(n, size=KD_CHUNK_ROWS):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def kd_loss(student_logits, teacher_logits, tau=1.0, targets=None, ce_weight=0.0):
    """tau^2 KL(p_teacher || p_student) at temperature tau, averaged over tokens, + ce_weight * CE(targets).
    Logits (..., V); tau a finite number > 0 (else a ValueError). Hinton et al., "Distilling the Knowledge
    in a Neural Network" (arXiv:1503.02531): the tau^2 keeps the gradient's scale independent of tau. The
    KL stays accurate at any tau (_TemperedKL); no gradient flows to the teacher logits."""
    if not (isinstance(tau, numbers.Real) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"the distillation temperature tau must be a finite number > 0, got {tau!r}")
    V = student_logits.shape[-1]
    kl = _TemperedKL.apply(student_logits.float().reshape(-1, V), teacher_logits.detach().float().reshape(-1, V),
                           float(tau))                                           # (n,)
    loss = kl.mean() * tau ** 2
    if ce_weight and targets is not None:
        loss = loss + ce_weight * F.cross_entropy(student_logits.float().reshape(-1, V), targets.reshape(-1))
    return loss


# ---- speculative optimization ------------------------------------------------------------------------

def _trainable_state(student):
    """A copy of everything a candidate may change: trainable parameters and the (uint8) assignments."""
    state = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    state.update({f"{n}.idx": m.idx.clone() for n, m in lcd_layers(student).items()})
    return state


CANDIDATE_CHANGES = {"reassign": (".idx",), "lloyd": (".idx", ".codebook")}  # what these candidates change


@torch.no_grad()
def _load_trainable_state(student, state, only=None):
    """Copy `state` back into the student; `only`: the key endings to copy (None: everything)."""
    params, layers = dict(student.named_parameters()), lcd_layers(student)
    for key, value in state.items():
        if only is not None and not key.endswith(only):
            continue
        if key.endswith(".idx") and key[:-4] in layers:
            layers[key[:-4]].idx.copy_(value)
        else:
            params[key].copy_(value)


@torch.no_grad()
def _apply_candidate(student, path, previous, ema=None):
    """Turn the student into candidate `path` in place. False when the candidate equals the current student."""
    layers = lcd_layers(student)
    if path == "reassign":   # every weight to the centroid nearest its latent weight
        return sum(layer.reassign_() for layer in layers.values()) > 0
    if path == "lloyd":      # refit the centroids to the latent weights (weighted Lloyd), then re-assign
        for layer in layers.values():
            layer.lloyd_()
        return True
    if path in ("bold", "average"):   # along the move of the last S steps: once more (bold, extrapolation)
        if previous is None:          # or half of it back (average of the two students, less SGD noise)
            return False
        for name, p in student.named_parameters():
            if p.requires_grad and name in previous and previous[name].shape == p.shape:
                p.add_((1.0 if path == "bold" else -0.5) * (p - previous[name]))
        for layer in layers.values():
            layer.reassign_()
        return True
    if path == "ema":        # the exponential moving average of the trajectory (decay SPECULATIVE_EMA_DECAY)
        if ema is None:
            return False
        for name, p in student.named_parameters():
            if p.requires_grad and name in ema and ema[name].shape == p.shape:
                p.copy_(ema[name])
        for layer in layers.values():
            layer.reassign_()
        return True
    raise ValueError(f"unknown speculative path {path!r}; choose from {SPECULATIVE_PATHS}")


@torch.no_grad()
def speculative_step(student, calib_x, teacher_logits, tau, paths=SPECULATIVE_PATHS, previous=None, ema=None):
    """Build each candidate from the current student, score its distillation loss on the fixed held-out
    batch (forward only), commit the best, roll the others back. 'keep' is always scored first and a
    candidate must be strictly better to win, so this never commits a student worse than keeping.
    Returns (winning path, {path: loss})."""
    was_training = student.training
    student.eval()
    current = _trainable_state(student)
    scores = {"keep": kd_loss(model_logits(student(calib_x)), teacher_logits, tau).item()}
    for path in paths:
        if path == "keep":
            continue
        if _apply_candidate(student, path, previous, ema):
            scores[path] = kd_loss(model_logits(student(calib_x)), teacher_logits, tau).item()
            _load_trainable_state(student, current, CANDIDATE_CHANGES.get(path))  # roll back what it changed
    best = min(scores, key=lambda p: (scores[p], p != "keep"))   # ties go to keep
    if dist.is_available() and dist.is_initialized():
        choice = [best]
        dist.broadcast_object_list(choice, src=0)       # every rank commits rank 0's choice (gloo or nccl)
        best = choice[0]
    if best != "keep":
        _apply_candidate(student, best, previous, ema)
    student.train(was_training)
    return best, scores


# ---- distill() ---------------------------------------------------------------------------------------

def stage_plan(steps, n_stages, final_frac):
    """Step at which each stage starts: the last stage gets final_frac of the steps, the others share the
    rest equally. [0] when there is a single stage."""
    if n_stages == 1:
        return [0]
    first = round(steps * (1 - final_frac))
    return [round(first * i / (n_stages - 1)) for i in range(n_stages - 1)] + [first]


def lr_at(step, start, end, warmup):
    """The learning-rate multiplier at `step` of a stage that runs from step `start` to `end`: a linear
    warm-up over `warmup` steps, then a cosine from 1 down to 10 % at the stage's end. distill re-warms
    at every progressive stage; reconstruct_blocks runs one stage per block."""
    progress = (step - start) / max(1, end - start)
    return min(1.0, (step - start + 1) / max(1, warmup)) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _set_lr(optimizer, scale):
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * scale


def trainable_kind(name, p, lcd_names, train_norms, train_scales=False):
    """What a student parameter is to the optimizer: "codebook" (the centroids), "latent" (the latent weight
    of an LCDLinear, named in lcd_names), "other" (norms and biases with train_norms; smoothing scales
    with train_scales), or None (frozen: embeddings, the head, everything else)."""
    owner, _, leaf = name.rpartition(".")
    if leaf == "codebook":
        return "codebook"
    if leaf == "weight" and owner in lcd_names:
        return "latent"
    if leaf == "in_scale":
        return "other" if train_scales else None
    return "other" if train_norms and p.dim() == 1 else None


def make_optimizer(module, lrs, train_norms, train_scales=False):
    """AdamW over what trains in `module` (trainable_kind), one parameter group per kind at its peak
    learning rate lrs[kind] (kept as the group's base_lr, which _set_lr scales). Sets requires_grad: on for
    what trains, off for the rest. No weight decay: it would pull centroids and latent weights to zero."""
    lcd_names = {n for n, m in module.named_modules() if isinstance(m, LCDLinear)}
    groups = {"codebook": [], "latent": [], "other": []}
    for name, p in module.named_parameters():
        kind = trainable_kind(name, p, lcd_names, train_norms, train_scales)
        p.requires_grad_(kind is not None)
        if kind is not None:
            groups[kind].append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lrs[k], "base_lr": lrs[k], "name": k}
                              for k, ps in groups.items() if ps], betas=(0.9, 0.95), weight_decay=0.0)


def _check_distill_args(teacher, steps, calib_x, bits, tau, ce_weight, lrs, warmup, final_frac,
                        speculative_every, speculative_paths, reassign_every, checkpoint_every, state):
    """distill's arguments, each checked before any work (ValueError naming the argument and its range)."""
    check_number("steps", steps, 0, integer=True)
    check_number("tau", tau, 0.0, open_low=True)
    check_number("ce_weight", ce_weight, 0.0)
    for name, value in lrs.items():
        check_number({"codebook": "lr", "latent": "latent_lr", "other": "other_lr"}[name], value, 0.0)
    check_number("warmup", warmup, 0, integer=True)
    check_number("final_frac", final_frac, 0.0, 1.0, open_low=True)
    for name, value in (("speculative_every", speculative_every), ("reassign_every", reassign_every),
                        ("checkpoint_every", checkpoint_every)):
        check_number(name, value, 0, integer=True)
    if bits is not None:
        check_bits(bits)
    unknown = [p for p in speculative_paths if p not in SPECULATIVE_PATHS]
    if unknown or (speculative_every and not speculative_paths):
        raise ValueError(f"speculative_paths must be a non-empty selection of {SPECULATIVE_PATHS}, got "
                         f"{tuple(speculative_paths)!r}")
    if speculative_every and calib_x is None:
        raise ValueError("speculative steps need a held-out calibration batch calib_x (B, T)")
    if calib_x is not None:
        check_calib_batch(calib_x)
        check_token_ids(teacher, calib_x, "distill: the held-out batch calib_x")
    missing = [k for k in ("student", "optimizer", "step", "stage", "history")
               if not isinstance(state, dict) or k not in state] if state is not None else []
    if missing:
        raise ValueError(f"the resume state lacks {missing}: it is not a state that distill() checkpointed")


def student_signature(student, method, bits=None):
    """What a resumable state must match to be resumed: the method ("distill" or "blocks"), the target bits
    and, per LCDLinear layer, its shape (out, in), group size and the centroids it starts with. Every state
    distill() and reconstruct_blocks() checkpoint holds it, and a resume compares (check_resume_state)."""
    return dict(method=method, bits=bits, layers={
        n: dict(shape=[m.out_features, m.in_features], group_size=m.group_size, centroids=m.n_centroids)
        for n, m in lcd_layers(student).items()})


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


def _resume_student(student, layers, state, device):
    """Put a checkpointed state's student back: the codebooks first take the size of the stage the
    checkpoint was taken in (progressive merging shrinks them)."""
    for name, layer in layers.items():
        layer.codebook = nn.Parameter(state["student"][f"{name}.codebook"].clone().to(device), requires_grad=True)
    student.load_state_dict(state["student"])


@torch.no_grad()
def _update_ema(ema, student):
    """The running average of the trajectory that speculative_step's "ema" candidate offers."""
    if ema is None:
        return {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    for n, p in student.named_parameters():
        if n in ema:
            ema[n].lerp_(p.detach(), 1 - SPECULATIVE_EMA_DECAY)
    return ema


class Diverged(FloatingPointError):
    """Training met a non-finite loss, gradient or parameter (a learning rate too high for this model): raised
    before the optimizer step or checkpoint that would store it, so the last checkpoint stays finite."""


def _check_finite(loss, optimizer, step, where, after_step=False):
    """Raise Diverged at the first non-finite loss or gradient (before the update) or, after_step, the
    first non-finite trainable parameter, naming the step, the loss and the tensor."""
    params = [(group.get("name", "?"), p) for group in optimizer.param_groups for p in group["params"]]
    if not after_step:
        if not math.isfinite(loss):
            raise Diverged(f"{where}: the loss is {loss} at step {step}")
        bad = next((kind for kind, p in params if p.grad is not None and not torch.isfinite(p.grad).all()), None)
        if bad:
            raise Diverged(f"{where}: a gradient of the {bad} parameters is non-finite at step {step} (loss {loss:.4g})")
    else:
        bad = next((kind for kind, p in params if not torch.isfinite(p).all()), None)
        if bad:
            raise Diverged(f"{where}: the {bad} parameters became non-finite in the update of step {step} "
                           f"(loss {loss:.4g})")


def _diverged_advice(e, lrs, resumable):
    slower = ", ".join(f"{k}_lr={v:g} (try {v / 10:g})" if k != "codebook" else f"lr={v:g} (try {v / 10:g})"
                       for k, v in lrs.items())
    return Diverged(f"{e}: the training diverged and stops here; nothing non-finite was saved, the last "
                    f"checkpoint is kept as it was{resumable}. Resume from it with a lower learning rate: "
                    f"{slower}")


def _kd_step(teacher, model, optimizer, batch, step, tau, ce_weight, device):
    """One optimizer step of the KD loss on one batch (x or (x, y)); returns the loss (a float)."""
    x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
    check_token_ids(teacher, x, f"distill: the batch of step {step}")
    if y is not None and ce_weight:
        check_token_ids(teacher, y, f"distill: the targets of step {step}")
    x = x.to(device)
    with torch.no_grad():
        t_logits = model_logits(teacher(x))
    loss = kd_loss(model_logits(model(x)), t_logits, tau, y.to(device) if y is not None else None, ce_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()                       # under DDP first: every process then sees the same averaged gradients
    _check_finite(loss.item(), optimizer, step, "distill")
    optimizer.step()
    _check_finite(loss.item(), optimizer, step, "distill", after_step=True)
    return loss.item()


def _reassign_all(layers):
    return sum(layer.reassign_() for layer in layers.values())


# distill is longer than the rest (a fifth of it is the docstring): its loop is the method's order of
# events - merge, re-assign, learning rate, step, running average, speculative check, checkpoint - and
# reads best in one place; each event is one line or a helper above.
def distill(teacher, student, batches, steps, calib_x=None, bits=None, tau=1.0, ce_weight=0.0, lr=1e-3,
            latent_lr=1e-3, other_lr=1e-4, warmup=20, final_frac=0.75, train_norms=True, train_scales=False,
            speculative_every=0, speculative_paths=SPECULATIVE_PATHS, reassign_every=1, ddp=False,
            state=None, checkpoint=None, checkpoint_every=0, log=None, on_step=None):
    """Distill `teacher` into `student` (from prepare_student) for `steps` optimizer steps.

    batches: an iterator yielding token ids x (B, T) or (x, y) pairs (y is used when ce_weight > 0).
    Progressive: the student starts with 2^(bits + p) centroids and is halved by merge_codebook at each stage
        boundary until 2^bits remain; the last stage gets final_frac of the steps (stage_plan). bits=None:
        no merging (the student keeps its size).
    Speculative: every speculative_every steps (0: off), speculative_step on the held-out batch calib_x.
    Trainable: centroids (lr), latent weights (latent_lr), and with train_norms the norms and biases
        (other_lr); with train_scales the smoothing scales. lr: warm-up then cosine (lr_at), re-warmed
        after a merge.
    ddp: wrap the student in DistributedDataParallel (gradients averaged over processes).
    state / checkpoint: resume from a state dict returned to the `checkpoint(state)` callback, which is
        called every checkpoint_every steps and at the end. log(str): progress messages;
        on_step(step, loss, info): called after every step (a progress line).
    Returns (student, history) with history = dict(loss, lr, stages: [(step, centroids)], spec_wins, ...).
    Errors (ValueError): a bad hyperparameter (before any work); token ids outside the teacher's
    vocabulary; a batch iterator that runs out before `steps` - under DDP on every process at the same
    step, since all agree before each forward that each has a batch (no process is left waiting)."""
    lrs = {"codebook": lr, "latent": latent_lr, "other": other_lr}
    _check_distill_args(teacher, steps, calib_x, bits, tau, ce_weight, lrs, warmup, final_frac,
                        speculative_every, speculative_paths, reassign_every, checkpoint_every, state)
    batches, device, layers = iter(batches), next(student.parameters()).device, lcd_layers(student)
    if not layers:
        raise ValueError("the student has no LCDLinear layers: build it with lcd.prepare_student")
    start_c = next(iter(layers.values())).n_centroids
    n_stages = 1 if bits is None else int(math.log2(start_c)) - bits + 1
    if n_stages < 1:
        raise ValueError(f"the student has {start_c} centroids, fewer than 2^bits = {2 ** bits}")
    plan = stage_plan(steps, n_stages, final_frac) + [steps]        # stage s runs from plan[s] to plan[s + 1]
    signature = student_signature(student, "distill", bits)        # the student as prepared: before any merge
    if state is not None:
        check_resume_state(state, signature, "distill")
    teacher.eval()
    teacher.requires_grad_(False)
    history = dict(loss=[], lr=[], stages=[(0, start_c)], spec_wins={p: 0 for p in speculative_paths},
                   spec_checks=0, spec_loss=[], reassigned=[])
    step, stage, previous, ema = 0, 0, None, None   # previous: the student S steps ago; ema: running average
    if state is not None:
        _resume_student(student, layers, state, device)
        step, stage, history = state["step"], state["stage"], state["history"]
        previous, ema = state.get("previous"), state.get("ema")
    optimizer = make_optimizer(student, lrs, train_norms, train_scales)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:        # this call's rates: a resume may lower them (Diverged)
            group["base_lr"] = lrs.get(group.get("name"), group["base_lr"])
    calib_logits = teacher_logits_of(teacher, calib_x) if speculative_every else None
    model = _wrap_ddp(student, ddp)
    student.train()

    def save_state():
        return dict(student=student.state_dict(), optimizer=optimizer.state_dict(), step=step, stage=stage,
                    history=history, previous=previous, ema=ema, signature=signature)

    while step < steps:
        if step >= plan[stage + 1]:                                   # progressive: halve the codebooks
            for layer in layers.values():
                layer.merge_()
            stage, previous, ema = stage + 1, None, None
            optimizer = make_optimizer(student, lrs, train_norms, train_scales)
            model = _wrap_ddp(student, ddp)
            history["stages"].append((step, next(iter(layers.values())).n_centroids))
            if log:
                log(f"progressive: step {step}, merged to {history['stages'][-1][1]} centroids")
        if reassign_every and step % reassign_every == 0:
            history["reassigned"].append(_reassign_all(layers))
        scale = lr_at(step, plan[stage], plan[stage + 1], warmup)
        _set_lr(optimizer, scale)
        try:
            loss = _kd_step(teacher, model, optimizer, _next_batch(batches, step, steps, ddp, device), step, tau,
                            ce_weight, device)
        except Diverged as e:
            raise _diverged_advice(e, lrs, " (state= from the checkpoint callback)" if checkpoint else "") from None
        history["loss"].append(loss)
        history["lr"].append(scale)
        if speculative_every and "ema" in speculative_paths:
            ema = _update_ema(ema, student)
        info = ""
        step += 1
        if speculative_every and (step % speculative_every == 0 or step == steps):  # and one last time
            if reassign_every:
                _reassign_all(layers)
            best, scores = speculative_step(student, calib_x.to(device), calib_logits, tau, speculative_paths,
                                            previous, ema)
            history["spec_wins"][best] = history["spec_wins"].get(best, 0) + 1
            history["spec_checks"] += 1
            history["spec_loss"].append((step, scores))
            previous = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
            info = f" | spec {best}"
        if on_step:
            on_step(step - 1, loss, info)
        if checkpoint and checkpoint_every and step % checkpoint_every == 0 and step < steps:
            checkpoint(save_state())
    if reassign_every:
        _reassign_all(layers)
    if checkpoint:
        checkpoint(save_state())
    return student, history


_RAN_OUT = object()   # what _next_batch's next() returns when the iterator is exhausted


def _next_batch(batches, step, steps, ddp, device):
    """The next batch, or a clear error when the iterator has run out. Under DDP every process reports
    whether it has a batch (an all_reduce of one flag each) before any forward: if one has run out, all
    stop here with the same error, instead of the others waiting for it inside the gradient all-reduce."""
    batch = next(batches, _RAN_OUT)
    ran_out = [batch is _RAN_OUT]
    if ddp and dist.is_available() and dist.is_initialized():
        flags = torch.zeros(dist.get_world_size(), device=device if dist.get_backend() == "nccl" else "cpu")
        flags[dist.get_rank()] = float(batch is _RAN_OUT)
        dist.all_reduce(flags)                                        # sum: each process set its own slot
        ran_out = [bool(f) for f in flags.tolist()]
    if any(ran_out):
        where = "" if len(ran_out) == 1 else f" on process(es) {[r for r, out in enumerate(ran_out) if out]}"
        raise ValueError(f"the batch iterator ran out after {step} of {steps} steps{where}: pass batches that "
                         "last `steps` steps on every process (e.g. an endless stream like "
                         "train_kd.batch_stream), or fewer steps")
    return batch


def _wrap_ddp(student, ddp):
    if not ddp:
        return student
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(student)


@torch.no_grad()
def teacher_logits_of(teacher, x):
    return model_logits(teacher(x.to(next(teacher.parameters()).device)))


# ---- block-wise reconstruction (EfficientQAT's Block-AP, LBLLM's second stage) -----------------------
# End-to-end logit KD pays the whole model's forward and backward (and, on a 49 152-token vocabulary, the
# output head) for every step. Block-wise reconstruction trains one transformer block at a time to
# reproduce the teacher block's output on cached inputs: a step costs one block's forward and backward, so
# a CPU affords many more steps per layer in the same wall time. The student block sees what the student
# so far produces (its own earlier, already quantized blocks), the target is what the teacher block
# produces from the teacher's input, so each block also learns to undo the error of the blocks before it.
BLOCK_CHUNK = 8   # sequences per forward when caching block inputs and targets (memory, not maths)


def find_blocks(model):
    """The model's transformer blocks: the longest nn.ModuleList whose every entry holds linear layers
    (GPT: transformer.h, Llama: layers). Returns (qualified name, the ModuleList). ValueError if none."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(
                any(isinstance(x, (nn.Linear, LCDLinear)) or is_conv1d(x) for x in block.modules()) for block in m):
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks with linear layers: block-wise "
                         "reconstruction needs the blocks as a ModuleList; use end-to-end distill() instead")
    return best


class _ReachedFirstBlock(Exception):
    """Raised by the hook of block_inputs: the rest of the forward is not needed."""


@torch.no_grad()
def block_inputs(model, calib):
    """What the first block receives on each calibration batch: X (n_sequences, T, C) and the other
    positional and keyword arguments of that call (the same for every block and batch, e.g. a rotary
    table; an argument that changes with the batch is not supported)."""
    blocks = find_blocks(model)[1]
    xs, extra = [], {}

    def hook(module, args, kwargs):
        xs.append(args[0].detach())
        extra.setdefault("args", tuple(args[1:]))
        extra.setdefault("kwargs", dict(kwargs))
        raise _ReachedFirstBlock

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in ([calib] if isinstance(calib, torch.Tensor) else calib):
            check_calib_batch(batch)
            try:
                model(batch.to(device))
            except _ReachedFirstBlock:
                pass
    finally:
        handle.remove()
    if not xs:
        raise ValueError("calibration data is empty: pass at least one (B, T) batch of token ids")
    return torch.cat(xs), extra["args"], extra["kwargs"]


def _run_block(block, X, args, kwargs, chunk=BLOCK_CHUNK):
    """block(X) over sequences in chunks; a block returning a tuple gives its first element."""
    outs = []
    for i in range(0, X.shape[0], chunk):
        out = block(X[i:i + chunk], *args, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return torch.cat(outs)


def _train_block(block, layers, X, Y, scale, args, kwargs, steps, batch_size, lrs, warmup, train_norms,
                 reassign_every, ddp, gen, history, on_step, index):
    """`steps` AdamW steps of student block number `index` on random minibatches of its cached inputs
    X (n, T, C): the loss is the output's squared error to the teacher's Y, relative to Y's mean square
    `scale`. on_step(step counted over all blocks, loss, info) after every step, when given."""
    optimizer = make_optimizer(block, lrs, train_norms)
    trained_block = _wrap_ddp(block, ddp)
    for step in range(steps):
        if reassign_every and step % reassign_every == 0:
            _reassign_all(layers)
        _set_lr(optimizer, lr_at(step, 0, steps, warmup))
        j = torch.randint(X.shape[0], (batch_size,), generator=gen)
        out = trained_block(X[j], *args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        loss = (out - Y[j]).pow(2).mean() / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        where = f"reconstruct_blocks: block {index}"
        _check_finite(loss.item(), optimizer, step, where)
        optimizer.step()
        _check_finite(loss.item(), optimizer, step, where, after_step=True)
        history["loss"].append(loss.item())
        if on_step:
            on_step(index * steps + step, loss.item(), f" | block {index}")


def reconstruct_blocks(teacher, student, calib, steps, batch_size=4, lr=1e-3, latent_lr=1e-3, other_lr=1e-4,
                       warmup=5, train_norms=True, reassign_every=1, ddp=False, state=None, checkpoint=None,
                       log=None, on_step=None):
    """Train each LCD block of `student` (from prepare_student) to reproduce the teacher's block output,
    one block after the other, for `steps` AdamW steps each on minibatches of `batch_size` cached
    calibration sequences. Loss: mean squared error of the block output relative to the target's mean
    square (so every block reports on the same scale). Trainable: centroids (lr), latent weights
    (latent_lr) and with train_norms the block's norms and biases (other_lr); warm-up then cosine to 10 %.

    calib: (B, T) token-id batches; every sequence is cached as the first block's input (n, T, C) fp32,
    plus the student's running input and the target: 3 n T C floats in memory.
    ddp: every process draws its own minibatches (seeded by its rank) and DistributedDataParallel averages
    the block's gradients, so the processes keep identical students.
    state / checkpoint: checkpoint(state) is called after every block; reconstruct_blocks(..., state=state)
    resumes after the last finished block (the blocks before it are only run forward, to rebuild the inputs).
    on_step(step, loss, info) is called after every step, counted over all blocks (len(blocks) * steps).
    Returns (student, history) with history = dict(loss=[relative error per step], blocks=[(name,
    relative error before, after)]). Sources: EfficientQAT (Chen et al. 2024) Block-AP; LBLLM stage 2."""
    if not (isinstance(steps, int) and steps >= 0 and isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"steps must be an int >= 0 and batch_size an int >= 1, got {steps!r}, {batch_size!r}")
    lrs = {"codebook": lr, "latent": latent_lr, "other": other_lr}
    _, t_blocks = find_blocks(teacher)
    s_name, s_blocks = find_blocks(student)
    if len(t_blocks) != len(s_blocks):
        raise ValueError(f"teacher has {len(t_blocks)} blocks, student {len(s_blocks)}: not its student")
    teacher.eval()
    student.eval()                                  # no dropout: the block is fit on exact targets
    student.requires_grad_(False)
    with torch.no_grad():
        X_t, args, kwargs = block_inputs(teacher, calib)      # (n, T, C) the teacher's input of block i
    X_s = X_t.clone()                                         # the student's input: embeddings are not quantized
    rank = dist.get_rank() if ddp else 0
    gen = torch.Generator().manual_seed(rank)
    history, done = dict(loss=[], blocks=[]), 0
    signature = student_signature(student, "blocks")
    if state is not None:                                     # resume: the finished blocks come back as trained
        check_resume_state(state, signature, "reconstruct_blocks")
        student.load_state_dict(state["student"])
        history, done = state["history"], state["block"]
        gen.set_state(state["rng"])
    for i, (t_block, s_block) in enumerate(zip(t_blocks, s_blocks)):
        if i < done:
            with torch.no_grad():
                X_t, X_s = _run_block(t_block, X_t, args, kwargs), _run_block(s_block, X_s, args, kwargs)
            continue
        with torch.no_grad():
            Y = _run_block(t_block, X_t, args, kwargs)        # (n, T, C) target
            scale = Y.pow(2).mean().clamp_min(1e-30)
            before = (_run_block(s_block, X_s, args, kwargs) - Y).pow(2).mean().div(scale).item()
        layers = {n: m for n, m in s_block.named_modules() if isinstance(m, LCDLinear)}
        try:
            _train_block(s_block, layers, X_s, Y, scale, args, kwargs, steps, batch_size, lrs, warmup, train_norms,
                         reassign_every, ddp, gen, history, on_step, i)
        except Diverged as e:
            raise _diverged_advice(e, lrs, f" (blocks 0..{i - 1} done)" if checkpoint and i else "") from None
        s_block.requires_grad_(False)
        with torch.no_grad():
            if reassign_every:
                _reassign_all(layers)
            X_s = _run_block(s_block, X_s, args, kwargs)      # the next block's student input
            after = (X_s - Y).pow(2).mean().div(scale).item()
        history["blocks"].append((f"{s_name}.{i}", before, after))
        if log:
            log(f"block {s_name}.{i}: relative output error {before:.4f} -> {after:.4f}")
        X_t = Y
        if checkpoint:
            checkpoint(dict(student=student.state_dict(), block=i + 1, history=history, rng=gen.get_state(),
                            signature=signature))
    return student, history
