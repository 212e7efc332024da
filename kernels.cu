/*
kernels.cu - LUT (look-up table) GEMV kernels for LCD's packed layers, naive to fast.

A quantized linear layer stores, for every weight W[n, k], a b-bit index into a small codebook of
2^b fp16 centroids (one codebook per row, or per group of `group_size` columns of a row). Decoding a
token (batch 1) is a matrix-vector product y = W x that is bound by memory bandwidth: reading b-bit
indices instead of 16-bit weights is where the speed comes from. These kernels compute
    y[b, n] = sum_k codebook[n, k / group_size, idx[n, k]] * x[b, k]
straight from the packed indices, without ever writing W out (except the dequant kernel).

Packed layout (the same as packed_model.py section 1, exact):
    E = entries per 32-bit word: b=2 -> 16, b=3 -> 10 (top 2 bits unused, zero), b=4 -> 8.
    n_words = ceil(K / E). The index of weight (n, k) lives in word packed[n, k / E] at bits
    [(k % E) * b, (k % E) * b + b) (entry 0 in the lowest bits). Padding entries (k >= K) are 0.
    packed is row-major (N, n_words) int32 (read here as the uint32 bit pattern).
    codebook is (N, G, 2^b) fp16 row-major, G = ceil(K / group_size) (group_size = K when there is one
    codebook per row); the weight is codebook[n, k / group_size, idx[n, k]].
    x is (B, K) fp16 row-major, y is (B, N) fp16 row-major (v3 takes int8 x plus one float scale per row).

The kernels (each entry point exists for b = 2, 3, 4: lut_gemv_v1_b2, ..., lut_dequant_b4; v4 for b = 2 only):
    v1       one thread per output (n, batch row): look the centroid up, multiply-add. Naive.
    v2       one warp per row, split-K: lanes read consecutive 32-bit words (coalesced), look centroids up
             in a per-thread column of a shared-memory table (each thread its own bank), activations
             staged in shared memory, warp-shuffle reduction.
    v3       multiplication-free: int8 activations are added into 2^b integer buckets by index, then
             y = s_x * sum_j C[n, g, j] * S[n, g, j]: 2^b multiplies per row-group instead of K.
    v4       2-bit, for batch 1: centroids looked up two at a time in registers with the byte-permute
             instruction, half2 multiply-adds, 128-bit index loads, activations shared by 4 rows per warp:
             2.0 instructions per weight where v2 needs 21.7. Where shapes allow (lcd.v4_supports).
    dequant  packed + codebook -> dense fp16 W (N, K), for batch > 1: a GEMV-style LUT kernel reads the
             indices once per batch row chunk and its arithmetic grows with the batch, so past a handful of
             rows an fp16 matmul (tensor cores) on the dequantized weight wins. lcd.py falls back to it.
v2 and v3 take at most MAX_BATCH activation rows per launch; lcd.py splits bigger batches.

Outliers, the smoothing scale (in_scale), the bias and activation quantization (a_bits) are applied in
Python around these kernels (lcd_kernels.py): the kernels only do the LUT product.

How it is used:
    lcd.py reads this file and compiles it with NVRTC at first use:
        module = cupy.RawModule(code=open("kernels.cu").read(), options=("-std=c++17",))
        module.get_function("lut_gemv_v2_b2")((grid,), (block,), (args...))
    The tests compile the same file, unchanged, for the CPU: tests/cuda_emulation.h maps the CUDA
    built-ins to C++ and OpenMP (a block is an OpenMP team, __syncthreads() a barrier):
        g++ -O1 -fopenmp -shared -fPIC -include tests/cuda_emulation.h -x c++ kernels.cu ...
    Check registers, spills and shared memory per kernel (tests/test_kernels.py does this too):
        nvcc -cubin -arch=sm_90 -Xptxas -v kernels.cu -o /dev/null

Rules this file keeps: plain CUDA C that NVRTC compiles (no host code, no C++ standard headers), fp32
accumulation, and no thread ever returns before a __syncthreads() or a warp shuffle that others wait on.
*/

#ifndef LCD_CPU_EMULATION
#include <cuda_fp16.h>   // __half, __half2float, __float2half (NVRTC and CuPy ship this header)
#endif

