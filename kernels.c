/*
kernels.c - LUT (look-up table) kernels for LCD's packed layers on the CPU, naive to fast: the CPU twin
of kernels.cu (as llm.c pairs train_gpt2.c with train_gpt2.cu).

    y[b, n] = sum_k codebook[n, k / group_size, idx[n, k]] * x[b, k]

straight from the packed indices. A batch-1 product (decoding one token) is bound by memory bandwidth:
reading b-bit indices instead of 32-bit weights is where the speed comes from, IF the arithmetic keeps up
(it is 8-16 weights a byte now, so it is the arithmetic that has to be made cheap).

Build (lcd_kernels.py does this at first use, cached by a hash of this file, the flags and the CPU's features):
    cc -O3 -march=native -fopenmp -shared -fPIC kernels.c -o lcd_kernels.so -lm
Every entry point takes the OpenMP thread count as its last argument (lcd_kernels.py passes torch's own,
torch.get_num_threads(), so that both agree). Intrinsics are guarded by #ifdef __AVX2__: without them the
fast entry points fall back to the portable versions (plain C the compiler vectorizes).

Packed layout (the same as packed_model.py section 1, exact; no repacking) except b = 3 for the fast kernels:
    E = entries per 32-bit word: b=2 -> 16, b=3 -> 10 (top 2 bits unused, zero), b=4 -> 8.
    n_words = ceil(K / E). The index of weight (n, k) lives in word packed[n, k / E] at bits
    [(k % E) * b, (k % E) * b + b) (entry 0 in the lowest bits). Padding entries (k >= K) are 0.
    packed (N, n_words) uint32, codebook (N, G, 2^b) fp16 bits, G = ceil(K / group_size);
    x (B, K) float32, y (B, N) float32, all row-major and contiguous. fp32 accumulation everywhere.
    b = 3: v3, v4, lut_decode_rows and llama_step read R3 instead, the CPU layout that lut_repack3 makes
    from the file's once at load (N, 3 * ceil(K / 32)) (see "R3" below); v0, v1, v2 read the file's.

The versions (speeds: 2 threads of a shared 2-core AMD EPYC (Zen 3, AVX2), 2-bit, one codebook per row,
batch 1, median of bench.py --cpu; dense fp32 F.linear beside it in the same run; 2048x2048 / 576x1536):
    v0  scalar reference: unpack, convert the centroid, multiply-add. One weight at a time.     (see below)
    v1  per-row byte table: a byte of a 2-bit row can only be one of 256 runs of 4 weights, so build the
        row's 256-entry table of runs once and decode 4 weights per look-up (b = 2, 4).
    v2  partial-sum tables (T-MAC, arXiv:2407.00088): every row has its own codebook, so a table shared
        by all rows must be built from the activations, not the centroids: for each pair of activations
        and each of the 16 patterns of their two 2-bit indices, the sum that goes to each centroid slot.
        A row then adds one 4-float table entry per pair and does 2^b multiply-adds per group at the end.
        (b = 3, 4: one activation per "pattern", i.e. bucket sums: acc[idx] += x.)
    v3  codebook in a register (AVX2): 2^b <= 16 fp32 centroids fit in one or two 8-lane registers, so
        `vpermps` (_mm256_permutevar8x32_ps; b = 2: the in-lane vpermilps) decodes 8 weights from 8
        indices in one instruction, fed by one variable shift of the broadcast word; then one FMA.
        ~5 instructions per 8 weights, exact fp32. b = 2: two rows at a time (span_dot2_b2: a row's fixed
        costs, a fifth of a 576-wide row, halved; x loaded once for both).
    v4  batch > 1: decode a pair of rows with v3's decoder into an L1-sized buffer, then a 2 x 4 register
        tile (2 rows x 4 activation rows, 8 accumulators) of FMAs: the indices are read and decoded once.
    q8  the output head in GGUF's Q8_0: blocks of 32 int8 weights with one fp16 scale (34 bytes).
Then the decode step of the Llama family (llama_step, the last section): a whole token (or a whole prompt)
in one call, v3/v4 and q8 inside, the KV cache and the weights torch's tensors.
The measured numbers are in RESULTS.md ("CPU speed"); bench.py --cpu prints them.
*/

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_CENTROIDS 16     // 2^b for b <= 4
#define V4_ROWS 2            // v4: weight rows decoded and multiplied together
#define V4_BATCH 4           // v4: activation rows per register tile

static int entries_per_word(int bits) { return 32 / bits; }   // 16, 10, 8

// ----------------------------------------------------------------------------------------------------
// R3, the CPU layout of b = 3. The file's 10 entries a word put a vector of 8 entries across two words at
// 5 different offsets, so an 8-lane decoder must first move words between lanes (vpermd) and keep track
// of a 40-entry period. R3 repacks a row, once at load, into blocks of 32 entries in 3 words (96 bits, no
// spare bits: 3.0 bits a weight read instead of 3.2):
//     word j of a block (j = 0, 1, 2), bits 0..23:  vector j's 24-bit field (entry 8j + L at bits 3L..3L+2)
//     word j, bits 24..31:                          byte j of vector 3's 24-bit field
// Vectors 0-2 then decode as b = 2's do (broadcast the word, shift lane L right by 3L: vpermps reads the
// low 3 bits of a lane and ignores the rest), vector 3 after two scalar shifts and ORs gather its field.
// A row has 3 * ceil(K / 32) words; padding entries (k >= K) are 0.

static int row_words(int bits, int K) {          // words a row of K entries takes in the CPU layout
    return bits == 3 ? 3 * ((K + 31) / 32) : (K + 32 / bits - 1) / (32 / bits);
}

static inline uint32_t r3_field(const uint32_t *row, int v) {   // vector v's 24-bit field (8 entries) of an R3 row
    const uint32_t *w = row + 3 * (v >> 2);
    return (v & 3) < 3 ? w[v & 3] : (w[0] >> 24) | (w[1] >> 24 << 8) | (w[2] >> 24 << 16);
}

static inline uint32_t cpu_index(const uint32_t *row, int k, int bits) {   // entry k of a CPU-layout row
    if (bits == 3) { return (r3_field(row, k >> 3) >> (3 * (k & 7))) & 7u; }
    const int E = entries_per_word(bits);
    return (row[k / E] >> ((k % E) * bits)) & ((1u << bits) - 1u);
}

// packed (N, ceil(K / 10)) in the file's 3-bit layout -> out (N, 3 * ceil(K / 32)) in R3
void lut_repack3(const uint32_t *packed, uint32_t *out, int N, int K, int n_threads) {
    const int n_words = (K + 9) / 10, n_blocks = (K + 31) / 32;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint32_t *row = packed + (int64_t)n * n_words;
        uint32_t *dst = out + (int64_t)n * 3 * n_blocks;
        for (int blk = 0; blk < n_blocks; blk++) {
            uint32_t field[4] = {0, 0, 0, 0};
            for (int e = 0; e < 32; e++) {
                const int k = 32 * blk + e;
                const uint32_t idx = k < K ? (row[k / 10] >> (3 * (k % 10))) & 7u : 0u;
                field[e >> 3] |= idx << (3 * (e & 7));
            }
            for (int j = 0; j < 3; j++) { dst[3 * blk + j] = field[j] | ((field[3] >> (8 * j)) & 0xffu) << 24; }
        }
    }
}

// v0's formula on rows in the CPU layout: what v3, v4 and lut_decode_rows fall back to at b = 3 (R3)
static void cpu_rows_portable(const uint32_t *packed, const uint16_t *codebook, const float *x, float *y,
                              int N, int K, int B, int bits, int group_size, int n_threads);

