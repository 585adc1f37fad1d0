"""Compiled CPU kernels (numba) of the fused path; see :mod:`cucrf._numba_backend` for how they are used.

Every array is C-contiguous and five-dimensional: class maps ``(B, C, D, H, W)`` and coarse maps
``(B, C, d, h, w)``; an image is a volume of depth 1 (``D = d = 1``), so one compiled kernel
serves images and volumes. Each kernel splits its rows (or rows of cells) into chunks, computes
the chunks of one piece per call and releases the GIL while it runs, so that several threads
can run the pieces of one call side by side; every output element is written by exactly one
piece in a fixed order, so results do not depend on the number of threads.

Imported only by :mod:`cucrf._numba_backend` (it imports numba).
"""

from __future__ import annotations

import math
import os
import platform
import warnings

import numba
import numpy as np
from llvmlite import ir as _ir
from numba.core import cgutils as _cgutils
from numba.core import types as _types
from numba.extending import intrinsic as _intrinsic


def _probe(x):  # a function to try caching on
    return x + 1


def _cache_possible():
    """Whether numba can cache compiled code for this file (a writable folder exists)."""
    try:
        numba.njit(cache=True)(_probe)
    except Exception as exc:  # numba: "cannot cache function ...: no locator available"
        return False, str(exc)
    return True, None


CACHE, _NO_CACHE_REASON = _cache_possible()
if not CACHE:
    warnings.warn(
        "cucrf: the compiled CPU kernels cannot be cached on disk (no writable folder next to cucrf or in "
        f"NUMBA_CACHE_DIR or the user cache folder: {_NO_CACHE_REASON}); each new process compiles them again. "
        "Set NUMBA_CACHE_DIR to a writable folder to cache them", RuntimeWarning, stacklevel=2)

_SERIAL = dict(cache=CACHE, nogil=True, error_model="numpy")
# Only the softmax of a row (and the exp throughput measurement, which times the same exp) may
# contract a * b + c into one fused multiply-add, rounded once instead of twice. Nowhere else:
# a sum like ``acc += q * n`` contracted in one kernel and not in another would make inference
# without a tape (Q pooled as it is made) differ in the last bit from inference with one (Q
# stored, then pooled).
_CONTRACT = dict(_SERIAL, fastmath={"contract"})
# Kernels that split their work into pieces: each call computes piece ``part`` of ``parts``
# (whole chunks of rows, see _chunks) and releases the GIL, so cucrf's own threads run the
# pieces side by side (cucrf._numba_backend._run). Each piece is computed the same way whatever
# thread runs it: results do not depend on the number of threads.
_PIECES = _SERIAL

# -- denormals ---------------------------------------------------------------------------------------
# After a few iterations most marginals are tiny (1e-30 and less) and products of them underflow
# below float32's smallest normal value; x86 processors handle each such denormal operand or
# result in microcode, which made whole kernels 3-4x slower. Every parallel piece therefore
# runs with denormals flushed to zero (MXCSR's FTZ and DAZ bits) and restores the previous mode
# when it ends. The results change by less than the smallest normal value (1.2e-38 in float32).
if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
    def _mxcsr_call(builder, name, ptr):
        fnty = _ir.FunctionType(_ir.VoidType(), [_ir.PointerType(_ir.IntType(8))])
        fn = _cgutils.get_or_insert_function(builder.module, fnty, name)
        builder.call(fn, [builder.bitcast(ptr, _ir.PointerType(_ir.IntType(8)))])

    @_intrinsic
    def _mxcsr_get(typingctx):
        def codegen(context, builder, signature, args):
            ptr = _cgutils.alloca_once(builder, _ir.IntType(32))
            _mxcsr_call(builder, "llvm.x86.sse.stmxcsr", ptr)
            return builder.load(ptr)

        return _types.uint32(), codegen

    @_intrinsic
    def _mxcsr_set(typingctx, value):
        def codegen(context, builder, signature, args):
            ptr = _cgutils.alloca_once(builder, _ir.IntType(32))
            builder.store(args[0], ptr)
            _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", ptr)
            return context.get_dummy_value()

        return _types.void(_types.uint32), codegen

    @numba.njit(inline="always", **_SERIAL)
    def _flush_denormals():
        """Set FTZ and DAZ; return the previous mode for :func:`_restore`."""
        old = _mxcsr_get()
        _mxcsr_set(old | np.uint32(0x8040))
        return old

    @numba.njit(inline="always", **_SERIAL)
    def _restore(old):
        _mxcsr_set(old)

else:
    @numba.njit(inline="always", **_SERIAL)
    def _flush_denormals():
        return np.uint32(0)

    @numba.njit(inline="always", **_SERIAL)
    def _restore(old):
        pass


# -- exp: vectorisable, about 1 ulp (Cephes' expf), for float32 rows -----------------------------------
_LOG2E = np.float32(1.4426950408889634)
_HALF = np.float32(0.5)
_C1 = np.float32(0.693359375)
_C2 = np.float32(-2.12194440e-4)
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)
_ONE = np.float32(1.0)
#: Below this, exp underflows below float32's smallest normal (the result is then ~1e-38, not 0).
_LOW = np.float32(-87.33)
_HIGH = np.float32(88.72)


@_intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits`` (a register move: loops vectorise)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _ir.FloatType())

    return _types.float32(_types.int32), codegen


@_intrinsic
def _prefetch_at(typingctx, arr, index):
    """A hint to bring ``arr[index]``'s cache line into the cache (``llvm.prefetch``, for reading);
    the results do not depend on it."""
    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        a = context.make_array(aty)(context, builder, args[0])
        ptr = _cgutils.get_item_pointer(context, builder, aty, a, [args[1]], wraparound=False)
        i8p = _ir.IntType(8).as_pointer()
        i32 = _ir.IntType(32)
        fnty = _ir.FunctionType(_ir.VoidType(), [i8p, i32, i32, i32])
        fn = _cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), _ir.Constant(i32, 0), _ir.Constant(i32, 3), _ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return _types.void(arr, index), codegen


#: How many rows ahead the kernels that stream a row of every class per row of pixels (the unary,
#: Q, the gradient's sums: more streams than a core's prefetcher follows) ask for the rows they
#: will read next.
PREFETCH = 3


@numba.njit(inline="always", **_SERIAL)
def _prefetch_row(row):
    """:func:`_prefetch_at` for every cache line of a 1-D row (64-byte lines)."""
    step = 64 // row.itemsize
    for i in range(0, row.shape[0], step):
        _prefetch_at(row, i)


@numba.njit(inline="always", **_SERIAL)
def _prefetch_ahead(a, b, c, z, y):
    """:func:`_prefetch_row` for the row ``PREFETCH`` rows after ``a[b, c, z, y]`` (B, C, D, H, W),
    if there is one in that slice."""
    if y + PREFETCH < a.shape[3]:
        _prefetch_row(a[b, c, z, y + PREFETCH])


@numba.njit(inline="always", **_SERIAL)
def _expf(v):
    """exp of a float32 ``v`` (Cephes' expf polynomial, about 1 ulp), in registers."""
    v = _LOW if v < _LOW else v  # selects (not min/max) vectorise; NaN passes through
    v = _HIGH if v > _HIGH else v
    t = np.floor(v * _LOG2E + _HALF)
    r = v - t * _C1
    r = r - t * _C2
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    return (p * r * r + r + _ONE) * _float32_from_bits((np.int32(t) + np.int32(127)) << np.int32(23))


@numba.njit(inline="always", **_SERIAL)
def _exp_any(buf):
    """``buf[:] = exp(buf)``: the vectorised float32 exp, or ``math.exp`` for float64."""
    if buf.itemsize == 4:
        for i in range(buf.shape[0]):
            buf[i] = _expf(buf[i])
    else:
        for i in range(buf.shape[0]):
            buf[i] = math.exp(buf[i])