#define WARP_SIZE 32
#define MAX_BATCH 8          // v2/v3: activation rows per launch (lcd.py splits bigger batches)
#define V1_THREADS 128       // v1: outputs per block
#define WARPS_PER_BLOCK 8    // v2/v3: one warp per row, 8 rows per block
#define ROW_THREADS (WARPS_PER_BLOCK * WARP_SIZE)
#define DEQUANT_THREADS 256  // dequant: packed words per block
#define NO_BOUNDARY 0x7fffffff
#define V4_WARPS_PER_BLOCK 4  // v4: warps per block
#define V4_ROWS_PER_WARP 4    // v4: rows a warp computes together, sharing each activation load
#define V4_THREADS (V4_WARPS_PER_BLOCK * WARP_SIZE)
#define V4_MIN_BLOCKS 4       // v4: blocks per SM ptxas must fit (it then keeps everything in registers)
#define V4_COLUMNS 64         // v4: columns per 128-bit load of 2-bit indices (4 words x 16)

// compile-time facts of the packed format for b bits
template <int BITS>
struct Packing {
    static constexpr int ENTRIES = 32 / BITS;          // indices per 32-bit word: 16, 10, 8
    static constexpr int CENTROIDS = 1 << BITS;        // codebook size: 4, 8, 16
    static constexpr unsigned int MASK = (1u << BITS) - 1u;
};

// index number e (0 = lowest bits) of a packed word
template <int BITS>
__device__ __forceinline__ int unpack_entry(unsigned int word, int e) {
    return (int)((word >> (e * BITS)) & Packing<BITS>::MASK);
}

// first column of the group after group g (NO_BOUNDARY for the last group: nothing follows it)
__device__ __forceinline__ int group_end(int g, int G, int group_size) {
    return g == G - 1 ? NO_BOUNDARY : (g + 1) * group_size;
}

// sum of a float over the 32 lanes of a warp: every lane ends up with the total (butterfly)
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// ----------------------------------------------------------------------------------------------------
// v1: one thread per output (n, batch row); grid (ceil(N / V1_THREADS), B). Idea: the obvious loop.
// Neighbouring threads read different rows, so no load is coalesced and every centroid is fetched from
// global memory (the L1 cache saves it). Any batch size (one grid row per batch row).

template <int BITS>
__device__ void lut_gemv_v1(const unsigned int* __restrict__ packed, const __half* __restrict__ codebook,
                            const __half* __restrict__ x, __half* __restrict__ y,
                            int N, int K, int group_size) {
    const int E = Packing<BITS>::ENTRIES, C = Packing<BITS>::CENTROIDS;
    int n = blockIdx.x * blockDim.x + threadIdx.x;   // output feature
    int b = blockIdx.y;                              // batch row
    if (n >= N) { return; }                          // fine here: v1 never synchronizes
    int n_words = (K + E - 1) / E;
    int G = (K + group_size - 1) / group_size;
    const unsigned int* row = packed + (long long)n * n_words;   // (n_words,)
    const __half* row_codebook = codebook + (long long)n * G * C; // (G, C)
    const __half* xb = x + (long long)b * K;                      // (K,)
    float acc = 0.0f;
    for (int w = 0; w < n_words; w++) {
        unsigned int word = row[w];
        for (int e = 0; e < E; e++) {
            int k = w * E + e;
            if (k >= K) { break; }
            float weight = __half2float(row_codebook[(k / group_size) * C + unpack_entry<BITS>(word, e)]);
            acc += weight * __half2float(xb[k]);
        }
    }
    y[(long long)b * N + n] = __float2half(acc);
}

// ----------------------------------------------------------------------------------------------------
// v2: one warp per row, split-K; grid (ceil(N / WARPS_PER_BLOCK)), block ROW_THREADS.
// Idea: make every memory access cheap.
//  - packed indices: in each step lane l reads word (w0 + l) of its warp's row, so a warp reads 32
//    consecutive 32-bit words = one 128-byte transaction.
//  - centroids: a lookup table needs a dynamic index, and registers cannot be indexed dynamically (the
//    compiler would move the array to slow local memory). So each thread gets its own column of a
//    shared-memory table, centroid_s[j][threadIdx.x]: column t lies in bank t % 32 for every j, so the 32
//    lanes' lookups never collide, whatever indices they read. A thread refills its column when it
//    enters a new group (once per row when there is one codebook per row).
//  - activations: the block stages a tile of x (32 words' worth of columns) in shared memory once for all
//    its rows; x_s[b][e][l] holds the e-th column of word l, so lane l reading entry e touches bank
//    (e * 33 + l) % 32: no conflicts (the +1 column is the classic padding against them).
//  - each lane ends with partial sums over its words; a shuffle butterfly adds them across the warp.
// Per element that leaves a shift-and-mask, two shared loads and one FMA: about 4 instructions per
// weight, which at 2 bits may cost more issue slots than the memory system needs (unmeasured here).
// Where to go next if a GPU says so: several rows per warp reusing each x load, 128-bit index loads,
// half2 arithmetic, or v3's adds.

