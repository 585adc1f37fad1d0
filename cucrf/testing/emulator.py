"""Run CUDA C kernels on the CPU for tests on machines without a GPU.

The unchanged ``.cu`` source is compiled with g++ through ``cuda_shim.h`` and
loaded with ctypes.  Each CUDA thread of a block runs as its own fibre, so
``__syncthreads`` and warp shuffles behave like rendezvous points; blocks run
one after another.  Shared memory is filled with NaN bytes (0xFF) before every
block, so a read that a missing barrier leaves unsynchronised shows up as NaN.
Threads (and blocks) run in forward or reverse order; a missing barrier in a
reduction is usually wrong in only one of the two orders.

The API mirrors CuPy's ``RawModule`` closely enough for launch code to use it
unchanged, with NumPy arrays standing in for device arrays::

    mod = EmulatedModule(code, options=("-DN=4",), name_expressions=("k<float>",))
    mod.get_function("k<float>")((blocks,), (threads,), (x, y, np.int32(n)))

Arguments are passed as CuPy passes them (Python ``int`` -> 64-bit,
``float`` -> double, ``bool`` -> 1 byte, NumPy scalars by their own size) and
read by the kernel as CUDA reads its parameter buffer, so a Python ``float``
given to a ``float`` parameter yields garbage here as on the device.

Run ``python emulator.py --asan-worker DIR`` only through :class:`EmulatedModule`
(``asan=True`` launches run in such a subprocess under AddressSanitizer).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["EmulatedModule", "EmulatedFunction", "EmulatorError", "EmulatorCompileError",
           "asan_available"]

_SHIM = Path(__file__).resolve().with_name("cuda_shim.h")
_MAX_DYN_SMEM = 227 * 1024          # opt-in limit of sm_80/sm_90 (bytes per block)
_DEFAULT_DYN_SMEM = 48 * 1024       # limit without cudaFuncAttributeMaxDynamicSharedMemorySize
_ERRLEN = 2048
_LAUNCH_LOCK = threading.Lock()     # kernel modules keep launch state in globals
_LOADED: dict[str, ctypes.CDLL] = {}
_RUNTIME_ERRORS = {"TypeError": TypeError, "ValueError": ValueError, "OverflowError": OverflowError}


class EmulatorError(RuntimeError):
    """A kernel misbehaved under the emulator (deadlock, bad shuffle, ASan report...)."""


class EmulatorCompileError(EmulatorError):
    """g++ rejected the kernel source."""


def _cache_dir() -> Path:
    root = os.environ.get("CUEMU_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"cucrf-emulator-{os.getuid()}")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cxx() -> str:
    return os.environ.get("CXX", "g++")


@functools.lru_cache(maxsize=None)
def _cxx_version() -> str:
    return subprocess.run([_cxx(), "--version"], capture_output=True, text=True).stdout


@functools.lru_cache(maxsize=None)
def _asan_preload() -> str | None:
    """``LD_PRELOAD`` value for an ASan subprocess, or None without libasan."""
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        try:
            out = subprocess.run([_cxx(), f"-print-file-name={name}"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        if not os.path.isabs(out) or not os.path.exists(out):
            return None
        libs.append(out)
    return " ".join(libs)


def asan_available() -> bool:
    """Whether ``asan=True`` can work here (g++ finds libasan and libstdc++)."""
    return _asan_preload() is not None


# ------------------------------------------------------------------ source parsing
def _strip_comments(code: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", " ", code, flags=re.S)


def _parse_source(code: str) -> tuple[list[str], set[str]]:
    """Return (names of non-template kernels, names of ``extern __shared__`` arrays)."""
    text = re.sub(r"__launch_bounds__\s*\([^)]*\)", " ", _strip_comments(code))
    kernels = []
    for m in re.finditer(r"\b__global__\b([^;{(]*?)\b(\w+)\s*\(", text):
        head = re.split(r"[;{}]", text[:m.start()])[-1]
        if not re.search(r"\btemplate\b", head + m.group(1)) and m.group(2) not in kernels:
            kernels.append(m.group(2))
    shared = set(re.findall(r"\bextern\s+__shared__\b[^;\[]*?\b(\w+)\s*\[\s*\]", text))
    return kernels, shared


def _split_options(options: Sequence[str]) -> list[str]:
    """Keep -D/-U/-I/-std for g++; NVRTC-only flags (-arch, -use_fast_math...) are ignored."""
    flags, std = [], "c++17"
    opts = list(options)
    i = 0
    while i < len(opts):
        o = str(opts[i])
        if o in ("-D", "-U", "-I") and i + 1 < len(opts):
            flags.append(o + str(opts[i + 1]))
            i += 1
        elif o[:2] in ("-D", "-U", "-I"):
            flags.append(o)
        elif o.startswith("--define-macro="):
            flags.append("-D" + o.split("=", 1)[1])
        elif o.startswith("--include-path="):
            flags.append("-I" + o.split("=", 1)[1])
        elif re.fullmatch(r"--?std=c\+\+\d+", o):
            std = o.split("=", 1)[1]
        i += 1
    return [f"-std={std}"] + flags


# ------------------------------------------------------------------ building
def _wrappers(entries: Sequence[str]) -> str:
    out = ["\n// ---- generated by cucrf.testing.emulator"]
    for i, expr in enumerate(entries):
        out.append(
            f"static void cuemu_thunk_{i}(void** p) {{ ::cuemu::invoke(&{expr}, p); }}\n"
            f"CUEMU_EXPORT int cuemu_launch_{i}(const long long* c, void** p, char* e, int n)"
            f" {{ return ::cuemu::launch(c, &cuemu_thunk_{i}, p, e, n); }}\n"
            f"CUEMU_EXPORT void cuemu_meta_{i}(long long* out) {{ ::cuemu::meta(&{expr}, out); }}")
    out.append("CUEMU_EXPORT long long cuemu_static_smem() { return ::cuemu::static_shared_bytes(); }")
    return "\n".join(out) + "\n"


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log = "\n".join((proc.stderr or proc.stdout).splitlines()[:80])
        raise EmulatorCompileError(f"{what} failed (exit {proc.returncode}):\n  {' '.join(cmd)}\n{log}")
    return proc.stdout


def _build(code: str, flags: list[str], entries: list[str], shared_names: set[str],
           asan: bool) -> Path:
    """Compile (or reuse from the cache) the shared object for one module."""
    opt = os.environ.get("CUEMU_OPT", "-O1")
    cflags = [opt, "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-w",
              "-fno-extern-tls-init",  # shared memory never has dynamic initialisation
              "-Werror=return-type", *flags]
    if asan:
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
    key = hashlib.sha256(json.dumps(
        [_SHIM.read_text(), code, cflags, entries, sorted(shared_names), _cxx_version()]
    ).encode()).hexdigest()[:24]
    cache = _cache_dir()
    so = cache / f"{key}{'-asan' if asan else ''}.so"
    if so.exists():
        return so
    build = Path(tempfile.mkdtemp(prefix=f"build-{key}-", dir=cache))
    try:
        (build / "kernel.cu").write_text(code)
        (build / "tu.cpp").write_text(f'#include "{_SHIM}"\n#include "kernel.cu"\n' + _wrappers(entries))
        _run([_cxx(), *cflags, "-c", str(build / "tu.cpp"), "-o", str(build / "tu.o")],
             "g++ (kernel source through cuda_shim.h)")
        # `extern __shared__ T a[]` declares a TLS symbol; alias every such symbol
        # to the one dynamic shared memory buffer.  nm gives the exact symbol.
        raw = _run(["nm", "-u", "-p", "-P", str(build / "tu.o")], "nm").splitlines()
        dem = _run(["nm", "-u", "-p", "-P", "-C", str(build / "tu.o")], "nm").splitlines()
        aliases = []
        for r, d in zip(raw, dem):
            sym, kind = r.split()[:2]
            name = d.rstrip().rsplit(" ", 1)[0]  # posix format: "name type" when undefined
            if kind == "U" and name.split("::")[-1] in shared_names:
                aliases.append(sym)
        lines = ['#define H __attribute__((visibility("hidden")))',
                 f"alignas(256) H thread_local unsigned char cuemu_dyn[{_MAX_DYN_SMEM}] asm(\"cuemu_dyn_smem\");"]
        lines += [f'extern H thread_local unsigned char cuemu_alias_{i}[{_MAX_DYN_SMEM}] asm("{s}") '
                  f'__attribute__((alias("cuemu_dyn_smem")));' for i, s in enumerate(aliases)]
        (build / "dyn.cpp").write_text("\n".join(lines) + "\n")
        tmp = build / "module.so"
        _run([_cxx(), *cflags, "-shared", str(build / "tu.o"), str(build / "dyn.cpp"), "-o",
              str(tmp), "-Wl,--no-undefined", "-ldl"], "g++ (link)")
        os.replace(tmp, so)  # atomic: parallel test workers may build the same module
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return so


def _load(so: Path) -> ctypes.CDLL:
    lib = _LOADED.get(str(so))
    if lib is None:
        lib = _LOADED[str(so)] = ctypes.CDLL(str(so))
    return lib


# ------------------------------------------------------------------ arguments
def _pack_arg(i: int, arg, size: int, is_ptr: bool, kernel: str) -> bytes:
    """Bytes of one parameter as CuPy would place them; pointers for arrays."""
    where = f"argument {i} of kernel {kernel!r}"
    if isinstance(arg, np.ndarray):
        if not is_ptr:
            raise TypeError(f"{where}: parameter is a {size}-byte value, received an array")
        if not arg.flags.c_contiguous:
            raise ValueError(f"{where}: array must be C-contiguous (shape {arg.shape}, "
                             f"strides {arg.strides})")
        if not arg.flags.writeable:
            raise ValueError(f"{where}: array is read-only; the kernel may write to it")
        return struct.pack("<Q", arg.ctypes.data)
    if is_ptr:
        raise TypeError(f"{where}: parameter is a pointer, received {type(arg).__name__} "
                        "(pass a C-contiguous NumPy array)")
    if isinstance(arg, (bool, np.bool_)):
        return struct.pack("<?", bool(arg))
    if isinstance(arg, int):
        if not -2**63 <= arg < 2**63:
            raise OverflowError(f"{where}: Python int {arg} does not fit in 64 bits")
        return struct.pack("<q", arg)
    if isinstance(arg, float):
        return struct.pack("<d", arg)
    if isinstance(arg, complex):
        return struct.pack("<dd", arg.real, arg.imag)
    if isinstance(arg, np.generic):
        return arg.tobytes()
    raise TypeError(f"{where}: unsupported type {type(arg).__name__}")


def _param_buffers(args: Sequence, meta: list[tuple[int, bool]], kernel: str, pointers=None):
    if len(args) != len(meta):
        raise TypeError(f"kernel {kernel!r} takes {len(meta)} parameters, received {len(args)} "
                        "arguments")
    bufs = []
    for i, (arg, (size, is_ptr)) in enumerate(zip(args, meta)):
        raw = _pack_arg(i, arg, size, is_ptr, kernel)
        if pointers is not None and isinstance(arg, np.ndarray):
            raw = struct.pack("<Q", pointers[i])
        # 0xA5 filler: a parameter wider than the value passed reads visible garbage.
        n = max(16, len(raw), size)
        bufs.append(ctypes.create_string_buffer(raw + b"\xa5" * (n - len(raw)), n))
    params = (ctypes.c_void_p * max(1, len(bufs)))(*[ctypes.addressof(b) for b in bufs])
    return bufs, params


def _dims(value, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, received {value!r}")
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    if min(dims) < 1:
        raise ValueError(f"{what} dimensions must be >= 1, received {value!r}")
    return dims


# ------------------------------------------------------------------ public API
class EmulatedModule:
    """CPU stand-in for ``cupy.RawModule(code=..., options=..., name_expressions=...)``.

    Parameters
    ----------
    code : str
        CUDA C source, compiled unchanged through ``cuda_shim.h``.
    options : tuple of str
        NVRTC options; ``-D``/``-U``/``-I``/``--std=`` go to g++, the rest is ignored.
    name_expressions : sequence of str
        Template instantiations to make callable, e.g. ``"message_fwd<7,3,float>"``.
    thread_order : {"forward", "reverse"}
        Order in which threads (and blocks) are scheduled.
    asan : bool
        Build with AddressSanitizer and run each launch in a subprocess, so an
        out-of-bounds access raises :class:`EmulatorError` instead of crashing.
    """

    def __init__(self, code: str, options: tuple[str, ...] = (),
                 name_expressions: Sequence[str] = (), *, thread_order: str = "forward",
                 asan: bool = False):
        if thread_order not in ("forward", "reverse"):
            raise ValueError(f"thread_order must be 'forward' or 'reverse', received {thread_order!r}")
        if asan and not asan_available():
            raise EmulatorError("asan=True needs libasan.so and libstdc++.so from "
                                f"`{_cxx()} -print-file-name=...`; not found")
        self.code, self.options = code, tuple(options)
        self.name_expressions = tuple(name_expressions)
        self.thread_order, self.asan = thread_order, asan
        plain, shared = _parse_source(code)
        self._entries = list(dict.fromkeys([*plain, *self.name_expressions]))
        flags = _split_options(self.options)
        self._so = _build(code, flags, self._entries, shared, asan=False)
        self._asan_so = _build(code, flags, self._entries, shared, asan=True) if asan else None
        self._functions: dict[str, EmulatedFunction] = {}

    def get_function(self, name: str) -> "EmulatedFunction":
        """Return the kernel ``name`` (a kernel name or one of the name expressions)."""
        if name not in self._functions:
            key = {re.sub(r"\s+", "", e): i for i, e in enumerate(self._entries)}
            idx = key.get(re.sub(r"\s+", "", name))
            if idx is None:
                raise KeyError(f"no kernel {name!r} in module; available: {self._entries} "
                               "(template kernels need name_expressions)")
            self._functions[name] = EmulatedFunction(self, name, idx)
        return self._functions[name]


class EmulatedFunction:
    """CPU stand-in for ``cupy.RawKernel``/``Function``; call it like CuPy's.

    Attributes
    ----------
    max_dynamic_shared_size_bytes : int
        As in CuPy: set it to allow more than 48 KiB of dynamic shared memory.
    shared_size_bytes : int
        Static shared memory of the whole module (an upper bound per kernel).
    """

    def __init__(self, module: EmulatedModule, name: str, index: int):
        self.module, self.name, self._index = module, name, index
        self.max_dynamic_shared_size_bytes = 0
        lib = _load(module._so)
        out = (ctypes.c_longlong * 1026)()
        getattr(lib, f"cuemu_meta_{index}")(out)
        self._meta = [(out[1 + 2 * i], bool(out[2 + 2 * i])) for i in range(out[0])]
        with _LAUNCH_LOCK:
            lib.cuemu_static_smem.restype = ctypes.c_longlong
            self.shared_size_bytes = int(lib.cuemu_static_smem())

    @property
    def num_params(self) -> int:
        return len(self._meta)

    def _config(self, grid, block, shared_mem) -> list[int]:
        g, b = _dims(grid, "grid"), _dims(block, "block")
        if b[0] > 1024 or b[1] > 1024 or b[2] > 64 or b[0] * b[1] * b[2] > 1024:
            raise ValueError(f"block {b} exceeds CUDA limits (x, y <= 1024, z <= 64, "
                             f"x*y*z <= 1024 threads)")
        if g[0] > 2**31 - 1 or g[1] > 65535 or g[2] > 65535:
            raise ValueError(f"grid {g} exceeds CUDA limits (x < 2**31, y, z <= 65535)")
        shared_mem = int(shared_mem)
        limit = max(_DEFAULT_DYN_SMEM, int(self.max_dynamic_shared_size_bytes))
        if shared_mem < 0 or shared_mem > limit:
            raise ValueError(f"shared_mem={shared_mem} bytes exceeds the limit of {limit} for "
                             f"kernel {self.name!r} (set max_dynamic_shared_size_bytes to opt in)")
        if shared_mem + self.shared_size_bytes > _MAX_DYN_SMEM:
            raise ValueError(f"dynamic ({shared_mem}) + static ({self.shared_size_bytes}) shared "
                             f"memory exceeds {_MAX_DYN_SMEM} bytes per block")
        return [*g, *b, shared_mem, int(self.module.thread_order == "reverse")]

    def __call__(self, grid, block, args: Sequence, *, shared_mem: int = 0, stream=None,
                 enable_cooperative_groups: bool = False) -> None:
        """Launch: ``grid``/``block`` int or 1-3 tuple; ``args`` a tuple; arrays change in place."""
        cfg = self._config(grid, block, shared_mem)
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"args must be a tuple, received {type(args).__name__}")
        if self.module.asan:
            _param_buffers(args, self._meta, self.name)  # validate before spawning
            return _launch_asan(self, cfg, list(args))
        bufs, params = _param_buffers(args, self._meta, self.name)
        _launch(_load(self.module._so), self._index, cfg, params, self.name)


def _launch(lib: ctypes.CDLL, index: int, cfg: list[int], params, name: str) -> None:
    err = ctypes.create_string_buffer(_ERRLEN)
    c = (ctypes.c_longlong * 8)(*cfg)
    with _LAUNCH_LOCK:
        rc = getattr(lib, f"cuemu_launch_{index}")(c, params, err, _ERRLEN)
    if rc != 0:
        raise EmulatorError(f"kernel {name!r}: {err.value.decode(errors='replace')}")


# ------------------------------------------------------------------ AddressSanitizer
def _launch_asan(fn: EmulatedFunction, cfg: list[int], args: list) -> None:
    """Run one launch in a subprocess with libasan preloaded; copy arrays back."""
    with tempfile.TemporaryDirectory(prefix="cuemu-asan-") as d:
        spec_args = []
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                np.save(os.path.join(d, f"a{i}.npy"), a, allow_pickle=False)
                spec_args.append({"kind": "array"})
            elif isinstance(a, np.generic):
                spec_args.append({"kind": "np", "dtype": a.dtype.str, "hex": a.tobytes().hex()})
            else:
                spec_args.append({"kind": "py", "type": type(a).__name__,
                                  "value": [a.real, a.imag] if isinstance(a, complex) else a})
        spec = {"so": str(fn.module._asan_so), "index": fn._index, "name": fn.name, "cfg": cfg,
                "meta": fn._meta, "args": spec_args}
        Path(d, "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ, LD_PRELOAD=_asan_preload(),
                   ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:allow_user_poisoning=1:"
                                "detect_stack_use_after_return=0")
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--asan-worker", d],
                              env=env, capture_output=True, text=True, timeout=600)
        errfile = Path(d, "error.json")
        if proc.returncode != 0:
            if "AddressSanitizer" in proc.stderr:
                lines = proc.stderr.splitlines()
                start = next((i for i, l in enumerate(lines) if "ERROR: AddressSanitizer" in l), 0)
                end = next((i for i in range(start, len(lines)) if "Shadow bytes" in lines[i]),
                           start + 30)
                report = "\n".join(lines[start:min(end, start + 30)])
                raise EmulatorError(f"kernel {fn.name!r}: AddressSanitizer reported an invalid "
                                    f"memory access:\n{report}")
            if errfile.exists():
                info = json.loads(errfile.read_text())
                raise _RUNTIME_ERRORS.get(info["type"], EmulatorError)(info["message"])
            raise EmulatorError(f"kernel {fn.name!r}: ASan worker exited with {proc.returncode}:\n"
                                f"{proc.stderr[-4000:]}")
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                a[...] = np.load(os.path.join(d, f"a{i}.npy"), allow_pickle=False)


def _asan_worker(d: str) -> int:
    spec = json.loads(Path(d, "spec.json").read_text())
    libc = ctypes.CDLL(None)  # malloc/free resolve to ASan's (preloaded) allocator
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    args, ptrs = [], {}
    for i, a in enumerate(spec["args"]):
        if a["kind"] == "array":
            arr = np.load(os.path.join(d, f"a{i}.npy"), allow_pickle=False)
            # Exactly-sized heap buffer: ASan redzones start right after the last element.
            ptrs[i] = libc.malloc(arr.nbytes)
            ctypes.memmove(ptrs[i], arr.ctypes.data, arr.nbytes)
            args.append(arr)
        elif a["kind"] == "np":
            args.append(np.frombuffer(bytes.fromhex(a["hex"]), dtype=np.dtype(a["dtype"]))[0])
        else:
            v = a["value"]
            args.append({"int": int, "float": float, "bool": bool}.get(a["type"], lambda x: x)(v)
                        if a["type"] != "complex" else complex(*v))
    try:
        lib = ctypes.CDLL(spec["so"])
        meta = [tuple(m) for m in spec["meta"]]
        bufs, params = _param_buffers(args, meta, spec["name"], pointers=ptrs)
        _launch(lib, spec["index"], spec["cfg"], params, spec["name"])
    except Exception as e:  # reported to the parent, which raises it again
        Path(d, "error.json").write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))
        return 3
    for i, p in ptrs.items():
        ctypes.memmove(args[i].ctypes.data, p, args[i].nbytes)
        np.save(os.path.join(d, f"a{i}.npy"), args[i], allow_pickle=False)
        libc.free(p)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--asan-worker":
        sys.exit(_asan_worker(sys.argv[2]))
    sys.exit("usage: emulator.py --asan-worker DIR (internal; use EmulatedModule(asan=True))")
