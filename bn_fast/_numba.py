"""Numba kernels on canonical views.

Channels-first tensors of any rank arrive as ``(N, C, S)`` views, channels-last
ones (and anything whose spatial size is 1) as ``(R, C)`` views.  Kernels write
into preallocated outputs; the per-channel algebra between them (invstd, the
folded scale and shift, the backward coefficients) is ``_algebra.py``, compiled
here and called by the caller and by the one-pass kernels.  ``nthreads`` says
into how many parts reductions are split; it never changes results beyond float
rounding, and a fixed value gives bit-identical results.

Reductions accumulate in float64.  Variances are merged from blocks small
enough to stay in L1: each block is summed twice (mean, then centred squares)
and blocks are combined with Chan's parallel formula, so x is read from memory
once for the statistics and E[x^2] - E[x]^2 cancellation never happens.

Loops live in small helpers: inside a prange body Numba keeps scalar
accumulators in memory and LLVM does not vectorise them; index ranges come from
slices because a provably non-negative index is what lets LLVM vectorise.
"""

import functools
import hashlib
import inspect
import platform
import sys
import types

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba import types as nbtypes
from numba.core import cgutils
from numba.extending import intrinsic

from . import _algebra

# No 'nnan'/'ninf': NaN in x must reach y.  'reassoc' lets LLVM vectorise sums.  No
# 'arcp': a mean s / n must be a true division (equal values must give that value).
_FM = {"reassoc", "contract", "nsz"}
_PAR = dict(parallel=True, cache=True, nogil=True, fastmath=_FM)
_SEQ = dict(cache=True, nogil=True, fastmath=_FM)
BLOCK = 4096  # elements per statistics block: 16-32 KiB, stays in L1
# Channels-first statistics of inputs in cache sum long planes in runs of this many, the
# second pass from L2 (inputs out of cache are pipelined: see _pipelined_moments).
RUN = 4 * BLOCK
WIDE = 1024  # channels from which channels-last statistics use _group_moments,
GROUP = 8  # in groups of this many rows (8 was 1.1-1.4x faster than 4 on 1024-8192)
FAR_BYTES = 1 << 25  # statistics of inputs this large are pipelined or prefetch
SHORT = 128  # float32 planes shorter than this get their statistics from _batch_moments,
SPAN = 16  # over at most this many batch entries at a time
# Element-wise kernels store outputs this large past the cache (_vectors); x86 only,
# where _sfence orders the stores.
_X86 = platform.machine().lower() in ("x86_64", "amd64")
STREAM_BYTES = 1 << 26 if _X86 else sys.maxsize
# The channels-last normalisation loads its per-channel vectors once for BAND rows, in
# explicit vectors of VECTOR bytes (_affine_vectors).  LLVM's own vectorisation of the
# row loop reloads them for every row, and did not vectorise a loop over four rows at a
# time (its runtime alias checks gave up).  On an AMD EPYC (Zen 3, 32 KiB L1d), the
# kernel alone, 11 rounds in random order, against the loops before (three-vector
# blocks of 4 KiB of columns over 64 rows for wide rows, whole rows otherwise): see
# the README ("Channels-last rows in bands").  Eight rows a time were 1.4x slower on
# 1024x4096 (its 16 KiB rows put 16 streams in the same L1 sets); 32-byte vectors
# were within noise of 64.  Rows of BAND_BYTES or less keep LLVM's loop: their vectors
# stay in L1, and bands took 1.1-1.45x its time on 8192x64 and 6272x256, 0.87-1.18x
# on 3136x1024 (four processes).  With a zero-length center (two vectors), rows of up
# to PLAIN_BAND_BYTES keep it too: on an AMD EPYC (Zen 5, 48 KiB L1d) bands took
# 1.2-1.5x its time there (1568x2048, 2048x1536, 4096x1100, float64 3136x1024), though
# 0.77-1.09x on Zen 3 at 1568x2048.  dx (four vectors, two inputs) in bands took
# 1.06-1.11x its time, so it keeps whole rows.
VECTOR = 64
BAND = 4
BAND_BYTES = 4096
PLAIN_BAND_BYTES = 8192

# The per-channel algebra, compiled: one call instead of a dozen small NumPy operations.
# The loops over channels (see _algebra), with NumPy's error model: Python's checks each
# division for zero, and that branch kept 1 / sqrt from vectorising (12.5 against 2.1 us
# at 4096 channels).  They are compiled from _algebra's code, with the terms they call
# compiled too, so their cache entries are _algebra.py's: an edit there recompiles them.
_ALGEBRA = dict(_SEQ, error_model="numpy")


def _compiled_algebra(*names):
    scope = dict(vars(_algebra))
    scope.update((name, njit(**_ALGEBRA)(getattr(_algebra, name)))
                 for name in ("center_terms", "affine_terms", "invstd_terms", "running_terms",
                              "backward_terms"))
    for name in names:
        fn = getattr(_algebra, name + "_each")
        yield njit(**_ALGEBRA)(types.FunctionType(fn.__code__, scope, fn.__name__))


affine_coefficients, running_update, backward_coefficients = _compiled_algebra(
    "affine_coefficients", "running_update", "backward_coefficients")
fold_moments = njit(**_SEQ)(_algebra.fold_moments)
fold_sums = njit(**_SEQ)(_algebra.fold_sums)


def _kernel(fn):
    """Compile ``fn`` twice from one source: parallel, and serial for ``nthreads == 1``.

    Small inputs are run with one thread, where starting the thread pool would cost
    more than the work.  The serial copy gets its own name so that the two do not
    share an on-disk cache entry.
    """
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                              fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    parallel = njit(**_PAR)(fn)
    serial = njit(**_SEQ)(twin)

    @functools.wraps(fn)
    def kernel(*args):
        return (serial if args[-1] == 1 else parallel)(*args)
    kernel.parallel = parallel
    kernel.serial = serial
    return kernel


