"""
LCD: clustering-based 2-4-bit weight quantization, distilled from the full-precision teacher. This file is
the method; the packed model it produces (format, LUTLinear, save / load) is packed_model.py. Read top to
bottom it follows the data's path:

  1. calibration      - run the model on a few batches, record each linear layer's input statistics
  2. clustering       - every weight row (or group) becomes 2^b centroids + b-bit indices (density init,
                        importance-weighted Lloyd)
  3. quantize()       - calibrate, cluster and pack every linear layer of a model (post-training)
  4. distillation     - trainable LCD layers, smoothing, progressive + speculative KD, distill()
  5. block-wise       - one transformer block at a time learns to reproduce the teacher's block

A linear layer computes y = x W^T with W of shape (N, K): N outputs, K inputs. The README's tutorial
defines every piece (density initialization, the distillation loss, progressive and speculative steps,
adaptive smoothing) and names the functions to read for each.
"""

# ==== 1. calibration ============================================================================
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from packed_model import (FP16_MAX, GridLinear, LUTLinear, attach_decode_step, check_bits, check_fp16,
                          check_group_size, check_resume_state, check_weight, codebook_storage_bits, dequantize,
                          fake_quantize_per_token, find_linears, is_conv1d, set_module)

LLOYD_MAX_ITERS = 100   # cap on weighted Lloyd iterations; almost every row stops changing long before
DENSITY_ATOMS = 128     # atoms a row/group is cut into before the exact bin search, at 4 centroids (density_atoms)


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


def output_fisher(model, calib, names):
    """{name: F (N,)}: for each named linear layer, F_n = mean over tokens of (dL/dy_n)^2, the diagonal of
    the empirical Fisher information on its outputs y (N,), with L the next-token cross-entropy of each
    calibration sequence (summed over its tokens, so every token's gradient counts as one sample).
    With h (collect_stats) on the inputs, sum_nk F_n h_k dW_nk^2 / 2 estimates how much a change dW of the
    layer's weight raises the loss (second order, diagonal) - allocate_bits ranks the layers by it.
    Runs one forward and backward per batch; the parameters get no gradients (they are not trained)."""
    calib = calibration_batches(model, calib)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"output_fisher: the model has no modules named {missing}")
    sums, n_tokens = {}, 0

    def make_hook(name):
        def hook(module, inputs, output):
            if not output.requires_grad:            # the first layer: nothing before it needs a gradient
                output = output.detach().requires_grad_()
            output.register_hook(lambda g: sums.__setitem__(
                name, sums.get(name, 0.0) + g.detach().float().reshape(-1, g.shape[-1]).square().sum(0)))
            return output
        return hook

    device = next(model.parameters()).device
    was_training, needs_grad = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
    try:
        with torch.enable_grad():
            for batch in calib:
                if batch.shape[1] < 2:                 # no next token to predict
                    continue
                batch = batch.to(device)
                logits = model_logits(model(batch))[:, :-1]                       # (B, T-1, V)
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                reduction="sum").backward()
                n_tokens += batch[:, 1:].numel()
    finally:
        for handle in handles:
            handle.remove()
        for p, g in zip(model.parameters(), needs_grad):
            p.requires_grad_(g)
        model.train(was_training)
    if n_tokens == 0:
        raise ValueError("output_fisher needs calibration sequences of at least 2 tokens (a next token to predict)")
    unused = [n for n in names if n not in sums]
    if unused:
        raise ValueError(f"no gradient of the loss reached layers {unused}: does the output depend on them?")
    return {n: sums[n] / n_tokens for n in names}


# ==== 2. clustering =============================================================================
# Every row n of W (or every group of `group_size` consecutive inputs of it) gets its own codebook of C
# centroids. To do all rows and groups of a layer at once, W (N, K) is viewed as R = N * G short rows of
# length group_size ("grouped rows", the last group zero-padded), and everything below works on (R, ...).
# The error of a grouped row is sum_k h_k (w_k - c[idx_k])^2: h_k is the importance of input channel k.

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


def weighted_sse(W, h, codebook, idx, group_size, outliers=None):
    """sum_k h_k (w - w_hat)^2 per row and group: (N, G). Outliers, if given, are exact (zero error)."""
    W_hat = dequantize(codebook, idx, group_size)
    if outliers is not None:
        W_hat[outliers[0], outliers[1]] = outliers[2].float()
    err = h.float() * (W.float() - W_hat) ** 2                                     # (N, K)
    return _grouped(err, check_group_size(group_size, W.shape[1])).sum(1).view(W.shape[0], -1)