template <int BITS>
__device__ void lut_gemv_v2(const unsigned int* __restrict__ packed, const __half* __restrict__ codebook,
                            const __half* __restrict__ x, __half* __restrict__ y,
                            int N, int K, int B, int group_size) {
    const int E = Packing<BITS>::ENTRIES, C = Packing<BITS>::CENTROIDS;
    const int TILE_K = WARP_SIZE * E;                                   // columns per tile
    __shared__ float centroid_s[Packing<BITS>::CENTROIDS][ROW_THREADS]; // each thread's own codebook
    __shared__ float x_s[MAX_BATCH][Packing<BITS>::ENTRIES][WARP_SIZE + 1];

    int lane = threadIdx.x % WARP_SIZE;
    int n = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / WARP_SIZE;   // this warp's row
    bool row_valid = n < N;   // warps past the last row still help stage x and reach every barrier
    int n_words = (K + E - 1) / E;
    int G = (K + group_size - 1) / group_size;
    const unsigned int* row = packed + (long long)n * n_words;
    const __half* row_codebook = codebook + (long long)n * G * C;

    float acc[MAX_BATCH];
    #pragma unroll
    for (int b = 0; b < MAX_BATCH; b++) { acc[b] = 0.0f; }
    int next_group_start = 0;   // the first column this thread's table does not cover yet

    for (int w0 = 0; w0 < n_words; w0 += WARP_SIZE) {
        // 1. the whole block stages this tile of activations, reading x coalesced
        for (int i = threadIdx.x; i < B * TILE_K; i += ROW_THREADS) {
            int b = i / TILE_K, t = i % TILE_K;
            int k = w0 * E + t;
            x_s[b][t % E][t / E] = k < K ? __half2float(x[(long long)b * K + k]) : 0.0f;
        }
        __syncthreads();
        // 2. every lane decodes one word of its row and multiplies-adds its E entries
        int w = w0 + lane;
        if (row_valid && w < n_words) {
            unsigned int word = row[w];
            int k0 = w * E;
            if (k0 + E <= next_group_start) {
                // fast path: the whole word lies in the group already in this thread's table
                #pragma unroll
                for (int e = 0; e < E; e++) {
                    float weight = centroid_s[unpack_entry<BITS>(word, e)][threadIdx.x];
                    #pragma unroll
                    for (int b = 0; b < MAX_BATCH; b++) {
                        if (b < B) { acc[b] += weight * x_s[b][e][lane]; }
                    }
                }
            } else {
                // slow path: the word enters a new group (at most a few times per row)
                for (int e = 0; e < E; e++) {
                    int k = k0 + e;
                    if (k >= next_group_start) {
                        int g = k / group_size < G ? k / group_size : G - 1;   // padding: any group will do
                        for (int j = 0; j < C; j++) {
                            centroid_s[j][threadIdx.x] = __half2float(row_codebook[g * C + j]);
                        }
                        next_group_start = group_end(g, G, group_size);
                    }
                    float weight = centroid_s[unpack_entry<BITS>(word, e)][threadIdx.x];
                    #pragma unroll
                    for (int b = 0; b < MAX_BATCH; b++) {
                        if (b < B) { acc[b] += weight * x_s[b][e][lane]; }
                    }
                }
            }
        }
        __syncthreads();   // the next tile overwrites x_s
    }
    // 3. split-K reduction: add the 32 lanes' partial sums
    #pragma unroll
    for (int b = 0; b < MAX_BATCH; b++) {
        if (b < B) {
            float total = warp_sum(acc[b]);
            if (row_valid && lane == 0) { y[(long long)b * N + n] = __float2half(total); }
        }
    }
}

