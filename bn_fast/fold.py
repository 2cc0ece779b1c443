"""Folding batch norm into a per-channel affine (and into neighbouring layers).

All arithmetic is done in float64, so folding adds no error beyond the final
rounding to the result dtype; inputs are never modified.
"""

import math
import numbers

import numpy as np

from ._checks import check_eps, check_float_array


def _channel_vector(name, a, channels):
    a = check_float_array(name, a)
    if a.ndim != 1 or (channels is not None and a.shape[0] != channels):
        expected = "a 1-D array" if channels is None else f"shape ({channels},)"
        raise ValueError(f"{name} has shape {a.shape}, expected {expected}")
    return a


def _bn_params(gamma, beta, running_mean, running_var):
    """Check the four BN vectors; return them (gamma/beta may be None) and their dtype."""
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        if v is None:
            raise ValueError(f"{name} is required (got None)")
    running_mean = _channel_vector("running_mean", running_mean, None)
    C = running_mean.shape[0]
    running_var = _channel_vector("running_var", running_var, C)
    gamma = None if gamma is None else _channel_vector("gamma", gamma, C)
    beta = None if beta is None else _channel_vector("beta", beta, C)
    dtype = np.result_type(*[v for v in (gamma, beta, running_mean, running_var)
                             if v is not None])
    return gamma, beta, running_mean, running_var, dtype


def _affine64(gamma, beta, running_mean, running_var, eps):
    C = running_mean.shape[0]
    g = np.ones(C) if gamma is None else gamma.astype(np.float64)
    b = np.zeros(C) if beta is None else beta.astype(np.float64)
    scale = g / np.sqrt(running_var.astype(np.float64) + eps)
    return scale, b - running_mean.astype(np.float64) * scale


def fold_affine(gamma, beta, running_mean, running_var, *, eps=1e-5):
    """Fold inference-mode batch norm into one per-channel affine ``y = x * scale + shift``.

    Parameters
    ----------
    gamma, beta : ndarray (C,) or None (1 and 0)
    running_mean, running_var : ndarray (C,)
    eps : float > 0

    Returns
    -------
    scale, shift : ndarray (C,)
        In the widest dtype of the inputs; computed in float64.
        ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - running_mean * scale``.

    Examples
    --------
    >>> scale, shift = fold_affine(None, None, np.zeros(2), np.ones(2), eps=0.0625)
    >>> scale.round(4).tolist(), shift.tolist()
    ([0.9701, 0.9701], [0.0, 0.0])
    """
    eps = check_eps(eps)
    gamma, beta, running_mean, running_var, dtype = _bn_params(
        gamma, beta, running_mean, running_var)
    scale, shift = _affine64(gamma, beta, running_mean, running_var, eps)
    return scale.astype(dtype), shift.astype(dtype)


# ------------------------------------------------ folding into Conv, ConvTranspose, Linear

WEIGHT_LAYOUTS = {
    "OIHW": "(out, in/groups, *kernel)",
    "IOHW": "(in, out/groups, *kernel)",
    "HWIO": "(*kernel, in/groups, out)",
}


