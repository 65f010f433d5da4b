"""The package's shape as rules: which folder may import which, how many modules the top
level holds, how long a function may run, and that the layout page names every module.
A new import arrow that breaks a rule fails here, with the file and the arrow."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cifar_exp"
LAYOUT_PAGE = ROOT / "docs" / "layout.md"

# The top level: the commands users type, and the shared vocabulary every folder may use.
COMMANDS = {"run", "evaluate", "predict", "report", "bench"}
# `data` is a command too (python -m cifar_exp.data --download), and the library that
# reads the data sets: the folders below import it as the library.
VOCABULARY = {"config", "errors", "registry", "speed", "world", "data", "checksums",
              "quick_exit", "callables", "sweep_values"}
PARTS = {"models", "optim", "schedules", "augment"}  # one file per part, by name
MAX_TOP_LEVEL_MODULES = 16

# Which units (a folder, or a top-level module) each unit may import, besides itself, the
# vocabulary and the parts. Dependencies point one way: commands -> job -> training ->
# parts; tracking and serving beside them; tools off the training path.
MAY_IMPORT: dict[str, set[str]] = {
    "vocabulary": set(),
    "parts": set(),
    "training": set(),  # no job, tracking, serving, tools, command
    "job": {"training", "tracking"},
    "tracking": {"serving", "job.locks"},  # a model logged packs the served classifier;
    # the store is created under the same file lock as a run folder
    "serving": {"training", "tracking", "job.checkpoint"},  # reads a run's checkpoint
    "tools": {"training", "tracking", "job"},
    "commands": {"training", "job", "tracking", "serving", "tools"},
    "hydra_plugins": {"training", "job", "tracking", "commands"},
}
# Third-party packages a unit must not import: the trainer knows nothing of Hydra or
# MLflow (it logs through a sink), nor the parts; the job knows nothing of Hydra.
MAY_NOT_IMPORT: dict[str, set[str]] = {
    "training": {"hydra", "mlflow"},
    "parts": {"hydra", "mlflow", "omegaconf"},
    "job": {"hydra"},
    "vocabulary": {"mlflow"},
}

MAX_FUNCTION_LINES = 80
MAX_POSITIONAL_PARAMETERS = 6  # before `*`; self and cls not counted


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def plugin_modules() -> list[Path]:
    return sorted((ROOT / "hydra_plugins").rglob("*.py"))


def unit_of(module: str) -> str:
    """The rule unit of a dotted cifar_exp module: its folder's role, or `commands`,
    `vocabulary`, `parts`."""
    parts = module.split(".")
    if parts[0] == "hydra_plugins":
        return "hydra_plugins"
    first = parts[1] if len(parts) > 1 else ""
    if first in COMMANDS:
        return "commands"
    if first in VOCABULARY or first == "":
        return "vocabulary"
    if first in PARTS:
        return "parts"
    return first


def dotted(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    names = list(relative.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, at any depth (imports inside
    functions and under TYPE_CHECKING count too)."""
    found = []
    package = dotted(path).rsplit(".", 1)[0] if path.name != "__init__.py" else dotted(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from cifar_exp import job` imports the module cifar_exp.job
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            found.append((node.lineno, base))
    return found


def allowed(importer_unit: str, imported: str) -> bool:
    unit = unit_of(imported)
    if unit in (importer_unit, "vocabulary", "parts"):
        return True
    granted = MAY_IMPORT[importer_unit]
    return unit in granted or any(imported == g or imported.startswith(f"{g}.")
                                  for g in (f"cifar_exp.{name}" for name in granted
                                            if "." in name))


def project_module(name: str) -> str | None:
    """`name` as a module of the project (a from-import's name may be a function)."""
    if not name.startswith(("cifar_exp", "hydra_plugins")):
        return None
    parts = name.split(".")
    while parts:
        candidate = ROOT.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return None


def test_the_top_level_holds_only_commands_and_vocabulary():
    top = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert len(top) <= MAX_TOP_LEVEL_MODULES, sorted(top)
    assert top <= COMMANDS | VOCABULARY, sorted(top - COMMANDS - VOCABULARY)
    folders = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert folders == PARTS | {"training", "job", "tracking", "serving", "tools"}, folders


def test_every_import_arrow_follows_the_rules():
    broken = []
    for path in [*package_modules(), *plugin_modules()]:
        importer = dotted(path)
        unit = unit_of(importer)
        for line, name in imports_of(path):
            top = name.split(".")[0]
            if top in MAY_NOT_IMPORT.get(unit, ()):
                broken.append(f"{path.relative_to(ROOT)}:{line} ({unit}) imports {name}")
            module = project_module(name)
            if module is None or module == importer:
                continue
            if module.startswith("hydra_plugins") and unit != "hydra_plugins":
                broken.append(f"{path.relative_to(ROOT)}:{line} ({unit}) imports {module}")
            elif module.startswith("cifar_exp") and not allowed(unit, module):
                broken.append(f"{path.relative_to(ROOT)}:{line} ({unit}) imports {module} "
                              f"({unit_of(module)})")
            elif unit == unit_of(module) == "commands":  # each command stands alone
                broken.append(f"{path.relative_to(ROOT)}:{line} imports the command {module}")
    assert not broken, "\n".join(sorted(set(broken)))


def test_the_rules_catch_a_forbidden_arrow():
    assert not allowed("training", "cifar_exp.tracking.runs")
    assert not allowed("training", "cifar_exp.job.checkpoint")
    assert not allowed("job", "cifar_exp.run")
    assert not allowed("training", "cifar_exp.tools.bench")
    assert not allowed("serving", "cifar_exp.job.job")
    assert allowed("serving", "cifar_exp.job.checkpoint")
    assert allowed("job", "cifar_exp.training.loop")
    assert unit_of("cifar_exp.models.tf_cnn") == "parts"


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [node for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


@pytest.mark.parametrize("path", [*package_modules(), *plugin_modules()],
                         ids=lambda path: str(path.relative_to(ROOT)))
def test_functions_stay_short_and_take_few_positional_parameters(path):
    too_long, too_many = [], []
    for function in functions(path):
        lines = function.end_lineno - function.lineno + 1
        if lines > MAX_FUNCTION_LINES:
            too_long.append(f"{function.name} ({lines} lines)")
        arguments = function.args
        positional = [a.arg for a in arguments.posonlyargs + arguments.args
                      if a.arg not in ("self", "cls")]
        if len(positional) > MAX_POSITIONAL_PARAMETERS:
            too_many.append(f"{function.name} ({len(positional)} positional)")
    assert not too_long and not too_many, (too_long, too_many)


def layout_blocks() -> dict[str, list[str]]:
    """The Layout section's code block by folder: each folder's line and the lines indented
    under it (key "" holds the top level's own lines)."""
    text = LAYOUT_PAGE.read_text()
    block = text[text.index("## Layout"):].split("```")[1]
    blocks: dict[str, list[str]] = {"": []}
    folder = ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if indent == 2 and re.match(r"\s+\w+/", line):
            folder = line.split()[0].rstrip("/")
            blocks[folder] = [line]
        elif indent <= 2:
            folder = ""
            blocks[""].append(line)
        else:
            blocks[folder].append(line)
    return blocks


def test_the_layout_page_names_every_module():
    blocks = layout_blocks()
    missing = []
    for path in package_modules():
        relative = path.relative_to(PACKAGE)
        folder = relative.parent.name if relative.parent != Path(".") else ""
        if path.name == "__init__.py":
            if folder and folder not in blocks:
                missing.append(f"{folder}/")
            continue
        # A part is named by its stem on its folder's line; any other module as file.py.
        name = relative.stem if folder in PARTS else f"{relative.stem}.py"
        if not any(re.search(rf"(?<![\w/]){re.escape(name)}\b", line)
                   for line in blocks.get(folder, [])):
            missing.append(str(relative))
    assert not missing, f"not named in {LAYOUT_PAGE.name}'s Layout section: {missing}"



def test_module_paths_that_saved_configs_name_still_load():
    # A run or sweep recorded before the move names the sweep callback by its old path.
    from hydra.utils import get_class

    from cifar_exp import MOVED_MODULES
    from cifar_exp.callables import check_callables
    from cifar_exp.tracking.sweep import SweepTracking

    assert get_class("cifar_exp.sweep.SweepTracking") is SweepTracking
    for old, new in MOVED_MODULES.items():
        assert importlib.import_module(old) is importlib.import_module(new)
        assert importlib.import_module(new).__spec__.name == new
    check_callables(OmegaConf.create(
        {"hydra": {"callbacks": {"sweep": {"_target_": "cifar_exp.sweep.SweepTracking"}}}}))
