"""
The methods LCD is measured against: the standard quantizers and the published clustering methods, each a per-layer function

    layer = METHODS[name](W, stats, bits, group_size, **kw)     # W: (N, K) float32

that returns an inference layer with forward(x) and storage_bits() (every stored bit, honestly counted).
lcd.quantize(model, bits, method=METHODS[name]) calls one for every selected nn.Linear (quantize() below
does the look-up by name); NEEDS_HESSIAN names the methods that want the full input Hessian
H = X^T X / n (stats["H"]) rather than only its diagonal h. This file imports lcd.py alone; the quality
comparison of all methods on train_kd's teacher is bench.py's (bench.quality_table, bench.py --quality).

  1. shared pieces       - nearest centroid, the Hessian, the layer output error, RTN's grid
  2. GPTQ                - column-by-column rounding with inverse-Hessian error compensation; lcd-gptq,
                          LCD's own codebooks placed by the same loop (gptq_cluster)
  3. SqueezeLLM-like     - importance-weighted k-means per row (k-means++ seeds, weighted Lloyd)
  4. CLAQ                - per-column k-means inside the GPTQ loop, adaptive precision, outlier reservation
  5. LCQ                 - rank-r codebooks C = S V - B learned on the layer output error
  6. LBLLM               - W(1+1): sign bit + bitmap bit choosing one of two group scales; A4 clipping
  7. METHODS, quantize() - the registry of names, and lcd.quantize by name

RTN (uniform min/max grid per row or group) and plain k-means are built into lcd.py ("rtn", "kmeans");
they are not repeated here. Uniform grids are codebooks too (C = s * v + lo for v = 0 .. 2^b - 1), so
RTN's and GPTQ's output is a packed_model.GridLinear: a LUTLinear whose storage counts the grid's fp16 lo and
step per row or group (scale and zero point), not the 2^b derived entries.
Each section names the paper it follows. Weight matrices are (N, K): y = x W^T.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import lcd
import packed_model

# CLAQ
CLAQ_OUTLIER_RATIO = 13.0     # a weight is an outlier when |w| >= this times mean|W| of the layer
CLAQ_HEAVY_FRACTION = 0.10    # this fraction of columns (most outliers) reserves more full-precision values
CLAQ_RESERVE_HEAVY = 0.014    # fraction of each heavy column's weights kept in fp16
CLAQ_RESERVE_REST = 0.004     # fraction of every other column's weights kept in fp16
# LCQ
LCQ_RANK = 2             # rank r of the codebook C = S V - B (r = 1 is a uniform grid)
LCQ_STEPS = 300          # Adam steps on the layer output error
LCQ_LR = 1e-2            # Adam learning rate (parameters are normalized by the initial grid step)
# LBLLM
LBLLM_STEPS = 200        # stage 2: layer-wise distillation steps (reduced budget)
LBLLM_LR = 1e-2          # stage 2 learning rate, relative to mean|W|
LBLLM_A_BITS = 4         # stage 3: activation bits (None = weight-only, stage 3 skipped)
LBLLM_ACT_STEPS = 100    # stage 3: steps for the learned activation clipping factor
LBLLM_ACT_SAMPLES = 512  # stage 3: calibration input rows the clip is learned on (lcd.quantize keeps them)

# ==== 1. shared pieces =============================================================================


def column_groups(K, group_size):
    """(K,) group index of every input column: k // group_size (group_size None = one group per row)."""
    return torch.arange(K) // (group_size or K)


def nearest(W, codebook, group_size):
    """(N, K) index of the nearest centroid of its row/group for each weight: lcd.py's assignment (a
    binary search among the midpoints of the sorted centroids; a tie goes to the smaller centroid)."""
    N, K = W.shape
    grouped = lcd._grouped(W, group_size or K)                                 # (N * G, group_size)
    return lcd._assign(grouped, codebook.reshape(grouped.shape[0], -1)).view(N, -1)[:, :K]


def hessian(stats, K):
    """The layer's input Hessian H = X^T X / n, (K, K); diag(h) when only the diagonal was collected."""
    H = stats.get("H")
    if H is None:
        H = torch.diag(stats["h"].float())
    if H.shape != (K, K):
        raise ValueError(f"stats Hessian has shape {tuple(H.shape)}, the layer needs ({K}, {K})")
    if not torch.isfinite(H).all():
        raise ValueError("the layer Hessian holds NaN or inf: its calibration inputs overflowed or held no "
                         "tokens; check the calibration data")
    return H.float()


def output_error(W, W_hat, H):
    """Layer output error tr((W - W_hat) H (W - W_hat)^T) = mean over tokens of ||x W^T - x W_hat^T||^2."""
    E = (W - W_hat).double()
    return float(((E @ H.double()) * E).sum())