def _grouped(weight, weight_layout, groups):
    """Check a float ndarray weight against its layout and groups.

    Returns a float64 copy viewed as ``(groups, out/groups, in/groups, kernel_size)``
    and the layer's output and input channel counts.
    """
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout={weight_layout!r} is not supported; "
                         f"expected one of {tuple(WEIGHT_LAYOUTS)}")
    shape = weight.shape
    if weight.ndim < 2:
        raise ValueError(f"weight has shape {shape} (rank {weight.ndim}), expected rank >= 2: "
                         f"{WEIGHT_LAYOUTS[weight_layout]} for weight_layout={weight_layout!r}")
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool):
        raise TypeError(f"groups={groups!r} must be an integer >= 1")
    if groups < 1:
        raise ValueError(f"groups={groups!r} must be an integer >= 1")
    groups = int(groups)
    if weight_layout == "HWIO":
        kernel, per_group, whole = shape[:-2], shape[-2], shape[-1]
    else:
        kernel, whole, per_group = shape[2:], shape[0], shape[1]
    whole_side = "input" if weight_layout == "IOHW" else "output"
    if whole % groups:
        raise ValueError(
            f"groups={groups} does not divide the {whole} {whole_side} channels of weight "
            f"with shape {shape} (weight_layout={weight_layout!r}: "
            f"{WEIGHT_LAYOUTS[weight_layout]})")
    ksize = math.prod(kernel)
    w = weight.astype(np.float64)
    if weight_layout == "OIHW":
        w4 = w.reshape(groups, whole // groups, per_group, ksize)
    elif weight_layout == "IOHW":
        w4 = w.reshape(groups, whole // groups, per_group, ksize).transpose(0, 2, 1, 3)
    else:
        w4 = w.reshape(ksize, per_group, groups, whole // groups).transpose(2, 3, 1, 0)
    _, out_per_group, in_per_group, _ = w4.shape
    return w4, groups * out_per_group, groups * in_per_group


def _ungrouped(w4, weight, weight_layout):
    """Inverse of :func:`_grouped`: back to weight's layout, shape and dtype, C-contiguous."""
    if weight_layout == "IOHW":
        w4 = w4.transpose(0, 2, 1, 3)
    elif weight_layout == "HWIO":
        w4 = w4.transpose(3, 2, 0, 1)
    return w4.reshape(weight.shape).astype(weight.dtype, order="C")


def _fold_args(weight, bias, gamma, beta, running_mean, running_var, eps, weight_layout,
               groups, bn_side):
    """Validate everything for fold_conv_bn / fold_bn_conv before any arithmetic."""
    eps = check_eps(eps)
    weight = check_float_array("weight", weight)
    w4, n_out, n_in = _grouped(weight, weight_layout, groups)
    gamma, beta, running_mean, running_var, _ = _bn_params(
        gamma, beta, running_mean, running_var)
    context = (f"channels of weight with shape {weight.shape}, "
               f"weight_layout={weight_layout!r}, groups={groups}")
    channels = n_out if bn_side == "output" else n_in
    if running_mean.shape[0] != channels:
        raise ValueError(f"running_mean has shape {running_mean.shape}, expected ({channels},) "
                         f"(the BN normalises the {bn_side} {context})")
    if bias is None:
        bias = np.zeros(n_out)
    else:
        bias = check_float_array("bias", bias)
        if bias.shape != (n_out,):
            raise ValueError(f"bias has shape {bias.shape}, expected ({n_out},) "
                             f"(output {context})")
    scale, shift = _affine64(gamma, beta, running_mean, running_var, eps)
    return weight, w4, bias.astype(np.float64), scale, shift


def fold_conv_bn(weight, bias, gamma, beta, running_mean, running_var, *, eps=1e-5,
                 weight_layout="OIHW", groups=1):
    """Fold an inference-mode batch norm that follows a Conv, ConvTranspose or Linear layer.

    ``BN(layer(x, weight) + bias) == layer(x, W2) + b2`` for every input, whatever
    the layer's stride, padding, dilation or output padding: BN scales and shifts
    each output channel, and so does rescaling that channel's filters and bias.

    Parameters
    ----------
    weight : ndarray, float32 or float64, rank >= 2
        The layer's weight in ``weight_layout``:

        - ``"OIHW"``: ``(out, in/groups, *kernel)``: PyTorch Conv1d/2d/3d, Linear ``(out, in)``.
        - ``"IOHW"``: ``(in, out/groups, *kernel)``: PyTorch ConvTranspose1d/2d/3d.
        - ``"HWIO"``: ``(*kernel, in/groups, out)``: TensorFlow/Keras Conv1D/2D/3D,
          Dense ``(in, out)``.
    bias : ndarray (out,) or None
        None means no bias (zeros).
    gamma, beta : ndarray (out,) or None
        BN scale and shift; None means 1 and 0 (``affine=False``).
    running_mean, running_var : ndarray (out,)
    eps : float > 0
    weight_layout : {"OIHW", "IOHW", "HWIO"}
    groups : int >= 1
        As in the layer; depthwise is ``groups=in``.  Output channel ``o`` belongs
        to group ``o // (out/groups)``, input channel ``i`` to group ``i // (in/groups)``.

    Returns
    -------
    W2 : ndarray, weight's shape and dtype (C-contiguous)
    b2 : ndarray (out,), weight's dtype
        ``W2 = weight * scale`` along the output channels and ``b2 = bias * scale + shift``,
        with ``scale = gamma / sqrt(running_var + eps)`` and
        ``shift = beta - running_mean * scale``, computed in float64.

    See Also
    --------
    fold_bn_conv : the batch norm comes before the layer.
    fold_affine : the per-channel scale and shift alone.

    Examples
    --------
    A Linear layer ``(out=2, in=3)`` followed by BN:

    >>> W = np.arange(6.0).reshape(2, 3)
    >>> W2, b2 = fold_conv_bn(W, None, None, np.array([1.0, -1.0]),
    ...                       np.zeros(2), np.array([3.75, 0.0]), eps=0.25)
    >>> W2.tolist(), b2.tolist()
    ([[0.0, 0.5, 1.0], [6.0, 8.0, 10.0]], [1.0, -1.0])
    """
    weight, w4, bias, scale, shift = _fold_args(
        weight, bias, gamma, beta, running_mean, running_var, eps, weight_layout, groups,
        "output")
    groups, out_per_group = w4.shape[:2]
    w2 = w4 * scale.reshape(groups, out_per_group, 1, 1)
    return _ungrouped(w2, weight, weight_layout), (bias * scale + shift).astype(weight.dtype)


def fold_bn_conv(weight, bias, gamma, beta, running_mean, running_var, *, eps=1e-5,
                 weight_layout="OIHW", groups=1):
    """Fold an inference-mode batch norm that precedes a Conv, ConvTranspose or Linear layer.

    ``layer(BN(x), weight) + bias == layer(x, W2) + b2``, exactly for Linear/Dense and
    for convolutions **without zero padding**; see Notes for where it holds.

    Parameters
    ----------
    weight : ndarray, float32 or float64, rank >= 2
        The layer's weight in ``weight_layout``:

        - ``"OIHW"``: ``(out, in/groups, *kernel)``: PyTorch Conv1d/2d/3d, Linear ``(out, in)``.
        - ``"IOHW"``: ``(in, out/groups, *kernel)``: PyTorch ConvTranspose1d/2d/3d.
        - ``"HWIO"``: ``(*kernel, in/groups, out)``: TensorFlow/Keras Conv1D/2D/3D,
          Dense ``(in, out)``.
    bias : ndarray (out,) or None
        None means no bias (zeros).
    gamma, beta : ndarray (in,) or None
        BN scale and shift; None means 1 and 0 (``affine=False``).
    running_mean, running_var : ndarray (in,)
    eps : float > 0
    weight_layout : {"OIHW", "IOHW", "HWIO"}
    groups : int >= 1
        As in the layer; depthwise is ``groups=in``.  Output channel ``o`` belongs
        to group ``o // (out/groups)``, input channel ``i`` to group ``i // (in/groups)``.

    Returns
    -------
    W2 : ndarray, weight's shape and dtype (C-contiguous)
    b2 : ndarray (out,), weight's dtype
        ``W2 = weight * scale`` along the input channels and ``b2 = bias + (sum of
        weight over its input channels of the group and kernel taps, times shift)``,
        with ``scale = gamma / sqrt(running_var + eps)`` and
        ``shift = beta - running_mean * scale``, computed in float64.

    Notes
    -----
    The folded bias assumes that every weight of an output channel multiplies a
    BN output, i.e. ``x * scale + shift``.  Where that is false, the two layers differ:

    - **Conv with zero padding is not exact.**  The original layer pads ``BN(x)``
      with zeros; the folded one pads ``x`` with zeros, which stand for
      ``BN(0) = shift``, not 0.  Outputs whose window touches the padding differ
      (those inside agree).  Exact for ``padding=0`` ("valid") with any stride
      and dilation, for Linear/Dense, for padding modes that copy input values
      (PyTorch ``padding_mode="reflect"``, ``"replicate"``, ``"circular"``: they
      commute with a per-channel affine), and whenever ``shift`` is 0.
    - **ConvTranspose** has no input padding (its ``padding`` only crops the output),
      but an output position only sums the kernel taps that land on it.  The fold is
      exact at positions reached by every tap, and only there.  Along an axis with
      input length ``L``, kernel ``k``, stride ``s``, dilation ``d`` and padding ``p``,
      with ``s = 1`` those are the output indices ``d*(k-1) - p`` to ``L - 1 - p``.
      So the whole output is exact iff, along every axis, ``stride == 1`` and
      ``padding >= dilation*(kernel_size - 1) + output_padding`` (typically
      ``padding = dilation*(kernel_size - 1)``: a "valid" convolution with a flipped
      kernel).  With ``stride > 1`` (e.g. the common ``kernel_size=2, stride=2``
      upsampler) output positions see different subsets of taps and the fold is
      not exact: fold the BN into the layer before it with :func:`fold_conv_bn`.

    See Also
    --------
    fold_conv_bn : the batch norm comes after the layer (always exact).
    fold_affine : the per-channel scale and shift alone.

    Examples
    --------
    BN over 2 channels, then a Linear layer ``(out=1, in=2)``:

    >>> W = np.array([[1.0, 2.0]])
    >>> W2, b2 = fold_bn_conv(W, np.array([0.5]), None, None,
    ...                       np.array([1.0, -1.0]), np.array([3.75, 0.0]), eps=0.25)
    >>> W2.tolist(), b2.tolist()
    ([[0.5, 4.0]], [4.0])
    """
    weight, w4, bias, scale, shift = _fold_args(
        weight, bias, gamma, beta, running_mean, running_var, eps, weight_layout, groups,
        "input")
    groups, _, in_per_group, _ = w4.shape
    w2 = w4 * scale.reshape(groups, 1, in_per_group, 1)
    b2 = bias + np.einsum("goik,gi->go", w4, shift.reshape(groups, in_per_group)).ravel()
    return _ungrouped(w2, weight, weight_layout), b2.astype(weight.dtype)
