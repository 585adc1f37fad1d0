"""The documentation matches the code: docstring examples and every code block of the docs run.

* The examples in the public docstrings run and give what they show (doctest).
* Every fenced code block of README.md and docs/*.md is tagged with its language and
  - ``python``: runs. The blocks of one page run in order in one namespace, in a fresh temporary
    directory (so a block may use what an earlier block of the same page built);
  - ``bash``: runs with ``bash -e`` in that same directory (a pipeline's status is its last
    command's); ``cucrf`` is this interpreter's command line;
  - ``text``: not run (synopses, output, pseudo-code). A synopsis of a ``cucrf`` command is checked
    against that command's ``--help``: every option it names must exist.
  An HTML comment on the line(s) just before a block changes that:
  - ``<!-- skip: REASON -->``: not run (e.g. it needs a GPU or the network);
  - ``<!-- requires: torch, jax -->``: run only when these modules are importable;
  - ``<!-- requires-program: g++ -->``: run only when these programs are on the PATH;
  - ``<!-- signature -->``: a ``python`` block holding one call signature such as
    ``cucrf.infer(unary, image, params=None, *, filter_size=5)``: not run, but compared with
    ``inspect.signature`` of that object (names, order, keyword-only marker, defaults).
* Relative links between the pages point to files that exist.
"""

import ast
import doctest
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

MODULES = ["cucrf", "cucrf._api", "cucrf._params", "cucrf.unary", "cucrf.metrics", "cucrf.palette",
           "cucrf.optim", "cucrf.convcrf", "cucrf._fit", "cucrf.interop"]
OPTIONAL_MODULES = {"cucrf.torch": "torch", "cucrf.jax": "jax"}

RUN_LANGUAGES = ("python", "bash")
LANGUAGES = RUN_LANGUAGES + ("text",)
SHELL_TIMEOUT_S = 120


# -- docstrings ----------------------------------------------------------------------------------

def _doctest(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    _doctest(name)


@pytest.mark.parametrize("name", sorted(OPTIONAL_MODULES))
def test_docstring_examples_of_optional_adapters(name):
    pytest.importorskip(OPTIONAL_MODULES[name])
    _doctest(name)


# -- reading the code blocks of a page -------------------------------------------------------------

@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first line of code (after the opening fence)
    language: str
    code: str
    directives: dict = field(default_factory=dict)

    @property
    def where(self):
        return f"{self.page.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*([\w-]+)\s*(?::\s*(.*?))?\s*-->\s*$")


def read_blocks(page):
    """The fenced code blocks of a Markdown page, with the directives in the comments just before."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, directives, i = [], {}, 0
    while i < len(lines):
        line = lines[i]
        match = _DIRECTIVE.match(line)
        if match:
            directives[match.group(1)] = match.group(2) or ""
            i += 1
            continue
        fence = _FENCE.match(line)
        if not fence:
            if line.strip():
                directives = {}  # a directive belongs to the block right after it
            i += 1
            continue
        indent, marker, language = fence.groups()
        start, i = i + 1, i + 1
        while i < len(lines) and not (lines[i].strip().startswith(marker) and lines[i].strip().strip(marker[0]) == ""):
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{start}: code block never closed")
        body = [text[len(indent):] if text.startswith(indent) else text.lstrip() for text in lines[start:i]]
        blocks.append(Block(page, start + 1, language, "\n".join(body) + "\n", directives))
        directives = {}
        i += 1
    return blocks


def _missing_requirements(block):
    """Why the block cannot run here (missing modules or programs), or None."""
    missing = [name for name in _names(block.directives.get("requires", ""))
               if importlib.util.find_spec(name) is None]
    missing += [name for name in _names(block.directives.get("requires-program", ""))
                if shutil.which(name) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    return None


def _names(text):
    return [name.strip() for name in text.split(",") if name.strip()]


def _page_id(page):
    return str(page.relative_to(ROOT))


# -- running them ----------------------------------------------------------------------------------

def _command_line_shim(folder):
    """A folder holding a ``cucrf`` command that runs this interpreter's ``python -m cucrf``."""
    folder.mkdir()
    shim = folder / "cucrf"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cucrf "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def _run_python(block, namespace):
    # Leading newlines make the line numbers of a traceback those of the Markdown page.
    code = compile("\n" * (block.line - 1) + block.code, str(block.page), "exec")
    exec(code, namespace)