// fp16 bits -> float (IEEE half: 1 sign, 5 exponent, 10 mantissa bits), subnormals and inf/nan included
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);                 // inf, nan
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);     // normal: rebias 15 -> 127
    } else if (mantissa == 0) {
        bits = sign;                                                   // +-0
    } else {                                                           // subnormal: normalize
        int shift = 0;
        while (!(mantissa & 0x400)) { mantissa <<= 1; shift++; }
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((mantissa & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float half_to_float_fast(uint16_t h) {   // the same value: one instruction with F16C (vcvtph2ps)
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    return half_to_float(h);
#endif
}

static inline float *alloc64(size_t bytes) {   // 64-byte aligned (aligned_alloc wants a multiple of 64)
    return (float *)aligned_alloc(64, (bytes + 63) / 64 * 64);
}

static void load_codebook(const uint16_t *cb, int C, float *out) {   // C fp16 centroids -> float
    for (int c = 0; c < C; c++) { out[c] = half_to_float(cb[c]); }
}

// ----------------------------------------------------------------------------------------------------
// v0: scalar reference. Idea: the formula, one weight at a time (any b, any group size, any batch).

void lut_gemv_v0(const uint32_t *packed, const uint16_t *codebook, const float *x, float *y,
                 int N, int K, int B, int bits, int group_size, int n_threads) {
    const int E = entries_per_word(bits), C = 1 << bits, n_words = (K + E - 1) / E;
    const int G = (K + group_size - 1) / group_size;
    const uint32_t mask = (1u << bits) - 1u;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint32_t *row = packed + (int64_t)n * n_words;
        const uint16_t *row_cb = codebook + (int64_t)n * G * C;
        for (int b = 0; b < B; b++) {
            const float *xb = x + (int64_t)b * K;
            float acc = 0.0f;
            for (int k = 0; k < K; k++) {
                uint32_t j = (row[k / E] >> ((k % E) * bits)) & mask;
                acc += half_to_float(row_cb[(k / group_size) * C + j]) * xb[k];
            }
            y[(int64_t)b * N + n] = acc;
        }
    }
}

static void cpu_rows_portable(const uint32_t *packed, const uint16_t *codebook, const float *x, float *y,
                              int N, int K, int B, int bits, int group_size, int n_threads) {
    const int C = 1 << bits, n_words = row_words(bits, K), G = (K + group_size - 1) / group_size;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint32_t *row = packed + (int64_t)n * n_words;
        const uint16_t *row_cb = codebook + (int64_t)n * G * C;
        for (int b = 0; b < B; b++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) {
                acc += half_to_float(row_cb[(k / group_size) * C + cpu_index(row, k, bits)]) * x[(int64_t)b * K + k];
            }
            y[(int64_t)b * N + n] = acc;
        }
    }
}

// ----------------------------------------------------------------------------------------------------
// v1: per-row byte table, b = 2 or 4, group_size a multiple of 8 / b (whole bytes per group); else v0.
// Idea: decode 8/b weights per look-up. For each group of a row, table[v] = the 8/b weights a byte v
// stands for (256 * 4 floats = 4 KiB at b = 2); then 8/b multiply-adds. Building the table costs 256
// look-ups per group, the same as decoding 1024 weights: it only pays for long rows.

void lut_gemv_v1(const uint32_t *packed, const uint16_t *codebook, const float *x, float *y,
                 int N, int K, int B, int bits, int group_size, int n_threads) {
    const int per_byte = 8 / bits;
    if (bits == 3 || group_size % per_byte) {
        lut_gemv_v0(packed, codebook, x, y, N, K, B, bits, group_size, n_threads);
        return;
    }
    const int E = entries_per_word(bits), C = 1 << bits, n_words = (K + E - 1) / E;
    const int G = (K + group_size - 1) / group_size, n_bytes = 4 * n_words;
    #pragma omp parallel num_threads(n_threads)
    {
        float table[256 * 4], centroids[MAX_CENTROIDS];                // per_byte <= 4 floats per entry
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const uint8_t *row = (const uint8_t *)(packed + (int64_t)n * n_words);   // little-endian bytes
            for (int b = 0; b < B; b++) {
                const float *xb = x + (int64_t)b * K;
                float acc = 0.0f;
                for (int g = 0; g < G; g++) {
                    load_codebook(codebook + ((int64_t)n * G + g) * C, C, centroids);
                    for (int v = 0; v < 256; v++) {
                        for (int p = 0; p < per_byte; p++) {
                            table[v * per_byte + p] = centroids[(v >> (p * bits)) & (C - 1)];
                        }
                    }
                    int j0 = g * group_size / per_byte, j1 = (g + 1) * group_size / per_byte;
                    if (j1 > n_bytes) { j1 = n_bytes; }
                    for (int j = j0; j < j1; j++) {
                        const float *w = table + row[j] * per_byte;
                        for (int p = 0; p < per_byte; p++) {
                            int k = j * per_byte + p;
                            if (k < K) { acc += w[p] * xb[k]; }
                        }
                    }
                }
                y[(int64_t)b * N + n] = acc;
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------------
// v2: partial-sum tables (T-MAC, Wei et al. arXiv:2407.00088, applied to per-row codebooks).
// Idea: precompute from x, once for all N rows, everything a row could ask of a small group of
// activations. At b = 2 a nibble holds the indices (i0, i1) of the pair x[2j], x[2j+1]; for each of its
// 16 values and each centroid slot c:  T[j][nibble][c] = x[2j] [i0 == c] + x[2j+1] [i1 == c].
// A row adds T[j][its nibble] (4 floats: a 128-bit add) into S[c] for every pair of its group, and
// y = sum_c codebook[c] * S[c]: 2^b multiplies per group instead of group_size. The tables hold
// K / 2 * 64 floats (512 KiB at K = 2048, the L2 size: this is why T-MAC keeps them in int8).
// b = 3, 4 (and groups of odd size): one activation per group, S[idx] += x (bucket sums, as kernels.cu v3).

static void psum_tables_b2(const float *xb, int K, int n_pairs, float *T) {   // T: (n_pairs, 16, 4)
    for (int j = 0; j < n_pairs; j++) {
        float x0 = 2 * j < K ? xb[2 * j] : 0.0f, x1 = 2 * j + 1 < K ? xb[2 * j + 1] : 0.0f;
        for (int v = 0; v < 16; v++) {
            float *t = T + (j * 16 + v) * 4;
            t[0] = t[1] = t[2] = t[3] = 0.0f;
            t[v & 3] += x0;
            t[v >> 2] += x1;
        }
    }
}

void lut_gemv_v2(const uint32_t *packed, const uint16_t *codebook, const float *x, float *y,
                 int N, int K, int B, int bits, int group_size, int n_threads) {
    const int E = entries_per_word(bits), C = 1 << bits, n_words = (K + E - 1) / E;
    const int G = (K + group_size - 1) / group_size;
    const int pairs = bits == 2 && (G == 1 || group_size % 2 == 0);
    const int n_pairs = 8 * n_words;                                   // 2 entries a nibble, padding included
    float *T = pairs ? (float *)malloc(sizeof(float) * n_pairs * 64) : NULL;
    for (int b = 0; b < B; b++) {
        const float *xb = x + (int64_t)b * K;
        if (pairs) { psum_tables_b2(xb, K, n_pairs, T); }
        #pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int n = 0; n < N; n++) {
            const uint32_t *row = packed + (int64_t)n * n_words;
            const uint16_t *row_cb = codebook + (int64_t)n * G * C;
            float acc = 0.0f, centroids[MAX_CENTROIDS];
            for (int g = 0; g < G; g++) {
                float S[MAX_CENTROIDS] = {0};
                int k0 = g * group_size, k1 = g == G - 1 ? (pairs ? 16 * n_words : K) : k0 + group_size;
                if (pairs) {
                    const uint8_t *bytes = (const uint8_t *)row;
                    for (int j = k0 / 2; j < k1 / 2; j++) {            // pair j: nibble j of the row
                        const float *t = T + (j * 16 + ((bytes[j >> 1] >> ((j & 1) * 4)) & 15)) * 4;
                        for (int c = 0; c < 4; c++) { S[c] += t[c]; }
                    }
                } else {
                    for (int k = k0; k < k1; k++) {
                        S[(row[k / E] >> ((k % E) * bits)) & (C - 1)] += xb[k];
                    }
                }
                load_codebook(row_cb + g * C, C, centroids);
                for (int c = 0; c < C; c++) { acc += centroids[c] * S[c]; }
            }
            y[(int64_t)b * N + n] = acc;
        }
    }
    free(T);
}

// ----------------------------------------------------------------------------------------------------
// v3 and v4: the codebook in a register (AVX2).
// Idea: `vpermps` looks 8 lanes up in an 8-float register by the low 3 bits of each lane, so a codebook
// of 2^b <= 8 floats is decoded 8 weights an instruction, with no memory access at all:
//   b = 2: shift the broadcast word so lane L holds entry L in its low bits; 4 centroids fit one 128-bit
//          half, so the in-lane `vpermilps` (_mm256_permutevar_ps: low 2 bits, the 4 centroids in each half)
//          does the look-up: 1 uop of latency 1 on Zen 3, where the cross-lane vpermps costs more (2-bit
//          v3 ~1.25x faster, 1 thread; vpermps read the low 3 bits, so its table was the 4 centroids twice).
//   b = 3: R3 (above): vector j < 3 of a block is the broadcast word shifted by 3s, then vpermps; vector 3 gathers its
//          field from the words' top bytes first (3 byte loads, 2 shifts, 2 ORs: integer work beside the
//          vector pipes). The file's 10-a-word layout took a vpermd and two table loads per 8 weights: the
//          C decode step at 3 bits ran ~1.6x slower with it (1 thread, A/B on a busy machine).)
//   b = 4: 16 centroids = two registers: look up both, `vblendvps` picks by bit 3 (shifted to the sign).
// A vector of 8 entries uses one codebook, so groups must be a multiple of 8 entries (else v2 runs).
// x is copied once into a zero-padded buffer, so the last vector of a row reads zeros past K.

static inline int v3_supports(int K, int bits, int group_size) {
    (void)bits;
    return group_size >= K || group_size % 8 == 0;
}

#ifdef __AVX2__

typedef struct { __m256 lo, hi; } codebook8;                          // centroids 0-7 and 8-15

static inline __attribute__((always_inline)) codebook8 load_codebook8(const uint16_t *cb, const int bits) {
    codebook8 r;
#ifdef __F16C__
    if (bits == 2) {                                                    // 4 centroids, twice
        __m128 c = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)cb));
        r.lo = _mm256_set_m128(c, c);
    } else {
        r.lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)cb));
        r.hi = bits == 4 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(cb + 8))) : r.lo;
    }
