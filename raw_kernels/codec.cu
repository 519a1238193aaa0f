// eqcore codec kernels: encode (float32 + scales -> packed codes), pack, unpack.
// The contract and the layout live in eqcore.cuh.
#include "eqcore.cuh"

namespace eq {

// ---- encode: float32 x (rows, cols) + grid parameters -> packed codes ----
// One thread per (row, 32-code block); element (r, c) uses scales[r, c / group] (and zeros[r,
// c / group] on the asymmetric grid). With column scales, x is divide_cols' output. The
// codebook's midpoints are computed once per block into shared memory.
template <int BITS, int GRID>
__global__ void __launch_bounds__(THREADS)
encode(const float* __restrict__ x, const float* __restrict__ scales, const float* __restrict__ zeros,
       const float* __restrict__ codebook, u32* __restrict__ out, int rows, int cols, int group, int n_groups) {
    __shared__ float mids[GRID == CODEBOOK ? (1 << BITS) : 1];
    if constexpr (GRID == CODEBOOK) {
        for (int j = threadIdx.x; j < (1 << BITS) - 1; j += blockDim.x)
            mids[j] = __fmul_rn(__fadd_rn(codebook[j], codebook[j + 1]), 0.5f);
        __syncthreads();
    }
    const int nblk = (cols + BLOCK - 1) / BLOCK;
    const i64 total = (i64)rows * nblk;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const int r = (int)(t / nblk), b = (int)(t - (i64)r * nblk), c0 = b * BLOCK;
        const float* xr = x + (i64)r * cols;
        const float* sr = scales + (i64)r * n_groups;
        const float* zr = zeros + (GRID == ASYMMETRIC ? (i64)r * n_groups : 0);
        int gi = c0 / group, next = (gi + 1) * group;
        float s = sr[gi], z = GRID == ASYMMETRIC ? zr[gi] : 0.0f;
        u32 w[BITS];
#pragma unroll
        for (int k = 0; k < BITS; ++k) w[k] = 0u;
#pragma unroll
        for (int j = 0; j < BLOCK; ++j) {
            const int c = c0 + j;
            if (c < cols) {
                if (c == next) {
                    ++gi; next += group; s = sr[gi];
                    if constexpr (GRID == ASYMMETRIC) z = zr[gi];
                }
                put_code<BITS>(w, j, grid_code<BITS, GRID>(__fdiv_rn(xr[c], s), z, mids));
            }
        }
        store_words<BITS>(out + t * BITS, w);
    }
}

// ---- divide_cols: y = x / col[c] (IEEE float32 quotients), the input of encode with column scales ----
__global__ void __launch_bounds__(THREADS)
divide_cols(const float* __restrict__ x, const float* __restrict__ col, float* __restrict__ y, int rows, int cols) {
    const i64 total = (i64)rows * cols;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x)
        y[i] = __fdiv_rn(x[i], col[i % cols]);
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
