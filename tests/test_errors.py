"""Bad input gets a clear error, raised before any array is written."""

import numpy as np
import pytest

import bn_fast as bnf

f32, f64 = np.float32, np.float64


def arrays(dtype=f32, shape=(4, 3, 5, 5)):
    rng = np.random.default_rng(0)
    C = shape[1]
    return dict(x=rng.standard_normal(shape).astype(dtype),
                dy=rng.standard_normal(shape).astype(dtype),
                gamma=np.ones(C, dtype), beta=np.zeros(C, dtype),
                rm=np.zeros(C, dtype), rv=np.ones(C, dtype),
                out=np.full(shape, 7.0, dtype))


def train(a, **kw):
    kw.setdefault("running_mean", a["rm"])
    kw.setdefault("running_var", a["rv"])
    kw.setdefault("out", a["out"])
    return bnf.batch_norm_train(a["x"], a["gamma"], a["beta"], **kw)


def infer(a, **kw):
    kw.setdefault("out", a["out"])
    return bnf.batch_norm_infer(a["x"], a["gamma"], a["beta"], a["rm"], a["rv"], **kw)


def backward(a, **kw):
    kw.setdefault("out", a["out"])
    return bnf.batch_norm_backward(a["dy"], a["x"], a["rm"], a["rv"], a["gamma"], **kw)


def replace(**new):
    def edit(a):
        a.update({k: (v(a) if callable(v) else v) for k, v in new.items()})
        return a
    return edit


