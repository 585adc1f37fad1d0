"""cucrf.dask.infer equals cucrf.infer on the whole array, for every chunking, size and setting.

On the threaded scheduler (Hypothesis over sizes, chunkings, blur, filter, iterations and
normalisation), on a real dask.distributed LocalCluster of processes, in 3-D and with batches.
A worker process killed mid-run changes nothing in the result.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import cucrf  # noqa: E402
import cucrf.dask  # noqa: E402

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _inputs(rng, shape, classes=3, channels=3, batch=None):
    lead = () if batch is None else (batch,)
    unary = rng.normal(0, 2, lead + (classes,) + shape)
    image = rng.uniform(0, 255, lead + shape + (channels,))
    return unary, image


def _dask(unary, image, spatial_chunks, batch_chunk=None):
    lead = () if batch_chunk is None else (batch_chunk,)
    u = da.from_array(unary, chunks=lead + (unary.shape[len(lead)],) + tuple(spatial_chunks))
    im = da.from_array(image, chunks=lead + tuple(spatial_chunks) + (image.shape[-1],))
    return u, im


@st.composite
def problems(draw):
    blur = draw(st.integers(1, 5))
    filter_size = draw(st.sampled_from([3, 5, 7]))
    H = draw(st.integers(max(blur, 2), 75))
    W = draw(st.integers(max(blur, 2), 75))
    chunks = (draw(st.integers(1, H)), draw(st.integers(1, W)))
    return dict(H=H, W=W, chunks=chunks, blur=blur, filter_size=filter_size,
                iterations=draw(st.integers(0, 3)), normalization=draw(st.sampled_from([None, "symmetric"])),
                include_self=draw(st.booleans()), dtype=draw(st.sampled_from([np.float64, np.float32])),
                seed=draw(st.integers(0, 2**16)))


def _check_equal(p, scheduler="threads", output="probabilities"):
    rng = np.random.default_rng(p["seed"])
    unary, image = _inputs(rng, (p["H"], p["W"]))
    unary = unary.astype(p["dtype"])
    kwargs = dict(filter_size=p["filter_size"], blur=p["blur"], iterations=p["iterations"],
                  normalization=p["normalization"], include_self=p["include_self"])
    try:
        whole = cucrf.infer(unary, image, output="logits" if output == "logits" else "probabilities", **kwargs)
    except ValueError as exc:  # settings the image is too small for: refused alike, before any work
        with pytest.raises(ValueError, match=str(exc).split(":")[0]):
            cucrf.dask.infer(*_dask(unary, image, p["chunks"]), output=output, **kwargs)
        return
    tiled = cucrf.dask.infer(*_dask(unary, image, p["chunks"]), output=output, **kwargs)
    got = tiled.compute(scheduler=scheduler)
    if output == "labels":
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, whole.argmax(axis=0))
        return
    assert got.dtype == whole.dtype and got.shape == whole.shape
    assert np.abs(got - whole).max() <= TOL[p["dtype"]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_equals_whole_array_inference_threads(p):
    _check_equal(p)


@pytest.mark.parametrize("output", ["logits", "labels"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_outputs_logits_and_labels(p, output):
    _check_equal(p, output=output)


def test_labels_are_the_first_largest_logit_in_the_smallest_dtype():
    scores = np.array([[[1.0, 2.0, 3.0, 3.0]], [[1.0, 5.0, 3.0, -1.0]], [[0.5, 5.0, 7.0, 3.0]]])
    labels = cucrf.dask.argmax_classes(scores, 0)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, scores.argmax(axis=0))
    assert cucrf.dask.label_dtype(256) == np.uint8 and cucrf.dask.label_dtype(257) == np.uint16
    assert cucrf.dask.label_dtype(70000) == np.uint32


def test_every_chunking_of_one_image_bit_identical():
    # Float64 with unit spacing: the tiles compute exactly the whole image's arithmetic.
    rng = np.random.default_rng(0)
    unary, image = _inputs(rng, (97, 83))
    whole = cucrf.infer(unary, image, blur=3, filter_size=5, iterations=3)
    for chunks in [(97, 83), (40, 40), (13, 83), (97, 7), (50, 29)]:
        got = cucrf.dask.infer(*_dask(unary, image, chunks), blur=3, filter_size=5, iterations=3).compute()
        assert np.array_equal(got, whole), chunks


def test_batch_labels_in_spacing_and_feature_transform():
    rng = np.random.default_rng(1)
    unary, image = _inputs(rng, (60, 70), batch=3)
    labels = unary.argmax(axis=1).astype(np.int32)
    labels[:, ::7, ::5] = 255
    transform = {"matrix": rng.normal(size=(2, 3)), "offset": np.array([1.0, -2.0])}
    params = cucrf.CRFParams(theta_beta=(30.0, 50.0))
    kwargs = dict(unary_kind="labels", num_classes=4, unknown_label=255, confidence=0.6, blur=2,
                  feature_transform=transform, spacing=(1.5, 0.75), iterations=2, dtype=np.float64, spatial_dims=2)
    whole = cucrf.infer(labels, image, params, **kwargs)
    u = da.from_array(labels, chunks=(2, 25, 30))
    im = da.from_array(image, chunks=(2, 25, 30, 3))
    got = cucrf.dask.infer(u, im, params, **kwargs)
    assert got.shape == whole.shape == (3, 4, 60, 70)
    assert np.abs(got.compute() - whole).max() <= 1e-12


def test_volumes_with_per_axis_settings():
    rng = np.random.default_rng(2)
    unary, image = _inputs(rng, (23, 31, 29), classes=2, channels=1)
    kwargs = dict(spatial_dims=3, filter_size=(3, 5, 5), blur=(1, 2, 3), iterations=2, spacing=(2.0, 1.0, 1.0),
                  normalization="symmetric")
    whole = cucrf.infer(unary, image, **kwargs)
    got = cucrf.dask.infer(*_dask(unary, image, (9, 16, 12)), **kwargs).compute()
    assert np.abs(got - whole).max() <= 1e-12


def test_small_chunks_are_merged_to_the_context():
    rng = np.random.default_rng(3)
    unary, image = _inputs(rng, (200, 150))
    tiled = cucrf.dask.infer(*_dask(unary, image, (10, 10)), iterations=2)
    depth = cucrf.receptive_radius(5, 4, 2)[0] + 3
    assert min(min(c) for c in tiled.chunks[1:]) >= depth
    assert np.abs(tiled.compute() - cucrf.infer(unary, image, iterations=2)).max() <= 1e-5


def test_stored_arrays_each_tile_reads_its_own_window():
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(7)
    unary, image = _inputs(rng, (130, 170), batch=2)
    stored = zarr.open_array(zarr.storage.MemoryStore(), mode="w", shape=unary.shape, chunks=(1, 3, 64, 64),
                             dtype=unary.dtype)
    stored[:] = unary
    kwargs = dict(blur=3, iterations=2, normalization="symmetric")
    whole = cucrf.infer(unary, image, **kwargs)

    class Counting:  # an image that counts the pixels read
        def __init__(self, array):
            self.array, self.shape, self.dtype, self.ndim, self.read = array, array.shape, array.dtype, array.ndim, 0

        def __getitem__(self, key):
            part = self.array[key]
            self.read += part.size
            return part

    counted = Counting(image)
    got = cucrf.dask.infer_stored(stored, counted, chunks=(40, 50), **kwargs)
    assert got.chunks[2:] == ((40, 40, 40, 10), (50, 50, 50, 20))  # no minimum: each tile reads its context
    assert np.abs(got.compute(scheduler="sync") - whole).max() <= 1e-12
    depth = cucrf.receptive_radius(5, 3, 2, normalization="symmetric")[0] + 2
    assert image.size < counted.read <= image.size * 2 * (1 + 2 * depth / 40) * (1 + 2 * depth / 50)
    labels = unary.argmax(axis=1)
    got = cucrf.dask.infer_stored(labels, image, chunks=64, unary_kind="labels", num_classes=3, output="labels",
                                  spatial_dims=2, iterations=2)
    expected = cucrf.infer(labels, image, unary_kind="labels", num_classes=3, spatial_dims=2, iterations=2)
    np.testing.assert_array_equal(got.compute(), expected.argmax(axis=1))
    with pytest.raises(TypeError, match="use cucrf.dask.infer for Dask arrays"):
        cucrf.dask.infer_stored(da.from_array(unary), image)
    with pytest.raises(TypeError, match="image must be an array-like"):
        cucrf.dask.infer_stored(unary, image.tolist())
    with pytest.raises(ValueError, match="chunks must be an int or 2 ints"):
        cucrf.dask.infer_stored(unary, image, chunks=(1, 2, 3))


def test_bad_input_is_named():
    rng = np.random.default_rng(4)
    unary, image = _inputs(rng, (40, 50))
    u, im = _dask(unary, image, (20, 25))
    with pytest.raises(TypeError, match="use cucrf.infer for arrays in memory"):
        cucrf.dask.infer(unary, im)
    with pytest.raises(TypeError, match="image is a numpy.ndarray"):
        cucrf.dask.infer(u, image)
    with pytest.raises(ValueError, match=r"class axis \(axis 0, 3 classes\) is split.*unary.rechunk\(\{0: -1\}\)"):
        cucrf.dask.infer(u.rechunk((1, 20, 25)), im)
    with pytest.raises(ValueError, match=r"channel axis \(axis 2, 3 channels\) is split.*image.rechunk\(\{2: -1\}\)"):
        cucrf.dask.infer(u, im.rechunk((20, 25, 2)))
    with pytest.raises(ValueError, match=r"chunked differently.*image = image.rechunk\(\(20, 25, 3\)\)"):
        cucrf.dask.infer(u, im.rechunk((40, 10, 3)))
    with pytest.raises(ValueError, match="output must be one of"):
        cucrf.dask.infer(u, im, output="argmax")
    with pytest.raises(ValueError, match="channels-last"):
        cucrf.dask.infer(da.from_array(np.moveaxis(unary, 0, -1)), im)
    with pytest.raises(ValueError, match="filter_size=31 is larger than the image allows"):
        cucrf.dask.infer(u, im, filter_size=31, blur=4)
    with pytest.raises(ValueError, match="needs num_classes"):
        cucrf.dask.infer(da.from_array(unary.argmax(0)), im, unary_kind="labels")
    # Errors that need the values are raised when the tile is computed, as cucrf.infer raises them.
    bad = unary.copy()
    bad[1, 30, 40] = np.nan
    with pytest.raises(ValueError, match="unary contains 1 NaN"):
        cucrf.dask.infer(da.from_array(bad, chunks=(3, 20, 25)), im).compute()


def test_docstring_examples():
    import doctest

    import cucrf.dask as module

    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


def test_import_cucrf_loads_no_dask():
    code = ("import sys, cucrf; cucrf.infer; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('dask', 'distributed', 'zarr', 'tifffile')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cupy_chunks_stay_cupy():
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
        cupy.zeros(1)
    except Exception:  # noqa: BLE001 - no usable GPU: nothing to test here
        pytest.skip("needs a CUDA GPU")
    rng = np.random.default_rng(5)
    unary, image = _inputs(rng, (300, 260))
    unary = unary.astype(np.float32)
    whole = cucrf.infer(cupy.asarray(unary), cupy.asarray(image.astype(np.float32))).get()
    u = da.from_array(cupy.asarray(unary), chunks=(3, 128, 100), asarray=False)
    im = da.from_array(cupy.asarray(image.astype(np.float32)), chunks=(128, 100, 3), asarray=False)
    tiled = cucrf.dask.infer(u, im)
    assert type(tiled._meta).__module__.startswith("cupy")
    got = tiled.compute()
    assert type(got).__module__.startswith("cupy")
    assert np.abs(got.get() - whole).max() <= 1e-5
    labels = cucrf.dask.infer(u, im, output="labels").compute()
    assert type(labels).__module__.startswith("cupy") and labels.dtype == np.uint8


# --- a real LocalCluster of processes -----------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=50)
    with Client(cluster) as c:
        yield c
    cluster.close()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_equals_whole_array_inference_local_cluster(client, p):
    _check_equal(p, scheduler=client.get)


def _lazy_inputs(shape, chunks, seed):
    """A unary (2, H, W) and image (H, W, 3) made chunk by chunk from a seed (a small graph)."""
    def block(x, block_info=None, classes=2):
        loc = block_info[None]["chunk-location"]
        rng = np.random.default_rng([seed, *loc])
        return rng.normal(0, 2, block_info[None]["chunk-shape"])

    unary = da.map_blocks(block, da.empty((2,) + shape, chunks=(2,) + chunks), dtype=np.float64)
    image = da.map_blocks(lambda x, block_info=None: block(x, block_info) * 40 + 128,
                          da.empty(shape + (3,), chunks=chunks + (3,)), dtype=np.float64)
    return unary, image


def test_worker_killed_mid_run_changes_nothing(client):
    unary, image = _lazy_inputs((600, 560), (100, 100), seed=6)
    kwargs = dict(blur=2, iterations=4)
    whole = cucrf.infer(unary.compute(), image.compute(), **kwargs)
    future = client.compute(cucrf.dask.infer(unary, image, **kwargs))
    # Wait until the cluster is busy with tiles, then kill one worker process outright.
    deadline = time.monotonic() + 60
    while not any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = client.run(os.getpid)
    victim = sorted(pids)[0]
    os.kill(pids[victim], signal.SIGKILL)
    assert not future.done()  # killed mid-run
    got = future.result(timeout=300)
    assert np.array_equal(got, whole)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the worker for later tests
