"""cucrf.medical: NIfTI volumes in and out, geometry kept, spacing from the header."""

import numpy as np
import pytest

import cucrf
import cucrf.medical as med

nib = pytest.importorskip("nibabel")


def _scan(tmp_path, shape=(6, 7, 5), zooms=(1.5, 0.8, 3.0)):
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 1000, shape).astype(np.int16)
    affine = np.diag(list(zooms) + [1.0])
    affine[:3, 3] = (-10.0, 20.0, 5.0)
    image = nib.Nifti1Image(data, affine)
    image.header.set_zooms(zooms)
    path = tmp_path / "scan.nii.gz"
    nib.save(image, path)
    return path, data, affine


def test_read_image_keeps_geometry_and_spacing(tmp_path):
    path, data, affine = _scan(tmp_path)
    scan = med.read_image(path)
    assert scan.array.shape == (6, 7, 5, 1) and scan.array.dtype == np.float32
    np.testing.assert_array_equal(scan.array[..., 0], data)
    assert scan.spacing == pytest.approx((1.5, 0.8, 3.0))
    np.testing.assert_allclose(scan.affine, affine)


def test_unary_classes_on_the_fourth_axis_and_label_round_trip(tmp_path):
    path, data, affine = _scan(tmp_path)
    scan = med.read_image(path)
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=(6, 7, 5)).astype(np.float32)  # (X, Y, Z, C)
    nib.save(nib.Nifti1Image(probs, affine), tmp_path / "probs.nii.gz")
    unary = med.read_unary(tmp_path / "probs.nii.gz", like=scan)
    assert unary.shape == (3, 6, 7, 5)
    np.testing.assert_array_equal(unary, np.moveaxis(probs, -1, 0))
    q = cucrf.infer(unary, med.standardize(scan.array), unary_kind="probabilities", spatial_dims=3,
                    spacing=scan.spacing, filter_size=3, blur=1)
    labels = q.argmax(axis=0)
    out = med.write_labels(tmp_path / "labels.nii.gz", labels, like=scan)
    back = nib.load(out)
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, affine)
    assert tuple(back.header.get_zooms()[:3]) == pytest.approx((1.5, 0.8, 3.0))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_npy_unary_and_errors(tmp_path):
    path, data, affine = _scan(tmp_path)
    scan = med.read_image(path)
    np.save(tmp_path / "u.npy", np.zeros((2, 6, 7, 5), np.float32))
    assert med.read_unary(tmp_path / "u.npy", like=scan).shape == (2, 6, 7, 5)
    np.save(tmp_path / "bad.npy", np.zeros((2, 6, 7, 4), np.float32))
    with pytest.raises(ValueError, match=r"covers a 6x7x4 volume but the image .* is 6x7x5"):
        med.read_unary(tmp_path / "bad.npy", like=scan)
    with pytest.raises(ValueError, match="expected a NIfTI file"):
        med.read_unary(tmp_path / "u.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        med.read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "text.nii.gz").write_text("not a volume")
    with pytest.raises(ValueError, match="could not be read as NIfTI"):
        med.read_image(tmp_path / "text.nii.gz")
    with pytest.raises(ValueError, match=r"labels have shape \(6, 7, 4\) but the image"):
        med.write_labels(tmp_path / "l.nii.gz", np.zeros((6, 7, 4), int), like=scan)
    with pytest.raises(ValueError, match="written as NIfTI"):
        med.write_labels(tmp_path / "l.png", np.zeros((6, 7, 5), int), like=scan)


def test_standardize():
    rng = np.random.default_rng(2)
    ct = rng.normal(40, 300, (5, 6, 7))  # Hounsfield-like
    mask = np.zeros((5, 6, 7), bool)
    mask[1:4] = True
    out = med.standardize(ct, mask)
    assert out.shape == ct.shape and out.dtype == np.float32
    assert out[mask].mean() == pytest.approx(128.0, abs=1e-3)
    assert out[mask].std() == pytest.approx(64.0, rel=1e-4)
    with pytest.raises(ValueError, match="mask selects no voxel"):
        med.standardize(ct, np.zeros((5, 6, 7), bool))
    with pytest.raises(ValueError, match="mask must be a boolean volume of shape"):
        med.standardize(ct, np.ones((5, 6), bool))