#else
    float c[16] = {0};
    load_codebook(cb, 1 << bits, c);
    if (bits == 2) { memcpy(c + 4, c, 16); }
    r.lo = _mm256_loadu_ps(c); r.hi = _mm256_loadu_ps(c + 8);
#endif
    return r;
}

// the 8 weights of vector v (entries 8v .. 8v+7) of a row in the CPU layout (b = 3: R3)
static inline __attribute__((always_inline)) __m256 decode8(const uint32_t *row, int v, int bits, codebook8 cb) {
    if (bits == 2) {
        const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        __m256i w = _mm256_set1_epi32((int)(row[v >> 1] >> ((v & 1) * 16)));
        return _mm256_permutevar_ps(cb.lo, _mm256_srlv_epi32(w, shifts));
    }
    if (bits == 4) {
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        __m256i s = _mm256_srlv_epi32(_mm256_set1_epi32((int)row[v]), shifts);
        __m256 lo = _mm256_permutevar8x32_ps(cb.lo, s), hi = _mm256_permutevar8x32_ps(cb.hi, s);
        return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(s, 28)));   // bit 3 -> sign
    }
    const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    return _mm256_permutevar8x32_ps(cb.lo, _mm256_srlv_epi32(_mm256_set1_epi32((int)r3_field(row, v)), shifts));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Runs BODY with v and wv (the 8 weights of vector v) for every vector of a row, group by group (the
// codebook register changes).
#define FOR_EACH_VECTOR(row, row_cb, V, vg, G, C, bits, BODY)                                            \
    do {                                                                                                 \
        for (int g = 0; g < (G); g++) {                                                                  \
            codebook8 cb = load_codebook8((row_cb) + g * (C), bits);                                     \
            int v1 = g == (G) - 1 ? (V) : (g + 1) * (vg);                                                \
            for (int v = g * (vg); v < v1; v++) {                                                        \
                __m256 wv = decode8((row), v, bits, cb);                                                 \
                BODY                                                                                     \
            }                                                                                            \
        }                                                                                                \
    } while (0)

static float *padded_activations(const float *x, int B, int K, int V) {   // (B, 8 V), zeros past K
    float *xp = alloc64(sizeof(float) * ((size_t)B * 8 * V + 16));
    for (int b = 0; b < B; b++) {
        memcpy(xp + (size_t)b * 8 * V, x + (int64_t)b * K, sizeof(float) * K);
        memset(xp + (size_t)b * 8 * V + K, 0, sizeof(float) * (8 * V - K));
    }
    return xp;
}

#endif  // __AVX2__

#ifdef __AVX2__
// sum over the vectors va <= v < vb of row's weights times xb (one codebook): the bulk in whole words
// (b = 2, 4) or whole 32-entry R3 blocks (b = 3) with 4 independent accumulators, the ends one vector at
// a time. `bits` is a constant at each call site, so the compiler makes three loops of this one.
static inline __attribute__((always_inline)) __m256
span_dot(const uint32_t *row, int va, int vb, const int bits, codebook8 cb, const float *xb) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0;
    int v = va;
    if (bits == 2) {
        const __m256i s_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), s_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
        if ((v & 1) && v < vb) { a4 = _mm256_fmadd_ps(decode8(row, v, 2, cb), _mm256_load_ps(xb + 8 * v), a4); v++; }
        for (; v + 4 <= vb; v += 4) {                                   // 2 words, 32 weights
            __m256i w0 = _mm256_set1_epi32((int)row[v >> 1]), w1 = _mm256_set1_epi32((int)row[(v >> 1) + 1]);
            a0 = _mm256_fmadd_ps(_mm256_permutevar_ps(cb.lo, _mm256_srlv_epi32(w0, s_lo)), _mm256_load_ps(xb + 8 * v), a0);
            a1 = _mm256_fmadd_ps(_mm256_permutevar_ps(cb.lo, _mm256_srlv_epi32(w0, s_hi)), _mm256_load_ps(xb + 8 * v + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_permutevar_ps(cb.lo, _mm256_srlv_epi32(w1, s_lo)), _mm256_load_ps(xb + 8 * v + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_permutevar_ps(cb.lo, _mm256_srlv_epi32(w1, s_hi)), _mm256_load_ps(xb + 8 * v + 24), a3);
        }
    } else if (bits == 4) {
        for (; v + 4 <= vb; v += 4) {                                   // 4 words, 32 weights
            a0 = _mm256_fmadd_ps(decode8(row, v, 4, cb), _mm256_load_ps(xb + 8 * v), a0);
            a1 = _mm256_fmadd_ps(decode8(row, v + 1, 4, cb), _mm256_load_ps(xb + 8 * v + 8), a1);
            a2 = _mm256_fmadd_ps(decode8(row, v + 2, 4, cb), _mm256_load_ps(xb + 8 * v + 16), a2);
            a3 = _mm256_fmadd_ps(decode8(row, v + 3, 4, cb), _mm256_load_ps(xb + 8 * v + 24), a3);
        }
    } else {
        const __m256i s3 = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
        for (; v < vb && (v & 3); v++) { a4 = _mm256_fmadd_ps(decode8(row, v, 3, cb), _mm256_load_ps(xb + 8 * v), a4); }
        for (; v + 4 <= vb; v += 4) {                                   // an R3 block: 3 words, 32 weights
            const uint32_t *w = row + 3 * (v >> 2);
            const uint8_t *top = (const uint8_t *)w + 3;                // the words' top bytes (little-endian),
            const uint32_t w3 = top[0] | (uint32_t)top[4] << 8 | (uint32_t)top[8] << 16;   // read as bytes so
            // that words 0-2 stay broadcast straight from memory (vpbroadcastd m32: no move through a register)
            a0 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(cb.lo, _mm256_srlv_epi32(_mm256_set1_epi32((int)w[0]), s3)), _mm256_load_ps(xb + 8 * v), a0);
            a1 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(cb.lo, _mm256_srlv_epi32(_mm256_set1_epi32((int)w[1]), s3)), _mm256_load_ps(xb + 8 * v + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(cb.lo, _mm256_srlv_epi32(_mm256_set1_epi32((int)w[2]), s3)), _mm256_load_ps(xb + 8 * v + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(cb.lo, _mm256_srlv_epi32(_mm256_set1_epi32((int)w3), s3)), _mm256_load_ps(xb + 8 * v + 24), a3);
        }
    }
    for (; v < vb; v++) { a4 = _mm256_fmadd_ps(decode8(row, v, bits, cb), _mm256_load_ps(xb + 8 * v), a4); }
    return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), a4);
}