// ----------------------------------------------------------------------------------------------------
// v3: multiplication-free; same grid as v2. Idea: with integer activations, sum_k C[idx_k] * x_k =
// sum_j C[j] * (sum of the x_k whose index is j). So each thread adds its int8 activations into 2^b
// integer buckets (a per-thread column of shared memory again, bank = thread) and multiplies only when a
// group ends: 2^b multiplies per thread and group instead of one per weight. The activations arrive
// quantized per token, x[b, k] ~ x_scale[b] * xq[b, k] with xq in [-127, 127]; buckets are int32 (a row
// of 2^31 / 127 columns would be needed to overflow one). Batch rows are processed one after another,
// re-reading the row's indices from cache.

template <int BITS>
__device__ void lut_gemv_v3(const unsigned int* __restrict__ packed, const __half* __restrict__ codebook,
                            const signed char* __restrict__ xq, const float* __restrict__ x_scale,
                            __half* __restrict__ y, int N, int K, int B, int group_size) {
    const int E = Packing<BITS>::ENTRIES, C = Packing<BITS>::CENTROIDS;
    const int TILE_K = WARP_SIZE * E;
    __shared__ int bucket_s[Packing<BITS>::CENTROIDS][ROW_THREADS];   // each thread's own buckets
    __shared__ int xq_s[Packing<BITS>::ENTRIES][WARP_SIZE + 1];        // one tile of one batch row

    int lane = threadIdx.x % WARP_SIZE;
    int n = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / WARP_SIZE;
    bool row_valid = n < N;
    int n_words = (K + E - 1) / E;
    int G = (K + group_size - 1) / group_size;
    const unsigned int* row = packed + (long long)n * n_words;
    const __half* row_codebook = codebook + (long long)n * G * C;

    for (int b = 0; b < B; b++) {
        float acc = 0.0f;
        int group = -1;              // the group the buckets are collecting (-1: none yet)
        int next_group_start = 0;
        for (int j = 0; j < C; j++) { bucket_s[j][threadIdx.x] = 0; }
        for (int w0 = 0; w0 < n_words; w0 += WARP_SIZE) {
            for (int i = threadIdx.x; i < TILE_K; i += ROW_THREADS) {
                int k = w0 * E + i;
                xq_s[i % E][i / E] = k < K ? (int)xq[(long long)b * K + k] : 0;
            }
            __syncthreads();
            int w = w0 + lane;
            if (row_valid && w < n_words) {
                unsigned int word = row[w];
                int k0 = w * E;
                if (k0 + E <= next_group_start) {
                    #pragma unroll
                    for (int e = 0; e < E; e++) {   // the multiplication-free inner loop: one add
                        bucket_s[unpack_entry<BITS>(word, e)][threadIdx.x] += xq_s[e][lane];
                    }
                } else {
                    for (int e = 0; e < E; e++) {
                        int k = k0 + e;
                        if (k >= next_group_start) {
                            // the finished group: 2^b multiplies, then empty buckets for the next one
                            for (int j = 0; j < C; j++) {
                                if (group >= 0) {
                                    acc += __half2float(row_codebook[group * C + j]) * (float)bucket_s[j][threadIdx.x];
                                }
                                bucket_s[j][threadIdx.x] = 0;
                            }
                            group = k / group_size < G ? k / group_size : G - 1;
                            next_group_start = group_end(group, G, group_size);
                        }
                        bucket_s[unpack_entry<BITS>(word, e)][threadIdx.x] += xq_s[e][lane];
                    }
                }
            }
            __syncthreads();
        }
        if (row_valid && group >= 0) {   // the last group's buckets
            for (int j = 0; j < C; j++) {
                acc += __half2float(row_codebook[group * C + j]) * (float)bucket_s[j][threadIdx.x];
            }
        }
        float total = warp_sum(acc);
        if (row_valid && lane == 0) { y[(long long)b * N + n] = __float2half(x_scale[b] * total); }
    }
}

