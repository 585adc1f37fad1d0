"""A ConvCRF-compatible mode: upstream ConvCRF's algorithm, layouts and config, on NumPy (or CuPy).

`ConvCRF <https://github.com/MarvinTeichmann/ConvCRF>`_ (Teichmann & Cipolla, 2018) is the
PyTorch reference implementation of convolutional CRFs. Its inference differs from cucrf's own
model (:func:`cucrf.infer`) in several ways, all reproduced here so that a model tuned for it
gives the same numbers:

* the unary goes through ``log_softmax`` (``lg``) and the *first* message is computed on ``lg``
  itself, not on probabilities;
* the window keeps its centre (a pixel sends a message to itself, with kernel value 1);
* the update is ``pred = (unary_weight - w) * lg + w * message`` with a mixing weight ``w``
  (``weight_init``, default 0.2), the message added with a positive sign (an attractive, not a
  Potts, compatibility), followed by a softmax except after the last iteration; the result is an
  unnormalised log-space score (take its argmax) unless ``final_softmax``;
* the smoothness kernel sees ``positions / pos_feats.sdims``, the appearance kernel only
  ``image / col_feats.schan`` (positions ``/ col_feats.sdims`` are added only with
  ``use_bias``); each kernel is multiplied by its ``compat`` and, with ``merge``, summed;
* ``norm='sym'``: ``n = 1 / sqrt(K(1) + 1e-20)`` per kernel (before ``compat``), at full
  resolution, message ``n * K(n * pred)``.

The blur geometry (pooling with padding, bilinear upsampling, crop) is the one of
:mod:`cucrf._geometry`, which is upstream's.

Arrays use upstream's layouts: ``unary`` (B, C, H, W) and ``image`` (B, F, H, W) with values as
given (0..255 for the default ``schan``). NumPy and CuPy arrays are accepted, and any array that
exposes ``__dlpack__`` (a PyTorch tensor, say) is read through DLPack; the result is a NumPy array
(or a CuPy one for GPU inputs).

Precision: everything is computed in float64, and a float32 result is that float64 result rounded
once. Upstream's float32 arithmetic loses digits in two places: adding the k*k window products
of every message one after the other, and rounding every intermediate (features before they are
differenced, messages, the softmax between iterations) to float32, errors that the following
iterations amplify where the scores are large. A float32 result here is therefore within half a
unit in the last place of the float64 evaluation of upstream's algorithm, closer to it than
upstream's own float32 output (see docs/convcrf-migration.md for measurements).

Differences from upstream, by choice:

* ``blur`` 3, 5, 7, ... (odd, > 1) raise ``NotImplementedError`` upstream; here they use the
  same geometry formula and work. Pass ``strict=True`` to get upstream's error.
* ``trainable=True`` is refused: a trained upstream model keeps its learned values in its
  ``state_dict``, which a config does not carry. Use ``trainable=False`` (the values in the
  config) or learn cucrf's own parameters with :func:`cucrf.fit`.
* ``convcomp=True`` is supported with upstream's initial 1x1 convolution (every entry
  ``0.1 * sqrt(2 / C)``), the only value a config determines.
* Unknown config keys are errors (upstream ignores them), so that a misspelt key is not
  silently dropped; missing keys take upstream's defaults (:data:`DEFAULT_CONFIG`).
* The image size is taken from the arrays (upstream fixes it when the module is built).
* With ``logsoftmax=False``, a unary entry that is NaN, infinite or negative, a pixel whose
  probabilities are all 0 and a result that would contain NaN are errors (upstream returns NaN).
"""

from __future__ import annotations

import copy
import math
import numbers

import numpy as np

from ._geometry import axis_geometry, window_offsets

__all__ = ["DEFAULT_CONFIG", "resolve_config", "infer", "features", "kernels", "cucrf_settings"]

#: Upstream's ``convcrf.default_conf`` (as of commit 0930637).
DEFAULT_CONFIG = {
    "filter_size": 11,
    "blur": 4,
    "merge": True,
    "norm": "none",
    "weight": "vector",
    "unary_weight": 1,
    "weight_init": 0.2,
    "trainable": False,
    "convcomp": False,
    "logsoftmax": True,
    "softmax": True,
    "final_softmax": False,
    "pos_feats": {"sdims": 3, "compat": 3},
    "col_feats": {"sdims": 80, "schan": 13, "compat": 10, "use_bias": False},
    "trainable_bias": False,
    "pyinn": False,
}