// v3 on two rows at once, b = 2 (rows n, n + 1 of one matrix: the same K and groups). Idea: the per-row
// work (loop set-up, the odd first vector, the tails, a horizontal sum) is ~20 cycles, a fifth of a
// 576-wide row, so halve it; each x vector is loaded once for both rows. 4 accumulators a row, as span_dot.
static inline __attribute__((always_inline)) void
span_dot2_b2(const uint32_t *ra, const uint32_t *rb, int va, int vb, codebook8 ca, codebook8 cb,
             const float *xb, __m256 *sa, __m256 *sb) {
    const __m256i s_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), s_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int v = va;
    if ((v & 1) && v < vb) {
        const __m256 x = _mm256_load_ps(xb + 8 * v);
        a0 = _mm256_mul_ps(decode8(ra, v, 2, ca), x); b0 = _mm256_mul_ps(decode8(rb, v, 2, cb), x); v++;
    }
    for (; v + 4 <= vb; v += 4) {                                       // 2 words of each row, 64 weights
        const uint32_t *wa = ra + (v >> 1), *wb = rb + (v >> 1);
        __m256 x = _mm256_load_ps(xb + 8 * v);
        __m256i w = _mm256_set1_epi32((int)wa[0]);
        a0 = _mm256_fmadd_ps(_mm256_permutevar_ps(ca.lo, _mm256_srlv_epi32(w, s_lo)), x, a0);
        w = _mm256_set1_epi32((int)wb[0]);
        b0 = _mm256_fmadd_ps(_mm256_permutevar_ps(cb.lo, _mm256_srlv_epi32(w, s_lo)), x, b0);
        x = _mm256_load_ps(xb + 8 * v + 8);
        a1 = _mm256_fmadd_ps(_mm256_permutevar_ps(ca.lo, _mm256_srlv_epi32(_mm256_set1_epi32((int)wa[0]), s_hi)), x, a1);
        b1 = _mm256_fmadd_ps(_mm256_permutevar_ps(cb.lo, _mm256_srlv_epi32(w, s_hi)), x, b1);
        x = _mm256_load_ps(xb + 8 * v + 16);
        w = _mm256_set1_epi32((int)wa[1]);
        a2 = _mm256_fmadd_ps(_mm256_permutevar_ps(ca.lo, _mm256_srlv_epi32(w, s_lo)), x, a2);
        w = _mm256_set1_epi32((int)wb[1]);
        b2 = _mm256_fmadd_ps(_mm256_permutevar_ps(cb.lo, _mm256_srlv_epi32(w, s_lo)), x, b2);
        x = _mm256_load_ps(xb + 8 * v + 24);
        a3 = _mm256_fmadd_ps(_mm256_permutevar_ps(ca.lo, _mm256_srlv_epi32(_mm256_set1_epi32((int)wa[1]), s_hi)), x, a3);
        b3 = _mm256_fmadd_ps(_mm256_permutevar_ps(cb.lo, _mm256_srlv_epi32(w, s_hi)), x, b3);
    }
    for (; v < vb; v++) {
        const __m256 x = _mm256_load_ps(xb + 8 * v);
        a1 = _mm256_fmadd_ps(decode8(ra, v, 2, ca), x, a1); b1 = _mm256_fmadd_ps(decode8(rb, v, 2, cb), x, b1);
    }
    *sa = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    *sb = _mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3));
}

// rows ra, rb (b = 2, codebooks ca_, cb_ (G, 4) each) times x: *ya, *yb
static inline __attribute__((always_inline)) void
v3_pair_b2(const uint32_t *ra, const uint32_t *rb, const uint16_t *ca_, const uint16_t *cb_, int K, int group_size,
           const float *x, float *ya, float *yb) {
    const int G = (K + group_size - 1) / group_size, V = (K + 7) / 8, vg = group_size / 8;
    __m256 acc_a = _mm256_setzero_ps(), acc_b = acc_a;
    for (int g = 0; g < G; g++) {
        __m256 sa, sb;
        span_dot2_b2(ra, rb, g * vg, g == G - 1 ? V : (g + 1) * vg, load_codebook8(ca_ + g * 4, 2),
                     load_codebook8(cb_ + g * 4, 2), x, &sa, &sb);
        acc_a = _mm256_add_ps(acc_a, sa); acc_b = _mm256_add_ps(acc_b, sb);
    }
    *ya = hsum8(acc_a); *yb = hsum8(acc_b);
}

static inline __attribute__((always_inline)) void
v3_rows(const uint32_t *packed, const uint16_t *codebook, const float *xp, float *y, int N, int K, int B,
        const int bits, int group_size, int n_threads) {
    const int C = 1 << bits, n_words = row_words(bits, K);
    const int G = (K + group_size - 1) / group_size, V = (K + 7) / 8, vg = group_size / 8;
    const int pairs = bits == 2 ? N / 2 : 0;                          // b = 2: rows 2p, 2p + 1 together
    if (pairs) {
        #pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int p = 0; p < pairs; p++) {
            const int64_t n = 2 * (int64_t)p;
            for (int b = 0; b < B; b++) {
                v3_pair_b2(packed + n * n_words, packed + (n + 1) * n_words, codebook + n * G * C,
                           codebook + (n + 1) * G * C, K, group_size, xp + (size_t)b * 8 * V,
                           y + (int64_t)b * N + n, y + (int64_t)b * N + n + 1);
            }
        }
    }
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 2 * pairs; n < N; n++) {
        const uint32_t *row = packed + (int64_t)n * n_words;
        const uint16_t *row_cb = codebook + (int64_t)n * G * C;
        for (int b = 0; b < B; b++) {
            const float *xb = xp + (size_t)b * 8 * V;
            __m256 acc = _mm256_setzero_ps();
            for (int g = 0; g < G; g++) {
                int vb = g == G - 1 ? V : (g + 1) * vg;
                acc = _mm256_add_ps(acc, span_dot(row, g * vg, vb, bits, load_codebook8(row_cb + g * C, bits), xb));
            }
            y[(int64_t)b * N + n] = hsum8(acc);
        }
    }
}
#endif

