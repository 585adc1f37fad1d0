"""Reading and writing medical volumes (NIfTI) for :func:`cucrf.infer` with ``spatial_dims=3``.

Needs nibabel (``pip install "cucrf[medical]"``, or ``pip install nibabel``). Volumes keep the
array order of the file: a NIfTI volume of shape (X, Y, Z) is computed as (D, H, W) = (X, Y, Z)
with ``spacing`` = the header's voxel size along those axes, so ``theta_alpha`` and
``theta_gamma`` are in the header's units (usually mm). Label volumes are written with the
reference scan's affine and header, so viewers overlay them on the scan.

Examples
--------
>>> import numpy as np, cucrf, cucrf.medical as med                        # doctest: +SKIP
>>> scan = med.read_image("t1.nii.gz")                                      # doctest: +SKIP
>>> probs = med.read_unary("probabilities.nii.gz", like=scan)               # doctest: +SKIP
>>> q = cucrf.infer(probs, scan.array, unary_kind="probabilities", spatial_dims=3,
...                 spacing=scan.spacing)                                   # doctest: +SKIP
>>> med.write_labels("labels.nii.gz", q.argmax(axis=0), like=scan)         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["Volume", "is_nifti", "read_image", "read_unary", "read_labels", "write_labels", "standardize"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``, any case)."""
    name = os.fspath(path).lower()
    return name.endswith(_NIFTI_SUFFIXES)


def _nibabel():
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading and writing NIfTI volumes needs nibabel: pip install \"cucrf[medical]\" "
                          "(or pip install nibabel)") from exc
    return nibabel


@dataclasses.dataclass
class Volume:
    """A volume read from a file, with what is needed to write results beside it.

    Attributes
    ----------
    array : numpy.ndarray, shape (D, H, W, F)
        The voxel values, channels last (F = 1 for a scalar scan), float32 (or the file's
        integer type for label volumes).
    spacing : tuple of float
        Voxel size along (D, H, W) in the header's units; (1, 1, 1) for NumPy files.
    affine : numpy.ndarray of float64, shape (4, 4), or None
        Voxel-to-world transform of the file (None for NumPy files).
    header : object or None
        The file's NIfTI header (None for NumPy files).
    path : str
    """

    array: np.ndarray
    spacing: tuple
    affine: object = None
    header: object = None
    path: str = ""

    @property
    def shape(self) -> tuple:
        """(D, H, W) of the volume."""
        return tuple(self.array.shape[:3])


def _load(path, what):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r}: no such file")
    nib = _nibabel()
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise ValueError(f"{what} {path!r} could not be read as NIfTI: {exc}") from exc
    return image, data


def _spacing(image, path, what):
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    if len(zooms) < 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        raise ValueError(f"{what} {path!r} has voxel sizes {zooms} in its header; expected three positive numbers")
    return zooms


def read_image(path) -> Volume:
    """Read a scan: a NIfTI volume (X, Y, Z) or (X, Y, Z, F), or a NumPy ``.npy`` (D, H, W[, F]).

    Returns
    -------
    Volume
        ``array`` float32 of shape (D, H, W, F), ``spacing`` from the NIfTI header.
    """
    path = os.fspath(path)
    if is_nifti(path):
        image, data = _load(path, "image")
        spacing, affine, header = _spacing(image, path, "image"), image.affine, image.header
    elif path.lower().endswith(".npy"):
        data = _load_npy(path, "image")
        spacing, affine, header = (1.0, 1.0, 1.0), None, None
    else:
        raise ValueError(f"image {path!r}: a volume must be a NIfTI file (.nii, .nii.gz) or a .npy array")
    if data.ndim == 5 and data.shape[3] == 1:  # (X, Y, Z, 1, F): NIfTI's vector intent
        data = data[:, :, :, 0]
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise ValueError(f"image {path!r} has shape {data.shape}; expected a volume (D, H, W) or (D, H, W, F)")
    if data.dtype.kind not in "iuf":
        raise TypeError(f"image {path!r} holds {data.dtype} values; expected numbers")
    return Volume(np.asarray(data, dtype=np.float32), spacing, affine, header, path)


