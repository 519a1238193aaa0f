// eqcore CUDA kernels: encode, pack, unpack, dequant (+ fused outlier scatter), scatter.
//
// Layout contract (eqcore/packing.py): per row, codes padded with 0 to a multiple of
// 32; each block of 32 codes is exactly BITS uint32 words; code j of a block takes
// bits [j*BITS, (j+1)*BITS) of the block's little-endian bit stream.
// Rounding contract: q = clamp(rint_half_even(x / s)) with an IEEE float32 quotient;
// dequant = float32(q) * s (IEEE float32 product), clamped to the output type's finite
// range, rounded to nearest even into the output type, outliers written last. Compile WITHOUT fast-math and with -ftz=false
// (eqcore/kernels.py does; CuPy's own compile path forces -ftz=true, so it is not used).
//
// Kernels are templates, instantiated by NVRTC name expressions (eqcore/kernels.py),
// e.g. "eq::dequant<4, __half, unsigned short>". The same file compiles on the host
// with g++ through tests/host_shim.h (EQ_HOST_SHIM), which runs every CUDA thread as a
// fiber so that __syncthreads keeps its meaning; tests/test_raw_kernels_host.py checks
// the result bit for bit against the NumPy reference.
#ifndef EQ_HOST_SHIM
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

namespace eq {

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

constexpr int THREADS = 256;          // threads per block: encode, pack, unpack
constexpr int DQ_THREADS = 128;       // threads per block: dequant (one 32-code block each)
constexpr int DQ_TILE = DQ_THREADS * 32;  // codes of one row per dequant block
constexpr int SC_THREADS = 128;       // threads per block: scatter_outliers (one row per block)

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

// float64 outlier values: direct single rounding to f16 / f32 (as NumPy); to bf16 via
// float32 (as ml_dtypes, whose float64 -> bfloat16 cast rounds twice).
template <class T> __device__ __forceinline__ T from_f64(double v);
template <> __device__ __forceinline__ __half from_f64<__half>(double v) { return __double2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f64<__nv_bfloat16>(double v) {
    return __float2bfloat16_rn(__double2float_rn(v));
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

// ---- the bit layout of one 32-code block (j is a compile-time constant once unrolled) ----
template <int BITS>
__device__ __forceinline__ u32 get_code(const u32 (&w)[BITS], int j) {
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

// ---- encode: float32 x (rows, cols) + scales (rows, n_groups) -> packed codes ----
// One thread per (row, 32-code block); element (r, c) uses scales[r, c / group].
template <int BITS>
__global__ void __launch_bounds__(THREADS)
encode(const float* __restrict__ x, const float* __restrict__ scales, u32* __restrict__ out,
       int rows, int cols, int group, int n_groups) {
    constexpr int HALF = 1 << (BITS - 1);
    const float qmin = (float)(-HALF), qmax = (float)(HALF - 1);
    const int nblk = (cols + 31) >> 5;
    const i64 total = (i64)rows * nblk;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const int r = (int)(t / nblk), b = (int)(t - (i64)r * nblk), c0 = b * 32;
        const float* xr = x + (i64)r * cols;
        const float* sr = scales + (i64)r * n_groups;
        int gi = c0 / group, next = (gi + 1) * group;
        float s = sr[gi];
        u32 w[BITS];
#pragma unroll
        for (int k = 0; k < BITS; ++k) w[k] = 0u;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            const int c = c0 + j;
            if (c < cols) {
                if (c == next) { ++gi; next += group; s = sr[gi]; }
                const float q = fminf(fmaxf(rintf(__fdiv_rn(xr[c], s)), qmin), qmax);
                put_code<BITS>(w, j, (u32)((int)q + HALF));
            }
        }
        store_words<BITS>(out + t * BITS, w);
    }
}

// ---- pack: unsigned uint8 codes (rows, cols) -> packed words (codes masked to BITS) ----
template <int BITS>
__global__ void __launch_bounds__(THREADS)
pack(const u8* __restrict__ codes, u32* __restrict__ out, int rows, int cols) {
    const int nblk = (cols + 31) >> 5;
    const i64 total = (i64)rows * nblk;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const int r = (int)(t / nblk), c0 = (int)(t - (i64)r * nblk) * 32;
        const u8* cr = codes + (i64)r * cols;
        u32 w[BITS];
#pragma unroll
        for (int k = 0; k < BITS; ++k) w[k] = 0u;
#pragma unroll
        for (int j = 0; j < 32; ++j)
            if (c0 + j < cols) put_code<BITS>(w, j, (u32)cr[c0 + j] & ((1u << BITS) - 1u));
        store_words<BITS>(out + t * BITS, w);
    }
}

// ---- unpack: packed words -> unsigned uint8 codes (rows, cols) ----
template <int BITS>
__global__ void __launch_bounds__(THREADS)
unpack(const u32* __restrict__ packed, u8* __restrict__ codes, int rows, int cols) {
    const int nblk = (cols + 31) >> 5;
    const i64 total = (i64)rows * nblk;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const int r = (int)(t / nblk), c0 = (int)(t - (i64)r * nblk) * 32;
        u32 w[BITS];
        load_words<BITS>(packed + t * BITS, w);
        u8* cr = codes + (i64)r * cols;
#pragma unroll
        for (int j = 0; j < 32; ++j)
            if (c0 + j < cols) cr[c0 + j] = (u8)get_code<BITS>(w, j);
    }
}