// batch 1 (B rows are done one after the other, each decoding the row again)
void lut_gemv_v3(const uint32_t *packed, const uint16_t *codebook, const float *x, float *y,
                 int N, int K, int B, int bits, int group_size, int n_threads) {
#ifdef __AVX2__
    if (v3_supports(K, bits, group_size)) {
        float *xp = padded_activations(x, B, K, (K + 7) / 8);
        if (bits == 2) { v3_rows(packed, codebook, xp, y, N, K, B, 2, group_size, n_threads); }
        if (bits == 3) { v3_rows(packed, codebook, xp, y, N, K, B, 3, group_size, n_threads); }
        if (bits == 4) { v3_rows(packed, codebook, xp, y, N, K, B, 4, group_size, n_threads); }
        free(xp);
        return;
    }
#endif
    if (bits == 3) {                                                  // R3 rows: the formula (portable)
        cpu_rows_portable(packed, codebook, x, y, N, K, B, bits, group_size, n_threads);
    } else {
        lut_gemv_v2(packed, codebook, x, y, N, K, B, bits, group_size, n_threads);   // portable
    }
}

#ifdef __AVX2__
// y[b, n0 + r] for r < rows (<= V4_ROWS) and b0 <= b < b1 from the decoded rows W (rows, 8 V)
static void v4_tile(const float *W, int rows, const float *xp, int V, int b0, int b1, float *y, int N, int n0) {
    int b = b0;
    for (; b + V4_BATCH <= b1 && rows == V4_ROWS; b += V4_BATCH) {   // the 2 x 4 register tile
        __m256 acc[V4_ROWS][V4_BATCH];
        for (int r = 0; r < V4_ROWS; r++) for (int j = 0; j < V4_BATCH; j++) acc[r][j] = _mm256_setzero_ps();
        const float *x0 = xp + (size_t)b * 8 * V;
        for (int v = 0; v < V; v++) {
            __m256 w0 = _mm256_load_ps(W + 8 * v), w1 = _mm256_load_ps(W + 8 * (V + v));
            for (int j = 0; j < V4_BATCH; j++) {
                __m256 xv = _mm256_load_ps(x0 + (size_t)j * 8 * V + 8 * v);
                acc[0][j] = _mm256_fmadd_ps(w0, xv, acc[0][j]);
                acc[1][j] = _mm256_fmadd_ps(w1, xv, acc[1][j]);
            }
        }
        for (int r = 0; r < V4_ROWS; r++) for (int j = 0; j < V4_BATCH; j++)
            y[(int64_t)(b + j) * N + n0 + r] = hsum8(acc[r][j]);
    }
    for (; b < b1; b++) {                                               // leftover activation rows
        for (int r = 0; r < rows; r++) {
            __m256 acc = _mm256_setzero_ps();
            for (int v = 0; v < V; v++)
                acc = _mm256_fmadd_ps(_mm256_load_ps(W + 8 * ((size_t)r * V + v)),
                                      _mm256_load_ps(xp + (size_t)b * 8 * V + 8 * v), acc);
            y[(int64_t)b * N + n0 + r] = hsum8(acc);
        }
    }
}
#endif

#ifdef __AVX2__
// v4 on activations already padded: xp (B, 8 V) zero past K, 32-byte aligned rows; y (B, N)
static void v4_rows(const uint32_t *packed, const uint16_t *codebook, const float *xp, float *y,
                    int N, int K, int B, int bits, int group_size, int n_threads) {
    const int C = 1 << bits, n_words = row_words(bits, K);
    const int G = (K + group_size - 1) / group_size, V = (K + 7) / 8, vg = group_size / 8;
    #pragma omp parallel num_threads(n_threads)
    {
        float *W = alloc64(sizeof(float) * 8 * V * V4_ROWS);
        #pragma omp for schedule(static)
        for (int n0 = 0; n0 < N; n0 += V4_ROWS) {
            int rows = N - n0 < V4_ROWS ? N - n0 : V4_ROWS;
            for (int r = 0; r < rows; r++) {
                const uint32_t *row = packed + (int64_t)(n0 + r) * n_words;
                const uint16_t *row_cb = codebook + (int64_t)(n0 + r) * G * C;
                float *Wr = W + (size_t)r * 8 * V;
                FOR_EACH_VECTOR(row, row_cb, V, vg, G, C, bits, { _mm256_store_ps(Wr + 8 * v, wv); });
            }
            v4_tile(W, rows, xp, V, 0, B, y, N, n0);
        }
        free(W);
    }
}
#endif

// batch > 1: decode V4_ROWS rows once into an L1-sized buffer, multiply by all B activation rows
void lut_gemm_v4(const uint32_t *packed, const uint16_t *codebook, const float *x, float *y,
                 int N, int K, int B, int bits, int group_size, int n_threads) {
#ifdef __AVX2__
    if (v3_supports(K, bits, group_size)) {
        float *xp = padded_activations(x, B, K, (K + 7) / 8);
        v4_rows(packed, codebook, xp, y, N, K, B, bits, group_size, n_threads);
        free(xp);
        return;
    }
#endif
    if (bits == 3) {                                                  // R3 rows: the formula (portable)
        cpu_rows_portable(packed, codebook, x, y, N, K, B, bits, group_size, n_threads);
    } else {
        lut_gemv_v2(packed, codebook, x, y, N, K, B, bits, group_size, n_threads);   // portable
    }
}

// W (n1 - n0, 8 V) float32 = rows n0..n1-1 of the dequantized weight (v3's decoder; zeros past K):
// for a caller that multiplies the rows itself (a BLAS sgemm). Without AVX2: the scalar formula.
// packed in the CPU layout (b = 3: R3).
void lut_decode_rows(const uint32_t *packed, const uint16_t *codebook, float *W, int n0, int n1, int K,
                     int bits, int group_size, int n_threads) {
    const int C = 1 << bits, n_words = row_words(bits, K);
    const int G = (K + group_size - 1) / group_size, V = (K + 7) / 8;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = n0; n < n1; n++) {
        const uint32_t *row = packed + (int64_t)n * n_words;
        const uint16_t *row_cb = codebook + (int64_t)n * G * C;
        float *Wr = W + (size_t)(n - n0) * 8 * V;
#ifdef __AVX2__
        if (v3_supports(K, bits, group_size)) {
            int vg = group_size / 8;
            FOR_EACH_VECTOR(row, row_cb, V, vg, G, C, bits, { _mm256_storeu_ps(Wr + 8 * v, wv); });
            for (int k = K; k < 8 * V; k++) { Wr[k] = 0.0f; }
            continue;
        }
#endif
        for (int k = 0; k < 8 * V; k++) {
            Wr[k] = k < K ? half_to_float(row_cb[(k / group_size) * C + cpu_index(row, k, bits)]) : 0.0f;
        }
    }
}

// ----------------------------------------------------------------------------------------------------
// q8: the output head in GGUF's Q8_0 layout: each row of K (a multiple of 32) weights is K / 32 blocks of
// 34 bytes, an fp16 scale d then 32 int8 q, the weight d * q. Idea: 8.5 bits a weight instead of 32;
// convert 8 int8 to 8 floats (vpmovsxbd + vcvtdq2ps), FMA with x, scale once per block.
// blocks (N, K / 32 * 34) bytes, x (B, K), y (B, N) float32.
// Each block asks for the bytes Q8_PREFETCH ahead (~7 rows of 576): a 49152 x 576 head (30 MB) ran ~1.2x
// slower than the same rows in cache without it (1 thread, busy machine); prefetching a few rows past the
// end of the matrix is harmless (a hint: it never faults).
#define Q8_PREFETCH 4096

