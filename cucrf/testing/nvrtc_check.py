"""Compile the package's CUDA kernels as CuPy would, without a GPU, and check ptxas' report.

Usage::

    python -m cucrf.testing.nvrtc_check [--arch sm_80 --arch sm_90] [FILE.cu ...]

Each file (default: every ``*.cu`` of package ``cucrf.kernels``) is compiled
through CuPy's NVRTC binding with the option list ``cupy.RawModule`` builds
(``assemble_cupy_compiler_options``, ``-ftz=true``, ``-arch=sm_XX``,
``--device-as-default-execution-space``) plus ``-Xptxas=-v``, once per
specialisation from ``cucrf._cuda.specialisations()`` (``{file name: [(options,
name_expressions), ...]}``) and per architecture.  Exit status is non-zero on
a compile error, a register spill or any stack frame use.  The option list
relies on CuPy internals: the pin below must match the installed CuPy.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

CUPY_PIN = "14.2."
DEFAULT_ARCHS = ("sm_80", "sm_90")


class SetupError(RuntimeError):
    """CuPy/NVRTC missing or a CuPy version the option list was not checked against."""


@dataclass
class KernelReport:
    """ptxas' resource report for one function (entry or non-inlined device function)."""

    name: str
    registers: int = -1
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0

    @property
    def ok(self) -> bool:
        return self.stack == 0 and self.spill_stores == 0 and self.spill_loads == 0


@dataclass
class CompileResult:
    file: str
    arch: str
    options: tuple
    name_expressions: tuple
    error: str | None = None
    kernels: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        # No entry function means nothing was checked (templates need name expressions).
        return self.error is None and bool(self.kernels) and all(k.ok for k in self.kernels)


def _nvrtc():
    try:
        import cupy
        from cupy._core import core
        from cupy_backends.cuda.libs import nvrtc
    except Exception as e:  # ImportError, or CUDA libraries missing
        raise SetupError(f"cannot import CuPy's NVRTC binding: {e}") from e
    if not cupy.__version__.startswith(CUPY_PIN):
        raise SetupError(f"nvrtc_check mirrors CuPy {CUPY_PIN}x's compile options, found CuPy "
                         f"{cupy.__version__}; re-check cupy/cuda/compiler.py and update CUPY_PIN")
    try:
        nvrtc.getVersion()
    except Exception as e:
        raise SetupError(f"NVRTC library not loadable ({e}); pip install nvidia-cuda-nvrtc") from e
    return core, nvrtc


def cupy_options(options: tuple, arch: str) -> tuple:
    """The option tuple ``cupy.RawModule(code=..., options=options)`` hands to NVRTC."""
    core, _ = _nvrtc()
    opts = core.assemble_cupy_compiler_options(tuple(options))
    # Order as in cupy.cuda.compiler (_compile_with_cache_cuda, compile_using_nvrtc).
    return opts + ("-ftz=true", f"-arch={arch}", "--device-as-default-execution-space")


def parse_ptxas(log: str) -> list[KernelReport]:
    """Per-function registers, stack frame and spills from a ``-Xptxas=-v`` log."""
    reports: dict[str, KernelReport] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = reports.setdefault(m.group(1), KernelReport(m.group(1)))
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m and current is not None:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
            continue
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = reports.setdefault(m.group(1), KernelReport(m.group(1)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current.registers = int(m.group(1))
    return list(reports.values())


def compile_source(source: str, filename: str, options: tuple = (), name_expressions=(),
                   arch: str = "sm_90") -> CompileResult:
    """Compile ``source`` to a cubin for ``arch``; never needs a device."""
    _, nvrtc = _nvrtc()
    res = CompileResult(filename, arch, tuple(options), tuple(name_expressions))
    opts = cupy_options(tuple(options), arch) + ("-Xptxas=-v",)
    prog = nvrtc.createProgram(source, filename, [], [])
    try:
        for expr in name_expressions:
            nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            res.error = f"{e}\n{nvrtc.getProgramLog(prog)}".strip()
            return res
        log = nvrtc.getProgramLog(prog)
        nvrtc.getCUBIN(prog)  # a cubin, as CuPy loads, must come out
        lowered = {nvrtc.getLoweredName(prog, e): e for e in name_expressions}
        res.kernels = parse_ptxas(log)
        for k in res.kernels:
            k.name = lowered.get(k.name, k.name)
    finally:
        nvrtc.destroyProgram(prog)
    return res


def _package_kernels() -> list[Path]:
    import importlib.resources
    root = importlib.resources.files("cucrf.kernels")
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".cu"))


def _specialisations() -> dict:
    try:
        from cucrf._cuda import specialisations
    except ImportError:
        return {}
    return specialisations()


def check(files, archs=DEFAULT_ARCHS, specs=None) -> list[CompileResult]:
    """Compile every (file, specialisation, arch); see the module docstring."""
    specs = _specialisations() if specs is None else specs
    results = []
    for path in map(Path, files):
        source = path.read_text()
        for options, exprs in specs.get(path.name) or [((), [])]:
            for arch in archs:
                results.append(compile_source(source, path.name, tuple(options), tuple(exprs), arch))
    return results


def format_table(results: list[CompileResult]) -> str:
    rows = [("file", "arch", "kernel", "regs", "stack", "spill st", "spill ld", "status")]
    for r in results:
        spec = " ".join(r.options)
        if r.error is not None:
            rows.append((r.file, r.arch, spec or "-", "", "", "", "", "COMPILE ERROR"))
            continue
        if not r.kernels:
            rows.append((r.file, r.arch, spec or "-", "", "", "", "",
                         "FAIL: no kernel (template kernels need specialisations)"))
        for k in r.kernels:
            rows.append((r.file, r.arch, k.name + (f" [{spec}]" if spec else ""), str(k.registers),
                         str(k.stack), str(k.spill_stores), str(k.spill_loads),
                         "ok" if k.ok else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    errors = [f"\n{r.file} ({r.arch}, options {r.options}, names {r.name_expressions}):\n{r.error}"
              for r in results if r.error is not None]
    return "\n".join(lines + errors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cucrf.testing.nvrtc_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help=".cu files (default: cucrf/kernels/*.cu)")
    ap.add_argument("--arch", action="append", help="e.g. sm_90 (repeatable; default sm_80 sm_90)")
    a = ap.parse_args(argv)
    try:
        files = a.files or _package_kernels()
        if not files:
            print("nvrtc_check: no .cu files found", file=sys.stderr)
            return 2
        results = check(files, tuple(a.arch or DEFAULT_ARCHS))
    except SetupError as e:
        print(f"nvrtc_check: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} compilations clean"
          + ("" if not bad else " -- FAILED (compile error, spill or stack frame > 0)"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
