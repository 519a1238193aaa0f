// Host shim: compile raw_kernels/*.cu with g++ and run them on the CPU, bit-exactly.
//
// Every CUDA thread of a block runs as a fiber (ucontext); __syncthreads switches back
// to the scheduler, which resumes each thread of the block in turn, so phases separated
// by barriers run exactly as on the device. Warp shuffles (__shfl_xor_sync, full warps
// only) are two such switches: every thread posts its value, then reads its partner's;
// like the device's, they need all 32 lanes of a warp to reach them together. __shared__ variables become function
// statics (blocks run one after another). Arithmetic is IEEE float32 with round to
// nearest even and subnormals kept (MXCSR is set so during a launch); half conversions
// use GCC's _Float16, bfloat16 ones are explicit round-to-nearest-even on the bits.
#pragma once
#define EQ_HOST_SHIM 1

#include <cfenv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>
#include <ucontext.h>
#include <xmmintrin.h>

#ifndef __FLT16_MAX__
#error "host shim needs _Float16 (g++ >= 12 on x86-64)"
#endif

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct __half { unsigned short x; };
struct __nv_bfloat16 { unsigned short x; };

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

// ---- arithmetic and conversions (the device's IEEE round-to-nearest-even semantics) ----
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }  // one rounding
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline long long __double_as_longlong(double d) { long long u; std::memcpy(&u, &d, 8); return u; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }

inline __half f16_bits(_Float16 v) { __half h; std::memcpy(&h.x, &v, 2); return h; }
inline __half __float2half_rn(float f) { return f16_bits((_Float16)f); }
inline __half __double2half(double d) { return f16_bits((_Float16)d); }  // one rounding
inline float __half2float(__half h) { _Float16 v; std::memcpy(&v, &h.x, 2); return (float)v; }
inline float __double2float_rn(double d) { return (float)d; }
inline float __double2float_rz(double d) {  // toward zero: one step back where rounding went outward
    float f = (float)d;
    return std::fabs((double)f) > std::fabs(d) ? std::nextafter(f, 0.0f) : f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    unsigned u = __float_as_uint(f);
    __nv_bfloat16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) b.x = (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
    else b.x = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return b;
}
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((unsigned)b.x << 16); }

// ---- fibers: one per CUDA thread of the running block ----
namespace eqshim {
constexpr size_t STACK = 64 * 1024;
struct Fiber { ucontext_t ctx; std::vector<char> stack; dim3 tid; bool done; };
inline ucontext_t scheduler;
inline Fiber* current = nullptr;
inline std::function<void()> body;

inline void trampoline() { body(); current->done = true; }  // uc_link returns to scheduler

inline void sync() { swapcontext(&current->ctx, &scheduler); }

inline void run_grid(dim3 grid, dim3 block, std::function<void()> f) {
    const unsigned old_csr = _mm_getcsr();
    _mm_setcsr(old_csr & ~0x8040u);  // FTZ and DAZ off: keep subnormals, as -ftz=false
    const int old_round = std::fegetround();
    std::fesetround(FE_TONEAREST);
    body = std::move(f);
    gridDim = grid;
    blockDim = block;
    const unsigned n = block.x * block.y * block.z;
    std::vector<Fiber> fibers(n);
    for (auto& fb : fibers) fb.stack.resize(STACK);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = dim3{bx, by, bz};
                for (unsigned i = 0; i < n; ++i) {
                    Fiber& fb = fibers[i];
                    fb.tid = dim3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
                    fb.done = false;
                    getcontext(&fb.ctx);
                    fb.ctx.uc_stack.ss_sp = fb.stack.data();
                    fb.ctx.uc_stack.ss_size = STACK;
                    fb.ctx.uc_link = &scheduler;
                    makecontext(&fb.ctx, trampoline, 0);
                }
                for (unsigned alive = n; alive;) {  // one round = one phase between barriers
                    for (auto& fb : fibers) {
                        if (fb.done) continue;
                        current = &fb;
                        threadIdx = fb.tid;
                        swapcontext(&scheduler, &fb.ctx);
                        if (fb.done) --alive;
                    }
                }
            }
    current = nullptr;
    std::fesetround(old_round);
    _mm_setcsr(old_csr);
}

// cuLaunchKernel-style: args[i] points at the value of the i-th kernel parameter.
template <class... A, size_t... I>
void call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

template <class... A>
void launch(void (*k)(A...), dim3 grid, dim3 block, void** args) {
    run_grid(grid, block, [=] { call(k, args, std::index_sequence_for<A...>{}); });
}
}  // namespace eqshim

inline void __syncthreads() { eqshim::sync(); }

namespace eqshim {
inline unsigned lanes[1024];  // one 32-bit slot per thread of the block, for shuffles
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    if (mask != 0xffffffffu || blockDim.x % 32 != 0 || blockDim.y * blockDim.z != 1) std::abort();
    const unsigned t = threadIdx.x, src = (t & ~31u) | ((t & 31u) ^ ((unsigned)lane_mask & 31u));
    std::memcpy(&eqshim::lanes[t], &v, 4);
    eqshim::sync();  // every lane has posted its value
    std::memcpy(&v, &eqshim::lanes[src], 4);
    eqshim::sync();  // every lane has read before the next shuffle overwrites the slots
    return v;
}

using std::fmax;
using std::fmaxf;
using std::fmin;
using std::fminf;
using std::rintf;
