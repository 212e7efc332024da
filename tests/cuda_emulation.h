// cuda_emulation.h - just enough of CUDA, in C++ and OpenMP, to run kernels.cu on a CPU, unchanged.
//
//     g++ -O1 -fopenmp -std=c++17 -shared -fPIC -include tests/cuda_emulation.h -x c++ kernels.cu ...
//
// The model: one thread block = one OpenMP team of blockDim.x threads; blocks run one after another,
// so a function-local `static` array is exactly the block's __shared__ memory (one copy, seen by the
// whole team). __syncthreads() is an OpenMP barrier. A warp shuffle goes through a shared slot per
// thread between two barriers, which means every thread of the BLOCK must make the same shuffle calls
// (kernels.cu keeps that rule: no thread leaves before a barrier or a shuffle). __half is a 16-bit
// struct converted in software with round-to-nearest-even, like __float2half; __half2 arithmetic (HFMA2,
// HADD2) rounds once from the exact result, and prmt follows the PTX ISA's default mode. This proves the
// kernels' indexing and arithmetic; it measures nothing about GPU speed.
//
// The launcher at the bottom (EMULATE_KERNEL) exports `int launch_<kernel>(grid, block, void** args)`
// for ctypes: args[i] points at the i-th kernel argument, as with cuLaunchKernel.
#pragma once
#define LCD_CPU_EMULATION 1

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <omp.h>

// ---- qualifiers: plain C++ ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static   // one copy per kernel instantiation, shared by the team = the block

// ---- thread and block coordinates: private to each OpenMP thread ----
struct dim3 { unsigned int x, y, z; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
#pragma omp threadprivate(threadIdx, blockIdx, blockDim, gridDim)

// ---- synchronization ----
static inline void __syncthreads() {
    #pragma omp barrier
}

// every thread publishes its value in its slot, the block waits, each reads its partner's slot, and
// the block waits again before the slots can be reused
template <typename T>
static inline T emulated_exchange(T value, int partner) {
    static T slots[1024];   // at most 1024 threads per block, as on a GPU
    slots[threadIdx.x] = value;
    #pragma omp barrier
    T result = slots[partner];
    #pragma omp barrier
    return result;
}

template <typename T>
static inline T __shfl_xor_sync(unsigned int /*mask*/, T value, int lane_mask, int width = 32) {
    int t = (int)threadIdx.x, lane = t % width;
    return emulated_exchange(value, t - lane + (lane ^ lane_mask));
}

template <typename T>
static inline T __shfl_down_sync(unsigned int /*mask*/, T value, unsigned int delta, int width = 32) {
    int t = (int)threadIdx.x, lane = t % width;
    return emulated_exchange(value, lane + (int)delta < width ? t + (int)delta : t);
}

// ---- fp16 ----
struct __half { uint16_t bits; };

static inline float __half2float(__half h) {
    uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
    uint32_t exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
    if (exponent == 0) {   // zero or subnormal: mantissa * 2^-24
        float magnitude = std::ldexp((float)mantissa, -24);
        return sign ? -magnitude : magnitude;
    }
    uint32_t bits = exponent == 31 ? sign | 0x7f800000u | (mantissa << 13)                 // inf / nan
                                   : sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

static inline __half __float2half(float f) {   // round to nearest, ties to even
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) { return __half{(uint16_t)(sign | 0x7e00u)}; }   // nan
    if (magnitude >= 0x477ff000u) { return __half{(uint16_t)(sign | 0x7c00u)}; }  // >= 65520: inf
    if (magnitude < 0x38800000u) {   // below 2^-14: a subnormal half, mantissa = round(|f| * 2^24)
        float scaled = std::fabs(f) * 16777216.0f;   // exact: multiplying by a power of two
        return __half{(uint16_t)(sign | (uint16_t)std::nearbyint(scaled))};   // 1024 becomes 2^-14
    }
    uint32_t half_bits = ((((magnitude >> 23) - 127 + 15) << 10) | ((magnitude >> 13) & 0x3ffu));
    uint32_t dropped = magnitude & 0x1fffu;   // the 13 mantissa bits that do not fit
    if (dropped > 0x1000u || (dropped == 0x1000u && (half_bits & 1u))) { half_bits += 1; }   // may carry
    return __half{(uint16_t)(sign | half_bits)};
}

// ---- half2 (v4): two halves in one 32-bit register, .x in the low 16 bits as on the GPU ----
struct __half2 { __half x, y; };

// long double -> fp16, round to nearest even. HFMA2 and HADD2 round once, from the exact result: a sum of
// two halves, or a product of two halves (22 significant bits) plus a half, spans at most 64 bits where it
// matters, so long double (x86: 64-bit mantissa) holds the exact value and this is the only rounding.
static inline __half half_from_exact(long double v) {
    uint16_t sign = std::signbit(v) ? 0x8000u : 0u;
    long double magnitude = std::fabs(v);
    if (std::isnan(v)) { return __half{(uint16_t)(sign | 0x7e00u)}; }
    if (magnitude >= 65520.0L) { return __half{(uint16_t)(sign | 0x7c00u)}; }          // inf
    if (magnitude < 0x1p-14L) {   // subnormal (or zero): mantissa = round(|v| * 2^24); 1024 becomes 2^-14
        return __half{(uint16_t)(sign | (uint16_t)std::nearbyint(magnitude * 0x1p24L))};
    }
    int exponent;
    long double fraction = std::frexp(magnitude, &exponent);           // |v| = fraction * 2^exponent, [0.5, 1)
    uint32_t mantissa = (uint32_t)std::nearbyint(fraction * 2048.0L);   // 11 bits with the leading one
    if (mantissa == 2048u) { mantissa = 1024u; exponent += 1; }          // rounded up to the next power of two
    uint32_t biased = (uint32_t)(exponent - 1 + 15);
    if (biased >= 31u) { return __half{(uint16_t)(sign | 0x7c00u)}; }
    return __half{(uint16_t)(sign | (biased << 10) | (mantissa - 1024u))};
}

static inline long double exact(__half h) { return (long double)__half2float(h); }

static inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {   // fused: a * b + c, one rounding
    return __half2{half_from_exact(exact(a.x) * exact(b.x) + exact(c.x)),
                   half_from_exact(exact(a.y) * exact(b.y) + exact(c.y))};
}
static inline __half2 __hadd2(__half2 a, __half2 b) {
    return __half2{half_from_exact(exact(a.x) + exact(b.x)), half_from_exact(exact(a.y) + exact(b.y))};
}
static inline float __low2float(__half2 h) { return __half2float(h.x); }
static inline float __high2float(__half2 h) { return __half2float(h.y); }

// ---- vector types, read-only loads and integer intrinsics (v4) ----
struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };
template <typename T>
static inline T __ldg(const T* pointer) { return *pointer; }
static inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned int)(((uint64_t)a * b) >> 32); }

