"""Backward in training mode: dx, dgamma and dbeta from the batch statistics."""

import functools

import bn_fast as bnf

from .common import Benchmark, activations


@functools.cache
def batch_stats(backend, layout, dtype, shape):
    """mean and invstd of the forward input, from the training forward (once per process)."""
    _, mean, invstd = bnf.batch_norm_train(activations(layout, dtype, shape), layout=layout)
    return mean, invstd


class Backward(Benchmark):
    def prepare(self):
        _, layout, dtype, shape = self.case
        self.dy = activations(layout, dtype, shape, seed=1)
        self.mean, self.invstd = batch_stats(*self.case)

    def warm(self):
        self.time_backward()

    def time_backward(self, *params):
        bnf.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.gamma,
                                layout=self.layout)

    def peakmem_backward(self, *params):
        self.time_backward()
