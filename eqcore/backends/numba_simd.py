"""Explicit-SIMD dot products of packed codes for the batch-1 matmul (LLVM vector IR in a Numba
intrinsic; a leaf module like :mod:`eqcore.backends.numba_bits`).

LLVM's loop vectoriser turns a 16-entry table lookup ``cb[code]`` into gathers (a codebook GEMV
through them ran 5.4 ms for 4096x4096 4-bit, 8x the symmetric grid's). A lookup in a register is
one instruction instead: ``vpermps`` (AVX-512: 16 lanes, 16 entries; AVX2: 8 lanes, two lookups and
a select). LLVM IR has no variable shuffle, so :func:`group_dot` writes the loop in vector IR
itself, for the host's width (:data:`WIDTH`; 0 where neither instruction set is there, and the
matmul then takes its portable kernels).
"""
from __future__ import annotations

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

TABLE = 16  # entries of a register lookup (codes of 2 or 4 bits)
AHEAD = 4  # rows_dot prefetches each row's words this many rows on: the next block's (4096x4096 4-bit at batch 1,
# weights from memory: 0.78-1.0 -> 0.73-0.78 ms; 8 or 16 rows on no better)


def host_width() -> int:
    """float32 lanes of the host's table lookup: 16 with AVX-512F, 8 with AVX2 and FMA, else 0 (also
    when Numba is told to compile for another CPU than this one, NUMBA_CPU_NAME / _FEATURES)."""
    if numba.config.CPU_NAME not in (None, "host") or numba.config.CPU_FEATURES:
        return 0
    features = llvm.get_host_cpu_features()
    if features.get("avx512f"):
        return 16
    return 8 if features.get("avx2") and features.get("fma") else 0


WIDTH = host_width()

_I32, _I64, _F32 = ir.IntType(32), ir.IntType(64), ir.FloatType()


