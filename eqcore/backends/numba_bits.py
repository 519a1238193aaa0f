"""Bit-level primitives that the Numba kernels share (a leaf module: it imports no other part of
eqcore, so that :mod:`eqcore.backends.numba` and :mod:`eqcore.backends.numba_matmul` can both use it):
float32 <-> float16 / bfloat16 bits with the contract's rounding, and reading codes (one at a time
within words, or across words).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@njit(inline="always")
def f32_to_bf16_bits(f):
    """bfloat16 bits of float32 ``f``, round to nearest even (NaN stays a quiet NaN). In int32
    arithmetic, selects only, so loops of it vectorise 16 lanes wide."""
    i32 = np.int32
    b = np.float32(f).view(np.int32)
    hi = i32(i32(b >> 16) & i32(0xFFFF))
    r = i32(i32(i32(i32(b + i32(0x7FFF)) + i32(hi & i32(1))) >> 16) & i32(0xFFFF))
    r = i32(hi | i32(0x40)) if i32(b & i32(0x7FFFFFFF)) > i32(0x7F800000) else r
    return np.uint16(r)


@intrinsic
def f32_to_f16_bits(typingctx, f):
    """IEEE float16 bits (uint16) of float32 ``f`` by LLVM's own conversion (fptrunc: round to
    nearest even, subnormals, overflow to inf and NaN as IEEE says; one vcvtps2ph per 16 values
    where vectorised). Equal to NumPy's astype(float16) on all 2^32 inputs (checked once, and
    on every rounding boundary in the tests)."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def half_bits_to_f32(typingctx, h):
    """float32 value of IEEE float16 bits ``h`` (uint16) by LLVM's own conversion (fpext: exact;
    one vcvtph2ps per 16 values where vectorised)."""
    if h != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(inline="always")
def code_at(words, c, bits, lg):
    """Code ``c`` (uint32) of a packed row of ``bits`` = 32 >> lg wide codes: bits (c % per) * bits
    of word c >> lg."""
    return (words[c >> lg] >> np.uint32((c & ((1 << lg) - 1)) * bits)) & np.uint32((1 << bits) - 1)


@njit
def unpack_stream(words, bits, out):
    """Codes of width ``bits`` read across words (a code may straddle two)."""
    mask = np.uint64((1 << bits) - 1)
    for c in range(out.shape[0]):
        b = c * bits
        w = b >> 5
        sh = b & 31
        v = np.uint64(words[w]) >> np.uint64(sh)
        if sh + bits > 32:
            v |= np.uint64(words[w + 1]) << np.uint64(32 - sh)
        out[c] = np.uint8(v & mask)
