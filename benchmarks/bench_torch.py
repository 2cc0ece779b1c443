"""PyTorch's CPU batch norm on the same inputs, so the history shows bn_fast's ratio to it.

``torch.nn.functional.batch_norm`` in training forward, inference and backward
(autograd: dx, dgamma and dbeta, like ``batch_norm_backward``), with as many
threads as bn_fast uses.  NCHW inputs are contiguous tensors; NHWC inputs are the
same (N, H, W, C) arrays seen as (N, C, H, W) in ``torch.channels_last`` memory
format, without a copy.  Skipped when PyTorch is not installed (asv's
environments do not install it: PyPI's Linux wheel pulls in CUDA); run the suite
with ``--python=same`` in an environment that has it.

Kept short, since every benchmark process pays PyTorch's ~2 s import: float32
only (what models train in) and no ``peakmem_``, whose number would be mostly
PyTorch's own import (hundreds of MB) rather than batch norm's buffers.
"""

import functools

import bn_fast as bnf

from .common import (
    EPS,
    LAYOUTS,
    MOMENTUM,
    SHAPES,
    activations,
    channel_params,
    once,
    skip_unsupported,
)


def _torch():
    try:
        import torch
    except ImportError:
        raise NotImplementedError("PyTorch is not installed") from None
    return torch


@functools.cache
def tensors(layout, dtype, shape):
    """x, gamma, beta, running stats, the autograd graph of a training forward, and dy.

    Built once per process: asv re-runs setup before every timed call.
    """
    torch = _torch()

    def tensor(a):
        t = torch.from_numpy(a)
        return t if layout == "NCHW" else t.movedim(-1, 1)

    x = tensor(activations(layout, dtype, shape))
    bn = [torch.from_numpy(a) for a in channel_params(shape[1], dtype)]
    leaves = (x.detach().requires_grad_(), bn[0].detach().requires_grad_(),
              bn[1].detach().requires_grad_())
    y = torch.nn.functional.batch_norm(leaves[0], bn[2].clone(), bn[3].clone(), *leaves[1:],
                                       training=True, momentum=MOMENTUM, eps=EPS)
    return x, bn, leaves, y, tensor(activations(layout, dtype, shape, seed=1))


class TorchBatchNorm:
    params = [LAYOUTS, ["float32"], SHAPES]
    param_names = ["layout", "dtype", "shape"]
    timeout = 120

    def setup(self, layout, dtype, shape):
        skip_unsupported(None, layout, dtype, shape)
        self.torch = _torch()
        self.torch.set_num_threads(bnf.get_num_threads())
        self.x, self.bn, self.leaves, self.y, self.dy = tensors(layout, dtype, shape)
        once((layout, dtype, shape), self.warm)

    def warm(self):
        self.time_train()
        self.time_infer()
        self.time_backward()

    def time_train(self, *params):
        gamma, beta, running_mean, running_var = self.bn
        self.torch.nn.functional.batch_norm(self.x, running_mean, running_var, gamma, beta,
                                            training=True, momentum=MOMENTUM, eps=EPS)

    def time_infer(self, *params):
        gamma, beta, running_mean, running_var = self.bn
        self.torch.nn.functional.batch_norm(self.x, running_mean, running_var, gamma, beta,
                                            training=False, eps=EPS)

    def time_backward(self, *params):
        self.torch.autograd.grad(self.y, self.leaves, self.dy, retain_graph=True)
