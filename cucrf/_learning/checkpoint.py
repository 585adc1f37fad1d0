"""Checkpoints of :func:`cucrf.fit`: a ``.npz`` of plain arrays and JSON, written atomically."""

from __future__ import annotations

import glob
import io
import json
import os
import zipfile

import numpy as np

VERSION = 2


def atomic_write(path, data: bytes):
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_path(path):
    """Refuse a checkpoint path that cannot be written, before any training; remove stray temporaries.

    A run killed while writing leaves ``.NAME.tmpPID`` beside the checkpoint; the next run removes it.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path (a str or os.PathLike) such as 'fit.npz', got {path!r}")
    if os.fspath(path) == "":
        raise ValueError("checkpoint must be a file path such as 'fit.npz', got ''")
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a directory; expected a file path such as {path}/fit.npz")
    parent = os.path.dirname(path)
    probe = parent
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise ValueError(f"checkpoint {path!r} lies under {probe!r}, which is a file, not a directory")
    if probe and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the checkpoint {path!r}: the folder {probe!r} is not writable")
    if os.path.isdir(parent):
        for stray in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(os.path.basename(path))}.tmp*")):
            try:
                os.remove(stray)
            except OSError:
                pass


def save(path, state):
    """Write a training state: ``vec``, ``best_vec``, ``optimizer``, ``meta`` (JSON-serialisable)."""
    arrays = {}
    for group in ("vec", "best_vec"):
        for k, v in state[group].items():
            arrays[f"{group}/{k}"] = np.asarray(v)
    opt = state["optimizer"]
    for group in ("m", "v"):
        for k, v in opt[group].items():
            arrays[f"adam_{group}/{k}"] = np.asarray(v)
    meta = dict(state["meta"], version=VERSION, adam_t=opt["t"], format="cucrf.fit checkpoint")
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def load(path):
    """Read :func:`save`'s state; a clear ValueError naming the path for anything else."""
    name = os.fspath(path)
    if os.path.isdir(name):
        raise ValueError(f"checkpoint {name!r} is a directory, not a checkpoint file")
    if os.path.getsize(name) == 0:
        raise ValueError(f"checkpoint {name!r} is empty; delete it or pass resume=False to start afresh")
    try:
        with np.load(name, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise ValueError("it holds no cucrf metadata")
            meta = json.loads(bytes(z["meta"]).decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != "cucrf.fit checkpoint":
                raise ValueError("it was not written by cucrf.fit")
            state = {"vec": {}, "best_vec": {}, "optimizer": {"t": int(meta["adam_t"]), "m": {}, "v": {}}}
            for key in z.files:
                if key == "meta":
                    continue
                group, sub = key.split("/", 1)
                if group in ("vec", "best_vec"):
                    state[group][sub] = np.array(z[key])
                elif group in ("adam_m", "adam_v"):
                    state["optimizer"][group[len("adam_"):]][sub] = np.array(z[key])
                else:
                    raise ValueError(f"unexpected entry {key!r}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read checkpoint {name!r} ({exc}); it is truncated, damaged or not a cucrf.fit "
                         "checkpoint: delete it or pass resume=False to start afresh") from exc
    if meta.get("version") != VERSION:
        raise ValueError(f"checkpoint {name!r} has format version {meta.get('version')}, expected {VERSION}; "
                         "delete it or pass resume=False to start afresh")
    if not isinstance(meta.get("signature"), dict):
        raise ValueError(f"checkpoint {name!r} holds no settings to check a resumed run against; delete it or "
                         "pass resume=False to start afresh")
    state["meta"] = meta
    return state


def _short(value, width=80):
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def signature_difference(saved, current, prefix=""):
    """The first setting that differs between two signatures, as text; None when they agree.

    Settings are compared in the order ``current`` lists them; settings that are themselves dicts
    (the starting parameters) are compared entry by entry and named ``setting.entry``.
    """
    current = json.loads(json.dumps(current))
    for key in list(current) + [k for k in saved if k not in current]:  # in the order the settings are listed
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            inner = signature_difference(old, new, f"{prefix}{key}.")
            if inner is not None:
                return inner
        elif old != new:
            return f"{prefix}{key} was {_short(old)} and is now {_short(new)}"
    return None