void q8_gemv(const uint8_t *blocks, const float *x, float *y, int N, int K, int B, int n_threads) {
    const int nb = K / 32;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = blocks + (int64_t)n * nb * 34;
        for (int b = 0; b < B; b++) {
            const float *xb = x + (int64_t)b * K;
#ifdef __AVX2__
            __m256 acc = _mm256_setzero_ps();
            for (int i = 0; i < nb; i++) {
                const uint8_t *blk = row + i * 34;
                _mm_prefetch((const char *)blk + Q8_PREFETCH, _MM_HINT_T0);
                uint16_t d16;
                memcpy(&d16, blk, 2);
                __m256 s = _mm256_setzero_ps();
                for (int j = 0; j < 4; j++) {
                    __m128i q8 = _mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * j));
                    __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
                    s = _mm256_fmadd_ps(q, _mm256_loadu_ps(xb + 32 * i + 8 * j), s);
                }
                acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float_fast(d16)), s, acc);
            }
            y[(int64_t)b * N + n] = hsum8(acc);
#else
            float acc = 0.0f;
            for (int i = 0; i < nb; i++) {
                const uint8_t *blk = row + i * 34;
                uint16_t d16;
                memcpy(&d16, blk, 2);
                float s = 0.0f;
                for (int j = 0; j < 32; j++) { s += (float)(int8_t)blk[2 + j] * xb[32 * i + j]; }
                acc += half_to_float(d16) * s;
            }
            y[(int64_t)b * N + n] = acc;
#endif
        }
    }
}

// ----------------------------------------------------------------------------------------------------
// memory bandwidth: copy n_bytes from src to dst, split among the threads (bench.py's yardstick)
void copy_bytes(uint8_t *dst, const uint8_t *src, int64_t n_bytes, int n_threads) {
    #pragma omp parallel num_threads(n_threads)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(); T = omp_get_num_threads();
#endif
        int64_t chunk = (n_bytes + T - 1) / T, start = t * chunk;
        int64_t stop = start + chunk < n_bytes ? start + chunk : n_bytes;
        if (stop > start) { memcpy(dst + start, src + start, stop - start); }
    }
}

// ====================================================================================================
// The decode step of the Llama family, the whole model in one C call (after llama2.c's run.c).
//
// Why: Python's generate() called ~210 small matrices a token, each paying as much in Python and torch
// dispatch as in its kernel (RESULTS.md, "CPU speed"). Here one call runs T new positions pos .. pos+T-1 of one
// sequence through every block and writes the logits of the last one: T = 1 for each generated token,
// T = the prompt's length once (the prompt in a batch: v4 decodes each weight row once for all T).
// The data path of one position (dim = n_embd, qd = n_head * hs, kvd = n_kv_head * hs, hs = head size):
//
//   x (dim)        = embedding[token]                                the residual stream
//   for each block:
//     h (dim)      = rmsnorm(x) * attn_norm
//     q (qd), k (kvd), v (kvd) = h Wq^T, h Wk^T, h Wv^T              ONE parallel loop over the rows of all
//                                                                     three matrices: h is read once
//     q, k         = rotary(q), rotary(k)                            cos/sin tables made by Python (its own)
//     key_cache[kvh, pos] = k, value_cache[kvh, pos] = v             torch's KVCache tensors, in place
//     a (qd)       = for each query head: softmax(q_h . keys / sqrt(hs)) . values over positions 0 .. pos
//                    of kv head h / (n_head / n_kv_head)             grouped-query attention
//     x           += a Wo^T
//     h            = rmsnorm(x) * mlp_norm
//     g, u (hidden) = h Wg^T, h Wu^T                                 one loop, as q, k, v
//     x           += (silu(g) * u) Wd^T                              SwiGLU
//   logits (vocab) = (rmsnorm(x) * final_norm) Whead^T               the last position only
//
// A matrix is one of three kinds (Matrix): packed LUT (v3's decoder, one output a dot product; at T > 1
// v4), dense fp32 (a layer kept unquantized, the teacher, a tied head) or Q8_0 (the head). The input of
// every matrix sits in a scratch buffer padded with zeros to a multiple of 8 floats, rows 32-byte
// aligned, exactly as v3 and v4 read it. Weights and the KV cache are torch's tensors (pointers, no copies;
// lcd_kernels.py builds the tables once); the scratch buffers belong to the call. OpenMP splits the rows of
// the matrices, and the (position, head) pairs of attention, among the threads.

#include <math.h>

enum { MAT_LUT = 0, MAT_DENSE = 1, MAT_Q8 = 2 };   // lcd_kernels.py's MATRIX_KINDS, in this order

typedef struct {
    int kind;                  // MAT_LUT, MAT_DENSE or MAT_Q8
    int N, K;                  // out, in features
    int bits, group_size;      // MAT_LUT: index bits, columns per codebook (at most K)
    const void *weight;        // LUT: packed (N, row_words) uint32, CPU layout (b = 3: R3); DENSE: (N, K) float; Q8: (N, ceil(K/32) * 34) bytes
    const uint16_t *codebook;  // LUT: (N, G, 2^b) fp16 bits; others NULL
    const float *bias;         // (N,) or NULL
} Matrix;

typedef struct {
    const float *attn_norm, *mlp_norm;            // (dim,) RMSNorm weights
    Matrix q, k, v, o, gate, up, down;
} LlamaBlock;

typedef struct {
    int n_layer, dim, n_head, n_kv_head, head_dim, hidden, vocab;
    int n_rotary;                                 // positions the rotary tables cover
    float norm_eps;
    const float *embedding;                       // (vocab, dim)
    const float *rotary_cos, *rotary_sin;         // (n_rotary, head_dim / 2)
    const float *final_norm;                      // (dim,)
    Matrix head;                                  // (vocab, dim)
    const LlamaBlock *blocks;                     // n_layer of them
} LlamaModel;

static inline int pad8(int n) { return (n + 7) / 8 * 8; }

static float *zeros(size_t n_floats) {            // 64-byte aligned, zeroed: the padding of an input is 0
    float *p = alloc64(sizeof(float) * (n_floats + 16));
    memset(p, 0, sizeof(float) * (n_floats + 16));
    return p;
}

// ---- one output of a matrix: a row of W times x (K floats, zero-padded to a multiple of 8) ----

#ifdef __AVX2__
static inline __attribute__((always_inline)) float
v3_row_dot(const uint32_t *row, const uint16_t *row_cb, int K, int group_size, const int bits, const float *x) {
    const int C = 1 << bits, G = (K + group_size - 1) / group_size, V = (K + 7) / 8, vg = group_size / 8;
    __m256 acc = _mm256_setzero_ps();                 // the same sums, in the same order, as v3_rows (b = 2: its odd last row)
    for (int g = 0; g < G; g++) {
        int vb = g == G - 1 ? V : (g + 1) * vg;
        acc = _mm256_add_ps(acc, span_dot(row, g * vg, vb, bits, load_codebook8(row_cb + g * C, bits), x));
    }
    return hsum8(acc);
}
#endif