_BOOL_KEYS = ("merge", "trainable", "convcomp", "logsoftmax", "softmax", "final_softmax",
              "trainable_bias", "pyinn")
_SUB_KEYS = {"pos_feats": ("sdims", "compat"), "col_feats": ("sdims", "schan", "compat", "use_bias")}


# -------------------------------------------------------------------------------------------------
# configuration
# -------------------------------------------------------------------------------------------------
def _real(name, value, positive=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"config[{name!r}] must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"config[{name!r}] must be finite{' and > 0' if positive else ''}, got {value!r}")
    return value


def _int(name, value, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"config[{name!r}] must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"config[{name!r}] must be >= {minimum}, got {value!r}")
    return int(value)


def _bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"config[{name!r}] must be True or False, got {value!r}")
    return bool(value)


def resolve_config(config=None, *, strict=False):
    """Fill in upstream's defaults and validate an upstream ConvCRF config dict.

    Parameters
    ----------
    config : dict or None
        Keys of upstream's ``default_conf`` (see :data:`DEFAULT_CONFIG`); missing keys, including
        missing keys of ``pos_feats`` / ``col_feats``, take upstream's defaults.
    strict : bool
        Refuse what upstream refuses although this mode could run it (odd ``blur`` > 1).

    Returns
    -------
    dict
        A new, complete config.

    Raises
    ------
    ValueError, TypeError
        Unknown keys, values of the wrong type or range, ``trainable=True``.
    NotImplementedError
        Combinations upstream does not implement either: ``merge`` with ``norm='sym'``, a ``norm``
        other than ``'sym'`` / ``'none'``; odd ``blur`` > 1 with ``strict=True``.
    """
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict like upstream's default_conf, got {type(config).__name__}")
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"unknown ConvCRF config key(s) {unknown}; expected some of {sorted(DEFAULT_CONFIG)}")
    out = copy.deepcopy(DEFAULT_CONFIG)
    for key, value in config.items():
        if key in _SUB_KEYS:
            if not isinstance(value, dict):
                raise TypeError(f"config[{key!r}] must be a dict with keys {list(_SUB_KEYS[key])}, got {value!r}")
            bad = sorted(set(value) - set(_SUB_KEYS[key]))
            if bad:
                raise ValueError(f"unknown key(s) {bad} in config[{key!r}]; expected some of {list(_SUB_KEYS[key])}")
            out[key].update(value)
        else:
            out[key] = value

    out["filter_size"] = _int("filter_size", out["filter_size"], 1)
    if out["filter_size"] % 2 == 0:
        raise ValueError(f"config['filter_size'] must be odd (upstream asserts it), got {out['filter_size']}")
    out["blur"] = _int("blur", out["blur"], 1)
    if strict and out["blur"] > 1 and out["blur"] % 2:
        raise NotImplementedError(f"upstream ConvCRF does not implement blur={out['blur']} (odd blur > 1); "
                                  "call with strict=False to use the same geometry anyway")
    for key in _BOOL_KEYS:
        out[key] = _bool(key, out[key])
    if out["norm"] not in ("sym", "none"):
        raise NotImplementedError(f"config['norm'] must be 'sym' or 'none' (upstream implements no other), "
                                  f"got {out['norm']!r}")
    if out["merge"] and out["norm"] != "none":
        raise NotImplementedError("config: merge=True with norm='sym' is not implemented upstream (each kernel "
                                  "needs its own normaliser); set merge=False")
    if out["weight"] not in ("scalar", "vector", None):
        raise ValueError(f"config['weight'] must be 'scalar', 'vector' or None, got {out['weight']!r}")
    out["unary_weight"] = _real("unary_weight", out["unary_weight"])
    out["weight_init"] = _real("weight_init", out["weight_init"])
    if out["trainable"]:
        raise ValueError("config['trainable']=True is not supported: a trained ConvCRF keeps its learned values "
                         "in its state_dict, not in the config; set trainable=False to run with the config's "
                         "values, or learn cucrf's own parameters with cucrf.fit")
    out["pos_feats"]["sdims"] = _real("pos_feats.sdims", out["pos_feats"]["sdims"], positive=True)
    out["pos_feats"]["compat"] = _real("pos_feats.compat", out["pos_feats"]["compat"])
    col = out["col_feats"]
    col["use_bias"] = _bool("col_feats.use_bias", col["use_bias"])
    col["sdims"] = _real("col_feats.sdims", col["sdims"], positive=True)
    col["schan"] = _real("col_feats.schan", col["schan"], positive=True)
    col["compat"] = _real("col_feats.compat", col["compat"])
    return out


