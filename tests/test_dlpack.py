"""DLPack interop: inputs shared without copying, results handed back as the caller's kind.

Zero-copy is checked by data pointer: NumPy's ``__array_interface__``, PyTorch's ``data_ptr()``,
JAX's ``unsafe_buffer_pointer()``. PyTorch and JAX tests skip when those libraries are absent;
GPU tests skip without a CUDA device.
"""

import warnings

import numpy as np
import pytest

import cucrf
from cucrf import _api, interop

rng = np.random.default_rng(0)
C, H, W, F = 3, 12, 16, 3
UNARY = rng.normal(size=(C, H, W))
IMAGE = rng.uniform(0, 255, (H, W, F))
KW = dict(blur=2, filter_size=5, iterations=3)


def ptr(a):
    return a.__array_interface__["data"][0]


class Producer:
    """A minimal DLPack producer around a NumPy array (no NumPy type, no __array__)."""

    def __init__(self, array, device=(1, 0), refuse_view=False):
        self.array, self.device, self.refuse_view = array, device, refuse_view

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if self.refuse_view and not copy:
            raise BufferError("this producer can only export a copy")
        source = self.array.copy() if copy else self.array
        return source.__dlpack__(max_version=max_version) if max_version else source.__dlpack__()


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def jnp():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    return jnp


def spy_to_like(monkeypatch):
    """Record (result pointer, returned pointer) of every hand-back of ``like=``."""
    calls = []
    original = _api._to_like

    def spy(value, reference):
        out = original(value, reference)
        calls.append((value, out))
        return out

    monkeypatch.setattr(_api, "_to_like", spy)
    return calls


# -- any DLPack producer ---------------------------------------------------------------------------

def test_generic_producer_is_shared_without_copy():
    unary = np.ascontiguousarray(UNARY)
    shared = interop.as_array(Producer(unary))
    assert isinstance(shared, np.ndarray) and ptr(shared) == ptr(unary)
    q = cucrf.infer(Producer(unary), Producer(IMAGE), **KW)
    np.testing.assert_array_equal(q, cucrf.infer(UNARY, IMAGE, **KW))


def test_producer_that_can_only_copy_is_copied_with_a_warning():
    if int(np.__version__.split(".")[0]) < 2:
        # NumPy 1.x's from_dlpack cannot ask the producer for a copy: a clear refusal instead.
        with pytest.warns(interop.CopyWarning), pytest.raises(TypeError, match="upgrade NumPy to 2.x"):
            cucrf.infer(Producer(UNARY, refuse_view=True), IMAGE, **KW)
        return
    with pytest.warns(interop.CopyWarning, match="unary .* is copied"):
        q = cucrf.infer(Producer(UNARY, refuse_view=True), IMAGE, **KW)
    np.testing.assert_array_equal(q, cucrf.infer(UNARY, IMAGE, **KW))


def test_unsupported_device_is_refused():
    with pytest.raises(TypeError, match="OpenCL device, which cucrf cannot use; move it to the CPU"):
        cucrf.infer(Producer(UNARY, device=(4, 0)), IMAGE)


def test_inputs_are_never_modified_nor_aliased_by_the_output():
    unary, image = UNARY.copy(), IMAGE.copy()
    for output in ("probabilities", "logits"):
        for iterations in (0, 2):
            q = cucrf.infer(Producer(unary), Producer(image), blur=2, iterations=iterations, output=output)
            assert not np.shares_memory(q, unary)
    np.testing.assert_array_equal(unary, UNARY)
    np.testing.assert_array_equal(image, IMAGE)


def test_to_like_numpy_and_containers():
    a = np.ones((2, 3))
    assert interop.to_like(a, np.zeros(1)) is a
    b = interop.to_like(a, np.zeros(1), copy=True)
    assert not np.shares_memory(a, b)
    out = interop.to_like({"x": [a, 1.5], "y": None}, np.zeros(1))
    assert out["x"][0] is a and out["x"][1] == 1.5 and out["y"] is None
    with pytest.raises(TypeError, match="reference must be an array"):
        interop.to_like(a, [1, 2])
    with pytest.raises(ValueError, match="copy must be"):
        interop.to_like(a, a, copy="yes")


def test_like_argument_is_checked():
    with pytest.raises(ValueError, match="like must be None, 'input'"):
        cucrf.infer(UNARY, IMAGE, like="torch")
    with pytest.raises(TypeError, match="like must be None, 'input' or an array"):
        cucrf.infer(UNARY, IMAGE, like=3)
    q = cucrf.infer(UNARY.tolist(), IMAGE.tolist(), like="input", **KW)  # lists: NumPy as without like=
    assert isinstance(q, np.ndarray)


