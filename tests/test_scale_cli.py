"""``cucrf refine`` at scale: large images tile by tile to Zarr or TIFF, many images on workers.

Outputs equal what cucrf.infer gives on the whole image; outputs appear only when complete
(--resume relies on it); a failing image is reported at the end; a worker process killed
mid-run leaves the job's outputs identical to an undisturbed run, with no partial file.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dask.array")
pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")
tifffile = pytest.importorskip("tifffile")
imageio = pytest.importorskip("imageio.v3")

import cucrf  # noqa: E402
from cucrf.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _scene(rng, H, W, classes=2):
    yy, xx = np.mgrid[:H, :W]
    truth = (((yy - H / 2) ** 2 + (xx - W / 3) ** 2) < (min(H, W) / 3) ** 2).astype(int)
    image = np.where(truth[..., None] == 1, [200, 50, 40], [40, 70, 170])
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    unary = rng.normal(0, 1.5, (classes, H, W)).astype(np.float32)
    unary[truth, yy, xx] += 1.5
    return image, unary


def _temporaries(folder):
    return [p.name for p in Path(folder).rglob("*") if ".cucrf-tmp-" in p.name]


@pytest.fixture
def large(tmp_path):
    rng = np.random.default_rng(0)
    image, unary = _scene(rng, 700, 530)
    tifffile.imwrite(tmp_path / "image.tif", image, tile=(128, 128), compression="zlib")
    z = zarr.open_array(str(tmp_path / "unary.zarr"), mode="w", shape=unary.shape, chunks=(2, 200, 200),
                        dtype=unary.dtype)
    z[:] = unary
    np.save(tmp_path / "unary.npy", unary)
    expected = cucrf.infer(unary, image, blur=3, iterations=3).argmax(axis=0)
    return tmp_path, image, unary, expected


def test_large_image_to_zarr_and_tiff_equals_whole_image(large, capsys):
    folder, _, _, expected = large
    args = ["refine", str(folder / "image.tif"), "--blur", "3", "--iterations", "3", "--tile", "256", "--no-progress"]
    assert main(args + ["--unary", str(folder / "unary.zarr"), "-o", str(folder / "labels.zarr")]) == 0
    labels = zarr.open(str(folder / "labels.zarr"), mode="r")
    assert labels.dtype == np.uint8 and labels.chunks == (256, 256)
    np.testing.assert_array_equal(labels[:], expected)
    assert main(args + ["--unary", str(folder / "unary.npy"), "-o", str(folder / "labels.tif")]) == 0
    np.testing.assert_array_equal(tifffile.imread(folder / "labels.tif"), expected)
    out = capsys.readouterr().out
    assert "labels.zarr  (700x530, 2 classes, 9 tiles" in out and "labels.tif  (700x530" in out
    assert _temporaries(folder) == []


def test_large_label_map_on_local_workers(large, capsys):
    folder, image, unary, _ = large
    label_map = unary.argmax(axis=0).astype(np.uint8)
    label_map[::9, ::7] = 255
    tifffile.imwrite(folder / "coarse.tif", label_map)
    expected = cucrf.infer(label_map, image, unary_kind="labels", num_classes=2, unknown_label=255,
                           iterations=2).argmax(axis=0)
    assert main(["refine", str(folder / "image.tif"), "--unary", str(folder / "coarse.tif"), "-o",
                 str(folder / "refined.zarr"), "--iterations", "2", "--tile", "300", "--workers", "2",
                 "--no-progress"]) == 0
    np.testing.assert_array_equal(zarr.open(str(folder / "refined.zarr"), mode="r")[:], expected)


def test_grey_image_and_float16_scores(tmp_path, capsys):
    rng = np.random.default_rng(2)
    image, unary = _scene(rng, 300, 260)
    grey = image.mean(axis=2).astype(np.uint8)
    tifffile.imwrite(tmp_path / "grey.tif", grey)  # uncompressed: memory-mapped
    np.save(tmp_path / "u16.npy", unary.astype(np.float16))
    expected = cucrf.infer(unary.astype(np.float16).astype(np.float32), grey[..., None], iterations=2).argmax(axis=0)
    assert main(["refine", str(tmp_path / "grey.tif"), "--unary", str(tmp_path / "u16.npy"), "-o",
                 str(tmp_path / "labels.tif"), "--iterations", "2", "--tile", "128", "--no-progress"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "labels.tif"), expected)


def test_existing_outputs_refused_overwritten_or_resumed(large, capsys):
    folder = large[0]
    out = folder / "labels.zarr"
    base = ["refine", str(folder / "image.tif"), "--unary", str(folder / "unary.npy"), "-o", str(out),
            "--blur", "3", "--iterations", "3", "--no-progress"]
    assert main(base) == 0
    assert main(base) == 1
    assert "labels.zarr' exists; pass --overwrite to replace it, or --resume" in capsys.readouterr().err
    assert main(base + ["--resume"]) == 0
    assert "exists, skipped: --resume" in capsys.readouterr().out
    (out / "marker").write_text("old")
    assert main(base + ["--overwrite"]) == 0
    assert not (out / "marker").exists()
    np.testing.assert_array_equal(zarr.open(str(out), mode="r")[:], large[3])
    assert _temporaries(folder) == []


def test_large_image_bad_input(large, capsys):
    folder = large[0]
    image = str(folder / "image.tif")
    cases = [
        (["--unary", str(folder / "unary.npy"), "-o", str(folder / "x.zarr"), "--overlay"], "are for pictures in memory"),
        (["--unary", str(folder / "missing.zarr"), "-o", str(folder / "x.zarr")], "unary"),
        (["--unary", str(folder / "unary.npy"), "-o", str(folder / "x.zarr"), "--tile", "8"], "at least 16"),
        (["--unary", str(folder / "unary.npy"), "-o", str(folder / "image.tif")], "is the image"),
    ]
    for extra, message in cases:
        assert main(["refine", image, "--no-progress"] + extra) != 0
        assert message in capsys.readouterr().err
    np.save(folder / "small.npy", np.zeros((2, 10, 10), np.float32))
    assert main(["refine", image, "--unary", str(folder / "small.npy"), "-o", str(folder / "x.zarr")]) == 1
    assert "has shape (2, 10, 10) but image" in capsys.readouterr().err


def _make_many(folder, n, size=(60, 80), broken=()):
    rng = np.random.default_rng(1)
    (folder / "img").mkdir()
    (folder / "u").mkdir()
    for i in range(n):
        image, unary = _scene(rng, *size, classes=3)
        imageio.imwrite(folder / "img" / f"im{i:03d}.png", image)
        if i in broken:
            unary = unary[:, 1:]
        np.save(folder / "u" / f"im{i:03d}.npy", unary)
    images = sorted(str(p) for p in (folder / "img").glob("*.png"))
    unaries = sorted(str(p) for p in (folder / "u").glob("*.npy"))
    return images, unaries


def test_many_images_on_workers_report_failures_at_the_end(tmp_path, capsys):
    images, unaries = _make_many(tmp_path, 7, broken=(3,))
    out = tmp_path / "out"
    args = ["refine", *images, "--unary", *unaries, "--out-dir", str(out), "--blur", "2", "--no-progress",
            "--save-probabilities"]
    assert main(args + ["--workers", "2"]) == 1
    captured = capsys.readouterr()
    assert "refined 6 of 7 image(s)" in captured.out
    assert captured.err.rstrip().endswith("expected (C, 60, 80)")
    assert "1 image(s) failed:" in captured.err and "im003.png: unary" in captured.err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"im{i:03d}{s}" for i in range(7) if i != 3 for s in (".png", ".npy"))
    for i in (0, 6):  # the same as one image at a time, in this process
        single = tmp_path / f"single{i}.png"
        assert main(["refine", images[i], "--unary", unaries[i], "-o", str(single), "--blur", "2"]) == 0
        np.testing.assert_array_equal(imageio.imread(single), imageio.imread(out / f"im{i:03d}.png"))
    capsys.readouterr()
    # --resume runs only the image without outputs (it fails again); nothing is refused.
    assert main(args + ["--resume"]) == 1
    assert "refined 0 of 1 image(s); 6 skipped" in capsys.readouterr().out
    assert _temporaries(tmp_path) == []


def test_unreachable_scheduler_is_one_line(tmp_path, capsys, monkeypatch):
    from cucrf.cli import _many

    monkeypatch.setattr(_many, "CONNECT_TIMEOUT", 1)
    images, unaries = _make_many(tmp_path, 1)
    start = time.monotonic()
    assert main(["refine", *images, "--unary", *unaries, "--out-dir", str(tmp_path / "out"),
                 "--scheduler", "tcp://127.0.0.1:9"]) == 1
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cucrf: error: --scheduler 'tcp://127.0.0.1:9': no dask scheduler "
                                               "answered within 1 s")
    assert not (tmp_path / "out").exists()


def _worker_processes(pid):
    psutil = pytest.importorskip("psutil")
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def test_worker_killed_mid_run_leaves_identical_complete_outputs(tmp_path):
    images, unaries = _make_many(tmp_path, 24, size=(150, 190))
    base = ["refine", *images, "--unary", *unaries, "--blur", "1", "--filter-size", "7", "--no-progress"]
    # The undisturbed run, in this process.
    assert main(base + ["--out-dir", str(tmp_path / "calm"), "--resume"]) == 0
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    job = subprocess.Popen([sys.executable, "-m", "cucrf", *base, "--out-dir", str(out), "--workers", "2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job.poll() is None:
            done = len(list(out.glob("*.png"))) if out.exists() else 0
            if done >= 2:
                break
            time.sleep(0.02)
        workers = _worker_processes(job.pid)
        assert len(workers) == 2 and job.poll() is None
        workers[0].send_signal(signal.SIGKILL)
        killed_at = len(list(out.glob("*.png")))
        stdout, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert killed_at < len(images), "the job ended before the kill"
    assert job.returncode == 0, stderr
    assert "refined 24 of 24 image(s)" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "calm").iterdir())
    for p in (tmp_path / "calm").iterdir():
        np.testing.assert_array_equal(imageio.imread(out / p.name), imageio.imread(p))
