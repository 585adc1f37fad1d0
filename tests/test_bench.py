"""The benchmark module runs end to end (tiny sizes; timings are not asserted)."""

import numpy as np
import pytest

from cucrf import bench


def test_run_cpu_small_case_reports_rows():
    lines = []
    rows = bench.run_cpu(repeat=1, iterations=1, cases=[(24, 31, 3, 5, 2)], print_fn=lines.append)
    assert len(rows) == 1 and len(lines) == 1
    row = rows[0]
    assert row["case"] == "24x31x3 filter 5 blur 2"
    assert row["cucrf_s"] > 0 and row["extra_memory_x_unary"] > 0


def test_make_problem_shapes():
    unary, image = bench.make_problem(10, 12, 4)
    assert unary.shape == (4, 10, 12) and unary.dtype == np.float32
    assert image.shape == (10, 12, 3) and image.dtype == np.uint8


def test_run_fit_small_case_reports_throughput():
    rows = bench.run_fit(images=2, epochs=1, cases=[(24, 32, 3, 2)], print_fn=lambda *_: None)
    assert len(rows) == 1 and rows[0]["case"] == "24x32x3 batch 2"
    assert rows[0]["images_per_s"] > 0


def test_generated_images_are_lazy_and_consistent():
    unaries = bench._GeneratedImages(0, 3, 8, 10, 4)
    labels = bench._GeneratedImages(2, 3, 8, 10, 4)
    assert len(unaries) == 3 and unaries[1].shape == (4, 8, 10)
    np.testing.assert_array_equal(labels[2], unaries[2].argmax(axis=0))
    with pytest.raises(IndexError):
        unaries[3]