CASES = [
    # (id, edit of the arrays, call, exception, message pattern)
    ("rank1", replace(x=np.ones(5, f32)), train, ValueError, r"x has shape \(5,\) \(rank 1\)"),
    ("rank6", replace(x=np.ones((2,) * 6, f32)), infer, ValueError,
     r"\(rank 6\), expected rank 2 to 5"),
    ("gamma-length", replace(gamma=np.ones(4, f32)), train, ValueError,
     r"gamma has shape \(4,\), expected \(3,\) \(channels of x"),
    ("beta-2d", replace(beta=np.ones((3, 1), f32)), infer, ValueError, r"beta has shape \(3, 1\)"),
    ("rm-length", replace(rm=np.ones(2, f32)), infer, ValueError, r"running_mean has shape \(2,\)"),
    ("int-x", replace(x=np.ones((4, 3, 5, 5), np.int64)), train, TypeError,
     r"x has dtype int64, expected float32 or float64"),
    ("complex-x", replace(x=np.ones((4, 3, 5, 5), complex)), infer, TypeError,
     r"x has dtype complex128"),
    ("float16-x", replace(x=np.ones((4, 3, 5, 5), np.float16)), infer, TypeError,
     r"x has dtype float16"),
    ("byteswapped-x", replace(x=np.ones((4, 3, 5, 5), ">f4")), infer, TypeError,
     r"non-native byte order"),
    ("narrow-running-stats", replace(x=lambda a: a["x"].astype(f64), out=None,
                                     gamma=np.ones(3), beta=np.zeros(3)), train, TypeError,
     r"running_mean is float32 but x is float64.*never narrower"),
    ("narrow-gamma", replace(x=lambda a: a["x"].astype(f64), out=None), infer, TypeError,
     r"gamma is float32 but x is float64"),
    ("dy-dtype", replace(dy=lambda a: a["dy"].astype(f64)), backward, ValueError,
     r"dy has shape \(4, 3, 5, 5\) and dtype float64, expected x's shape .* and dtype float32"),
    ("out-shape", replace(out=np.zeros((4, 3, 5, 4), f32)), infer, ValueError,
     r"out has shape \(4, 3, 5, 4\)"),
    ("out-dtype", replace(out=np.zeros((4, 3, 5, 5), f64)), train, ValueError,
     r"out has shape .* and dtype float64, expected"),
    ("out-readonly", replace(out=lambda a: np.broadcast_to(np.zeros(1, f32), (4, 3, 5, 5))),
     infer, ValueError, r"out is read-only"),
    ("out-overlaps-x", replace(out=lambda a: a["x"][::-1]), infer, ValueError,
     r"out overlaps an input"),
    ("eps-zero", lambda a: a, lambda a: infer(a, eps=0.0), ValueError, r"eps=0.0 must be"),
    ("eps-negative", lambda a: a, lambda a: train(a, eps=-1e-5), ValueError, r"eps=-1e-05"),
    ("eps-nan", lambda a: a, lambda a: train(a, eps=float("nan")), ValueError, r"eps=nan"),
    ("momentum-high", lambda a: a, lambda a: train(a, momentum=1.5), ValueError,
     r"momentum=1.5 must be a number in \[0, 1\]"),
    ("momentum-negative", lambda a: a, lambda a: train(a, momentum=-0.1), ValueError,
     r"momentum=-0.1"),
    ("layout", lambda a: a, lambda a: infer(a, layout="NCWH"), ValueError,
     r"layout='NCWH' is not supported; expected one of \('NCHW', 'NHWC'\)"),
    ("one-value-per-channel", replace(x=np.ones((1, 3, 1, 1), f32), out=None), train, ValueError,
     r"Expected more than 1 value per channel when training, got input size \(1, 3, 1, 1\)"),
    ("one-row", replace(x=np.ones((1, 3), f32), out=None), train, ValueError,
     r"Expected more than 1 value per channel"),
    ("empty-training", replace(x=np.ones((0, 3, 2, 2), f32), out=None), train, ValueError,
     r"Expected more than 1 value per channel"),
    ("running-mean-alone", lambda a: a, lambda a: train(a, running_var=None), ValueError,
     r"running_mean was given without its partner"),
    ("running-var-alone", lambda a: a, lambda a: train(a, running_mean=None), ValueError,
     r"running_var was given without its partner"),
    ("readonly-running-var", replace(rv=lambda a: np.broadcast_to(np.ones(1, f32), (3,))),
     train, ValueError, r"running_var is read-only"),
    ("infer-without-stats", replace(rm=None), infer, ValueError,
     r"running_mean is required for inference"),
    ("unbiased-not-bool", lambda a: a, lambda a: train(a, unbiased="yes"), TypeError,
     r"unbiased='yes' must be True or False"),
    ("training-not-bool", lambda a: a, lambda a: backward(a, training=1), TypeError,
     r"training=1 must be True or False"),
    ("x-not-array", replace(x="abc"), infer, TypeError, r"x must be a NumPy array, got str"),
    ("fold-eps", lambda a: a,
     lambda a: bnf.fold_affine(a["gamma"], a["beta"], a["rm"], a["rv"], eps=0), ValueError,
     r"eps=0"),
    ("fold-length", replace(gamma=np.ones(5, f32)),
     lambda a: bnf.fold_affine(a["gamma"], a["beta"], a["rm"], a["rv"]), ValueError,
     r"gamma has shape \(5,\), expected shape \(3,\)"),
    ("apply-affine-length", replace(gamma=np.ones(5, f32)),
     lambda a: bnf.apply_affine(a["x"], a["gamma"], a["beta"]), ValueError,
     r"scale has shape \(5,\)"),
]


@pytest.mark.parametrize("edit,call,exc,pattern", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_raises_and_touches_nothing(backend, edit, call, exc, pattern):
    a = edit(arrays())
    before = {k: v.copy() for k, v in a.items() if isinstance(v, np.ndarray)}
    with pytest.raises(exc, match=pattern):
        call(a)
    for k, v in before.items():
        np.testing.assert_array_equal(a[k], v, err_msg=f"{k} was modified")


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'fortran'.*available here: \["):
        bnf.set_backend("fortran")


@pytest.mark.parametrize("n", [0, -1, 10_000, 1.5, True])
def test_bad_thread_count(n):
    before = bnf.get_num_threads()
    with pytest.raises(ValueError, match=r"n=.* must be an integer from 1 to"):
        bnf.set_num_threads(n)
    assert bnf.get_num_threads() == before


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(num_features=0), ValueError, r"num_features=0 must be a positive integer"),
    (dict(num_features=3, dtype=np.int32), TypeError, r"dtype=int32 is not supported"),
    (dict(num_features=3, layout="CHW"), ValueError, r"layout='CHW'"),
    (dict(num_features=3, momentum=2), ValueError, r"momentum=2"),
])
def test_bad_layer_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        bnf.BatchNorm(**kwargs)


def test_layer_backward_before_forward():
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        bnf.BatchNorm(3).backward(np.ones((2, 3), np.float32))