# ==== 3. quantize(): calibrate, cluster and pack a whole model ====================================
BUILTIN_METHODS = ("lcd", "rtn", "kmeans")  # quantize()'s own names; other quantizers are passed as functions


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
        set_module(model, name, layer)
    return attach_decode_step(model)      # generate() in C where the kernels serve the model


# ---- bits where the error is: a budget of bits per weight, spent on the most sensitive layers ---------
# Uniform b bits spend as much on a layer whose error the model shrugs off as on one whose error it
# amplifies. Each layer's sensitivity at b bits is the loss increase its clustering error causes, to
# second order with diagonal statistics (output_fisher's F on the outputs, h on the inputs):
#     S_l(b) = 1/2 sum_nk F_n h_k (W - W_hat_b)_nk^2
# (HAWQ's Hessian-aware precision and SqueezeLLM's Fisher weighting, at the granularity of a layer; CLAQ's
# adaptive precision spends bits column by column instead, the seed method to compare with). A greedy
# knapsack then gives b + 1 bits to the layer that saves the most S per extra stored bit, again and
# again, while the packed layers stay within the budget (every stored bit counted: indices and codebooks).
SENSITIVITY_LLOYD_ITERS = 10   # Lloyd iterations of the clusterings that rank the layers (an estimate, not the student)


def layer_sensitivity(W, h, F_out, n_centroids, group_size=None, init="density", max_iters=SENSITIVITY_LLOYD_ITERS):
    """S = 1/2 sum_nk F_n h_k (W - W_hat)^2 for W (N, K) clustered into n_centroids per row (or group);
    F_out (N,) from output_fisher, h (K,) from collect_stats. A float (the estimated loss increase, nats)."""
    cl = cluster(W, h, n_centroids, group_size, init, max_iters=max_iters)
    sse = weighted_sse(W, h, cl["codebook"], cl["idx"], group_size).sum(1)          # (N,) sum_k h_k dW^2
    return 0.5 * float((F_out.float() * sse).sum())


def _by_kind(names):
    """{"mlp.down_proj": ["0", "1", "29"], ...} from layer names like "model.layers.29.mlp.down_proj"."""
    kinds = {}
    for name in names:
        parts = name.split(".")
        i = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        kind, block = (".".join(parts[i + 1:]), parts[i]) if i is not None else (name, "-")
        kinds.setdefault(kind, []).append(block)
    return kinds


def allocate_bits(model, calib, bits, extra, group_size=None, skip=None, init="density", log=None):
    """Bits per layer {name: bits or bits + 1} for the layers find_linears(model, skip) quantizes, such that
    all their stored bits (packed_model.codebook_storage_bits) / all their weights stay within `extra` bits
    per weight above the same layers at `bits` everywhere (SmolLM2-135M at b = 2 stores 2.094 bits per
    weight: extra = 0.15 keeps it under 2.25). Starts from `bits` everywhere and upgrades, greedily, the
    layer with the largest drop of S (layer_sensitivity at bits and bits + 1) per extra stored bit while it
    fits. bits: 2 or 3 (b + 1 <= 4). Returns (plan, table) with table = [(name, S at b, S at b + 1, bits)].
    Sources: Dong et al. 2019 (HAWQ), Kim et al. 2023 (SqueezeLLM), Wang et al. 2024 (CLAQ)."""
    if bits not in (2, 3):
        raise ValueError(f"allocate_bits gives layers bits + 1 <= 4: bits must be 2 or 3, got {bits!r}")
    check_number("extra (bits per weight)", extra, 0.0, 32.0)
    linears = find_linears(model, skip)
    if not linears:
        raise ValueError("allocate_bits: the model has no nn.Linear layers to quantize (after skip)")
    cost = {n: [codebook_storage_bits(m.out_features, m.in_features, b, group_size) for b in (bits, bits + 1)]
            for n, m in linears.items()}
    n_weights = sum(m.out_features * m.in_features for m in linears.values())
    spent = sum(c[0] for c in cost.values())
    allowed = spent + extra * n_weights
    budget = allowed / n_weights
    stats = collect_stats(model, calib, list(linears))
    fisher = output_fisher(model, calib, list(linears))
    table = []
    for name, m in linears.items():
        W, h = m.weight.detach().float(), stats[name]["h"]
        s_b, s_up = (layer_sensitivity(W, h, fisher[name], 2 ** b, group_size, init) for b in (bits, bits + 1))
        table.append([name, s_b, s_up, bits])
    plan = {name: bits for name in linears}
    by_gain = sorted(table, key=lambda r: (r[1] - r[2]) / (cost[r[0]][1] - cost[r[0]][0]), reverse=True)
    for row in by_gain:
        upgrade = cost[row[0]][1] - cost[row[0]][0]                  # the stored bits one more bit costs
        if row[1] > row[2] and spent + upgrade <= allowed:
            plan[row[0]], row[3], spent = bits + 1, bits + 1, spent + upgrade
    if log:
        upgraded = [r[0] for r in table if r[3] > bits]
        log(f"allocate_bits: {len(upgraded)} of {len(table)} layers get {bits + 1} bits, "
            f"{spent / n_weights:.3f} bits per weight (budget {budget:.3f}); estimated loss increase "
            f"{sum(r[1] for r in table):.3f} -> {sum(r[2] if r[3] > bits else r[1] for r in table):.3f} nats")
        for kind, blocks in _by_kind(upgraded).items():
            log(f"allocate_bits: {bits + 1} bits for {kind} in blocks {', '.join(blocks)}")
    return plan, [tuple(r) for r in table]


