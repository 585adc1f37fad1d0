"""Adam, for dicts of NumPy or CuPy arrays (used by :func:`cucrf.fit`).

The optimiser keeps its moments in the array library of each parameter (``xp``-generic: only
arithmetic operators and ``sqrt`` of that library are used), so the same code updates parameters
held on the CPU or on the GPU.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._validation import array_namespace as _namespace

__all__ = ["Adam"]


def _check_number(name, value, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    value = float(value)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")
    return value


class Adam:
    """Adam (Kingma & Ba, 2015) with bias correction and optional weight decay.

    For each parameter ``p`` with gradient ``g``, step ``t = 1, 2, ...``::

        g      = g + weight_decay * p                  (only when decoupled=False: L2 penalty)
        m      = beta1 * m + (1 - beta1) * g
        v      = beta2 * v + (1 - beta2) * g**2
        lr_t   = lr * schedule(t - 1)                  (schedule None: lr)
        p      = p - lr_t * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)
        p      = p - lr_t * weight_decay * p_old       (only when decoupled=True: AdamW)

    Parameters
    ----------
    lr : float
        Base learning rate (> 0).
    betas : (float, float)
        Decay rates of the first and second moment, each in [0, 1).
    eps : float
        Added to the denominator (> 0).
    weight_decay : float
        Decay coefficient (>= 0); 0 switches it off.
    decoupled : bool
        Decoupled weight decay (AdamW, the default) or an L2 term added to the gradient.
    schedule : callable, optional
        ``schedule(step) -> factor``: the learning rate of step ``step`` (0-based) is
        ``lr * factor``.

    Examples
    --------
    >>> import numpy as np
    >>> opt = Adam(lr=0.1)
    >>> p = {"w": np.array([1.0, -2.0])}
    >>> p = opt.step(p, {"w": np.array([0.5, -0.5])})
    >>> p["w"]  # the first step moves each entry by lr against the gradient's sign
    array([ 0.9, -1.9])
    """

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=True, schedule=None):
        self.lr = _check_number("lr", lr, lo=0.0, lo_open=True)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
        self.betas = tuple(_check_number(f"betas[{i}]", b, lo=0.0, hi=1.0, hi_open=True) for i, b in enumerate(betas))
        self.eps = _check_number("eps", eps, lo=0.0, lo_open=True)
        self.weight_decay = _check_number("weight_decay", weight_decay, lo=0.0)
        self.decoupled = bool(decoupled)
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> factor or None, got {type(schedule).__name__}")
        self.schedule = schedule
        self.t = 0
        self.m = {}
        self.v = {}

    def current_lr(self, step=None):
        """Learning rate of ``step`` (0-based; default: the next step)."""
        step = self.t if step is None else step
        if self.schedule is None:
            return self.lr
        factor = self.schedule(step)
        factor = _check_number("schedule(step)", factor, lo=0.0)
        return self.lr * factor

    def step(self, params, grads):
        """One update. Returns a new dict ``{name: updated array}``; the inputs are not modified.

        Parameters
        ----------
        params, grads : dict of str -> array (NumPy or CuPy, float) or float
            The same keys; each gradient has its parameter's shape. Python floats come back as
            float64 0-d NumPy arrays.
        """
        if set(params) != set(grads):
            raise ValueError(f"params and grads must have the same keys, got {sorted(params)} and {sorted(grads)}")
        lr = self.current_lr()
        self.t += 1
        b1, b2 = self.betas
        c1 = 1.0 - b1 ** self.t
        c2 = 1.0 - b2 ** self.t
        out = {}
        for name, p in params.items():
            g = grads[name]
            if not hasattr(p, "shape"):
                p = np.asarray(p, dtype=np.float64)
            xp = _namespace(p)
            g = xp.asarray(g, dtype=p.dtype)
            if g.shape != p.shape:
                raise ValueError(f"gradient of {name!r} has shape {g.shape} but the parameter has {p.shape}")
            if self.weight_decay and not self.decoupled:
                g = g + self.weight_decay * p
            m = self.m.get(name)
            v = self.v.get(name)
            m = (1.0 - b1) * g if m is None else b1 * m + (1.0 - b1) * g
            v = (1.0 - b2) * (g * g) if v is None else b2 * v + (1.0 - b2) * (g * g)
            self.m[name], self.v[name] = m, v
            new = p - lr * (m / c1) / (xp.sqrt(v / c2) + self.eps)
            if self.weight_decay and self.decoupled:
                new = new - (lr * self.weight_decay) * p
            out[name] = new
        return out

    def state_dict(self):
        """The optimiser's state as NumPy arrays and numbers (for checkpoints)."""
        to_np = (lambda a: a.get() if hasattr(a, "get") else np.asarray(a))
        return {"t": self.t, "m": {k: to_np(a) for k, a in self.m.items()},
                "v": {k: to_np(a) for k, a in self.v.items()}}

    def load_state_dict(self, state, xp=np):
        """Restore :meth:`state_dict` (moments are placed in the array library ``xp``)."""
        self.t = int(state["t"])
        self.m = {k: xp.asarray(a) for k, a in state["m"].items()}
        self.v = {k: xp.asarray(a) for k, a in state["v"].items()}
