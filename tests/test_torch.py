"""The same cases against PyTorch's batch norm and autograd (skipped without PyTorch)."""

import numpy as np
import pytest
from helpers import DTYPES, LAYOUTS, SHAPES, channels, make_params, make_x

import bn_fast as bnf

torch = pytest.importorskip("torch")
F = torch.nn.functional


def to_torch(a, layout):
    """A torch tensor in NCHW order (channels on axis 1) of a bn_fast array."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if layout == "NCHW" or t.dim() == 2 else t.movedim(-1, 1)


def from_torch(t, layout):
    t = t if layout == "NCHW" or t.dim() == 2 else t.movedim(1, -1)
    return t.detach().numpy()


def close(actual, desired, dtype, scale=1.0):
    r = (1e-5 if dtype == np.float32 else 1e-10) * scale
    np.testing.assert_allclose(actual, desired, rtol=r, atol=r)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_against_torch(backend, rng, shape, dtype, layout):
    x = make_x(rng, shape, dtype, layout)
    dy = make_x(rng, shape, dtype, layout, loc=0.0)
    C = channels(x, layout)
    gamma, beta, rm, rv = make_params(rng, C, dtype)

    # Training forward with running-stat update (PyTorch stores the unbiased variance).
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    xt = to_torch(x, layout).requires_grad_(True)
    gt = torch.from_numpy(gamma.copy()).requires_grad_(True)
    bt = torch.from_numpy(beta.copy()).requires_grad_(True)
    yt = F.batch_norm(xt, trm, trv, gt, bt, training=True, momentum=0.2, eps=1e-4)
    y, mean, invstd = bnf.batch_norm_train(x, gamma, beta, running_mean=rm, running_var=rv,
                                           momentum=0.2, eps=1e-4, layout=layout)
    close(y, from_torch(yt, layout), dtype, 10)
    close(rm, trm.numpy(), dtype)
    close(rv, trv.numpy(), dtype)

    # Training backward through autograd.
    yt.backward(to_torch(dy, layout))
    dx, dg, db = bnf.batch_norm_backward(dy, x, mean, invstd, gamma, layout=layout)
    n = x.size // C
    close(dx, from_torch(xt.grad, layout), dtype, 20)
    close(dg, gt.grad.numpy(), dtype, 10 * n)
    close(db, bt.grad.numpy(), dtype, 10 * n)

    # Inference and its backward (frozen statistics).
    xt = to_torch(x, layout).requires_grad_(True)
    gt = torch.from_numpy(gamma.copy()).requires_grad_(True)
    bt = torch.from_numpy(beta.copy()).requires_grad_(True)
    yt = F.batch_norm(xt, torch.from_numpy(rm), torch.from_numpy(rv), gt, bt, training=False,
                      eps=1e-4)
    close(bnf.batch_norm_infer(x, gamma, beta, rm, rv, eps=1e-4, layout=layout),
          from_torch(yt, layout), dtype, 10)
    yt.backward(to_torch(dy, layout))
    invstd_rv = 1 / np.sqrt(rv.astype(np.float64) + 1e-4)
    dx, dg, db = bnf.batch_norm_backward(dy, x, rm, invstd_rv, gamma, training=False,
                                         layout=layout)
    close(dx, from_torch(xt.grad, layout), dtype, 10)
    close(dg, gt.grad.numpy(), dtype, 10 * n)
    close(db, bt.grad.numpy(), dtype, 10 * n)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_trains_like_torch(backend, rng, layout):
    torch.manual_seed(0)
    tbn = torch.nn.BatchNorm2d(3, momentum=0.3).double()
    bn = bnf.BatchNorm(3, momentum=0.3, dtype=np.float64, layout=layout)
    for _ in range(4):
        x = make_x(rng, (5, 3, 4, 6), np.float64, layout)
        dy = make_x(rng, (5, 3, 4, 6), np.float64, layout, loc=0.0)
        tbn.zero_grad()
        xt = to_torch(x, layout).requires_grad_(True)
        yt = tbn(xt)
        yt.backward(to_torch(dy, layout))
        y = bn.forward(x)
        dx = bn.backward(dy)
        np.testing.assert_allclose(y, from_torch(yt, layout), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dx, from_torch(xt.grad, layout), rtol=1e-9, atol=1e-10)
        with torch.no_grad():
            tbn.weight -= 0.1 * tbn.weight.grad
            tbn.bias -= 0.1 * tbn.bias.grad
        bn.gamma -= 0.1 * bn.dgamma
        bn.beta -= 0.1 * bn.dbeta
        np.testing.assert_allclose(bn.gamma, tbn.weight.detach().numpy(), rtol=1e-10)
        np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-10)
    tbn.eval()
    x = make_x(rng, (2, 3, 4, 6), np.float64, layout)
    np.testing.assert_allclose(bn.eval().forward(x), from_torch(tbn(to_torch(x, layout)), layout),
                               rtol=1e-10, atol=1e-10)