def _check(W, bits):
    if W.dim() != 2:
        raise ValueError(f"W must be (N, K), got shape {tuple(W.shape)}")
    packed_model.check_bits(bits)
    packed_model.check_weight(W)
    packed_model.check_fp16(W, "W: a weight")            # every method here stores fp16 codebooks, grids or scales
    return W.detach().float()


def uniform_codebook(W, bits, group_size):
    """RTN's min/max grid of every row/group as a codebook (N, G, 2^b): lcd.py's 'rtn' init, not a copy."""
    return lcd.cluster(W, torch.ones(W.shape[1]), 2 ** bits, group_size=group_size, init="uniform",
                       max_iters=0)["codebook"]


def bits_of(*tensors):
    """Bits the given tensors occupy as stored (None counts nothing)."""
    return sum(t.numel() * t.element_size() * 8 for t in tensors if t is not None)


# ==== 2. GPTQ ======================================================================================
# "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
# Frantar, Ashkboos, Hoefler, Alistarh, arXiv:2210.17323.
# Quantize the columns of W one at a time. The error of column j, divided by [H^-1]_jj, is spread over
# the columns not yet quantized through row j of the upper Cholesky factor of H^-1, which keeps the layer
# output x W^T close (the Optimal Brain Surgeon update). Act-order visits columns with large diag(H) first;
# damping keeps H invertible; the update of far columns is deferred to once per block of columns (lazy
# batching: same result, fewer memory passes).


# ---- GPTQ's loop, and LCD's codebooks placed by it (the compensated start) ---------------------------------
# lcd.cluster() fits each row's codebook to the row alone: every weight rounds to its nearest centroid and the
# errors of a row's weights add up in the layer output, however the inputs correlate. GPTQ (Frantar,
# Ashkboos, Hoefler, Alistarh 2022, arXiv:2210.17323) rounds the columns one at a time and pushes each
# column's rounding error onto the columns not yet rounded, through the inverse of the input Hessian
# H = X^T X / n, so that the layer OUTPUT x W^T stays close; CLAQ (Wang et al. 2024, arXiv:2405.17233)
# runs k-means codebooks inside that loop. gptq_cluster does the same with LCD's own per-row (per-group)
# codebooks, then moves the centroids to their least-squares values under H given the assignment
# (refit_codebook), and alternates the two while that lowers the output error. The loop below is GPTQ's,
# shared by GPTQ and CLAQ below; lcd.prepare_student(start=gptq_cluster) starts a student from it.
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
    lcd.check_number("damp", damp, 0.0, open_low=True)
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
    lcd.check_number("block_size", block_size, 1, integer=True)
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
    group_size = lcd.check_group_size(group_size, K)
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
        c = c.clamp(-packed_model.FP16_MAX, packed_model.FP16_MAX).half().double()                           # as stored
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
    assigned. fit=True: the codebook of a group is fit (lcd.cluster(): `init` + weighted Lloyd, importance h) on
    the group's compensated weights when its first column comes up, as GPTQ fits its grid; then `codebook`
    may be the number of centroids instead. Centroids are used as stored, in fp16.
    W (N, K), H (K, K), codebook (N, G, C) -> (codebook (N, G, C) fp16-exact float32, idx (N, K) int64,
    compensated (N, K): every weight's value when it was assigned, from which it is its centroid's nearest)."""
    N, K = W.shape
    group_size = lcd.check_group_size(group_size, K)
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
                codebook[:, g] = lcd.cluster(current(cols), h[cols], C, init=init)["codebook"][:, 0].half().float()
            sorted_c[g], order[g] = codebook[:, g].half().float().sort(dim=1)                      # (N, C)
            midpoints[g] = ((sorted_c[g][:, 1:] + sorted_c[g][:, :-1]) / 2).contiguous()        # as _assign
        j = lcd._searchsorted(midpoints[g], w[:, None])                                             # (N, 1)
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
      round 1: codebooks by `init` (density) + weighted Lloyd (lcd.cluster(), importance h: None takes diag(H)) on
               each group's compensated weights as its first column comes up (gptq_assign(fit=True); with
               one codebook a row that is W itself, lcd-init's clustering);
      round r > 1: the same loop with the refit codebooks held fixed (a new assignment);
      after each round (refit=True): refit_codebook, the least-squares centroids under H.
    The output error tr((W - W_hat) H (W - W_hat)^T) is a sum over rows, so every row keeps the best of its
    candidates: the rounds, and the uncompensated clustering (lcd.cluster(), refit too). The result is never
    worse than lcd-init's clustering on the calibration Hessian, row by row, and more rounds never hurt.
    Sources: GPTQ (Frantar et al. 2022, arXiv:2210.17323) for the loop, CLAQ (Wang et al. 2024,
    arXiv:2405.17233) for codebooks inside it; the refit is the least squares of the centroids under H.
    W (N, K) float, H (K, K) the layer input Hessian X^T X / n, n_centroids 2, 4, 8 or 16.
    Returns dict(codebook (N, G, C) float32 fp16-exact, idx (N, K) int64, latent (N, K): a weight whose
    nearest centroid is its assignment (the compensated value, or the centroid itself where the refit moved
    the cell), outliers=None, errors: output error of each candidate [uncompensated, round 1, ...] and, last,
    of the result); lcd.cluster()'s format plus latent and errors.
    ValueError for bad shapes, a non-finite W or H, or an H that no damping makes positive definite."""
    N, K = W.shape
    group_size = lcd.check_group_size(group_size, K)
    if not (isinstance(n_centroids, int) and n_centroids >= 2 and n_centroids & (n_centroids - 1) == 0):
        raise ValueError(f"n_centroids must be a power of two >= 2, got {n_centroids!r}")
    lcd.check_number("rounds", rounds, 1, integer=True)
    lcd.check_weight(W)
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
        return codebook, idx, values, output_sse(W, packed_model.dequantize(codebook, idx, group_size), H)

    plain = lcd.cluster(W, h, n_centroids, group_size, init=init)                     # lcd-init's clustering
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
    latent = torch.where(lcd._nearest(values, codebook, group_size) == idx, values, packed_model.dequantize(codebook, idx, group_size))
    return dict(codebook=codebook, idx=idx, latent=latent, outliers=None, errors=errors)


