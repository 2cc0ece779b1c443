# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Cython + OpenMP kernels: the same names, signatures and work split as ``_numba.py``.

Used when Numba is not installed.  Tensors arrive as canonical views that may be
strided: channels-first ``(N, C, S)`` and channels-last ``(R, C)``, float32 or
float64 (one fused type for x, y, dy and the per-channel vectors of the affine
and dx kernels).  Per-channel vectors are contiguous, as the public API passes
them.  Reductions accumulate in float64 and write float64 outputs.  Element-wise
kernels may write in place (y is x, dx is dy): each element is read before it
is written and no other element depends on it.

Work is split as in ``_numba.py``: channels-first over (batch part, channel)
pairs, channels-last over row chunks with per-chunk partial sums that are
reduced once, in a fixed order, so a given ``nthreads`` gives bit-identical
results.  Each kernel runs ``nthreads`` OpenMP threads.

Variances are merged from blocks small enough to stay in L1: each block is
summed twice (mean, then centred squares) and blocks are combined with Chan's
parallel formula, so x is read from memory once for the statistics and
E[x^2] - E[x]^2 cancellation never happens.  For float64 data the second pass
also corrects each block mean by the mean deviation from it, so a constant
channel gets its value as its mean exactly (and y == beta); float32 block sums
are exact in float64 and need no correction.