# -- PyTorch ------------------------------------------------------------------------------------------

def test_torch_cpu_tensors_are_shared_without_copy(torch):
    t = torch.from_numpy(UNARY.copy())
    shared = interop.as_array(t)
    assert isinstance(shared, np.ndarray) and ptr(shared) == t.data_ptr()
    # Non-contiguous views are shared with their strides (no copy): a channels-first image permuted.
    chw = torch.from_numpy(np.ascontiguousarray(IMAGE.transpose(2, 0, 1)))
    hwc = chw.permute(1, 2, 0)
    assert not hwc.is_contiguous()
    view = interop.as_array(hwc)
    assert ptr(view) == hwc.data_ptr() and view.strides == tuple(s * 8 for s in hwc.stride())
    q = cucrf.infer(t, hwc, **KW)
    np.testing.assert_array_equal(q, cucrf.infer(UNARY, IMAGE, **KW))


def test_like_input_returns_tensors_without_copy(torch, monkeypatch):
    calls = spy_to_like(monkeypatch)
    unary, image = torch.from_numpy(UNARY.copy()), torch.from_numpy(IMAGE.copy())
    q = cucrf.infer(unary, image, like="input", **KW)
    assert isinstance(q, torch.Tensor) and q.device == unary.device and q.dtype == torch.float64
    (result, returned), = calls
    assert returned is q and q.data_ptr() == ptr(result)  # the NumPy result itself, shared
    np.testing.assert_array_equal(q.numpy(), cucrf.infer(UNARY, IMAGE, **KW))
    # A reference array picks the kind: NumPy inputs, tensor out; tensor inputs, NumPy out.
    assert isinstance(cucrf.infer(UNARY, IMAGE, like=unary, **KW), torch.Tensor)
    assert isinstance(cucrf.infer(unary, image, like=np.empty(0), **KW), np.ndarray)


def test_infer_vjp_like_input(torch):
    unary = torch.from_numpy(UNARY.copy())
    image = torch.from_numpy(IMAGE.astype(np.uint8))
    g = torch.from_numpy(rng.normal(size=UNARY.shape))
    r = cucrf.infer_vjp(unary, image, grad_output=g, like="input", **KW)
    assert all(isinstance(a, torch.Tensor) for a in (r.output, r.unary, r.image))
    assert r.image.shape == image.shape and r.image.dtype == torch.float64
    ref = cucrf.infer_vjp(UNARY, IMAGE.astype(np.uint8), grad_output=g.numpy(), **KW)
    np.testing.assert_array_equal(r.unary.numpy(), ref.unary)
    np.testing.assert_array_equal(r.image.numpy(), ref.image)
    for name, value in ref.params.items():
        np.testing.assert_array_equal(r.params[name], value)


def test_requires_grad_tensor_is_refused_with_a_pointer_to_cucrf_torch(torch):
    unary = torch.from_numpy(UNARY.copy()).requires_grad_()
    with pytest.raises(TypeError, match=r"requires grad.*cucrf\.torch.*unary\.detach\(\)"):
        cucrf.infer(unary, IMAGE)
    with pytest.raises(TypeError, match="requires grad"):
        cucrf.infer_vjp(unary.detach(), IMAGE, grad_output=torch.ones(UNARY.shape, requires_grad=True))
    cucrf.infer(unary.detach(), IMAGE, **KW)  # detach shares memory: fine


def test_lazily_negated_view_is_resolved_with_a_warning(torch):
    # PyTorch would export the data without its pending negation: cucrf resolves it (a copy).
    base = torch.from_numpy(-UNARY)
    neg = torch._neg_view(base)
    assert neg.is_neg()
    with pytest.warns(interop.CopyWarning, match="negated or conjugated"):
        q = cucrf.infer(neg, IMAGE, **KW)
    np.testing.assert_allclose(q, cucrf.infer(UNARY, IMAGE, **KW), rtol=0, atol=1e-12)


def test_unsupported_dtype_and_layout_are_refused(torch):
    with pytest.raises(TypeError, match=r"dtype torch.bfloat16\) cannot be shared through DLPack: .*; pass float32"):
        cucrf.infer(torch.zeros(C, H, W, dtype=torch.bfloat16), IMAGE)
    with pytest.raises(TypeError, match="layout .* dense"):
        cucrf.infer(torch.zeros(C, H, W).to_sparse(), IMAGE)