def gptq_quantize(W, H, bits, group_size=None, act_order=GPTQ_ACT_ORDER, block_size=GPTQ_BLOCK,
                  damp=GPTQ_DAMP):
    """GPTQ onto RTN's uniform grid. Returns (codebook (N, G, 2^b) float32, idx (N, K)); the errors it
    compensates are those of the fp16 codebook values inference will use.

    The grid of group g (original columns g*gs .. g*gs+gs-1, LUTLinear's layout) is fit on the group's
    compensated weights when the first of its columns comes up (GPTQ fits it when the group starts); with
    act-order the group's columns are visited in act order, not contiguously, which is why the grid is fit
    on the group's original columns, not on the next group_size columns of the permuted order.
    """
    W = _check(W, bits)
    N, K = W.shape
    gs = group_size or K
    G = math.ceil(K / gs)
    grid = torch.zeros(N, G, 2 ** bits)                     # RTN's grid, fp32: it decides the rounding
    midpoints, stored = {}, {}                              # per fitted group: (N, 2^b - 1), (N, 2^b) fp16 values
    idx = torch.zeros(N, K, dtype=torch.long)

    def quantize_column(k, w, current):
        g = k // gs
        if g not in midpoints:
            cols = list(range(g * gs, min(g * gs + gs, K)))
            grid[:, g] = uniform_codebook(current(cols), bits, None)[:, 0]
            # a grid lo + step * j (step >= 0) is sorted: nearest() without its sort, once per group
            midpoints[g] = ((grid[:, g, 1:] + grid[:, g, :-1]) / 2).contiguous()
            stored[g] = grid[:, g].half().float()
        idx[:, k] = lcd._searchsorted(midpoints[g], w[:, None])[:, 0]      # ties go down, as nearest()
        return stored[g].gather(1, idx[:, k:k + 1])[:, 0]                # the stored (fp16) value

    gptq_loop(W, H, quantize_column, act_order, block_size, damp)
    return grid, idx


def gptq(W, stats, bits, group_size=None, bias=None, act_order=GPTQ_ACT_ORDER, block_size=GPTQ_BLOCK,
         damp=GPTQ_DAMP):
    codebook, idx = gptq_quantize(W, hessian(stats, W.shape[1]), bits, group_size, act_order, block_size,
                                  damp)
    return packed_model.GridLinear.from_clustered(codebook, idx, bits, group_size, bias=bias)


def lcd_gptq(W, stats, bits, group_size=None, bias=None, rounds=COMPENSATE_ROUNDS, refit=True,
             act_order=GPTQ_ACT_ORDER):
    """LCD's compensated start as a post-training row ("lcd-gptq"): LCD's per-row (per-group) density
    codebooks, assigned with GPTQ's error feedback and refit under H (gptq_cluster). The same stored
    format and bits per weight as lcd-init: a LUTLinear of 2^b fp16 centroids a row (group) + b-bit indices."""
    W = _check(W, bits)
    c = gptq_cluster(W, hessian(stats, W.shape[1]), 2 ** bits, group_size, h=stats["h"], rounds=rounds,
                     refit=refit, act_order=act_order)
    return packed_model.LUTLinear.from_clustered(c["codebook"], c["idx"], bits, group_size, bias=bias)


