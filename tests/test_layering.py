"""The files import downwards only (README, "The files, in reading order"): each file may import the project files
listed for it below and no other, so a reader can take them bottom to top and a lower file never loads a
script built on it. Two foundations: lcd.py (the method) stands on packed_model.py (the packed model at
inference), which stands on lcd_kernels.py (the kernels' loaders) alone; model.py (the models) imports no
project file, and checkpoints.py (the world's files) builds its models."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_MODULES = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")} | {"data", "tests", "prepare",
                                                                                       "cuda_emulation"}
MAY_IMPORT = {                      # file -> the project files it may import
    "lcd_kernels": set(),
    "packed_model": {"lcd_kernels"},
    "lcd": {"packed_model"},
    "model": set(),
    "checkpoints": {"model"},
    "configurator": set(),
    "baselines": {"lcd", "packed_model"},
    "train_kd": {"lcd", "packed_model", "baselines", "model", "checkpoints", "configurator", "lcd_kernels", "prepare"},
    "bench": {"lcd", "packed_model", "baselines", "model", "checkpoints", "configurator", "lcd_kernels", "train_kd", "cuda_emulation"},
}


def imported_modules(path):
    """Top-level module names of every import statement in a file, wherever it stands (also inside functions)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def test_every_project_file_has_its_place():
    assert {"lcd", "packed_model", "baselines", "model", "train_kd", "bench", "lcd_kernels"} <= PROJECT_MODULES   # the check can fail
    assert {name for name in PROJECT_MODULES if os.path.isfile(os.path.join(ROOT, name + ".py"))} <= set(MAY_IMPORT)


def test_each_file_imports_only_the_files_below_it():
    for name in sorted(set(MAY_IMPORT) & PROJECT_MODULES):
        imported = imported_modules(os.path.join(ROOT, name + ".py")) & (PROJECT_MODULES | {"."})
        assert imported <= MAY_IMPORT[name], f"{name}.py imports {sorted(imported - MAY_IMPORT[name])}"


def test_importing_baselines_loads_no_script():
    code = "import sys, baselines; print('train_kd' in sys.modules, 'bench' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
