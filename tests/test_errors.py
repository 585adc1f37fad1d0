"""Bad input gets a clear ValueError/TypeError naming the argument and what was expected."""

import json

import numpy as np
import pytest

import cucrf
from cucrf import _validation

rng = np.random.default_rng(0)
UNARY = rng.normal(size=(3, 10, 12)).astype(np.float32)
IMAGE = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)


def call(unary=UNARY, image=IMAGE, **kw):
    kw.setdefault("filter_size", 3)
    kw.setdefault("blur", 1)
    return cucrf.infer(unary, image, **kw)


@pytest.mark.parametrize("unary,match", [
    (UNARY[0], "unary must have 3 or 4 dimensions, got shape \\(10, 12\\)"),
    (UNARY[None, None], "unary must have 3 or 4 dimensions"),
    (UNARY[:1], "at least 2 classes"),
    (np.zeros((3, 0, 12), np.float32), "unary must not be empty"),
])
def test_unary_shape_errors(unary, match):
    with pytest.raises(ValueError, match=match):
        call(unary=unary)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_unary(bad):
    u = UNARY.copy()
    u[1, 2, 3] = bad
    with pytest.raises(ValueError, match="unary contains 1 NaN or infinite"):
        call(unary=u)


def test_non_finite_image():
    im = IMAGE.astype(np.float32)
    im[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="image contains 1 NaN"):
        call(image=im)


@pytest.mark.parametrize("unary,exc,match", [
    (UNARY.astype(np.complex64), TypeError, "unary must be real, got complex"),
    (UNARY.astype(object), TypeError, "numeric array, got dtype object"),
    (UNARY > 0, TypeError, "boolean"),
    (UNARY.astype(np.int32), TypeError, "unary_kind='labels'"),
])
def test_unary_dtype_errors(unary, exc, match):
    with pytest.raises(exc, match=match):
        call(unary=unary)


def test_image_channels_first_is_named():
    with pytest.raises(ValueError, match="looks channels-first"):
        call(image=IMAGE.transpose(2, 0, 1))


def test_image_size_mismatch():
    with pytest.raises(ValueError, match=r"image height and width \(10, 11\) differ from the unary's \(10, 12\)"):
        call(image=IMAGE[:, :11])


def test_grey_image_without_channel_axis_gets_hint():
    with pytest.raises(ValueError, match=r"image\[..., None\]"):
        call(image=IMAGE[..., 0])


def test_batch_mismatch():
    with pytest.raises(ValueError, match="image has batch size 3 but the unary has 2"):
        call(unary=np.stack([UNARY, UNARY]), image=np.stack([IMAGE] * 3))


def test_image_bool_and_complex():
    with pytest.raises(TypeError, match="image must be numeric"):
        call(image=IMAGE > 5)
    with pytest.raises(TypeError, match="image must be real"):
        call(image=IMAGE.astype(np.complex64))