// ----------------------------------------------------------------------------------------------------
// v4: 2-bit, one warp per V4_ROWS_PER_WARP rows; grid (ceil(N / (V4_WARPS_PER_BLOCK * V4_ROWS_PER_WARP)), B),
// block V4_THREADS. Idea: look centroids up in registers, two at a time, with the byte-permute instruction.
// Why v2 cannot reach the roofline at batch 1: at 2 bits a weight is 1/4 byte of DRAM traffic, so an H100
// (3.35 TB/s) streams 13.4e12 weights/s, while it issues about 3.0e13 thread-instructions/s (132 SMs x 4
// schedulers x 32 lanes x ~1.755 GHz): 2.2 instructions per weight at 100 % of the roofline, 2.8 at 80 %,
// everything included. v2's fast path is unrolled for MAX_BATCH batch rows and a predicated-off instruction
// still takes an issue slot: 347 instructions per 16 weights, 21.7 a weight, at any batch up to 8.
//  - lookup: a 2-bit codebook is 4 fp16 = 8 bytes, exactly what PRMT (prmt.b32) selects from. Kept as two
//    registers, low_bytes = the low bytes of c0..c3 and high_bytes = their high bytes, one PRMT with the
//    selector nibbles (i, i + 4, j, j + 4) returns the half2 (c[i], c[j]): two weights per instruction, no
//    shared memory, no bank conflicts.
//  - selectors: four 2-bit indices, one per byte of t (bits 0-1), become two selectors with one 64-bit
//    multiply-add: t * 0x110011 copies each index into both nibbles of its byte (t * 0x11) and the copy
//    shifted by 16 puts bytes 2-3 into the high word; + 0x4040 in each word sets the "+ 4". No byte carries
//    into another (each is at most 0x33 + 0x33).
//  - arithmetic: __hfma2, two products per instruction, summed in fp16 within one 128-bit load (two chains
//    of 16 products per half), then added to an fp32 sum: fp32 across the row keeps a long K accurate, fp16
//    inside a chunk is what makes it cheap. Worst case 17 * 2^-11 of sum |w x| (tests/test_kernels.py),
//    typically ~1e-4 of it. (An fp16 partial sum overflows past 65504: activations times centroids that
//    large would need v2.)
//  - memory: lane l reads 128-bit loads l, l + 32, ... of each row (4 words = 64 weights; a warp reads 512
//    contiguous bytes), and the 64 activations of those columns once, straight from global memory (x is
//    small and stays in L1), reordered with PRMT into the pairs the selectors produce and reused for all
//    V4_ROWS_PER_WARP rows. No shared memory, no barrier.
// What the compiler makes of it (sm_90, `python bench.py --sass=1`): per word of 16 weights and row, 4 LOP3
// (masks) + 3 IMAD.HI (shifts) + 4 IMAD.WIDE (selectors) + 8 PRMT (lookups) + 8 HFMA2 = 27; the whole loop
// body is 517 instructions for 4 rows x 64 weights per thread = 2.02 per weight (2.21 with groups, where
// the codebooks are reloaded every load), 126 registers, no spills, no shared memory.
// Estimate for 8192 x 8192, batch 1, one codebook per row (unmeasured: no GPU here):
//    bytes  16.9 MB (16.8 MB indices + 64 KB codebooks + x, y)  -> 5.04 us at 3.35 TB/s = the roofline
//    issue  67.1e6 weights x 2.02 = 135.6e6 thread-instructions / (132 x 4 x 32 x 1.755e9 /s) = 4.57 us
//    the 80 % target is 6.30 us (= 6.36x over fp16's 134 MB at the same bandwidth).
// So the instruction stream fits under the memory time with ~10 % to spare at 100 % of the roofline and
// needs ~73 % issue efficiency at 80 %. The integer ALU pipe (half rate, 16 lanes per scheduler) carries
// 239 of the 517 (PRMT, LOP3): 478 pipe cycles per pass, under the 517 issue cycles, which is why the
// shifts are IMAD.HI. With 16 warps per SM (4 blocks of 4 warps, 2 KB of index loads in flight per warp,
// 32 KB per SM against ~17 KB that Little's law asks at 3.35 TB/s and ~700 ns) my estimate is 75-90 % of
// the roofline, i.e. at or just above the target; a GPU run of bench.py decides. If it falls short, next
// ideas: stage the reordered x in shared memory once per block (-32 PRMT per pass), 8 rows per warp (1.91
// per weight, 158 registers), prefetching the next load's indices.
// Requirements (lut_forward falls back to v2 otherwise): 2 bits; K a multiple of V4_COLUMNS (so rows of
// packed words and of x start 16-byte aligned, and no load reads past x); one codebook per row, or
// group_size a multiple of V4_COLUMNS (a load never straddles two groups). 3 and 4 bits: 8 or 16 centroids
// do not fit one PRMT's 8 bytes, and v2 serves them (at ~22 instructions per weight at batch 1: a v4-style
// kernel for them, e.g. two PRMTs and a select for 4 bits, is the next job). Batch rows are grid rows that
// re-read the indices (from L2): lcd.py uses v4 at batch 1 only.

