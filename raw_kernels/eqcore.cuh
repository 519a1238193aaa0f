// eqcore's CUDA contract, shared by every kernel file: types, conversions, the packing layout.
//
// Layout (eqcore/layout.py, eqcore/backends/numpy.py): per row, codes padded with 0 to a
// multiple of EQ_BLOCK (32); each block of 32 codes is exactly BITS uint32 words; code j of a
// block takes bits [j*BITS, (j+1)*BITS) of the block's little-endian bit stream.
// Grids (template parameter GRID, eqcore.layout.GRIDS): a code u stands for the level
//   0 symmetric   u - 2^(k-1)                  code u = clamp(rint(t), qmin, qmax) - qmin
//   1 asymmetric  u - z (float32 difference)   code u = clamp(rint(t + z), 0, 2^k - 1)
//   2 codebook    cb[u]                        code u = #{j : mid_j < t}, mid_j = (cb[j] + cb[j+1]) / 2
// with t = y / s an IEEE float32 quotient, rint half to even, z and s the group's zero-point and
// scale, y = x or, with column scales, the float32 quotient x / col[c]. dequant = level * s (IEEE
// float32 product), times col[c] if there are column scales, clamped to the output type's
// finite range, rounded to nearest even into the output type, outliers (clamped the same way)
// written last. Compile
// WITHOUT fast-math and with -ftz=false (eqcore/backends/nvrtc.py does; CuPy's own compile path
// forces -ftz=true, so it is not used).
//
// The contract's constants and the launch geometry come from Python as -D defines
// (eqcore.layout.cuda_defines, eqcore.backends.launch.cuda_defines), never from literals here.
// Kernels are templates, instantiated by NVRTC name expressions (eqcore/backends/launch.py),
// e.g. "eq::dequant<4, __half, unsigned short>". The same files compile on the host with g++
// through tests/host_shim.h (EQ_HOST_SHIM), which runs every CUDA thread as a fiber so that
// __syncthreads keeps its meaning; tests/test_raw_kernels_host.py checks the results bit for
// bit against the NumPy reference.
#pragma once
#ifndef EQ_HOST_SHIM
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

#if !defined(EQ_BLOCK) || !defined(EQ_THREADS) || !defined(EQ_DQ_THREADS)
#error "compile through eqcore.backends.nvrtc: it passes the layout and launch geometry as -D defines"
#endif
static_assert(EQ_BLOCK == 32, "a block of 32 k-bit codes is exactly k 32-bit words");

