"""cucrf.fit's training machinery on the CUDA backend (CPU emulator), against the NumPy backend.

``cucrf.fit`` trains on the GPU when its arrays are CuPy arrays: the backend is chosen from the
array library, the trainer computes with ``backend.xp`` and the objective with the array's own
namespace (``objective._namespace``), and results come back to the host with ``.get()``. Here the
CUDA kernels run unchanged on the emulator (as in tests/test_cuda_emulated.py), and their arrays
are *device stand-ins*: NumPy arrays of a subclass whose type claims the ``cupy`` module, with a
``.get()`` that copies to a plain NumPy array, inside a ``cupy`` namespace (a stand-in module put
in ``sys.modules`` for the test) that returns device stand-ins. So, compared with the NumPy
backend in float64:

* ``Trainer.gradient``: the loss, the labelled weight and every gradient entry (all learnable
  parameters, the feature transform and the output temperature, class weights, ignored pixels);
* ``Trainer.epoch``: two optimiser epochs (Adam, prior toward the start) give the same parameters
  (all but the feature offset, whose gradient is rounding noise: the kernels see only feature
  differences);
* ``Trainer.evaluate``: the same confusion matrix (exactly), loss and scores;
* ``cucrf.fit`` itself on device stand-in unaries, images and labels (``_api.get_backend('cupy')``
  gives the emulated backend), with a validation set and with leave-one-out cross-validation: the
  same history and parameters after one epoch.

Tolerance: rtol 1e-9 (atol 1e-12) in float64; ``Trainer.evaluate``'s confusion matrix, accuracy and mIoU
scores must be equal.

Covered CuPy-only paths: ``objective._namespace`` returning the ``cupy`` namespace,
``trainer._to_numpy`` and the backend's ``.get()`` calls, labels given as device arrays
(``data.check_label``), and host/device mixing inside ufuncs: a device stand-in refuses a host
array (of one or more dimensions) as an operand, as CuPy does. Not covered: an implicit
``np.asarray(device_array)`` (CuPy raises, a NumPy subclass converts silently), CuPy functions
that differ from NumPy's, streams and device memory, and GPU rounding; tests/test_cuda_gpu.py and
the GPU test at the end of this file cover those on a real GPU (scripts/gpu-check).
"""

import shutil
import sys
import types

import numpy as np
import pytest

import cucrf
from cucrf import _api, _fit
from cucrf._cuda.backend import make_backend
from cucrf._learning import objective, parameters, trainer
from cucrf._learning.data import Dataset, Sample
from cucrf.optim import Adam

from .test_cuda_emulated import _module  # emulated kernel modules, cached

C = 3
H, W = 12, 14
#: float64 tolerance of the emulated CUDA path against NumPy: only the summation order differs.
RTOL, ATOL = 1e-9, 1e-12


