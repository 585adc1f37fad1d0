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


def test_run_cpu_with_the_floor_times_it_in_turn_with_the_cases(monkeypatch):
    """With floor=True the floor's two measurements join the cases' turns, and each row holds the
    measured machine and its case's floor time (floor_seconds of that case)."""
    turns = []
    real = bench.time_calls

    def recorded(fns, repeat, warmup=2, every=False):
        turns.append(len(fns))
        return real(fns, repeat, warmup, every)

    monkeypatch.setattr(bench, "time_calls", recorded)
    cases = [(24, 31, 3, 5, 2), (20, 22, 4, 3, 1)]
    rows = bench.run_cpu(repeat=1, iterations=2, cases=cases, print_fn=lambda *_: None, floor=True)
    assert turns[0] == len(cases) + 3  # the cases, the floor's copy and exps, the first case again
    for row, (H, W, C, _, _) in zip(rows, cases):
        floor = row["floor"]
        assert floor is rows[0]["floor"] and floor["bandwidth"] > 0 and floor["exp_rate"] > 0
        assert row["floor_s"] == bench.floor_seconds(C, H * W, 2, floor)


def test_run_cpu_with_cpu_times_measures_the_floor_on_its_own_in_wall_time(monkeypatch):
    """--cpu-time reports CPU times, but the floor is a wall time: then it is not in the turns."""
    turns, floors = [], []
    real_calls, real_floor = bench.time_calls, bench.measure_floor
    monkeypatch.setattr(bench, "time_calls", lambda fns, *a, **k: turns.append(len(fns)) or real_calls(fns, *a, **k))
    monkeypatch.setattr(bench, "measure_floor", lambda *a: floors.append(1) or real_floor(*a))
    monkeypatch.setattr(bench, "CPU_TIME", True)
    rows = bench.run_cpu(repeat=1, iterations=1, cases=[(24, 31, 3, 5, 2)], print_fn=lambda *_: None, floor=True)
    assert turns[0] == 1 and floors == [1]
    assert rows[0]["floor"]["bandwidth"] > 0 and rows[0]["floor_s"] > 0


def test_run_volumes_small_case_reports_rows():
    lines = []
    rows = bench.run_volumes(repeat=1, iterations=1, cases=[(12, 14, 10, 3)], print_fn=lines.append)
    assert len(rows) == 1 and lines[0].startswith("| 12x14x10x3 |")
    assert rows[0]["cucrf_s"] > 0 and rows[0]["extra_memory_x_unary"] > 0
    unary, image = bench.make_volume(12, 14, 10, 3)
    assert unary.shape == (3, 12, 14, 10) and image.shape == (12, 14, 10, 1)


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


def test_gpu_benchmark_without_a_gpu_is_one_line_before_any_work(monkeypatch, capsys):
    from cucrf import _backends

    def no_gpu(need_device=True):
        raise RuntimeError("device='gpu' needs a CUDA GPU, but CuPy found none usable")

    monkeypatch.setattr(_backends, "_import_cupy", no_gpu)
    ran = []
    monkeypatch.setattr(bench, "run_cpu", lambda *a, **k: ran.append("cpu"))
    assert bench.main(["--gpu", "--quick"]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m cucrf.bench: error: --gpu: "), err
    assert "CUDA GPU" in lines[0] and "Traceback" not in err
    assert ran == [] and out == ""  # checked before the CPU benchmark spends its minutes


def test_gpu_benchmark_module_without_a_gpu_is_one_line(monkeypatch, capsys):
    from cucrf import _backends, _bench_gpu

    def no_gpu(need_device=True):
        raise RuntimeError("CuPy is not installed")

    monkeypatch.setattr(_backends, "_import_cupy", no_gpu)
    assert _bench_gpu.main([]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "python -m cucrf._bench_gpu: error: CuPy is not installed"


def test_run_backward_small_problem_reports_every_column():
    lines = []
    problem = bench.make_problem(20, 24, 3)
    rows = bench.run_backward(repeat=1, iterations=2, problem=problem, filter_size=3, blur=2, print_fn=lines.append)
    assert [r["path"] for r in rows][-1] == "NumPy" and len(lines) == len(rows)
    for row, line in zip(rows, lines):  # (no comparison of times: one run each on a busy machine)
        assert row["taped_forward_s"] > 0 and row["vjp_s"] > 0 and row["forward_s"] > 0
        assert abs(row["backward_s"] - (row["vjp_s"] - row["taped_forward_s"])) < 1e-12
        assert line.startswith(f"| {row['path']} |") and line.count("|") == 8
    assert bench.BACKWARD_HEADER.splitlines()[0].count("|") == 8


def test_time_call_reports_the_median_or_with_least_the_least_wall_time(monkeypatch):
    durations = iter([9.0, 9.0, 5.0, 1.0, 3.0] * 2)  # two warm-up runs, then three timed ones
    now = [0.0]

    def run():
        now[0] += next(durations)

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    assert bench.time_call(run, repeat=3) == 3.0
    monkeypatch.setattr(bench, "LEAST", True)
    assert bench.time_call(run, repeat=3) == 1.0


def test_time_calls_runs_the_callables_in_turn_and_reports_one_time_each(monkeypatch):
    """Each callable once, then each again (a drifting machine slows them alike), two warm-up
    rounds first; the median of each, or with LEAST the least."""
    order = []
    now = [0.0]
    costs = {"a": iter([1.0, 1.0, 4.0, 2.0, 6.0]), "b": iter([1.0, 1.0, 3.0, 9.0, 5.0])}

    def runner(name):
        def run():
            order.append(name)
            now[0] += next(costs[name])
        return run

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    assert bench.time_calls([runner("a"), runner("b")], repeat=3) == [4.0, 5.0]
    assert order == ["a", "b"] * 5
    costs = {"a": iter([1.0, 1.0, 4.0, 2.0, 6.0]), "b": iter([1.0, 1.0, 3.0, 9.0, 5.0])}
    monkeypatch.setattr(bench, "LEAST", True)
    assert bench.time_calls([runner("a"), runner("b")], repeat=3) == [2.0, 3.0]