# ==== 4. distillation ===========================================================================
# The clustered model becomes a student that learns from the full-precision teacher:
#   LCDLinear        - a trainable codebook layer: latent FP weights decide the assignments, learnable
#                      centroids give the forward weight, a straight-through estimator trains both
#   smoothing        - per-layer SmoothQuant scales with alpha chosen from a grid (only with a_bits)
#   prepare_student  - deep-copy the teacher, swap its linears for LCDLinear (calibration + clustering)
#   merge_codebook   - progressive schedule: halve the codebooks by the cheapest adjacent merges
#   speculative step - every S steps try a few candidate students on a held-out batch, keep the best
#   distill()        - the loop: KL(p_teacher || p_student) at temperature tau (+ lambda * CE)
#   freeze()         - LCDLinear -> LUTLinear (packed, fp16 codebooks) for inference
#
# Why each default is what it is (measured on the baby teacher): RESULTS.md, "Choices made by measurement".
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
                    start=None):
    """A trainable student: a deep copy of the teacher whose selected linear layers (packed_model.find_linears) are
    LCDLinear layers, clustered from the teacher's weights into 2^(bits + progressive_p) centroids per row
    (or group). bits: 2, 3 or 4 for every layer, or a dict {layer name: bits} naming each of them (e.g.
    allocate_bits' plan). init: 'density' (LCD) or 'kmeans++'/'uniform'; weighted=False clusters without the
    importance h (plain k-means). With a_bits and smoothing, each layer gets the input scale of its best
    alpha (choose_smoothing). The latent weights start at the teacher's (smoothed) weights.
    start: None (cluster()), or a function placing the codebooks on the full input Hessian H,
        start(W (N, K), H (K, K), n_centroids, group_size, h=..., init=...) -> dict(codebook, idx, latent)
    e.g. baselines.gptq_cluster, the compensated start ("lcd-gptq": the codebooks assigned with GPTQ's error
    feedback and refit under H); the latent weights start at its `latent` values (each nearest its
    assignment). The same bits per weight; calibration then keeps every layer's H (K x K floats a layer:
    about 0.5 GB for SmolLM2-135M).
    Errors (ValueError, before any work): bad arguments, bad calibration data (see quantize), a layer
    with weights past fp16's range (FP16_MAX: the student computes with fp16 centroids)."""
    layer_bits = bits if isinstance(bits, dict) else None
    for b in (layer_bits.values() if layer_bits else [bits]):
        if type(b) is not int or b not in (2, 3, 4):
            raise ValueError(f"bits must be 2, 3 or 4 (or a dict of them by layer name), got {b!r}")
    top = max(layer_bits.values(), default=2) if layer_bits else bits
    if not (isinstance(progressive_p, int) and 0 <= progressive_p <= 8 - top):
        raise ValueError(f"progressive_p must be an int in [0, {8 - top}] at {top} bits (2^(bits + p) <= 256 "
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
    if layer_bits is not None and set(layer_bits) != set(names):
        odd = sorted(set(layer_bits) ^ set(names))
        raise ValueError(f"bits by layer must name exactly the layers quantized ({len(names)}); these differ: "
                         f"{odd[:4]}{' ...' if len(odd) > 4 else ''}")
    stats = collect_stats(student, calib, names, full_hessian=start is not None)
    inputs = collect_inputs(student, calib, names) if (a_bits is not None and smoothing) else {}
    for name, linear in linears.items():
        W, h = linear.weight.detach().float(), stats[name]["h"]
        b = layer_bits[name] if layer_bits else bits
        s = None
        if name in inputs:
            s, errors = choose_smoothing(W, inputs[name], h, 2 ** b, group_size, a_bits, alphas)
            if log:
                choice = "off" if s is None else min(errors, key=errors.get)   # the first least error
                log(f"smoothing {name}: alpha {choice} (relative output error "
                    + ", ".join(f"{a}: {e:.4f}" for a, e in errors.items()) + ")")
        H = stats[name]["H"]
        if s is not None:
            W, h = W * s, h / s ** 2                      # y = (x / s) (W s)^T: the same function
            H = None if H is None else H / (s[:, None] * s[None, :])   # the Hessian of the inputs x / s
        C = 2 ** (b + progressive_p)
        if start is not None:
            cl = start(W, H, C, group_size, h=h if weighted else torch.ones_like(h), init=init)
            W = cl["latent"]                              # compensated: each latent nearest its assignment
        else:
            cl = cluster(W, h if weighted else torch.ones_like(h), C, group_size, init=init)
        layer = LCDLinear(W, cl["codebook"], cl["idx"], group_size, bias=linear.bias, importance=h,
                          in_scale=s, a_bits=a_bits)
        set_module(student, name, layer.to(linear.weight.device))
    return student


@torch.no_grad()
def freeze(model):
    """Swap every LCDLinear of a student for its packed LUTLinear (in place); returns the model."""
    for name, layer in lcd_layers(model).items():
        try:
            frozen = layer.freeze()
        except ValueError as e:                                # say which layer
            raise ValueError(f"layer {name!r}: {e}") from e
        set_module(model, name, frozen)
    return attach_decode_step(model.eval())   # generate() in C where the kernels serve the model


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
    sizes = sorted({m.n_centroids for m in layers.values()})           # several: bits by layer (allocate_bits)
    start_c = sizes[0]
    n_stages = 1 if bits is None else int(math.log2(start_c)) - bits + 1
    if n_stages < 1:
        raise ValueError(f"the student has {start_c} centroids, fewer than 2^bits = {2 ** bits}")
    if n_stages > 1 and len(sizes) > 1:
        raise ValueError(f"progressive merging halves every codebook down to 2^bits, but this student's layers have "
                         f"{sizes} centroids (bits by layer): prepare it with progressive_p=0")
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


# ==== 5. block-wise reconstruction (EfficientQAT's Block-AP, LBLLM's second stage) =====================
# End-to-end logit KD pays the whole model's forward and backward (and, on a 49 152-token vocabulary, the
# output head) for every step. Block-wise reconstruction trains one transformer block at a time to
# reproduce the teacher block's output on cached inputs: a step costs one block's forward and backward, so
# a CPU affords many more steps per layer in the same wall time. The student block sees what the student
# so far produces (its own earlier, already quantized blocks), the target is what the teacher block
# produces from the teacher's input, so each block also learns to undo the error of the blocks before it.
BLOCK_CHUNK = 8   # sequences per forward when caching block inputs and targets (memory, not maths)
BLOCK_ERROR_SEQS = 64   # sequences the log's errors before and after a block are measured on (a forward costs)


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


BLOCK_LOSSES = ("batch", "token")   # what a block's squared error is relative to (block_loss)


def block_loss(out, target, per="batch", scale=None):
    """The block-wise loss: the squared error of a block's output out (..., C) against the teacher's target
    (..., C), relative to the target's mean square - over the whole batch (per='batch', the default; or
    relative to `scale`, the mean square of all the block's targets, when given), or each token's error over
    that token's own mean square, averaged over tokens (per='token'). A 0-dim tensor.
    Why both: in a pretrained model's residual stream one token can hold almost all of the mean square (in
    SmolLM2-135M's blocks 11-22 the first token - the attention sink - holds 95-99 %), so 'batch' mostly
    fits that token. 'token' weighs every token alike, as RMSNorm does: it fitted one block better alone,
    and the whole model was no better (RESULTS.md, "The block-wise loss per token")."""
    err = (out - target).pow(2)
    if per == "token":
        return (err.mean(-1) / target.pow(2).mean(-1).clamp_min(1e-30)).mean()
    return err.mean() / (target.pow(2).mean().clamp_min(1e-30) if scale is None else scale)


def _run_block(block, X, args, kwargs, chunk=BLOCK_CHUNK):
    """block(X) over sequences in chunks; a block returning a tuple gives its first element."""
    outs = []
    for i in range(0, X.shape[0], chunk):
        out = block(X[i:i + chunk], *args, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return torch.cat(outs)


def _train_block(block, layers, X, Y, per, args, kwargs, steps, batch_size, lrs, warmup, train_norms,
                 reassign_every, ddp, gen, history, on_step, index):
    """`steps` AdamW steps of student block number `index` on random minibatches of its cached inputs
    X (n, T, C): the loss is block_loss(output, the teacher's Y, per), with per='batch' relative to the mean
    square of all of Y (the same scale every step). on_step(step counted over all blocks, loss, info) after
    every step, when given."""
    scale = Y.pow(2).mean().clamp_min(1e-30) if per == "batch" else None
    optimizer = make_optimizer(block, lrs, train_norms)
    trained_block = _wrap_ddp(block, ddp)
    for step in range(steps):
        if reassign_every and step % reassign_every == 0:
            _reassign_all(layers)
        _set_lr(optimizer, lr_at(step, 0, steps, warmup))
        j = torch.randint(X.shape[0], (batch_size,), generator=gen)
        out = trained_block(X[j], *args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        loss = block_loss(out, Y[j], per, scale)
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
                       log=None, on_step=None, loss="batch"):
    """Train each LCD block of `student` (from prepare_student) to reproduce the teacher's block output,
    one block after the other, for `steps` AdamW steps each on minibatches of `batch_size` cached
    calibration sequences. Loss: block_loss(output, target, per=loss), the squared error relative to the
    target's mean square over the batch ('batch') or token by token ('token'), so every block reports on
    the same scale. Trainable: centroids (lr), latent weights (latent_lr) and with train_norms the block's
    norms and biases (other_lr); warm-up then cosine to 10 %.

    calib: (B, T) token-id batches; every sequence is cached as the first block's input (n, T, C) fp32,
    plus the student's running input and the target: 3 n T C floats in memory.
    ddp: every process draws its own minibatches (seeded by its rank) and DistributedDataParallel averages
    the block's gradients, so the processes keep identical students.
    state / checkpoint: checkpoint(state) is called after every block; reconstruct_blocks(..., state=state)
    resumes after the last finished block (the blocks before it are only run forward, to rebuild the inputs).
    on_step(step, loss, info) is called after every step, counted over all blocks (len(blocks) * steps).
    Returns (student, history) with history = dict(loss=[the loss of every step], blocks=[(name, the loss
    before, after)]), the latter two on the same BLOCK_ERROR_SEQS sequences spread over the n.
    Sources: EfficientQAT (Chen et al. 2024) Block-AP; LBLLM stage 2."""
    if not (isinstance(steps, int) and steps >= 0 and isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"steps must be an int >= 0 and batch_size an int >= 1, got {steps!r}, {batch_size!r}")
    if loss not in BLOCK_LOSSES:
        raise ValueError(f"loss must be one of {BLOCK_LOSSES} (what a block's error is relative to), got {loss!r}")
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
            # the error before and after, on the same m sequences spread over all (a forward of them all costs)
            some = torch.linspace(0, len(X_s) - 1, min(BLOCK_ERROR_SEQS, len(X_s))).long()
            before = block_loss(_run_block(s_block, X_s[some], args, kwargs), Y[some], loss).item()
        layers = {n: m for n, m in s_block.named_modules() if isinstance(m, LCDLinear)}
        try:
            _train_block(s_block, layers, X_s, Y, loss, args, kwargs, steps, batch_size, lrs, warmup, train_norms,
                         reassign_every, ddp, gen, history, on_step, i)
        except Diverged as e:
            raise _diverged_advice(e, lrs, f" (blocks 0..{i - 1} done)" if checkpoint and i else "") from None
        s_block.requires_grad_(False)
        with torch.no_grad():
            if reassign_every:
                _reassign_all(layers)
            X_s = _run_block(s_block, X_s, args, kwargs)      # the next block's student input
            after = block_loss(X_s[some], Y[some], loss).item()
        history["blocks"].append((f"{s_name}.{i}", before, after))
        if log:
            log(f"block {s_name}.{i}: relative output error {before:.4f} -> {after:.4f}")
        X_t = Y
        if checkpoint:
            checkpoint(dict(student=student.state_dict(), block=i + 1, history=history, rng=gen.get_state(),
                            signature=signature))
    return student, history