@numba.njit(**_CONTRACT)  # a kernel of pieces, compiled as the softmax's exp is
def exp_rows(x, repeats, part, parts):
    """``repeats`` times exp of a (N, L) array in place, by pieces of rows (for measuring exp
    throughput, compiled as the update's exp is: the values settle at the clamp, where exp
    costs what it costs anywhere)."""
    n = x.shape[0]
    for i in range(part * n // parts, (part + 1) * n // parts):
        for _ in range(repeats):
            _exp_any(x[i])


@numba.njit(inline="always", **_SERIAL)
def _chunks(groups):
    """How many chunks to split ``groups`` rows into (row buffers are made once per chunk; a piece
    takes whole chunks)."""
    return max(1, min(groups, 64))


# Inner loops run over 1-D row slices with indices from ``range(n)``: numba then knows the index
# is not negative and the loop vectorises (an index such as ``x + dx`` costs a wraparound check
# per element and keeps the loop scalar). Gather tables are unsigned for the same reason.

# -- input scans ------------------------------------------------------------------------------------
@numba.njit(**_PIECES)
def extremes(x, out, part, parts):
    """``out[part] = (min, max, s)`` of piece ``part`` of the flat array ``x``, in one pass; ``s``
    is a sum of ``v - v``: 0 when every value is finite, NaN otherwise (min and max are then
    meaningless). Lanes of 64 independent running values, so that the loop vectorises."""
    n = x.shape[0]
    a = part * n // parts
    e = (part + 1) * n // parts
    lanes = 64
    lo = np.full(lanes, np.inf, x.dtype)
    hi = np.full(lanes, -np.inf, x.dtype)
    fin = np.zeros(lanes, x.dtype)
    j = a
    while j + lanes <= e:
        seg = x[j:j + lanes]
        for k in range(lanes):
            v = seg[k]
            lo[k] = v if v < lo[k] else lo[k]
            hi[k] = v if v > hi[k] else hi[k]
            fin[k] += v - v
        j += lanes
    for i in range(j, e):
        v = x[i]
        lo[0] = v if v < lo[0] else lo[0]
        hi[0] = v if v > hi[0] else hi[0]
        fin[0] += v - v
    out[part, 0] = lo.min()
    out[part, 1] = hi.max()
    out[part, 2] = fin.sum()


# -- pooling ----------------------------------------------------------------------------------------
@numba.njit(**_SERIAL)
def _cell_fours(xs):
    """``(k0, n)``: the longest run of cells ``k0 .. k0 + n - 1`` of four pixels each (cells
    ``xs``: first pixel of each cell, then the end); ``n = 0`` when there is none."""
    best, best_n, k = 0, 0, 0
    cells = xs.shape[0] - 1
    while k < cells:
        if xs[k + 1] - xs[k] != 4:
            k += 1
            continue
        k1 = k
        while k1 < cells and xs[k1 + 1] - xs[k1] == 4:
            k1 += 1
        if k1 - k > best_n:
            best, best_n = k, k1 - k
        k = k1
    return best, best_n


@numba.njit(inline="always", **_SERIAL)
def _reduce_cells(acc, xs, inv, out, k0, n4):
    """``out[xc] = inv[xc] * sum(acc[xs[xc]:xs[xc + 1]])`` for every cell ``xc`` (cells are not
    empty); the run of cells of four pixels ``(k0, n4)`` of :func:`_cell_fours` four pixels at a
    time, which vectorises (the same sums in the same order). Unsigned indices and no slices
    elsewhere: the cells at the edges are few, and a slice's bounds handling cost more than
    their sums."""
    for xc in range(k0):
        _reduce_cell(acc, xs, inv, out, xc)
    if n4 > 0:
        base = xs[k0]
        run = acc[base:base + 4 * n4]
        dst = out[k0:k0 + n4]
        scale = inv[k0:k0 + n4]
        for j in range(n4):
            dst[j] = (((run[4 * j] + run[4 * j + 1]) + run[4 * j + 2]) + run[4 * j + 3]) * scale[j]
    for xc in range(k0 + n4, out.shape[0]):
        _reduce_cell(acc, xs, inv, out, xc)


@numba.njit(inline="always", **_SERIAL)
def _reduce_cell(acc, xs, inv, out, xc):
    """``out[xc] = inv[xc] * sum(acc[xs[xc]:xs[xc + 1]])``, one cell of :func:`_reduce_cells`."""
    a0 = np.uint64(xs[xc])
    a1 = np.uint64(xs[xc + 1])
    a = acc[a0]
    for i in range(a0 + np.uint64(1), a1):
        a += acc[i]
    out[xc] = a * inv[xc]


@numba.njit(**_PIECES)
def pool(x, s0, s1, nscale, zs, ys, xs, inv, out0, out1, part, parts):
    """Average pooling: ``out_k = Pool(x * s_k)`` (``nscale`` 0: ``out0 = Pool(x)``).

    ``x`` (B, C, D, H, W); ``s0``, ``s1`` (B, 1, D, H, W); ``zs``, ``ys``, ``xs`` the first pixel
    of every cell plus the end (length cells + 1); ``inv`` (d, h, w) the inverse pixel counts.
    """
    B, C, D, H, W = x.shape
    d, h, w = inv.shape
    groups = B * C * d * h
    n_ch = _chunks(groups)
    k0, nk = _cell_fours(xs)
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        acc0 = np.empty(W, x.dtype)
        acc1 = np.empty(W, x.dtype)
        for g in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            yc = g % h
            zc = (g // h) % d
            c = (g // (h * d)) % C
            b = g // (h * d * C)
            acc0[:] = 0
            acc1[:] = 0
            for z in range(zs[zc], zs[zc + 1]):
                for y in range(ys[yc], ys[yc + 1]):
                    row = x[b, c, z, y]
                    if nscale == 0:
                        for i in range(W):
                            acc0[i] += row[i]
                    else:
                        sr0 = s0[b, 0, z, y]
                        for i in range(W):
                            acc0[i] += row[i] * sr0[i]
                        if nscale == 2:
                            sr1 = s1[b, 0, z, y]
                            for i in range(W):
                                acc1[i] += row[i] * sr1[i]
            _reduce_cells(acc0, xs, inv[zc, yc], out0[b, c, zc, yc], k0, nk)
            if nscale == 2:
                _reduce_cells(acc1, xs, inv[zc, yc], out1[b, c, zc, yc], k0, nk)
        _restore(mode_fp)


# -- message passing on the coarse grid --------------------------------------------------------------
@numba.njit(inline="always", **_SERIAL)
def _neighbour_segment(offsets, o, z, y, d, h, w):
    """The cells ``x0 .. x1 - 1`` of row (z, y) whose neighbour at window offset ``o`` lies inside
    the (d, h, w) grid, in row (zz, yy) shifted by ``dx``: ``(zz, yy, dx, x0, x1)``, with
    ``x1 <= x0`` when there is none."""
    zz = z + offsets[o, 0]
    yy = y + offsets[o, 1]
    dx = offsets[o, 2]
    if zz < 0 or zz >= d or yy < 0 or yy >= h:
        return zz, yy, dx, 0, 0
    return zz, yy, dx, max(0, -dx), min(w, w - dx)


@numba.njit(inline="always", **_SERIAL)
def _near_start(offsets, o, rz, ry, rx, span, w):
    """Where the neighbours at window offset ``o`` of a block's first cell lie in the buffer of
    :func:`_message_rows`."""
    return (offsets[o, 0] + rz) * span + rx + (offsets[o, 1] + ry) * w + offsets[o, 2]


@numba.njit(inline="always", **_SERIAL)
def _message_rows(kernels, offsets, q, b, c, z, y0, y1, rz, ry, rx, span, near, a):
    """``a = sum_o kernels[b, o, z, rows y0 .. y1 - 1] * q[b, c, their neighbours at offset o]``
    (flat, ``(y1 - y0) * w`` values) for one class. The rows within reach (``ry`` rows around the
    block in slices ``z - rz .. z + rz``) are copied into ``near`` (``span`` values per slice)
    with zeros around them; then each window offset is one loop over the block."""
    d = q.shape[2]
    h = q.shape[3]
    w = q.shape[4]
    near[:] = 0
    for dz in range(-rz, rz + 1):
        zz = z + dz
        if zz < 0 or zz >= d:
            continue
        ya = max(0, y0 - ry)
        yb = min(h, y1 + ry)
        base = (dz + rz) * span + rx + (ya - (y0 - ry)) * w
        src = q[b, c, zz]
        for yy in range(ya, yb):
            dst = near[base + (yy - ya) * w:base + (yy - ya + 1) * w]
            srow = src[yy]
            for i in range(w):
                dst[i] = srow[i]
    n = a.shape[0]
    a[:] = 0
    K = offsets.shape[0]
    o = 0
    # four offsets per pass over the block (a read and written once, not four times); the sums
    # are those of one offset per pass, in the same order
    while o + 4 <= K:
        q0 = near[_near_start(offsets, o, rz, ry, rx, span, w):][:n]
        q1 = near[_near_start(offsets, o + 1, rz, ry, rx, span, w):][:n]
        q2 = near[_near_start(offsets, o + 2, rz, ry, rx, span, w):][:n]
        q3 = near[_near_start(offsets, o + 3, rz, ry, rx, span, w):][:n]
        k0 = kernels[b, o, z, y0 * w:y0 * w + n]
        k1 = kernels[b, o + 1, z, y0 * w:y0 * w + n]
        k2 = kernels[b, o + 2, z, y0 * w:y0 * w + n]
        k3 = kernels[b, o + 3, z, y0 * w:y0 * w + n]
        for i in range(n):
            a[i] = (((a[i] + k0[i] * q0[i]) + k1[i] * q1[i]) + k2[i] * q2[i]) + k3[i] * q3[i]
        o += 4
    for o in range(o, K):
        qs = near[_near_start(offsets, o, rz, ry, rx, span, w):][:n]
        ks = kernels[b, o, z, y0 * w:y0 * w + n]
        for i in range(n):
            a[i] += ks[i] * qs[i]


@numba.njit(**_PIECES)
def message(kernels, offsets, q, weight, scale, scaled, out, upsample, xlo, xhi, xf, up, part, parts):
    """``out[b, c, i] = weight * sum_o kernels[b, o, i] * q[b, c, i + offset_o]`` (0 outside the grid),
    times ``scale[i]`` (d, h, w) where ``scaled`` (a second product, after the first is rounded to
    the dtype: the bits of multiplying ``out`` by ``scale`` afterwards).

    ``kernels`` (B, K, d, h * w) (rows flattened), zero where the neighbour lies outside the grid
    (as :func:`pairwise_kernels` makes them); ``offsets`` (K, 3) int64; ``q``, ``out`` (B, C, d, h, w).
    Work goes by blocks of whole rows: each class's rows within reach of a block are copied into
    a buffer with zero rows around them, after which a window offset is one loop over the block
    (a neighbour outside the grid along y or z reads a zero, along x one of the next row, times a
    kernel value of zero; the sums are in the same order as a loop over each row's valid
    neighbours, and equal to it). ``upsample``: each row of ``out`` is also upsampled along x
    into ``up`` (B, C, d, h, W), as :func:`upsample_x` does (taps ``xlo``, ``xhi``, ``xf``), while
    it is in the cache.
    """
    B, C, d, h, w = q.shape
    K = offsets.shape[0]
    rz = 0
    ry = 0
    rx = 0
    for o in range(K):
        rz = max(rz, abs(offsets[o, 0]))
        ry = max(ry, abs(offsets[o, 1]))
        rx = max(rx, abs(offsets[o, 2]))
    # about 32 blocks per plane (work for every thread), each at most 1024 cells
    rows = max(1, min(1024 // w, (h + 31) // 32))
    blocks = (h + rows - 1) // rows
    span = (rows + 2 * ry) * w + 2 * rx  # one slice's rows within reach, and room for x offsets
    groups = B * d * blocks
    n_ch = _chunks(groups)
    i0, n4 = _fours(xlo, xhi, xf) if upsample else (0, 0)
    dt = q.dtype
    acc = np.empty(rows * w, dt)
    near = np.zeros((2 * rz + 1) * span, dt)
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        for g in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            blk = g % blocks
            z = (g // blocks) % d
            b = g // (blocks * d)
            y0 = blk * rows
            y1 = min(h, y0 + rows)
            n = (y1 - y0) * w
            for c in range(C):
                a = acc[:n]
                _message_rows(kernels, offsets, q, b, c, z, y0, y1, rz, ry, rx, span, near, a)
                for r in range(y1 - y0):
                    orow = out[b, c, z, y0 + r]
                    ar = a[r * w:(r + 1) * w]
                    if scaled:
                        sr = scale[z, y0 + r]
                        for i in range(w):
                            orow[i] = dt.type(ar[i] * weight) * sr[i]  # (rounded as orow, then scaled)
                    else:
                        for i in range(w):
                            orow[i] = ar[i] * weight
                    if upsample:
                        _upsample_row_fours(orow, xlo, xhi, xf, up[b, c, z, y0 + r], i0, n4)
        _restore(mode_fp)


@numba.njit(inline="always", **_SERIAL)
def _smoothness_row(d2s, ig2, smo, n):
    """``smo[i] = exp(-d2s[i] ig2 / 2)`` in float64, rounded to ``smo``'s dtype. Along a row the
    squared distance to a neighbour at one offset changes only at the edges of the grid (cells
    cut by the border): each distinct value is exponentiated once."""
    last = -1.0  # no squared distance is negative
    value = smo.dtype.type(0)
    for i in range(n):
        d2 = d2s[i]
        if d2 != last:
            last = d2
            value = smo.dtype.type(math.exp(-0.5 * d2 * ig2))
        smo[i] = value


@numba.njit(**_PIECES)
def pairwise_kernels(scaled, pz, py, px, offsets, ia2, ig2, weights, out, part, parts):
    """Kernel values between every cell and each window offset (0 where the neighbour is outside).

    ``scaled`` (B, F, d, h, w) features times ``1 / theta_beta``; ``pz``, ``py``, ``px`` float64
    cell positions; ``weights`` (S, 2) float64 (appearance, smoothness) per output kernel;
    ``out`` (S, B, K, d, h, w), zero on entry. Same formulas, in the same precisions, as
    :func:`cucrf._numpy_backend.pairwise_kernels`.
    """
    B, F, d, h, w = scaled.shape
    K = offsets.shape[0]
    S = weights.shape[0]
    dt = scaled.dtype
    groups = B * d * h
    n_ch = _chunks(groups)
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        app = np.empty(w, dt)
        smo = np.empty(w, dt)
        col = np.empty(w, dt)
        d2s = np.empty(w, np.float64)
        for g in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            y = g % h
            z = (g // h) % d
            b = g // (h * d)
            for o in range(K):
                zz, yy, dx, x0, x1 = _neighbour_segment(offsets, o, z, y, d, h, w)
                if x1 <= x0:
                    continue
                n = x1 - x0
                dzy = (pz[zz] - pz[z]) ** 2 + (py[yy] - py[y]) ** 2
                pc = px[x0:x1]
                pn = px[x0 + dx:x1 + dx]
                col[:n] = 0
                for f in range(F):
                    cen = scaled[b, f, z, y, x0:x1]
                    nbr = scaled[b, f, zz, yy, x0 + dx:x1 + dx]
                    for i in range(n):
                        diff = nbr[i] - cen[i]
                        col[i] += diff * diff
                for i in range(n):
                    d2 = dzy + (pn[i] - pc[i]) ** 2
                    d2s[i] = d2
                    app[i] = dt.type(-0.5) * (col[i] + dt.type(d2 * ia2))
                _exp_any(app[:n])
                _smoothness_row(d2s, ig2, smo, n)
                for s in range(S):
                    wa = dt.type(weights[s, 0])
                    ws = dt.type(weights[s, 1])
                    orow = out[s, b, o, z, y, x0:x1]
                    for i in range(n):
                        orow[i] = wa * app[i] + ws * smo[i]
        _restore(mode_fp)


# -- the update: upsampling + compatibility + unary + softmax (+ pooling of the result) ---------------
@numba.njit(**_PIECES)
def upsample_x(m, xlo, xhi, xf, out, part, parts):
    """Bilinear upsampling along the last axis only: ``m`` (B, C, d, h, w) to ``out`` (B, C, d, h, W).

    The first of the separable passes (the last axis first, as :func:`cucrf._numpy_backend.upsample`
    does); the update interpolates the rows of ``out`` along the other axes.
    """
    B, C, d, h, w = m.shape
    groups = B * C * d * h
    n_ch = _chunks(groups)
    i0, n4 = _fours(xlo, xhi, xf)
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        for g in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            y = g % h
            z = (g // h) % d
            c = (g // (h * d)) % C
            b = g // (h * d * C)
            _upsample_row_fours(m[b, c, z, y], xlo, xhi, xf, out[b, c, z, y], i0, n4)
        _restore(mode_fp)


@numba.njit(inline="always", **_SERIAL)
def _upsample_row(t, xlo, xhi, xf, r):
    """``r[i] = t[lo] + f (t[hi] - t[lo])``: one coarse row ``t`` upsampled along x into ``r``."""
    for i in range(r.shape[0]):
        a = t[xlo[i]]
        r[i] = a + xf[i] * (t[xhi[i]] - a)


@numba.njit(**_SERIAL)
def _fours(xlo, xhi, xf):
    """``(i0, n)``: the longest run of pixels ``i0 .. i0 + 4 n - 1`` whose upsampling taps come in
    fours (blur 4): ``lo = xlo[i0] + j``, ``hi = lo + 1`` and ``f = xf[i0 + p]`` for pixel
    ``i0 + 4 j + p``; ``n = 0`` when there is none."""
    W = xlo.shape[0]
    best, best_n = 0, 0
    for s in range(min(4, W)):
        n = 0
        while s + 4 * (n + 1) <= W:
            ok = True
            for p in range(4):
                i = s + 4 * n + p
                if xlo[i] != xlo[s] + n or xhi[i] != xlo[i] + 1 or xf[i] != xf[s + p]:
                    ok = False
            if not ok:
                break
            n += 1
        if n > best_n:
            best, best_n = s, n
    return best, best_n


@numba.njit(inline="always", **_SERIAL)
def _upsample_row_fours(t, xlo, xhi, xf, r, i0, n4):
    """:func:`_upsample_row` with the run of :func:`_fours` ``(i0, n4)`` done four pixels per
    coarse value: no gathers, the same arithmetic."""
    if n4 == 0:
        _upsample_row(t, xlo, xhi, xf, r)
        return
    i1 = i0 + 4 * n4
    for i in range(i0):
        a = t[xlo[i]]
        r[i] = a + xf[i] * (t[xhi[i]] - a)
    f0 = xf[i0]
    f1 = xf[i0 + 1]
    f2 = xf[i0 + 2]
    f3 = xf[i0 + 3]
    run = r[i0:i1]
    src = t[xlo[i0]:xlo[i0] + n4 + 1]
    for j in range(n4):
        a = src[j]
        d = src[j + 1] - a
        run[4 * j] = a + f0 * d
        run[4 * j + 1] = a + f1 * d
        run[4 * j + 2] = a + f2 * d
        run[4 * j + 3] = a + f3 * d
    for i in range(i1, r.shape[0]):
        a = t[xlo[i]]
        r[i] = a + xf[i] * (t[xhi[i]] - a)


@numba.njit(inline="always", **_SERIAL)
def _reduce_row_fours(v, xlo, xhi, xf, out, i0, n4):
    """The transpose of :func:`_upsample_row_fours`: ``out[k] = sum (1 - f) v`` over the pixels
    whose lower tap is ``k`` plus ``sum f v`` over those whose upper tap is ``k``; the run of
    :func:`_fours` four pixels at a time, with its taps' weights held in registers."""
    one = out.dtype.type(1)
    out[:] = 0
    i1 = i0 + 4 * n4
    for i in range(i0):
        out[xlo[i]] += (one - xf[i]) * v[i]
        out[xhi[i]] += xf[i] * v[i]
    if n4 > 0:
        f0 = xf[i0]
        f1 = xf[i0 + 1]
        f2 = xf[i0 + 2]
        f3 = xf[i0 + 3]
        g0 = one - f0
        g1 = one - f1
        g2 = one - f2
        g3 = one - f3
        base = xlo[i0]
        run = v[i0:i1]
        dst = out[base:base + n4 + 1]
        # dst[j] = (dst[j] + upper taps of group j - 1) + lower taps of group j: no value
        # depends on another, so the loop vectorises (the sums of a running carry, in its order)
        dst[0] = dst[0] + (g0 * run[0] + g1 * run[1] + g2 * run[2] + g3 * run[3])
        nxt = run[4:]
        for j in range(n4 - 1):
            hi = f0 * run[4 * j] + f1 * run[4 * j + 1] + f2 * run[4 * j + 2] + f3 * run[4 * j + 3]
            lo = g0 * nxt[4 * j] + g1 * nxt[4 * j + 1] + g2 * nxt[4 * j + 2] + g3 * nxt[4 * j + 3]
            dst[j + 1] = (dst[j + 1] + hi) + lo
        last = run[4 * (n4 - 1):]
        dst[n4] = dst[n4] + (f0 * last[0] + f1 * last[1] + f2 * last[2] + f3 * last[3])
    for i in range(i1, v.shape[0]):
        out[xlo[i]] += (one - xf[i]) * v[i]
        out[xhi[i]] += xf[i] * v[i]


@numba.njit(inline="always", **_SERIAL)
def _lerp_row(r00, r01, r10, r11, fz, fy, t):
    """``t`` between the rows (z0, y0) ``r00``, (z0, y1) ``r01``, (z1, y0) ``r10`` and (z1, y1)
    ``r11`` (the last two read only when ``fz != 0``)."""
    for i in range(t.shape[0]):
        a = r00[i]
        t[i] = a + fy * (r01[i] - a)
    if fz != 0:
        for i in range(t.shape[0]):
            a1 = r10[i]
            t1 = a1 + fy * (r11[i] - a1)
            t[i] = t[i] + fz * (t1 - t[i])


@numba.njit(inline="always", **_SERIAL)
def _yz_row(m, b, z0, z1, fz, y0, y1, fy, row):
    """Interpolation of ``m`` (B, C, d, h, W), upsampled along x, between rows (z0, y0) .. (z1, y1)."""
    for c in range(row.shape[0]):
        _lerp_row(m[b, c, z0, y0], m[b, c, z0, y1], m[b, c, z1, y0], m[b, c, z1, y1], fz, fy, row[c])


@numba.njit(inline="always", **_SERIAL)
def _padded(n):
    """``n`` rounded up to whole 512-bit vectors of float32."""
    return (n + 15) // 16 * 16


@numba.njit(inline="always", **_SERIAL)
def _logits_row_done(top, row, first, n):
    """After a logits row's first ``n`` values are written: ``top = max(top, row)`` (``top =
    row`` when ``first``), the running class maximum, taken while the row is in the nearest cache,
    and the row's padding set to 0 (padded lanes then compute exp(0), not whatever they held)."""
    if first:
        top[:n] = row[:n]
    else:
        for i in range(n):
            v = row[i]
            top[i] = v if v > top[i] else top[i]  # a select vectorises, max() does not
    row[n:] = 0


@numba.njit(**_CONTRACT)
def _softmax_rows(logits, top, total):
    """``logits[c] = exp(logits[c] - top)`` and ``total = 1 / sum_c`` of them, per column of the
    (C, W) row buffers, ``top`` the class maximum (a function of its own, the one compiled with
    contraction). float32: :func:`_expf`; float64: ``math.exp``."""
    C, W = logits.shape
    one = logits.dtype.type(1)
    total[:] = 0
    for c in range(C):
        lr = logits[c]
        if logits.itemsize == 4:
            for i in range(W):
                e = _expf(lr[i] - top[i])
                lr[i] = e
                total[i] += e
        else:
            for i in range(W):
                e = math.exp(lr[i] - top[i])
                lr[i] = e
                total[i] += e
    for i in range(W):
        total[i] = one / total[i]  # one division per pixel


@numba.njit(**_PIECES)
def update(U, m0, m1, n0, n1, mode, w0, w1, compat, use_compat, phi, return_logits,
           zlo, zhi, zf, ylo, yhi, yf,
           pool_mode, zs, ys, xs, inv, p0, p1, store, out, checks, part, parts):
    """One mean-field update, fused: ``out = softmax(U - Phi(M))`` (or the logits).

    ``mode`` 0: no message (a softmax of ``U``); 1: ``M = Up(m0)``; 2: ``M = w0 n0 Up(m0) +
    w1 n1 Up(m1)`` (``n`` (B, 1, D, H, W)), with ``m`` already upsampled along x by
    :func:`upsample_x` (B, C, d, h, W); 3: ``M = m0`` at full resolution. ``-Phi`` is
    ``-compat @ M`` (``use_compat``), ``M`` itself (``phi``: with ``mode`` 1, the coarse
    message is ``-compat @ m`` already), else Potts (``M - sum_c M``; the sum cancels in the
    softmax). Upsampling taps along z and y: ``lo``, ``hi`` (unsigned), ``f``. ``pool_mode`` 1 (2)
    also writes ``p0 = Pool(out)`` (``p_k = Pool(n_k out)``) with the cells ``zs``, ``ys``,
    ``xs`` and ``inv`` of :func:`pool`; rows are processed by rows of cells, so each thread owns
    its cells. ``store`` False: ``out`` is not written (a ``Q`` that only feeds the next message
    needs just its pooled forms), only with ``pool_mode`` 1 or 2. Per row: the logits, their
    maximum, exp and sum, then the normalisation, store and pooling. ``checks`` (parts,): each
    piece writes 0 there when every value it stored is finite, else NaN (the output then needs
    no scan of its own).
    """
    B, C, D, H, W = U.shape
    dt = U.dtype
    cd = zs.shape[0] - 1
    chh = ys.shape[0] - 1
    groups = B * cd * chh
    # Potts without logits (or -Phi given): the message is interpolated straight into the logits
    direct = mode == 1 and not use_compat and (phi or not return_logits)
    Wp = _padded(W)
    n_ch = _chunks(groups)
    k0, nk = _cell_fours(xs)
    # Row buffers, made once per piece. The softmax and pooling buffers are padded to whole
    # vectors: their loops then have no scalar remainder (an exp in scalar code costs as much as
    # a vector of eight).
    row0 = np.empty((C, W), dt)
    row1 = np.empty((C, W), dt)
    logits = np.zeros((C, Wp), dt)
    top = np.zeros(Wp, dt)
    total = np.empty(Wp, dt)
    acc0 = np.empty((C, Wp), dt)
    acc1 = np.empty((C, Wp), dt)
    fin = np.zeros(Wp, dt)  # x - x: 0 for a finite x, NaN for NaN or infinity
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        for g in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            yc = g % chh
            zc = (g // chh) % cd
            b = g // (chh * cd)
            if pool_mode >= 1:
                acc0[:] = 0
            if pool_mode == 2:
                acc1[:] = 0
            for z in range(zs[zc], zs[zc + 1]):
                for y in range(ys[yc], ys[yc + 1]):
                    # the message M of this row (row0), unless interpolated below
                    z0 = zlo[z]
                    z1 = zhi[z]
                    fz = zf[z]
                    y0 = ylo[y]
                    y1 = yhi[y]
                    fy = yf[y]
                    if (mode == 1 and not direct) or mode == 2:
                        _yz_row(m0, b, z0, z1, fz, y0, y1, fy, row0)
                        if mode == 2:
                            _yz_row(m1, b, z0, z1, fz, y0, y1, fy, row1)
                            nr0 = n0[b, 0, z, y]
                            nr1 = n1[b, 0, z, y]
                            for c in range(C):
                                r0 = row0[c]
                                r1 = row1[c]
                                for i in range(W):
                                    r0[i] = r0[i] * (nr0[i] * w0) + r1[i] * (nr1[i] * w1)
                    elif mode == 3:
                        for c in range(C):
                            r0 = row0[c]
                            mr = m0[b, c, z, y]
                            for i in range(W):
                                r0[i] = mr[i]
                    # the logits U - Phi
                    if direct and fz == 0:  # between two rows (images; volumes on a cell's centre plane)
                        for c in range(C):
                            lr = logits[c]
                            ur = U[b, c, z, y]
                            _prefetch_ahead(U, b, c, z, y)
                            r00 = m0[b, c, z0, y0]
                            r01 = m0[b, c, z0, y1]
                            for i in range(W):
                                a = r00[i]
                                lr[i] = ur[i] + (a + fy * (r01[i] - a))
                            _logits_row_done(top, lr, c == 0, W)
                    elif direct:  # between four rows
                        for c in range(C):
                            lr = logits[c]
                            ur = U[b, c, z, y]
                            _prefetch_ahead(U, b, c, z, y)
                            r00 = m0[b, c, z0, y0]
                            r01 = m0[b, c, z0, y1]
                            r10 = m0[b, c, z1, y0]
                            r11 = m0[b, c, z1, y1]
                            for i in range(W):
                                a = r00[i]
                                t0 = a + fy * (r01[i] - a)
                                a1 = r10[i]
                                t1 = a1 + fy * (r11[i] - a1)
                                lr[i] = ur[i] + (t0 + fz * (t1 - t0))
                            _logits_row_done(top, lr, c == 0, W)
                    elif mode == 0:
                        for c in range(C):
                            lr = logits[c]
                            ur = U[b, c, z, y]
                            _prefetch_ahead(U, b, c, z, y)
                            for i in range(W):
                                lr[i] = ur[i]
                            _logits_row_done(top, lr, c == 0, W)
                    elif use_compat:
                        for c in range(C):
                            total[:] = 0
                            for k in range(C):
                                mu = compat[c, k]
                                r0 = row0[k]
                                for i in range(W):
                                    total[i] += mu * r0[i]
                            lr = logits[c]
                            ur = U[b, c, z, y]
                            _prefetch_ahead(U, b, c, z, y)
                            for i in range(W):
                                lr[i] = ur[i] + (-total[i])
                            _logits_row_done(top, lr, c == 0, W)
                    elif return_logits:
                        total[:] = 0
                        for c in range(C):
                            r0 = row0[c]
                            for i in range(W):
                                total[i] += r0[i]
                        for c in range(C):
                            lr = logits[c]
                            ur = U[b, c, z, y]
                            _prefetch_ahead(U, b, c, z, y)
                            r0 = row0[c]
                            for i in range(W):
                                lr[i] = ur[i] + (r0[i] - total[i])
                    else:
                        for c in range(C):
                            lr = logits[c]
                            ur = U[b, c, z, y]
                            _prefetch_ahead(U, b, c, z, y)
                            r0 = row0[c]
                            for i in range(W):
                                lr[i] = ur[i] + r0[i]
                            _logits_row_done(top, lr, c == 0, W)
                    if return_logits:
                        for c in range(C):
                            lr = logits[c]
                            orow = out[b, c, z, y]
                            for i in range(W):
                                v = lr[i]
                                orow[i] = v
                                fin[i] += v - v
                        continue
                    _softmax_rows(logits, top, total)
                    # normalise, store, and pool the result for the next message
                    nr0 = n0[b, 0, z, y] if pool_mode == 2 else total
                    nr1 = n1[b, 0, z, y] if pool_mode == 2 else total
                    for c in range(C):
                        lr = logits[c]
                        ar0 = acc0[c]
                        ar1 = acc1[c]
                        if store:
                            orow = out[b, c, z, y]
                            if pool_mode == 1:
                                for i in range(W):
                                    o = lr[i] * total[i]
                                    orow[i] = o
                                    ar0[i] += o
                                    fin[i] += o - o
                            elif pool_mode == 2:
                                for i in range(W):
                                    o = lr[i] * total[i]
                                    orow[i] = o
                                    ar0[i] += o * nr0[i]
                                    ar1[i] += o * nr1[i]
                                    fin[i] += o - o
                            else:
                                for i in range(W):
                                    o = lr[i] * total[i]
                                    orow[i] = o
                                    fin[i] += o - o
                        elif pool_mode == 1:
                            for i in range(Wp):
                                ar0[i] += lr[i] * total[i]
                        else:
                            for i in range(Wp):
                                o = lr[i] * total[i]
                                ar0[i] += o * nr0[i]
                                ar1[i] += o * nr1[i]
            if pool_mode >= 1 and not return_logits:
                for c in range(C):
                    _reduce_cells(acc0[c], xs, inv[zc, yc], p0[b, c, zc, yc], k0, nk)
                    if pool_mode == 2:
                        _reduce_cells(acc1[c], xs, inv[zc, yc], p1[b, c, zc, yc], k0, nk)
        _restore(mode_fp)
    flag = fin[0]
    for i in range(Wp):
        flag += fin[i]
    checks[part] = flag


# -- one whole iteration: message and update in one call ----------------------------------------
#: Rows of cells per block of :func:`iterate`: its message rows are made once per block, plus the
#: one or two beyond it that the next block makes again (about 6 % more message work at 16).
ITERATE_BLOCK = 16


@numba.njit(**_PIECES)
def iterate(kernels, offsets, q, U, xlo, xhi, xf, ylo, yhi, yf, ys, xs, inv, p0, store, out, checks, keep, m,
            part, parts):
    """One mean-field iteration on images, fused: the message of the pooled ``q`` (as
    :func:`message`, upsampled along x), then the update (as :func:`update` with ``mode`` 1,
    Potts, ``pool_mode`` 1: the message interpolated straight into the logits, the result
    pooled into ``p0``; ``store``: also written into ``out``, with ``checks`` as there).
    ``keep``: the message is also written into ``m`` (B, C, 1, h, w) (each block its own rows).

    Each piece makes, block by block, the message rows its own rows of pixels read, while they
    are in the cache, so that no message is written whole and read back; the values are those
    of :func:`message` (the same sums in the same order). ``kernels`` (B, K, 1, h * w) (rows
    flattened, zero where the neighbour lies outside the grid); ``q``, ``p0`` (B, C, 1, h, w);
    ``U``, ``out`` (B, C, 1, H, W); taps along x and y, cells ``ys``, ``xs`` and ``inv`` as in
    :func:`update`.
    """
    B, C, _, H, W = U.shape
    w = q.shape[4]
    K = offsets.shape[0]
    dt = U.dtype
    ry = 0
    rx = 0
    for o in range(K):
        ry = max(ry, abs(offsets[o, 1]))
        rx = max(rx, abs(offsets[o, 2]))
    chh = ys.shape[0] - 1
    blocks = (chh + ITERATE_BLOCK - 1) // ITERATE_BLOCK
    most = 1  # the most message rows a block reads
    for blk in range(blocks):
        ya = ys[blk * ITERATE_BLOCK]
        yb = ys[min(chh, (blk + 1) * ITERATE_BLOCK)]
        most = max(most, np.int64(yhi[yb - 1]) - np.int64(ylo[ya]) + 1)
    span = (most + 2 * ry) * w + 2 * rx
    groups = B * blocks
    n_ch = _chunks(groups)
    i0, n4 = _fours(xlo, xhi, xf)
    k0, nk = _cell_fours(xs)
    Wp = _padded(W)
    near = np.zeros(span, dt)
    macc = np.empty(most * w, dt)
    mup = np.empty((C, most, W), dt)
    logits = np.zeros((C, Wp), dt)
    top = np.zeros(Wp, dt)
    total = np.empty(Wp, dt)
    acc0 = np.empty((C, Wp), dt)
    fin = np.zeros(Wp, dt)
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        for g in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            blk = g % blocks
            b = g // blocks
            yc_a = blk * ITERATE_BLOCK
            yc_b = min(chh, yc_a + ITERATE_BLOCK)
            r0 = np.int64(ylo[ys[yc_a]])
            r1 = np.int64(yhi[ys[yc_b] - 1])
            R = r1 - r0 + 1
            n = R * w
            # the message rows r0 .. r1 of every class, upsampled along x
            for c in range(C):
                a = macc[:n]
                _message_rows(kernels, offsets, q, b, c, 0, r0, r1 + 1, 0, ry, rx, span, near, a)
                if keep:  # the block's own rows (its rows of cells lie within r0 .. r1)
                    for yc in range(yc_a, yc_b):
                        m[b, c, 0, yc] = a[(yc - r0) * w:(yc - r0 + 1) * w]
                for r in range(R):  # (the merged kernel's message has weight 1)
                    _upsample_row_fours(a[r * w:(r + 1) * w], xlo, xhi, xf, mup[c, r], i0, n4)
            # the update of the block's rows of pixels
            for yc in range(yc_a, yc_b):
                acc0[:] = 0
                for y in range(ys[yc], ys[yc + 1]):
                    fy = yf[y]
                    y0 = np.int64(ylo[y]) - r0
                    y1 = np.int64(yhi[y]) - r0
                    for c in range(C):
                        lr = logits[c]
                        ur = U[b, c, 0, y]
                        _prefetch_ahead(U, b, c, 0, y)
                        r00 = mup[c, y0]
                        r01 = mup[c, y1]
                        for i in range(W):
                            av = r00[i]
                            lr[i] = ur[i] + (av + fy * (r01[i] - av))
                        _logits_row_done(top, lr, c == 0, W)
                    _softmax_rows(logits, top, total)
                    for c in range(C):
                        lr = logits[c]
                        ar0 = acc0[c]
                        if store:
                            orow = out[b, c, 0, y]
                            for i in range(W):
                                qv = lr[i] * total[i]
                                orow[i] = qv
                                ar0[i] += qv
                                fin[i] += qv - qv
                        else:
                            for i in range(Wp):
                                ar0[i] += lr[i] * total[i]
                for c in range(C):
                    _reduce_cells(acc0[c], xs, inv[0, yc], p0[b, c, 0, yc], k0, nk)
        _restore(mode_fp)
    flag = fin[0]
    for i in range(Wp):
        flag += fin[i]
    checks[part] = flag


# -- backward ----------------------------------------------------------------------------------------
@numba.njit(inline="always", **_SERIAL)
def _pool_transpose_row_fours(r, b, cz, cy, xs, k0, n4, G):
    """``G[c, x] = r[b, c, cz, cy, cell(x)]`` from the cells ``xs``, the run of :func:`_cell_fours`
    ``(k0, n4)`` four pixels at a time (no gathers)."""
    C = G.shape[0]
    w = xs.shape[0] - 1
    for c in range(C):
        rr = r[b, c, cz, cy]
        gr = G[c]
        for k in range(k0):
            v = rr[k]
            for i in range(xs[k], xs[k + 1]):
                gr[i] = v
        run = gr[xs[k0]:xs[k0] + 4 * n4]
        src = rr[k0:k0 + n4]
        for j in range(n4):
            v = src[j]
            run[4 * j] = v
            run[4 * j + 1] = v
            run[4 * j + 2] = v
            run[4 * j + 3] = v
        for k in range(k0 + n4, w):
            v = rr[k]
            for i in range(xs[k], xs[k + 1]):
                gr[i] = v


@numba.njit(**_CONTRACT)
def _softmax_dot_rows(logits, top, total, G, dot):
    """:func:`_softmax_rows`, and ``dot = sum_c q G`` per column of the (C, W) row buffers in the
    same pass (``q = logits * total`` afterwards): ``dot = total * sum_c exp(...) G``. Where that
    sum overflows (``|G|`` near the dtype's largest value over C) though ``sum_c q G`` may not,
    the row's ``dot`` is taken again from ``q``, as NumPy takes it."""
    C, W = logits.shape
    one = logits.dtype.type(1)
    total[:] = 0
    dot[:] = 0
    for c in range(C):
        lr = logits[c]
        gr = G[c]
        if logits.itemsize == 4:
            for i in range(W):
                e = _expf(lr[i] - top[i])
                lr[i] = e
                total[i] += e
                dot[i] += e * gr[i]
        else:
            for i in range(W):
                e = math.exp(lr[i] - top[i])
                lr[i] = e
                total[i] += e
                dot[i] += e * gr[i]
    spread = logits.dtype.type(0)  # inf or NaN where a dot is not finite
    for i in range(W):
        t = one / total[i]
        total[i] = t
        d = dot[i] * t
        dot[i] = d
        spread += d - d
    if spread != 0:  # (NaN too)
        dot[:] = 0
        for c in range(C):
            lr = logits[c]
            gr = G[c]
            for i in range(W):
                dot[i] += (lr[i] * total[i]) * gr[i]


@numba.njit(**_PIECES)
def pool_transpose(r, zcell, ycell, xs, out, part, parts):
    """``out[b, c, z, y, x] = r[b, c, cell(z), cell(y), cell(x)]``: the transpose of pooling for
    ``r`` (B, C, d, h, w) already divided by each cell's pixel count (cells ``zcell``, ``ycell``
    of each pixel, ``xs`` first pixel of each cell along x); ``out`` (B, C, D, H, W)."""
    B, C, D, H, W = out.shape
    groups = B * D * H
    n_ch = _chunks(groups)
    k0, nk = _cell_fours(xs)
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        for g in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            y = g % H
            z = (g // H) % D
            b = g // (H * D)
            _pool_transpose_row_fours(r, b, zcell[z], ycell[y], xs, k0, nk, out[b, :, z, y])


@numba.njit(**_PIECES)
def softmax_backward(q, g, r0, r1, n0, n1, gn0, gn1, mode, accumulate, write, zcell, ycell, xs, out, add, sums,
                     part, parts):
    """``out = q * (G - sum_c q G)``, the vjp of the softmax given its output ``q``.

    ``mode`` 0: ``G = g`` (B, C, D, H, W); 1: ``G = Pool^T(r0)``; 2: ``G = n0 Pool^T(r0) +
    n1 Pool^T(r1)`` with coarse ``r`` (B, C, d, h, w) already divided by each cell's pixel count,
    so that ``Pool^T(r)[p] = r[cell(p)]`` (cells ``zcell``, ``ycell`` of each pixel, ``xs`` first
    pixel of each cell along x). ``accumulate`` (mode 2): ``gn_k += sum_c q Pool^T(r_k)``; ``write`` False
    skips ``out`` (only the accumulation). ``add``: ``out`` is also added to ``sums``.
    """
    B, C, D, H, W = q.shape
    dt = q.dtype
    groups = B * D * H
    n_ch = _chunks(groups)
    k0, nk = _cell_fours(xs)
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        G = np.empty((C, W), dt)
        P1 = np.empty((C, W), dt)
        dot = np.empty(W, dt)
        s0 = np.empty(W, dt)
        s1 = np.empty(W, dt)
        for g_ in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            y = g_ % H
            z = (g_ // H) % D
            b = g_ // (H * D)
            if mode == 0:
                for c in range(C):
                    gr = G[c]
                    src = g[b, c, z, y]
                    _prefetch_ahead(g, b, c, z, y)
                    for i in range(W):
                        gr[i] = src[i]
            else:
                cz = zcell[z]
                cy = ycell[y]
                _pool_transpose_row_fours(r0, b, cz, cy, xs, k0, nk, G)
                if mode == 2:
                    _pool_transpose_row_fours(r1, b, cz, cy, xs, k0, nk, P1)
                    if accumulate:
                        s0[:] = 0
                        s1[:] = 0
                        for c in range(C):
                            qr = q[b, c, z, y]
                            gr = G[c]
                            pr = P1[c]
                            for i in range(W):
                                s0[i] += qr[i] * gr[i]
                                s1[i] += qr[i] * pr[i]
                        a0 = gn0[b, 0, z, y]
                        a1 = gn1[b, 0, z, y]
                        for i in range(W):
                            a0[i] += s0[i]
                            a1[i] += s1[i]
                    nr0 = n0[b, 0, z, y]
                    nr1 = n1[b, 0, z, y]
                    for c in range(C):
                        gr = G[c]
                        pr = P1[c]
                        for i in range(W):
                            gr[i] = nr0[i] * gr[i] + nr1[i] * pr[i]
            if not write:
                continue
            dot[:] = 0
            for c in range(C):
                qr = q[b, c, z, y]
                gr = G[c]
                _prefetch_ahead(q, b, c, z, y)
                for i in range(W):
                    dot[i] += qr[i] * gr[i]
            for c in range(C):
                qr = q[b, c, z, y]
                gr = G[c]
                orow = out[b, c, z, y]
                if add:
                    trow = sums[b, c, z, y]
                    _prefetch_ahead(sums, b, c, z, y)
                    for i in range(W):
                        v = qr[i] * (gr[i] - dot[i])
                        orow[i] = v
                        trow[i] += v
                else:
                    for i in range(W):
                        orow[i] = qr[i] * (gr[i] - dot[i])
        _restore(mode_fp)


@numba.njit(**_PIECES)
def softmax_backward_reduced(q, g, lstart, yf, xlo, xhi, xf, out, below, above, part, parts):
    """:func:`softmax_backward` with ``G = g`` (``mode`` 0, the same ``out`` bit for bit) on images,
    and in the same pass the transposed upsampling of ``out``, split by the rows it goes to as in
    :func:`softmax_backward_made_again` (``reduce``): ``below[b, c, 0, l]`` and ``above[b, c, 0, l]``
    over the rows ``lstart[l] .. lstart[l + 1] - 1`` (those whose lower tap along y is ``l``)."""
    B, C, _, _, W = q.shape
    h = lstart.shape[0] - 1
    dt = q.dtype
    groups = B * h
    n_ch = _chunks(groups)
    i0, n4 = _fours(xlo, xhi, xf)
    one = dt.type(1)
    dot = np.empty(W, dt)
    acc_lo = np.empty((C, W), dt)
    acc_hi = np.empty((C, W), dt)
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        for g_ in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            l = g_ % h
            b = g_ // h
            acc_lo[:] = 0
            acc_hi[:] = 0
            for y in range(lstart[l], lstart[l + 1]):
                fy = yf[y]
                glo = one - fy
                dot[:] = 0
                for c in range(C):
                    qr = q[b, c, 0, y]
                    gr = g[b, c, 0, y]
                    _prefetch_ahead(q, b, c, 0, y)
                    _prefetch_ahead(g, b, c, 0, y)
                    for i in range(W):
                        dot[i] += qr[i] * gr[i]
                for c in range(C):
                    qr = q[b, c, 0, y]
                    gr = g[b, c, 0, y]
                    orow = out[b, c, 0, y]
                    alo = acc_lo[c]
                    ahi = acc_hi[c]
                    for i in range(W):
                        v = qr[i] * (gr[i] - dot[i])
                        orow[i] = v
                        alo[i] += glo * v
                        ahi[i] += fy * v
            for c in range(C):
                _reduce_row_fours(acc_lo[c], xlo, xhi, xf, below[b, c, 0, l], i0, n4)
                _reduce_row_fours(acc_hi[c], xlo, xhi, xf, above[b, c, 0, l], i0, n4)
        _restore(mode_fp)


@numba.njit(**_PIECES)
def softmax_backward_made_again(U, m, use_message, zlo, zhi, zf, ylo, yhi, yf, xlo, xhi, xf,
                                lstart, r0, zcell, ycell, xs, out, add, sums,
                                reduce, below, above, final, checks, dots, part, parts):
    """``out = q * (G - sum_c q G)`` (:func:`softmax_backward`) with ``q`` made again row by row,
    as :func:`update` made it: ``softmax(U + Up(m))`` (``use_message``; coarse ``m``
    (B, C, d, h, w): the message for Potts, ``-compat @ m`` otherwise), else ``softmax(U)``; the
    same operations in the same order, so the same ``q`` bit for bit. ``G = Pool^T(r0)`` (coarse
    ``r0`` already divided by the cells' pixel counts; cells ``zcell``, ``ycell`` of each pixel,
    ``xs`` first pixel of each cell along x). ``add``: the result is also added to ``sums``.

    Rows are taken by groups with one lower message row: ``lstart[l] .. lstart[l + 1] - 1``
    are the rows with ``ylo == l``, whose message rows are upsampled along x once per group.
    ``reduce`` (images; with ``add``): ``out`` is not written; instead the result's transposed
    upsampling, split by the rows it goes to: ``below[b, c, z, l]`` gets ``Up_x^T sum (1 - fy)
    out`` and ``above[b, c, z, l]`` ``Up_x^T sum fy out`` over the group's rows
    (:func:`_reduce_row_fours`), so that ``Up^T(out)[l] = below[l] + above[l - 1]`` (and
    ``+ above[h - 1]`` on the last row).
    ``final`` (with ``add``: the last addition to ``sums``): each piece writes 0 into
    ``checks[part]`` when every value of ``sums`` it finished is finite, else NaN, and each
    chunk of rows ``sum(sums * U)`` (products in the dtype, sums in float64) into ``dots[chunk]``;
    with ``reduce`` the result is then only added to ``sums`` (``below``, ``above`` untouched).
    """
    B, C, D, H, W = U.shape
    h = lstart.shape[0] - 1
    dt = U.dtype
    groups = B * D * h
    n_ch = _chunks(groups)
    Wp = _padded(W)
    i0, n4 = _fours(xlo, xhi, xf)
    k0, nk = _cell_fours(xs)
    up = np.empty((4, C, W), dt)
    row0 = np.empty((C, W), dt)
    logits = np.zeros((C, Wp), dt)
    top = np.zeros(Wp, dt)
    total = np.empty(Wp, dt)
    G = np.zeros((C, Wp), dt)  # (padding 0: the softmax pass reads whole vectors)
    dot = np.empty(Wp, dt)
    acc_lo = np.empty((C, W), dt)
    acc_hi = np.empty((C, W), dt)
    one = dt.type(1)
    fin = np.zeros(W, dt)
    dacc = np.zeros(W, np.float64)
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        dacc[:] = 0
        g_z = -1  # the cell whose G is in G
        g_y = -1
        g_b = -1
        for g_ in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            l = g_ % h
            z = (g_ // h) % D
            b = g_ // (h * D)
            y_a = lstart[l]
            y_b = lstart[l + 1]
            if use_message and y_b > y_a:
                z0 = zlo[z]
                z1 = zhi[z]
                l1 = yhi[y_a]
                for c in range(C):
                    _upsample_row_fours(m[b, c, z0, l], xlo, xhi, xf, up[0, c], i0, n4)
                    _upsample_row_fours(m[b, c, z0, l1], xlo, xhi, xf, up[1, c], i0, n4)
                    if zf[z] != 0:
                        _upsample_row_fours(m[b, c, z1, l], xlo, xhi, xf, up[2, c], i0, n4)
                        _upsample_row_fours(m[b, c, z1, l1], xlo, xhi, xf, up[3, c], i0, n4)
            if reduce and not final:
                acc_lo[:] = 0
                acc_hi[:] = 0
            for y in range(y_a, y_b):
                fy = yf[y]
                glo = one - fy
                # q of this row: the logits, their maximum, exp and sum, as in update (between
                # two message rows: interpolated straight into the logits)
                direct = use_message and zf[z] == 0
                if use_message and not direct:
                    for c in range(C):
                        _lerp_row(up[0, c], up[1, c], up[2, c], up[3, c], zf[z], fy, row0[c])
                for c in range(C):
                    lr = logits[c]
                    ur = U[b, c, z, y]
                    _prefetch_ahead(U, b, c, z, y)
                    if add:
                        _prefetch_ahead(sums, b, c, z, y)
                    if direct:
                        r00 = up[0, c]
                        r01 = up[1, c]
                        for i in range(W):
                            av = r00[i]
                            lr[i] = ur[i] + (av + fy * (r01[i] - av))
                    elif not use_message:
                        for i in range(W):
                            lr[i] = ur[i]
                    else:
                        rc = row0[c]
                        for i in range(W):
                            lr[i] = ur[i] + rc[i]
                    _logits_row_done(top, lr, c == 0, W)
                # G of this row (rows of one cell share it), then the softmax and sum_c q G
                # in one pass; q = e * total as update makes it (lr keeps e)
                if zcell[z] != g_z or ycell[y] != g_y or b != g_b:
                    g_z = zcell[z]
                    g_y = ycell[y]
                    g_b = b
                    _pool_transpose_row_fours(r0, b, g_z, g_y, xs, k0, nk, G)
                _softmax_dot_rows(logits, top, total, G, dot)
                for c in range(C):
                    lr = logits[c]
                    gr = G[c]
                    if reduce and final:  # (the result itself is not read: sums only)
                        trow = sums[b, c, z, y]
                        for i in range(W):
                            trow[i] += (lr[i] * total[i]) * (gr[i] - dot[i])
                    elif reduce:
                        trow = sums[b, c, z, y]
                        alo = acc_lo[c]
                        ahi = acc_hi[c]
                        for i in range(W):
                            v = (lr[i] * total[i]) * (gr[i] - dot[i])
                            trow[i] += v
                            alo[i] += glo * v
                            ahi[i] += fy * v
                    elif add:
                        orow = out[b, c, z, y]
                        trow = sums[b, c, z, y]
                        for i in range(W):
                            v = (lr[i] * total[i]) * (gr[i] - dot[i])
                            orow[i] = v
                            trow[i] += v
                    else:
                        orow = out[b, c, z, y]
                        for i in range(W):
                            orow[i] = (lr[i] * total[i]) * (gr[i] - dot[i])
                if final:  # the finished sums of this row, while they are in the cache
                    for c in range(C):
                        trow = sums[b, c, z, y]
                        ur = U[b, c, z, y]
                        for i in range(W):
                            t = trow[i]
                            fin[i] += t - t
                            dacc[i] += np.float64(t * ur[i])
            if reduce and not final:  # the group's rows transposed-upsampled along x
                for c in range(C):
                    _reduce_row_fours(acc_lo[c], xlo, xhi, xf, below[b, c, z, l], i0, n4)
                    _reduce_row_fours(acc_hi[c], xlo, xhi, xf, above[b, c, z, l], i0, n4)
        if final:
            total_dot = 0.0
            for i in range(W):
                total_dot += dacc[i]
            dots[ch] = total_dot
        _restore(mode_fp)
    if final:
        flag = fin[0]
        for i in range(W):
            flag += fin[i]
        checks[part] = flag


@numba.njit(**_PIECES)
def upsample_backward(x, s0, s1, nscale, zst, zct, zw, yst, yct, yw, xst, xct, xw, out0, out1, part, parts):
    """Transposed bilinear upsampling: ``out_k = Up^T(x * s_k)`` (``nscale`` 0: ``out0 = Up^T(x)``).

    Cell ``c`` of an axis gathers pixels ``st[c] .. st[c] + ct[c] - 1`` with weights
    ``wt[c, p - st[c]]`` (the bilinear taps, transposed). ``x`` (B, C, D, H, W); ``out``
    (B, C, d, h, w).
    """
    B, C, D, H, W = x.shape
    d, h, w = out0.shape[2], out0.shape[3], out0.shape[4]
    dt = x.dtype
    groups = B * d * h
    n_ch = _chunks(groups)
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        t0 = np.empty((C, W), dt)
        t1 = np.empty((C, W), dt)
        for g in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            yc = g % h
            zc = (g // h) % d
            b = g // (h * d)
            t0[:] = 0
            t1[:] = 0
            for i in range(zct[zc]):
                z = zst[zc] + i
                for j in range(yct[yc]):
                    y = yst[yc] + j
                    wgt = zw[zc, i] * yw[yc, j]
                    if nscale == 0:
                        for c in range(C):
                            tr = t0[c]
                            xr = x[b, c, z, y]
                            for p in range(W):
                                tr[p] += wgt * xr[p]
                    else:
                        sr0 = s0[b, 0, z, y]
                        sr1 = s1[b, 0, z, y]
                        for c in range(C):
                            tr0 = t0[c]
                            xr = x[b, c, z, y]
                            for p in range(W):
                                tr0[p] += (wgt * xr[p]) * sr0[p]
                            if nscale == 2:
                                tr1 = t1[c]
                                for p in range(W):
                                    tr1[p] += (wgt * xr[p]) * sr1[p]
            for c in range(C):
                o0 = out0[b, c, zc, yc]
                o1 = out1[b, c, zc, yc] if nscale == 2 else o0
                for xc in range(w):
                    n = xct[xc]
                    wr = xw[xc]
                    seg0 = t0[c, xst[xc]:xst[xc] + n]
                    a0 = dt.type(0)
                    for k in range(n):
                        a0 += wr[k] * seg0[k]
                    o0[xc] = a0
                    if nscale == 2:
                        seg1 = t1[c, xst[xc]:xst[xc] + n]
                        a1 = dt.type(0)
                        for k in range(n):
                            a1 += wr[k] * seg1[k]
                        o1[xc] = a1
        _restore(mode_fp)


@numba.njit(**_PIECES)
def upsampled_dot(a, x0, x1, zlo, zhi, zf, ylo, yhi, yf, gn0, gn1, part, parts):
    """``gn_k[b, 0, p] += sum_c a[b, c, p] * Up(x_k)[b, c, p]``; ``x_k`` upsampled along x (:func:`upsample_x`)."""
    B, C, D, H, W = a.shape
    dt = a.dtype
    groups = B * D * H
    n_ch = _chunks(groups)
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        row = np.empty((C, W), dt)
        s = np.empty(W, dt)
        for g in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            y = g % H
            z = (g // H) % D
            b = g // (H * D)
            for k in range(2):
                xk = x0 if k == 0 else x1
                gn = gn0[b, 0, z, y] if k == 0 else gn1[b, 0, z, y]
                _yz_row(xk, b, zlo[z], zhi[z], zf[z], ylo[y], yhi[y], yf[y], row)
                s[:] = 0
                for c in range(C):
                    ar = a[b, c, z, y]
                    rr = row[c]
                    for i in range(W):
                        s[i] += ar[i] * rr[i]
                for i in range(W):
                    gn[i] += s[i]
        _restore(mode_fp)


@numba.njit(**dict(_PIECES, fastmath={"reassoc"}))
def class_products(a, m, weight, out, part, parts):
    """``out[c, k] -= weight * sum_{b, i} a[b, c, i] * m[b, k, i]`` (products in the compute dtype,
    sums in float64); ``a``, ``m`` (B, C, N), ``out`` (C, C) float64. Parallel over the pairs of
    ``c`` and a group of four ``k`` (or one, past the last four), so that the pieces get even
    shares; the sums may be reassociated (vectorised), which changes nothing between runs or
    thread counts."""
    B, C, N = a.shape
    k4 = C // 4 * 4
    kgroups = k4 // 4 + (C - k4)
    units = C * kgroups
    for u in range(part * units // parts, (part + 1) * units // parts):
        mode_fp = _flush_denormals()
        c = u // kgroups
        kg = u % kgroups
        if kg < k4 // 4:  # four classes per pass over a[b, c]
            k = 4 * kg
            t0 = 0.0
            t1 = 0.0
            t2 = 0.0
            t3 = 0.0
            for b in range(B):
                ar = a[b, c]
                m0 = m[b, k]
                m1 = m[b, k + 1]
                m2 = m[b, k + 2]
                m3 = m[b, k + 3]
                s0 = 0.0
                s1 = 0.0
                s2 = 0.0
                s3 = 0.0
                for i in range(N):
                    v = ar[i]
                    s0 += np.float64(v * m0[i])
                    s1 += np.float64(v * m1[i])
                    s2 += np.float64(v * m2[i])
                    s3 += np.float64(v * m3[i])
                t0 += s0
                t1 += s1
                t2 += s2
                t3 += s3
            out[c, k] -= weight * t0
            out[c, k + 1] -= weight * t1
            out[c, k + 2] -= weight * t2
            out[c, k + 3] -= weight * t3
        else:
            k = k4 + kg - k4 // 4
            total = 0.0
            for b in range(B):
                ar = a[b, c]
                mr = m[b, k]
                row_sum = 0.0
                for i in range(N):
                    row_sum += np.float64(ar[i] * mr[i])
                total += row_sum
            out[c, k] -= weight * total
        _restore(mode_fp)


@numba.njit(**dict(_PIECES, fastmath={"reassoc"}))
def row_dots(a, b, out, part, parts):
    """``out[r] = sum_i a[r, i] * b[r, i]`` (products in the dtype of ``a``, sums in float64) for
    (R, L) arrays; each row's sum may be reassociated (vectorised), the same on every run."""
    R = a.shape[0]
    for r in range(part * R // parts, (part + 1) * R // parts):
        mode_fp = _flush_denormals()
        ar = a[r]
        br = b[r]
        total = 0.0
        for i in range(ar.shape[0]):
            total += np.float64(ar[i] * br[i])
        out[r] = total
        _restore(mode_fp)


# -- class products of a compatibility matrix (coarse arrays) ---------------------------------------
@numba.njit(**_PIECES)
def mix_classes(mu, x, out, part, parts):
    """``out[b, c] = sum_k mu[c, k] * x[b, k]`` for (B, C, N) arrays, ``mu`` (C, C) in their dtype.

    (NumPy's matmul would hand this to BLAS, whose threads keep spinning after the call and
    take the cores from the next kernel for milliseconds.)"""
    B, C, N = x.shape
    groups = B * C
    for gi in range(part * groups // parts, (part + 1) * groups // parts):
        c = gi % C
        b = gi // C
        o = out[b, c]
        o[:] = 0
        for k in range(C):
            w = mu[c, k]
            xr = x[b, k]
            for i in range(N):
                o[i] += w * xr[i]


# -- the training loss -----------------------------------------------------------------------------
@numba.njit(**_PIECES)
def tempered_cross_entropy(logits, labels, weights, use_weights, ignore, inv_tau, scale, grad, partial, part, parts):
    """The cross-entropy of ``softmax(logits * inv_tau)`` against ``labels`` and its gradient, in
    one pass per row (as :func:`cucrf._learning.objective.cross_entropy` computes them).

    ``logits``, ``grad`` (B, C, D, H, W); ``labels`` (B, D, H, W) int64, each in ``0 .. C - 1`` or
    ``ignore`` (weight 0); ``weights`` (C,) per-class weights (``use_weights``, else 1). Writes
    ``grad = (softmax - onehot) * w * scale`` and, per chunk of rows, float64 sums into
    ``partial[chunk]``: ``sum w log q(label)`` and ``sum (softmax - onehot) * w * logits * inv_tau``.
    """
    B, C, D, H, W = logits.shape
    dt = logits.dtype
    groups = B * D * H
    n_ch = partial.shape[0]
    Wp = _padded(W)
    sv = np.empty((C, W), dt)
    e = np.zeros((C, Wp), dt)
    top = np.zeros(Wp, dt)
    total = np.empty(Wp, dt)
    wv = np.empty(W, dt)
    lab = np.empty(W, np.int64)
    one = dt.type(1)
    zero = dt.type(0)
    acc_loss = np.empty(W, np.float64)
    acc_tau = np.empty(W, np.float64)
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        acc_loss[:] = 0
        acc_tau[:] = 0
        for g in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            y = g % H
            z = (g // H) % D
            b = g // (H * D)
            lr_ = labels[b, z, y]
            for i in range(W):
                k = lr_[i]
                valid = k != ignore
                lab[i] = k if valid else 0
                if not valid:
                    wv[i] = zero
                elif use_weights:
                    wv[i] = weights[k]
                else:
                    wv[i] = one
            for c in range(C):
                src = logits[b, c, z, y]
                s_row = sv[c]
                er = e[c]
                for i in range(W):
                    v = src[i] * inv_tau
                    s_row[i] = v
                    er[i] = v
                _logits_row_done(top, er, c == 0, W)
            _softmax_rows(e, top, total)  # e = exp(scaled - top), total = 1 / sum
            for i in range(W):
                picked = (sv[lab[i], i] - top[i]) + math.log(total[i])
                acc_loss[i] += np.float64(wv[i]) * np.float64(picked)
            for c in range(C):
                er = e[c]
                s_row = sv[c]
                grow = grad[b, c, z, y]
                for i in range(W):
                    d = er[i] * total[i] - (one if lab[i] == c else zero)
                    d = d * wv[i]
                    grow[i] = d * scale
                    acc_tau[i] += np.float64(d) * np.float64(s_row[i])
        loss_sum = 0.0
        tau_sum = 0.0
        for i in range(W):
            loss_sum += acc_loss[i]
            tau_sum += acc_tau[i]
        partial[ch, 0] = loss_sum
        partial[ch, 1] = tau_sum
        _restore(mode_fp)


# -- kernel parameter gradients --------------------------------------------------------------------
@numba.njit(inline="always", **_SERIAL)
def _pair_terms(scaled, feats, b, z, y, zz, yy, x0, dx, n, pz, py, px, ia2, ig2, app, smo, d2s, col):
    """Appearance and smoothness kernels and squared distances of the pairs (i, i + offset) of a row
    segment, as :func:`cucrf._numpy_backend._offset_kernels` computes them."""
    F = scaled.shape[1]
    dt = scaled.dtype
    dzy = (pz[zz] - pz[z]) ** 2 + (py[yy] - py[y]) ** 2
    pc = px[x0:x0 + n]
    pn = px[x0 + dx:x0 + dx + n]
    col[:n] = 0
    for f in range(F):
        cen = scaled[b, f, z, y, x0:x0 + n]
        nbr = scaled[b, f, zz, yy, x0 + dx:x0 + dx + n]
        for i in range(n):
            diff = nbr[i] - cen[i]
            col[i] += diff * diff
    for i in range(n):
        d2 = dzy + (pn[i] - pc[i]) ** 2
        d2s[i] = d2
        app[i] = dt.type(-0.5) * (col[i] + dt.type(d2 * ia2))
    _exp_any(app[:n])
    _smoothness_row(d2s, ig2, smo, n)


#: Rows of cells per block of :func:`pair_products` (one pass per offset and four classes each).
PAIR_ROWS = 8


@numba.njit(**_PIECES)
def pair_products(offsets, left, right, add, out, part, parts):
    """``out[b, o, z, y, x] = sum_c left[b, c, z, y, x] * right[b, c, (z, y, x) + offset_o]``, 0
    where the neighbour lies outside the grid (``add``: added to ``out``, whose entries without a
    neighbour hold 0, as a call without ``add`` leaves them): the pair products of
    :func:`kernel_gradients`, made once (each pair is read there twice, as a centre's and as a
    neighbour's).

    Blocks of :data:`PAIR_ROWS` rows of cells are taken as one flat run per offset (the
    neighbour of flat index ``p`` is ``p + shift``), so that the inner loops are long; the
    entries whose neighbour wraps to another row, or lies outside the grid, are set to 0
    afterwards. Each entry's sum is that of four classes at a time, in class order.
    """
    B, C, d, h, w = left.shape
    K = offsets.shape[0]
    rows = d * h
    n = rows * w
    lf = left.reshape(B, C, n)
    rf = right.reshape(B, C, n)
    of = out.reshape(B, K, n)
    blocks = (rows + PAIR_ROWS - 1) // PAIR_ROWS
    groups = B * blocks
    n_ch = _chunks(groups)
    c4 = C // 4 * 4
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        for g in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            blk = g % blocks
            b = g // blocks
            row_a = blk * PAIR_ROWS
            row_b = min(rows, row_a + PAIR_ROWS)
            lo = row_a * w
            hi = row_b * w
            for o in range(K):
                dz = offsets[o, 0]
                dy = offsets[o, 1]
                dx = offsets[o, 2]
                shift = (dz * h + dy) * w + dx
                ob = of[b, o]
                if not add:
                    ob[lo:hi] = 0
                p0 = max(lo, -shift)
                p1 = min(hi, n - shift)
                if p1 > p0:
                    seg = ob[p0:p1]
                    for c in range(0, c4, 4):  # four classes per pass over the sums
                        l0 = lf[b, c, p0:p1]
                        l1 = lf[b, c + 1, p0:p1]
                        l2 = lf[b, c + 2, p0:p1]
                        l3 = lf[b, c + 3, p0:p1]
                        r0 = rf[b, c, p0 + shift:p1 + shift]
                        r1 = rf[b, c + 1, p0 + shift:p1 + shift]
                        r2 = rf[b, c + 2, p0 + shift:p1 + shift]
                        r3 = rf[b, c + 3, p0 + shift:p1 + shift]
                        for i in range(p1 - p0):
                            seg[i] += (l0[i] * r0[i] + l1[i] * r1[i]) + (l2[i] * r2[i] + l3[i] * r3[i])
                    for c in range(c4, C):
                        lr = lf[b, c, p0:p1]
                        rn = rf[b, c, p0 + shift:p1 + shift]
                        for i in range(p1 - p0):
                            seg[i] += lr[i] * rn[i]
                # entries whose neighbour is not the one the flat run read: 0
                x0 = max(0, -dx)
                x1 = min(w, w - dx)
                for r in range(row_a, row_b):
                    zz = r // h + dz
                    yy = r % h + dy
                    row = ob[r * w:(r + 1) * w]
                    if zz < 0 or zz >= d or yy < 0 or yy >= h or x1 <= x0:
                        row[:] = 0
                        continue
                    row[:x0] = 0
                    row[x1:] = 0
        _restore(mode_fp)


@numba.njit(**dict(_PIECES, fastmath={"reassoc"}))
def kernel_gradients(scaled, feats, ib, ib2, ibf, pz, py, px, offsets, ia2, ig2, weights, scales, pairs0, pairs1,
                     rows, has_rows, g_feat, partial, part, parts):
    """The vjp of :func:`pairwise_kernels` (as :func:`cucrf._numpy_backend.pairwise_kernels_backward`).

    ``pairs_s`` (B, K, d, h, w): the pair products ``A = sum_c left[c, i] right[c, i + o]`` of
    kernel ``s``'s message gradients and inputs (:func:`pair_products`); ``rows``
    (S, B, 1, d, h, w) the row-sum gradients (``has_rows``). Writes ``g_feat`` (B, F, d, h, w)
    (each cell owns its gradient: the neighbour terms are recomputed from the pair (i - o, i)),
    and per piece of rows the float64 sums ``partial[piece]``: ``pair_dot[s]``, ``weights[s, 0..1]``
    (at ``S + 2 s``), ``inv_theta_alpha2``, ``inv_theta_gamma2`` and ``inv_theta_beta[f]``.
    Compiled with reassociation allowed, so that the float64 sums vectorise (in order, each
    addition would wait for the last): the kernel values it makes again may then differ from the
    forward pass's in the last bit, and the sums' order is the compiler's; nothing changes between
    runs or thread counts (the pieces are fixed).
    """
    B, F, d, h, w = scaled.shape
    K = offsets.shape[0]
    S = weights.shape[0]
    dt = scaled.dtype
    groups = B * d * h
    n_ch = partial.shape[0]
    base = 3 * S
    for ch in range(part * n_ch // parts, (part + 1) * n_ch // parts):
        mode_fp = _flush_denormals()
        app = np.empty(w, dt)
        smo = np.empty(w, dt)
        d2s = np.empty(w, np.float64)
        col = np.empty(w, dt)
        gk = np.empty(w, dt)
        gapp = np.empty(w, dt)
        gsmo = np.empty(w, dt)
        e = np.empty(w, dt)
        acc = partial[ch]
        acc[:] = 0
        for g in range(ch * groups // n_ch, (ch + 1) * groups // n_ch):
            y = g % h
            z = (g // h) % d
            b = g // (h * d)
            for f in range(F):
                g_feat[b, f, z, y, :] = 0
            for role in range(2):
                # role 0: this row's cells are the centres of the pairs (all sums are taken here);
                # role 1: they are the neighbours (only their feature gradient, with a minus sign).
                for o in range(K):
                    if role == 0:
                        cz = z
                        cy = y
                        zz = z + offsets[o, 0]
                        yy = y + offsets[o, 1]
                    else:
                        cz = z - offsets[o, 0]
                        cy = y - offsets[o, 1]
                        zz = z
                        yy = y
                    dx = offsets[o, 2]
                    if cz < 0 or cz >= d or cy < 0 or cy >= h or zz < 0 or zz >= d or yy < 0 or yy >= h:
                        continue
                    x0 = max(0, -dx)
                    x1 = min(w, w - dx)
                    if x1 <= x0:
                        continue
                    n = x1 - x0
                    _pair_terms(scaled, feats, b, cz, cy, zz, yy, x0, dx, n, pz, py, px, ia2, ig2, app, smo, d2s, col)
                    gapp[:n] = 0
                    gsmo[:n] = 0
                    for s in range(S):
                        wa = dt.type(weights[s, 0])
                        ws = dt.type(weights[s, 1])
                        sc = dt.type(scales[s])
                        ar = (pairs0 if s == 0 else pairs1)[b, o, cz, cy, x0:x1]
                        rr = rows[s, b, 0, cz, cy, x0:x1] if has_rows else ar
                        pd = 0.0
                        w0 = 0.0
                        w1 = 0.0
                        for i in range(n):
                            a = ar[i]
                            v = sc * a
                            if has_rows:
                                v = v + rr[i]
                            gk[i] = v
                            if role == 0:
                                pd += np.float64(wa * app[i] + ws * smo[i]) * np.float64(a)
                                w0 += np.float64(v) * np.float64(app[i])
                                w1 += np.float64(v) * np.float64(smo[i])
                            gapp[i] += wa * v
                            gsmo[i] += ws * v
                        if role == 0:
                            acc[s] += pd
                            acc[S + 2 * s] += w0
                            acc[S + 2 * s + 1] += w1
                    for i in range(n):
                        e[i] = gapp[i] * app[i]
                    if role == 0:
                        sa = 0.0
                        sg = 0.0
                        for i in range(n):
                            sa += np.float64(e[i]) * np.float64(dt.type(d2s[i]))
                            sg += np.float64(gsmo[i]) * np.float64(dt.type(smo[i] * d2s[i]))
                        acc[base] += -0.5 * sa
                        acc[base + 1] += -0.5 * sg
                    for f in range(F):
                        cen = feats[b, f, cz, cy, x0:x1]
                        nbr = feats[b, f, zz, yy, x0 + dx:x1 + dx]
                        ibf2 = ib2[f]
                        if role == 0:
                            out = g_feat[b, f, z, y, x0:x1]
                            sb = 0.0
                            for i in range(n):
                                raw = nbr[i] - cen[i]
                                sb += np.float64(e[i]) * np.float64(raw * raw)
                                out[i] += e[i] * raw * ibf2
                            acc[base + 2 + f] += -sb * ibf[f]
                        else:
                            out = g_feat[b, f, z, y, x0 + dx:x1 + dx]
                            for i in range(n):
                                raw = nbr[i] - cen[i]
                                out[i] -= e[i] * raw * ibf2
        _restore(mode_fp)


def cache_dir_hint():
    return os.environ.get("NUMBA_CACHE_DIR")