def _declare(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _load(builder, ptr, i, vt):
    """The vector ``vt`` at ptr[i] (element pointer ``ptr``)."""
    return builder.load(builder.bitcast(builder.gep(ptr, [i]), vt.as_pointer()), align=4)


def _sum_lanes(builder, width, vec):
    """The sum of a float32 vector's lanes, in any order."""
    vf = ir.VectorType(_F32, width)
    t = builder.call(_declare(builder, f"llvm.vector.reduce.fadd.v{width}f32", _F32, [_F32, vf]),
                     [ir.Constant(_F32, 0.0), vec])
    t.fastmath.add("reassoc")
    return t


def _vector_groups(builder, width, ra, fa, i, w):
    """(the first group of the i-th vector of words, which starts at word w; its words' groups
    relative to it): a vector of group values is one load there and a permute by the second."""
    return (builder.sext(builder.load(builder.gep(fa.data, [i])), _I64),
            _load(builder, ra.data, w, ir.VectorType(_I32, width)))


def _permute(builder, width, vec, idx):
    """vec[idx] lane by lane, one register of ``width`` float32 (the low log2(width) bits of idx)."""
    vf, vi = ir.VectorType(_F32, width), ir.VectorType(_I32, width)
    name = "llvm.x86.avx512.permvar.sf.512" if width == 16 else "llvm.x86.avx2.permps"
    return builder.call(_declare(builder, name, vf, [vf, vi]), [vec, idx])


def _lookup(builder, width, table, code):
    """table[code] lane by lane (``table``: one vector of 16 entries at width 16, two of 8 at width 8)."""
    if width == 16:
        return _permute(builder, width, table[0], code)
    vi = ir.VectorType(_I32, width)
    high = builder.icmp_unsigned("!=", builder.and_(code, ir.Constant(vi, [8] * width)), ir.Constant(vi, [0] * width))
    return builder.select(high, _permute(builder, width, table[1], code), _permute(builder, width, table[0], code))


def _scaled_levels(builder, width, bits, offset, arrays, nwu, emit):
    """Emit the loop over the full vectors of words: for each, its scales (and offsets) by one load
    and a permute, its codes slot by slot, and ``emit(k, w, lev)`` with slot k's scaled levels of
    the ``width`` words from w (see :func:`group_dot`)."""
    qa, sa, oa, la, ra, fa = arrays
    per, mask, lookup = 32 // bits, (1 << bits) - 1, bits <= 4
    vf, vi = ir.VectorType(_F32, width), ir.VectorType(_I32, width)
    lut_v = [_load(builder, la.data, _I64(8 * h), vf) for h in range(TABLE // width)] if lookup else None
    with cgutils.for_range(builder, builder.udiv(nwu, _I64(width))) as loop:
        w = builder.mul(loop.index, _I64(width))
        g0, idx = _vector_groups(builder, width, ra, fa, loop.index, w)
        qv = _load(builder, qa.data, w, vi)
        sv = _permute(builder, width, _load(builder, sa.data, g0, vf), idx)
        ov = _permute(builder, width, _load(builder, oa.data, g0, vf), idx) if offset else None
        for k in range(per):
            code = builder.and_(builder.lshr(qv, ir.Constant(vi, [k * bits] * width)), ir.Constant(vi, [mask] * width))
            lev = _lookup(builder, width, lut_v, code) if lookup else builder.sitofp(code, vf)
            if offset:
                lev = builder.fadd(lev, ov)
            emit(k, w, builder.fmul(lev, sv))


def _slot_major(a) -> bool:
    """Whether Numba type ``a`` is a C-contiguous 2-D array, as (per, nwu) slot-major data must be."""
    return isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C"


def _arrays(context, builder, signature, args):
    return [context.make_array(t)(context, builder, a) for t, a in zip(signature.args, args)]


def _slot_vector(builder, ary, k, w, vf):
    """Pointer to ``vf`` at [k, w] of a slot-major array (row length its second dimension)."""
    nwu = builder.extract_value(ary.shape, 1)
    return builder.bitcast(builder.gep(ary.data, [builder.add(builder.mul(_I64(k), nwu), w)]), vf.as_pointer())


def _check_kind(bits, offset):
    if not (bits <= 4 or offset):
        raise ValueError(f"codes of {bits} bits are converted, so their levels need offsets (code + og)")


def group_dot(bits: int, offset: bool, width: int = WIDTH):
    """An intrinsic ``dot(q, xt, sg, og, lut, rel, first) -> float32``: the sum over slots k < 32 //
    bits and words w < nwu - nwu % width of lev(k, w) * xt[k, w], where ``xt`` is a C-contiguous
    (per, nwu) float32 array (x in slot-major order), code = bits k * bits of q[w], and, with j the
    word's group, lev = (lut[code] + og[j]) * sg[j] (``offset``) or lut[code] * sg[j].

    Codes of 2 and 4 bits are looked up in a register (``lut`` holds at least 16 float32); codes of
    8 bits are converted (lut[code] = code is the caller's to keep). Groups are whole words: the
    i-th vector of words starts in group ``first[i]``, and word w is in group first[w // width] +
    rel[w]; each vector's
    scales (and offsets) are one load of ``width`` group values at its first group and a register
    permute by ``rel`` (``sg`` and ``og`` need ``width`` entries past the last group read). Each
    level is rounded once, as the NumPy reference forms it, then multiplied into x by FMA (4
    accumulators, summed in any order at the end). The words past the last full vector are the
    caller's."""
    _check_kind(bits, offset)
    vf = ir.VectorType(_F32, width)

    @intrinsic
    def dot(typingctx, q, xt, sg, og, lut, rel, first):
        if not _slot_major(xt):
            return None

        def codegen(context, builder, signature, args):
            qa, xa, sa, oa, la, ra, fa = _arrays(context, builder, signature, args)
            fma = _declare(builder, f"llvm.fma.v{width}f32", vf, [vf, vf, vf])
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in range(4)]

            def emit(k, w, lev):
                xv = builder.load(_slot_vector(builder, xa, k, w, vf), align=4)
                builder.store(builder.call(fma, [lev, xv, builder.load(accs[k % 4])]), accs[k % 4])

            _scaled_levels(builder, width, bits, offset, (qa, sa, oa, la, ra, fa), builder.extract_value(xa.shape, 1),
                           emit)
            total = builder.fadd(builder.fadd(builder.load(accs[0]), builder.load(accs[1])),
                                 builder.fadd(builder.load(accs[2]), builder.load(accs[3])))
            return _sum_lanes(builder, width, total)

        return types.float32(q, xt, sg, og, lut, rel, first), codegen

    return dot


def group_levels(bits: int, offset: bool, width: int = WIDTH):
    """An intrinsic ``levels(q, sg, og, lut, rel, first, lev) -> None``: :func:`group_dot`'s scaled
    levels written out, lev[k, w] = lev(k, w) for the full vectors' words of a C-contiguous (per,
    nwu) float32 ``lev`` (the block kernel's levels, formed by register lookups rather than
    gathers); the words past the last full vector are the caller's."""
    _check_kind(bits, offset)
    vf = ir.VectorType(_F32, width)

    @intrinsic
    def levels(typingctx, q, sg, og, lut, rel, first, lev):
        if not _slot_major(lev):
            return None

        def codegen(context, builder, signature, args):
            qa, sa, oa, la, ra, fa, va = _arrays(context, builder, signature, args)

            def emit(k, w, lv):
                builder.store(lv, _slot_vector(builder, va, k, w, vf), align=4)

            _scaled_levels(builder, width, bits, offset, (qa, sa, oa, la, ra, fa), builder.extract_value(va.shape, 1),
                           emit)
            return context.get_dummy_value()

        return types.none(q, sg, og, lut, rel, first, lev), codegen

    return levels


def rows_dot(bits: int, nrows: int, nx: int = 1, width: int = WIDTH, grouped: bool = False, signed: bool = False):
    """An intrinsic ``dot(qs, xs, luts) -> (float32,) * (nrows * nx)``: for each of ``nrows`` rows i
    and ``nx`` rows of x b, at [i * nx + b], the sum over slots k < 32 // bits and words w < nwu -
    nwu % width of luts[i][code] * xs[b][k, w], code = bits k * bits of qs[i][w] (``qs``, ``luts``,
    ``xs``: tuples of 1-D uint32, 1-D float32 of 16 entries, and C-contiguous (per, nwu) float32
    arrays, x in slot-major order as :func:`group_dot` takes it). The rows' levels are looked up,
    never scaled, so a code costs a shift and a register lookup (the lookup reads the low 4 bits,
    so no mask: 2-bit codes need their 4 levels repeated over the 16 entries), each level serves
    every row of x and each load of x every row of W (4 rows of 4096 4-bit columns at batch 1: 0.25
    ms for 4096x4096 on 2 threads, against 0.48 for the masked slot dot); each row's words
    :data:`AHEAD` rows on are prefetched.

    One scale per row, applied by the caller; or, ``grouped``, ``dot(qs, xs, luts, sgs, rel,
    first)`` with each row's group scales ``sgs[i]`` in whole-word groups (``rel``, ``first`` as
    :func:`group_dot` takes them): each word's sum over its slots, then times its group's scale
    (a word's slots share its group), so the scale costs one FMA per word, not one multiply per
    code. Two accumulators a row at batch 1 (per vector and in all, when grouped), one above.

    ``signed``: the levels are the symmetric grid's code + qmin (code - 2^(bits-1)), the same
    float32 values its tables hold, made without a lookup: each word XOR 2^(bits-1) in every slot,
    then a slot's field sign-extended by two shifts and converted (``luts`` unread). At 8 lanes
    (AVX2) that is 3 instructions a code, none a shuffle, against two ``vpermps`` and a blend."""
    if bits not in (2, 4):
        raise ValueError(f"rows_dot looks up codes of 2 or 4 bits, not {bits}")
    vf, vi = ir.VectorType(_F32, width), ir.VectorType(_I32, width)
    nacc = 2 if nx == 1 else 1

    def typer(qs, xs, luts, *groups):
        if not (all(isinstance(t, types.UniTuple) for t in (qs, xs, luts)) and _slot_major(xs.dtype)
                and qs.count == nrows and luts.count == nrows and xs.count == nx):
            return None
        if grouped and not (isinstance(groups[0], types.UniTuple) and groups[0].count == nrows):
            return None
        return types.UniTuple(types.float32, nrows * nx)

    def codegen(context, builder, signature, args):
        def unpack(n, t, tup):
            return [context.make_array(t.dtype)(context, builder, builder.extract_value(tup, i)) for i in range(n)]

        qs, xs, luts = signature.args[:3]
        qa, xa, la = unpack(nrows, qs, args[0]), unpack(nx, xs, args[1]), unpack(nrows, luts, args[2])
        fma = _declare(builder, f"llvm.fma.v{width}f32", vf, [vf, vf, vf])
        zero = ir.Constant(vf, [0.0] * width)

        def accumulators():
            return [[cgutils.alloca_once_value(builder, zero) for _ in range(nacc)] for _ in range(nrows * nx)]

        def add(acc, a, b):
            builder.store(builder.call(fma, [a, b, builder.load(acc)]), acc)

        accs = accumulators()
        if grouped:
            sa = unpack(nrows, signature.args[3], args[3])
            ra, fa = (context.make_array(t)(context, builder, a) for t, a in zip(signature.args[4:], args[4:]))
            words = accumulators()
        tables = None if signed else [[_load(builder, a.data, _I64(8 * h), vf) for h in range(TABLE // width)]
                                      for a in la]
        pf = _declare(builder, "llvm.prefetch.p0i8", ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32])
        with cgutils.for_range(builder, builder.udiv(builder.extract_value(xa[0].shape, 1), _I64(width))) as loop:
            w = builder.mul(loop.index, _I64(width))
            qv = [_load(builder, a.data, w, vi) for a in qa]
            for a in qa:  # a row's words AHEAD rows on (a hint: never faults, even past the array)
                ahead = builder.add(w, builder.mul(builder.extract_value(a.shape, 0), _I64(AHEAD)))
                builder.call(pf, [builder.bitcast(builder.gep(a.data, [ahead]), ir.IntType(8).as_pointer()),
                                  _I32(0), _I32(3), _I32(1)])
            sums = accs
            if grouped:
                for a in words:
                    for acc in a:
                        builder.store(zero, acc)
                sums = words
            if signed:  # every slot's top bit flipped: its field read as signed is code - 2^(bits-1)
                flip = sum(1 << (k * bits + bits - 1) for k in range(32 // bits))
                qv = [builder.xor(q, ir.Constant(vi, [flip - (1 << 32)] * width)) for q in qv]
            for k in range(32 // bits):
                xv = [builder.load(_slot_vector(builder, a, k, w, vf), align=4) for a in xa]
                for i in range(nrows):
                    if signed:
                        top = builder.shl(qv[i], ir.Constant(vi, [32 - bits * (k + 1)] * width))
                        lev = builder.sitofp(builder.ashr(top, ir.Constant(vi, [32 - bits] * width)), vf)
                    else:
                        code = qv[i] if k == 0 else builder.lshr(qv[i], ir.Constant(vi, [k * bits] * width))
                        lev = _lookup(builder, width, tables[i], code)
                    for b in range(nx):
                        add(sums[i * nx + b][k % nacc], lev, xv[b])
            if grouped:
                g0, idx = _vector_groups(builder, width, ra, fa, loop.index, w)
                for i in range(nrows):
                    sv = _permute(builder, width, _load(builder, sa[i].data, g0, vf), idx)
                    for b in range(nx):
                        for j in range(nacc):
                            add(accs[i * nx + b][j], builder.load(words[i * nx + b][j]), sv)
        out = [_sum_lanes(builder, width, builder.load(a[0]) if nacc == 1 else
                          builder.fadd(builder.load(a[0]), builder.load(a[1]))) for a in accs]
        return context.make_tuple(builder, signature.return_type, out)

    if grouped:
        @intrinsic
        def dot(typingctx, qs, xs, luts, sgs, rel, first):
            ret = typer(qs, xs, luts, sgs)
            return None if ret is None else (ret(qs, xs, luts, sgs, rel, first), codegen)
    else:
        @intrinsic
        def dot(typingctx, qs, xs, luts):
            ret = typer(qs, xs, luts)
            return None if ret is None else (ret(qs, xs, luts), codegen)
    return dot