def _run_bash(block, workdir, env):
    # -e without pipefail: `cucrf ... | head -3` ends the producer with SIGPIPE, which is fine.
    result = subprocess.run(["bash", "-e", "-c", block.code], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=SHELL_TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(f"{block.where}: the shell block exited with status {result.returncode}\n"
                    f"{block.code}\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}")


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_code_blocks_run(page, tmp_path, monkeypatch):
    blocks = read_blocks(page)
    untagged = [f"{b.where} ({b.language or 'no language'})" for b in blocks if b.language not in LANGUAGES]
    assert not untagged, (f"code blocks must be tagged {', '.join(LANGUAGES)} (text is not run): "
                          + ", ".join(untagged))

    workdir = tmp_path / "work"
    workdir.mkdir()
    env = dict(os.environ, MPLBACKEND="Agg",
               PATH=f"{_command_line_shim(tmp_path / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": f"docs_{page.stem}"}
    ran, skipped = 0, []
    for block in blocks:
        if block.language not in RUN_LANGUAGES or "signature" in block.directives:
            continue
        reason = block.directives.get("skip") if "skip" in block.directives else _missing_requirements(block)
        if reason is not None:
            skipped.append(f"{block.where}: {reason or 'skip'}")
            continue
        if block.language == "python":
            _run_python(block, namespace)
        else:
            _run_bash(block, workdir, env)
        ran += 1
    if skipped and not ran:
        pytest.skip("; ".join(skipped))


# -- signatures --------------------------------------------------------------------------------------

def _signature_blocks():
    return [b for page in PAGES for b in read_blocks(page) if "signature" in b.directives]


def _resolve(dotted):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(f"cannot import {dotted}")


def _documented_parameters(code):
    """[(name, kind, default expression or None)] of a documented call signature."""
    match = re.fullmatch(r"\s*([\w.]+)\((.*)\)\s*", code, flags=re.DOTALL)
    assert match, f"a signature block holds one signature NAME(ARGS), got:\n{code}"
    tree = ast.parse(f"def _documented({match.group(2)}):\n    pass")
    args = tree.body[0].args
    out = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(positional, defaults):
        out.append((arg.arg, "positional", default))
    if args.vararg:
        out.append((args.vararg.arg, "*args", None))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append((arg.arg, "keyword", default))
    if args.kwarg:
        out.append((args.kwarg.arg, "**kwargs", None))
    return match.group(1), out


_KINDS = {inspect.Parameter.POSITIONAL_ONLY: "positional", inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
          inspect.Parameter.VAR_POSITIONAL: "*args", inspect.Parameter.KEYWORD_ONLY: "keyword",
          inspect.Parameter.VAR_KEYWORD: "**kwargs"}


def _same_default(documented, actual):
    if isinstance(actual, (tuple, list)):
        return isinstance(documented, (tuple, list)) and len(documented) == len(actual) and all(
            _same_default(d, a) for d, a in zip(documented, actual))
    if isinstance(actual, bool) or isinstance(documented, bool) or actual is None or documented is None:
        return documented is actual
    try:
        return bool(documented == actual)
    except Exception:
        return documented is actual


@pytest.mark.parametrize("block", _signature_blocks(), ids=lambda b: b.where)
def test_documented_signatures_match_the_code(block):
    reason = _missing_requirements(block)
    if reason:
        pytest.skip(reason)
    name, documented = _documented_parameters(block.code)
    actual = inspect.signature(_resolve(name)).parameters.values()
    namespace = {"np": np, "numpy": np}
    problems = []
    want = [(p.name, _KINDS[p.kind]) for p in actual]
    have = [(n, k) for n, k, _ in documented]
    if want != have:
        problems.append(f"parameters and kinds differ:\n  documented {have}\n  code       {want}")
    for (pname, _, expression), parameter in zip(documented, actual):
        if pname != parameter.name:
            break
        has_default = parameter.default is not inspect.Parameter.empty
        if expression is None:
            if has_default and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                      inspect.Parameter.VAR_KEYWORD):
                problems.append(f"{pname}: documented without a default, the code has {parameter.default!r}")
            continue
        if not has_default:
            problems.append(f"{pname}: documented default {ast.unparse(expression)}, the code has none")
            continue
        value = eval(compile(ast.Expression(expression), block.where, "eval"), namespace)
        if not _same_default(value, parameter.default):
            problems.append(f"{pname}: documented default {ast.unparse(expression)}, "
                            f"the code has {parameter.default!r}")
    assert not problems, f"{block.where}: {name}\n" + "\n".join(problems)