# ==== 3. SqueezeLLM-like k-means ====================================================================
# "SqueezeLLM: Dense-and-Sparse Quantization", Kim et al., arXiv:2306.07629: per-row non-uniform
# codebooks from k-means weighted by each weight's sensitivity. SqueezeLLM weights by the Fisher
# information; here, as everywhere in this project, by h_k = mean x_k^2 (the Hessian diagonal). Differs
# from LCD's init only in the seeds: k-means++ instead of the density-based bins.


def squeezellm(W, stats, bits, group_size=None, bias=None, outlier_frac=0.0, generator=None):
    W = _check(W, bits)
    c = lcd.cluster(W, stats["h"].float(), 2 ** bits, group_size=group_size, init="kmeans++",
                    outlier_frac=outlier_frac, generator=generator)
    return packed_model.LUTLinear.from_clustered(c["codebook"], c["idx"], bits, group_size, bias=bias,
                                        outliers=c["outliers"])


# ==== 4. CLAQ =======================================================================================
# "CLAQ: Pushing the Limits of Low-Bit Post-Training Quantization for LLMs", Wang et al.,
# arXiv:2405.17233. A column is one input channel: the N weights W[:, k]. Inside GPTQ's loop each column
# gets its own k-means codebook, fit on its compensated values. Columns rich in outliers get more bits
# (adaptive precision) and keep their most extreme values in fp16 (outlier reservation).


def claq_column_bits(W, target_bits, outlier_ratio=CLAQ_OUTLIER_RATIO):
    """Bits of each column for an average of target_bits, more bits where outliers are many.

    Outlier order: count per column the weights with |w| >= outlier_ratio * mean|W|. For 2 <= T < 3 the
    top (T - 2) / 2 of the columns get 4 bits and the rest 2; for 3 <= T <= 4 the top T - 3 get 4 and the
    rest 3. Ties in the count are broken by the column's largest |w|. Returns ((K,) bits, (K,) counts).
    """
    if not 2.0 <= target_bits <= 4.0:
        raise ValueError(f"CLAQ target_bits must lie in [2, 4], got {target_bits}")
    A = W.abs()
    counts = (A >= outlier_ratio * A.mean()).sum(0)                                       # (K,)
    order = torch.argsort(counts.double() + 0.5 * A.amax(0).double() / A.max().clamp_min(1e-30),
                          descending=True)
    K = W.shape[1]
    low, top_fraction = (2, (target_bits - 2) / 2) if target_bits < 3 else (3, target_bits - 3)
    col_bits = torch.full((K,), low, dtype=torch.long)
    col_bits[order[:round(top_fraction * K)]] = 4
    return col_bits, counts


def claq_quantize(W, H, target_bits, outliers=True, act_order=GPTQ_ACT_ORDER, block_size=GPTQ_BLOCK,
                  damp=GPTQ_DAMP, generator=None):
    """Returns dict(col_bits (K,), codebooks [ (2^b_k,) per column ], idx (N, K), outliers (rows, cols,
    vals) or None, W_hat (N, K)). The outlier fractions are fixed before the loop from the original W."""
    N, K = W.shape
    col_bits, counts = claq_column_bits(W, target_bits)
    reserve = torch.full((K,), CLAQ_RESERVE_REST if outliers else 0.0)
    if outliers:
        heavy = torch.argsort(counts, descending=True, stable=True)[:round(CLAQ_HEAVY_FRACTION * K)]
        reserve[heavy] = CLAQ_RESERVE_HEAVY
    n_keep = (reserve * N).round().long()                     # fp16 values kept per column
    codebooks = [None] * K
    idx = torch.zeros(N, K, dtype=torch.long)
    out_rows, out_cols, out_vals = [], [], []

    def quantize_column(k, w, current):
        keep = torch.topk(w.abs(), int(n_keep[k])).indices                # the most extreme values
        rest = torch.ones(N, dtype=torch.bool)
        rest[keep] = False                                     # reserved values do not pull the centroids
        c = lcd.cluster(w[rest][None, :], torch.ones(int(rest.sum())), 2 ** int(col_bits[k]),
                        init="kmeans++", generator=generator)
        codebooks[k] = c["codebook"][0, 0].half().float()
        idx[:, k] = nearest(w[None, :], codebooks[k][None, None, :], None)[0]      # the column as one row
        q = codebooks[k][idx[:, k]]
        q[keep] = w[keep].half().float()
        out_rows.append(keep), out_cols.append(torch.full_like(keep, k)), out_vals.append(q[keep])
        return q

    W_hat = gptq_loop(W, H, quantize_column, act_order, block_size, damp)
    rows = torch.cat(out_rows)
    kept = (rows, torch.cat(out_cols), torch.cat(out_vals)) if rows.numel() else None
    return dict(col_bits=col_bits, codebooks=codebooks, idx=idx, outliers=kept, W_hat=W_hat)


