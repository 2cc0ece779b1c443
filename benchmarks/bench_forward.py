"""Training forward: batch statistics, normalised output, running statistics updated."""

import bn_fast as bnf

from .common import EPS, MOMENTUM, Benchmark


class TrainForward(Benchmark):
    def warm(self):
        self.time_train()

    def time_train(self, *params):
        bnf.batch_norm_train(self.x, self.gamma, self.beta, running_mean=self.running_mean,
                             running_var=self.running_var, momentum=MOMENTUM, eps=EPS,
                             layout=self.layout)

    def peakmem_train(self, *params):
        self.time_train()