def test_empty_image_channels():
    with pytest.raises(ValueError, match="image must not be empty"):
        call(image=np.zeros((10, 12, 0), np.uint8))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(filter_size=4), ValueError, "filter_size must be odd"),
    (dict(filter_size=1), ValueError, "filter_size must be >= 3"),
    (dict(filter_size=7.0), TypeError, "filter_size must be an integer, got 7.0"),
    (dict(filter_size=True), TypeError, "filter_size must be an integer"),
    (dict(filter_size=25), ValueError, "filter_size=25 is larger than the image allows"),
    (dict(filter_size=7, blur=4), ValueError, "with blur=4 the 10x12 image is a 3x3 grid"),
    (dict(blur=0), ValueError, "blur must be >= 1, got 0"),
    (dict(blur=1.5), TypeError, "blur must be an integer"),
    (dict(iterations=-1), ValueError, "iterations must be >= 0"),
    (dict(normalization="sym"), ValueError, "normalization must be one of"),
    (dict(output="labels"), ValueError, "output must be one of"),
    (dict(unary_kind="energy"), ValueError, "unary_kind must be one of"),
    (dict(device="tpu"), ValueError, "device must be one of"),
    (dict(dtype=np.float16), TypeError, "dtype must be numpy.float32"),
])
def test_config_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        call(**kw)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(theta_alpha=0), ValueError, "theta_alpha must be finite and > 0, got 0.0"),
    (dict(theta_alpha=-3), ValueError, "theta_alpha must be finite and > 0"),
    (dict(theta_gamma=np.inf), ValueError, "theta_gamma must be finite"),
    (dict(theta_beta=np.nan), ValueError, "theta_beta must be finite"),
    (dict(theta_beta=(1.0, -2.0)), ValueError, r"theta_beta\[1\] must be finite and > 0"),
    (dict(theta_beta=()), ValueError, "theta_beta must not be an empty"),
    (dict(theta_beta="13"), TypeError, "theta_beta must be a positive number or a sequence"),
    (dict(appearance_weight=np.nan), ValueError, "appearance_weight must be finite"),
    (dict(smoothness_weight="3"), TypeError, "smoothness_weight must be a real number"),
    (dict(unary_weight=np.inf), ValueError, "unary_weight must be finite"),
    (dict(compatibility=np.ones((2, 3))), ValueError, r"square \(C, C\) matrix"),
    (dict(compatibility="ising"), ValueError, "compatibility must be 'potts'"),
    (dict(compatibility=[[0, np.nan], [1, 0]]), ValueError, "compatibility must contain only finite"),
])
def test_params_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        cucrf.CRFParams(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(theta_gamma=1e-300), r"theta_gamma must be in \[1e-06, 1e\+06\], got 1e-300"),
    (dict(theta_alpha=1e300), r"theta_alpha must be in \[1e-06, 1e\+06\], got 1e\+300"),
    (dict(theta_alpha=1e-7), r"theta_alpha must be in \[1e-06, 1e\+06\], got 1e-07"),
    (dict(theta_beta=(10.0, 1e7)), r"theta_beta\[1\] must be in \[1e-06, 1e\+06\], got 10000000.0"),
    (dict(appearance_weight=-1e300), r"appearance_weight must be in \[-1e\+06, 1e\+06\], got -1e\+300"),
    (dict(smoothness_weight=2e6), r"smoothness_weight must be in \[-1e\+06, 1e\+06\], got 2000000.0"),
    (dict(unary_weight=1e300), r"unary_weight must be in \[-1e\+06, 1e\+06\], got 1e\+300"),
    (dict(compatibility=[[0, 1e300], [1, 0]]),
     r"compatibility entries must be in \[-1e\+06, 1e\+06\], got compatibility\[0\]\[1\] = 1e\+300"),
])
def test_params_out_of_range(kw, match):
    with pytest.raises(ValueError, match=match):
        call(params=cucrf.CRFParams(**kw))
    with pytest.raises(ValueError, match=match):
        cucrf.CRFParams.from_json(json.dumps({k: v for k, v in kw.items()}))


def test_params_range_limits_accepted():
    p = cucrf.CRFParams(theta_alpha=1e6, theta_beta=1e-6, theta_gamma=1e-6, appearance_weight=-1e6,
                        smoothness_weight=1e6, unary_weight=1e6, compatibility=[[0, 1e6], [-1e6, 0]])
    assert cucrf.CRFParams.from_json(p.to_json()) == p
    q = call(params=p.replace(compatibility="potts", unary_weight=1.0, appearance_weight=1.0))
    assert np.isfinite(q).all()


def test_params_mismatch_with_problem():
    with pytest.raises(ValueError, match=r"compatibility has shape \(2, 2\) but the unary has 3 classes"):
        call(params=cucrf.CRFParams(compatibility=np.eye(2)))
    with pytest.raises(ValueError, match="theta_beta has 2 values but the image has 3 channels"):
        call(params=cucrf.CRFParams(theta_beta=(1.0, 2.0)))
    with pytest.raises(TypeError, match="params must be a cucrf.CRFParams"):
        call(params=[1, 2])


def test_params_are_immutable_and_roundtrip(tmp_path):
    p = cucrf.CRFParams(theta_beta=(10, 11, 12), compatibility=np.eye(3))
    with pytest.raises(Exception):
        p.theta_alpha = 3.0
    path = tmp_path / "p.json"
    p.to_json(path)
    assert cucrf.CRFParams.from_json(path) == p
    assert cucrf.CRFParams.from_json(p.to_json()) == p
    assert json.loads(p.to_json())["theta_beta"] == [10.0, 11.0, 12.0]
    assert "theta_beta=(10.0, 11.0, 12.0)" in repr(p)
    with pytest.raises(ValueError, match="unknown CRF parameter"):
        cucrf.CRFParams.from_dict({"theta": 1})
    with pytest.raises(ValueError, match="not valid JSON"):
        cucrf.CRFParams.from_json("{bad json")


def test_mixed_array_libraries():
    class FakeCupy:  # an object that claims to live in cupy, without importing it
        pass

    FakeCupy.__module__ = "cupy._core.core"
    assert _validation.array_library("unary", FakeCupy()) == "cupy"
    assert _validation.array_library("unary", UNARY) == "numpy"


