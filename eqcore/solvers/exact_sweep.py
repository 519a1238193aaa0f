"""The exact solver's per-group body, for the compiled backends (Numba CPU and Numba CUDA).

Same result as the reference (:func:`eqcore.solvers.exact.best_scale`): the float32 scale of
least contract loss. The reference sweeps every threshold of every element; this body first
proves a bracket that holds the minimum and sweeps only the thresholds inside it:

1. A good scale by Lloyd's iteration (codes at s, then s = B / A) from the better of the
   max-abs scale and an RMS-based guess, while a step cuts the loss by 3% or more; its loss
   L_best.
2. A bracket [s_lo, s_hi] from two lower bounds that hold for every scale beyond it:
   below s, an entry with a >= top s (1 + 1e-6) keeps its top code and costs at least
   (a - top s)^2; above s, an entry a < s (1 - 1e-6) either rounds to 0 (cost a^2) or to a
   code >= 1 (cost >= (s - a)^2). The first of the steps s 0.9^k (s / 0.9^k), k >= 1, where the
   bound exceeds L_best is s_lo (s_hi); beyond 2 max|x| every code is 0 and L = C >= L_best.
   The bounds grow with k, so the search starts at the typical k for the bit width and walks
   from there (about 2 passes). Then windows of ratio 1.1 are cut from each end while a
   sharper bound rules them out (:func:`window_bound`).
3. Where magnitudes repeat (bfloat16 weights: a 4096-wide row has about a third distinct),
   each distinct (magnitude, top) pair in the bracket's range once, with its count
   (:func:`distinct`, a counting sort on the bit patterns): the sweep's work then follows the
   distinct pairs, and each of its steps moves A and B by count times an entry's.
4. The sweep, in pieces whose thresholds fit the workspace: the codes at both ends of a piece
   give each element's levels inside it; each threshold is the exact float32 step of
   fl(a / s), in closed form (:func:`exact_thresholds`); they are bucket-sorted,
   A and B follow by prefix sums, and every interval offers the float32 points on either side
   of its vertex B / A (clamped to it). The quadratic form ranks them to about 1e-15 of C
   (it cancels); every candidate within BAND * C of the best is settled by the direct sum,
   as in the reference.

Written as plain loops over arrays, most of them branch-free so that LLVM vectorises them on
the CPU, and built by :func:`make_group_exact` from a few compiled helpers so that
``numba.njit`` and ``numba.cuda.jit(device=True)`` compile the same code. Workspace, for a group
of n and room for cap thresholds per piece (any cap >= 1; a small one only means more pieces):
wa, wtop float32 (n); wcu, wcw int32 (n); wd float32 (3, n + 1: the distinct pairs' magnitudes,
tops and counts); wt, st float32, wb, sk int32, wA, wB float64 (cap + 1 each); wk int32
(cap + BLOCKS); wc int32 (2 cap + 1); ks float32, kq float64 (1: the best scale and its loss).
"""
from __future__ import annotations

import math

from numba import float32, float64, int32, int64, uint32

TINY = 1.401298464324817e-45  # the smallest positive float32
SHRINK = 0.9
WINDOW = 1.1  # the ratio of the windows that narrow the bracket, at most windows(qmax) from each end
MARGIN = 1e-6
LLOYD = 4  # Lloyd steps at most, each while the last cut the loss by LLOYD_GAIN of it or more:
LLOYD_GAIN = 0.03  # measured 2026-11-30, 1 thread: on SmolLM2-135M's rows 3-11% faster than
# without the gain test (as fast as no Lloyd step), and 9-25% faster than no step on Student-t(2)
# and spiky 4-bit rows, whose first guess is poor; the scales do not depend on it
BAND = 3e-14  # the quadratic form's error, in units of C (a few float64 roundings of ~C terms)
LEVELS = 256  # codes are below 2^8: an element and a level share one int32 as i << SHIFT | m
SHIFT = 8
DISTINCT = 8.0  # a threshold swept costs about this many entries counted (2026-12-01, 1 thread, bfloat16
# Student-t rows of 384-4096 at 2, 3, 4 and 8 bits: with the exact even-spread repeat fraction, 8 was as
# fast as the best of 2, 4, 8 and 16 at every width; the bound r / (2 + r) in its place was checked at 8)
BLOCKS = 4  # pair generation writes this many entries per element unconditionally (wk's slack)


