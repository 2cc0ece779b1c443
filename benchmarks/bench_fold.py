"""Folding inference-mode batch norm: into a per-channel affine, and into conv weights.

Folding is NumPy code on parameters (no kernels), so there is no backend parameter.
"""

import numpy as np

import bn_fast as bnf

from .common import DTYPES, EPS, channel_params

# ResNet-50 / MobileNet-like layers: (out, in/groups, kh, kw, groups)
CONVS = {
    "stem 7x7 3->64": (64, 3, 7, 7, 1),
    "3x3 512->512": (512, 512, 3, 3, 1),
    "1x1 512->2048": (2048, 512, 1, 1, 1),
    "depthwise 3x3 960": (960, 1, 3, 3, 960),
}


class FoldAffine:
    params = [DTYPES, [64, 256, 2048]]
    param_names = ["dtype", "channels"]

    def setup(self, dtype, channels):
        self.bn = channel_params(channels, dtype)
        self.time_fold_affine()

    def time_fold_affine(self, *params):
        bnf.fold_affine(*self.bn, eps=EPS)

    def peakmem_fold_affine(self, *params):
        self.time_fold_affine()


class FoldConv:
    """fold_conv_bn (BN after the layer) and fold_bn_conv (BN before it), when present."""

    params = [["fold_conv_bn", "fold_bn_conv"], ["OIHW", "HWIO"], DTYPES, list(CONVS)]
    param_names = ["function", "weight_layout", "dtype", "conv"]

    def setup(self, function, weight_layout, dtype, conv):
        self.fold = getattr(bnf, function, None)
        if self.fold is None:
            raise NotImplementedError(f"bn_fast.{function} does not exist in this version")
        out, in_per_group, kh, kw, groups = CONVS[conv]
        shape = ((out, in_per_group, kh, kw) if weight_layout == "OIHW"
                 else (kh, kw, in_per_group, out))
        rng = np.random.default_rng(0)
        self.weight = rng.standard_normal(shape, dtype=dtype)
        self.bias = rng.standard_normal(out, dtype=dtype)
        self.bn = channel_params(out if function == "fold_conv_bn" else in_per_group * groups,
                                 dtype)
        self.weight_layout = weight_layout
        self.groups = groups
        self.time_fold()

    def time_fold(self, *params):
        self.fold(self.weight, self.bias, *self.bn, eps=EPS, weight_layout=self.weight_layout,
                  groups=self.groups)

    def peakmem_fold(self, *params):
        self.time_fold()