class CLAQLinear(nn.Module):
    """CLAQ's stored format: per column k a codebook of 2^{b_k} fp16 values shared by the column's N
    weights, b_k-bit indices (columns of equal width packed together, packed_model.pack_indices' layout), the
    width of every column (uint8), and reserved outliers (flat position n*K + k as int32, value fp16).
    forward: dequantize, then F.linear. storage_bits counts every buffer; the bias, kept as in the
    original layer, is not counted (as in packed_model.LUTLinear). packed_model.save_quantized does not take this layer."""

    def __init__(self, N, K, col_bits, codebooks, idx, outliers=None, bias=None):
        super().__init__()
        self.in_features, self.out_features = K, N
        for k, codebook in enumerate(codebooks):
            packed_model.check_fp16(codebook, f"the codebook of column {k}")
        if outliers is not None:
            packed_model.check_fp16(outliers[2], "a reserved outlier (fp16)")
        self.register_buffer("col_bits", col_bits.to(torch.uint8))
        for b in (2, 3, 4):
            cols = (col_bits == b).nonzero()[:, 0]
            if len(cols):
                self.register_buffer(f"packed{b}", packed_model.pack_indices(idx[:, cols], b))
                self.register_buffer(f"codebook{b}", torch.stack([codebooks[k] for k in cols]).half())
        if outliers is not None:
            rows, cols, vals = outliers
            self.register_buffer("outlier_pos", (rows * K + cols).to(torch.int32))
            self.register_buffer("outlier_vals", vals.half())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())

    def weight_dequantized(self):
        W = torch.zeros(self.out_features, self.in_features, device=self.col_bits.device)
        for b in (2, 3, 4):
            if hasattr(self, f"packed{b}"):
                cols = (self.col_bits == b).nonzero()[:, 0]
                codebook = getattr(self, f"codebook{b}").float()                   # (K_b, 2^b)
                idx = packed_model.unpack_indices(getattr(self, f"packed{b}"), b, len(cols))  # (N, K_b)
                W[:, cols] = codebook[torch.arange(len(cols), device=W.device)[None, :], idx]
        if hasattr(self, "outlier_pos"):
            W.view(-1)[self.outlier_pos.long()] = self.outlier_vals.float()
        return W

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_dequantized().to(x.dtype), bias)

    def storage_bits(self):
        return bits_of(*self.buffers())       # the buffers are the stored format (bias: see LUTLinear)


def claq(W, stats, bits, group_size=None, bias=None, target_bits=None, outliers=True,
         act_order=GPTQ_ACT_ORDER, generator=None):
    """CLAQ at an average of target_bits index bits per weight (default: bits). Column codebooks have no
    groups: group_size must be None."""
    W = _check(W, bits)
    if group_size is not None:
        raise ValueError("claq fits one codebook per column (all N rows); call it with group_size=None")
    c = claq_quantize(W, hessian(stats, W.shape[1]), float(bits if target_bits is None else target_bits),
                      outliers, act_order, generator=generator)
    return CLAQLinear(*W.shape, c["col_bits"], c["codebooks"], c["idx"], c["outliers"], bias)


# ==== 5. LCQ ========================================================================================
# "LCQ: Low-Rank Codebook based Quantization for Large Language Models", Cai, Li, Li, arXiv:2405.20973.
# A uniform quantizer with scale s and offset lo per row has the codebook s * v + lo, v = (0, 1, ..,
# 2^b - 1): a rank-one matrix over rows minus a bias. LCQ lets it have rank r: the codebook of row/group
# n is C[n] = S[n] V - B[n] with S (rows, r), V (r, 2^b) shared by the layer, B (rows,). The parameters
# are learned by Adam on the layer's importance-weighted error sum_k h_k (w - w_hat)^2 (the diagonal of
# the output error tr(E H E^T), E = W - C[idx]). The assignment idx (nearest centroid) has no gradient:
# it is recomputed every step and passed straight through, the gradient of a weight going to the
# parameters of the centroid it uses. Why not the full H: with nearest assignment, which ignores how
# columns correlate, the full-H gradient pulls centroids to compensate across columns and the next
# assignment undoes it; measured on the baby teacher's first layer (b=2, r=2) the full-H loss climbed
# from 33 to 61 in 90 steps at every learning rate tried, while the diagonal objective converges and
# lands lower on the full-H error too. S, V, B are stored in fp16 (LCQ's storage); the inference layer
# materializes C from them for the LUT kernel, but storage_bits counts S, V, B.


