// eqcore codec kernels: encode (float32 + scales -> packed codes), pack, unpack.
// The contract and the layout live in eqcore.cuh.
#include "eqcore.cuh"

namespace eq {

// ---- encode: float32 x (rows, cols) + scales (rows, n_groups) -> packed codes ----
// One thread per (row, 32-code block); element (r, c) uses scales[r, c / group].
template <int BITS>
__global__ void __launch_bounds__(THREADS)
encode(const float* __restrict__ x, const float* __restrict__ scales, u32* __restrict__ out,
       int rows, int cols, int group, int n_groups) {
    constexpr int HALF = qoffset<BITS>();
    const float qmin = (float)(-HALF), qmax = (float)(HALF - 1);
    const int nblk = (cols + BLOCK - 1) / BLOCK;
    const i64 total = (i64)rows * nblk;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const int r = (int)(t / nblk), b = (int)(t - (i64)r * nblk), c0 = b * BLOCK;
        const float* xr = x + (i64)r * cols;
        const float* sr = scales + (i64)r * n_groups;
        int gi = c0 / group, next = (gi + 1) * group;
        float s = sr[gi];
        u32 w[BITS];
#pragma unroll
        for (int k = 0; k < BITS; ++k) w[k] = 0u;
#pragma unroll
        for (int j = 0; j < BLOCK; ++j) {
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
    const int nblk = (cols + BLOCK - 1) / BLOCK;
    const i64 total = (i64)rows * nblk;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const int r = (int)(t / nblk), c0 = (int)(t - (i64)r * nblk) * BLOCK;
        const u8* cr = codes + (i64)r * cols;
        u32 w[BITS];
#pragma unroll
        for (int k = 0; k < BITS; ++k) w[k] = 0u;
#pragma unroll
        for (int j = 0; j < BLOCK; ++j)
            if (c0 + j < cols) put_code<BITS>(w, j, (u32)cr[c0 + j] & ((1u << BITS) - 1u));
        store_words<BITS>(out + t * BITS, w);
    }
}

// ---- unpack: packed words -> unsigned uint8 codes (rows, cols) ----
template <int BITS>
__global__ void __launch_bounds__(THREADS)
unpack(const u32* __restrict__ packed, u8* __restrict__ codes, int rows, int cols) {
    const int nblk = (cols + BLOCK - 1) / BLOCK;
    const i64 total = (i64)rows * nblk;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const int r = (int)(t / nblk), c0 = (int)(t - (i64)r * nblk) * BLOCK;
        u32 w[BITS];
        load_words<BITS>(packed + t * BITS, w);
        u8* cr = codes + (i64)r * cols;
#pragma unroll
        for (int j = 0; j < BLOCK; ++j)
            if (c0 + j < cols) cr[c0 + j] = (u8)get_code<BITS>(w, j);
    }
}

}  // namespace eq