def test_mixed_libraries_refused_without_gpu():
    class FakeCupyArray:  # claims to be a CuPy array; is refused before anything touches it
        shape = IMAGE.shape

    FakeCupyArray.__module__ = "cupy"
    with pytest.raises(TypeError, match="unary is a numpy array but image is a cupy array"):
        cucrf.infer(UNARY, FakeCupyArray())


def test_numpy_and_cupy_mixed_is_refused():
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("no GPU")
    with pytest.raises(TypeError, match="unary is a cupy array but image is a numpy array"):
        cucrf.infer(cupy.asarray(UNARY), IMAGE)


def test_problem_too_large_is_refused_before_allocating(monkeypatch):
    monkeypatch.setattr("cucrf._api.available_memory_bytes", lambda: 1000)
    with pytest.raises(cucrf.ProblemTooLargeError, match=r"needs about .* GiB .* only 0.0 GiB is available"):
        call()
    # it is a ValueError as well as a MemoryError
    assert issubclass(cucrf.ProblemTooLargeError, ValueError)


def test_huge_problem_estimate_is_refused_without_allocation():
    # A (2, 21, 30000, 30000) float32 unary needs ~150 GB just to exist: refused by the estimate.
    unary = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (2, 21, 30000, 30000), (0, 0, 0, 0))
    image = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (2, 30000, 30000, 3), (0, 0, 0, 0))
    with pytest.raises(cucrf.ProblemTooLargeError):
        cucrf.infer(unary, image, filter_size=7, blur=4)


def test_labels_kind_errors():
    labels = rng.integers(0, 3, size=(10, 12))
    with pytest.raises(ValueError, match="needs num_classes"):
        call(unary=labels, unary_kind="labels")
    bad = labels.copy()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match=r"labels contains value\(s\) \[7\] outside \[0, 3\)"):
        call(unary=bad, unary_kind="labels", num_classes=3)
    with pytest.raises(ValueError, match="confidence must be a number in"):
        call(unary=labels, unary_kind="labels", num_classes=3, confidence=1.5)
    with pytest.raises(TypeError, match="labels must be an integer array"):
        cucrf.unary_from_labels(labels.astype(float), 3)


def test_probabilities_kind_errors():
    with pytest.raises(ValueError, match=r"probabilities must lie in \[0, 1\]"):
        call(unary=UNARY, unary_kind="probabilities")
    with pytest.raises(ValueError, match="clip must be a number in"):
        cucrf.unary_from_probabilities(np.full((2, 3, 3), 0.5), clip=0)


def test_gpu_requested_without_gpu_is_a_clear_error():
    try:
        import cupy

        has_gpu = cupy.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_gpu = False
    if has_gpu:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="(needs CuPy: install it with|needs a CUDA GPU)"):
        call(device="gpu")


def test_memory_estimate_counts_stored_kernels_only_where_stored():
    from cucrf import _meanfield

    config = _meanfield.CRFConfig(11, 1, 5)
    stored = _meanfield.estimate_bytes(1, 19, (256, 512), 3, config, 4)
    on_the_fly = _meanfield.estimate_bytes(1, 19, (256, 512), 3, config, 4, stored_kernels=False)
    # the (1, 1, 121, 256, 512) float32 kernel stack is the difference
    assert stored - on_the_fly == 121 * 256 * 512 * 4


@pytest.mark.parametrize("which", ["unary", "image"])
def test_masked_array_is_refused(which):
    unary = UNARY.copy()
    unary[0, 0, 0] = np.nan
    masked = {"unary": np.ma.masked_invalid(unary), "image": np.ma.masked_equal(IMAGE, 0)}[which]
    kw = {which: masked}
    with pytest.raises(TypeError, match=rf"{which} must not be a masked array.*filled"):
        call(**kw)
    with pytest.raises(TypeError, match=rf"{which} must not be a masked array"):
        cucrf.infer_vjp(kw.get("unary", UNARY), kw.get("image", IMAGE), grad_output=np.ones_like(UNARY),
                        filter_size=3, blur=1)


def test_masked_label_map_is_refused():
    labels = np.ma.masked_equal(rng.integers(0, 3, size=(10, 12)), 0)
    with pytest.raises(TypeError, match="unary must not be a masked array.*unknown_label"):
        call(unary=labels, unary_kind="labels", num_classes=3)