def lcq_levels(bits, rank):
    """V at init (r, 2^b): row 0 the integer levels 0 .. 2^b - 1, further rows centered, scaled powers of
    the levels (zero-weighted at init by S, so the start is exactly RTN's grid)."""
    v = torch.arange(2 ** bits, dtype=torch.float32)
    rows = [v]
    for j in range(2, rank + 1):
        p = (v - v.mean()) ** j
        p = p - p.mean()
        rows.append(p / p.abs().max() * v.max())
    return torch.stack(rows)


def lcq_codebook(S, V, B, scale):
    """C = scale * (S V - B): (N, G, r) x (r, L) -> (N, G, L). scale (N, G, 1) is the init grid step."""
    return scale * (torch.einsum("ngr,rl->ngl", S, V) - B[..., None])


@torch.enable_grad()                   # lcd.quantize runs under no_grad
def lcq_fit(W, h, bits, group_size=None, rank=LCQ_RANK, steps=LCQ_STEPS, lr=LCQ_LR, fp16=True):
    """Returns (codebook (N, G, 2^b), idx (N, K), params dict S, V, B (as stored)). With steps=0 and
    rank=1 the codebook is RTN's uniform grid."""
    W = _check(W, bits)
    grid = uniform_codebook(W, bits, group_size)                        # (N, G, L)
    step = (grid[..., 1:2] - grid[..., 0:1]).clamp_min(1e-8)            # (N, G, 1) grid step s
    S = torch.zeros(*grid.shape[:2], rank)
    S[..., 0] = 1.0                                                     # s = step * 1
    B = -grid[..., 0] / step[..., 0]                                    # lo = -step * B
    V = lcq_levels(bits, rank)
    params = [S.requires_grad_(), V.requires_grad_(), B.requires_grad_()]
    opt = torch.optim.Adam(params, lr=lr)
    h = h.float()
    best, best_loss = [p.detach().clone() for p in params], float("inf")
    for it in range(steps + 1):
        C = lcq_codebook(S, V, B, step)
        with torch.no_grad():
            idx = nearest(W, C, group_size)
        loss = (h * (W - packed_model.dequantize(C, idx, group_size)) ** 2).sum()
        if loss.item() < best_loss:
            best_loss, best = loss.item(), [p.detach().clone() for p in params]
        if it == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    S, V, B = best
    # what is stored: the actual parameters in fp16 (scale folded into S and B)
    S_stored, B_stored, V_stored = S * step, B * step[..., 0], V
    if fp16:
        S_stored, B_stored, V_stored = (t.half().float() for t in (S_stored, B_stored, V_stored))
    C = torch.einsum("ngr,rl->ngl", S_stored, V_stored) - B_stored[..., None]
    idx = nearest(W, C, group_size)
    return C, idx, dict(S=S_stored, V=V_stored, B=B_stored)


class LCQLinear(packed_model.LUTLinear):
    """A LUTLinear whose codebook is rebuilt from LCQ's fp16 parameters S (N, G, r), V (r, 2^b), B (N, G).
    storage_bits counts what LCQ stores: the packed indices and S, V, B (not the 2^b materialized
    entries of every row, which the LUT kernel derives from them at load time). packed_model.save_quantized
    writes it as the plain LUTLinear it also is: same outputs, but the file holds the materialized
    codebook."""

    def storage_bits(self):
        return bits_of(self.packed, self.lcq_S, self.lcq_V, self.lcq_B)


def lcq(W, stats, bits, group_size=None, bias=None, rank=LCQ_RANK, steps=LCQ_STEPS, lr=LCQ_LR):
    lcd.check_number("rank", rank, 1, integer=True)
    lcd.check_number("steps", steps, 0, integer=True)
    lcd.check_number("lr", lr, 0.0, open_low=True)
    C, idx, p = lcq_fit(W, stats["h"], bits, group_size, rank, steps, lr)
    layer = LCQLinear.from_clustered(C, idx, bits, group_size, bias=bias)
    for name, value in p.items():           # not in the state_dict: save_quantized keeps the codebook
        packed_model.check_fp16(value, f"LCQ's parameter {name}")
        layer.register_buffer(f"lcq_{name}", value.half(), persistent=False)
    return layer


# ==== 6. LBLLM ======================================================================================
# "LBLLM: Lightweight Binarization of Large Language Models via Three-Stage Distillation", Song, Wang,
# Lang, Yang, Zhang, arXiv:2604.19167. W(1+1)A4: every weight is a sign bit and one bitmap bit that picks
# which of its group's two scales a1 < a2 applies: values in {-a2, -a1, +a1, +a2}. Stored: 2 bits per
# weight + 2 fp16 scales per group (+ one fp16 activation clip per layer with A4). Three stages, reduced
# budget: (1) PTQ init: bitmap = magnitude above/below a threshold, a1, a2 = mean |w| of each side (a
# 2-means of |w| weighted by h, lcd.cluster); (2) layer-wise distillation with FP activations: latent
# weights (sign and bitmap through a straight-through estimator) and the scales learned on the layer
# output error tr(E H E^T); (3) a learned clipping factor of the per-token symmetric 4-bit activation
# quantizer, trained on the layer output error over calibration inputs: stats["X"], rows of real inputs
# that lcd.quantize collects (NEEDS_INPUTS); called without them, Gaussian rows with covariance H (same
# second moments as the real inputs, lighter tails: the clip learned then is only a surrogate).