// PTX prmt.b32 (default mode): byte n of the result is byte (nibble n of the selector, bits 0-2) of the 8
// bytes hi:lo; when bit 3 of the nibble is set, that byte's sign bit is replicated instead. Only the low 16
// bits of the selector are read.
static inline unsigned int prmt(unsigned int lo, unsigned int hi, unsigned int selector) {
    uint64_t bytes = ((uint64_t)hi << 32) | lo;
    unsigned int result = 0;
    for (int n = 0; n < 4; n++) {
        unsigned int nibble = (selector >> (4 * n)) & 0xfu;
        unsigned int byte = (unsigned int)(bytes >> (8 * (nibble & 7u))) & 0xffu;
        if (nibble & 8u) { byte = (byte & 0x80u) ? 0xffu : 0u; }
        result |= byte << (8 * n);
    }
    return result;
}
// CUDA's __byte_perm: prmt with bit 3 of each nibble ignored
static inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) { return prmt(x, y, s & 0x7777u); }

// ---- the launcher ----
template <typename... Args, size_t... I>
static void emulated_call(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(args[I])...);
}

// runs the grid block by block, each block as one team; returns 0, or -1 for a bad launch shape,
// -2 when OpenMP would not give the block its full number of threads
template <typename... Args>
static int emulated_launch(void (*kernel)(Args...), dim3 grid, dim3 block, int n_args, void** args) {
    if (n_args != (int)sizeof...(Args)) { return -1; }
    if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024 || block.x % 32 != 0) { return -1; }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) { return -1; }
    int threads = (int)block.x, status = 0;
    omp_set_dynamic(0);
    #pragma omp parallel num_threads(threads)
    {
        if (omp_get_num_threads() == threads) {
            threadIdx = dim3{(unsigned int)omp_get_thread_num(), 0, 0};
            blockDim = block;
            gridDim = grid;
            for (unsigned int z = 0; z < grid.z; z++) {
                for (unsigned int y = 0; y < grid.y; y++) {
                    for (unsigned int x = 0; x < grid.x; x++) {
                        blockIdx = dim3{x, y, z};
                        emulated_call(kernel, args, std::index_sequence_for<Args...>{});
                        #pragma omp barrier   // the next block reuses the same "shared memory"
                    }
                }
            }
        } else {
            #pragma omp single
            status = -2;
        }
    }
    return status;
}

#define EMULATE_KERNEL(name)                                                                        \
    extern "C" int launch_##name(unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx, \
                                 int n_args, void** args) {                                         \
        return emulated_launch(name, dim3{gx, gy, gz}, dim3{bx, 1, 1}, n_args, args);               \
    }

// fp16 conversions and arithmetic, exported so the tests can check them against torch
extern "C" uint16_t emulated_float2half_bits(float f) { return __float2half(f).bits; }
extern "C" uint32_t emulated_hfma2_bits(uint32_t a, uint32_t b, uint32_t c) {
    __half2 r = __hfma2(__half2{{(uint16_t)a}, {(uint16_t)(a >> 16)}}, __half2{{(uint16_t)b}, {(uint16_t)(b >> 16)}},
                        __half2{{(uint16_t)c}, {(uint16_t)(c >> 16)}});
    return (uint32_t)r.x.bits | ((uint32_t)r.y.bits << 16);
}
extern "C" uint32_t emulated_prmt(uint32_t lo, uint32_t hi, uint32_t selector) { return prmt(lo, hi, selector); }
extern "C" float emulated_half_bits2float(uint16_t h) { return __half2float(__half{h}); }
