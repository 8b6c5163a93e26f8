"""Install like a user: the wheel carries the recipes, suites and concept specs, and the documented
paths (recipes/…, eval/…, prompts/…) find them from any folder."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO


def test_the_package_data_lists_every_shipped_file_and_the_checkout_links_to_them():
    from erasure.shipped import FOLDERS, shipped

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    listed = {p for pattern in patterns["erasure.shipped"] for p in shipped().glob(pattern)}
    assert listed == set(shipped().rglob("*.yaml"))
    for folder in FOLDERS:
        assert (REPO / folder).is_symlink() and (REPO / folder).resolve() == shipped(folder).resolve()


def test_documented_paths_resolve_to_the_shipped_copies_from_any_folder(tmp_path, monkeypatch):
    from erasure.config import read_recipe
    from erasure.errors import RecipeError, SpecError, SuiteError
    from erasure.eval.suite import load_suite
    from erasure.prompts.spec import load_spec
    from erasure.shipped import shipped

    monkeypatch.chdir(tmp_path)
    assert read_recipe("recipes/tiny/rgd.yaml")["method"] == "rgd"
    assert read_recipe("recipes/world/triangle/graddiff.yaml")["method"] == "graddiff"  # include: ../striped/…
    assert load_suite("eval/micro-striped.yaml")["file"] == str(shipped("eval", "micro-striped.yaml"))
    assert load_spec("prompts/world-striped.yaml").concept == "striped"

    # A user's recipe includes a shipped one by its documented path.
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"include": "recipes/tiny/rgd.yaml", "max_steps": 2}))
    mine = read_recipe("mine.yaml")
    assert mine["method"] == "rgd" and mine["max_steps"] == 2

    # A file that exists where the user points wins over the shipped copy.
    local = tmp_path / "recipes" / "tiny" / "rgd.yaml"
    local.parent.mkdir(parents=True)
    local.write_text(yaml.safe_dump({"method": "graddiff"}))
    assert read_recipe("recipes/tiny/rgd.yaml")["method"] == "graddiff"

    for load, path, error in [(read_recipe, "recipes/tiny/nope.yaml", RecipeError),
                              (load_suite, "eval/nope.yaml", SuiteError),
                              (load_spec, "prompts/nope.yaml", SpecError)]:
        with pytest.raises(error, match=f"'{path}' does not exist"):
            load(path)


def _run(command, **kwargs):
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_the_wheel_installs_and_runs_the_demo_outside_a_checkout(tmp_path):
    from erasure.shipped import shipped

    # Build from the files git would hand a user (tracked, or new and not ignored), in a copy, so
    # no stale build/ of the checkout slips into the wheel and none is left behind.
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
                             "pyproject.toml", "README.md", "erasure"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    source = tmp_path / "source"
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", source, "-w", tmp_path / "wheel"])
    wheel, = (tmp_path / "wheel").glob("erasure-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"erasure/shipped/{p.relative_to(shipped()).as_posix()}" for p in shipped().rglob("*.yaml")} <= names
    assert "erasure/world/micro/unet/diffusion_pytorch_model.safetensors" in names

    # The machine's torch, diffusers, … are reused (no network); the wheel goes into the venv, where it
    # shadows any editable install of the machine, whose finder runs after the venv's site-packages.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv])
    python, erasure = venv / "bin" / "python", venv / "bin" / "erasure"
    _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", wheel])

    away = tmp_path / "away"  # outside the checkout, nothing beside it
    away.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", ERASURE_CACHE=str(tmp_path / "cache"))
    check = _run([python, "-c", "import erasure; from erasure.config import read_recipe; "
                  "from erasure.eval.suite import load_suite; read_recipe('recipes/tiny/rgd.yaml'); "
                  "load_suite('eval/micro-striped.yaml'); print(erasure.__file__)"], cwd=away, env=env)
    assert Path(check.stdout.strip()).resolve().is_relative_to(venv.resolve()), check.stdout

    _run([erasure, "prompts", "build", "prompts/world-striped.yaml", "--out", "pairs"], cwd=away, env=env)
    assert (away / "pairs" / "train.jsonl").stat().st_size > 0
    demo = _run([erasure, "demo", "--steps", "3", "--limit", "8", "--out", "demo"], cwd=away, env=env)
    assert f"shipped at {venv.resolve()}" in demo.stdout or f"shipped at {venv}" in demo.stdout, demo.stdout[:500]
    assert (away / "demo" / "model_index.json").is_file() and (away / "demo" / "erasure.json").is_file()
    assert (away / "demo" / "eval" / "report.md").is_file() and (away / "demo" / "samples.png").is_file()