// a register's 32 bits as a half2 (no instruction: the same register)
__device__ __forceinline__ __half2 bits_as_half2(unsigned int bits) { return *reinterpret_cast<__half2*>(&bits); }

// PTX prmt.b32: byte n of the result is byte (selector nibble n) of the 8 bytes (hi:lo), for n = 0..3.
// __byte_perm is the same instruction but promises to ignore bit 3 of each nibble (prmt's sign-replicate
// flag), so the compiler masks every selector with 0x7777 first: one more instruction per lookup. Our
// selectors never set bit 3, so we ask for prmt directly. (tests/cuda_emulation.h defines prmt for the CPU.)
#ifndef LCD_CPU_EMULATION
__device__ __forceinline__ unsigned int prmt(unsigned int lo, unsigned int hi, unsigned int selector) {
    unsigned int result;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(result) : "r"(lo), "r"(hi), "r"(selector));
    return result;
}
#endif

// the 4 centroids of a codebook (c.x = c0 | c1 << 16, c.y = c2 | c3 << 16, fp16 bit patterns) as two byte
// tables: low_bytes = the low bytes of (c0, c1, c2, c3), high_bytes = their high bytes
struct PairTable { unsigned int low_bytes, high_bytes; };

__device__ __forceinline__ PairTable pair_table(uint2 c) {
    PairTable table;
    table.low_bytes = __byte_perm(c.x, c.y, 0x6420);    // bytes 0, 2, 4, 6 of (c.x, c.y)
    table.high_bytes = __byte_perm(c.x, c.y, 0x7531);   // bytes 1, 3, 5, 7
    return table;
}

// one packed word (16 2-bit indices) times its 16 activations, added into acc. xp holds the activations
// as the pairs the lookups produce: xp[2m] = (x[m], x[m + 4]), xp[2m + 1] = (x[m + 8], x[m + 12]).
__device__ __forceinline__ __half2 dot_word_2bit(unsigned int word, PairTable table, const unsigned int* xp,
                                                 __half2 acc) {
    #pragma unroll
    for (int m = 0; m < 4; m++) {
        // indices m, m + 4, m + 8, m + 12, one a byte. The shift is written as a multiply-high (word >> 2m =
        // hi32(word * 2^(32 - 2m))): the same one instruction, but on the FMA pipe, which has room, instead of
        // the integer ALU pipe that the masks and PRMTs keep busy.
        unsigned int four = (m == 0 ? word : __umulhi(word, 1u << (32 - 2 * m))) & 0x03030303u;
        unsigned long long selectors = (unsigned long long)four * 0x110011ull + 0x0000404000004040ull;
        __half2 low_pair = bits_as_half2(prmt(table.low_bytes, table.high_bytes, (unsigned int)selectors));
        __half2 high_pair = bits_as_half2(prmt(table.low_bytes, table.high_bytes, (unsigned int)(selectors >> 32)));
        acc = __hfma2(low_pair, bits_as_half2(xp[2 * m]), acc);        // (c[i_m], c[i_m+4]) * (x_m, x_m+4)
        acc = __hfma2(high_pair, bits_as_half2(xp[2 * m + 1]), acc);   // (c[i_m+8], c[i_m+12]) * ...
    }
    return acc;
}

// the 16 activations of one word, 8 half2 in column order (X[q] = (x[2q], x[2q + 1])), into the pair order
// of dot_word_2bit: PRMT 0x5410 pairs the low halves of two registers, 0x7632 the high halves
__device__ __forceinline__ void pair_order(const unsigned int* X, unsigned int* xp) {
    #pragma unroll
    for (int m = 0; m < 4; m++) {
        unsigned int halves = (m & 1) ? 0x7632u : 0x5410u;
        xp[2 * m] = __byte_perm(X[m / 2], X[m / 2 + 2], halves);           // (x[m], x[m + 4])
        xp[2 * m + 1] = __byte_perm(X[m / 2 + 4], X[m / 2 + 6], halves);   // (x[m + 8], x[m + 12])
    }
}