# -------------------------------------------------------------------------------------------------
# array helpers: cucrf's NumPy primitives, or generic versions for CuPy
# -------------------------------------------------------------------------------------------------
def _library(name, value, caller):
    """``(array, 'numpy' | 'cupy')`` for the array argument ``name`` of the function ``caller``.

    What DLPack cannot hand over as data (a tensor that records gradients, a traced JAX value) and
    masked arrays are refused here, naming ``caller``: the generic messages of
    :func:`cucrf.interop.to_backend_array` point to :func:`cucrf.infer`'s own options.
    """
    from .interop import _is_tracer, to_backend_array

    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{caller}: {name} must not be a masked array (numpy.ma.MaskedArray), got one with "
                        f"{int(np.ma.count_masked(value))} masked entries: the mask would be ignored; pass "
                        f"{name}.filled(value) with a value the mask stands for")
    module = type(value).__module__.split(".")[0]
    if module == "torch" and getattr(value, "requires_grad", False):
        raise TypeError(f"{caller}: {name} is a torch.Tensor that requires grad, but {caller} does not record "
                        f"autograd history; pass {name}.detach() (no copy). A CRF layer with gradients is "
                        "cucrf.torch.ConvCRF (cucrf's own model)")
    if _is_tracer(value):
        raise TypeError(f"{caller}: {name} is a traced JAX value (inside jax.jit, jax.grad or jax.vmap), which has "
                        f"no data to read; call {caller} outside the traced function (cucrf.jax.infer runs "
                        "cucrf's own model as a JAX operation)")
    return to_backend_array(name, value, None)


class _Ops:
    """pool / upsample / message on the last two axes, for one array library."""

    def __init__(self, xp, generic=False):
        self.xp = xp
        self.generic = generic or xp is not np

    def pool(self, x, blur):
        if blur == 1:
            return x
        if not self.generic:
            from . import _numpy_backend

            return _numpy_backend.pool(x, blur)
        xp = self.xp
        gy, gx = axis_geometry(x.shape[-2], blur), axis_geometry(x.shape[-1], blur)
        py = xp.asarray(gy.pool_matrix(), dtype=x.dtype)
        px = xp.asarray(gx.pool_matrix(), dtype=x.dtype)
        return xp.matmul(xp.matmul(py, x), px.T)

    def upsample(self, x, blur, size):
        if blur == 1:
            return x
        if not self.generic:
            from . import _numpy_backend

            return _numpy_backend.upsample(x, blur, size)
        xp = self.xp
        gy, gx = axis_geometry(size[0], blur), axis_geometry(size[1], blur)
        uy = xp.asarray(gy.upsample_matrix(), dtype=x.dtype)
        ux = xp.asarray(gx.upsample_matrix(), dtype=x.dtype)
        return xp.matmul(xp.matmul(uy, x), ux.T)

    def message(self, kernel, q, filter_size):
        """``out[b, c, i] = sum_o kernel[b, o, i] * q[b, c, i + offset_o]``, centre included."""
        if not self.generic:
            from . import _numpy_backend

            return _numpy_backend.message(kernel, q, filter_size, keep_centre=True)
        xp = self.xp
        B, C, h, w = q.shape
        r = filter_size // 2
        padded = xp.zeros((B, C, h + 2 * r, w + 2 * r), dtype=q.dtype)
        padded[:, :, r:r + h, r:r + w] = q
        out = xp.zeros_like(q)
        for o, (dy, dx) in enumerate(window_offsets(filter_size, True)):
            out += kernel[:, o, None] * padded[:, :, r + dy:r + dy + h, r + dx:r + dx + w]
        return out


def _valid(n, d):
    return slice(max(0, -d), min(n, n - d)), slice(max(0, d), min(n, n + d))


def _gaussian(xp, feats, filter_size):
    """(B, K, h, w) kernel ``exp(-|f(neighbour) - f(centre)|^2 / 2)``, 0 outside the grid, centre kept."""
    B, F, h, w = feats.shape
    offsets = window_offsets(filter_size, True)
    out = xp.zeros((B, len(offsets), h, w), dtype=feats.dtype)
    for o, (dy, dx) in enumerate(offsets):
        ys, yn = _valid(h, dy)
        xs, xn = _valid(w, dx)
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue
        diff = feats[:, :, yn, xn] - feats[:, :, ys, xs]
        out[:, o, ys, xs] = xp.exp(-0.5 * (diff * diff).sum(axis=1))
    return out