// Dequant phase 1 for one 32-code block starting at column c0: 16 bytes of output at a
// time (decode, then one vector store into the shared tile; scalar for a ragged block).
// ONE_SCALE: the whole block lies in group gi (no group boundary to track).
template <int BITS, class Out, bool ONE_SCALE>
__device__ __forceinline__ void decode_block(const u32 (&w)[BITS], const float* __restrict__ sr, int c0,
                                             int cols, int group, int gi, uint4* tile16, Out* tile) {
    constexpr int HALF = 1 << (BITS - 1);
    constexpr int PER16 = 16 / (int)sizeof(Out);
    const float top = out_max<Out>();
    const bool full = c0 + 32 <= cols;
    int next = (gi + 1) * group;
    float s = sr[gi];
#pragma unroll
    for (int k = 0; k < 32; k += PER16) {
        Out v[PER16];
#pragma unroll
        for (int i = 0; i < PER16; ++i) {
            if (!ONE_SCALE) {
                const int c = c0 + k + i;
                if (c < cols && c == next) { ++gi; next += group; s = sr[gi]; }
            }
            const float p = __fmul_rn((float)((int)get_code<BITS>(w, k + i) - HALF), s);
            v[i] = from_f32<Out>(copysignf(fminf(fabsf(p), top), p));  // = clamp; this form does not spill on sm_80
        }
        if (full) {
            tile16[threadIdx.x * (32 / PER16) + k / PER16] = chunk16<Out>(v);
        } else {
#pragma unroll
            for (int i = 0; i < PER16; ++i)
                if (c0 + k + i < cols) tile[threadIdx.x * 32 + k + i] = v[i];
        }
    }
}

// ---- dequant with the outlier scatter fused: grid (rows, ceil(cols / DQ_TILE)) ----
// Phase 1: each thread decodes one 32-code block (vector loads) into a shared tile.
// Phase 2: the block writes the outliers of its row that fall in the tile (CSR).
// Phase 3: the tile goes to global memory once, with 16-byte stores when aligned.
// Min blocks per SM for __launch_bounds__: 0 (unspecified) except for float64 output,
// where sm_90 ptxas otherwise caps registers at 80 and spills.
template <class Out> __device__ constexpr int dq_min_blocks() { return sizeof(Out) == 8 ? 4 : 0; }

template <int BITS, class Out, class Idx>
__global__ void __launch_bounds__(DQ_THREADS, dq_min_blocks<Out>())
dequant(const u32* __restrict__ packed, const float* __restrict__ scales,
        const int* __restrict__ rowptr, const Idx* __restrict__ ocols, const void* __restrict__ ovals,
        int vtype, Out* __restrict__ out, int rows, int cols, int group, int n_groups) {
    constexpr int PER16 = 16 / (int)sizeof(Out);  // outputs per 16-byte store
    __shared__ uint4 tile16[DQ_TILE * sizeof(Out) / 16];
    Out* tile = reinterpret_cast<Out*>(tile16);
    const int r = blockIdx.x;
    const int tile0 = blockIdx.y * DQ_TILE;
    const int len = imin(DQ_TILE, cols - tile0);
    const int nblk = (cols + 31) >> 5;
    const int b = blockIdx.y * DQ_THREADS + threadIdx.x;

    if (b < nblk) {
        u32 w[BITS];
        load_words<BITS>(packed + ((i64)r * nblk + b) * BITS, w);
        const float* sr = scales + (i64)r * n_groups;
        const int c0 = b * 32, gi = c0 / group;
        if (gi == imin(c0 + 31, cols - 1) / group)  // the usual case: one scale for the block
            decode_block<BITS, Out, true>(w, sr, c0, cols, group, gi, tile16, tile);
        else
            decode_block<BITS, Out, false>(w, sr, c0, cols, group, gi, tile16, tile);
    }
    __syncthreads();

    const int beg = rowptr[r], end = rowptr[r + 1];
    for (int i = beg + (int)threadIdx.x; i < end; i += DQ_THREADS) {
        const int c = (int)ocols[i] - tile0;
        if (c >= 0 && c < len) tile[c] = load_val<Out>(ovals, vtype, i);
    }
    __syncthreads();

    Out* dst = out + (i64)r * cols + tile0;
    int done = 0;
    if (aligned(dst, 16)) {
        const int nvec = len / PER16;
        for (int i = threadIdx.x; i < nvec; i += DQ_THREADS)
            reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(tile)[i];
        done = nvec * PER16;
    }
    for (int i = done + (int)threadIdx.x; i < len; i += DQ_THREADS) dst[i] = tile[i];
}

// ---- scatter_outliers: write CSR outliers into a dense (rows, cols) matrix in place ----
template <class Out, class Idx>
__global__ void __launch_bounds__(SC_THREADS)
scatter_outliers(const int* __restrict__ rowptr, const Idx* __restrict__ ocols,
                 const void* __restrict__ ovals, int vtype, Out* __restrict__ out, int rows, int cols) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        Out* dst = out + (i64)r * cols;
        for (int i = rowptr[r] + (int)threadIdx.x; i < rowptr[r + 1]; i += SC_THREADS)
            dst[(int)ocols[i]] = load_val<Out>(ovals, vtype, i);
    }
}

}  // namespace eq