def _fused_channels(C, S, nthreads):
    """Channels per task of train_nchw / backward_nchw: at least 4 tasks per thread, at
    most about BLOCK elements per batch entry."""
    return max(1, min(C // (4 * nthreads), BLOCK // max(S, 1)))


_fused_block = njit(**_SEQ)(_fused_channels)  # the kernels' copy; fused_run's is plain


def fused_run(C, S, nthreads):
    """Elements in one contiguous run of a task of train_nchw / backward_nchw (a block of
    channels of one batch entry), for _api._fused."""
    return _fused_channels(C, S, nthreads) * S


# Numba's thread pool starts here, whatever the thread count.  normalise is a cached
# serial function that calls the parallel kernels, and loaded from the cache such a
# function does not start the pool they need: it segfaulted in processes where nothing
# else had started it (NUMBA_NUM_THREADS=1, one core; numba/numba#8578).  About 5 ms.
numba.get_num_threads()


def max_threads():
    return numba.config.NUMBA_NUM_THREADS


def get_num_threads():
    return numba.get_num_threads()


def set_num_threads(n):
    numba.set_num_threads(n)


# ---------------------------------------------------------------- helpers

@njit(**_SEQ)
def _channel_chunks(N, C, S, nthreads):
    """(channels per task, pieces per plane) for element-wise kernels on (N, C, S)."""
    # Short planes are grouped so that each task has about BLOCK elements: per-plane
    # loops of a few dozen elements would spend their time on loop overhead.
    cb = max(1, min(C, BLOCK // max(S, 1)))
    tasks = N * ((C + cb - 1) // cb)
    # Long planes are cut when there are too few of them to balance the threads.
    k = max(1, min(S // 1024, (8 * nthreads + tasks - 1) // tasks))
    return (cb, 1) if k == 1 else (1, k)


@njit(**_SEQ)
def _parts(tasks, stream, nthreads):
    """Parts of the tasks of a channels-first element-wise kernel, one per prange
    iteration.  When streaming, 8 per thread, each ending with one fence: a fence
    waits for every streaming store in flight, and fencing after each 12.5 KB plane of
    32x256x56x56 made its normalisation 1.04-1.07x slower.  Otherwise one task each."""
    return min(tasks, 8 * nthreads) if stream else tasks


@njit(**_SEQ)
def _task(t, nc, k, cb, C, S):
    """Task t of N * nc * k: batch n, channels c0:c1, and plane piece s0:s1 (the whole
    plane when k == 1)."""
    n = t // (nc * k)
    j = t - n * nc * k
    c0 = j // k * cb
    p = j - j // k * k
    return n, c0, min(C, c0 + cb), p * S // k, (p + 1) * S // k


@njit(**_SEQ)
def _plane_split(x, nthreads):
    """(parts, far) for channels-first reductions, which read the N * C planes in memory
    order, part k of the planes on thread k: reading one channel's planes one after the
    other (3 MB apart on 32x256x56x56) made the gradient sums 1.2x slower.  far: x is
    too large to be in cache, and planes are long enough for the statistics to be
    pipelined and the gradient sums to read four at a time (see _pipelined_moments,
    _planes_dsums4)."""
    N, C, S = x.shape
    far = x.size * x.itemsize >= FAR_BYTES and S * x.itemsize >= 4096
    return max(1, min(nthreads, N * C)), far


@njit(**_SEQ)
def _planes(p, p1, C, cb):
    """(n, c0, c1): the planes from flat index p (of N * C) on, at most cb, up to p1 and
    within one batch entry."""
    n = p // C
    c0 = p - n * C
    return n, c0, min(C, c0 + cb, c0 + p1 - p)


@intrinsic
def _prefetch(typingctx, a, i):
    """Ask the CPU to load the cache line i bytes past the start of a's data (a hint:
    an address outside a does no harm).

    Two-pass statistics alternate a pass over memory with a pass over cache, during
    which the hardware prefetcher, driven by misses, has nothing to go on: prefetching
    the next block before that once made channels-first statistics of 100 MB 1.4x
    faster.  The channels-last ones still do; the channels-first ones are pipelined
    instead (see _pipelined_moments).
    """
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        # read, high temporal locality (into every cache level), data
        builder.call(fn, [builder.gep(builder.bitcast(data, i8p), [args[1]]),
                          i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return nbtypes.void(a, nbtypes.intp), codegen


@njit(**_SEQ)
def _prefetch_rows(v, r0, r1):
    """Prefetch rows r0:r1 of a 2-D array."""
    for i in range(r0, r1):
        for b in range(0, v.shape[1] * v.strides[1], 64):
            _prefetch(v, i * v.strides[0] + b)


@njit(**_SEQ)
def _merge(na, ma, qa, nb, mb, qb):
    n = na + nb
    d = mb - ma
    f = nb / n
    return n, ma + d * f, qa + qb + d * d * na * f


@njit(**_SEQ)
def _corrected(m, q, e, n):
    """Mean and centred squares of n float64 values from e, the sum of their deviations from m.

    The corrected two-pass algorithm: the first mean m = s / n may be an ulp off; the
    corrected mean m + e / n of equal values is that value exactly, so a constant
    channel normalises to exactly beta (an ulp off, its "variance" would be that ulp
    squared, and y = beta +- gamma once that exceeds eps).  The float64 sum of float32
    values is exact, so float32 data skip it (``itemsize`` is a compile-time constant).
    """
    return m + e / n, max(q - e * e / n, 0.0)


@njit(**_SEQ)
def _sum(v):
    s = 0.0
    for i in range(v.shape[0]):
        s += v[i]
    return s


@njit(**_SEQ)
def _squares(v, m):
    """Sum of squared deviations of 1-D v from m, and (float64 data) of the deviations."""
    q = 0.0
    e = 0.0
    for i in range(v.shape[0]):
        d = v[i] - m
        q += d * d
        if v.itemsize == 8:
            e += d
    return q, e


@njit(**_SEQ)
def _moments(v):
    """Mean and sum of centred squares of a 1-D run, two passes (short runs: in L1)."""
    m = _sum(v) / v.shape[0]
    q, e = _squares(v, m)
    if v.itemsize == 8:
        return _corrected(m, q, e, v.shape[0])
    return m, q


@njit(**_SEQ)
def _squares_and_sum(v, w, m):
    """_squares(v, m) and _sum(w) in one loop over both."""
    n = min(v.shape[0], w.shape[0])
    q = 0.0
    e = 0.0
    s = 0.0
    for i in range(n):
        s += w[i]
        d = v[i] - m
        q += d * d
        if v.itemsize == 8:
            e += d
    q2, e2 = _squares(v[n:], m)
    return q + q2, e + e2, s + _sum(w[n:])


@njit(**_SEQ)
def _piece(x, j, k):
    """(channel, run) of piece j of an (N, C, S) view whose planes are cut into k pieces,
    counted in memory order."""
    N, C, S = x.shape
    p = j // k
    i = j - p * k
    n = p // C
    c = p - n * C
    return c, x[n, c, i * S // k:(i + 1) * S // k]


@njit(**_SEQ)
def _pipelined_moments(x, j0, j1, k, pn, pm, pq):
    """Merge the moments of pieces j0:j1 (see _piece) into per-channel pn, pm, pq.

    Each piece is summed during the squares pass over the piece before it.  Summing a
    block from memory and then squaring it from cache, as _moments does, leaves memory
    idle during the second pass, and the hardware prefetcher, which follows misses,
    idle with it.  On an AMD EPYC (Zen 5) guest, against the runs of RUN with the next
    planes prefetched, channels-first statistics of 100 MB took 1.88-1.90x less time
    this way on 32x256x56x56 (1 and 2 threads), 1.20-1.22x on 32x64x112x112 and
    1.06-1.18x on 32x256x56x56 float64; in Cython 1.27-1.41x (one process, in turns).
    """
    c, v = _piece(x, j0, k)
    s = _sum(v)
    for j in range(j0, j1):
        m = s / v.shape[0]
        c2, w = _piece(x, min(j + 1, j1 - 1), k)
        if j + 1 < j1:
            q, e, s = _squares_and_sum(v, w, m)
        else:
            q, e = _squares(v, m)
        if x.itemsize == 8:
            m, q = _corrected(m, q, e, v.shape[0])
        pn[c], pm[c], pq[c] = _merge(pn[c], pm[c], pq[c], float(v.shape[0]), m, q)
        c, v = c2, w


@njit(**_SEQ)
def _row_moments(xb, c):
    """_moments(xb[c]) without creating a view: short planes are many, views cost."""
    s = 0.0
    for i in range(xb.shape[1]):
        s += xb[c, i]
    m = s / xb.shape[1]
    q = 0.0
    e = 0.0
    for i in range(xb.shape[1]):
        d = xb[c, i] - m
        q += d * d
        if xb.itemsize == 8:
            e += d
    if xb.itemsize == 8:
        return _corrected(m, q, e, xb.shape[1])
    return m, q


@njit(**_SEQ)
def _planes_moments(xb, pn, pm, pq):
    """Merge the moments of each row of a (channels, S) block into pn, pm, pq."""
    S = xb.shape[1]
    for c in range(xb.shape[0]):
        n_, m_, q_ = pn[c], pm[c], pq[c]
        if S <= RUN:
            m, q = _row_moments(xb, c)
            n_, m_, q_ = _merge(n_, m_, q_, float(S), m, q)
            pn[c], pm[c], pq[c] = n_, m_, q_
            continue
        for lo in range(0, S, RUN):
            w = xb[c, lo:lo + RUN]
            m, q = _moments(w)
            n_, m_, q_ = _merge(n_, m_, q_, float(w.shape[0]), m, q)
        pn[c], pm[c], pq[c] = n_, m_, q_


@njit(**_SEQ)
def _add_planes(xb, acc):
    for c in range(xb.shape[0]):
        for s in range(xb.shape[1]):
            acc[c, s] += xb[c, s]


@njit(**_SEQ)
def _add_squares(xb, m, acc):
    for c in range(xb.shape[0]):
        mc = m[c]
        for s in range(xb.shape[1]):
            d = xb[c, s] - mc
            acc[c, s] += d * d


@njit(**_SEQ)
def _row_sums(acc, out, n):
    """out[c] = the sum of row c of acc, divided by n (a true division: see _FM)."""
    for c in range(acc.shape[0]):
        t = 0.0
        for s in range(acc.shape[1]):
            t += acc[c, s]
        out[c] = t / n


@njit(**_SEQ)
def _batch_moments(x, n0, n1, c0, c1, pn, pm, pq):
    """Count, mean and centred squares of channels c0:c1 over batch entries n0:n1 of
    float32 x with planes shorter than SHORT, into pn, pm, pq (c1 - c0 long).

    _planes_moments ends every plane with two sums across vector lanes, and on planes
    of a few dozen elements those cost more than the rest: here the planes of the block
    are added element-wise into float64 accumulators shaped like one batch entry's
    block, whose lanes are summed once per channel.  Still two passes (the mean, then
    the squares about it), the second from cache.  Channels-first statistics on
    32x2048x7x7 took 0.37-0.59 ms instead of 0.60-0.71, on 32x1024x5x5 0.15-0.18
    instead of 0.31, on 32x512x12x12 0.20-0.24 instead of 0.25; on 14x14 planes it
    gained nothing, and float64 data were slower (1.13 against 0.82 ms on 7x7).  Fused
    training (see train_nchw) on 32x512x7x7 took 0.62-0.64x the time.
    """
    S = x.shape[2]
    acc = np.zeros((c1 - c0, S))
    for n in range(n0, n1):
        _add_planes(x[n, c0:c1], acc)
    cnt = float((n1 - n0) * S)
    _row_sums(acc, pm, cnt)
    acc[:] = 0.0
    for n in range(n0, n1):
        _add_squares(x[n, c0:c1], pm, acc)
    _row_sums(acc, pq, 1.0)
    pn[:] = cnt


@njit(**_SEQ)
def _block_moments(xb, nxt, bm, bq, be, pm, pq, na):
    """Merge the column moments of a block of rows into running (pm, pq) over na rows.

    The rows of nxt (the next block, or none) are prefetched during the second pass,
    four with every four rows: 1.05-1.2x faster on 100 MB (see _prefetch).
    """
    # Rows are taken four at a time: one load and store of the C-long float64
    # accumulators serves four rows, which matters when C is in the thousands.
    nr = xb.shape[0]
    C = xb.shape[1]
    r4 = nr - nr % 4
    bm[:] = 0.0
    for r in range(0, r4, 4):
        for c in range(C):
            bm[c] += ((np.float64(xb[r, c]) + xb[r + 1, c])
                      + (np.float64(xb[r + 2, c]) + xb[r + 3, c]))
    for r in range(r4, nr):
        for c in range(C):
            bm[c] += xb[r, c]
    for c in range(C):
        bm[c] /= nr
    bq[:] = 0.0
    be[:] = 0.0
    for r in range(0, r4, 4):
        if r < nxt.shape[0]:
            _prefetch_rows(nxt, r, min(r + 4, nxt.shape[0]))
        for c in range(C):
            m = bm[c]
            d0 = xb[r, c] - m
            d1 = xb[r + 1, c] - m
            d2 = xb[r + 2, c] - m
            d3 = xb[r + 3, c] - m
            bq[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            if xb.itemsize == 8:  # float64: correct the means (_corrected)
                be[c] += (d0 + d1) + (d2 + d3)
    for r in range(r4, nr):
        for c in range(C):
            d = xb[r, c] - bm[c]
            bq[c] += d * d
            if xb.itemsize == 8:
                be[c] += d
    if xb.itemsize == 8:
        for c in range(C):
            bm[c], bq[c] = _corrected(bm[c], bq[c], be[c], nr)
    f = nr / (na + nr)
    for c in range(C):
        d = bm[c] - pm[c]
        pm[c] += d * f
        pq[c] += bq[c] + d * d * na * f


@njit(**_SEQ)
def _group_moments(xb, pm, pq, na):
    """Merge the column moments of xb's rows into running (pm, pq) over na rows; return
    the new count.

    GROUP rows at a time: the group's mean and centred squares are formed per column
    (from L1) and merged with Chan's formula, so x is read from memory once and the
    two C-long accumulators are touched once per group.  For rows of thousands of
    channels this beats _block_moments, whose three accumulators and scratch outgrow
    L1 (1.6x on 1024x4096 float32); for narrow rows it is slower (0.8-0.9x at C=256).
    """
    nr = xb.shape[0]
    rg = nr - nr % GROUP
    for r in range(0, rg, GROUP):
        f = GROUP / (na + GROUP)
        g = na * f
        for c in range(xb.shape[1]):
            s = 0.0
            for i in range(GROUP):
                s += xb[r + i, c]
            m = s / GROUP
            q = 0.0
            for i in range(GROUP):
                d = xb[r + i, c] - m
                q += d * d
            d = m - pm[c]
            pm[c] += d * f
            pq[c] += q + d * d * g
        na += GROUP
    for r in range(rg, nr):
        f = 1.0 / (na + 1.0)
        g = na * f
        for c in range(xb.shape[1]):
            d = xb[r, c] - pm[c]
            pm[c] += d * f
            pq[c] += d * d * g
        na += 1.0
    return na


@njit(**_SEQ)
def _reduce_moments(pn, pm, pq, mean, var):
    for c in range(pn.shape[1]):
        n_, m_, q_ = pn[0, c], pm[0, c], pq[0, c]
        for b in range(1, pn.shape[0]):
            if pn[b, c] > 0:
                n_, m_, q_ = _merge(n_, m_, q_, pn[b, c], pm[b, c], pq[b, c])
        mean[c] = m_
        var[c] = q_ / n_


@njit(**_SEQ)
def _reduce_sums(p, out):
    # Serial on purpose: array expressions in a parallel function become nested parfors.
    for c in range(p.shape[1]):
        acc = 0.0
        for b in range(p.shape[0]):
            acc += p[b, c]
        out[c] = acc


@njit(**_SEQ)
def _planes_dsums(gb, vb, mean, p1, p2):
    for c in range(vb.shape[0]):
        m = mean[c]
        s1 = 0.0
        s2 = 0.0
        for s in range(vb.shape[1]):
            s1 += gb[c, s]
            s2 += gb[c, s] * (vb[c, s] - m)
        p1[c] += s1
        p2[c] += s2


@njit(**_SEQ)
def _planes_dsums4(gb, vb, mean, p1, p2):
    """_planes_dsums four rows at a time, for long rows out of cache: eight streams from
    memory in flight instead of two made the sums of 100 MB 1.26-1.41x faster (memory
    serves more requests at once than two streams ask for).  In cache it gained
    nothing.  Each row's sums are formed as in _planes_dsums."""
    nc = vb.shape[0]
    c4 = nc - nc % 4
    for c in range(0, c4, 4):
        m0, m1, m2, m3 = mean[c], mean[c + 1], mean[c + 2], mean[c + 3]
        a1 = a2 = b1 = b2 = d1 = d2 = e1 = e2 = 0.0
        for s in range(vb.shape[1]):
            a1 += gb[c, s]
            a2 += gb[c, s] * (vb[c, s] - m0)
            b1 += gb[c + 1, s]
            b2 += gb[c + 1, s] * (vb[c + 1, s] - m1)
            d1 += gb[c + 2, s]
            d2 += gb[c + 2, s] * (vb[c + 2, s] - m2)
            e1 += gb[c + 3, s]
            e2 += gb[c + 3, s] * (vb[c + 3, s] - m3)
        p1[c] += a1
        p2[c] += a2
        p1[c + 1] += b1
        p2[c + 1] += b2
        p1[c + 2] += d1
        p2[c + 2] += d2
        p1[c + 3] += e1
        p2[c + 3] += e2
    _planes_dsums(gb[c4:], vb[c4:], mean[c4:], p1[c4:], p2[c4:])


@njit(**_SEQ)
def _block_dsums(gb, vb, mean, p1, p2):
    # Private accumulators: rows p1[k] of neighbouring threads can share a cache line,
    # and updating them once per row made two threads slower than one (false sharing).
    # Rows four at a time, as in _block_moments: one load and store of the accumulators
    # serves four rows (1.2-1.5x on 1024x4096 and 401408x64).  The four come from the
    # four quarters of the rows: eight streams from memory in flight instead of two
    # made the sums of 100352x256 1.4x faster (see _planes_dsums4).  The products are
    # formed in float64, where a product of two float32 values is exact.
    s1 = np.zeros(vb.shape[1])
    s2 = np.zeros(vb.shape[1])
    nr = vb.shape[0]
    q = nr // 4
    for r in range(q):
        r1, r2, r3 = r + q, r + 2 * q, r + 3 * q
        for c in range(vb.shape[1]):
            m = mean[c]
            g0 = np.float64(gb[r, c])
            g1 = np.float64(gb[r1, c])
            g2 = np.float64(gb[r2, c])
            g3 = np.float64(gb[r3, c])
            s1[c] += (g0 + g1) + (g2 + g3)
            s2[c] += ((g0 * (vb[r, c] - m) + g1 * (vb[r1, c] - m))
                      + (g2 * (vb[r2, c] - m) + g3 * (vb[r3, c] - m)))
    for r in range(4 * q, nr):
        for c in range(vb.shape[1]):
            s1[c] += gb[r, c]
            s2[c] += np.float64(gb[r, c]) * (vb[r, c] - mean[c])
    p1[:] = s1
    p2[:] = s2


def _vectors(formula, n_in, lanes, rows=1, stream=False):
    """An intrinsic ``f(*ins, out, r, c, *coefs)`` that computes one vector of out at
    element c of each of ``rows`` rows from r on, from the same elements of ins[k]: 1-D
    arrays (r is unused) or 2-D ones whose rows are contiguous, each with its own row
    stride.  The per-channel coefficients are vectors at coefs[k][c:] if ``lanes``
    (channels-last rows), loaded once for all the rows, and only those the formula asks
    for (so a zero-length center can stand for zero); else they are scalars, one for
    every lane (a channels-first plane).  Scalars, not an array and an index: a load
    from an array may alias the output, so LLVM reloaded the coefficients for every
    vector (1.06x slower on the normalisation of 32x256x56x56, 1.07x on its dx).

    ``stream`` stores 32-byte vectors non-temporally, past the cache; out's vectors must
    then be 32-byte aligned.  An ordinary store first reads the line it writes into the
    cache, so an element-wise pass over an output larger than the cache moves three
    bytes for every two: streaming stores made the normalisation of 100 MB 1.4-1.6x
    faster.  An output that fits in cache would be evicted from it for whatever reads it
    next (and a first version that streamed the 7x7 planes of a 12.8 MB input took 20x
    as long), hence STREAM_BYTES.  LLVM does not vectorise a loop of non-temporal scalar
    stores whose alignment it cannot prove, so the vector is built here.  Unstreamed
    vectors are VECTOR bytes.
    """
    def codegen(context, builder, sig, vals):
        ft = context.get_value_type(sig.args[0].dtype)
        w = (32 if stream else VECTOR) // context.get_abi_sizeof(ft)
        vt = ir.VectorType(ft, w)
        i32, bytes_ = ir.IntType(32), ir.IntType(8).as_pointer()
        r, c = vals[n_in + 1], vals[n_in + 2]

        def ptr(k, row):
            ary = context.make_array(sig.args[k])(context, builder, vals[k])
            p = builder.gep(ary.data, [c])
            if sig.args[k].ndim == 2:
                stride = cgutils.unpack_tuple(builder, ary.strides, 2)[0]
                offset = builder.mul(builder.add(r, r.type(row)), stride)
                p = builder.gep(builder.bitcast(p, bytes_), [offset])
            return builder.bitcast(p, vt.as_pointer())

        loaded = {}

        def coef(k):
            if k not in loaded:
                v = vals[n_in + 3 + k]
                if lanes:
                    data = context.make_array(sig.args[n_in + 3 + k])(context, builder, v).data
                    loaded[k] = builder.load(builder.bitcast(builder.gep(data, [c]),
                                                             vt.as_pointer()), align=1)
                else:
                    one = builder.insert_element(ir.Constant(vt, ir.Undefined), v, i32(0))
                    loaded[k] = builder.shuffle_vector(
                        one, one, ir.Constant(ir.VectorType(i32, w), [0] * w))
            return loaded[k]

        for row in range(rows):
            ins = [builder.load(ptr(k, row), align=1) for k in range(n_in)]
            store = builder.store(formula(builder, ins, coef), ptr(n_in, row),
                                  align=32 if stream else 1)
            if stream:
                store.set_metadata("nontemporal", builder.module.add_metadata([i32(1)]))
        return context.get_dummy_value()

    # Intrinsics need their arguments spelled out.
    if n_in == 1:
        def typer(typingctx, x, out, r, c, m, a, b):
            return nbtypes.void(x, out, r, c, m, a, b), codegen
    else:
        def typer(typingctx, g, v, out, r, c, a, b, m, d):
            return nbtypes.void(g, v, out, r, c, a, b, m, d), codegen
    return intrinsic(typer)


def _fma_flags(op):
    return lambda builder, a, b: op(builder, a, b, flags=("contract",))


_sub, _mul, _add = (_fma_flags(f) for f in (ir.IRBuilder.fsub, ir.IRBuilder.fmul,
                                              ir.IRBuilder.fadd))


def _affine_formula(bd, ins, coef):  # (x - m) * a + b, coefs (m, a, b)
    return _add(bd, _mul(bd, _sub(bd, ins[0], coef(0)), coef(1)), coef(2))


def _plain_formula(bd, ins, coef):  # x * a + b: m unread, zero-length (affine_nhwc)
    return _add(bd, _mul(bd, ins[0], coef(1)), coef(2))


def _dx_formula(bd, ins, coef):  # dy * a + (x - m) * b + d, coefs (a, b, m, d)
    (g, v) = ins
    return _add(bd, _add(bd, _mul(bd, g, coef(0)), _mul(bd, _sub(bd, v, coef(2)), coef(1))),
                coef(3))


_stream_affine = _vectors(_affine_formula, 1, False, stream=True)
_stream_affine_rows = _vectors(_affine_formula, 1, True, stream=True)
_stream_dx = _vectors(_dx_formula, 2, False, stream=True)
_stream_dx_rows = _vectors(_dx_formula, 2, True, stream=True)
_affine_band, _affine_row = (_vectors(_affine_formula, 1, True, n) for n in (BAND, 1))
_plain_band, _plain_row = (_vectors(_plain_formula, 1, True, n) for n in (BAND, 1))


@intrinsic
def _sfence(typingctx):
    """Order this thread's streaming stores before what follows (they are weakly ordered:
    without it another thread could read an output before its last lines arrive)."""
    def codegen(context, builder, sig, args):
        if _X86:  # elsewhere nothing streams (STREAM_BYTES)
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
            builder.call(fn, [])
        return context.get_dummy_value()
    return nbtypes.void(), codegen


@njit(**_SEQ)
def _aligned_from(o, i):
    """Elements from flat index i of contiguous o to the next 32-byte boundary."""
    return (-(o.ctypes.data + i * o.itemsize) % 32) // o.itemsize


@njit(**_SEQ)
def _aligned(v):
    """A copy of 1-D v on a 64-byte boundary.

    Channels-last kernels load every per-channel vector once per row; when those
    vectors straddle cache lines, every 64-byte load of them touches two.  NumPy aligns
    its small arrays to 16 bytes only: on an AMD EPYC (Zen 5), NHWC inference on
    1568x2048 took 0.25-0.30 ms with the coefficients 16 bytes past a line and
    0.20-0.25 ms with them on one (x and y made less difference).
    """
    buf = np.empty(v.shape[0] + 64 // v.itemsize, v.dtype)
    i = (-buf.ctypes.data % 64) // v.itemsize
    out = buf[i:i + v.shape[0]]
    out[:] = v
    return out


@njit(**_SEQ)
def _stream_plane_affine(x, y, m, a, b, c, s0, s1):
    """y[s0:s1] = (x - m[c]) * a[c] + b[c] on contiguous 1-D x, y, streaming the aligned part."""
    w = 32 // y.itemsize
    i = min(s1, s0 + _aligned_from(y, s0))
    mc, ac, bc = m[c], a[c], b[c]
    _affine_run(x[s0:i], mc, ac, bc, y[s0:i])
    while i + w <= s1:
        _stream_affine(x, y, 0, i, mc, ac, bc)
        i += w
    _affine_run(x[i:s1], mc, ac, bc, y[i:s1])


@njit(**_SEQ)
def _stream_plane_dx(g, v, o, a, b, m, d, c, s0, s1):
    w = 32 // o.itemsize
    i = min(s1, s0 + _aligned_from(o, s0))
    mc, ac, bc, dc = m[c], a[c], b[c], d[c]
    _dx_run(g[s0:i], v[s0:i], mc, ac, bc, dc, o[s0:i])
    while i + w <= s1:
        _stream_dx(g, v, o, 0, i, ac, bc, mc, dc)
        i += w
    _dx_run(g[i:s1], v[i:s1], mc, ac, bc, dc, o[i:s1])


@njit(**_SEQ)
def _streams_planes(out, x):
    """Whether a channels-first kernel streams into out: large, planes contiguous and
    of 4 KiB or more (each plane streams from its own first 32-byte boundary, with a
    scalar head and tail; on 7x7 planes that cost more than it saved)."""
    return (out.size * out.itemsize >= STREAM_BYTES and out.strides[2] == out.itemsize
            and x.strides[2] == x.itemsize and out.shape[2] * out.itemsize >= 4096)


@njit(**_SEQ)
def _streams_rows(out, x):
    """Whether a channels-last kernel streams into out: large, C-contiguous (so that
    whole lines are written), x laid out as out, rows of whole 32-byte vectors, aligned."""
    return (out.size * out.itemsize >= STREAM_BYTES and x.strides == out.strides
            and out.strides[1] == out.itemsize and out.shape[1] * out.itemsize % 32 == 0
            and out.strides[0] == out.shape[1] * out.itemsize and out.ctypes.data % 32 == 0)


@njit(**_SEQ)
def _stream_rows_affine(x, m, a, b, y):
    w = 32 // y.itemsize
    for r in range(y.shape[0]):
        for q in range(0, y.shape[1], w):
            _stream_affine_rows(x, y, r, q, m, a, b)
    _sfence()


@njit(**_SEQ)
def _stream_rows_dx(g, v, m, a, b, d, o):
    w = 32 // o.itemsize
    for r in range(o.shape[0]):
        for q in range(0, o.shape[1], w):
            _stream_dx_rows(g, v, o, r, q, a, b, m, d)
    _sfence()


@njit(**_SEQ)
def _affine_vectors(xb, m, a, b, yb):
    """_affine_rows, BAND rows at a time in vectors of VECTOR bytes (see VECTOR); rows
    contiguous."""
    R, C = xb.shape
    w = VECTOR // xb.itemsize
    cw = C - C % w
    plain = m.shape[0] == 0
    for r in range(0, R, BAND):
        if r + BAND <= R:
            for c in range(0, cw, w):
                if plain:
                    _plain_band(xb, yb, r, c, m, a, b)
                else:
                    _affine_band(xb, yb, r, c, m, a, b)
        else:
            for q in range(r, R):
                for c in range(0, cw, w):
                    if plain:
                        _plain_row(xb, yb, q, c, m, a, b)
                    else:
                        _affine_row(xb, yb, q, c, m, a, b)
        # _affine_rows' loop, not a call on the band's slices: with those, 1031x1025
        # (one column left per band) took 1.08-1.10x the time.
        for q in range(r, min(R, r + BAND)):
            # Unsigned: a signed index not starting at 0 keeps Numba's negative-index check.
            for c in range(np.uint64(cw), np.uint64(C)):
                if plain:
                    yb[q, c] = xb[q, c] * a[c] + b[c]
                else:
                    yb[q, c] = (xb[q, c] - m[c]) * a[c] + b[c]


@njit(**_SEQ)
def _affine_run(v, m, a, b, o):
    for s in range(v.shape[0]):
        o[s] = (v[s] - m) * a + b


@njit(**_SEQ)
def _affine_planes(xb, m, a, b, yb):
    for c in range(xb.shape[0]):
        mc, ac, bc = m[c], a[c], b[c]
        for s in range(xb.shape[1]):
            yb[c, s] = (xb[c, s] - mc) * ac + bc


@njit(**_SEQ)
def _affine_rows(xb, m, a, b, yb):
    # Whole blocks of rows: a per-row slice would cost a view (and refcounting) per row.
    if m.shape[0] == 0:  # a zero center (see affine_nhwc)
        for r in range(xb.shape[0]):
            for c in range(xb.shape[1]):
                yb[r, c] = xb[r, c] * a[c] + b[c]
        return
    for r in range(xb.shape[0]):
        for c in range(xb.shape[1]):
            yb[r, c] = (xb[r, c] - m[c]) * a[c] + b[c]


@njit(**_SEQ)
def _dx_run(g, v, m, a, b, d, o):
    for s in range(v.shape[0]):
        o[s] = g[s] * a + (v[s] - m) * b + d


@njit(**_SEQ)
def _dx_planes(gb, vb, m, a, b, d, ob):
    for c in range(vb.shape[0]):
        mc, ac, bc, dc = m[c], a[c], b[c], d[c]
        for s in range(vb.shape[1]):
            ob[c, s] = gb[c, s] * ac + (vb[c, s] - mc) * bc + dc


@njit(**_SEQ)
def _dx_rows(gb, vb, m, a, b, d, ob):
    for r in range(vb.shape[0]):
        for c in range(vb.shape[1]):
            ob[r, c] = gb[r, c] * a[c] + (vb[r, c] - m[c]) * b[c] + d[c]


# ---------------------------------------------------------------- kernels

@_kernel
def stats_nchw(x, mean, var, nthreads):
    """Per-channel mean and biased variance of an (N, C, S) view into float64 mean, var."""
    N, C, S = x.shape
    cb = max(1, min(C, BLOCK // max(S, 1)))
    if S < SHORT and x.itemsize == 4 and x.size * x.itemsize < FAR_BYTES:
        # Tasks of cb channels over a span of batch entries, each span's moments merged
        # at the end; spans of SPAN entries keep a task's block (256 KB) in L2.  Out of
        # cache, reading memory in order was faster (1.23x on 128x2048x7x7, 51 MB).
        ns = max(min(nthreads, N), (N + SPAN - 1) // SPAN)
        nb = (C + cb - 1) // cb
        pn = np.zeros((ns, C))
        pm = np.zeros((ns, C))
        pq = np.zeros((ns, C))
        for t in prange(ns * nb):
            j, c0 = t % ns, t // ns * cb
            c1 = min(C, c0 + cb)
            _batch_moments(x, j * N // ns, (j + 1) * N // ns, c0, c1, pn[j, c0:c1],
                           pm[j, c0:c1], pq[j, c0:c1])
        _reduce_moments(pn, pm, pq, mean, var)
        return
    nt, far = _plane_split(x, nthreads)
    pn = np.zeros((nt, C))
    pm = np.zeros((nt, C))
    pq = np.zeros((nt, C))
    if far:  # pieces of at most BLOCK elements, each summed while the one before is squared
        k = (S + BLOCK - 1) // BLOCK
        J = N * C * k
        for t in prange(nt):
            _pipelined_moments(x, t * J // nt, (t + 1) * J // nt, k, pn[t], pm[t], pq[t])
        _reduce_moments(pn, pm, pq, mean, var)
        return
    for k in prange(nt):
        p0, p1 = k * N * C // nt, (k + 1) * N * C // nt
        p = p0
        while p < p1:
            n, c0, c1 = _planes(p, p1, C, cb)
            _planes_moments(x[n, c0:c1], pn[k, c0:c1], pm[k, c0:c1], pq[k, c0:c1])
            p += c1 - c0
    _reduce_moments(pn, pm, pq, mean, var)


@_kernel
def stats_nhwc(x, mean, var, nthreads):
    """Per-channel mean and biased variance of an (R, C) view into float64 mean, var."""
    R, C = x.shape
    nt = max(1, min(nthreads, R))
    # Blocks of ~16 BLOCKs (256 KiB of float32, in L2): smaller ones spend too long zeroing
    # and merging C-long per-block accumulators, which dominates when C is in the thousands
    # (4 BLOCKs took 1.6x as long on 1568x2048).
    rows = max(16, 16 * BLOCK // C)
    far = x.size * x.itemsize >= FAR_BYTES
    if far:
        rows = max(4, rows // 4)  # prefetched, quarter blocks were 1.04-1.2x faster
    pn = np.zeros((nt, C))
    pm = np.zeros((nt, C))
    pq = np.zeros((nt, C))
    for k in prange(nt):
        r1 = (k + 1) * R // nt
        if C >= WIDE:
            pn[k, :] = _group_moments(x[k * R // nt:r1], pm[k], pq[k], 0.0)
            continue
        bm = np.empty(C)
        bq = np.empty(C)
        be = np.empty(C)
        na = 0.0
        for r0 in range(k * R // nt, r1, rows):
            xb = x[r0:min(r0 + rows, r1)]
            nxt = x[r0 + rows:min(r0 + 2 * rows, r1)] if far else x[r1:r1]
            _block_moments(xb, nxt, bm, bq, be, pm[k], pq[k], na)
            na += xb.shape[0]
        pn[k, :] = na
    _reduce_moments(pn, pm, pq, mean, var)


@_kernel
def affine_nchw(x, center, scale, shift, y, nthreads):
    """y = (x - center[c]) * scale[c] + shift[c] on (N, C, S) views; y may be x."""
    N, C, S = x.shape
    cb, k = _channel_chunks(N, C, S, nthreads)
    nc = (C + cb - 1) // cb
    stream = _streams_planes(y, x)
    tasks = N * nc * k
    parts = _parts(tasks, stream, nthreads)
    for p in prange(parts):
        for t in range(p * tasks // parts, (p + 1) * tasks // parts):
            n, c0, c1, s0, s1 = _task(t, nc, k, cb, C, S)
            if stream:
                for c in range(c0, c1):
                    _stream_plane_affine(x[n, c], y[n, c], center, scale, shift, c, s0, s1)
            # Whole rows or 1-D runs only: Numba types x[n, c0:c1, s0:s1] as
            # non-contiguous, and LLVM then does not vectorise.
            elif k == 1:
                _affine_planes(x[n, c0:c1], center[c0:c1], scale[c0:c1], shift[c0:c1],
                               y[n, c0:c1])
            else:
                _affine_run(x[n, c0, s0:s1], center[c0], scale[c0], shift[c0], y[n, c0, s0:s1])
        if stream:
            _sfence()


@_kernel
def affine_nhwc(x, center, scale, shift, y, nthreads):
    """y = (x - center[c]) * scale[c] + shift[c] on (R, C) views; y may be x.

    A zero-length center is zero: y = x * scale + shift, two per-channel vectors for
    every element instead of three (_algebra.center_terms says when the means fold).
    """
    R, C = x.shape
    k = max(1, min(R, 8 * nthreads))
    stream = _streams_rows(y, x)
    band = PLAIN_BAND_BYTES if center.shape[0] == 0 else BAND_BYTES
    vectors = (C * x.itemsize > band and x.strides[1] == x.itemsize
               and y.strides[1] == y.itemsize)
    if center.shape[0] == 0 and stream:
        center = np.zeros(C, x.dtype)
    center, scale, shift = _aligned(center), _aligned(scale), _aligned(shift)
    for j in prange(k):
        r0, r1 = j * R // k, (j + 1) * R // k
        if stream:
            _stream_rows_affine(x[r0:r1], center, scale, shift, y[r0:r1])
        elif vectors:
            _affine_vectors(x[r0:r1], center, scale, shift, y[r0:r1])
        else:
            _affine_rows(x[r0:r1], center, scale, shift, y[r0:r1])


@_kernel
def dsum_nchw(dy, x, mean, sdy, sdyx, nthreads):
    """Per-channel sum(dy) and sum(dy * (x - mean)) of (N, C, S) views, into float64."""
    N, C, S = x.shape
    nt, far = _plane_split(x, nthreads)
    cb = max(4 if far else 1, min(C, BLOCK // max(S, 1)))  # see _planes_dsums4
    p1 = np.zeros((nt, C))
    p2 = np.zeros((nt, C))
    for k in prange(nt):
        q0, q1 = k * N * C // nt, (k + 1) * N * C // nt
        p = q0
        while p < q1:
            n, c0, c1 = _planes(p, q1, C, cb)
            if far:
                _planes_dsums4(dy[n, c0:c1], x[n, c0:c1], mean[c0:c1], p1[k, c0:c1],
                               p2[k, c0:c1])
            else:
                _planes_dsums(dy[n, c0:c1], x[n, c0:c1], mean[c0:c1], p1[k, c0:c1],
                              p2[k, c0:c1])
            p += c1 - c0
    _reduce_sums(p1, sdy)
    _reduce_sums(p2, sdyx)


@_kernel
def dsum_nhwc(dy, x, mean, sdy, sdyx, nthreads):
    """Per-channel sum(dy) and sum(dy * (x - mean)) of (R, C) views, into float64."""
    R, C = x.shape
    nt = max(1, min(nthreads, R))
    p1 = np.zeros((nt, C))
    p2 = np.zeros((nt, C))
    for k in prange(nt):
        r0, r1 = k * R // nt, (k + 1) * R // nt
        _block_dsums(dy[r0:r1], x[r0:r1], mean, p1[k], p2[k])
    _reduce_sums(p1, sdy)
    _reduce_sums(p2, sdyx)


@_kernel
def dx_nchw(dy, x, mean, a, b, d, dx, nthreads):
    """dx = dy * a[c] + (x - mean[c]) * b[c] + d[c] on (N, C, S) views; dx may be dy."""
    N, C, S = x.shape
    cb, k = _channel_chunks(N, C, S, nthreads)
    nc = (C + cb - 1) // cb
    stream = _streams_planes(dx, x) and dy.strides[2] == dy.itemsize
    tasks = N * nc * k
    parts = _parts(tasks, stream, nthreads)
    for p in prange(parts):
        for t in range(p * tasks // parts, (p + 1) * tasks // parts):
            n, c0, c1, s0, s1 = _task(t, nc, k, cb, C, S)
            if stream:
                for c in range(c0, c1):
                    _stream_plane_dx(dy[n, c], x[n, c], dx[n, c], a, b, mean, d, c, s0, s1)
            elif k == 1:
                _dx_planes(dy[n, c0:c1], x[n, c0:c1], mean[c0:c1], a[c0:c1], b[c0:c1],
                           d[c0:c1], dx[n, c0:c1])
            else:
                _dx_run(dy[n, c0, s0:s1], x[n, c0, s0:s1], mean[c0], a[c0], b[c0], d[c0],
                        dx[n, c0, s0:s1])
        if stream:
            _sfence()


@_kernel
def dx_nhwc(dy, x, mean, a, b, d, dx, nthreads):
    """dx = dy * a[c] + (x - mean[c]) * b[c] + d[c] on (R, C) views; dx may be dy."""
    R, C = x.shape
    k = max(1, min(R, 8 * nthreads))
    stream = _streams_rows(dx, x) and dy.strides == dx.strides
    mean, a, b, d = _aligned(mean), _aligned(a), _aligned(b), _aligned(d)
    for j in prange(k):
        r0, r1 = j * R // k, (j + 1) * R // k
        if stream:
            _stream_rows_dx(dy[r0:r1], x[r0:r1], mean, a, b, d, dx[r0:r1])
        else:
            _dx_rows(dy[r0:r1], x[r0:r1], mean, a, b, d, dx[r0:r1])


def _with_algebra(algebra_hash):
    """The fused channels-first kernels, which compile _algebra's functions into themselves.

    Numba's on-disk cache takes a function to be out of date only when its own source
    file changes, so after an edit of _algebra.py alone these would run the old algebra.
    Each of them reads algebra_hash, the hash of _algebra.py's source: a closure
    variable, and Numba's cache key holds those.  They call each other as module globals
    (the names assigned below), so no compiled function is a closure variable.
    """
    @njit(**_SEQ)
    def train_block(x, c0, c1, gamma, beta, eps, mean, var, y):
        """Statistics of channels c0:c1 over the whole batch, then their normalisation."""
        _ = algebra_hash
        k = c1 - c0
        pn = np.zeros(k)
        pm = np.zeros(k)
        pq = np.zeros(k)
        if x.shape[2] < SHORT and x.itemsize == 4:
            _batch_moments(x, 0, x.shape[0], c0, c1, pn, pm, pq)
        else:
            for n in range(x.shape[0]):
                _planes_moments(x[n, c0:c1], pn, pm, pq)
        mean[c0:c1] = pm
        var[c0:c1] = pq / pn
        center = np.empty(k, x.dtype)
        scale = np.empty(k, x.dtype)
        shift = np.empty(k, x.dtype)
        affine_coefficients(mean[c0:c1], var[c0:c1], gamma[c0:c1], beta[c0:c1], eps,
                            center, scale, shift)
        for n in range(x.shape[0]):
            _affine_planes(x[n, c0:c1], center, scale, shift, y[n, c0:c1])

    @njit(**_SEQ)
    def backward_block(dy, x, c0, c1, center, mean, invstd, gamma, sdy, sdyx, dgamma, dbeta, dx):
        """Gradient sums of channels c0:c1 over the whole batch, then their dx."""
        _ = algebra_hash
        k = c1 - c0
        p1 = np.zeros(k)
        p2 = np.zeros(k)
        for n in range(x.shape[0]):
            _planes_dsums(dy[n, c0:c1], x[n, c0:c1], center[c0:c1], p1, p2)
        sdy[c0:c1] = p1
        sdyx[c0:c1] = p2
        a = np.empty(k, x.dtype)
        b = np.empty(k, x.dtype)
        d = np.empty(k, x.dtype)
        backward_coefficients(mean[c0:c1], center[c0:c1], invstd[c0:c1], gamma[c0:c1],
                              float(x.shape[0] * x.shape[2]), sdy[c0:c1], sdyx[c0:c1], a, b, d,
                              dgamma[c0:c1], dbeta[c0:c1])
        for n in range(x.shape[0]):
            _dx_planes(dy[n, c0:c1], x[n, c0:c1], center[c0:c1], a, b, d, dx[n, c0:c1])

    @_kernel
    def train_nchw(x, gamma, beta, eps, mean, var, y, nthreads):
        """stats_nchw and the normalisation in one pass over memory, on (N, C, S) views.

        Each task normalises its block of channels right after summing it, while the
        block is still in cache, so x is read from memory once instead of twice.
        gamma, beta: (C,) or zero-length for 1 and 0; mean, var (biased): float64 outputs.
        """
        _ = algebra_hash
        N, C, S = x.shape
        cb = _fused_block(C, S, nthreads)
        nc = (C + cb - 1) // cb
        for t in prange(nc):
            _train_block(x, t * cb, min(C, t * cb + cb), gamma, beta, eps, mean, var, y)

    @_kernel
    def backward_nchw(dy, x, center, mean, invstd, gamma, sdy, sdyx, dgamma, dbeta, dx, nthreads):
        """dsum_nchw, backward_coefficients and dx_nchw in one pass over memory.

        center: the mean rounded to x's dtype; mean, invstd, gamma (zero-length for 1):
        (C,); sdy, sdyx (about the mean): float64 outputs; dgamma, dbeta: outputs in x's
        dtype, zero-length when there is no gamma.
        """
        _ = algebra_hash
        N, C, S = x.shape
        cb = _fused_block(C, S, nthreads)
        nc = (C + cb - 1) // cb
        for t in prange(nc):
            _backward_block(dy, x, t * cb, min(C, t * cb + cb), center, mean, invstd, gamma,
                            sdy, sdyx, dgamma, dbeta, dx)

    @njit(**_SEQ)
    def coefficients(mean, var, gamma, beta, eps, dtype):
        _ = algebra_hash
        C = mean.shape[0]
        center, scale, shift = np.empty(C, dtype), np.empty(C, dtype), np.empty(C, dtype)
        affine_coefficients(mean, var, gamma, beta, eps, center, scale, shift)
        return center, scale, shift

    # _api's normalisation in one call from Python: on a (2, 16, 8, 8) inference, calling
    # affine_coefficients and the kernel separately, with three arrays made in Python,
    # cost about 1 us of 4.7.
    @njit(**_SEQ)
    def normalise(x, mean, var, gamma, beta, eps, y, nthreads):
        """affine_coefficients, then affine_nchw on (N, C, S) views or affine_nhwc on
        (R, C) ones, serial or parallel as nthreads says.

        x.ndim is a constant to Numba, which drops the branch of the other rank before
        typing it, so each specialisation holds only its own kernel.
        """
        _ = algebra_hash  # _coefficients is linked into this one's cached code
        center, scale, shift = _coefficients(mean, var, gamma, beta, eps, x.dtype)
        if x.ndim == 2 and not center.any():  # see affine_nhwc
            center = center[:0]
        if x.ndim == 3:
            if nthreads == 1:
                _affine_nchw_serial(x, center, scale, shift, y, 1)
            else:
                _affine_nchw_parallel(x, center, scale, shift, y, nthreads)
        else:
            if nthreads == 1:
                _affine_nhwc_serial(x, center, scale, shift, y, 1)
            else:
                _affine_nhwc_parallel(x, center, scale, shift, y, nthreads)

    return train_block, backward_block, train_nchw, backward_nchw, coefficients, normalise


_affine_nchw_serial, _affine_nchw_parallel = affine_nchw.serial, affine_nchw.parallel
_affine_nhwc_serial, _affine_nhwc_parallel = affine_nhwc.serial, affine_nhwc.parallel
_train_block, _backward_block, train_nchw, backward_nchw, _coefficients, normalise = _with_algebra(
    hashlib.sha256(inspect.getsource(_algebra).encode()).hexdigest())