def test_mixed_devices_are_refused_with_both_named(torch):
    class FakeCupyArray:  # claims to be a CuPy (GPU) array; refused before anything touches it
        shape = IMAGE.shape

    FakeCupyArray.__module__ = "cupy"
    with pytest.raises(TypeError, match=r"unary is a torch.Tensor on cpu but image is a FakeCupyArray"):
        cucrf.infer(torch.from_numpy(UNARY), FakeCupyArray())


def test_negative_strides_become_a_copied_tensor(torch):
    a = np.arange(12.0).reshape(3, 4)[::-1]
    with pytest.warns(interop.CopyWarning, match="negative strides"):
        t = interop.to_like(a, torch.zeros(1))
    np.testing.assert_array_equal(t.numpy(), a)
    with pytest.raises(ValueError, match="negative strides"):
        interop.to_like(a, torch.zeros(1), copy=False)


def test_to_like_torch_shares_and_copies_on_request(torch):
    a = np.ones((2, 3), dtype=np.float32)
    t = interop.to_like(a, torch.zeros(1))
    assert t.data_ptr() == ptr(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert interop.to_like(a, torch.zeros(1), copy=False).data_ptr() == ptr(a)
    assert interop.to_like(a, torch.zeros(1), copy=True).data_ptr() != ptr(a)
    # A tensor back to NumPy: shared.
    assert ptr(interop.to_like(t, np.zeros(1))) == ptr(a)


# -- JAX ----------------------------------------------------------------------------------------------

def test_jax_arrays_are_shared_without_copy(jnp):
    unary = jnp.asarray(UNARY.astype(np.float32))
    image = jnp.asarray(IMAGE.astype(np.float32))
    shared = interop.as_array(unary)
    assert ptr(shared) == unary.unsafe_buffer_pointer()
    q = cucrf.infer(unary, image, like="input", **KW)
    assert type(q).__module__.startswith("jax") and q.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(q), cucrf.infer(UNARY.astype(np.float32),
                                                             IMAGE.astype(np.float32), **KW))


def test_to_like_jax_is_zero_copy_for_aligned_buffers(jnp):
    buffer = np.empty(4 * 6 + 64, dtype=np.uint8)
    start = (-ptr(buffer)) % 64
    a = buffer[start:start + 24].view(np.float32).reshape(2, 3)  # 64-byte aligned, as XLA wants
    a[...] = 1.5
    j = interop.to_like(a, jnp.zeros(1))
    assert j.unsafe_buffer_pointer() == ptr(a)
    assert float(j.sum()) == 9.0


def test_traced_jax_values_point_to_cucrf_jax(jnp):
    import jax

    with pytest.raises(TypeError, match="traced JAX value .* cucrf.jax.infer"):
        jax.jit(lambda u: cucrf.infer(u, IMAGE.astype(np.float32)))(jnp.asarray(UNARY.astype(np.float32)))


# -- GPU (skipped without CUDA) -----------------------------------------------------------------------

def cuda_torch(torch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("CuPy sees no GPU")
    return cupy


def test_cuda_tensor_stays_on_its_gpu_without_copy(torch):
    cupy = cuda_torch(torch)
    device = torch.device("cuda", torch.cuda.device_count() - 1)  # the last GPU: not the default one
    unary = torch.from_numpy(UNARY.astype(np.float32)).to(device)
    image = torch.from_numpy(IMAGE.astype(np.float32)).to(device)
    shared = interop.as_array(unary)
    assert isinstance(shared, cupy.ndarray) and shared.data.ptr == unary.data_ptr()
    assert shared.device.id == device.index
    q = cucrf.infer(unary, image, like="input", **KW)
    assert isinstance(q, torch.Tensor) and q.device == device
    np.testing.assert_allclose(q.cpu().numpy(), cucrf.infer(UNARY.astype(np.float32), IMAGE.astype(np.float32),
                                                            **KW), atol=1e-5)


def test_cuda_and_cpu_tensors_mixed_are_refused(torch):
    cuda_torch(torch)
    with pytest.raises(TypeError, match="unary is a torch.Tensor on cuda:0 but image is a torch.Tensor on cpu"):
        cucrf.infer(torch.zeros(C, H, W, device="cuda"), torch.zeros(H, W, F))


def test_tensors_on_two_gpus_are_refused(torch):
    cuda_torch(torch)
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with pytest.raises(ValueError, match="unary is on GPU 0 but image is on GPU 1"):
        cucrf.infer(torch.zeros(C, H, W, device="cuda:0"), torch.zeros(H, W, F, device="cuda:1"))


def test_docstring_examples():
    import doctest

    result = doctest.testmod(interop, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
