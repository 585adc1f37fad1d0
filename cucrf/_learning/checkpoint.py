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
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a directory; expected a file path such as {path}/fit.npz")
    parent = os.path.dirname(path)
    probe = parent
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise ValueError(f"checkpoint {path!r} lies under {probe!r}, which is a file, not a directory")
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
    state["meta"] = meta
    return state


def signature_difference(saved, current):
    """The first setting that differs between two signatures, as text; None when they agree."""
    current = json.loads(json.dumps(current))
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            return f"{key} was {saved.get(key)!r} and is now {current.get(key)!r}"
    return None
