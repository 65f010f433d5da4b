"""Registries find builders by name and check their options; installed packages add
builders through entry points (a real distribution on sys.path here, a real pip install in
the slow test)."""

from __future__ import annotations

import shutil
import site
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torch import nn

from cifar_exp.augment import AUGMENTATIONS
from cifar_exp.errors import ConfigError
from cifar_exp.models import MODELS, build_model
from cifar_exp.optim import OPTIMIZERS
from cifar_exp.registry import Registry
from cifar_exp.schedules import SCHEDULES
from tests.conftest import data_env

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "cifar_exp_tiny_model"

Install = Callable[..., None]


def widgets() -> Registry:
    """A registry of one built-in, `square`, whose installed builders are declared in the
    group cifar_exp.widgets (so no real package's entry points can interfere)."""
    registry = Registry("widget", "cifar_exp.models")
    registry._loaded = True  # nothing to import for these tests

    @registry.register("square")
    def square(side: int, scale: int = 1) -> int:
        return side * side * scale

    return registry


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """install(package, module, source, entry_points): a distribution `package` holding
    the module `module` (`source`), declaring `entry_points` ({group: {name: value}}),
    found by importlib.metadata as pip's installs are: a *.dist-info/ folder on sys.path."""
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = []

    def make(package: str, module: str, source: str,
             entry_points: dict[str, dict[str, str]]) -> None:
        (tmp_path / f"{module}.py").write_text(source)
        info = tmp_path / f"{module}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text("".join(
            f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in names.items())
            for group, names in entry_points.items()))
        modules.append(module)

    yield make
    for module in modules:
        sys.modules.pop(module, None)


def test_register_build_and_errors():
    registry = widgets()
    square = registry.get("square")

    assert registry.build("square", 3, scale=2) == 18
    assert registry.names() == ["square"]
    with pytest.raises(ConfigError, match=r"widget 'square' has no option\(s\) \['color'\]; "
                                          r"its options are \['scale'\]"):
        registry.build("square", 3, color="red")
    with pytest.raises(ConfigError, match="unknown widget 'circle'"):
        registry.build("circle", 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("square")(square)


def test_each_kind_reads_its_own_entry_point_group():
    assert [registry.entry_point_group for registry in
            (MODELS, OPTIMIZERS, SCHEDULES, AUGMENTATIONS)] == [
        "cifar_exp.models", "cifar_exp.optimizers", "cifar_exp.schedules",
        "cifar_exp.augmentations"]


def test_an_installed_package_adds_a_builder_imported_only_when_asked_for(install):
    install("shapes", "shapes_cube", "def cube(side, scale=1):\n    return side ** 3 * scale\n",
            {"cifar_exp.widgets": {"cube": "shapes_cube:cube"}})
    registry = widgets()

    assert registry.names() == ["cube", "square"]  # listed from metadata, not imported
    assert registry.build("square", 2) == 4
    assert "shapes_cube" not in sys.modules
    assert registry.build("cube", 2, scale=3) == 24
    assert "shapes_cube" in sys.modules
    with pytest.raises(ConfigError, match=r"widget 'cube' has no option\(s\) \['color'\]"):
        registry.build("cube", 2, color="red")  # its options are checked as a built-in's


def test_a_name_clash_with_a_builtin_is_refused_in_one_line(install):
    install("my-shapes", "my_square", "def square(side):\n    return 0\n",
            {"cifar_exp.widgets": {"square": "my_square:square"}})

    with pytest.raises(ConfigError) as refused:
        widgets().get("square")
    assert str(refused.value) == (
        "widget 'square' is built into cifar_exp and also declared by package my-shapes "
        "(entry point square = my_square:square in cifar_exp.widgets); rename it there")
    assert "my_square" not in sys.modules


def test_two_packages_declaring_one_name_are_refused(install):
    for package in ("left", "right"):
        install(package, f"{package}_cube", "def cube(side):\n    return side ** 3\n",
                {"cifar_exp.widgets": {"cube": f"{package}_cube:cube"}})

    with pytest.raises(ConfigError, match=r"widget 'cube' is declared by package (left|right) "
                                          r".* and by package (left|right) .*; rename it"):
        widgets().get("cube")


def test_a_broken_package_is_said_in_one_line_naming_it(install):
    install("broken-shapes", "broken_cube", "import no_such_module_anywhere\n",
            {"cifar_exp.widgets": {"cube": "broken_cube:cube"}})

    with pytest.raises(ConfigError) as refused:
        widgets().get("cube")
    assert str(refused.value) == (
        "widget 'cube' could not be loaded from package broken-shapes (entry point cube = "
        "broken_cube:cube in cifar_exp.widgets): ModuleNotFoundError: No module named "
        "'no_such_module_anywhere'; `python -c 'import broken_cube'` shows where")
    assert refused.value.__cause__ is None  # a job's refusal prints no traceback of it


def test_an_entry_point_that_is_no_function_is_refused(install):
    install("odd-shapes", "odd_cube", "cube = 3\n",
            {"cifar_exp.widgets": {"cube": "odd_cube:cube"}})

    with pytest.raises(ConfigError, match=r"widget 'cube' from package odd-shapes .* is not "
                                          r"a builder function"):
        widgets().get("cube")


def test_the_model_registry_builds_an_installed_model(install, monkeypatch):
    install("tiny-nets", "tiny_nets", "from torch import nn\n\ndef build(num_classes, "
            "image_size, hidden=8):\n    return nn.Linear(hidden, num_classes)\n",
            {"cifar_exp.models": {"tiny_net": "tiny_nets:build"}})
    monkeypatch.setattr(MODELS, "_declared", None)  # read the installed packages again
    monkeypatch.setattr(MODELS, "_installed", {})

    model = build_model("tiny_net", 10, 32, hidden=4)
    assert isinstance(model, nn.Linear) and (model.in_features, model.out_features) == (4, 10)


def make_venv(folder: Path) -> Path:
    """A virtual environment in `folder` that sees this one's packages, cifar_exp's editable
    install included, and installs into itself; its python. `--system-site-packages` would
    give the base interpreter's packages, not those of a venv the tests run in: a .pth
    file adds this environment's site folders (and runs their own .pth files) instead."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], check=True, capture_output=True, text=True)
    (Path(purelib.stdout.strip()) / "current_environment.pth").write_text(
        "".join(f"import site; site.addsitedir({site_folder!r})\n"
                for site_folder in site.getsitepackages()))
    return python


@pytest.mark.slow
def test_the_example_package_installed_for_real_trains_by_name(tmp_path, data_root):
    python = make_venv(tmp_path / "venv")
    # pip builds a local folder in place (build/, *.egg-info/): build a copy.
    source = shutil.copytree(EXAMPLE, tmp_path / "example", ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    # Offline: setuptools (to build it) and its dependencies come from this environment.
    pip = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                          "--no-index", "--quiet", "--disable-pip-version-check", str(source)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr

    store = tmp_path / "mlflow.db"
    run = subprocess.run(
        [python, "-m", "cifar_exp.run", "model=tiny_mlp", "model.hidden=32", "steps=2",
         "log_every=1", "eval_images=100", "tracking.log_model=false",
         f"tracking.uri=sqlite:///{store}"],
        cwd=tmp_path, env=data_env(data_root), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "(tiny_mlp-adam-2)" in run.stderr + run.stdout
    with sqlite3.connect(store) as db:
        params = dict(db.execute("SELECT key, value FROM params WHERE key LIKE 'model.%'"))
    assert params == {"model.name": "tiny_mlp", "model.hidden": "32"}  # its YAML's keys
