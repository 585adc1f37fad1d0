"""The result scripts write where they are told, and never into the repository unless told."""

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_results_writes_its_report_into_out_dir_by_default(tmp_path, monkeypatch):
    make_results = load_script("make_results")
    monkeypatch.chdir(REPO)  # as 'python scripts/make_results.py DATA OUT' from the repository
    args = make_results.parse_args(["data", str(tmp_path / "out")])
    assert Path(args.output) == tmp_path / "out" / "results.md"
    assert not Path(args.output).resolve().is_relative_to(REPO)
    # the repository's page only when named, with either spelling of the option
    for option in ("--output", "--doc"):
        args = make_results.parse_args(["data", str(tmp_path / "out"), option, "docs/results.md"])
        assert args.output == "docs/results.md"
    with pytest.raises(SystemExit):
        make_results.parse_args(["data", str(tmp_path / "out"), "--output", str(tmp_path / "r.txt")])


def test_evaluate_fit_writes_into_a_temporary_folder_by_default(tmp_path, monkeypatch):
    evaluate_fit = load_script("evaluate_fit")
    monkeypatch.chdir(tmp_path)
    _, args = evaluate_fit.parse_args(["data"])
    out = Path(args.output)
    assert out.name == "fit-eval.json" and out.parent.is_dir() and not os.listdir(out.parent)
    assert out.parent.resolve() != tmp_path.resolve() and not out.resolve().is_relative_to(REPO)
    assert not (tmp_path / "fit-eval.json").exists()
    out.parent.rmdir()
    for option in ("--output", "--out"):
        _, args = evaluate_fit.parse_args(["data", option, str(tmp_path / "rows.json")])
        assert args.output == str(tmp_path / "rows.json")
