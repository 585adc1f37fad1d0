"""Reading the command line's input files and checking its output paths.

Every problem is a :class:`~cucrf.cli._errors.CLIError` (or :class:`~cucrf.cli._errors.UsageError`)
that names the option or file, what it holds and what is expected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ._errors import CLIError, UsageError, error_text, one_line

LABEL_IMAGE_SUFFIXES = (".png", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm", ".pnm")
NPZ_KEYS = ("logits", "unary", "probabilities")  # looked up in this order in .npz files


def existing_file(path: str, what: str) -> Path:
    """``path`` as a Path; a :class:`CLIError` naming ``what`` unless it is an existing file."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} {path!r} does not exist")
    if not p.is_file():
        kind = "a folder" if p.is_dir() else "not a regular file"
        raise CLIError(f"{what} {path!r} is {kind}; expected a file")
    return p


def read_image(path: str) -> np.ndarray:
    """The image in ``path``, shape (H, W, F), as :func:`cucrf.datasets.load_pairs` reads it."""
    from .. import datasets

    p = existing_file(path, "image")
    try:
        return datasets._read_image(p)
    except (OSError, SyntaxError) as exc:  # Pillow raises SyntaxError for some corrupt files
        raise CLIError(f"cannot read image {path!r}: {error_text(exc)}") from exc


def read_label(path: str, what: str = "label") -> np.ndarray:
    """The label map in ``path``, shape (H, W), integer class ids."""
    from .. import datasets

    p = existing_file(path, what)
    try:
        return datasets._read_label(p)
    except (OSError, SyntaxError) as exc:
        raise CLIError(f"cannot read {what} {path!r}: {error_text(exc)}") from exc


def load_params(spec, option: str = "--params "):
    """The CRFParams of a file (or JSON text) given to ``option``; None for None."""
    from .._params import CRFParams

    if spec is None:
        return None
    try:
        return CRFParams.from_json(spec)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"{option}{spec!r}: {error_text(exc)}; expected a JSON object of CRF parameters, as "
                       "'cucrf params' and 'cucrf fit' write") from exc


_TRANSFORM_EXPECTED = ('expected the feature_transform.json that \'cucrf fit\' writes: '
                       '{"matrix": [[...], ...] (F\' x F), "offset": [...] (F\')}')