namespace eq {

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

constexpr int BLOCK = EQ_BLOCK;            // codes per packing block
constexpr int THREADS = EQ_THREADS;        // threads per block: encode, pack, unpack
constexpr int DQ_THREADS = EQ_DQ_THREADS;  // threads per block: dequant (one packing block each)
constexpr int DQ_TILE = DQ_THREADS * BLOCK;  // codes of one row per dequant block

// Largest finite value of an output type, capped at float32's (products are float32):
// dequantized values saturate there, so a finite weight never comes back as inf.
template <class T> __device__ __forceinline__ float out_max() { return __uint_as_float(0x7f7fffffu); }
template <> __device__ __forceinline__ float out_max<__half>() { return 65504.0f; }
template <> __device__ __forceinline__ float out_max<__nv_bfloat16>() { return __uint_as_float(0x7f7f0000u); }

// ---- scalar conversions (round to nearest even; exact where the target is wider) ----
template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_f32<double>(float v) { return (double)v; }

// float64 outlier values: one rounding to nearest even, to every dtype (eqcore.dtypes.saturate).
// To bf16 through a float32 rounded to odd (toward zero, then the last bit set where inexact),
// whose 16 spare bits make the second rounding exact (eqcore.dtypes.float64_to_bfloat16).
template <class T> __device__ __forceinline__ T from_f64(double v);
template <> __device__ __forceinline__ __half from_f64<__half>(double v) { return __double2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f64<__nv_bfloat16>(double v) {
    const float f = __double2float_rz(v);
    const unsigned odd = __float_as_uint(f) | ((double)f != v ? 1u : 0u);
    return __float2bfloat16_rn(__uint_as_float(odd));
}
template <> __device__ __forceinline__ float from_f64<float>(double v) { return __double2float_rn(v); }
template <> __device__ __forceinline__ double from_f64<double>(double v) { return v; }

// Outlier value i of a CSR whose value dtype is given at run time (uniform branch):
// 0 float16, 1 bfloat16, 2 float32, 3 float64; clamped to Out's finite range like the codes.
template <class Out>
__device__ __forceinline__ Out load_val(const void* __restrict__ vals, int vtype, i64 i) {
    const float top = out_max<Out>();
    float v;
    switch (vtype) {
        case 0: v = __half2float(static_cast<const __half*>(vals)[i]); break;
        case 1: v = __bfloat162float(static_cast<const __nv_bfloat16*>(vals)[i]); break;
        case 2: v = static_cast<const float*>(vals)[i]; break;
        default: {
            const double d = static_cast<const double*>(vals)[i];
            return from_f64<Out>(fmin(fmax(d, -(double)top), (double)top));
        }
    }
    return from_f32<Out>(fminf(fmaxf(v, -top), top));
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// The signed k-bit grid: q in [-QOFF, QOFF - 1], stored as the unsigned code q + QOFF.
template <int BITS> __device__ __forceinline__ constexpr int qoffset() { return 1 << (BITS - 1); }

// The grids' ids (eqcore.layout.GRIDS).
constexpr int SYMMETRIC = 0, ASYMMETRIC = 1, CODEBOOK = 2;

// Exact float32 of u - off for codes u < 2^23 and 0 <= off <= u_max: 2^23 + u has u in its low
// mantissa bits, and the difference of two floats in [2^23, 2^24) is exact. One FADD instead of an
// integer-to-float conversion (a quarter-rate instruction on sm_80 / sm_90).
__device__ __forceinline__ float code_minus(u32 u, int off) {
    return __fsub_rn(__uint_as_float(0x4B000000u | u), (float)(0x800000 + off));
}

// The float32 level of code u on grid GRID (z: the group's zero-point; cb: the codebook).
template <int BITS, int GRID>
__device__ __forceinline__ float grid_level(u32 u, float z, const float* cb) {
    if constexpr (GRID == CODEBOOK) return cb[u];
    else if constexpr (GRID == ASYMMETRIC) return __fsub_rn(code_minus(u, 0), z);
    else return code_minus(u, qoffset<BITS>());
}

// The unsigned code of float32 quotient t on grid GRID (mids: the codebook's 2^BITS - 1
// midpoints, increasing): the number of midpoints strictly below t.
template <int BITS, int GRID>
__device__ __forceinline__ u32 grid_code(float t, float z, const float* mids) {
    if constexpr (GRID == CODEBOOK) {  // branch-free binary search over 2^BITS - 1 sorted midpoints
        u32 pos = 0;
#pragma unroll 1
        for (u32 step = 1u << (BITS - 1); step > 0; step >>= 1)
            if (mids[pos + step - 1] < t) pos += step;
        return pos;
    } else if constexpr (GRID == ASYMMETRIC) {
        return (u32)fminf(fmaxf(rintf(__fadd_rn(t, z)), 0.0f), (float)((1 << BITS) - 1));
    } else {
        constexpr int HALF = qoffset<BITS>();
        return (u32)((int)fminf(fmaxf(rintf(t), (float)(-HALF)), (float)(HALF - 1)) + HALF);
    }
}

// ---- the bit layout: code j of a row's (or block's) little-endian bit stream of words w, an
// array (j a compile-time constant once unrolled: registers) or a pointer ----
template <int BITS, class Words>
__device__ __forceinline__ u32 get_code(const Words& w, int j) {
    const int bit = j * BITS, wi = bit >> 5, off = bit & 31;
    u32 v = w[wi] >> off;
    if (off + BITS > 32) v |= w[wi + 1] << (32 - off);
    return v & ((1u << BITS) - 1u);
}

template <int BITS>
__device__ __forceinline__ void put_code(u32 (&w)[BITS], int j, u32 u) {
    const int bit = j * BITS, wi = bit >> 5, off = bit & 31;
    w[wi] |= u << off;
    if (off + BITS > 32) w[wi + 1] |= u >> (32 - off);
}

__device__ __forceinline__ bool aligned(const void* p, unsigned n) {
    return (reinterpret_cast<unsigned long long>(p) & (n - 1)) == 0;
}

// Load / store the BITS words of one block; 16-byte (BITS 4, 8) or 8-byte (BITS 2)
// vector accesses when the address allows it (always, for a contiguous CuPy array).
template <int BITS>
__device__ __forceinline__ void load_words(const u32* __restrict__ p, u32 (&w)[BITS]) {
    if constexpr (BITS % 4 == 0) {
        if (aligned(p, 16)) {
#pragma unroll
            for (int k = 0; k < BITS; k += 4) {
                const uint4 v = reinterpret_cast<const uint4*>(p)[k / 4];
                w[k] = v.x; w[k + 1] = v.y; w[k + 2] = v.z; w[k + 3] = v.w;
            }
            return;
        }
    } else if constexpr (BITS == 2) {
        if (aligned(p, 8)) {
            const uint2 v = *reinterpret_cast<const uint2*>(p);
            w[0] = v.x; w[1] = v.y;
            return;
        }
    }
#pragma unroll
    for (int k = 0; k < BITS; ++k) w[k] = p[k];
}

template <int BITS>
__device__ __forceinline__ void store_words(u32* __restrict__ p, const u32 (&w)[BITS]) {
    if constexpr (BITS % 4 == 0) {
        if (aligned(p, 16)) {
#pragma unroll
            for (int k = 0; k < BITS; k += 4) {
                uint4 v;
                v.x = w[k]; v.y = w[k + 1]; v.z = w[k + 2]; v.w = w[k + 3];
                reinterpret_cast<uint4*>(p)[k / 4] = v;
            }
            return;
        }
    } else if constexpr (BITS == 2) {
        if (aligned(p, 8)) {
            uint2 v;
            v.x = w[0]; v.y = w[1];
            *reinterpret_cast<uint2*>(p) = v;
            return;
        }
    }
#pragma unroll
    for (int k = 0; k < BITS; ++k) p[k] = w[k];
}

// Raw bits of an output value, zero-extended, to assemble 16-byte vector stores.
__device__ __forceinline__ unsigned long long raw_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned long long raw_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ unsigned long long raw_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ unsigned long long raw_bits(double v) { return (unsigned long long)__double_as_longlong(v); }

// 16 / sizeof(Out) output values as the 16 bytes of one uint4.
template <class Out>
__device__ __forceinline__ uint4 chunk16(const Out (&v)[16 / sizeof(Out)]) {
    constexpr int N = 8 / (int)sizeof(Out), SH = 8 * (int)sizeof(Out);
    unsigned long long lo = 0, hi = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        lo |= raw_bits(v[i]) << ((SH * i) & 63);
        hi |= raw_bits(v[N + i]) << ((SH * i) & 63);
    }
    uint4 q;
    q.x = (u32)lo; q.y = (u32)(lo >> 32); q.z = (u32)hi; q.w = (u32)(hi >> 32);
    return q;
}

}  // namespace eq