def test_problem_too_large_is_refused_before_converting_labels(monkeypatch):
    import cucrf._api as api
    monkeypatch.setattr("cucrf._api.available_memory_bytes", lambda: 1000)

    def fail(*args, **kwargs):
        raise AssertionError("converted before the memory check")

    monkeypatch.setattr(api, "unary_from_labels", fail)
    monkeypatch.setattr(api, "unary_from_probabilities", fail)
    labels = rng.integers(0, 3, size=(10, 12))
    with pytest.raises(cucrf.ProblemTooLargeError, match=r"needs about"):
        call(unary=labels, unary_kind="labels", num_classes=150)
    probabilities = np.full((150, 10, 12), 1 / 150, np.float32)
    with pytest.raises(cucrf.ProblemTooLargeError, match=r"needs about"):
        call(unary=probabilities, unary_kind="probabilities")


# -- values that used to be accepted and silently changed ------------------------------------------

def test_complex_compatibility_is_refused():
    with pytest.raises(TypeError, match="compatibility must be real, got complex dtype complex128"):
        cucrf.CRFParams(compatibility=np.ones((3, 3)) * (1 + 1j))
    with pytest.raises(TypeError, match="compatibility must be real"):
        cucrf.CRFParams(compatibility=[[0, 1j], [1, 0]])


def test_complex_feature_transform_is_refused():
    with pytest.raises(TypeError, match="feature_transform matrix must be real, got complex dtype"):
        call(feature_transform=np.eye(3) * (1 + 0.5j))
    with pytest.raises(TypeError, match="feature_transform offset must be real"):
        call(feature_transform={"matrix": np.eye(3), "offset": np.zeros(3) + 1j})
    with pytest.raises(TypeError, match="feature_transform matrix must be an array of numbers"):
        call(feature_transform=[["a", "b", "c"]] * 3)


@pytest.mark.parametrize("value", [{10.0, 12.0, 14.0}, frozenset({10.0, 12.0, 14.0}), {"r": 10.0, "g": 12.0}])
def test_theta_beta_without_channel_order_is_refused(value):
    with pytest.raises(TypeError, match=r"theta_beta must be .* in channel order; .* no channel order"):
        cucrf.CRFParams(theta_beta=value)


@pytest.mark.parametrize("value,exc,match", [
    (255.7, ValueError, r"unknown_label must be a whole number \(a label id\), got 255.7"),
    (float("nan"), ValueError, "unknown_label must be a whole number"),
    ("abc", TypeError, "unknown_label must be an integer label id or None, got 'abc' of type str"),
    ("255", TypeError, "unknown_label must be an integer label id"),
    (True, TypeError, "unknown_label must be an integer label id"),
])
def test_unknown_label_must_be_an_integer(value, exc, match):
    labels = rng.integers(0, 3, size=(10, 12))
    with pytest.raises(exc, match=match):
        cucrf.unary_from_labels(labels, 3, unknown_label=value)
    with pytest.raises(exc, match=match):
        call(unary=labels, unary_kind="labels", num_classes=3, unknown_label=value)


def test_unknown_label_as_a_whole_float_is_the_integer():
    labels = rng.integers(0, 3, size=(10, 12))
    labels[0, 0] = 255
    np.testing.assert_array_equal(cucrf.unary_from_labels(labels, 3, unknown_label=255.0),
                                  cucrf.unary_from_labels(labels, 3, unknown_label=255))