static float lut_row_dot(const Matrix *m, int n, const float *x) {   // v3 where it applies, else the formula
    const int bits = m->bits, K = m->K, gs = m->group_size, C = 1 << bits;
    const int G = (K + gs - 1) / gs;
    const uint32_t *row = (const uint32_t *)m->weight + (int64_t)n * row_words(bits, K);
    const uint16_t *row_cb = m->codebook + (int64_t)n * G * C;
#ifdef __AVX2__
    if (v3_supports(K, bits, gs)) {
        if (bits == 2) { return v3_row_dot(row, row_cb, K, gs, 2, x); }
        if (bits == 3) { return v3_row_dot(row, row_cb, K, gs, 3, x); }
        return v3_row_dot(row, row_cb, K, gs, 4, x);
    }
#endif
    float acc = 0.0f, centroids[MAX_CENTROIDS];
    for (int g = 0; g < G; g++) {
        load_codebook(row_cb + g * C, C, centroids);
        int k1 = (g + 1) * gs < K ? (g + 1) * gs : K;
        for (int k = g * gs; k < k1; k++) { acc += centroids[cpu_index(row, k, bits)] * x[k]; }
    }
    return acc;
}

static float dense_row_dot(const float *w, const float *x, int K) {   // w: K floats, any alignment
    int k = 0;
    float acc = 0.0f;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) { a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0); }
    acc = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; k < K; k++) { acc += w[k] * x[k]; }
    return acc;
}

static float q8_row_dot(const uint8_t *row, const float *x, int K) {  // q8_gemv's sums; a partial last block
    float acc = 0.0f;                                                  // reads x only up to K
    int i = 0;
#ifdef __AVX2__
    __m256 a = _mm256_setzero_ps();
    for (; i < K / 32; i++) {
        const uint8_t *blk = row + i * 34;
        _mm_prefetch((const char *)blk + Q8_PREFETCH, _MM_HINT_T0);
        uint16_t d16;
        memcpy(&d16, blk, 2);
        __m256 s = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * j))));
            s = _mm256_fmadd_ps(q, _mm256_loadu_ps(x + 32 * i + 8 * j), s);
        }
        a = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float_fast(d16)), s, a);
    }
    acc = hsum8(a);
#endif
    for (; 32 * i < K; i++) {                                          // portable, and the partial block
        const uint8_t *blk = row + i * 34;
        uint16_t d16;
        memcpy(&d16, blk, 2);
        float s = 0.0f;
        for (int k = 32 * i; k < K && k < 32 * i + 32; k++) { s += (float)(int8_t)blk[2 + k - 32 * i] * x[k]; }
        acc += half_to_float(d16) * s;
    }
    return acc;
}

static float row_dot(const Matrix *m, int n, const float *x) {
    float y;
    if (m->kind == MAT_LUT) {
        y = lut_row_dot(m, n, x);
    } else if (m->kind == MAT_DENSE) {
        y = dense_row_dot((const float *)m->weight + (int64_t)n * m->K, x, m->K);
    } else {
        y = q8_row_dot((const uint8_t *)m->weight + (int64_t)n * ((m->K + 31) / 32) * 34, x, m->K);
    }
    return m->bias ? y + m->bias[n] : y;
}

// ---- whole matrices ----

// y[i] (N_i) = x W_i^T for n_mats matrices of the same K: one parallel loop over the rows of all of them,
// so x is read into cache once and the threads share all the rows evenly (q, k, v; gate, up)
// A 2-bit packed matrix goes by pairs of rows (2p, 2p + 1: v3_pair_b2, as v3_rows pairs them; an odd last
// row alone), every other matrix by rows: the loop runs over these units.
static inline int paired(const Matrix *m) {
#ifdef __AVX2__
    return m->kind == MAT_LUT && m->bits == 2 && v3_supports(m->K, 2, m->group_size);
#else
    (void)m;
    return 0;
#endif
}

static void matvec(const Matrix *const *m, int n_mats, const float *x, float *const *y, int n_threads) {
    int units[3], total = 0;                          // n_mats <= 3 (q, k, v)
    for (int i = 0; i < n_mats; i++) { units[i] = paired(m[i]) ? (m[i]->N + 1) / 2 : m[i]->N; total += units[i]; }
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int r = 0; r < total; r++) {
        int i = 0, n = r;
        while (n >= units[i]) { n -= units[i]; i++; }
#ifdef __AVX2__
        if (paired(m[i]) && 2 * n + 1 < m[i]->N) {
            const Matrix *a = m[i];
            const int G = (a->K + a->group_size - 1) / a->group_size, n_words = row_words(2, a->K);
            const uint32_t *row = (const uint32_t *)a->weight + (int64_t)2 * n * n_words;
            const uint16_t *cb = a->codebook + (int64_t)2 * n * G * 4;
            float *out = y[i] + 2 * n;
            v3_pair_b2(row, row + n_words, cb, cb + G * 4, a->K, a->group_size, x, out, out + 1);
            if (a->bias) { out[0] += a->bias[2 * n]; out[1] += a->bias[2 * n + 1]; }
            continue;
        }
#endif
        if (paired(m[i])) { n *= 2; }
        y[i][n] = row_dot(m[i], n, x);
    }
}

// y (T, N) = x (T, pad8(K)) W^T: T = 1 is matvec; more positions decode each packed row once (v4)
static void matmul(const Matrix *m, const float *x, int T, float *y, int n_threads) {
    if (T == 1) {
        matvec(&m, 1, x, &y, n_threads);
        return;
    }
#ifdef __AVX2__
    if (m->kind == MAT_LUT && v3_supports(m->K, m->bits, m->group_size)) {
        v4_rows((const uint32_t *)m->weight, m->codebook, x, y, m->N, m->K, T, m->bits, m->group_size, n_threads);
        if (m->bias) {
            for (int t = 0; t < T; t++) for (int n = 0; n < m->N; n++) y[(int64_t)t * m->N + n] += m->bias[n];
        }
        return;
    }
#endif
    const int ldx = pad8(m->K);
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < m->N; n++) {
        for (int t = 0; t < T; t++) { y[(int64_t)t * m->N + n] = row_dot(m, n, x + (size_t)t * ldx); }
    }
}

// ---- the other steps of a block, one position (row) at a time ----

static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    double ss = 0.0;                                      // out = x / sqrt(mean(x^2) + eps) * weight
    for (int i = 0; i < n; i++) { ss += (double)x[i] * x[i]; }
    const float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) { out[i] = x[i] * r * weight[i]; }
}

