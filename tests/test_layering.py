"""The files import downwards only (DEVELOPERS.md): lcd.py, the foundation, imports no project file;
baselines.py imports lcd.py alone, so importing it loads neither pipeline script (issue 14, section 3)."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_MODULES = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")} | {"data", "tests", "prepare",
                                                                                       "cuda_emulation"}


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


def test_the_project_modules_are_found():
    assert {"lcd", "baselines", "model", "train_kd", "bench"} <= PROJECT_MODULES   # the check below can fail


def test_lcd_imports_no_project_file():
    assert imported_modules(os.path.join(ROOT, "lcd.py")) & (PROJECT_MODULES | {"."}) == set()


def test_baselines_imports_lcd_alone():
    assert imported_modules(os.path.join(ROOT, "baselines.py")) & (PROJECT_MODULES | {"."}) == {"lcd"}


def test_importing_baselines_loads_no_script():
    code = "import sys, baselines; print('train_kd' in sys.modules, 'bench' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
