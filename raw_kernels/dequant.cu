// eqcore dequantization: packed codes * scales with the CSR outliers written in, one launch.
// The contract and the layout live in eqcore.cuh.
#include "eqcore.cuh"

namespace eq {

// Dequant phase 1 for one 32-code block starting at column c0: 16 bytes of output at a
// time (decode, then one vector store into the shared tile; scalar for a ragged block).
// ONE_SCALE: the whole block lies in group gi (no group boundary to track).
template <int BITS, int GRID, class Out, bool ONE_SCALE>
__device__ __forceinline__ void decode_block(const u32 (&w)[BITS], const float* __restrict__ sr,
                                             const float* __restrict__ zr, const float* cb,
                                             const float* __restrict__ col, int c0, int cols, int group, int gi,
                                             uint4* tile16, Out* tile) {
    constexpr int PER16 = 16 / (int)sizeof(Out);
    const float top = out_max<Out>();
    const bool full = c0 + BLOCK <= cols;
    int next = (gi + 1) * group;
    float s = sr[gi], z = GRID == ASYMMETRIC ? zr[gi] : 0.0f;
#pragma unroll
    for (int k = 0; k < BLOCK; k += PER16) {
        Out v[PER16];
#pragma unroll
        for (int i = 0; i < PER16; ++i) {
            const int c = c0 + k + i;
            if (!ONE_SCALE) {
                if (c < cols && c == next) {
                    ++gi; next += group; s = sr[gi];
                    if constexpr (GRID == ASYMMETRIC) z = zr[gi];
                }
            }
            float p = __fmul_rn(grid_level<BITS, GRID>(get_code<BITS>(w, k + i), z, cb), s);
            if (col != nullptr && c < cols) p = __fmul_rn(p, col[c]);
            v[i] = from_f32<Out>(copysignf(fminf(fabsf(p), top), p));  // = clamp; this form does not spill on sm_80
        }
        if (full) {
            tile16[threadIdx.x * (BLOCK / PER16) + k / PER16] = chunk16<Out>(v);
        } else {
#pragma unroll
            for (int i = 0; i < PER16; ++i)
                if (c0 + k + i < cols) tile[threadIdx.x * BLOCK + k + i] = v[i];
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

// Grid parameters as in encode (the codebook read through the read-only cache: a shared-memory
// copy made ptxas spill for 2-bit half outputs on sm_80); col_scales used when has_col.
template <int BITS, int GRID, class Out, class Idx>
__global__ void __launch_bounds__(DQ_THREADS, dq_min_blocks<Out>())
dequant(const u32* __restrict__ packed, const float* __restrict__ scales, const float* __restrict__ zeros,
        const float* __restrict__ codebook, const float* __restrict__ col_scales, int has_col,
        const int* __restrict__ rowptr, const Idx* __restrict__ ocols, const void* __restrict__ ovals,
        int vtype, Out* __restrict__ out, int rows, int cols, int group, int n_groups) {
    constexpr int PER16 = 16 / (int)sizeof(Out);  // outputs per 16-byte store
    __shared__ uint4 tile16[DQ_TILE * sizeof(Out) / 16];
    Out* tile = reinterpret_cast<Out*>(tile16);
    const int r = blockIdx.x;
    const int tile0 = blockIdx.y * DQ_TILE;
    const int len = imin(DQ_TILE, cols - tile0);
    const int nblk = (cols + BLOCK - 1) / BLOCK;
    const int b = blockIdx.y * DQ_THREADS + threadIdx.x;
    const float* __restrict__ cb = codebook;
    const float* col = has_col ? col_scales : nullptr;

    if (b < nblk) {
        u32 w[BITS];
        load_words<BITS>(packed + ((i64)r * nblk + b) * BITS, w);
        const float* sr = scales + (i64)r * n_groups;
        const float* zr = zeros + (GRID == ASYMMETRIC ? (i64)r * n_groups : 0);
        const int c0 = b * BLOCK, gi = c0 / group;
        if (gi == imin(c0 + BLOCK - 1, cols - 1) / group)  // the usual case: one scale for the block
            decode_block<BITS, GRID, Out, true>(w, sr, zr, cb, col, c0, cols, group, gi, tile16, tile);
        else
            decode_block<BITS, GRID, Out, false>(w, sr, zr, cb, col, c0, cols, group, gi, tile16, tile);
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

}  // namespace eq
