"""Shared fixtures: every test that takes ``backend`` runs once per available backend."""

import numpy as np
import pytest

import bn_fast as bnf

BACKENDS = bnf.available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    previous = bnf.get_backend()
    bnf.set_backend(request.param)
    yield request.param
    bnf.set_backend(previous)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def tol(dtype):
    """(rtol, atol) for comparing a result in ``dtype`` with the float64 reference."""
    return (2e-5, 2e-5) if np.dtype(dtype) == np.float32 else (1e-11, 1e-11)