Strides are in bytes, as NumPy gives them.  Every inner loop is written once
over a byte stride; the callers test for unit stride and pass ``sizeof(floating)``
literally, so the inlined copy of the loop has a constant stride and the C
compiler vectorises it (setup.py allows it to reassociate sums, like Numba's
fastmath, but not to assume away NaN).
"""

cimport numpy as cnp
cimport openmp
from cython.parallel cimport prange
from libc.math cimport NAN, sqrt
from libc.stdint cimport uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy


cdef extern from *:
    void __builtin_prefetch(const void* addr, int rw, int locality) noexcept nogil


# Streaming (non-temporal) stores for outputs of STREAM_BYTES or more, as in _numba.py
# (_streamed there says why): each function writes n elements, a multiple of one
# 32-byte vector, to a 32-byte aligned y; the kernels fence once per part of their work
# (bn_sfence; _parts in _numba.py says why).  x86 with AVX only;
# elsewhere BN_STREAM is 0 and the kernels store as usual.
cdef extern from *:
    """
    #if defined(__AVX__)
    #include <immintrin.h>
    #include <string.h>
    #define BN_STREAM 1
    typedef float bn_vf __attribute__((vector_size(32)));
    typedef double bn_vd __attribute__((vector_size(32)));
    #define BN_LOAD(V, p) ({ V v_; memcpy(&v_, (p), 32); v_; })
    #define BN_KERNELS(T, V, STORE, SUF)                                                   \
    static inline void bn_affine_stream_##SUF(const T* x, T* y, Py_ssize_t n,              \
                                             T m, T a, T b) {                              \
        for (Py_ssize_t i = 0; i < n; i += 32 / sizeof(T))                                \
            STORE(y + i, (BN_LOAD(V, x + i) - m) * a + b);                                 \
    }                                                                                      \
    static inline void bn_affine_stream_cols_##SUF(const T* x, T* y, Py_ssize_t n,         \
                                                  const T* m, const T* a, const T* b) {    \
        for (Py_ssize_t i = 0; i < n; i += 32 / sizeof(T))                                \
            STORE(y + i, (BN_LOAD(V, x + i) - BN_LOAD(V, m + i)) * BN_LOAD(V, a + i)       \
                         + BN_LOAD(V, b + i));                                             \
    }                                                                                      \
    static inline void bn_dx_stream_##SUF(const T* g, const T* x, T* o, Py_ssize_t n,      \
                                         T m, T a, T b, T d) {                             \
        for (Py_ssize_t i = 0; i < n; i += 32 / sizeof(T))                                \
            STORE(o + i, BN_LOAD(V, g + i) * a + (BN_LOAD(V, x + i) - m) * b + d);         \
    }                                                                                      \
    static inline void bn_dx_stream_cols_##SUF(const T* g, const T* x, T* o, Py_ssize_t n, \
                                              const T* m, const T* a, const T* b,          \
                                              const T* d) {                                \
        for (Py_ssize_t i = 0; i < n; i += 32 / sizeof(T))                                \
            STORE(o + i, BN_LOAD(V, g + i) * BN_LOAD(V, a + i)                             \
                         + (BN_LOAD(V, x + i) - BN_LOAD(V, m + i)) * BN_LOAD(V, b + i)     \
                         + BN_LOAD(V, d + i));                                             \
    }
    #define BN_STORE_F(p, v) _mm256_stream_ps((p), (__m256)(v))
    #define BN_STORE_D(p, v) _mm256_stream_pd((p), (__m256d)(v))
    BN_KERNELS(float, bn_vf, BN_STORE_F, f)
    BN_KERNELS(double, bn_vd, BN_STORE_D, d)
    static inline void bn_sfence(void) { _mm_sfence(); }
    #else
    #define BN_STREAM 0
    #define BN_NONE(...) do {} while (0)
    #define bn_affine_stream_f BN_NONE
    #define bn_affine_stream_d BN_NONE
    #define bn_affine_stream_cols_f BN_NONE
    #define bn_affine_stream_cols_d BN_NONE
    #define bn_dx_stream_f BN_NONE
    #define bn_dx_stream_d BN_NONE
    #define bn_dx_stream_cols_f BN_NONE
    #define bn_dx_stream_cols_d BN_NONE
    static inline void bn_sfence(void) {}
    #endif
    """
    int BN_STREAM
    void bn_sfence() noexcept nogil
    void bn_affine_stream_f(const float*, float*, Py_ssize_t, float, float, float) noexcept nogil
    void bn_affine_stream_d(const double*, double*, Py_ssize_t, double, double,
                            double) noexcept nogil
    void bn_affine_stream_cols_f(const float*, float*, Py_ssize_t, const float*, const float*,
                                 const float*) noexcept nogil
    void bn_affine_stream_cols_d(const double*, double*, Py_ssize_t, const double*,
                                 const double*, const double*) noexcept nogil
    void bn_dx_stream_f(const float*, const float*, float*, Py_ssize_t, float, float, float,
                        float) noexcept nogil
    void bn_dx_stream_d(const double*, const double*, double*, Py_ssize_t, double, double,
                        double, double) noexcept nogil
    void bn_dx_stream_cols_f(const float*, const float*, float*, Py_ssize_t, const float*,
                             const float*, const float*, const float*) noexcept nogil
    void bn_dx_stream_cols_d(const double*, const double*, double*, Py_ssize_t, const double*,
                             const double*, const double*, const double*) noexcept nogil

import numpy as np

cnp.import_array()

# The per-channel algebra between kernels: NumPy code shared with the other backends.
from bn_fast._algebra import FOLD, affine_coefficients, fold_moments, fold_sums

ctypedef fused floating:
    float
    double

ctypedef struct Moments:  # count, mean and sum of centred squares of some elements
    double n
    double m
    double q

cpdef enum:
    BLOCK = 4096  # elements per statistics block: 16-32 KiB, stays in L1
    RUN = 4 * BLOCK  # channels-first statistics in cache sum long planes in runs of this many
    WIDE = 1024  # channels from which channels-last statistics use _group_moments
    FAR_BYTES = 1 << 25  # statistics of inputs this large are pipelined or prefetch (_numba.py)
    SHORT = 128  # float32 planes shorter than this: _batch_moments (as in _numba.py),
    SPAN = 16  # over at most this many batch entries at a time
    STREAM_BYTES = 1 << 26  # element-wise kernels stream outputs this large (where BN_STREAM)
cdef int _MAX_THREADS = openmp.omp_get_max_threads()  # before any set: honours OMP_NUM_THREADS
cdef double _FOLD2 = FOLD * FOLD  # for _algebra.center_terms without the GIL


def fused_run(C, S, nthreads):
    """Elements in one contiguous run of a task of train_nchw / backward_nchw, for
    _api._fused (as in _numba.py)."""
    return _fused_block(C, S, nthreads) * S


def max_threads():
    return _MAX_THREADS


def get_num_threads():
    return openmp.omp_get_max_threads()


def set_num_threads(int n):
    # Default for OpenMP regions started by this Python thread; the kernels themselves
    # run with the nthreads they are given.
    openmp.omp_set_num_threads(n)


# ---------------------------------------------------------------- helpers

cdef inline const floating* _in(const floating* p, Py_ssize_t nbytes) noexcept nogil:
    return <const floating*>(<const char*>p + nbytes)


cdef inline floating* _out(floating* p, Py_ssize_t nbytes) noexcept nogil:
    return <floating*>(<char*>p + nbytes)


cdef inline floating _at(const floating* p, Py_ssize_t i, Py_ssize_t stride) noexcept nogil:
    """Element i of a run with a byte stride."""
    return _in(p, i * stride)[0]


cdef inline Py_ssize_t _channel_chunk(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                                      int nthreads, Py_ssize_t* k) noexcept nogil:
    """Channels per task of an element-wise kernel on (N, C, S); sets k, the pieces per plane.

    As in _numba.py: short planes are grouped so that a task has about BLOCK elements
    (per-plane task bookkeeping would cost more than 7x7 planes' work), and long planes
    are cut when there are too few of them to balance the threads.
    """
    cdef Py_ssize_t cb = max(1, min(C, BLOCK // max(S, 1)))
    cdef Py_ssize_t tasks = N * ((C + cb - 1) // cb)
    k[0] = max(1, min(S // 1024, (8 * nthreads + tasks - 1) // tasks))
    return cb if k[0] == 1 else 1


ctypedef struct Task:  # batch n, channels c0:c1 and plane piece lo:hi of an element-wise task
    Py_ssize_t n, c0, c1, lo, hi


cdef inline Py_ssize_t _parts(Py_ssize_t tasks, bint stream, int nthreads) noexcept nogil:
    """As in _numba.py: 8 parts per thread when streaming, each fenced once; else one
    task each."""
    return min(tasks, 8 * nthreads) if stream else tasks


cdef inline Task _task(Py_ssize_t t, Py_ssize_t nc, Py_ssize_t k, Py_ssize_t cb, Py_ssize_t C,
                       Py_ssize_t S) noexcept nogil:
    """Task t of N * nc * k, as _task in _numba.py."""
    cdef Task r
    cdef Py_ssize_t j, p
    r.n = t // (nc * k)
    j = t - r.n * nc * k
    r.c0 = j // k * cb
    r.c1 = min(C, r.c0 + cb)
    p = j - j // k * k
    r.lo = p * S // k
    r.hi = (p + 1) * S // k
    return r


cdef inline Moments _no_moments() noexcept nogil:
    cdef Moments r
    r.n = r.m = r.q = 0.0
    return r


cdef inline Moments _merge(Moments a, double nb, double mb, double qb) noexcept nogil:
    """Chan's parallel formula: a merged with nb elements of mean mb and centred squares qb."""
    cdef Moments r
    cdef double d = mb - a.m
    cdef double f = nb / (a.n + nb)
    r.n = a.n + nb
    r.m = a.m + d * f
    r.q = a.q + qb + d * d * a.n * f
    return r


cdef inline Moments _moments_run(const floating* v, Py_ssize_t n, Py_ssize_t sv,
                                 Moments acc) noexcept nogil:
    """Merge n elements (one block) into acc: mean first, then centred squares.

    For float64 data the second pass also sums the deviations e and corrects the
    mean by e / n (the corrected two-pass algorithm): s / n may be an ulp off, the
    corrected mean of equal values is that value exactly, so a constant channel
    normalises to exactly beta.  The float64 sum of a block of float32 values is
    exact, so their s / n needs no correction.
    """
    cdef Py_ssize_t i
    cdef double s = 0.0, q = 0.0, e = 0.0, m, d
    for i in range(n):
        s += _at(v, i, sv)
    m = s / n
    for i in range(n):
        d = _at(v, i, sv) - m
        q += d * d
        if floating is double:
            e += d
    if floating is double:
        m, q = m + e / n, max(q - e * e / n, 0.0)
    return _merge(acc, <double>n, m, q)


cdef inline Moments _plane_moments(const floating* v, Py_ssize_t n, Py_ssize_t sv,
                                   Moments acc) noexcept nogil:
    """Merge a run of n elements into acc, RUN elements at a time (see RUN in _numba.py)."""
    cdef Py_ssize_t blk, lo, w
    for blk in range((n + RUN - 1) // RUN):
        lo = blk * RUN
        w = min(RUN, n - lo)
        if sv == sizeof(floating):
            acc = _moments_run(_in(v, lo * sv), w, sizeof(floating), acc)
        else:
            acc = _moments_run(_in(v, lo * sv), w, sv, acc)
    return acc


cdef inline double _squares_and_sum(const floating* v, Py_ssize_t nv, const floating* w,
                                    Py_ssize_t nw, double m, double* e, double* s) noexcept nogil:
    """Centred squares of contiguous v about m (returned; e: their deviations' sum, for
    float64) and the sum s of contiguous w, in one loop (see _pipelined_moments)."""
    cdef Py_ssize_t i, n = min(nv, nw)
    cdef double q = 0.0, ev = 0.0, sw = 0.0, d
    for i in range(n):
        sw += w[i]
        d = v[i] - m
        q += d * d
        if floating is double:
            ev += d
    for i in range(n, nv):
        d = v[i] - m
        q += d * d
        if floating is double:
            ev += d
    for i in range(n, nw):
        sw += w[i]
    e[0] = ev
    s[0] = sw
    return q


cdef inline const floating* _piece(const floating* x0, Py_ssize_t s0, Py_ssize_t s1,
                                   Py_ssize_t C, Py_ssize_t S, Py_ssize_t k, Py_ssize_t j,
                                   Py_ssize_t* c, Py_ssize_t* n) noexcept nogil:
    """Piece j of the planes (contiguous, of S elements) cut into k pieces, counted in
    memory order, as _piece in _numba.py: its start, its channel c and length n."""
    cdef Py_ssize_t p = j // k, i = j - j // k * k
    c[0] = p - p // C * C
    n[0] = (i + 1) * S // k - i * S // k
    return _in(x0, p // C * s0 + c[0] * s1) + i * S // k


cdef void _pipelined_moments(const floating* x0, Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t C,
                             Py_ssize_t S, Py_ssize_t k, Py_ssize_t j0, Py_ssize_t j1,
                             double* pn, double* pm, double* pq) noexcept nogil:
    """Merge the moments of pieces j0:j1 into per-channel pn, pm, pq, summing each
    piece during the squares pass over the one before (see _pipelined_moments in
    _numba.py)."""
    cdef Py_ssize_t i, j, c, n
    cdef const floating* v = _piece(x0, s0, s1, C, S, k, j0, &c, &n)
    cdef const floating* w = v
    cdef Py_ssize_t c2 = c, n2 = n
    cdef double s = 0.0, m, q, e = 0.0
    cdef Moments acc
    for i in range(n):
        s += v[i]
    for j in range(j0, j1):
        m = s / n
        if j + 1 < j1:
            w = _piece(x0, s0, s1, C, S, k, j + 1, &c2, &n2)
            q = _squares_and_sum(v, n, w, n2, m, &e, &s)
        else:
            q = _squares_and_sum(v, n, v, 0, m, &e, &s)
        if floating is double:
            m, q = m + e / n, max(q - e * e / n, 0.0)
        acc.n, acc.m, acc.q = pn[c], pm[c], pq[c]
        acc = _merge(acc, <double>n, m, q)
        pn[c], pm[c], pq[c] = acc.n, acc.m, acc.q
        v, c, n = w, c2, n2


cdef inline void _add_planes(const floating* v, Py_ssize_t sv, Py_ssize_t S, double* acc,
                             bint squares, double m) noexcept nogil:
    """acc[s] += v[s] (or (v[s] - m) ** 2) for one plane of S elements, sv bytes apart."""
    cdef Py_ssize_t s
    cdef double d
    for s in range(S):
        d = _at(v, s, sv)
        if squares:
            d = d - m
            acc[s] += d * d
        else:
            acc[s] += d


cdef void _batch_moments(const floating* x0, Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t s2,
                         Py_ssize_t S, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t c0,
                         Py_ssize_t c1, double* pm, double* pq) noexcept nogil:
    """Mean and centred squares of channels c0:c1 (at most BLOCK elements of planes) over
    batch entries n0:n1, into pm[0:c1 - c0] and pq, for float32 planes shorter than
    SHORT: as _batch_moments in _numba.py says, the planes are added element-wise into
    float64 accumulators whose lanes are summed once per channel."""
    cdef double acc[BLOCK]
    cdef Py_ssize_t n, c, i, k = c1 - c0
    cdef double t
    cdef bint unit = s2 == sizeof(floating)
    for i in range(k * S):
        acc[i] = 0.0
    for n in range(n0, n1):
        for c in range(k):
            if unit:
                _add_planes(_in(x0, n * s0 + (c0 + c) * s1), sizeof(floating), S, acc + c * S,
                            False, 0.0)
            else:
                _add_planes(_in(x0, n * s0 + (c0 + c) * s1), s2, S, acc + c * S, False, 0.0)
    for c in range(k):
        t = 0.0
        for i in range(S):
            t += acc[c * S + i]
            acc[c * S + i] = 0.0
        pm[c] = t / ((n1 - n0) * S)
    for n in range(n0, n1):
        for c in range(k):
            if unit:
                _add_planes(_in(x0, n * s0 + (c0 + c) * s1), sizeof(floating), S, acc + c * S,
                            True, pm[c])
            else:
                _add_planes(_in(x0, n * s0 + (c0 + c) * s1), s2, S, acc + c * S, True, pm[c])
    for c in range(k):
        t = 0.0
        for i in range(S):
            t += acc[c * S + i]
        pq[c] = t


# Channels-last reductions add rows into per-column float64 arrays; taking rows in pairs
# halves the loads and stores of those arrays.  k (1 or 2) is a literal at every call.

cdef inline void _cols_add(const floating* row, Py_ssize_t sr, Py_ssize_t sc, int k, double* acc,
                           Py_ssize_t C) noexcept nogil:
    """acc[c] += the sum of k (1 or 4) rows, sr bytes apart."""
    cdef Py_ssize_t c
    cdef double s
    for c in range(C):
        s = _at(row, c, sc)
        if k == 4:
            s = (s + _at(_in(row, sr), c, sc)) + (
                <double>_at(_in(row, 2 * sr), c, sc) + _at(_in(row, 3 * sr), c, sc))
        acc[c] += s


cdef inline void _cols_sq(const floating* row, Py_ssize_t sr, Py_ssize_t sc, int k,
                          const double* m, double* acc, double* dev, Py_ssize_t C) noexcept nogil:
    """acc[c] += the sum of (x - m[c])**2 over k (1 or 4) rows, sr bytes apart; for
    float64 data also dev[c] += the sum of x - m[c] (see _moments_run)."""
    cdef Py_ssize_t c, i
    cdef double d, s, e
    for c in range(C):
        d = _at(row, c, sc) - m[c]
        s = d * d
        e = d
        if k == 4:
            for i in range(1, 4):
                d = _at(_in(row, i * sr), c, sc) - m[c]
                s = s + d * d
                e = e + d
        acc[c] += s
        if floating is double:
            dev[c] += e


cdef inline void _block_moments(const floating* xb, Py_ssize_t nr, Py_ssize_t sr, Py_ssize_t sc,
                                Py_ssize_t C, double* bm, double* bq, double* be, double* pm,
                                double* pq, double na, Py_ssize_t nn) noexcept nogil:
    """Merge the column moments of nr rows into running (pm, pq) over na rows.

    Float64 column means are corrected by the mean deviation be / nr, as in _moments_run.
    The nn rows after the block are prefetched during the second pass, as in _numba.py.
    """
    cdef Py_ssize_t r, c, i, j
    cdef double d, f
    cdef bint unit = sc == sizeof(floating)
    for c in range(C):
        bm[c] = 0.0
        bq[c] = 0.0
        be[c] = 0.0
    # Four rows at a time: one pass over the C-long accumulators serves four rows.
    for r in range(0, nr - nr % 4, 4):
        if unit:
            _cols_add(_in(xb, r * sr), sr, sizeof(floating), 4, bm, C)
        else:
            _cols_add(_in(xb, r * sr), sr, sc, 4, bm, C)
    for r in range(nr - nr % 4, nr):
        _cols_add(_in(xb, r * sr), sr, sc, 1, bm, C)
    for c in range(C):
        bm[c] /= nr
    for r in range(0, nr - nr % 4, 4):
        if r < nn:
            for i in range(r, min(r + 4, nn)):
                for j in range((C * sc + 63) // 64):
                    __builtin_prefetch(_in(xb, (nr + i) * sr + j * 64), 0, 3)
        if unit:
            _cols_sq(_in(xb, r * sr), sr, sizeof(floating), 4, bm, bq, be, C)
        else:
            _cols_sq(_in(xb, r * sr), sr, sc, 4, bm, bq, be, C)
    for r in range(nr - nr % 4, nr):
        _cols_sq(_in(xb, r * sr), sr, sc, 1, bm, bq, be, C)
    f = nr / (na + nr)
    for c in range(C):
        if floating is double:
            bq[c] = max(bq[c] - be[c] * be[c] / nr, 0.0)
            bm[c] += be[c] / nr
        d = bm[c] - pm[c]
        pm[c] += d * f
        pq[c] += bq[c] + d * d * na * f


cdef inline double _group_moments(const floating* xb, Py_ssize_t nr, Py_ssize_t sr,
                                  Py_ssize_t sc, Py_ssize_t C, double* pm, double* pq,
                                  double na) noexcept nogil:
    """Merge the column moments of nr rows into running (pm, pq) over na rows; return the
    new count.  Four rows at a time, the group's moments merged at once (_numba.py
    takes eight; here eight made float64 1.5x slower and float32 no faster)."""
    cdef Py_ssize_t r, c
    cdef double x0, x1, x2, x3, m, d, f, g
    for r in range(0, nr - nr % 4, 4):
        f = 4.0 / (na + 4.0)
        g = na * f
        for c in range(C):
            x0 = _at(_in(xb, r * sr), c, sc)
            x1 = _at(_in(xb, (r + 1) * sr), c, sc)
            x2 = _at(_in(xb, (r + 2) * sr), c, sc)
            x3 = _at(_in(xb, (r + 3) * sr), c, sc)
            m = ((x0 + x1) + (x2 + x3)) * 0.25
            d = m - pm[c]
            pm[c] += d * f
            pq[c] += (((x0 - m) * (x0 - m) + (x1 - m) * (x1 - m))
                      + ((x2 - m) * (x2 - m) + (x3 - m) * (x3 - m))) + d * d * g
        na += 4.0
    for r in range(nr - nr % 4, nr):
        f = 1.0 / (na + 1.0)
        g = na * f
        for c in range(C):
            d = _at(_in(xb, r * sr), c, sc) - pm[c]
            pm[c] += d * f
            pq[c] += d * d * g
        na += 1.0
    return na


cdef void _reduce_moments(double[:, ::1] pn, double[:, ::1] pm, double[:, ::1] pq,
                          double[::1] mean, double[::1] var) noexcept nogil:
    # Fixed order over the partials, so a given thread count gives bit-identical results.
    cdef Py_ssize_t b, c
    cdef Moments acc
    for c in range(pn.shape[1]):
        acc.n, acc.m, acc.q = pn[0, c], pm[0, c], pq[0, c]
        for b in range(1, pn.shape[0]):
            if pn[b, c] > 0:
                acc = _merge(acc, pn[b, c], pm[b, c], pq[b, c])
        mean[c] = acc.m
        var[c] = acc.q / acc.n if acc.n > 0 else NAN


cdef void _reduce_sums(double[:, ::1] p, double[::1] out) noexcept nogil:
    cdef Py_ssize_t b, c
    cdef double acc
    for c in range(p.shape[1]):
        acc = 0.0
        for b in range(p.shape[0]):
            acc += p[b, c]
        out[c] = acc


cdef inline void _dsums_run(const floating* g, Py_ssize_t sg, const floating* v, Py_ssize_t sv,
                            Py_ssize_t n, floating m, double* s1, double* s2) noexcept nogil:
    # Local accumulators: the compiler keeps them in registers and vectorises the sums.
    cdef Py_ssize_t i
    cdef double a1 = 0.0, a2 = 0.0
    for i in range(n):
        a1 += _at(g, i, sg)
        a2 += _at(g, i, sg) * (_at(v, i, sv) - m)
    s1[0] += a1
    s2[0] += a2


cdef inline void _dsums_run4(const floating* g, Py_ssize_t cg, const floating* v, Py_ssize_t cv,
                             Py_ssize_t n, const floating* m, double* s1,
                             double* s2) noexcept nogil:
    """_dsums_run on four contiguous planes at once, cg and cv bytes apart, into s1[0:4]
    and s2[0:4]: eight streams in flight instead of two (_planes_dsums4 in _numba.py)."""
    cdef const floating* g1 = _in(g, cg)
    cdef const floating* g2 = _in(g, 2 * cg)
    cdef const floating* g3 = _in(g, 3 * cg)
    cdef const floating* v1 = _in(v, cv)
    cdef const floating* v2 = _in(v, 2 * cv)
    cdef const floating* v3 = _in(v, 3 * cv)
    cdef floating m0 = m[0], m1 = m[1], m2 = m[2], m3 = m[3]
    cdef double a1 = 0.0, a2 = 0.0, b1 = 0.0, b2 = 0.0, d1 = 0.0, d2 = 0.0, e1 = 0.0, e2 = 0.0
    cdef Py_ssize_t i
    for i in range(n):
        a1 += g[i]
        a2 += g[i] * (v[i] - m0)
        b1 += g1[i]
        b2 += g1[i] * (v1[i] - m1)
        d1 += g2[i]
        d2 += g2[i] * (v2[i] - m2)
        e1 += g3[i]
        e2 += g3[i] * (v3[i] - m3)
    s1[0] += a1
    s2[0] += a2
    s1[1] += b1
    s2[1] += b2
    s1[2] += d1
    s2[2] += d2
    s1[3] += e1
    s2[3] += e2


cdef inline void _dsums_cols(const floating* g, Py_ssize_t gr, Py_ssize_t sg, const floating* v,
                             Py_ssize_t vr, Py_ssize_t sv, int k, const floating* m,
                             double* p1, double* p2, Py_ssize_t C) noexcept nogil:
    """p1[c] += sum(g), p2[c] += sum(g * (v - m[c])) over k (1, 2 or 4) rows, gr and vr
    bytes apart."""
    cdef Py_ssize_t c
    cdef double s1, s2
    for c in range(C):
        s1 = _at(g, c, sg)
        s2 = _at(g, c, sg) * (_at(v, c, sv) - m[c])
        if k >= 2:
            s1 = s1 + _at(_in(g, gr), c, sg)
            s2 = s2 + _at(_in(g, gr), c, sg) * (_at(_in(v, vr), c, sv) - m[c])
        if k == 4:
            s1 = s1 + _at(_in(g, 2 * gr), c, sg)
            s1 = s1 + _at(_in(g, 3 * gr), c, sg)
            s2 = s2 + _at(_in(g, 2 * gr), c, sg) * (_at(_in(v, 2 * vr), c, sv) - m[c])
            s2 = s2 + _at(_in(g, 3 * gr), c, sg) * (_at(_in(v, 3 * vr), c, sv) - m[c])
        p1[c] += s1
        p2[c] += s2


cdef inline void _affine_run(const floating* v, Py_ssize_t sv, floating* o, Py_ssize_t so,
                             Py_ssize_t n, floating m, floating a, floating b) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        _out(o, i * so)[0] = (_at(v, i, sv) - m) * a + b


cdef inline void _affine_cols(const floating* v, Py_ssize_t sv, floating* o, Py_ssize_t so,
                              Py_ssize_t C, const floating* m, const floating* a,
                              const floating* b) noexcept nogil:
    """One row; m NULL is a zero center (see affine_nhwc)."""
    cdef Py_ssize_t c
    if m == NULL:
        for c in range(C):
            _out(o, c * so)[0] = _at(v, c, sv) * a[c] + b[c]
        return
    for c in range(C):
        _out(o, c * so)[0] = (_at(v, c, sv) - m[c]) * a[c] + b[c]


cdef inline void _dx_run(const floating* g, Py_ssize_t sg, const floating* v, Py_ssize_t sv,
                         floating* o, Py_ssize_t so, Py_ssize_t n, floating m, floating a,
                         floating b, floating d) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        _out(o, i * so)[0] = _at(g, i, sg) * a + (_at(v, i, sv) - m) * b + d


cdef inline void _dx_cols(const floating* g, Py_ssize_t sg, const floating* v, Py_ssize_t sv,
                          floating* o, Py_ssize_t so, Py_ssize_t C, const floating* m,
                          const floating* a, const floating* b,
                          const floating* d) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(C):
        _out(o, c * so)[0] = _at(g, c, sg) * a[c] + (_at(v, c, sv) - m[c]) * b[c] + d[c]


cdef inline Py_ssize_t _to_vector(const void* o, Py_ssize_t n, Py_ssize_t size) noexcept nogil:
    """Elements of size bytes from o to its next 32-byte boundary, at most n."""
    return min(n, ((-<size_t>o) % 32) // size)


cdef inline void _affine_stream(const floating* v, floating* o, Py_ssize_t n, floating m,
                                floating a, floating b) noexcept nogil:
    """_affine_run on contiguous runs, streaming from o's first 32-byte boundary on."""
    cdef Py_ssize_t w = 32 // sizeof(floating)
    cdef Py_ssize_t h = _to_vector(o, n, sizeof(floating))
    cdef Py_ssize_t body = (n - h) - (n - h) % w
    _affine_run(v, sizeof(floating), o, sizeof(floating), h, m, a, b)
    if floating is float:
        bn_affine_stream_f(v + h, o + h, body, m, a, b)
    else:
        bn_affine_stream_d(v + h, o + h, body, m, a, b)
    _affine_run(v + h + body, sizeof(floating), o + h + body, sizeof(floating), n - h - body,
                m, a, b)


cdef inline void _dx_stream(const floating* g, const floating* v, floating* o, Py_ssize_t n,
                            floating m, floating a, floating b, floating d) noexcept nogil:
    cdef Py_ssize_t w = 32 // sizeof(floating)
    cdef Py_ssize_t h = _to_vector(o, n, sizeof(floating))
    cdef Py_ssize_t body = (n - h) - (n - h) % w
    cdef Py_ssize_t f = sizeof(floating)
    _dx_run(g, f, v, f, o, f, h, m, a, b, d)
    if floating is float:
        bn_dx_stream_f(g + h, v + h, o + h, body, m, a, b, d)
    else:
        bn_dx_stream_d(g + h, v + h, o + h, body, m, a, b, d)
    _dx_run(g + h + body, f, v + h + body, f, o + h + body, f, n - h - body, m, a, b, d)


cdef inline bint _far_planes(Py_ssize_t size, Py_ssize_t S, Py_ssize_t itemsize) noexcept nogil:
    """As far in _plane_split of _numba.py: size elements are too many to be in cache,
    and planes of S are long enough to pipeline, or to read four at a time."""
    return size * itemsize >= FAR_BYTES and S * itemsize >= 4096


cdef inline bint _streams_planes(Py_ssize_t nbytes, Py_ssize_t S, Py_ssize_t size) noexcept nogil:
    """As in _numba.py: an output of nbytes streams when large, with planes of 4 KiB or
    more (the caller checks that the runs are contiguous)."""
    return BN_STREAM and nbytes >= STREAM_BYTES and S * size >= 4096


cdef inline bint _streams_rows(Py_ssize_t R, Py_ssize_t C, const void* out, Py_ssize_t o0,
                               Py_ssize_t o1, Py_ssize_t size) noexcept nogil:
    """As in _numba.py: large, C-contiguous, rows of whole 32-byte vectors, aligned."""
    return (BN_STREAM and R * C * size >= STREAM_BYTES and o1 == size and C * size % 32 == 0
            and o0 == C * size and (<size_t>out) % 32 == 0)


# ---------------------------------------------------------------- kernels
#
# Each kernel branches once per run (plane piece or row) on unit strides, calling
# the same inline loop with the stride as a literal; see the module docstring.

def stats_nchw(const floating[:, :, :] x, double[::1] mean, double[::1] var, int nthreads):
    """Per-channel mean and biased variance of an (N, C, S) view into float64 mean, var.

    As in _numba.py: the N * C planes are read in memory order, part k on thread k.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t s0 = x.strides[0], s1 = x.strides[1], s2 = x.strides[2]
    cdef Py_ssize_t nt = max(1, min(nthreads, N * C))
    cdef bint far = s2 == sizeof(floating) and _far_planes(N * C * S, S, sizeof(floating))
    cdef const floating* x0 = &x[0, 0, 0]
    cdef Py_ssize_t k, p, p1, c, n, t, j, c0, c1, kp, J
    cdef Py_ssize_t cb = max(1, min(C, BLOCK // max(S, 1))), ns, nb
    cdef Moments acc
    cdef double[:, :, ::1] parts  # one array: three took 1 us more of a 3 us call
    cdef double[:, ::1] pn, pm, pq
    if floating is float:
        if S < SHORT and N * C * S * sizeof(floating) < FAR_BYTES:  # as in _numba.py
            ns = max(min(nthreads, N), (N + SPAN - 1) // SPAN)
            nb = (C + cb - 1) // cb
            parts = np.zeros((3, ns, C))
            pn, pm, pq = parts[0], parts[1], parts[2]
            with nogil:
                for t in prange(ns * nb, num_threads=nthreads, schedule="static"):
                    j = t % ns
                    c0 = t // ns * cb
                    c1 = min(C, c0 + cb)
                    _batch_moments(x0, s0, s1, s2, S, j * N // ns, (j + 1) * N // ns, c0, c1,
                                   &pm[j, c0], &pq[j, c0])
                    for c in range(c0, c1):
                        pn[j, c] = ((j + 1) * N // ns - j * N // ns) * S
                _reduce_moments(pn, pm, pq, mean, var)
            return
    parts = np.zeros((3, nt, C))
    pn, pm, pq = parts[0], parts[1], parts[2]
    if far:  # pieces of at most BLOCK elements, each summed while the one before is squared
        kp = (S + BLOCK - 1) // BLOCK
        J = N * C * kp
        with nogil:
            for k in prange(nt, num_threads=nthreads, schedule="static"):
                _pipelined_moments(x0, s0, s1, C, S, kp, k * J // nt, (k + 1) * J // nt,
                                   &pn[k, 0], &pm[k, 0], &pq[k, 0])
            _reduce_moments(pn, pm, pq, mean, var)
        return
    with nogil:
        for k in prange(nt, num_threads=nthreads, schedule="static"):
            p1 = (k + 1) * N * C // nt
            for p in range(k * N * C // nt, p1):
                n = p // C
                c = p - n * C
                acc.n, acc.m, acc.q = pn[k, c], pm[k, c], pq[k, c]
                acc = _plane_moments(_in(x0, n * s0 + c * s1), S, s2, acc)
                pn[k, c], pm[k, c], pq[k, c] = acc.n, acc.m, acc.q
        _reduce_moments(pn, pm, pq, mean, var)


def stats_nhwc(const floating[:, :] x, double[::1] mean, double[::1] var, int nthreads):
    """Per-channel mean and biased variance of an (R, C) view into float64 mean, var."""
    cdef Py_ssize_t R = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t s0 = x.strides[0], s1 = x.strides[1]
    cdef Py_ssize_t nt = max(1, min(nthreads, R))
    # As in _numba.py: blocks of ~16 BLOCKs, so wide rows do not pay per-block overhead often.
    cdef Py_ssize_t rows = max(16, 16 * BLOCK // max(C, 1))
    cdef bint far = R * C * sizeof(floating) >= FAR_BYTES
    if far:
        rows = max(4, rows // 4)  # as in _numba.py
    # One allocation (small calls pay per array), grouped by thread and padded by a
    # cache line, so that two threads never write to the same line (false sharing made
    # two threads slower than one on 8192x64): per-thread partial
    # counts, means and centred squares, then scratch for block means, squares, deviations.
    cdef double[:, :, ::1] buf = np.zeros((nt, 6, C + 8))
    cdef double[:, ::1] pn = buf[:, 0, :C], pm = buf[:, 1, :C], pq = buf[:, 2, :C]
    cdef double[:, ::1] bm = buf[:, 3, :C], bq = buf[:, 4, :C], be = buf[:, 5, :C]
    cdef const floating* x0 = &x[0, 0]
    cdef Py_ssize_t k, r0, r1, nr, c
    cdef double na
    with nogil:
        for k in prange(nt, num_threads=nthreads, schedule="static"):
            na = 0.0
            r1 = (k + 1) * R // nt
            r0 = k * R // nt
            if C >= WIDE:  # as in _numba.py
                if s1 == sizeof(floating):
                    na = _group_moments(_in(x0, r0 * s0), r1 - r0, s0, sizeof(floating), C,
                                        &pm[k, 0], &pq[k, 0], 0.0)
                else:
                    na = _group_moments(_in(x0, r0 * s0), r1 - r0, s0, s1, C,
                                        &pm[k, 0], &pq[k, 0], 0.0)
                r0 = r1
            while r0 < r1:
                nr = min(rows, r1 - r0)
                _block_moments(_in(x0, r0 * s0), nr, s0, s1, C,
                               &bm[k, 0], &bq[k, 0], &be[k, 0], &pm[k, 0], &pq[k, 0], na,
                               min(rows, r1 - r0 - nr) if far else 0)
                na = na + nr
                r0 = r0 + nr
            for c in range(C):
                pn[k, c] = na
        _reduce_moments(pn, pm, pq, mean, var)


def affine_nchw(const floating[:, :, :] x, const floating[::1] center,
                const floating[::1] scale, const floating[::1] shift, floating[:, :, :] y,
                int nthreads):
    """y = (x - center[c]) * scale[c] + shift[c] on (N, C, S) views; y may be x."""
    _affine_nchw(x, center, scale, shift, y, nthreads)


# The element-wise kernels' bodies are cdef functions, so that normalise calls them on
# views it already holds, with no Python-level step between.
cdef void _affine_nchw(const floating[:, :, :] x, const floating[::1] center,
                       const floating[::1] scale, const floating[::1] shift,
                       floating[:, :, :] y, int nthreads) noexcept:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t s0 = x.strides[0], s1 = x.strides[1], s2 = x.strides[2]
    cdef Py_ssize_t o0 = y.strides[0], o1 = y.strides[1], o2 = y.strides[2]
    cdef Py_ssize_t k
    cdef Py_ssize_t cb = _channel_chunk(N, C, S, nthreads, &k)
    cdef Py_ssize_t nc = (C + cb - 1) // cb
    cdef const floating* x0 = &x[0, 0, 0]
    cdef floating* y0 = &y[0, 0, 0]
    cdef Py_ssize_t t, n, c, lo, hi
    cdef Task tk
    cdef const floating* v
    cdef floating* o
    cdef bint unit = s2 == sizeof(floating) and o2 == sizeof(floating)
    cdef bint stream = unit and _streams_planes(N * C * S * sizeof(floating), S,
                                                sizeof(floating))
    cdef Py_ssize_t tasks = N * nc * k
    cdef Py_ssize_t p, parts = _parts(tasks, stream, nthreads)
    with nogil:
        for p in prange(parts, num_threads=nthreads, schedule="static"):
            for t in range(p * tasks // parts, (p + 1) * tasks // parts):
                tk = _task(t, nc, k, cb, C, S)
                n, lo, hi = tk.n, tk.lo, tk.hi
                for c in range(tk.c0, tk.c1):
                    v = _in(x0, n * s0 + c * s1 + lo * s2)
                    o = _out(y0, n * o0 + c * o1 + lo * o2)
                    if stream:
                        _affine_stream(v, o, hi - lo, center[c], scale[c], shift[c])
                    elif unit:
                        _affine_run(v, sizeof(floating), o, sizeof(floating), hi - lo,
                                    center[c], scale[c], shift[c])
                    else:
                        _affine_run(v, s2, o, o2, hi - lo, center[c], scale[c], shift[c])
            if stream:
                bn_sfence()


cdef inline Py_ssize_t _line_elems(Py_ssize_t C, size_t itemsize) noexcept nogil:
    """Elements in C of them rounded up to whole 64-byte lines."""
    return (C * itemsize + 63) // 64 * 64 // itemsize


cdef void* _on_lines(Py_ssize_t C, const floating** v, int n) noexcept nogil:
    """Copy the n per-channel vectors v[k] into one block, each on a 64-byte boundary,
    and point v[k] at its copy; return the memory to free, or NULL, leaving v as it
    was, if there is none.  As _numba._aligned says, channels-last kernels load each
    per-channel vector once per row, and NumPy aligns small arrays to 16 bytes."""
    cdef Py_ssize_t w = _line_elems(C, sizeof(floating))
    cdef void* raw = malloc(n * w * sizeof(floating) + 63)
    cdef floating* block = <floating*> ((<uintptr_t> raw + 63) & ~(<uintptr_t> 63))
    cdef int k
    if raw != NULL:
        for k in range(n):
            memcpy(block + k * w, v[k], C * sizeof(floating))
            v[k] = block + k * w
    return raw


def affine_nhwc(const floating[:, :] x, const floating[::1] center, const floating[::1] scale,
                const floating[::1] shift, floating[:, :] y, int nthreads):
    """y = (x - center[c]) * scale[c] + shift[c] on (R, C) views; y may be x.  A
    zero-length center is zero, and rows then load two vectors, not three (the Numba
    backend's PLAIN_COLS)."""
    _affine_nhwc(x, center, scale, shift, y, nthreads)


cdef int _affine_nhwc(const floating[:, :] x, const floating[::1] center,
                      const floating[::1] scale, const floating[::1] shift, floating[:, :] y,
                      int nthreads) except -1:
    cdef Py_ssize_t R = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t s0 = x.strides[0], s1 = x.strides[1], o0 = y.strides[0], o1 = y.strides[1]
    cdef Py_ssize_t k = max(1, min(R, 8 * nthreads))
    cdef const floating* x0 = &x[0, 0]
    cdef floating* y0 = &y[0, 0]
    cdef bint unit = s1 == sizeof(floating) and o1 == sizeof(floating)
    cdef bint stream = unit and _streams_rows(R, C, y0, o0, o1, sizeof(floating))
    if stream and center.shape[0] == 0:  # the streaming stores take three vectors
        center = np.zeros(C, np.float32 if floating is float else np.float64)
    cdef int n = 3 if center.shape[0] else 2
    cdef const floating* v[3]
    v[0], v[1], v[2] = &scale[0], &shift[0], &center[0] if n == 3 else NULL
    cdef void* block = _on_lines(C, v, n)
    cdef const floating* a = v[0]
    cdef const floating* b = v[1]
    cdef const floating* m = v[2]
    cdef Py_ssize_t j, r
    with nogil:
        for j in prange(k, num_threads=nthreads, schedule="static"):
            for r in range(j * R // k, (j + 1) * R // k):
                if stream:
                    if floating is float:
                        bn_affine_stream_cols_f(_in(x0, r * s0), _out(y0, r * o0), C, m, a, b)
                    else:
                        bn_affine_stream_cols_d(_in(x0, r * s0), _out(y0, r * o0), C, m, a, b)
                elif unit:
                    _affine_cols(_in(x0, r * s0), sizeof(floating), _out(y0, r * o0),
                                 sizeof(floating), C, m, a, b)
                else:
                    _affine_cols(_in(x0, r * s0), s1, _out(y0, r * o0), o1, C, m, a, b)
            if stream:
                bn_sfence()
    free(block)
    return 0


def dsum_nchw(const floating[:, :, :] dy, const floating[:, :, :] x, const floating[::1] mean,
              double[::1] sdy, double[::1] sdyx, int nthreads):
    """Per-channel sum(dy) and sum(dy * (x - mean)) of (N, C, S) views, into float64,
    reading the planes in memory order as stats_nchw."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t s0 = x.strides[0], s1 = x.strides[1], s2 = x.strides[2]
    cdef Py_ssize_t g0 = dy.strides[0], g1 = dy.strides[1], g2 = dy.strides[2]
    cdef Py_ssize_t nt = max(1, min(nthreads, N * C))
    cdef double[:, :, ::1] parts = np.zeros((2, nt, C))
    cdef double[:, ::1] p1 = parts[0], p2 = parts[1]
    cdef const floating* x0 = &x[0, 0, 0]
    cdef const floating* d0 = &dy[0, 0, 0]
    cdef Py_ssize_t k, p, pe, c, n
    cdef const floating* g
    cdef const floating* v
    cdef bint unit = g2 == sizeof(floating) and s2 == sizeof(floating)
    cdef bint four = unit and _far_planes(N * C * S, S, sizeof(floating))  # _dsums_run4
    with nogil:
        for k in prange(nt, num_threads=nthreads, schedule="static"):
            p = k * N * C // nt
            pe = (k + 1) * N * C // nt
            while p < pe:
                n = p // C
                c = p - n * C
                g = _in(d0, n * g0 + c * g1)
                v = _in(x0, n * s0 + c * s1)
                if four and c + 4 <= C and p + 4 <= pe:
                    _dsums_run4(g, g1, v, s1, S, &mean[c], &p1[k, c], &p2[k, c])
                    p = p + 4
                    continue
                if unit:
                    _dsums_run(g, sizeof(floating), v, sizeof(floating), S, mean[c],
                               &p1[k, c], &p2[k, c])
                else:
                    _dsums_run(g, g2, v, s2, S, mean[c], &p1[k, c], &p2[k, c])
                p = p + 1
        _reduce_sums(p1, sdy)
        _reduce_sums(p2, sdyx)


def dsum_nhwc(const floating[:, :] dy, const floating[:, :] x, const floating[::1] mean,
              double[::1] sdy, double[::1] sdyx, int nthreads):
    """Per-channel sum(dy) and sum(dy * (x - mean)) of (R, C) views, into float64."""
    cdef Py_ssize_t R = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t s0 = x.strides[0], s1 = x.strides[1], g0 = dy.strides[0], g1 = dy.strides[1]
    cdef Py_ssize_t nt = max(1, min(nthreads, R))
    # Per-thread partial sums, grouped by thread and padded by a cache line (as in stats_nhwc).
    cdef double[:, :, ::1] buf = np.zeros((nt, 2, C + 8))
    cdef double[:, ::1] p1 = buf[:, 0, :C], p2 = buf[:, 1, :C]
    cdef const floating* x0 = &x[0, 0]
    cdef const floating* d0 = &dy[0, 0]
    cdef const floating* m = &mean[0]
    cdef bint unit = s1 == sizeof(floating) and g1 == sizeof(floating)
    cdef Py_ssize_t k, r, r0, r1, q
    with nogil:
        for k in prange(nt, num_threads=nthreads, schedule="static"):
            r0 = k * R // nt
            r1 = (k + 1) * R // nt
            # Four rows at a time, one from each quarter: eight streams in flight
            # (_block_dsums in _numba.py).
            q = (r1 - r0) // 4
            for r in range(r0, r0 + q):
                if unit:
                    _dsums_cols(_in(d0, r * g0), q * g0, sizeof(floating), _in(x0, r * s0),
                                q * s0, sizeof(floating), 4, m, &p1[k, 0], &p2[k, 0], C)
                else:
                    _dsums_cols(_in(d0, r * g0), q * g0, g1, _in(x0, r * s0), q * s0, s1, 4, m,
                                &p1[k, 0], &p2[k, 0], C)
            for r in range(r0 + 4 * q, r1):
                _dsums_cols(_in(d0, r * g0), g0, g1, _in(x0, r * s0), s0, s1, 1, m,
                            &p1[k, 0], &p2[k, 0], C)
        _reduce_sums(p1, sdy)
        _reduce_sums(p2, sdyx)


def dx_nchw(const floating[:, :, :] dy, const floating[:, :, :] x, const floating[::1] mean,
            const floating[::1] a, const floating[::1] b, const floating[::1] d,
            floating[:, :, :] dx, int nthreads):
    """dx = dy * a[c] + (x - mean[c]) * b[c] + d[c] on (N, C, S) views; dx may be dy."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t s0 = x.strides[0], s1 = x.strides[1], s2 = x.strides[2]
    cdef Py_ssize_t g0 = dy.strides[0], g1 = dy.strides[1], g2 = dy.strides[2]
    cdef Py_ssize_t o0 = dx.strides[0], o1 = dx.strides[1], o2 = dx.strides[2]
    cdef Py_ssize_t k
    cdef Py_ssize_t cb = _channel_chunk(N, C, S, nthreads, &k)
    cdef Py_ssize_t nc = (C + cb - 1) // cb
    cdef const floating* x0 = &x[0, 0, 0]
    cdef const floating* d0 = &dy[0, 0, 0]
    cdef floating* y0 = &dx[0, 0, 0]
    cdef Py_ssize_t t, n, c, lo, hi
    cdef Task tk
    cdef const floating* g
    cdef const floating* v
    cdef floating* o
    cdef bint unit = g2 == sizeof(floating) and s2 == sizeof(floating) and o2 == sizeof(floating)
    cdef bint stream = unit and _streams_planes(N * C * S * sizeof(floating), S,
                                                sizeof(floating))
    cdef Py_ssize_t tasks = N * nc * k
    cdef Py_ssize_t p, parts = _parts(tasks, stream, nthreads)
    with nogil:
        for p in prange(parts, num_threads=nthreads, schedule="static"):
            for t in range(p * tasks // parts, (p + 1) * tasks // parts):
                tk = _task(t, nc, k, cb, C, S)
                n, lo, hi = tk.n, tk.lo, tk.hi
                for c in range(tk.c0, tk.c1):
                    g = _in(d0, n * g0 + c * g1 + lo * g2)
                    v = _in(x0, n * s0 + c * s1 + lo * s2)
                    o = _out(y0, n * o0 + c * o1 + lo * o2)
                    if stream:
                        _dx_stream(g, v, o, hi - lo, mean[c], a[c], b[c], d[c])
                    elif unit:
                        _dx_run(g, sizeof(floating), v, sizeof(floating), o, sizeof(floating),
                                hi - lo, mean[c], a[c], b[c], d[c])
                    else:
                        _dx_run(g, g2, v, s2, o, o2, hi - lo, mean[c], a[c], b[c], d[c])
            if stream:
                bn_sfence()


def dx_nhwc(const floating[:, :] dy, const floating[:, :] x, const floating[::1] mean,
            const floating[::1] a, const floating[::1] b, const floating[::1] d,
            floating[:, :] dx, int nthreads):
    """dx = dy * a[c] + (x - mean[c]) * b[c] + d[c] on (R, C) views; dx may be dy."""
    cdef Py_ssize_t R = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t s0 = x.strides[0], s1 = x.strides[1], g0 = dy.strides[0], g1 = dy.strides[1]
    cdef Py_ssize_t o0 = dx.strides[0], o1 = dx.strides[1]
    cdef Py_ssize_t k = max(1, min(R, 8 * nthreads))
    cdef const floating* x0 = &x[0, 0]
    cdef const floating* d0 = &dy[0, 0]
    cdef floating* y0 = &dx[0, 0]
    cdef bint unit = (s1 == sizeof(floating) and g1 == sizeof(floating)
                      and o1 == sizeof(floating))
    cdef bint stream = unit and _streams_rows(R, C, y0, o0, o1, sizeof(floating))
    cdef const floating* v[4]
    v[0], v[1], v[2], v[3] = &mean[0], &a[0], &b[0], &d[0]
    cdef void* block = _on_lines(C, v, 4)
    cdef Py_ssize_t j, r
    with nogil:
        for j in prange(k, num_threads=nthreads, schedule="static"):
            for r in range(j * R // k, (j + 1) * R // k):
                if stream:
                    if floating is float:
                        bn_dx_stream_cols_f(_in(d0, r * g0), _in(x0, r * s0), _out(y0, r * o0),
                                            C, v[0], v[1], v[2], v[3])
                    else:
                        bn_dx_stream_cols_d(_in(d0, r * g0), _in(x0, r * s0), _out(y0, r * o0),
                                            C, v[0], v[1], v[2], v[3])
                elif unit:
                    _dx_cols(_in(d0, r * g0), sizeof(floating),
                             _in(x0, r * s0), sizeof(floating), _out(y0, r * o0),
                             sizeof(floating), C, v[0], v[1], v[2], v[3])
                else:
                    _dx_cols(_in(d0, r * g0), g1, _in(x0, r * s0), s1,
                             _out(y0, r * o0), o1, C, v[0], v[1], v[2], v[3])
            if stream:
                bn_sfence()
    free(block)


def _float64(v, Py_ssize_t C, double default):
    """A per-channel parameter as contiguous float64; ``default`` when zero-length (absent)."""
    return np.full(C, default) if v.shape[0] == 0 else np.ascontiguousarray(v, np.float64)


cdef inline Py_ssize_t _fused_block(Py_ssize_t C, Py_ssize_t S, int nthreads) noexcept nogil:
    """Channels per task of the fused kernels, as in _numba.py (fused_run)."""
    return max(1, min(C // (4 * nthreads), BLOCK // max(S, 1)))


cdef inline void _affine_terms(double m, double v, double g, double b, double eps,
                               floating* scale, floating* shift,
                               floating* center) noexcept nogil:
    """_algebra.center_terms and affine_terms of one channel, rounded to x's dtype."""
    cdef double a = g / sqrt(v + eps)
    center[0] = <floating>(m * (m * m > _FOLD2 * v))
    scale[0] = <floating>a
    shift[0] = <floating>(b - (m - center[0]) * a)


ctypedef struct Vector:  # a per-channel parameter, float32 or float64; n == 0 when absent
    const void* p
    bint wide
    Py_ssize_t n


cdef Vector _vector(cnp.ndarray a):
    """A contiguous 1-D float32 or float64 array as a Vector: no copy, no memoryview.
    On (2, 16, 8, 8), normalise took 2.1-2.3 us a call so, and 3.5-4.0 with a float64
    memoryview of each vector (0.2-0.3 us apiece, plus the copies of float32 ones)."""
    cdef Vector v
    v.p, v.wide, v.n = cnp.PyArray_DATA(a), cnp.PyArray_TYPE(a) == cnp.NPY_DOUBLE, a.shape[0]
    return v


cdef inline cnp.ndarray _flat(cnp.ndarray a):
    """a, or a contiguous copy where it is strided; the caller holds the result while
    a Vector points into it."""
    return a if cnp.PyArray_IS_C_CONTIGUOUS(a) else np.ascontiguousarray(a)


cdef inline double _at_c(Vector v, Py_ssize_t c, double absent) noexcept nogil:
    if v.n == 0:
        return absent
    return (<const double*>v.p)[c] if v.wide else (<const float*>v.p)[c]


cdef bint _coefficients(Vector mean, Vector var, Vector gamma, Vector beta, double eps,
                        floating[:, ::1] coef) noexcept:
    """(scale, shift, center) of every channel into coef's rows; whether every center is 0."""
    cdef Py_ssize_t c
    cdef bint zero = True
    for c in range(mean.n):
        _affine_terms(_at_c(mean, c, 0.0), _at_c(var, c, 0.0), _at_c(gamma, c, 1.0),
                      _at_c(beta, c, 0.0), eps, &coef[0, c], &coef[1, c], &coef[2, c])
        zero = zero and coef[2, c] == 0
    return zero


cdef inline double _backward_terms(double lo, double invstd, double g, double n, double sdy,
                                   double sdyx, floating* a, floating* b,
                                   floating* d) noexcept nogil:
    """_algebra.backward_terms of one channel: a, b, d rounded to x's dtype; returns
    sdyx about the mean."""
    cdef double s = sdyx - lo * sdy
    cdef double ca = invstd * g
    cdef double cb = -ca * invstd * invstd * s / n
    a[0] = <floating>ca
    b[0] = <floating>cb
    d[0] = <floating>(-ca * sdy / n - lo * cb)
    return s


cdef void _backward_coefficients(Vector mean, Vector center, Vector invstd, Vector gamma,
                                 double n, const double* sdy, double* sdyx, floating* a,
                                 floating* b, floating* d, floating* dgamma, floating* dbeta,
                                 Py_ssize_t ng) noexcept:
    cdef Py_ssize_t c
    for c in range(mean.n):
        sdyx[c] = _backward_terms(_at_c(mean, c, 0.0) - _at_c(center, c, 0.0),
                                  _at_c(invstd, c, 0.0), _at_c(gamma, c, 1.0), n, sdy[c],
                                  sdyx[c], &a[c], &b[c], &d[c])
    for c in range(ng):
        dgamma[c] = <floating>(sdyx[c] * _at_c(invstd, c, 0.0))
        dbeta[c] = <floating>sdy[c]


def backward_coefficients(cnp.ndarray mean, cnp.ndarray center, cnp.ndarray invstd,
                          cnp.ndarray gamma, double n, cnp.ndarray sdy, cnp.ndarray sdyx,
                          cnp.ndarray a, cnp.ndarray b, cnp.ndarray d, cnp.ndarray dgamma,
                          cnp.ndarray dbeta):
    """_algebra.backward_coefficients, compiled: for 64 channels its NumPy took 8.7 us a
    call, this 0.5 (5.2 with memoryviews), of a 140-220 us backward.  The outputs (sdyx,
    a, b, d, dgamma, dbeta) are contiguous, as _api makes them."""
    mean, center, invstd, gamma = _flat(mean), _flat(center), _flat(invstd), _flat(gamma)
    cdef Vector m = _vector(mean), mc = _vector(center), inv = _vector(invstd)
    cdef Vector g = _vector(gamma)
    cdef const double* s1 = <const double*>cnp.PyArray_DATA(sdy)
    cdef double* s2 = <double*>cnp.PyArray_DATA(sdyx)
    if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT:
        _backward_coefficients[float](
            m, mc, inv, g, n, s1, s2, <float*>cnp.PyArray_DATA(a), <float*>cnp.PyArray_DATA(b),
            <float*>cnp.PyArray_DATA(d), <float*>cnp.PyArray_DATA(dgamma),
            <float*>cnp.PyArray_DATA(dbeta), dgamma.shape[0])
    else:
        _backward_coefficients[double](
            m, mc, inv, g, n, s1, s2, <double*>cnp.PyArray_DATA(a),
            <double*>cnp.PyArray_DATA(b), <double*>cnp.PyArray_DATA(d),
            <double*>cnp.PyArray_DATA(dgamma), <double*>cnp.PyArray_DATA(dbeta),
            dgamma.shape[0])


cdef void _saved(const double[::1] mean, const double[::1] var, double eps,
                 floating[::1] saved_mean, floating[::1] saved_invstd) noexcept:
    cdef Py_ssize_t c
    for c in range(mean.shape[0]):
        saved_mean[c] = <floating>mean[c]
        saved_invstd[c] = <floating>(1.0 / sqrt(var[c] + eps))  # _algebra.invstd_terms


cdef void _blend(floating[:] running, const double[::1] stat, double momentum,
                 double factor) noexcept:
    cdef Py_ssize_t c
    for c in range(running.shape[0]):  # _algebra.running_terms
        running[c] = <floating>((1.0 - momentum) * running[c] + momentum * factor * stat[c])


def _blend_into(running, stat, double momentum, double factor):
    if running.dtype == np.float32:
        _blend[float](running, stat, momentum, factor)
    else:
        _blend[double](running, stat, momentum, factor)


def running_update(mean, var, double eps, double momentum, double var_factor, running_mean,
                   running_var, saved_mean, saved_invstd):
    """_algebra.running_update, compiled: on a (2, 16, 8, 8) training forward its NumPy
    took 6.6 us of 21.  The running statistics may each be x's dtype or float64."""
    if saved_mean.dtype == np.float32:
        _saved[float](mean, var, eps, saved_mean, saved_invstd)
    else:
        _saved[double](mean, var, eps, saved_mean, saved_invstd)
    if running_mean.shape[0]:
        _blend_into(running_mean, mean, momentum, 1.0)
        _blend_into(running_var, var, momentum, var_factor)


def normalise(x, cnp.ndarray mean, cnp.ndarray var, cnp.ndarray gamma, cnp.ndarray beta,
              double eps, y, int nthreads):
    """affine_coefficients, then affine_nchw on (N, C, S) views or affine_nhwc on (R, C)
    ones (with a zero-length center where every center is 0), as in _numba.py.

    In one call: the NumPy algebra and its three arrays took about 9 us of a 55 us
    inference on 8x32x32x64 (NHWC), and calling the kernel from here another 2 us of
    (2, 16, 8, 8)'s 9.  The per-channel vectors (float32 or float64, as the API allows)
    are read where they lie.
    """
    coef = np.empty((3, mean.shape[0]), x.dtype)
    mean, var, gamma, beta = _flat(mean), _flat(var), _flat(gamma), _flat(beta)
    cdef Vector m = _vector(mean), v = _vector(var), g = _vector(gamma), b = _vector(beta)
    if x.dtype == np.float32:
        if x.ndim == 3:
            _normalise_nchw[float](x, m, v, g, b, eps, coef, y, nthreads)
        else:
            _normalise_nhwc[float](x, m, v, g, b, eps, coef, y, nthreads)
    elif x.ndim == 3:
        _normalise_nchw[double](x, m, v, g, b, eps, coef, y, nthreads)
    else:
        _normalise_nhwc[double](x, m, v, g, b, eps, coef, y, nthreads)


cdef void _normalise_nchw(const floating[:, :, :] x, Vector mean, Vector var, Vector gamma,
                          Vector beta, double eps, floating[:, ::1] coef,
                          floating[:, :, :] y, int nthreads) noexcept:
    _coefficients(mean, var, gamma, beta, eps, coef)
    _affine_nchw(x, coef[2], coef[0], coef[1], y, nthreads)


cdef int _normalise_nhwc(const floating[:, :] x, Vector mean, Vector var, Vector gamma,
                         Vector beta, double eps, floating[:, ::1] coef, floating[:, :] y,
                         int nthreads) except -1:
    if _coefficients(mean, var, gamma, beta, eps, coef):
        return _affine_nhwc(x, coef[2, :0], coef[0], coef[1], y, nthreads)
    return _affine_nhwc(x, coef[2], coef[0], coef[1], y, nthreads)


def train_nchw(x, gamma, beta, double eps, mean, var, y, int nthreads):
    """stats_nchw and the normalisation in one pass over memory, as in _numba.py.

    Each task normalises its block of channels right after summing it, while it is in cache.
    """
    C = x.shape[1]
    _train_nchw(x, _float64(gamma, C, 1.0), _float64(beta, C, 0.0), eps, mean, var,
                np.empty((3, C), x.dtype), y, nthreads)


def _train_nchw(const floating[:, :, :] x, const double[::1] gamma, const double[::1] beta,
                double eps, double[::1] mean, double[::1] var, floating[:, ::1] coef,
                floating[:, :, :] y, int nthreads):
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t s0 = x.strides[0], s1 = x.strides[1], s2 = x.strides[2]
    cdef Py_ssize_t o0 = y.strides[0], o1 = y.strides[1], o2 = y.strides[2]
    cdef Py_ssize_t cb = _fused_block(C, S, nthreads)
    cdef const floating* x0 = &x[0, 0, 0]
    cdef floating* y0 = &y[0, 0, 0]
    cdef Py_ssize_t t, c, n
    cdef Moments acc
    cdef const floating* v
    cdef floating* o
    with nogil:
        for t in prange((C + cb - 1) // cb, num_threads=nthreads, schedule="static"):
            if floating is float and S < SHORT:
                _batch_moments(x0, s0, s1, s2, S, 0, N, t * cb, min(C, t * cb + cb),
                               &mean[t * cb], &var[t * cb])
            else:
                for c in range(t * cb, min(C, t * cb + cb)):
                    mean[c] = 0.0
                    var[c] = 0.0
                # Batch entry by batch entry, the block's planes lie next to each other.
                for n in range(N):
                    for c in range(t * cb, min(C, t * cb + cb)):
                        acc.n, acc.m, acc.q = <double>(n * S), mean[c], var[c]
                        acc = _plane_moments(_in(x0, n * s0 + c * s1), S, s2, acc)
                        mean[c], var[c] = acc.m, acc.q
            for c in range(t * cb, min(C, t * cb + cb)):
                var[c] = var[c] / (N * S)
                _affine_terms(mean[c], var[c], gamma[c], beta[c], eps, &coef[0, c],
                              &coef[1, c], &coef[2, c])
            for n in range(N):
                for c in range(t * cb, min(C, t * cb + cb)):
                    v = _in(x0, n * s0 + c * s1)
                    o = _out(y0, n * o0 + c * o1)
                    if s2 == sizeof(floating) and o2 == sizeof(floating):
                        _affine_run(v, sizeof(floating), o, sizeof(floating), S,
                                    coef[2, c], coef[0, c], coef[1, c])
                    else:
                        _affine_run(v, s2, o, o2, S, coef[2, c], coef[0, c], coef[1, c])


def backward_nchw(dy, x, center, mean, invstd, gamma, sdy, sdyx, dgamma, dbeta, dx,
                  int nthreads):
    """dsum_nchw, backward_coefficients and dx_nchw in one pass over memory, as in _numba.py.

    The dx coefficients are computed inline, per channel, inside the parallel loop;
    backward_coefficients then fills dgamma and dbeta from the sums.
    """
    C = x.shape[1]
    scratch = np.empty((3, C), x.dtype)
    _backward_nchw(dy, x, center, np.asarray(mean, np.float64) - center,
                   np.ascontiguousarray(invstd, np.float64), _float64(gamma, C, 1.0),
                   sdy, sdyx, scratch, dx, nthreads)
    backward_coefficients(mean, center, invstd, gamma, x.shape[0] * x.shape[2], sdy, sdyx,
                          *scratch, dgamma, dbeta)


def _backward_nchw(const floating[:, :, :] dy, const floating[:, :, :] x,
                   const floating[::1] center, const double[::1] lo, const double[::1] invstd,
                   const double[::1] gamma, double[::1] sdy, double[::1] sdyx,
                   floating[:, ::1] coef, floating[:, :, :] dx, int nthreads):
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t s0 = x.strides[0], s1 = x.strides[1], s2 = x.strides[2]
    cdef Py_ssize_t g0 = dy.strides[0], g1 = dy.strides[1], g2 = dy.strides[2]
    cdef Py_ssize_t o0 = dx.strides[0], o1 = dx.strides[1], o2 = dx.strides[2]
    cdef bint unit = (s2 == sizeof(floating) and g2 == sizeof(floating)
                      and o2 == sizeof(floating))
    cdef Py_ssize_t cb = _fused_block(C, S, nthreads)
    cdef const floating* x0 = &x[0, 0, 0]
    cdef const floating* d0 = &dy[0, 0, 0]
    cdef floating* y0 = &dx[0, 0, 0]
    cdef double count = <double>(N * S)
    cdef Py_ssize_t t, c, n
    cdef const floating* g
    cdef const floating* v
    with nogil:
        for t in prange((C + cb - 1) // cb, num_threads=nthreads, schedule="static"):
            for c in range(t * cb, min(C, t * cb + cb)):
                sdy[c] = 0.0
                sdyx[c] = 0.0  # about the centre; backward_coefficients moves it to the mean
            for n in range(N):
                for c in range(t * cb, min(C, t * cb + cb)):
                    g = _in(d0, n * g0 + c * g1)
                    v = _in(x0, n * s0 + c * s1)
                    if unit:
                        _dsums_run(g, sizeof(floating), v, sizeof(floating), S, center[c],
                                   &sdy[c], &sdyx[c])
                    else:
                        _dsums_run(g, g2, v, s2, S, center[c], &sdy[c], &sdyx[c])
            for c in range(t * cb, min(C, t * cb + cb)):
                _backward_terms(lo[c], invstd[c], gamma[c], count, sdy[c], sdyx[c],
                                &coef[0, c], &coef[1, c], &coef[2, c])
            for n in range(N):
                for c in range(t * cb, min(C, t * cb + cb)):
                    g = _in(d0, n * g0 + c * g1)
                    v = _in(x0, n * s0 + c * s1)
                    if unit:
                        _dx_run(g, sizeof(floating), v, sizeof(floating),
                                _out(y0, n * o0 + c * o1), sizeof(floating), S, center[c],
                                coef[0, c], coef[1, c], coef[2, c])
                    else:
                        _dx_run(g, g2, v, s2, _out(y0, n * o0 + c * o1), o2, S, center[c],
                                coef[0, c], coef[1, c], coef[2, c])
