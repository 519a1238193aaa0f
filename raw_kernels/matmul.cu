// eqcore quantized matmul: y = x @ W^T (float32) from the packed codes, the CSR outliers fused in.
// The contract and the layout live in eqcore.cuh; the specification is eqcore.backends.numpy.matmul
// (x @ dequantize(W, float32).T), which this equals up to float32 summation order.
#include "eqcore.cuh"

#if !defined(EQ_GV_WARPS) || !defined(EQ_GV_ROWS)
#error "compile through eqcore.backends.nvrtc: it passes the GEMV geometry as -D defines"
#endif

namespace eq {

constexpr int GV_WARPS = EQ_GV_WARPS;          // most warps per block; the launch picks 1..GV_WARPS
constexpr int GV_ROWS = EQ_GV_ROWS;            // output rows per block (each x value read serves them all)
constexpr int GV_THREADS = 32 * GV_WARPS;

// Packed words are read in units of whole blocks that are whole 16-byte vectors: 1 block (BITS 4, 8),
// 2 (BITS 2), 4 (BITS 3: 12 words, three uint4).
template <int BITS> __device__ constexpr int unit_blocks() { return BITS % 4 == 0 ? 1 : BITS == 2 ? 2 : 4; }

// One unit's WU words: uint4 loads when the unit is whole and 16-byte aligned, else n words and zeros.
template <int WU>
__device__ __forceinline__ void load_unit(const u32* __restrict__ p, bool vec, int n, u32 (&w)[WU]) {
    if (vec) {
#pragma unroll
        for (int k = 0; k < WU; k += 4) {
            const uint4 v = reinterpret_cast<const uint4*>(p)[k / 4];
            w[k] = v.x; w[k + 1] = v.y; w[k + 2] = v.z; w[k + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int k = 0; k < WU; ++k) w[k] = k < n ? p[k] : 0u;
    }
}

constexpr int GV_STEP = 8;  // codes per step of the fast path: BITS bytes of the bit stream

// x[b, c .. c + GV_STEP) (times the column scales) for the NB batch rows, float4 loads (16-byte
// aligned); rows >= batch read as 0.
template <int NB>
__device__ __forceinline__ void load_x(const float* __restrict__ x, const float* __restrict__ col, int batch,
                                       int cols, int c, float (&xv)[NB][GV_STEP]) {
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
        for (int h = 0; h < GV_STEP; h += 4) {
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (b < batch) v = *reinterpret_cast<const float4*>(x + (i64)b * cols + c + h);
            xv[b][h] = v.x; xv[b][h + 1] = v.y; xv[b][h + 2] = v.z; xv[b][h + 3] = v.w;
        }
    if (col != nullptr) {
#pragma unroll
        for (int h = 0; h < GV_STEP; h += 4) {
            const float4 cv = *reinterpret_cast<const float4*>(col + c + h);
#pragma unroll
            for (int b = 0; b < NB; ++b) {
                xv[b][h] = __fmul_rn(xv[b][h], cv.x); xv[b][h + 1] = __fmul_rn(xv[b][h + 1], cv.y);
                xv[b][h + 2] = __fmul_rn(xv[b][h + 2], cv.z); xv[b][h + 3] = __fmul_rn(xv[b][h + 3], cv.w);
            }
        }
    }
}

// Drop the first GV_STEP codes (GV_STEP * BITS bits) of the bit stream w.
template <int BITS>
__device__ __forceinline__ void shift_step(u32 (&w)[BITS]) {
    constexpr int WSH = GV_STEP * BITS / 32, BSH = GV_STEP * BITS % 32;
#pragma unroll
    for (int m = 0; m < BITS; ++m) {
        const u32 lo = m + WSH < BITS ? w[m + WSH] : 0u, hi = m + WSH + 1 < BITS ? w[m + WSH + 1] : 0u;
        w[m] = BSH ? (lo >> BSH) | (hi << ((32 - BSH) & 31)) : lo;
    }
}

// W[r, c] as dequantize(W, float32) gives it (level * scale, times the column scale) for row words wr,
// scales sr and zero-points zr of row r, c in group gi.
template <int BITS, int GRID>
__device__ __forceinline__ float dense_value(const u32* __restrict__ wr, const float* __restrict__ sr,
                                             const float* __restrict__ zr, const float* cb,
                                             const float* __restrict__ col, int c, int gi) {
    const float z = GRID == ASYMMETRIC ? zr[gi] : 0.0f;
    const float v = __fmul_rn(grid_level<BITS, GRID>(get_code<BITS>(wr, c), z, cb), sr[gi]);
    return col != nullptr ? __fmul_rn(v, col[c]) : v;
}

// The common block (whole, in one group, x 16-byte aligned): acc[i][b] += scale * sum over its 32
// columns of level * x[b, c] (times col[c]), for the GV_ROWS rows; w[i] starts with the block's words.
template <int BITS, int GRID, int NB, int WU>
__device__ __forceinline__ void block_fast(const u32 (&w)[GV_ROWS][WU], const float* __restrict__ x,
                                           const float* __restrict__ col, int batch, int cols, int c0, int gi,
                                           const float* const (&sr)[GV_ROWS], const float* const (&zr)[GV_ROWS],
                                           const float* cb, float (&acc)[GV_ROWS][NB]) {
    float z[GV_ROWS], t[GV_ROWS][NB];
    u32 wb[GV_ROWS][BITS];
#pragma unroll
    for (int i = 0; i < GV_ROWS; ++i) {
        z[i] = GRID == ASYMMETRIC ? zr[i][gi] : 0.0f;
#pragma unroll
        for (int m = 0; m < BITS; ++m) wb[i][m] = w[i][m];
#pragma unroll
        for (int b = 0; b < NB; ++b) t[i][b] = 0.0f;
    }
#pragma unroll 1
    for (int q = 0; q < BLOCK; q += GV_STEP) {
        float xv[NB][GV_STEP];
        load_x<NB>(x, col, batch, cols, c0 + q, xv);
#pragma unroll
        for (int i = 0; i < GV_ROWS; ++i) {
#pragma unroll
            for (int j = 0; j < GV_STEP; ++j) {
                const float lv = grid_level<BITS, GRID>(get_code<BITS>(wb[i], j), z[i], cb);
#pragma unroll
                for (int b = 0; b < NB; ++b) t[i][b] = __fmaf_rn(lv, xv[b][j], t[i][b]);
            }
            shift_step<BITS>(wb[i]);
        }
    }
#pragma unroll
    for (int i = 0; i < GV_ROWS; ++i) {
        const float s = sr[i][gi];
#pragma unroll
        for (int b = 0; b < NB; ++b) acc[i][b] = __fmaf_rn(t[i][b], s, acc[i][b]);
    }
}

// Any other block (ragged, crossing group boundaries, or x unaligned), column by column:
// acc[i][b] += W[r, c] * x[b, c], the codes read again from the rows' words (L1 hits).
template <int BITS, int GRID, int NB>
__device__ __forceinline__ void block_any(const u32* const (&wr)[GV_ROWS], const float* __restrict__ x,
                                       const float* __restrict__ col, int batch, int cols, int c0, int group,
                                       const float* const (&sr)[GV_ROWS], const float* const (&zr)[GV_ROWS],
                                       const float* cb, float (&acc)[GV_ROWS][NB]) {
    const int end = imin(c0 + BLOCK, cols);
    int gi = c0 / group, next = (gi + 1) * group;
#pragma unroll 1
    for (int c = c0; c < end; ++c) {
        if (c == next) { ++gi; next += group; }
        float xv[NB];
#pragma unroll
        for (int b = 0; b < NB; ++b) xv[b] = b < batch ? x[(i64)b * cols + c] : 0.0f;
#pragma unroll
        for (int i = 0; i < GV_ROWS; ++i) {
            const float v = dense_value<BITS, GRID>(wr[i], sr[i], zr[i], cb, col, c, gi);
#pragma unroll
            for (int b = 0; b < NB; ++b) acc[i][b] = __fmaf_rn(v, xv[b], acc[i][b]);
        }
    }
}

// ---- GEMV for small batches: grid ceil(rows / GV_ROWS), block 32 * nw threads, 1 <= nw <= GV_WARPS ----
// x (batch, cols) float32 with batch <= NB, y (batch, rows) float32. A block computes GV_ROWS output
// rows, its nw warps splitting the columns: thread t takes units t, t + 32 * nw, ... of the rows'
// packed words (vector loads), sums level * x over each block and multiplies the sum by the block's
// group scale once (blocks that are ragged, cross a group boundary or meet an unaligned x go column by
// column), then adds its share of the rows' outliers, (exact value - dense value at that position) * x.
// Each warp reduces by shuffles, and the warps' sums are added in warp order through shared memory
// (deterministic). Grid parameters as in dequant (the codebook copied to shared memory);
// itype: outlier columns are 0 uint16, 1 int32; vtype as load_val.
template <int BITS, int GRID, int NB>
__global__ void __launch_bounds__(GV_THREADS, 1)  // min 1 block: without it ptxas spills at 80 / 128 registers
gemv(const float* __restrict__ x, int batch, const u32* __restrict__ packed, const float* __restrict__ scales,
     const float* __restrict__ zeros, const float* __restrict__ codebook, const float* __restrict__ col_scales,
     int has_col, const int* __restrict__ rowptr, const void* __restrict__ ocols, int itype,
     const void* __restrict__ ovals, int vtype, float* __restrict__ y, int rows, int cols, int group, int n_groups) {
    constexpr int U = unit_blocks<BITS>(), WU = U * BITS, OUT = GV_ROWS * NB;
    static_assert(OUT <= 32, "one lane holds each output of a warp");
    __shared__ float cb[GRID == CODEBOOK ? (1 << BITS) : 1];
    __shared__ float part[GV_WARPS][OUT];
    const int nthreads = (int)blockDim.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if constexpr (GRID == CODEBOOK) {
        for (int j = threadIdx.x; j < (1 << BITS); j += nthreads) cb[j] = codebook[j];
        __syncthreads();
    }
    const int r0 = blockIdx.x * GV_ROWS;
    if (r0 >= rows) return;  // the whole block
    const int nblk = (cols + BLOCK - 1) / BLOCK, nunit = (nblk + U - 1) / U;
    const float* col = has_col ? col_scales : nullptr;
    const bool xvec = (cols & 3) == 0 && aligned(x, 16) && (col == nullptr || aligned(col, 16));
    const u32* wr[GV_ROWS];
    const float* sr[GV_ROWS];
    const float* zr[GV_ROWS];
    bool wvec = true;
#pragma unroll
    for (int i = 0; i < GV_ROWS; ++i) {  // rows past the end repeat the last row; their sums are dropped
        const int r = imin(r0 + i, rows - 1);
        wr[i] = packed + (i64)r * nblk * BITS;
        sr[i] = scales + (i64)r * n_groups;
        zr[i] = zeros + (GRID == ASYMMETRIC ? (i64)r * n_groups : 0);
        wvec = wvec && aligned(wr[i], 16);
    }
    float acc[GV_ROWS][NB];
#pragma unroll
    for (int i = 0; i < GV_ROWS; ++i)
#pragma unroll
        for (int b = 0; b < NB; ++b) acc[i][b] = 0.0f;

    for (int un = threadIdx.x; un < nunit; un += nthreads) {
        const int b0 = un * U;
        u32 w[GV_ROWS][WU];
#pragma unroll
        for (int i = 0; i < GV_ROWS; ++i)
            load_unit<WU>(wr[i] + (i64)b0 * BITS, wvec && b0 + U <= nblk, (nblk - b0) * BITS, w[i]);
#pragma unroll 1
        for (int k = 0; k < U && b0 + k < nblk; ++k) {  // the unit's blocks; w[i] starts with block k's words
            const int c0 = (b0 + k) * BLOCK, gi = c0 / group;
            if (xvec && c0 + BLOCK <= cols && gi == (c0 + BLOCK - 1) / group)
                block_fast<BITS, GRID, NB>(w, x, col, batch, cols, c0, gi, sr, zr, cb, acc);
            else
                block_any<BITS, GRID, NB>(wr, x, col, batch, cols, c0, group, sr, zr, cb, acc);
#pragma unroll
            for (int i = 0; i < GV_ROWS; ++i)
#pragma unroll
                for (int m = 0; m + BITS < WU; ++m) w[i][m] = w[i][m + BITS];
        }
    }

#pragma unroll
    for (int i = 0; i < GV_ROWS; ++i) {
        if (r0 + i >= rows) break;
        const int end = rowptr[r0 + i + 1];
        for (int p = rowptr[r0 + i] + threadIdx.x; p < end; p += nthreads) {
            const int c = itype ? static_cast<const int*>(ocols)[p] : (int)static_cast<const u16*>(ocols)[p];
            const float d = __fsub_rn(load_val<float>(ovals, vtype, p),
                                      dense_value<BITS, GRID>(wr[i], sr[i], zr[i], cb, col, c, c / group));
#pragma unroll
            for (int b = 0; b < NB; ++b)
                if (b < batch) acc[i][b] = __fmaf_rn(d, x[(i64)b * cols + c], acc[i][b]);
        }
    }

#pragma unroll
    for (int i = 0; i < GV_ROWS; ++i)
#pragma unroll
        for (int b = 0; b < NB; ++b) {
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) acc[i][b] = __fadd_rn(acc[i][b], __shfl_xor_sync(0xffffffffu, acc[i][b], off));
            if (lane == i * NB + b) part[warp][lane] = acc[i][b];
        }
    __syncthreads();
    if (threadIdx.x < OUT) {
        const int i = threadIdx.x / NB, b = threadIdx.x % NB;
        float s = part[0][threadIdx.x];
        for (int v = 1; v < nthreads / 32; ++v) s = __fadd_rn(s, part[v][threadIdx.x]);
        if (r0 + i < rows && b < batch) y[(i64)b * rows + r0 + i] = s;
    }
}

}  // namespace eq