def lbllm_codebook(scales):
    """(N, G, 2) scales a1, a2 -> (N, G, 4) codebook (-a2, -a1, +a1, +a2); index = 2 * sign + bitmap
    with the bitmap mirrored on the negative side so that the codebook stays sorted."""
    a1, a2 = scales[..., 0], scales[..., 1]
    return torch.stack([-a2, -a1, a1, a2], dim=-1)


def lbllm_index(W, scales, group_size):
    """Sign bit from the sign of W, bitmap bit from the magnitude's nearer scale."""
    bitmap = nearest(W.abs(), scales, group_size)                     # 0: a1, 1: a2
    return torch.where(W >= 0, 2 + bitmap, 1 - bitmap)


def fake_quantize_clipped(x, a_bits, clip):
    """Per-token symmetric fake quantization to a_bits (levels -(2^(a-1) - 1) .. 2^(a-1) - 1, as
    lcd_kernels.quantize_activations), range clip * max|x| of the token, so values beyond it saturate. The rounding
    is passed straight through (its gradient reaches clip, as in learned step size quantization)."""
    qmax = 2 ** (a_bits - 1) - 1
    step = (clip * x.abs().amax(-1, keepdim=True)).clamp_min(1e-8) / qmax
    u = x / step
    u = u + (u.round() - u).detach()
    return u.clamp(-qmax, qmax) * step


@torch.enable_grad()                   # lcd.quantize runs under no_grad
def lbllm_fit(W, H, group_size=None, steps=LBLLM_STEPS, lr=LBLLM_LR, h=None):
    """Stages 1 and 2. Returns (scales (N, G, 2) fp16-exact, idx (N, K) in 0..3)."""
    W = _check(W, 2)
    h = torch.diag(H) if h is None else h
    init = lcd.cluster(W.abs(), h.float(), 2, group_size=group_size, init="density")   # stage 1
    scales = init["codebook"].sort(-1).values.clamp_min(1e-8)                         # (N, G, 2)
    H = H.float()
    latent = W.clone().requires_grad_()
    scales = scales.clone().requires_grad_()
    unit = W.abs().mean().item()
    opt = torch.optim.Adam([latent, scales], lr=lr * unit)
    best, best_loss = scales.detach().clone(), float("inf")
    best_latent = latent.detach().clone()
    for it in range(steps + 1):
        with torch.no_grad():
            idx = lbllm_index(latent, scales, group_size)
        W_hat = packed_model.dequantize(lbllm_codebook(scales), idx, group_size)
        W_hat = W_hat + latent - latent.detach()                      # straight-through to the latent weights
        E = W - W_hat
        loss = ((E @ H) * E).sum()
        if loss.item() < best_loss:
            best_loss, best, best_latent = loss.item(), scales.detach().clone(), latent.detach().clone()
        if it == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    scales = best.abs().sort(-1).values.half().float()
    return scales, lbllm_index(best_latent, scales, group_size)


@torch.enable_grad()                   # lcd.quantize runs under no_grad
def lbllm_clip(W_hat, X, a_bits=LBLLM_A_BITS, steps=LBLLM_ACT_STEPS, lr=1e-2):
    """Stage 3: the clip factor in (0, 1] minimizing ||Q(X) W_hat^T - X W_hat^T||^2 on calibration rows X."""
    clip = torch.ones((), requires_grad=True)
    opt = torch.optim.Adam([clip], lr=lr)
    target = X @ W_hat.t()
    best, best_loss = 1.0, float("inf")
    for it in range(steps + 1):
        loss = (fake_quantize_clipped(X, a_bits, clip) @ W_hat.t() - target).pow(2).mean()
        if loss.item() < best_loss:
            best_loss, best = loss.item(), float(clip.detach())
        if it == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            clip.clamp_(0.05, 1.0)
    return best


class LBLLMLinear(packed_model.LUTLinear):
    """A 2-bit LUTLinear whose codebook (-a2, -a1, a1, a2) is stored as its two fp16 scales per group;
    with act_bits set, the input is fake-quantized per token to act_bits with the learned clip first.
    packed_model.save_quantized writes it as a plain LUTLinear: the weights survive, the activation clip does not."""
    act_bits = None

    def forward(self, x):
        if self.act_bits is not None:
            x = fake_quantize_clipped(x, self.act_bits, self.act_clip.float())
        return super().forward(x)

    def storage_bits(self):
        a1_a2 = self.codebook[..., 2:]                      # the two scales of every group, fp16
        return bits_of(self.packed, a1_a2, self.act_clip if self.act_bits is not None else None)