# -- command-line synopses -----------------------------------------------------------------------------

def _synopses():
    """(block, command, options) for every ``cucrf COMMAND ...`` synopsis in a text block."""
    out = []
    for page in PAGES:
        for block in read_blocks(page):
            if block.language != "text":
                continue
            command = None
            for line in block.code.splitlines():
                start = re.match(r"^cucrf (\w+)", line)
                if start:
                    command = start.group(1)
                    out.append((block, command, set()))
                elif command is None or not line.startswith(" "):
                    command = None
                    continue
                code_part = line.split("(see ")[0]
                out[-1][2].update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?![\w-])", code_part))
    return out


_HELP_CACHE = {}


def _help(command):
    if command not in _HELP_CACHE:
        result = subprocess.run([sys.executable, "-m", "cucrf", command, "--help"], capture_output=True,
                                text=True, timeout=SHELL_TIMEOUT_S)
        assert result.returncode == 0, f"cucrf {command} --help failed:\n{result.stderr}"
        _HELP_CACHE[command] = result.stdout
    return _HELP_CACHE[command]


@pytest.mark.parametrize("block, command, options", _synopses(),
                         ids=[f"{b.where}-{c}" for b, c, _ in _synopses()])
def test_command_line_synopses_name_existing_options(block, command, options):
    text = _help(command)
    known = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?![\w-])", text))
    unknown = sorted(options - known)
    assert not unknown, f"{block.where}: cucrf {command} has no option(s) {', '.join(unknown)}"


# -- indented code blocks --------------------------------------------------------------------------

def indented_code_lines(page):
    """Line numbers of indented (4-space) code blocks: they would escape the checks above."""
    found, in_fence, blank_before, in_list = [], False, True, False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        if _FENCE.match(line):
            in_fence, blank_before = not in_fence, False
            continue
        if in_fence:
            continue
        if not line.strip():
            blank_before = True
            continue
        if re.match(r"^\s*([-*+]|\d+[.)])\s", line):
            in_list = True
        elif not line.startswith(" "):
            in_list = False
        elif blank_before and line.startswith("    ") and not in_list:
            found.append(number)  # inside a list an indented paragraph continues the item
        blank_before = False
    return found


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_no_indented_code_blocks(page):
    lines = indented_code_lines(page)
    assert not lines, (f"{_page_id(page)}: indented code block(s) at line(s) {lines}; fence them "
                       "(```text, or ```python / ```bash to run them)")


# -- links ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_point_to_existing_files(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{_page_id(page)}: links to missing files: {', '.join(broken)}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_wheel_names_carry_the_current_version(page):
    import cucrf

    versions = set(re.findall(r"cucrf-([0-9][^-\s]*)-py3-none-any\.whl", page.read_text(encoding="utf-8")))
    assert versions <= {cucrf.__version__}, (f"{_page_id(page)} names wheels of version(s) {sorted(versions)}; "
                                             f"the version is {cucrf.__version__}")


# -- the reader itself ---------------------------------------------------------------------------------

def test_read_blocks_takes_directives_only_from_the_lines_just_before(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        <!-- skip: needs a GPU -->
        ```python
        x = 1
        ```

        <!-- requires: torch -->
        Some text in between.

        ```bash
        cucrf params
        ```

        * a list item:

          ```text
          cucrf demo --out DIR
          ```
        """))
    skip, bash, text = read_blocks(page)
    assert (skip.language, skip.code, skip.directives, skip.line) == ("python", "x = 1\n", {"skip": "needs a GPU"}, 3)
    assert (bash.language, bash.directives) == ("bash", {})
    assert (text.language, text.code) == ("text", "cucrf demo --out DIR\n")
