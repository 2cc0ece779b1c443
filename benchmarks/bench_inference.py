"""Inference with running statistics, and the folded per-channel affine."""

import bn_fast as bnf

from .common import EPS, Benchmark


class Inference(Benchmark):
    def prepare(self):
        self.scale, self.shift = bnf.fold_affine(self.gamma, self.beta, self.running_mean,
                                                 self.running_var, eps=EPS)

    def warm(self):
        self.time_infer()
        self.time_apply_affine()

    def time_infer(self, *params):
        bnf.batch_norm_infer(self.x, self.gamma, self.beta, self.running_mean,
                             self.running_var, eps=EPS, layout=self.layout)

    def peakmem_infer(self, *params):
        self.time_infer()

    def time_apply_affine(self, *params):
        bnf.apply_affine(self.x, self.scale, self.shift, layout=self.layout)

    def peakmem_apply_affine(self, *params):
        self.time_apply_affine()