// GROUPED: false when the row has one codebook (its two byte tables are then loaded once, before the loop)
template <bool GROUPED>
__device__ void lut_gemv_v4_2bit(const uint4* __restrict__ packed, const uint2* __restrict__ codebook,
                                 const uint4* __restrict__ x, __half* __restrict__ y,
                                 int N, int K, int group_size) {
    const int R = V4_ROWS_PER_WARP;
    int lane = threadIdx.x % WARP_SIZE;
    int first_row = (blockIdx.x * V4_WARPS_PER_BLOCK + threadIdx.x / WARP_SIZE) * R;
    int b = blockIdx.y;                                   // batch row
    int n_loads = K / V4_COLUMNS;                         // 128-bit loads per row
    int G = (K + group_size - 1) / group_size;
    unsigned int loads_per_group = group_size / V4_COLUMNS;
    const uint4* xb = x + (long long)b * n_loads * 8;     // this batch row: 8 uint4 (64 fp16) per load
    const uint4* rows[V4_ROWS_PER_WARP];                  // this warp's rows of packed indices
    const uint2* row_codebooks[V4_ROWS_PER_WARP];         // ... and of codebooks, (G,) each
    PairTable tables[V4_ROWS_PER_WARP];
    float acc[V4_ROWS_PER_WARP];
    #pragma unroll
    for (int r = 0; r < R; r++) {
        int n = first_row + r < N ? first_row + r : N - 1;   // rows past N compute row N-1, unstored
        rows[r] = packed + (long long)n * n_loads;
        row_codebooks[r] = codebook + (long long)n * G;
        if (!GROUPED) { tables[r] = pair_table(__ldg(row_codebooks[r])); }
        acc[r] = 0.0f;
    }

    for (int u = lane; u < n_loads; u += WARP_SIZE) {
        // the rows' indices (and codebooks) first: the loads that wait on DRAM
        uint4 words[V4_ROWS_PER_WARP];
        #pragma unroll
        for (int r = 0; r < R; r++) {
            words[r] = __ldg(rows[r] + u);
            if (GROUPED) { tables[r] = pair_table(__ldg(row_codebooks[r] + (unsigned int)u / loads_per_group)); }
        }
        unsigned int xp[4][8];   // the 64 activations of load u in pair order, 16 per word
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            uint4 lo = __ldg(xb + u * 8 + 2 * i), hi = __ldg(xb + u * 8 + 2 * i + 1);
            unsigned int X[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
            pair_order(X, xp[i]);
        }
        #pragma unroll
        for (int r = 0; r < R; r++) {
            __half2 sum01 = bits_as_half2(0u), sum23 = bits_as_half2(0u);   // two fp16 chains of 16 products
            sum01 = dot_word_2bit(words[r].x, tables[r], xp[0], sum01);
            sum01 = dot_word_2bit(words[r].y, tables[r], xp[1], sum01);
            sum23 = dot_word_2bit(words[r].z, tables[r], xp[2], sum23);
            sum23 = dot_word_2bit(words[r].w, tables[r], xp[3], sum23);
            __half2 sum = __hadd2(sum01, sum23);
            acc[r] += __low2float(sum) + __high2float(sum);
        }
    }
    #pragma unroll
    for (int r = 0; r < R; r++) {
        float total = warp_sum(acc[r]);
        if (lane == 0 && first_row + r < N) { y[(long long)b * N + first_row + r] = __float2half(total); }
    }
}

// ----------------------------------------------------------------------------------------------------
// dequant: one thread per packed word; grid (ceil(N * n_words / DEQUANT_THREADS)). Idea: write the
// dense fp16 weight once, then let an fp16 matmul handle big batches. Centroids are copied bit for bit.

template <int BITS>
__device__ void lut_dequant(const unsigned int* __restrict__ packed, const __half* __restrict__ codebook,
                            __half* __restrict__ W, int N, int K, int group_size) {
    const int E = Packing<BITS>::ENTRIES, C = Packing<BITS>::CENTROIDS;
    int n_words = (K + E - 1) / E;
    int G = (K + group_size - 1) / group_size;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;   // flat word number
    if (i >= (long long)N * n_words) { return; }                      // fine: no synchronization here
    int n = (int)(i / n_words), w = (int)(i % n_words);
    unsigned int word = packed[i];
    for (int e = 0; e < E; e++) {
        int k = w * E + e;
        if (k >= K) { break; }
        W[(long long)n * K + k] = codebook[((long long)n * G + k / group_size) * C + unpack_entry<BITS>(word, e)];
    }
}

// ----------------------------------------------------------------------------------------------------
// entry points: extern "C" keeps the names unmangled for CuPy's get_function (templates cannot be
// extern "C", so each bit width gets a thin wrapper)