def lbllm(W, stats, bits=2, group_size=None, bias=None, steps=LBLLM_STEPS, a_bits=LBLLM_A_BITS,
          act_steps=LBLLM_ACT_STEPS, generator=None):
    """W(1+1) at 2 bits per weight, the only width the format has."""
    if bits != 2:
        raise ValueError(f"lbllm is W(1+1): 2 bits per weight (a sign and a bitmap bit), got bits={bits}")
    lcd.check_number("steps", steps, 0, integer=True)
    lcd.check_number("act_steps", act_steps, 0, integer=True)
    if a_bits is not None:
        lcd.check_number("a_bits", a_bits, 2, 8, integer=True)
    W = _check(W, 2)
    H = hessian(stats, W.shape[1])
    scales, idx = lbllm_fit(W, H, group_size, steps, h=stats["h"])
    codebook = lbllm_codebook(scales)
    layer = LBLLMLinear.from_clustered(codebook, idx, 2, group_size, bias=bias)
    layer.act_bits = a_bits
    clip = 1.0
    if a_bits is not None:
        X = stats.get("X")
        if X is None:            # no calibration inputs (called directly): surrogates with their covariance
            L = damped_factor(H.double(), 1e-6, torch.linalg.cholesky)   # H = 0 (dead inputs) works too
            generator = generator or torch.Generator().manual_seed(0)    # deterministic by default
            z = torch.randn(LBLLM_ACT_SAMPLES, H.shape[0], generator=generator, dtype=torch.double)
            X = (z @ L.t()).float()
        clip = lbllm_clip(packed_model.dequantize(codebook, idx, group_size), X.float(), a_bits, act_steps)
    layer.register_buffer("act_clip", torch.tensor(clip).half(), persistent=False)   # see LBLLMLinear
    return layer


# ==== 7. the registry: names of the methods, and lcd.quantize by name ================================

# ---- the comparison: every post-training row of the quality tables (bench.py --quality, train_kd's --ptq) ----
QUALITY_GROUP = 64       # group size of the group-wise rtn-g / gptq-g rows


def quality_rows(bits):
    """(row name, method name for quantize(), group_size, kwargs) of the post-training rows at `bits`."""
    g = QUALITY_GROUP
    rows = [("rtn", "rtn", None, {}), (f"rtn-g{g}", "rtn", g, {}), ("kmeans", "kmeans", None, {}),
            ("squeezellm", "squeezellm", None, {}), ("lcd-init", "lcd", None, {}),
            ("lcd-gptq", "lcd-gptq", None, {}),
            ("gptq", "gptq", None, {}), (f"gptq-g{g}", "gptq", g, {}), ("claq", "claq", None, {}),
            ("lcq", "lcq", None, {})]
    if bits < 4:    # CLAQ's adaptive precision: 0.1 bit more on average, spent on the outlier-heavy columns
        rows += [("claq-ap", "claq", None, {"target_bits": bits + 0.1})]
    if bits == 2:   # W(1+1) exists at 2 bits only; weight-only, and with its learned 4-bit activations
        rows += [("lbllm", "lbllm", None, {"a_bits": None}), ("lbllm-w2a4", "lbllm", None, {})]
    return rows


METHODS = {"gptq": gptq, "lcd-gptq": lcd_gptq, "squeezellm": squeezellm, "claq": claq, "lcq": lcq, "lbllm": lbllm}
NEEDS_HESSIAN = {"gptq", "lcd-gptq", "claq", "lbllm"}
NEEDS_INPUTS = {"lbllm": LBLLM_ACT_SAMPLES}   # calibration input rows kept for LBLLM's activation quantizer
for _name, _function in METHODS.items():   # what lcd.quantize reads off the function it is given
    _function.needs_hessian = _name in NEEDS_HESSIAN
    _function.needs_inputs = NEEDS_INPUTS.get(_name, 0)


def quantize(model, bits, group_size=None, calib=None, method="lcd", **kw):
    """lcd.quantize with a method given by name: lcd.py's own ("lcd", "rtn", "kmeans") or one of METHODS.
    The other arguments are lcd.quantize's. ValueError for an unknown name."""
    if not callable(method) and method not in lcd.BUILTIN_METHODS:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: use one of {list(lcd.BUILTIN_METHODS) + sorted(METHODS)}")
        method = METHODS[method]
    return lcd.quantize(model, bits, group_size, calib, method=method, **kw)
