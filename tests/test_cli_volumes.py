"""cucrf refine on volumes: NIfTI scans and unaries in, label volumes with the scan's geometry out."""

import numpy as np
import pytest

from cucrf.cli import main

nib = pytest.importorskip("nibabel")

ZOOMS = (1.2, 1.0, 3.0)


@pytest.fixture
def volume(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.zeros((14, 16, 10), np.int16)
    truth[:, 8:] = 1
    truth[3:9, 2:7, 2:7] = 2
    scan = (truth * 300 + rng.normal(0, 60, truth.shape)).astype(np.int16)
    affine = np.diag(list(ZOOMS) + [1.0])
    image = nib.Nifti1Image(scan, affine)
    image.header.set_zooms(ZOOMS)
    nib.save(image, tmp_path / "t1.nii.gz")
    noisy = np.where(rng.uniform(size=truth.shape) < 0.3, rng.integers(0, 3, truth.shape), truth).astype(np.int16)
    nib.save(nib.Nifti1Image(noisy, affine), tmp_path / "noisy.nii.gz")
    probs = (np.eye(3)[noisy] * 0.5 + 0.5 / 3).astype(np.float32)  # (X, Y, Z, C)
    nib.save(nib.Nifti1Image(probs, affine), tmp_path / "probs.nii.gz")
    np.save(tmp_path / "logits.npy", np.log(np.moveaxis(probs, -1, 0)))
    return tmp_path, truth, noisy, affine


def test_refine_a_label_volume_keeps_the_geometry(volume, capsys):
    d, truth, noisy, affine = volume
    out = d / "labels.nii.gz"
    assert main(["refine", str(d / "t1.nii.gz"), "-u", str(d / "noisy.nii.gz"), "--standardize", "--blur", "1,2,2",
                 "--filter-size", "3", "-o", str(out)]) == 0
    assert "14x16x10 voxels of 1.2,1,3, 3 classes" in capsys.readouterr().out
    result = nib.load(out)
    labels = np.asarray(result.dataobj)
    assert result.get_data_dtype() == np.uint8 and labels.shape == truth.shape
    np.testing.assert_allclose(result.affine, affine)
    assert (labels == truth).mean() > (noisy == truth).mean() + 0.1


def test_refine_probabilities_and_logits_agree(volume):
    d, truth, noisy, affine = volume
    a, b = d / "a.nii.gz", d / "b.npy"
    assert main(["refine", str(d / "t1.nii.gz"), "-u", str(d / "probs.nii.gz"), "--unary-kind", "probabilities",
                 "-o", str(a), "--save-probabilities", str(d / "q.npy")]) == 0
    assert main(["refine", str(d / "t1.nii.gz"), "-u", str(d / "logits.npy"), "-o", str(b)]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj), np.load(b))
    assert np.load(d / "q.npy").shape == (3,) + truth.shape


def test_spacing_option_overrides_the_header(volume):
    d, *_ = volume
    outs = []
    for extra in ([], ["--spacing", "1.2,1,3"], ["--spacing", "1,1,1"]):
        out = d / f"s{len(outs)}.npy"
        assert main(["refine", str(d / "t1.nii.gz"), "-u", str(d / "logits.npy"), "--blur", "1", "--filter-size", "3",
                     "-o", str(out)] + extra) == 0
        outs.append(np.load(out))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("extra,match", [
    (["-o", "x.png"], "must be a .nii.gz, .nii or .npy file"),
    (["-o", "x.nii.gz", "--overlay"], "--overlay: not available for volumes"),
    (["-o", "x.nii.gz", "--spacing", "1,0,1"], "expected positive numbers"),
])
def test_volume_errors(volume, capsys, extra, match):
    d, *_ = volume
    assert main(["refine", str(d / "t1.nii.gz"), "-u", str(d / "noisy.nii.gz")] + extra) != 0
    assert match in capsys.readouterr().err


def test_volume_shape_mismatch_and_mixing(volume, capsys, tmp_path):
    d, *_ = volume
    np.save(d / "small.npy", np.zeros((3, 14, 16, 9), np.float32))
    assert main(["refine", str(d / "t1.nii.gz"), "-u", str(d / "small.npy"), "-o", str(d / "o.nii.gz")]) != 0
    assert "covers a 14x16x9 volume but the image" in capsys.readouterr().err
    assert not (d / "o.nii.gz").exists()
    assert main(["refine", str(d / "t1.nii.gz"), "photo.png", "-u", "a.npy", "b.npy", "--out-dir", str(d)]) != 0
    assert "mix volumes (NIfTI) and pictures" in capsys.readouterr().err
    assert main(["refine", str(d / "t1.nii.gz"), "-u", str(d / "noisy.nii.gz"), "-o", str(d / "t1.nii.gz")]) != 0
    assert "would destroy the input" in capsys.readouterr().err