def load_feature_transform(path: str, option: str = "--feature-transform ") -> dict:
    """Read a feature transform file; return ``{'matrix': (F', F), 'offset': (F',)}`` float64 arrays.

    Every problem is a :class:`CLIError` naming ``option``, the file, what it holds and what is
    expected.
    """
    what = f"{option}{path!r}"
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what}: the file does not exist; {_TRANSFORM_EXPECTED}")
    if not p.is_file():
        raise CLIError(f"{what}: not a file; {_TRANSFORM_EXPECTED}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CLIError(f"{what}: not valid JSON ({error_text(exc)}); {_TRANSFORM_EXPECTED}") from exc
    if not isinstance(data, dict):
        raise CLIError(f"{what}: holds a JSON {type(data).__name__}; {_TRANSFORM_EXPECTED}")
    unknown = sorted(set(data) - {"matrix", "offset"})
    if unknown or "matrix" not in data:
        raise CLIError(f"{what}: has keys {sorted(data)}; {_TRANSFORM_EXPECTED}")
    try:
        matrix = np.array(data["matrix"], dtype=np.float64)
        offset = np.array(data["offset"] if data.get("offset") is not None else np.zeros(len(matrix)),
                          dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"{what}: 'matrix' and 'offset' must hold numbers ({error_text(exc)}); "
                       f"{_TRANSFORM_EXPECTED}") from exc
    if matrix.ndim != 2 or matrix.size == 0:
        raise CLIError(f"{what}: 'matrix' has shape {matrix.shape}; {_TRANSFORM_EXPECTED}")
    if offset.shape != (matrix.shape[0],):
        raise CLIError(f"{what}: 'offset' has shape {offset.shape} but 'matrix' is {matrix.shape[0]}x"
                       f"{matrix.shape[1]}; expected an offset of shape ({matrix.shape[0]},)")
    if not (np.isfinite(matrix).all() and np.isfinite(offset).all()):
        raise CLIError(f"{what}: holds NaN or infinite values; expected finite numbers")
    return {"matrix": matrix, "offset": offset}


def check_transform_channels(transform, channels: int, option: str, where: str) -> None:
    """A :class:`CLIError` unless the transform maps ``channels`` image channels."""
    f_in = transform["matrix"].shape[1]
    if f_in != channels:
        raise CLIError(f"{option}: the matrix is {transform['matrix'].shape[0]}x{f_in}, for images with {f_in} "
                       f"channels, but {where} {channels} channels; expected a matrix with {channels} columns")


def load_unary(path: str, kind):
    """Read a unary file; return ``(array, kind)`` with ``kind`` resolved when it was None (auto)."""
    from .. import datasets

    p = existing_file(path, "unary")
    suffix = p.suffix.lower()
    if suffix in LABEL_IMAGE_SUFFIXES:
        if kind not in (None, "labels"):
            raise CLIError(f"unary {path!r} is an image, which is read as a label map; it cannot be "
                           f"used with --unary-kind {kind}")
        return read_label(path, "unary label map"), "labels"
    if suffix not in (".npy", ".npz"):
        raise CLIError(f"unary {path!r} has suffix {p.suffix!r}; expected .npy, .npz or a label image such as .png")
    name = None

    def pick(files):
        nonlocal name
        if not files:
            raise CLIError(f"unary {path!r} holds no arrays; expected an array of shape (C, H, W) named "
                           f"{', '.join(map(repr, NPZ_KEYS))} or the only one")
        name = next((k for k in NPZ_KEYS if k in files), files[0])
        return name

    try:
        arr = datasets._load_array(p, "unary", pick if suffix == ".npz" else None)
    except ValueError as exc:  # a message that names the file
        raise CLIError(error_text(exc)) from exc
    if kind is None:
        if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
            kind = "labels"
        else:
            kind = "probabilities" if name == "probabilities" else "logits"
    if kind != "labels" and arr.dtype == np.float16:
        arr = arr.astype(np.float32)  # networks often store float16 logits; compute in float32
    return arr, kind


def check_unary_shape(unary, kind, image, upath, ipath) -> None:
    """A :class:`CLIError` unless ``unary`` (a label map or (C, H, W) scores) fits ``image``."""
    h, w = image.shape[:2]
    if kind == "labels":
        if unary.shape != (h, w):
            raise CLIError(f"label map {upath!r} has shape {unary.shape} but image {ipath!r} is "
                           f"{h}x{w}; expected ({h}, {w})")
        return
    if unary.ndim != 3:
        raise CLIError(f"unary {upath!r} has shape {unary.shape}; expected (C, H, W) = (C, {h}, {w})")
    if unary.shape[1:] != (h, w):
        hint = ""
        if unary.shape[:2] == (h, w):
            hint = "; it looks channels-last (H, W, C): transpose it to (C, H, W)"
        raise CLIError(f"unary {upath!r} has shape {unary.shape} but image {ipath!r} is {h}x{w}; "
                       f"expected (C, {h}, {w}){hint}")


def load_split_arg(path, folder):
    """The split file given to ``--split``, checked against ``folder``."""
    from .. import datasets

    try:
        return datasets.load_split(path, folder=folder)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(f"--split: {one_line(exc)}") from exc


def same_file(a: Path, b: Path) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (the same inode where both exist)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output_paths(outputs, inputs) -> None:
    """Refuse output paths that would overwrite an input or cannot be created.

    Parameters
    ----------
    outputs : list of (str, Path)
        The option that named each output path (e.g. ``'-o/--output'``) and the path.
    inputs : list of (str, str)
        What each input file is (e.g. ``'image'``) and its path.

    Raises
    ------
    UsageError
        If an output is one of the inputs, or lies under a path that is a file, not a folder.
    """
    for option, out in outputs:
        for what, path in inputs:
            if same_file(out, Path(path)):
                raise UsageError(f"{option} {str(out)!r} is the {what} {path!r}; writing it would destroy "
                                 "the input, give another output path")
        parent = next((d for d in Path(os.path.abspath(out)).parents if d.exists()), None)
        if parent is not None and not parent.is_dir():
            raise UsageError(f"{option} {str(out)!r}: {str(parent)!r} is a file, not a folder; give an "
                             "output path inside a folder")


def write_rgb(path: Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) or (H, W, 1) uint8 image."""
    import imageio.v3 as iio

    iio.imwrite(path, image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)


def load_class_names(spec, option: str = "--class-names"):
    """Class names from ``option``: a known set (voc, msrc, camvid), a text file with one name a line, or a
    comma-separated list; None for None."""
    from .. import datasets

    if spec is None:
        return None
    if spec.strip().lower() in datasets.CLASS_NAMES:
        return list(datasets.CLASS_NAMES[spec.strip().lower()])
    p = Path(spec)
    if p.is_file():
        try:
            names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise CLIError(f"{option} {spec!r}: cannot read the file ({error_text(exc)}); expected a text file "
                           "with one class name a line") from exc
    else:
        names = [n.strip() for n in spec.split(",")]
    if not names or not all(names):
        raise UsageError(f"{option} {spec!r}: expected {', '.join(datasets.CLASS_NAMES)}, class names separated "
                         "by commas, or a text file with one name a line, none of them empty")
    return names