def _positions(xp, batch, height, width, scale, dtype):
    ys = xp.arange(height, dtype=dtype)[:, None] * xp.ones((1, width), dtype=dtype)
    xs = xp.ones((height, 1), dtype=dtype) * xp.arange(width, dtype=dtype)[None, :]
    mesh = xp.stack([ys, xs]) * dtype.type(scale)  # upstream: mesh * (1 / sdims)
    return xp.broadcast_to(mesh[None], (batch, 2, height, width))


def _features(xp, img, cfg):
    """Full-resolution (pos_feats, col_feats) as upstream builds them, (B, F, H, W)."""
    B, _, H, W = img.shape
    dt = img.dtype
    pos = _positions(xp, B, H, W, 1.0 / cfg["pos_feats"]["sdims"], dt)
    col = img * dt.type(1.0 / cfg["col_feats"]["schan"])
    if cfg["col_feats"]["use_bias"]:
        col = xp.concatenate([_positions(xp, B, H, W, 1.0 / cfg["col_feats"]["sdims"], dt), col], axis=1)
    return pos, col


class _Pairwise:
    """The kernels and normalisers of one image batch, and the message they define."""

    def __init__(self, ops, img, cfg):
        xp = ops.xp
        self.ops, self.cfg = ops, cfg
        k, blur = cfg["filter_size"], cfg["blur"]
        self.size = tuple(img.shape[2:])
        self.features = _features(xp, img, cfg)
        raw = [_gaussian(xp, ops.pool(xp.ascontiguousarray(f), blur), k) for f in self.features]
        self.norms = [None, None]
        if cfg["norm"] == "sym":
            ones = xp.ones((img.shape[0], 1) + self.size, dtype=img.dtype)
            self.norms = [1.0 / xp.sqrt(self._apply(g, ones) + img.dtype.type(1e-20)) for g in raw]
        compats = (cfg["pos_feats"]["compat"], cfg["col_feats"]["compat"])
        self.kernels = [g * img.dtype.type(c) for g, c in zip(raw, compats)]
        self.merged = self.kernels[0] + self.kernels[1] if cfg["merge"] else None

    def _apply(self, kernel, x, norm=None):
        ops, blur = self.ops, self.cfg["blur"]
        if norm is not None:
            x = x * norm
        m = ops.upsample(ops.message(kernel, ops.pool(x, blur), self.cfg["filter_size"]), blur, self.size)
        if norm is not None:
            m = norm * m
        return m

    def message(self, x):
        if self.merged is not None:
            return self._apply(self.merged, x)
        return self._apply(self.kernels[0], x, self.norms[0]) + self._apply(self.kernels[1], x, self.norms[1])


def _softmax(xp, x):
    e = xp.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _log_softmax(xp, x):
    s = x - x.max(axis=1, keepdims=True)
    return s - xp.log(xp.exp(s).sum(axis=1, keepdims=True))


#: The precision of every computation; results are rounded to the requested dtype once, at the end.
_WORK = np.dtype(np.float64)


def _result_dtype(dtype, given, caller):
    """The dtype of the result: ``dtype``, or float64 for a float64 input and float32 otherwise."""
    if dtype is None:
        return np.dtype(np.float64) if np.dtype(given) == np.float64 else np.dtype(np.float32)
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{caller}: dtype must be numpy.float32, numpy.float64 or None, got {dtype!r}") from exc
    if dt not in (np.float32, np.float64):
        raise TypeError(f"{caller}: dtype must be numpy.float32, numpy.float64 or None, got {dtype!r}")
    return dt