def rounding_bounds():
    """For each level m, the float64 bound h +- d/2 of ``exact_thresholds`` (h = m + 1/2)."""
    import numpy as np

    h = np.arange(LEVELS) + 0.5
    hf = h.astype(np.float32)
    above = np.nextafter(hf, np.float32(np.inf)).astype(np.float64) - h
    below = h - np.nextafter(hf, np.float32(0)).astype(np.float64)
    return np.where(np.arange(LEVELS) % 2 == 0, h + above / 2, h - below / 2)


def make_group_exact(jit, jit_sum, code, next_up, next_down, bits, from_bits, bits64, from_bits64, trunc=None):
    """The per-group exact solver. ``jit`` compiles a function (``numba.njit`` or
    ``numba.cuda.jit(device=True)``), ``jit_sum`` one whose float sums may be reordered
    (vectorised); ``code(a, s, top)`` is the contract code magnitude of float32 a at float32 s
    (a float), ``next_up`` / ``next_down`` the float32 neighbours of a positive float32,
    ``bits`` / ``from_bits`` a float32's bit pattern as an int32 and back, ``bits64`` /
    ``from_bits64`` a float64's as an int64 and back; ``trunc`` the integer part of a float64 in
    [0, 2^62) as a float64 (default: through an int64). The CPU passes ``np.trunc``: an int64
    cast has no packed form before AVX-512, and on an AVX2 Zen 3 converting element by element
    made :func:`window_bound` about a third of the solver's time (2026-12-02)."""
    if trunc is None:
        @jit
        def trunc(v):
            return float64(int64(v))

    @jit
    def rms_step(qmax):
        """A grid step near the optimum for Gaussian weights, in units of their RMS (the uniform
        Lloyd-Max steps: 0.996, 0.586, 0.335 at 2, 3, 4 bits, about 4.5 / 2^k beyond)."""
        if qmax < 2:
            return 0.996
        if qmax < 4:
            return 0.586
        if qmax < 8:
            return 0.335
        return 4.5 / (2.0 * (qmax + 1.0))

    @jit_sum
    def prepare(x, start, n, qmax, wa, wtop):
        """Magnitudes and top codes into the workspace; (max |x|, C = sum a^2, the OR of the
        magnitudes' bit patterns). max |x| is the max of the bit patterns (in the same order as
        their values: they are >= 0), an integer max, which LLVM vectorises (a float max it does
        not: 6x the time)."""
        amax = int32(0)
        ored = int32(0)
        C = 0.0
        xs = x[start:start + n]  # from 0: LLVM does not vectorise a loop with a runtime start offset
        for i in range(n):
            v = xs[i]
            a = abs(v)
            wa[i] = a
            wtop[i] = qmax + float32(1.0) if v < 0 else qmax
            amax = max(amax, bits(a))
            ored |= bits(a)
            C += float64(a) * float64(a)
        return from_bits(amax), C, ored

    @jit
    def repeat_shift(ored):
        """How far right a magnitude's bit pattern shifts losslessly, given the OR of them all: 16
        when every one is a bfloat16 value, 13 a float16 value, else -1 (few repeats to expect)."""
        if ored & 0xFFFF == 0:
            return 16
        if ored & 0x1FFF == 0:
            return 13
        return -1

    @jit
    def worth_counting(n, slots, room, C, s_lo, s_hi):
        """Whether counting the distinct pairs of n entries over 2 ``slots`` should cost less than
        the sweep saves: each repeat saves its thresholds in [s_lo, s_hi], about RMS (1 / s_lo -
        1 / s_hi) of them, each about DISTINCT times the cost of counting an entry or a slot. The
        repeats are at least about those of n entries spread evenly over the slots, a fraction
        r / (2 + r) of them at r entries a slot (real rows, denser at small magnitudes, repeat
        more). Never when the slots (2 + 2 slots entries) outgrow ``room`` or 4 n (float16 rows of
        a few hundred: an integer test first, as the rest takes tens of nanoseconds)."""
        if slots > 4 * n or 2 * slots + 2 > room:
            return False
        r = float64(n) / (2.0 * float64(slots))
        per = math.sqrt(C / float64(n)) * (1.0 / float64(s_lo) - 1.0 / float64(s_hi))
        return per * r * r * DISTINCT >= (2.0 + r) * (r + 1.0)

    @jit
    def distinct(wa, wtop, n, qmax, first, slots, shift, wc, da, dtop, dcnt):
        """The distinct (magnitude, top) pairs of the entries with magnitude >= first << shift, by
        a counting sort on the bit patterns shifted right by ``shift`` (lossless: see
        :func:`repeat_shift`), ``slots`` of them per sign (wc: 2 slots + 2 entries): each pair
        once into da, dtop, its count into dcnt (n + 1 entries each); returns how many."""
        for b in range(2 * slots + 2):
            wc[b] = 0
        for i in range(n):  # slot 2 d + (1 if negative), d = 0 for the entries below the first
            d = max((bits(wa[i]) >> shift) - first + 1, 0)
            wc[uint32(2 * d + (1 if wtop[i] > qmax else 0))] += 1
        k = 0
        for b in range(2, 2 * slots + 2):  # written whether used or not (no branch): room for n + 1
            c = wc[b]
            da[k] = from_bits(int32((b >> 1) - 1 + first) << shift)
            dtop[k] = qmax + float32(b & 1)
            dcnt[k] = float32(c)
            k += 1 if c > 0 else 0
        return k

    @jit_sum
    def moments(wa, wtop, n, s):
        """(A, B) of the codes at float32 ``s``."""
        A = 0.0
        B = 0.0
        for i in range(n):
            c = float64(code(wa[i], s, wtop[i]))
            A += c * c
            B += float64(wa[i]) * c
        return A, B

    @jit_sum
    def direct_loss(wa, wtop, n, s):
        """The contract loss at ``s`` by the direct sum (no cancellation)."""
        total = 0.0
        sd = float64(s)
        for i in range(n):
            e = sd * float64(code(wa[i], s, wtop[i])) - float64(wa[i])
            total += e * e
        return total

    @jit_sum
    def loss_moments(wa, wtop, n, s):
        """(:func:`direct_loss`, then :func:`moments`' A and B) at ``s``, in one pass."""
        total = 0.0
        A = 0.0
        B = 0.0
        sd = float64(s)
        for i in range(n):
            c = float64(code(wa[i], s, wtop[i]))
            a = float64(wa[i])
            e = sd * c - a
            total += e * e
            A += c * c
            B += a * c
        return total, A, B

    @jit_sum
    def clamp_bound(wa, wtop, n, s):
        """Lower bound of the loss at every scale <= s (entries certainly clipped at s)."""
        lb = 0.0
        sd = float64(s)
        for i in range(n):
            t = float64(wtop[i]) * sd
            e = float64(wa[i]) - t
            lb += e * e if float64(wa[i]) >= t * (1.0 + MARGIN) else 0.0
        return lb

    @jit_sum
    def small_bound(wa, n, s):
        """Lower bound of the loss at every scale s' >= s: an entry a < s rounds to 0 (cost a^2)
        or to a code >= 1 (cost >= (s - a)^2)."""
        lb = 0.0
        sd = float64(s) * (1.0 - MARGIN)
        for i in range(n):
            a = float64(wa[i])
            e = sd - a
            lb += min(a * a, e * e) if a < sd else 0.0
        return lb

    @jit_sum
    def ends(wa, wtop, n, u, w, wcu, wcw):
        """Codes at both ends of a piece into wcu / wcw; the number of thresholds between."""
        total = int64(0)
        for i in range(n):
            cu = int32(code(wa[i], u, wtop[i]))
            cw = int32(code(wa[i], w, wtop[i]))
            wcu[i] = cu
            wcw[i] = cw
            total += int64(cu - cw)
        return total

    @jit
    def reciprocal(s):
        """1 / s (float64, s > 0) to an ulp or two, in a form that LLVM's reassoc cannot turn back
        into a division where it multiplies (a * (1 / s) -> a / s: a division per element, 1.3x
        the time of :func:`window_bound`): the quotient after a Newton step."""
        r = 1.0 / s
        return r * (2.0 - s * r)

    @jit_sum
    def window_bound(wa, wtop, n, s1, s2):
        """Lower bound of the loss at every scale in [s1, s2]: each entry on its own takes its
        best code and scale there; codes c reach [c s1, c s2], so an entry with no integer in
        [a / s2, a / s1] is at least as far as the nearest of those ranges (slightly shrunk:
        the quotients are rounded). Needs max(wa) / s1 < 2^62."""
        lb = 0.0
        i1 = reciprocal(float64(s1)) * (1.0 + MARGIN)
        i2 = reciprocal(float64(s2)) * (1.0 - MARGIN)
        for i in range(n):
            a = float64(wa[i])
            top = float64(wtop[i])
            lo = a * i2
            hi = a * i1
            # 0 <= lo, hi < 2^62 (the caller's guard): truncation is the floor
            floor_lo = trunc(lo)
            floor_hi = trunc(hi)
            ceil_lo = floor_lo + (1.0 if floor_lo < lo else 0.0)
            ceil_hi = floor_hi + (1.0 if floor_hi < hi else 0.0)
            below = min(floor_lo, top)
            above = ceil_hi
            e = min(a - below * float64(s2), above * float64(s1) - a if above <= top else math.inf)
            e = max(e, 0.0) * (1.0 - MARGIN)
            lb += e * e if floor_hi < ceil_lo or ceil_lo > top else 0.0
        return lb

    @jit
    def window_count(qmax):
        """Windows tried from each end of the bracket: 0, 1, 2, 4 at 2, 3, 4, 8 bits, the fastest
        of 0-8 on Student-t, Gaussian and SmolLM2-135M rows of 384-4096 (2026-11-30; a window
        costs a pass and saves sweeping the thresholds it rules out, more of them the more
        levels); the scales do not depend on it."""
        if qmax < 2:
            return 0
        if qmax < 4:
            return 1
        if qmax < 16:
            return 2
        return 4

    @jit
    def lo_steps(qmax):
        """The typical number of 0.9 steps down to the bracket's lower end: 3, 3, 2, 1 at 2, 3,
        4, 8 bits (Student-t, Gaussian and SmolLM2-135M rows, 2026-11-30; any value gives the
        same bracket, a good one in fewer passes)."""
        if qmax < 4:
            return 3
        if qmax < 16:
            return 2
        return 1

    @jit
    def hi_steps(qmax):
        """The typical number of 0.9 steps up to the bracket's upper end: 4, 4, 5, 12 at 2, 3, 4,
        8 bits (as :func:`lo_steps`)."""
        if qmax < 4:
            return 4
        if qmax < 16:
            return 5
        return 12

    @jit
    def lo_step(s, k):
        """s after k steps down by SHRINK (each rounded to float32), or TINY once a step reaches
        it or stalls (subnormals: 0.9 * s may round back to s)."""
        for _ in range(k):
            shrunk = float32(float64(s) * SHRINK)
            if shrunk <= TINY or shrunk >= s:
                return float32(TINY)
            s = shrunk
        return s

    @jit
    def hi_step(s, k):
        """s after k steps up by 1 / SHRINK (each rounded to float32)."""
        for _ in range(k):
            s = float32(float64(s) / SHRINK)
        return s

    @jit
    def stops(wa, wtop, n, s, k, best, amax, smax, up):
        """Whether step k from s ends its search. Down: it reaches TINY, or every scale at or below
        it costs more than ``best``; up: it reaches smax or 2 max|x|, or every scale at or above
        it costs more than ``best``."""
        if up:
            t = hi_step(s, k)
            return t >= smax or float64(t) > 2.0 * float64(amax) or small_bound(wa, n, t) > best
        t = lo_step(s, k)
        return t <= TINY or clamp_bound(wa, wtop, n, t) > best

    @jit
    def first_stop(wa, wtop, n, s, k, best, amax, smax, up):
        """The first step >= 1 that ends the search (:func:`stops`), walking from a typical k:
        the test is monotone in k, so this is the step of stepping one by one, in about 2 passes."""
        if stops(wa, wtop, n, s, k, best, amax, smax, up):
            while k > 1 and stops(wa, wtop, n, s, k - 1, best, amax, smax, up):
                k -= 1
            return k
        k += 1
        while not stops(wa, wtop, n, s, k, best, amax, smax, up):
            k += 1
        return k

    @jit
    def threshold(a, m, top):
        """The smallest float32 t with code(a, t) <= m (a > 0, m < top), from a first guess."""
        t = float32(float64(a) / (float64(m) + 0.5))
        if t < TINY:
            t = float32(TINY)
        while code(a, t, top) > m:
            t = next_up(t)
        while t > TINY and code(a, next_down(t), top) <= m:
            t = next_down(t)
        return t

    @jit
    def exact_thresholds(wa, wtop, k, wk, wt, wb, bounds, wn, wd):
        """wt[j] = threshold(a, m, top) for each packed (i, m) in wk, in closed form.

        h = m + 1/2 has an odd float32 significand, so a quotient rounding to it is a tie that
        goes to its even neighbour: fl(a / t) gives a code <= m iff a / t < h + d+/2 (m even:
        the tie rounds up, away from h) or a / t <= h - d-/2 (m odd), d+- the float32 spacings
        around h; ``bounds[m]`` is that h +- d/2 (exact in float64). So the threshold is the
        smallest float32 above (or at) Q = a / bounds[m]: one float64 division, in a loop
        without branches, decides unless Q itself rounds to a float32 (flagged in wb; the
        search settles those). a and bounds[m] are gathered first into wn, wd (float64, k each),
        so that the division loop reads them in order (LLVM vectorises it; not the gathers)."""
        for j in range(k):
            wn[j] = float64(wa[uint32(wk[j] >> SHIFT)])  # unsigned: no wraparound test
            wd[j] = bounds[wk[j] & (LEVELS - 1)]
        ambiguous = 0
        for j in range(k):
            q = wn[j] / wd[j]
            f = float32(q)
            fd = float64(f)
            t = f if fd > q else next_up(f)
            wt[j] = t if t > TINY else float32(TINY)
            wb[j] = 1 if fd == q else 0
            ambiguous += 1 if fd == q else 0
        if ambiguous:
            for j in range(k):
                if wb[j]:
                    i = wk[j] >> SHIFT
                    wt[j] = threshold(wa[i], float32(wk[j] & (LEVELS - 1)), wtop[i])

    @jit
    def settle(wa, wtop, n, s, q, C, ks, kq):
        """Take scale s (quadratic loss q) if its direct loss beats the best so far, or ties it at
        a smaller scale (the reference's rule: the smallest scale of least loss)."""
        if q > kq[0] + BAND * C:
            return
        d = direct_loss(wa, wtop, n, s)
        if d < kq[0] or (d == kq[0] and s < ks[0]):
            kq[0] = d
            ks[0] = s

    @jit
    def best_in(A, B, C, lo, hi):
        """(s, quadratic loss) of the best float32 point of [lo, hi] where the codes give (A, B)
        (branch-free: A = 0, all codes 0, gives lo and C)."""
        v = B / A if A > 0.0 else 0.0
        f = min(max(float32(v), lo), hi)
        up = next_up(f)
        down = next_down(f)
        g = up if float64(f) < v else down  # the float32 on v's other side
        g = min(max(g, lo), hi)
        s = g if abs(float64(g) - v) < abs(float64(f) - v) else f  # the nearer to v is the better
        sd = float64(s)
        return s, (A * sd - 2.0 * B) * sd + C

    @jit
    def least(wq, m):
        """max(0, min(wq[:m])) for float64 losses (>= 0 but for rounding, or inf), as the least of
        their bit patterns: an integer min, which LLVM vectorises (a float min it does not: 3% of
        the solver's time, 2026-12-01). Clamping at 0 can only widen the band of candidates."""
        least_bits = int64(0x7FF0000000000000)  # inf
        for j in range(m):
            v = wq[j]
            least_bits = min(least_bits, bits64(v if v > 0.0 else 0.0))
        return from_bits64(least_bits)

    @jit
    def sort_thresholds(wt, wk, k, u, w, wb, wc, st, sk):
        """st[:k], sk[:k] = wt[:k], wk[:k] in the stable order of the thresholds wt (each in [u, w]):
        a bucket sort (two buckets per threshold; wb, wc scratch), then one branch-free bubble pass
        and an insertion sort, linear here."""
        nb = 2 * k
        # buckets per unit of t, capped below float32's max (a piece a few subnormals wide would
        # give inf, and (t - u) * inf an inf or NaN bucket index); (t - u) * scale stays <= ~nb
        scale = float32(min(float64(nb) / (float64(w) - float64(u)), 3e38)) if w > u else float32(0.0)
        for j in range(k):
            wb[j] = min(max(int32((wt[j] - u) * scale), 0), nb - 1)
        for b in range(nb + 1):
            wc[b] = 0
        for j in range(k):
            wc[uint32(wb[j] + 1)] += 1
        run = int32(0)
        for b in range(nb + 1):  # the running count in a register, not reloaded from wc
            run += wc[b]
            wc[b] = run
        for j in range(k):
            bj = uint32(wb[j])  # unsigned indices: no wraparound test (7% of the solver's time)
            p = uint32(wc[bj])
            wc[bj] = p + 1
            st[p] = wt[j]
            sk[p] = wk[j]
        if k > 1:  # a branch-free bubble pass: it swaps every lone adjacent inversion (most of them:
            hi = st[0]  # two thresholds in one bucket), which otherwise cost the insertion sort a
            hi_key = sk[0]  # mispredicted branch each; strict >, so equal thresholds keep their order
            for j in range(1, k):
                t = st[j]
                key = sk[j]
                swap = hi > t
                st[j - 1] = t if swap else hi
                sk[j - 1] = key if swap else hi_key
                hi = hi if swap else t
                hi_key = hi_key if swap else key
            st[k - 1] = hi
            sk[k - 1] = hi_key
        for j in range(1, k):
            t = st[j]
            if st[j - 1] > t:
                key = sk[j]
                p = j
                while p > 0 and st[p - 1] > t:
                    st[p] = st[p - 1]
                    sk[p] = sk[p - 1]
                    p -= 1
                st[p] = t
                sk[p] = key

    @jit
    def sweep_piece(ea, etop, en, ecnt, weighted, u, w, A, B, C, cnt, wcu, wcw, wt, wk, wb, st, sk, wc, wA, wB, bounds):
        """The candidates of [u, w] (inclusive), given its ``cnt`` thresholds fit the workspace and
        (A, B) are the moments at u: the best float32 point of every interval whose quadratic loss
        is within BAND * C of the least, into wt (scales) and wA (losses); returns how many. The
        thresholds are those of ea, etop (en entries: the group's, or its distinct pairs, each
        standing for ecnt of them if ``weighted``), wcu, wcw their codes at u and w."""
        if cnt == 0:
            wt[0], wA[0] = best_in(A, B, C, u, w)
            return 1
        k = 0
        for i in range(en):  # the thresholds: levels between the codes at u and at w
            base = int32(i << SHIFT) + wcw[i]
            for d in range(BLOCKS):  # written whether used or not (no branch); wk has the room
                wk[uint32(k + d)] = base + d
            for d in range(BLOCKS, wcu[i] - wcw[i]):
                wk[uint32(k + d)] = base + d
            k += wcu[i] - wcw[i]
        exact_thresholds(ea, etop, k, wk, wt, wb, bounds, wA, wB)  # wA, wB: scratch until the prefix sums
        sort_thresholds(wt, wk, k, u, w, wb, wc, st, sk)
        # the codes of interval j ([st[j-1], st[j]) ) follow the first j steps: prefix sums
        wA[0] = A  # A stays an exact integer; B is summed with compensation (Fast2Sum: B >= the step
        wB[0] = B  # here, since B still holds the stepping entries' a (m + 1))
        comp = 0.0
        if weighted:  # a step for all the entries of a pair at once (c a is exact: 24 + 24 bits); a
            # loop of its own: a count of 1 multiplied in at every step made unweighted rows ~5% slower
            for j in range(k):
                i = uint32(sk[j] >> SHIFT)
                c = float64(ecnt[i])
                A -= float64(2 * (sk[j] & (LEVELS - 1)) + 1) * c
                wA[j + 1] = A
                a = -float64(ea[i]) * c
                t = B + a
                comp += (B - t) + a
                B = t
                wB[j + 1] = B + comp
        else:
            for j in range(k):  # A and B carried in registers, not reloaded from wA / wB
                A -= float64(2 * (sk[j] & (LEVELS - 1)) + 1)
                wA[j + 1] = A
                a = -float64(ea[uint32(sk[j] >> SHIFT)])
                t = B + a
                comp += (B - t) + a
                B = t
                wB[j + 1] = B + comp
        for j in range(k + 1):  # every interval's best float32 point (none where it is empty)
            lo = u if j == 0 else st[j - 1]
            hi = w if j == k else next_down(st[j])
            s, q = best_in(wA[j], wB[j], C, lo, max(lo, hi))
            wt[j] = s
            wA[j] = q if hi >= lo else math.inf
        qmin = least(wA, k + 1)
        m = 0
        for j in range(k + 1):  # the candidates the quadratic form cannot tell apart, in order
            if wA[j] <= qmin + BAND * C:
                wt[m] = wt[j]
                wA[m] = wA[j]
                m += 1
        return m

    @jit
    def group_exact(x, start, n, qmax, smax, wa, wtop, wcu, wcw, wd, wt, wk, wb, st, sk, wc, wA, wB, bounds, ks, kq):
        """The float32 scale <= smax of least contract loss for x[start:start+n]."""
        amax, C, ored = prepare(x, start, n, qmax, wa, wtop)
        if amax == 0:
            return min(float32(1.0), smax)
        # 1. Lloyd from the better of the max-abs scale and an RMS-based guess (each scale's loss
        # and next step in one pass)
        s = min(float32(float64(amax) / float64(qmax)), smax)
        best, A, B = loss_moments(wa, wtop, n, s)
        guess = min(float32(math.sqrt(C / n) * rms_step(qmax)), smax)
        if guess > 0:
            q, Ag, Bg = loss_moments(wa, wtop, n, guess)
            if q < best:
                best = q
                s = guess
                A = Ag
                B = Bg
        best_s = s
        for _ in range(LLOYD):
            if A <= 0.0:
                break
            s_new = min(float32(B / A), smax)
            if not (s_new > 0) or s_new == s:
                break
            q, A, B = loss_moments(wa, wtop, n, s_new)
            if not (q < best):
                break
            gain = best - q
            best = q
            best_s = s_new
            s = s_new
            if gain < LLOYD_GAIN * best:
                break
        ks[0] = best_s
        kq[0] = best
        # 2. the bracket
        s_lo = lo_step(best_s, first_stop(wa, wtop, n, best_s, lo_steps(qmax), best, amax, smax, False))
        s_hi = min(hi_step(best_s, first_stop(wa, wtop, n, best_s, hi_steps(qmax), best, amax, smax, True)), smax)
        # ... narrowed by windows from its ends inwards while a window's bound rules it out
        # (only while every quotient a / s in the bracket fits an int64: not in degenerate rows)
        windows = window_count(qmax) if float64(amax) < 1e18 * float64(s_lo) else 0
        for _ in range(windows):
            s2 = min(float32(float64(s_lo) * WINDOW), best_s)
            if s2 >= best_s or window_bound(wa, wtop, n, s_lo, s2) <= best:
                break
            s_lo = s2
        for _ in range(windows):
            s1 = max(float32(float64(s_hi) / WINDOW), best_s)
            if s1 <= best_s or window_bound(wa, wtop, n, s1, s_hi) <= best:
                break
            s_hi = s1
        # 3. the thresholds of each distinct (magnitude, top) once, with its count, where the
        # magnitudes repeat (bfloat16 weights: a third of a 4096-wide row's are distinct) and a
        # counting sort over the bracket's range of magnitudes costs less than the row; magnitudes
        # below 0.49 s_lo round to code 0 throughout the bracket and take no part
        shift = repeat_shift(ored)
        weighted = False
        en = n
        if shift >= 0:
            first = bits(float32(float64(s_lo) * 0.49)) >> shift
            slots = (bits(amax) >> shift) - first + 1
            if worth_counting(n, slots, wc.shape[0], C, s_lo, s_hi):
                en = distinct(wa, wtop, n, qmax, first, slots, shift, wc, wd[0], wd[1], wd[2])
                weighted = True
        ea = wd[0] if weighted else wa  # views only where taken (each counts a reference)
        etop = wd[1] if weighted else wtop
        ecnt = wd[2] if weighted else wa
        # 4. the sweep, piece by piece (wt holds cap + 1 entries: one per interval); each piece's
        # candidates settled by the direct sum over the whole group, as in the reference
        cap = int64(wt.shape[0]) - 1
        u = s_lo
        while True:
            w = s_hi
            cnt = ends(ea, etop, en, u, w, wcu, wcw)
            while cnt > cap:
                half = float32(float64(u) + 0.5 * (float64(w) - float64(u)))
                w = u if half == w else half  # one ulp wide: [u, u] holds no threshold
                cnt = ends(ea, etop, en, u, w, wcu, wcw)
            A, B = moments(wa, wtop, n, u)
            m = sweep_piece(ea, etop, en, ecnt, weighted, u, w, A, B, C, cnt, wcu, wcw, wt, wk, wb, st, sk, wc, wA, wB,
                            bounds)
            for j in range(m):
                settle(wa, wtop, n, wt[j], wA[j], C, ks, kq)
            if w >= s_hi:
                break
            u = next_up(w)
        return ks[0]

    return group_exact