# ---------------------------------------------------------------------------------------------
# device stand-ins
# ---------------------------------------------------------------------------------------------
class DeviceArray(np.ndarray):
    """A NumPy array standing in for a CuPy array (``type(a).__module__`` is ``cupy``)."""

    def get(self):
        return np.array(self.view(np.ndarray))

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        def device(x, what):
            if isinstance(x, DeviceArray):
                return x.view(np.ndarray)
            if isinstance(x, np.ndarray) and x.ndim > 0:
                raise TypeError(f"{ufunc.__name__}.{method}: host array {what} mixed with device arrays")
            return x

        args = [device(x, "operand") for x in inputs]
        if out is not None:
            kwargs["out"] = tuple(device(o, "out=") for o in out)
        result = getattr(ufunc, method)(*args, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _to_device(result)


DeviceArray.__module__ = "cupy"


def _to_device(value):
    if isinstance(value, tuple):
        return tuple(_to_device(v) for v in value)
    if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
        return value.view(DeviceArray)
    if isinstance(value, np.generic) and not isinstance(value, (np.bool_,)):
        return np.asarray(value).view(DeviceArray)  # CuPy reductions give 0-d arrays
    return value


class _StandInCupy(types.ModuleType):
    """``cupy`` for the test: NumPy's functions, whose array results are device stand-ins."""

    def __getattr__(self, name):
        obj = getattr(np, name)
        if callable(obj) and not isinstance(obj, type):
            def fn(*args, **kwargs):
                return _to_device(obj(*args, **kwargs))

            fn.__name__ = name
            setattr(self, name, fn)
            return fn
        return obj


_cupy = _StandInCupy("cupy")
_cupy.ndarray = DeviceArray


def to_device(a):
    return _cupy.ascontiguousarray(a)


def _emulated_backend():
    def load(file_name, options, names):
        return _module(file_name, tuple(options), tuple(names), "forward", False, None)

    return make_backend(_cupy, load, name="emulated-cupy")


@pytest.fixture
def device(monkeypatch):
    """The emulated CUDA backend over device stand-ins; ``import cupy`` gives the stand-in namespace."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not available")
    monkeypatch.setitem(sys.modules, "cupy", _cupy)
    backend = _emulated_backend()
    backend.launches = 0
    prepare = backend.prepare

    def counted(features, *args, **kwargs):  # every mean field starts here: it ran on the device
        assert isinstance(features, DeviceArray), type(features)
        backend.launches += 1
        return prepare(features, *args, **kwargs)

    backend.prepare = counted
    return backend


def test_stand_in_refuses_host_device_mixing(device):
    d = to_device(np.ones((2, 3)))
    assert type(d).__module__ == "cupy" and objective._namespace(d) is _cupy
    assert type(d.get()) is np.ndarray and type(d + 1.0) is DeviceArray and type(d.sum()) is DeviceArray
    with pytest.raises(TypeError, match="host array"):
        d + np.ones(3)
    with pytest.raises(TypeError, match="host array"):
        np.add(d, d, out=np.empty((2, 3)))
    e = to_device(np.zeros((2, 3)))
    e += d
    assert type(e) is DeviceArray and e.get().sum() == 6


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def scene(seed):
    r = np.random.default_rng(seed)
    label = np.zeros((H, W), np.int64)
    label[r.integers(0, 5):r.integers(7, H), r.integers(0, 5):r.integers(7, W)] = 1
    label[r.integers(0, 4):r.integers(5, 9), r.integers(6, 9):] = 2
    colours = r.uniform(0, 255, (C, 3))
    image = np.clip(colours[label] + r.normal(0, 12, (H, W, 3)), 0, 255)
    unary = r.normal(size=(C, H, W)) + 1.5 * (np.arange(C)[:, None, None] == label)
    label[r.random((H, W)) < 0.05] = 255  # unlabelled pixels
    return unary, image, label


SETTINGS = dict(filter_size=5, blur=2, iterations=2, normalization=None, dtype=np.float64, device=None)


@pytest.fixture(scope="module")
def host_data():
    U, I, L = zip(*[scene(s) for s in range(4)])
    return Dataset("", list(U), list(I), list(L), SETTINGS, 255).scan()


class DeviceData:
    """The samples of a NumPy :class:`Dataset` with unaries and features on the device."""

    def __init__(self, dataset):
        self.dataset, self.shapes = dataset, dataset.shapes

    def __len__(self):
        return len(self.dataset)

    def load(self, i):
        s = self.dataset.load(i)
        return Sample(to_device(s.unary), to_device(s.features), s.label, "cupy")


def make_trainer(backend, learn=parameters.LEARNABLE, class_weights=(1.0, 2.0, 0.5), prior=0.0):
    params = cucrf.CRFParams(theta_beta=(15.0, 20.0, 25.0), appearance_weight=4.0, smoothness_weight=2.0)
    transform = _fit.FeatureTransform(np.eye(3) + 0.1, np.zeros(3)) if "feature_transform" in learn else None
    vec = parameters.initial_vector(params, C, transform)
    vec["log_temperature"] = np.array(0.7)
    vec["compatibility"] = vec["compatibility"] + 0.1 * np.random.default_rng(5).normal(size=(C, C))
    keys = parameters.learned_keys(learn, vec)
    t = trainer.Trainer(backend, lambda shape: _api.check_config(5, 2, 2, None, tuple(shape)), params, keys,
                        learn_temperature=True, prior_strength=prior,
                        class_weights=None if class_weights is None else np.array(class_weights),
                        ignore_index=255, num_classes=C)
    return t, vec


def assert_same_vector(got, want, what):
    assert set(got) == set(want), what
    for k in want:
        assert isinstance(got[k], (np.ndarray, np.generic)) and not isinstance(got[k], DeviceArray), \
            (what, k, type(got[k]))  # host arrays for the optimiser
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=f"{what}: {k}")


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("learn,class_weights", [(parameters.LEARNABLE, (1.0, 2.0, 0.5)),
                                                 (parameters.DEFAULT_LEARN, None)])
def test_gradient_matches_numpy(device, host_data, learn, class_weights):
    """Loss, weight and every gradient entry of one two-image minibatch, float64."""
    ref, vec = make_trainer(_api.get_backend("numpy"), learn, class_weights)
    emu, _ = make_trainer(device, learn, class_weights)
    want = ref.gradient(vec, [host_data.load(0), host_data.load(1)])
    dev = DeviceData(host_data)
    got = emu.gradient(vec, [dev.load(0), dev.load(1)])
    assert device.launches == 1
    assert isinstance(got[0], float) and got[0] == pytest.approx(want[0], rel=RTOL)
    assert got[1] == want[1] > 0
    expected_keys = set(parameters.learned_keys(learn, vec)) | {"log_temperature"}
    assert set(want[2]) == expected_keys
    assert_same_vector(got[2], want[2], "gradient")
    # the comparison means something: no gradient is zero, except the feature offset's, which is
    # zero up to rounding (the kernels see feature differences only)
    scale = max(float(np.max(np.abs(v))) for v in want[2].values())
    for k, v in want[2].items():
        if k == "transform_offset":
            assert np.max(np.abs(v)) <= 1e-12 * scale and np.max(np.abs(got[2][k])) <= 1e-12 * scale
        else:
            assert np.max(np.abs(v)) > 1e-6 * scale, k


def test_two_epochs_match_numpy(device, host_data):
    """Two Adam epochs over minibatches of two images give the same parameters."""
    units = None
    results = []
    for backend, data in ((_api.get_backend("numpy"), host_data), (device, DeviceData(host_data))):
        t, vec = make_trainer(backend, prior=0.5)
        units = parameters.scales(vec)
        z_start = {k: vec[k] / units[k] for k in t.keys}
        opt = Adam(lr=0.05)
        losses = []
        for e in range(2):
            vec, loss, images = t.epoch(vec, opt, data, [[0, 1], [2, 3]], units=units, z_start=z_start)
            losses.append(loss)
            assert images == 4
        results.append((vec, losses, t.step_count))
    (want, want_losses, want_steps), (got, got_losses, got_steps) = results
    assert got_steps == want_steps == 4 and device.launches == 4
    np.testing.assert_allclose(got_losses, want_losses, rtol=RTOL)
    # The feature offset's gradient is rounding noise (see test_gradient_matches_numpy), which Adam
    # scales to steps of about lr; the offset does not change the model, so it is left out.
    assert set(got) == set(want)
    assert_same_vector({k: v for k, v in got.items() if k != "transform_offset"},
                       {k: v for k, v in want.items() if k != "transform_offset"}, "parameters after two epochs")
    _, start = make_trainer(_api.get_backend("numpy"))
    assert max(float(np.max(np.abs(want[k] - start[k]))) for k in want) > 1e-3  # it did move


def test_evaluate_matches_numpy(device, host_data):
    """The confusion matrix is identical; loss sums and the losses at each start temperature agree."""
    ref, vec = make_trainer(_api.get_backend("numpy"))
    emu, _ = make_trainer(device)
    temps = trainer._START_TEMPERATURES
    want = ref.evaluate(vec, host_data, temperatures=temps)
    got = emu.evaluate(vec, DeviceData(host_data), temperatures=temps)
    assert device.launches == 4
    np.testing.assert_array_equal(got["_confusion"], want["_confusion"])
    assert got["_confusion"].sum() == sum(int((host_data.load(i).label != 255).sum()) for i in range(4))
    assert got["_weight_sum"] == want["_weight_sum"]
    assert got["_loss_sum"] == pytest.approx(want["_loss_sum"], rel=RTOL)
    np.testing.assert_allclose(got["_loss_at"], want["_loss_at"], rtol=RTOL)
    for k in ("val_accuracy", "val_miou", "val_miou_gt"):
        assert got[k] == want[k]
    got_vec, got_scores = emu.start_temperature(vec, DeviceData(host_data))
    want_vec, want_scores = ref.start_temperature(vec, host_data)
    assert float(got_vec["log_temperature"]) == float(want_vec["log_temperature"])
    assert got_scores["val_loss"] == pytest.approx(want_scores["val_loss"], rel=RTOL)


def test_objective_on_device_arrays(device):
    """tempered_cross_entropy computes in the logits' namespace and returns host floats."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, C, 5, 6)) * 3
    labels = rng.integers(0, C, (2, 5, 6))
    labels[0, 0] = 255
    want = objective.tempered_cross_entropy(logits, labels, 0.4, np.array([1.0, 0.5, 2.0]))
    got = objective.tempered_cross_entropy(to_device(logits), labels, 0.4, np.array([1.0, 0.5, 2.0]))
    assert type(got[1]) is DeviceArray
    for g, w in zip(got[::2] + got[3:], want[::2] + want[3:]):
        assert isinstance(g, float) and g == pytest.approx(w, rel=1e-12)
    np.testing.assert_allclose(got[1].get(), want[1], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# cucrf.fit on device stand-ins
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("plan", ["validation set", "leave-one-out"])
def test_fit_matches_numpy(device, monkeypatch, plan):
    """One epoch of cucrf.fit, labels on the device too: a given validation set, or leave-one-out
    cross-validation over three images (``_cross_validate``, a trainer per fold)."""
    U, I, L = zip(*[scene(s) for s in range(6)])
    kw = dict(epochs=1, lr=0.05, filter_size=5, blur=2, iterations=2, progress=False, dtype=np.float64,
              batch_size=2, learn=parameters.LEARNABLE, class_weights=[1.0, 2.0, 0.5], patience=None, seed=1)
    n = 4 if plan == "validation set" else 3

    def run(parts):
        val = dict(validation=tuple(p[4:] for p in parts)) if plan == "validation set" else {}
        return cucrf.fit(*(p[:n] for p in parts), **val, **kw)

    want = run([list(p) for p in (U, I, L)])
    real_get_backend = _api.get_backend
    monkeypatch.setattr(_api, "get_backend", lambda library: device if library == "cupy" else real_get_backend(library))
    got = run([[to_device(a) for a in part] for part in (U, I, L)])
    assert got.validation == want.validation and (plan == "leave-one-out") == got.validation.startswith("leave")
    assert device.launches >= 2 + 2 * 2  # minibatches, validation images scored twice
    assert [h["epoch"] for h in got.history] == [h["epoch"] for h in want.history] == [0, 1]
    for a, b in zip(want.history, got.history):
        for k in ("train_loss", "val_loss", "val_accuracy", "val_miou", "val_miou_gt", "temperature"):
            if a[k] is None:
                assert b[k] is None
            else:
                assert b[k] == pytest.approx(a[k], rel=RTOL), k
    assert got.best_epoch == want.best_epoch
    for name in ("theta_alpha", "theta_beta", "theta_gamma", "appearance_weight", "smoothness_weight",
                 "unary_weight"):
        np.testing.assert_allclose(getattr(got.params, name), getattr(want.params, name), rtol=RTOL)
    np.testing.assert_allclose(got.params.compatibility_matrix(C), want.params.compatibility_matrix(C),
                               rtol=RTOL, atol=ATOL)
    if want.feature_transform is not None:
        np.testing.assert_allclose(got.feature_transform.matrix, want.feature_transform.matrix, rtol=RTOL,
                                   atol=ATOL)


# ---------------------------------------------------------------------------------------------
# a real GPU (scripts/gpu-check)
# ---------------------------------------------------------------------------------------------
def _real_cupy():
    try:
        import cupy
    except ImportError:
        return None
    if cupy is _cupy:
        return None
    try:
        return cupy if cupy.cuda.is_available() else None
    except Exception:  # a broken driver install raises instead of returning False
        return None


@pytest.mark.skipif(_real_cupy() is None, reason="no CUDA device available to CuPy")
def test_fit_on_gpu_one_epoch_matches_numpy():
    """cucrf.fit on CuPy unaries, images and labels, with a validation set, every learnable
    parameter, class weights and minibatches of two: one epoch, against NumPy in float64."""
    cp = _real_cupy()
    U, I, L = zip(*[scene(s) for s in range(6)])
    kw = dict(epochs=1, lr=0.05, filter_size=5, blur=2, iterations=2, progress=False, dtype=np.float64,
              batch_size=2, learn=parameters.LEARNABLE, class_weights=[1.0, 2.0, 0.5], patience=None, seed=1)
    want = cucrf.fit(list(U[:4]), list(I[:4]), list(L[:4]), validation=(list(U[4:]), list(I[4:]), list(L[4:])), **kw)
    dev = [[cp.asarray(a) for a in part] for part in (U, I, L)]
    got = cucrf.fit(dev[0][:4], dev[1][:4], dev[2][:4], validation=(dev[0][4:], dev[1][4:], dev[2][4:]), **kw)
    # float64 on both; FMA contraction and summation order separate them
    assert [h["epoch"] for h in got.history] == [0, 1]
    for a, b in zip(want.history, got.history):
        for k in ("train_loss", "val_loss", "val_accuracy", "val_miou", "temperature"):
            if a[k] is not None:
                assert b[k] == pytest.approx(a[k], rel=1e-6), k
    for name in ("theta_alpha", "theta_gamma", "appearance_weight", "smoothness_weight", "unary_weight"):
        np.testing.assert_allclose(getattr(got.params, name), getattr(want.params, name), rtol=1e-6)
    np.testing.assert_allclose(got.params.theta_beta, want.params.theta_beta, rtol=1e-6)
    np.testing.assert_allclose(got.params.compatibility_matrix(C), want.params.compatibility_matrix(C),
                               rtol=1e-6, atol=1e-8)
    if want.feature_transform is not None:
        np.testing.assert_allclose(got.feature_transform.matrix, want.feature_transform.matrix, rtol=1e-6,
                                   atol=1e-8)