def _prepare_image(image, caller, batch=None, size=None):
    """``(xp, library, image as float64 (B, F, H, W), the image's own dtype)``."""
    img, lib = _library("image", image, caller)
    xp = np if lib == "numpy" else __import__("cupy")
    if img.ndim != 4:
        raise ValueError(f"image must be 4-D (B, F, H, W) like upstream's input, got shape {tuple(img.shape)}; "
                         "for an (H, W, 3) image pass image.transpose(2, 0, 1)[None]")
    if not (np.issubdtype(img.dtype, np.floating) or np.issubdtype(img.dtype, np.integer)):
        raise TypeError(f"image must hold real numbers, got dtype {img.dtype}")
    if batch is not None and (img.shape[0] != batch or tuple(img.shape[2:]) != size):
        raise ValueError(f"image has shape {tuple(img.shape)} but the unary is (B, C, H, W) = "
                         f"({batch}, C, {size[0]}, {size[1]}); expected ({batch}, F, {size[0]}, {size[1]})")
    given = img.dtype
    img = img.astype(_WORK)
    if not bool(xp.isfinite(img).all()):
        raise ValueError("image contains NaN or infinity")
    return xp, lib, img, given


def features(image, config=None, *, dtype=None):
    """Upstream's full-resolution feature maps.

    Parameters
    ----------
    image : array, shape (B, F, H, W)
        As for :func:`infer`.
    config : dict, optional
        Upstream's config dict (see :func:`resolve_config`).
    dtype : {None, numpy.float32, numpy.float64}
        The result's dtype; None = float64 for a float64 image, else float32. Computed in float64.

    Returns
    -------
    pos_feats : array, shape (B, 2, H, W)
        Pixel (row, column) / ``pos_feats.sdims``.
    col_feats : array, shape (B, F, H, W), or (B, 2 + F, H, W) with ``use_bias``
        The image / ``col_feats.schan``, preceded by (row, column) / ``col_feats.sdims`` with
        ``use_bias``.
    """
    cfg = resolve_config(config)
    xp, _, img, given = _prepare_image(image, "cucrf.convcrf.features")
    dt = _result_dtype(dtype, given, "cucrf.convcrf.features")
    pos, col = _features(xp, img, cfg)
    return xp.ascontiguousarray(pos.astype(dt)), xp.ascontiguousarray(col.astype(dt))


def kernels(image, config=None, *, dtype=None):
    """Upstream's materialised kernels for an image, in upstream's layout.

    Parameters
    ----------
    image : array, shape (B, F, H, W)
        As for :func:`infer`.
    config : dict, optional
        Upstream's config dict (see :func:`resolve_config`).
    dtype : {None, numpy.float32, numpy.float64}
        The result's dtype; None = float64 for a float64 image, else float32. Computed in float64.

    Returns
    -------
    dict
        ``kernel_pos``, ``kernel_col`` (each multiplied by its ``compat``) and, with ``merge``,
        ``kernel_merged``: arrays (B, 1, k, k, h', w') on the pooled grid, 0 outside it, centre
        kept; with ``norm='sym'``, ``norm_pos`` and ``norm_col``: (B, 1, H, W).
    """
    cfg = resolve_config(config)
    xp, _, img, given = _prepare_image(image, "cucrf.convcrf.kernels")
    dt = _result_dtype(dtype, given, "cucrf.convcrf.kernels")
    pair = _Pairwise(_Ops(xp), img, cfg)
    k = cfg["filter_size"]

    def layout(kern):
        B, _, h, w = kern.shape
        return kern.reshape(B, 1, k, k, h, w).astype(dt)

    out = {"kernel_pos": layout(pair.kernels[0]), "kernel_col": layout(pair.kernels[1])}
    if pair.merged is not None:
        out["kernel_merged"] = layout(pair.merged)
    if cfg["norm"] == "sym":
        out["norm_pos"], out["norm_col"] = (n.astype(dt) for n in pair.norms)
    return out


def _first_index(xp, mask):
    return tuple(int(i) for i in xp.argwhere(mask)[0])


def _check_probabilities(xp, u):
    """``logsoftmax=False``: every entry finite and >= 0, every pixel with a positive entry."""
    bad = ~xp.isfinite(u) | (u < 0)
    if bool(bad.any()):
        at = _first_index(xp, bad)
        raise ValueError(
            "config['logsoftmax']=False takes probabilities (upstream applies log): the unary must be finite and "
            f">= 0, got {int(bad.sum())} entries that are NaN, infinite or negative (the first, at (b, c, y, x) = "
            f"{at}, is {float(u[at])}); pass logits with logsoftmax=True (the default) instead")
    empty = ~(u > 0).any(axis=1)
    if bool(empty.any()):
        at = _first_index(xp, empty)
        raise ValueError(
            f"config['logsoftmax']=False takes probabilities, but {int(empty.sum())} pixel(s) of the unary are 0 "
            f"for every class (the first at (b, y, x) = {at}): log(0) = -inf for every class leaves no "
            "distribution to normalise (upstream returns NaN there); give every pixel a positive probability, "
            "e.g. unary + 1e-5, or a uniform 1 / C where nothing is known")