extern "C" __global__ void __launch_bounds__(V1_THREADS)
lut_gemv_v1_b2(const unsigned int* packed, const __half* codebook, const __half* x, __half* y, int N, int K, int B, int group_size)
{ lut_gemv_v1<2>(packed, codebook, x, y, N, K, group_size); }
extern "C" __global__ void __launch_bounds__(V1_THREADS)
lut_gemv_v1_b3(const unsigned int* packed, const __half* codebook, const __half* x, __half* y, int N, int K, int B, int group_size)
{ lut_gemv_v1<3>(packed, codebook, x, y, N, K, group_size); }
extern "C" __global__ void __launch_bounds__(V1_THREADS)
lut_gemv_v1_b4(const unsigned int* packed, const __half* codebook, const __half* x, __half* y, int N, int K, int B, int group_size)
{ lut_gemv_v1<4>(packed, codebook, x, y, N, K, group_size); }

extern "C" __global__ void __launch_bounds__(ROW_THREADS)
lut_gemv_v2_b2(const unsigned int* packed, const __half* codebook, const __half* x, __half* y, int N, int K, int B, int group_size)
{ lut_gemv_v2<2>(packed, codebook, x, y, N, K, B, group_size); }
extern "C" __global__ void __launch_bounds__(ROW_THREADS)
lut_gemv_v2_b3(const unsigned int* packed, const __half* codebook, const __half* x, __half* y, int N, int K, int B, int group_size)
{ lut_gemv_v2<3>(packed, codebook, x, y, N, K, B, group_size); }
extern "C" __global__ void __launch_bounds__(ROW_THREADS)
lut_gemv_v2_b4(const unsigned int* packed, const __half* codebook, const __half* x, __half* y, int N, int K, int B, int group_size)
{ lut_gemv_v2<4>(packed, codebook, x, y, N, K, B, group_size); }

extern "C" __global__ void __launch_bounds__(ROW_THREADS)
lut_gemv_v3_b2(const unsigned int* packed, const __half* codebook, const signed char* xq, const float* x_scale, __half* y, int N, int K, int B, int group_size)
{ lut_gemv_v3<2>(packed, codebook, xq, x_scale, y, N, K, B, group_size); }
extern "C" __global__ void __launch_bounds__(ROW_THREADS)
lut_gemv_v3_b3(const unsigned int* packed, const __half* codebook, const signed char* xq, const float* x_scale, __half* y, int N, int K, int B, int group_size)
{ lut_gemv_v3<3>(packed, codebook, xq, x_scale, y, N, K, B, group_size); }
extern "C" __global__ void __launch_bounds__(ROW_THREADS)
lut_gemv_v3_b4(const unsigned int* packed, const __half* codebook, const signed char* xq, const float* x_scale, __half* y, int N, int K, int B, int group_size)
{ lut_gemv_v3<4>(packed, codebook, xq, x_scale, y, N, K, B, group_size); }

extern "C" __global__ void __launch_bounds__(V4_THREADS, V4_MIN_BLOCKS)
lut_gemv_v4_b2(const unsigned int* packed, const __half* codebook, const __half* x, __half* y, int N, int K, int B, int group_size)
{
    const uint4* packed4 = reinterpret_cast<const uint4*>(packed);
    const uint2* codebook4 = reinterpret_cast<const uint2*>(codebook);   // one uint2 = a codebook's 4 fp16
    const uint4* x8 = reinterpret_cast<const uint4*>(x);                 // one uint4 = 8 fp16
    if (group_size >= K) { lut_gemv_v4_2bit<false>(packed4, codebook4, x8, y, N, K, group_size); }
    else { lut_gemv_v4_2bit<true>(packed4, codebook4, x8, y, N, K, group_size); }
}

extern "C" __global__ void __launch_bounds__(DEQUANT_THREADS)
lut_dequant_b2(const unsigned int* packed, const __half* codebook, __half* W, int N, int K, int group_size)
{ lut_dequant<2>(packed, codebook, W, N, K, group_size); }
extern "C" __global__ void __launch_bounds__(DEQUANT_THREADS)
lut_dequant_b3(const unsigned int* packed, const __half* codebook, __half* W, int N, int K, int group_size)
{ lut_dequant<3>(packed, codebook, W, N, K, group_size); }
extern "C" __global__ void __launch_bounds__(DEQUANT_THREADS)
lut_dequant_b4(const unsigned int* packed, const __half* codebook, __half* W, int N, int K, int group_size)
{ lut_dequant<4>(packed, codebook, W, N, K, group_size); }