// turn each head's pairs (v[i], v[i + hs/2]) of one position by that position's angles (Hugging Face's
// half-split layout, model.apply_rotary); cos, sin: (hs / 2,) of the position
static void rotary(float *v, int n_heads, int hs, const float *cos, const float *sin) {
    const int half = hs / 2;
    for (int h = 0; h < n_heads; h++) {
        float *a = v + h * hs, *b = a + half;
        for (int i = 0; i < half; i++) {
            const float x1 = a[i], x2 = b[i];
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

static float dot(const float *a, const float *b, int n) {
    int i = 0;
    float acc = 0.0f;
#ifdef __AVX2__
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    acc = hsum8(_mm256_add_ps(s0, s1));
#endif
    for (; i < n; i++) { acc += a[i] * b[i]; }
    return acc;
}

// out[t, h hs : (h+1) hs] for each new position t (at pos + t) and query head h: causal attention over
// the positions 0 .. pos + t of kv head h / (n_head / n_kv_head). q (T, n_head hs); keys, values: one
// layer's cache (n_kv_head, max_len, hs), this call's positions already stored
static void attention(const float *q, float *out, int ld_out, const float *keys, const float *values, int T,
                      int pos, int max_len, int n_head, int n_kv_head, int hs, int n_threads) {
    const int group = n_head / n_kv_head;
    const float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel num_threads(n_threads)
    {
        float *p = (float *)malloc(sizeof(float) * (pos + T));     // one head's scores, then weights
        #pragma omp for schedule(static)
        for (int th = 0; th < T * n_head; th++) {
            const int t = th / n_head, h = th % n_head, S = pos + t + 1;
            const float *qh = q + ((size_t)t * n_head + h) * hs;
            const float *kh = keys + (size_t)(h / group) * max_len * hs, *vh = values + (size_t)(h / group) * max_len * hs;
            float top = -INFINITY, sum = 0.0f;
            for (int s = 0; s < S; s++) {
                p[s] = dot(qh, kh + (size_t)s * hs, hs) * scale;
                top = p[s] > top ? p[s] : top;
            }
            for (int s = 0; s < S; s++) { p[s] = expf(p[s] - top); sum += p[s]; }   // softmax, stably
            float *o = out + (size_t)t * ld_out + h * hs;
            memset(o, 0, sizeof(float) * hs);
            for (int s = 0; s < S; s++) {
                const float w = p[s] / sum, *vs = vh + (size_t)s * hs;
                for (int i = 0; i < hs; i++) { o[i] += w * vs[i]; }
            }
        }
        free(p);
    }
}

static void add(float *x, const float *y, size_t n) { for (size_t i = 0; i < n; i++) { x[i] += y[i]; } }

// ---- where the time goes: built with -DLCD_PROFILE (LCD_CFLAGS=-DLCD_PROFILE for lcd_kernels.py), llama_step
// adds the wall time of each part to PROFILE_SECONDS and llama_profile hands the sums over (and zeroes them);
// without it the timers are empty statements and llama_profile reports zeros ----

enum { PART_QKV, PART_ATTENTION, PART_O, PART_GATE_UP, PART_DOWN, PART_HEAD, PART_REST, N_PARTS };
static double PROFILE_SECONDS[N_PARTS];
#if defined(LCD_PROFILE) && defined(_OPENMP)
#define TIMER_START() double timer_ = omp_get_wtime()
#define TIMER_LAP(part) do { double now_ = omp_get_wtime(); PROFILE_SECONDS[part] += now_ - timer_; timer_ = now_; } while (0)
#else
#define TIMER_START() do {} while (0)
#define TIMER_LAP(part) do {} while (0)
#endif

// seconds (N_PARTS) = the time spent in each part since the last call: q k v, attention (rotary, cache,
// softmax), o, gate and up, down, head (with the final norm), the rest (embedding, norms, residuals, SwiGLU)
void llama_profile(double *seconds) {
    for (int i = 0; i < N_PARTS; i++) { seconds[i] = PROFILE_SECONDS[i]; PROFILE_SECONDS[i] = 0.0; }
}

// ---- the step ----

// Runs positions pos .. pos+T-1 (tokens (T,) int64) through the model, stores their keys and values in
// key_cache[l], value_cache[l] (n_layer pointers, each (n_kv_head, max_len, head_dim) float) and writes
// the last position's logits (vocab,). Returns 0; 1 (nothing done) when a token id is outside the
// vocabulary; 2 when pos + T passes max_len or the rotary tables.
int llama_step(const LlamaModel *m, const int64_t *tokens, int T, int pos, int max_len,
               float *const *key_cache, float *const *value_cache, float *logits, int n_threads) {
    for (int t = 0; t < T; t++) {
        if (tokens[t] < 0 || tokens[t] >= m->vocab) { return 1; }
    }
    if (T < 1 || pos < 0 || pos + T > max_len || pos + T > m->n_rotary) { return 2; }
    TIMER_START();
    const int dim = m->dim, hs = m->head_dim, qd = m->n_head * hs, kvd = m->n_kv_head * hs, hidden = m->hidden;
    const int ld_dim = pad8(dim), ld_qd = pad8(qd), ld_hidden = pad8(hidden);
    float *x = zeros((size_t)T * dim), *h = zeros((size_t)T * ld_dim), *tmp = zeros((size_t)T * dim);
    float *q = zeros((size_t)T * qd), *k = zeros((size_t)T * kvd), *v = zeros((size_t)T * kvd);
    float *att = zeros((size_t)T * ld_qd), *g = zeros((size_t)T * hidden), *u = zeros((size_t)T * hidden);
    float *hb = zeros((size_t)T * ld_hidden);
    for (int t = 0; t < T; t++) { memcpy(x + (size_t)t * dim, m->embedding + tokens[t] * dim, sizeof(float) * dim); }

    for (int l = 0; l < m->n_layer; l++) {
        const LlamaBlock *b = m->blocks + l;
        // attention: norm, q k v, rotary, cache, attention, o, residual
        for (int t = 0; t < T; t++) { rmsnorm(h + (size_t)t * ld_dim, x + (size_t)t * dim, b->attn_norm, dim, m->norm_eps); }
        TIMER_LAP(PART_REST);
        if (T == 1) {
            const Matrix *qkv[3] = {&b->q, &b->k, &b->v};
            float *out[3] = {q, k, v};
            matvec(qkv, 3, h, out, n_threads);
        } else {
            matmul(&b->q, h, T, q, n_threads);
            matmul(&b->k, h, T, k, n_threads);
            matmul(&b->v, h, T, v, n_threads);
        }
        TIMER_LAP(PART_QKV);
        for (int t = 0; t < T; t++) {
            const float *cos = m->rotary_cos + (size_t)(pos + t) * (hs / 2), *sin = m->rotary_sin + (size_t)(pos + t) * (hs / 2);
            rotary(q + (size_t)t * qd, m->n_head, hs, cos, sin);
            rotary(k + (size_t)t * kvd, m->n_kv_head, hs, cos, sin);
            for (int j = 0; j < m->n_kv_head; j++) {
                size_t at = ((size_t)j * max_len + pos + t) * hs;
                memcpy(key_cache[l] + at, k + (size_t)t * kvd + j * hs, sizeof(float) * hs);
                memcpy(value_cache[l] + at, v + (size_t)t * kvd + j * hs, sizeof(float) * hs);
            }
        }
        attention(q, att, ld_qd, key_cache[l], value_cache[l], T, pos, max_len, m->n_head, m->n_kv_head, hs, n_threads);
        TIMER_LAP(PART_ATTENTION);
        matmul(&b->o, att, T, tmp, n_threads);
        TIMER_LAP(PART_O);
        add(x, tmp, (size_t)T * dim);
        // MLP: norm, gate and up, SwiGLU, down, residual
        for (int t = 0; t < T; t++) { rmsnorm(h + (size_t)t * ld_dim, x + (size_t)t * dim, b->mlp_norm, dim, m->norm_eps); }
        TIMER_LAP(PART_REST);
        if (T == 1) {
            const Matrix *gate_up[2] = {&b->gate, &b->up};
            float *out[2] = {g, u};
            matvec(gate_up, 2, h, out, n_threads);
        } else {
            matmul(&b->gate, h, T, g, n_threads);
            matmul(&b->up, h, T, u, n_threads);
        }
        TIMER_LAP(PART_GATE_UP);
        for (int t = 0; t < T; t++) {
            for (int i = 0; i < hidden; i++) {
                const float gi = g[(size_t)t * hidden + i];
                hb[(size_t)t * ld_hidden + i] = gi / (1.0f + expf(-gi)) * u[(size_t)t * hidden + i];   // silu(g) u
            }
        }
        TIMER_LAP(PART_REST);
        matmul(&b->down, hb, T, tmp, n_threads);
        TIMER_LAP(PART_DOWN);
        add(x, tmp, (size_t)T * dim);
    }
    TIMER_LAP(PART_REST);
    rmsnorm(h, x + (size_t)(T - 1) * dim, m->final_norm, dim, m->norm_eps);   // the last position only
    const Matrix *head = &m->head;
    matvec(&head, 1, h, &logits, n_threads);
    TIMER_LAP(PART_HEAD);
    free(x); free(h); free(tmp); free(q); free(k); free(v); free(att); free(g); free(u); free(hb);
    return 0;
}