def infer(unary, image, config=None, num_iter=5, *, dtype=None, strict=False, _generic=False):
    """Run upstream ConvCRF's inference (``GaussCRF(config, shape, C).forward(unary, image, num_iter)``).

    Parameters
    ----------
    unary : array, shape (B, C, H, W), floating point
        What upstream's ``forward`` takes: logits (``log_softmax`` is applied), or probabilities
        when ``config['logsoftmax']`` is False (``log`` is applied; every entry finite and >= 0,
        every pixel with a positive entry).
    image : array, shape (B, F, H, W)
        The image, channels first, values as upstream expects them (0..255 for ``schan=13``).
    config : dict, optional
        Upstream's config dict; missing keys take upstream's ``default_conf`` values (filter 11,
        blur 4, merged kernels, no normalisation, weight 0.2, ...).
    num_iter : int
        Mean-field iterations (upstream's default 5).
    dtype : {None, numpy.float32, numpy.float64}
        The result's dtype; None = float64 for a float64 unary, else float32 (upstream's). The
        computation is float64 either way, and a float32 result is the float64 one rounded once.
    strict : bool
        Raise ``NotImplementedError`` for what upstream does not implement (odd ``blur`` > 1).

    Returns
    -------
    array, shape (B, C, H, W), dtype ``dtype``
        Upstream's return value: an unnormalised log-space score (compare with argmax), or
        probabilities with ``final_softmax`` (or ``num_iter=0`` without ``logsoftmax``). With
        ``logsoftmax=False``, classes of probability 0 score -inf (log 0), as upstream's do.

    Raises
    ------
    ValueError
        Bad shapes, NaN or infinite inputs, probabilities that are not probabilities, a result
        that would contain NaN (zero probabilities with a config that multiplies log 0 by 0).

    Examples
    --------
    >>> import numpy as np
    >>> from cucrf import convcrf
    >>> rng = np.random.default_rng(0)
    >>> unary = rng.normal(size=(1, 3, 24, 32)).astype(np.float32)
    >>> image = rng.uniform(0, 255, size=(1, 3, 24, 32)).astype(np.float32)
    >>> out = convcrf.infer(unary, image, {"filter_size": 7, "blur": 4})
    >>> out.shape, out.dtype
    ((1, 3, 24, 32), dtype('float32'))
    >>> convcrf.infer(unary.astype(np.float64), image, {"filter_size": 7, "blur": 4}).dtype
    dtype('float64')
    """
    caller = "cucrf.convcrf.infer"
    cfg = resolve_config(config, strict=strict)
    if isinstance(num_iter, (bool, np.bool_)) or not isinstance(num_iter, numbers.Integral) or num_iter < 0:
        raise ValueError(f"num_iter must be an int >= 0, got {num_iter!r}")
    u, lib = _library("unary", unary, caller)
    xp = np if lib == "numpy" else __import__("cupy")
    if u.ndim != 4:
        raise ValueError(f"unary must be 4-D (B, C, H, W) like upstream's input, got shape {tuple(u.shape)}; "
                         "for a (C, H, W) array pass unary[None]")
    if not np.issubdtype(u.dtype, np.floating):
        raise TypeError(f"unary must be floating point, got dtype {u.dtype}")
    dt = _result_dtype(dtype, u.dtype, caller)
    B, C, H, W = u.shape
    if C < 1 or H < 1 or W < 1 or B < 1:
        raise ValueError(f"unary must be non-empty, got shape {tuple(u.shape)}")
    _, img_lib, img, _ = _prepare_image(image, caller, B, (H, W))
    if img_lib != lib:
        raise TypeError(f"unary is a {lib} array but image is a {img_lib} array; pass both on the same device")
    u = u.astype(_WORK)
    if not cfg["logsoftmax"]:
        _check_probabilities(xp, u)
    elif not bool(xp.isfinite(u).all()):
        raise ValueError("unary contains NaN or infinity")

    ops = _Ops(xp, generic=_generic)
    pair = _Pairwise(ops, img, cfg)
    if cfg["logsoftmax"]:
        lg = _log_softmax(xp, u)
        pred = lg
    else:
        with np.errstate(divide="ignore"):
            lg = xp.log(u)
        pred = _softmax(xp, lg)
    wt = _WORK.type
    if cfg["weight"] is None:
        w = None
    else:
        # Upstream holds its weights as float32 tensors; the float64 evaluation uses the config's values.
        w = wt(cfg["weight_init"])
        keep = wt(cfg["unary_weight"]) - w
    comp = wt(0.1 * math.sqrt(2.0 / C)) if cfg["convcomp"] else None
    with np.errstate(invalid="ignore"):  # 0 * log(0): reported below
        for i in range(int(num_iter)):
            m = pair.message(pred)
            if comp is not None:
                m = m + comp * m.sum(axis=1, keepdims=True)
            pred = lg + m if w is None else keep * lg + w * m
            if (i != num_iter - 1 or cfg["final_softmax"]) and cfg["softmax"]:
                pred = _softmax(xp, pred)
    if bool(xp.isnan(pred).any()):
        raise ValueError(
            f"{caller}: the result would contain NaN at {int(xp.isnan(pred).sum())} entries. With "
            "config['logsoftmax']=False, probabilities of 0 become log(0) = -inf, which this config multiplies "
            "by 0 (unary_weight equal to weight_init) or passes through the kernels (softmax=False); give every "
            "class a positive probability (e.g. unary + 1e-5), or pass logits with logsoftmax=True")
    return xp.ascontiguousarray(pred.astype(dt))


