"""Memory for large outputs, recycled once the caller has dropped them.

A freshly allocated 100 MB output costs nearly as much as the batch norm that
fills it: the kernel's first touch of each new page makes the operating system
map and zero it, 4 ms of a 10 ms inference here.  Like PyTorch's CUDA caching
allocator, bn_fast keeps the memory of large outputs the caller no longer
references and hands it out again for the next output of the same size.

Only memory nobody uses is reused: each output is an array over a small lease
object, and a weak reference to the lease returns the memory when the last
array that uses it (views included) is gone.  At most ``BN_FAST_CACHE_MB``
megabytes (default 1024; 0 turns recycling off) of dropped outputs are kept,
the oldest given back to the system first.  Outputs below MIN_BYTES are plain
``np.empty`` arrays.
"""

import math
import os
import threading
import weakref

import numpy as np


def _glibc():
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):  # not POSIX, or another C library
        return False


# Smaller outputs come from malloc.  glibc's serves sizes up to 32 MiB from its heap
# once one has been freed (its mmap threshold adapts up to that), reusing the pages,
# and that was 3-7% faster than this cache on 12.8-16.8 MB outputs: the cache's
# bookkeeping ran cold, right after a kernel had streamed through the CPU caches.
# Other C libraries map and unmap large blocks every time.
MIN_BYTES = (1 << 25) if _glibc() else (1 << 22)
ALIGN = 64


def _limit_from_env():
    text = os.environ.get("BN_FAST_CACHE_MB", "1024")
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise ValueError(f"BN_FAST_CACHE_MB={text!r}: expected a number of megabytes >= 0")
    return int(mb * 2**20)


class _Lease:
    """The base of one output array; its death returns ``raw`` to the cache."""

    __slots__ = ("__array_interface__", "raw", "__weakref__")


class OutputCache:
    def __init__(self, limit):
        self.limit = limit
        self._free = []      # dropped buffers, oldest first
        self._lent = {}      # id(weakref) -> (weakref, buffer) for outputs in use
        self._returned = []  # buffers whose outputs died, not yet in _free
        self._lock = threading.Lock()

    def empty(self, shape, dtype, nbytes=None):
        """An uninitialised C-contiguous array, like ``np.empty(shape, dtype)``.

        ``nbytes``, its size, may be given when known: small calls then pay nothing.
        """
        if nbytes is None:
            nbytes = np.dtype(dtype).itemsize * math.prod(shape)
        if nbytes < MIN_BYTES or self.limit < nbytes:
            return np.empty(shape, dtype)
        dtype = np.dtype(dtype)
        raw = self._take(nbytes)
        if raw is None:
            raw = np.empty(nbytes + ALIGN, np.uint8)
        lease = _Lease()
        lease.raw = raw
        lease.__array_interface__ = {"data": (raw.ctypes.data + -raw.ctypes.data % ALIGN, False),
                                     "shape": tuple(shape), "typestr": dtype.str, "version": 3}
        ref = weakref.ref(lease, self._on_death)
        self._lent[id(ref)] = (ref, raw)
        return np.asarray(lease)

    def _on_death(self, ref):
        # Runs wherever the last view dies, possibly inside another call of this
        # cache (garbage collection): only operations that are atomic under the GIL.
        raw = self._lent.pop(id(ref))[1]
        if self.kept_bytes() + raw.nbytes <= self.limit:
            self._returned.append(raw)

    def _take(self, nbytes):
        with self._lock:
            while self._returned:
                self._free.append(self._returned.pop())
            for i in range(len(self._free) - 1, -1, -1):
                if self._free[i].nbytes == nbytes + ALIGN:
                    return self._free.pop(i)
            kept = sum(r.nbytes for r in self._free)
            while self._free and kept + nbytes > self.limit:
                kept -= self._free.pop(0).nbytes  # make room for the buffer about to be made
        return None

    def clear(self):
        """Give every dropped buffer back to the system."""
        with self._lock:
            while self._returned:
                self._returned.pop()
            self._free.clear()

    def kept_bytes(self):
        """Bytes of dropped outputs currently kept for reuse."""
        return sum(r.nbytes for r in list(self._free) + list(self._returned))


cache = OutputCache(_limit_from_env())
empty = cache.empty