def test_uint64_labels_are_quoted_as_they_are():
    labels = rng.integers(0, 3, size=(10, 12)).astype(np.uint64)
    labels[0, 0] = 2**64 - 1
    with pytest.raises(ValueError, match=r"labels contains value\(s\) \[18446744073709551615\] outside \[0, 3\)"):
        cucrf.unary_from_labels(labels, 3)
    # as unknown_label it is recognised, not wrapped to -1
    u = cucrf.unary_from_labels(labels, 3, unknown_label=2**64 - 1)
    np.testing.assert_allclose(u[:, 0, 0], np.log(1 / 3), rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[18446744073709551615\]"):
        cucrf.unary_from_labels(labels, 3, unknown_label=-1)  # -1 is no uint64 value: never equal


@pytest.mark.parametrize("dtype,clip", [(np.float32, 1e-50), (np.float32, 1e-40), (np.float64, 1e-320)])
def test_clip_too_small_for_the_dtype_is_refused(dtype, clip):
    p = np.zeros((2, 3, 3), dtype)
    p[0] = 1
    with pytest.raises(ValueError, match=rf"clip must be at least .* \(the smallest normal {np.dtype(dtype).name}\).*"
                                         r"log\(clip\) is finite"):
        cucrf.unary_from_probabilities(p, clip=clip)
    tiny = float(np.finfo(dtype).tiny)
    assert np.isfinite(cucrf.unary_from_probabilities(p, clip=tiny)).all()


def test_as_array_refuses_none_and_unknown_devices():
    from cucrf import interop

    with pytest.raises(ValueError, match=r"device must be one of \[None, 'cpu', 'gpu'\], got 'tpu'"):
        interop.as_array(np.ones(3), device="tpu")
    with pytest.raises(TypeError, match="array must be an array .* got None"):
        interop.as_array(None)
    with pytest.raises(TypeError, match="unary must be an array .* got None"):
        call(unary=None)


@pytest.mark.parametrize("dtype,match", [
    ("bogus", r"dtype must be numpy.float32, numpy.float64 \(or 'float32', 'float64'\) or None, got 'bogus', "
              "which is not a dtype"),
    (np.int32, r"dtype must be numpy.float32, numpy.float64 .* got <class 'numpy.int32'>"),
    ("float16", r"got 'float16'"),
])
def test_dtype_errors_say_what_is_accepted(dtype, match):
    with pytest.raises(TypeError, match=match):
        call(dtype=dtype)
    with pytest.raises(TypeError, match=match):
        cucrf.infer_vjp(UNARY, IMAGE, grad_output=np.ones_like(UNARY), dtype=dtype)


def test_dtype_as_a_string_is_accepted():
    assert call(dtype="float64").dtype == np.float64


def test_from_json_accepts_bytes_and_a_byte_order_mark(tmp_path):
    want = cucrf.CRFParams(theta_alpha=3.0)
    assert cucrf.CRFParams.from_json(b'{"theta_alpha": 3}') == want
    assert cucrf.CRFParams.from_json('\ufeff{"theta_alpha": 3}') == want
    path = tmp_path / "bom.json"
    path.write_text('{"theta_alpha": 3}', encoding="utf-8-sig")  # what some Windows editors write
    assert cucrf.CRFParams.from_json(path) == want
    assert cucrf.CRFParams.from_json(str(path)) == want
    with pytest.raises(ValueError, match="given as bytes must be UTF-8 JSON text"):
        cucrf.CRFParams.from_json(b'{"theta_alpha": "\xff"}')


@pytest.mark.parametrize("text,exc,match", [
    ("[1, 2]", ValueError, r"must be a JSON object such as \{\"theta_alpha\": 80.0\}, got a JSON list"),
    (" [80.0]", ValueError, "got a JSON list"),
    ('{"theta_alpha": ' + "9" * 400 + "}", ValueError,
     r"theta_alpha must be in \[1e-06, 1e\+06\], got an integer of 400 or more digits"),
    ('{"unary_weight": -' + "9" * 400 + "}", ValueError, r"unary_weight must be in .* 400 or more digits"),
    ('{"compatibility": [[0, ' + "9" * 400 + "], [1, 0]]}", ValueError, "compatibility entries must be in"),
    ('{"theta_alpha": ' + "9" * 5000 + "}", ValueError, "not valid JSON: Exceeds the limit"),
])
def test_from_json_content_errors(text, exc, match):
    with pytest.raises(exc, match=match):
        cucrf.CRFParams.from_json(text)


def test_from_json_other_types_are_a_type_error():
    with pytest.raises(TypeError, match=r"JSON text \(str or bytes\) or a file path \(str or os.PathLike\), got int"):
        cucrf.CRFParams.from_json(3)


def test_from_json_path_that_starts_with_a_brace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "{run 1}.json").write_text('{"theta_alpha": 3}')
    with pytest.raises(ValueError, match=r"not valid JSON: .*read as JSON text, but a file of that name exists: "
                                         r"pass pathlib.Path\('\{run 1\}.json'\)"):
        cucrf.CRFParams.from_json("{run 1}.json")
    import pathlib

    assert cucrf.CRFParams.from_json(pathlib.Path("{run 1}.json")).theta_alpha == 3.0  # a Path is always a file


def test_channels_first_torch_image_gets_a_permute_hint():
    torch = pytest.importorskip("torch")
    import cucrf.torch as ct

    unary = torch.tensor(UNARY)[None]
    image = torch.tensor(IMAGE).permute(2, 0, 1)[None]  # (B, F, H, W)
    for fn in (cucrf.infer, ct.infer):
        with pytest.raises(ValueError, match=r"looks channels-first.*image.permute\(0, 2, 3, 1\)"):
            fn(unary, image, filter_size=3, blur=1)
    with pytest.raises(ValueError, match=r"image.transpose\(0, 2, 3, 1\)"):
        call(unary=UNARY[None], image=IMAGE.transpose(2, 0, 1)[None])