#: theta_alpha standing for "no position term" (upstream's colour kernel without ``use_bias``).
NO_POSITION_TERM = 1e6


def cucrf_settings(config=None):
    """The closest :func:`cucrf.infer` settings to an upstream config (cucrf's own model).

    The mapping, with ``w`` the mixing weight (``weight_init``; 1 when ``weight`` is None) and
    ``a`` upstream's ``unary_weight``:

    * ``theta_gamma = pos_feats.sdims``, ``smoothness_weight = w * pos_feats.compat``;
    * ``theta_beta = col_feats.schan``, ``appearance_weight = w * col_feats.compat``;
      ``theta_alpha = col_feats.sdims`` with ``use_bias``, else :data:`NO_POSITION_TERM`
      (upstream's colour kernel has no position term; the window bounds it anyway);
    * ``unary_weight = a - w`` (weight None: ``a``);
    * ``filter_size``, ``blur`` unchanged; ``norm='sym'`` -> ``normalization='symmetric'``;
    * ``logsoftmax=False`` (probabilities in) -> ``unary_kind='probabilities'``.

    What remains different is the model itself: cucrf leaves the centre out of the window, passes
    its first message on probabilities (not log-probabilities), normalises its output and uses a
    Potts compatibility (for softmax outputs the same as upstream's added message). See
    docs/convcrf-migration.md.

    Returns
    -------
    dict
        ``params`` (:class:`cucrf.CRFParams`), ``filter_size``, ``blur``, ``normalization``,
        ``unary_kind``: pass as ``cucrf.infer(unary, image, **settings)`` (with cucrf's layouts:
        unary (C, H, W), image (H, W, F)).
    """
    from ._params import CRFParams

    cfg = resolve_config(config)
    if cfg["convcomp"]:
        raise ValueError("config['convcomp']=True has no cucrf equivalent here (cucrf learns a full compatibility "
                         "matrix with cucrf.fit instead)")
    if cfg["filter_size"] < 3:
        raise ValueError("config['filter_size']=1 (each pixel only messages itself) has no cucrf equivalent: "
                         "cucrf's window leaves the centre out, so its smallest filter_size is 3")
    w = 1.0 if cfg["weight"] is None else cfg["weight_init"]
    a = cfg["unary_weight"] - (0.0 if cfg["weight"] is None else w)
    col = cfg["col_feats"]
    params = CRFParams(
        theta_alpha=col["sdims"] if col["use_bias"] else NO_POSITION_TERM,
        theta_beta=col["schan"],
        theta_gamma=cfg["pos_feats"]["sdims"],
        appearance_weight=w * col["compat"],
        smoothness_weight=w * cfg["pos_feats"]["compat"],
        unary_weight=a,
    )
    return {
        "params": params,
        "filter_size": cfg["filter_size"],
        "blur": cfg["blur"],
        "normalization": "symmetric" if cfg["norm"] == "sym" else None,
        "unary_kind": "logits" if cfg["logsoftmax"] else "probabilities",
    }