def _load_npy(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{what} {path!r} could not be read as a .npy array: {exc}") from exc


def read_unary(path, like: Volume = None) -> np.ndarray:
    """Read per-class scores of a volume: probabilities or logits, classes first for cucrf.

    NIfTI files hold classes on the 4th axis, (X, Y, Z, C) (NIfTI's convention for a series of
    maps); NumPy files (``.npy``, or ``.npz`` with one array) hold (C, D, H, W) as cucrf does.

    Parameters
    ----------
    path : str or Path
    like : Volume, optional
        The scan the scores belong to; its (D, H, W) must match.

    Returns
    -------
    numpy.ndarray, shape (C, D, H, W), float32 or float64
    """
    path = os.fspath(path)
    lower = path.lower()
    if is_nifti(path):
        _, data = _load(path, "unary")
        if data.ndim == 5 and data.shape[3] == 1:
            data = data[:, :, :, 0]
        if data.ndim != 4:
            raise ValueError(f"unary {path!r} has shape {data.shape}; a NIfTI unary holds one map per class, "
                             "(X, Y, Z, C)")
        data = np.moveaxis(data, -1, 0)
    elif lower.endswith(".npy"):
        data = _load_npy(path, "unary")
    elif lower.endswith(".npz"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"unary {path!r}: no such file")
        try:
            with np.load(path, allow_pickle=False) as z:
                if len(z.files) != 1:
                    raise ValueError(f"holds arrays {z.files}; expected exactly one (C, D, H, W) array")
                data = z[z.files[0]]
        except Exception as exc:
            raise ValueError(f"unary {path!r} could not be read: {exc}") from exc
    else:
        raise ValueError(f"unary {path!r}: expected a NIfTI file (.nii, .nii.gz, classes on the 4th axis) or a "
                         ".npy/.npz array (C, D, H, W)")
    if data.ndim != 4 or data.dtype.kind != "f":
        raise ValueError(f"unary {path!r} has shape {data.shape} and dtype {data.dtype}; expected float class "
                         "scores of shape (C, D, H, W)")
    if like is not None and tuple(data.shape[1:]) != like.shape:
        raise ValueError(f"unary {path!r} covers a {'x'.join(map(str, data.shape[1:]))} volume but the image "
                         f"{like.path!r} is {'x'.join(map(str, like.shape))}")
    return np.asarray(data, dtype=np.float64 if data.dtype == np.float64 else np.float32)


def read_labels(path, like: Volume = None) -> np.ndarray:
    """Read a label volume of class ids (D, H, W): a NIfTI file or a ``.npy`` array of integers.

    Returns
    -------
    numpy.ndarray of int64, shape (D, H, W)
    """
    path = os.fspath(path)
    if is_nifti(path):
        _, data = _load(path, "label volume")
    elif path.lower().endswith(".npy"):
        data = _load_npy(path, "label volume")
    else:
        raise ValueError(f"label volume {path!r}: expected a NIfTI file (.nii, .nii.gz) or a .npy array")
    if data.dtype.kind == "f" and data.size and np.array_equal(data, np.round(data)):
        data = data.astype(np.int64)  # NIfTI label maps are often stored as whole floats
    if data.ndim != 3 or data.dtype.kind not in "iu":
        raise ValueError(f"label volume {path!r} has shape {data.shape} and dtype {data.dtype}; expected integer "
                         "class ids of shape (D, H, W)")
    if like is not None and tuple(data.shape) != like.shape:
        raise ValueError(f"label volume {path!r} is {'x'.join(map(str, data.shape))} but the image {like.path!r} is "
                         f"{'x'.join(map(str, like.shape))}")
    return np.asarray(data, dtype=np.int64)


def is_label_volume(path) -> bool:
    """Whether a unary file holds a label volume (integer class ids, 3 axes) rather than class scores."""
    path = os.fspath(path)
    if is_nifti(path):
        nib = _nibabel()
        try:
            image = nib.load(path)
        except Exception:
            return False  # read_unary names the problem
        return len(image.shape) == 3
    if path.lower().endswith(".npy") and os.path.isfile(path):
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception:
            return False
        return data.ndim == 3 and data.dtype.kind in "iu"
    return False


def write_labels(path, labels, like: Volume = None) -> Path:
    """Write a label volume (D, H, W) of class ids, atomically.

    A NIfTI path gets the reference scan's affine and header (so it overlays the scan in any
    viewer); a ``.npy`` path a plain array. The type is uint8, or uint16 beyond 255 classes.

    Parameters
    ----------
    path : str or Path
    labels : array of int, shape (D, H, W)
    like : Volume, optional
        The scan whose geometry to keep (required for NIfTI output unless a plain identity
        geometry is wanted).

    Returns
    -------
    pathlib.Path
        The path written.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer volume (D, H, W), got shape {labels.shape} and dtype "
                         f"{labels.dtype}")
    if like is not None and tuple(labels.shape) != like.shape:
        raise ValueError(f"labels have shape {labels.shape} but the image {like.path!r} is {like.shape}")
    top = int(labels.max()) if labels.size else 0
    if labels.size and int(labels.min()) < 0 or top > 65535:
        raise ValueError(f"labels must be class ids in [0, 65535], got values in [{int(labels.min())}, {top}]")
    labels = labels.astype(np.uint8 if top <= 255 else np.uint16)
    path = Path(path)
    if is_nifti(path):
        nib = _nibabel()
        if like is not None and like.affine is not None:
            header = like.header.copy()
            header.set_data_dtype(labels.dtype)
            header.set_data_shape(labels.shape)
            # Class ids are not intensities: no scaling on read.
            header.set_slope_inter(1.0, 0.0)
            out = nib.Nifti1Image(labels, like.affine, header=header)
        else:
            out = nib.Nifti1Image(labels, np.eye(4))
        suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
        _atomic(path, suffix, lambda tmp: nib.save(out, tmp))
    elif path.suffix.lower() == ".npy":
        _atomic(path, ".npy", lambda tmp: np.save(tmp, labels))
    else:
        raise ValueError(f"output {os.fspath(path)!r}: a label volume is written as NIfTI (.nii, .nii.gz) or .npy")
    return path


def _atomic(path: Path, suffix: str, write) -> None:
    """Write through a temporary file in the same folder, then rename: no partial file is left."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def standardize(image, mask=None, *, scale=64.0, centre=128.0):
    """Map scan intensities to the range cucrf's default colour bandwidth expects.

    Each channel is shifted and scaled so that the voxels in ``mask`` (all voxels when None)
    have mean ``centre`` and standard deviation ``scale``: intensities of MRI (arbitrary units)
    or CT (Hounsfield units) then sit on a 0..255-like scale where ``theta_beta`` keeps the
    meaning it has for photographs.

    Parameters
    ----------
    image : array, shape (D, H, W, F) or (D, H, W)
    mask : array of bool, shape (D, H, W), optional
        The voxels that define the statistics (e.g. the body, not the air around it).
    scale, centre : float

    Returns
    -------
    numpy.ndarray of float32, shape of ``image``
    """
    x = np.asarray(image, dtype=np.float64)
    squeeze = x.ndim == 3
    if squeeze:
        x = x[..., None]
    if x.ndim != 4 or x.size == 0:
        raise ValueError(f"image must be a volume (D, H, W) or (D, H, W, F), got shape {np.shape(image)}")
    if not np.isfinite(x).all():
        raise ValueError("image contains NaN or infinite values")
    if mask is None:
        sel = x.reshape(-1, x.shape[-1])
    else:
        m = np.asarray(mask)
        if m.dtype != bool or m.shape != x.shape[:3]:
            raise ValueError(f"mask must be a boolean volume of shape {x.shape[:3]}, got shape {m.shape} and dtype "
                             f"{m.dtype}")
        if not m.any():
            raise ValueError("mask selects no voxel")
        sel = x[m]
    mean, std = sel.mean(axis=0), sel.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    out = ((x - mean) / std * float(scale) + float(centre)).astype(np.float32)
    return out[..., 0] if squeeze else out
