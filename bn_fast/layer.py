"""BatchNorm: a stateful layer for NumPy training loops, with PyTorch's semantics."""

import numbers

import numpy as np

from ._api import batch_norm_backward, batch_norm_infer, batch_norm_train
from ._checks import FLOATS, check_eps, check_layout, check_momentum
from .fold import fold_affine


class BatchNorm:
    """Batch normalization over the channel axis, like ``torch.nn.BatchNorm{1,2,3}d``.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float
    momentum : float in [0, 1]
        Weight of the new batch statistic in the running averages (PyTorch's
        convention; Keras/ONNX momentum m corresponds to ``1 - m``).
    affine : bool
        Learnable ``gamma`` (ones) and ``beta`` (zeros); False means none.
    track_running_stats : bool
        Keep ``running_mean`` (zeros) and ``running_var`` (ones); without them
        the layer normalises with batch statistics in eval mode too.
    layout : {"NCHW", "NHWC"}
    dtype : float32 or float64
        dtype of the parameters and running statistics.

    Examples
    --------
    >>> bn = BatchNorm(3)
    >>> x = np.random.default_rng(0).standard_normal((4, 3, 5, 5), dtype=np.float32)
    >>> y = bn.forward(x)
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.dgamma.shape, bn.eval().training
    ((3,), False)
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, layout="NCHW", dtype=np.float32):
        if (isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral)
                or num_features < 1):
            raise ValueError(f"num_features={num_features!r} must be a positive integer")
        dtype = np.dtype(dtype)
        if dtype not in FLOATS:
            raise TypeError(f"dtype={dtype} is not supported; expected float32 or float64")
        C = int(num_features)
        self.num_features = C
        self.dtype = dtype
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.layout = check_layout(layout)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.gamma = np.ones(C, dtype) if affine else None
        self.beta = np.zeros(C, dtype) if affine else None
        self.running_mean = np.zeros(C, dtype) if track_running_stats else None
        self.running_var = np.ones(C, dtype) if track_running_stats else None
        self.dgamma = None
        self.dbeta = None
        self.training = True
        self._saved = None

    def train(self, mode=True):
        """Switch to training mode (batch statistics); returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Switch to eval mode (running statistics); returns self."""
        return self.train(False)

    def forward(self, x):
        """Normalise x; in training mode also update the running statistics."""
        if self.training or not self.track_running_stats:
            y, mean, invstd = batch_norm_train(
                x, self.gamma, self.beta,
                running_mean=self.running_mean if self.training else None,
                running_var=self.running_var if self.training else None,
                momentum=self.momentum, eps=self.eps, layout=self.layout)
            self._saved = (x, mean, invstd, True)
        else:
            y = batch_norm_infer(x, self.gamma, self.beta, self.running_mean, self.running_var,
                                 eps=self.eps, layout=self.layout)
            invstd = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
            self._saved = (x, self.running_mean, invstd, False)
        return y

    __call__ = forward

    def backward(self, dy):
        """Gradient with respect to the last forward's input; sets ``dgamma``, ``dbeta``."""
        if self._saved is None:
            raise RuntimeError("backward() called before forward()")
        x, mean, invstd, training = self._saved
        dx, self.dgamma, self.dbeta = batch_norm_backward(
            dy, x, mean, invstd, self.gamma, training=training, layout=self.layout)
        return dx

    def fold(self):
        """``(scale, shift)`` such that eval-mode ``forward(x) == x * scale + shift``."""
        if not self.track_running_stats:
            raise ValueError("fold() needs running statistics (track_running_stats=True)")
        return fold_affine(self.gamma, self.beta, self.running_mean, self.running_var,
                           eps=self.eps)

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"layout={self.layout!r}, dtype={self.dtype})")
