"""The BatchNorm layer in a NumPy training loop."""

import numpy as np
import pytest
from helpers import LAYOUTS, make_x

import bn_fast as bnf
from bn_fast import reference as ref


def _sgd_reference(X, t, w, gamma, beta, steps, lr, momentum, eps):
    """The same training loop with the reference functions, for comparison."""
    rm, rv = np.zeros(X.shape[1]), np.ones(X.shape[1])
    w, gamma, beta = w.copy(), gamma.copy(), beta.copy()
    for _ in range(steps):
        h, mean, invstd = ref.batch_norm_train(X, gamma, beta, running_mean=rm, running_var=rv,
                                               momentum=momentum, eps=eps)
        err = h @ w - t
        dh = np.outer(err, w) * (2 / len(t))
        _, dg, db = ref.batch_norm_backward(dh, X, mean, invstd, gamma)
        w -= lr * h.T @ err * (2 / len(t))
        gamma -= lr * dg
        beta -= lr * db
    return w, gamma, beta, rm, rv


def test_sgd_trains_and_eval_is_consistent(backend, rng):
    # Features on very different scales: a linear model learns fast only after BN.
    X = rng.standard_normal((64, 4)) * [1.0, 100.0, 0.01, 5.0] + [0.0, 50.0, -3.0, 1.0]
    true_w = np.array([1.0, -2.0, 0.5, 3.0])
    t = ((X - X.mean(0)) / X.std(0)) @ true_w + 0.7
    bn = bnf.BatchNorm(4, dtype=np.float64, momentum=0.2)
    w = np.zeros(4)
    w0, g0, b0 = w.copy(), bn.gamma.copy(), bn.beta.copy()
    losses = []
    for _ in range(60):
        h = bn.forward(X)
        err = h @ w - t
        losses.append(float((err ** 2).mean()))
        dh = np.outer(err, w) * (2 / len(t))
        bn.backward(dh)
        w -= 0.05 * h.T @ err * (2 / len(t))
        bn.gamma -= 0.05 * bn.dgamma
        bn.beta -= 0.05 * bn.dbeta
    assert losses[-1] < 0.05 * losses[0]

    rw, rg, rb, rrm, rrv = _sgd_reference(X, t, w0, g0, b0, 60, 0.05, 0.2, bn.eps)
    np.testing.assert_allclose(w, rw, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bn.gamma, rg, rtol=1e-9)
    np.testing.assert_allclose(bn.beta, rb, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bn.running_mean, rrm, rtol=1e-9)
    np.testing.assert_allclose(bn.running_var, rrv, rtol=1e-9)

    # 60 updates on the same batch: running stats converge to the batch statistics.
    n = len(X)
    np.testing.assert_allclose(bn.running_mean, (1 - 0.8 ** 60) * X.mean(0), rtol=1e-9)
    np.testing.assert_allclose(bn.running_var, 0.8 ** 60 + (1 - 0.8 ** 60) * X.var(0) * n / (n - 1),
                               rtol=1e-9)

    bn.eval()
    assert bn.training is False
    rm_before = bn.running_mean.copy()
    y_eval = bn.forward(X)
    np.testing.assert_array_equal(bn.running_mean, rm_before)
    np.testing.assert_allclose(
        y_eval, ref.batch_norm_infer(X, bn.gamma, bn.beta, bn.running_mean, bn.running_var),
        rtol=1e-12, atol=1e-12)
    scale, shift = bn.fold()
    np.testing.assert_allclose(y_eval, X * scale + shift, rtol=1e-10, atol=1e-10)
    # Eval output is close to train output here: running stats ~ batch stats (unbiased var).
    np.testing.assert_allclose(y_eval, bn.train().forward(X), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_backward_uses_frozen_statistics(backend, rng, layout):
    bn = bnf.BatchNorm(3, layout=layout, dtype=np.float64)
    bn.running_mean[:] = [0.5, -1.0, 2.0]
    bn.running_var[:] = [1.5, 0.25, 4.0]
    bn.gamma[:] = [1.0, 2.0, -1.0]
    x = make_x(rng, (4, 3, 5), np.float64, layout)
    dy = make_x(rng, (4, 3, 5), np.float64, layout, loc=0.0)
    bn.eval().forward(x)
    dx = bn.backward(dy)
    want = ref.batch_norm_backward(dy, x, bn.running_mean, 1 / np.sqrt(bn.running_var + bn.eps),
                                   bn.gamma, training=False, layout=layout)
    np.testing.assert_allclose(dx, want[0], rtol=1e-12)
    np.testing.assert_allclose(bn.dgamma, want[1], rtol=1e-10)
    np.testing.assert_allclose(bn.dbeta, want[2], rtol=1e-10)


def test_without_running_stats_eval_uses_batch_statistics(backend, rng):
    bn = bnf.BatchNorm(3, track_running_stats=False, affine=False)
    assert bn.running_mean is None and bn.gamma is None
    x = make_x(rng, (6, 3, 4), np.float32)
    y_train = bn.forward(x)
    y_eval = bn.eval().forward(x)
    np.testing.assert_array_equal(y_train, y_eval)
    bn.backward(np.ones_like(x))
    assert bn.dgamma is None and bn.dbeta is None
    with pytest.raises(ValueError, match="fold\\(\\) needs running statistics"):
        bn.fold()


def test_float32_layer_keeps_its_dtype(backend, rng):
    bn = bnf.BatchNorm(5, layout="NHWC")
    x = make_x(rng, (2, 5, 3, 3), np.float32, "NHWC")
    y = bn(x)
    assert y.dtype == np.float32 and bn.running_mean.dtype == np.float32
    assert "BatchNorm(5" in repr(bn) and "NHWC" in repr(bn)
