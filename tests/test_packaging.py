"""Packaging as users install: triton required only where PyPI ships it, torchvision declared for dcn=True, and
dla_fast working without triton (`info` saying what is missing)."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter: a sys.meta_path finder that makes `import triton` fail, as on a machine without it.
WITHOUT_TRITON = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoTriton())
"""


def _setup_constants():
    """The module-level string constants and the setup() keywords of setup.py, read without running it."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    constants = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)}
    call = next(node.value for node in tree.body if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "id", "") == "setup")
    keywords = {k.arg: k.value for k in call.keywords}
    return constants, keywords


def test_triton_is_required_only_where_pypi_ships_it():
    packaging = pytest.importorskip("packaging.requirements")
    constants, keywords = _setup_constants()
    requires = [constants[e.id] if isinstance(e, ast.Name) else e.value for e in keywords["install_requires"].elts]
    (triton,) = [packaging.Requirement(r) for r in requires if r.startswith("triton")]
    for system, machine, wanted in (("Linux", "x86_64", True), ("Linux", "aarch64", True), ("Linux", "x86", False),
                                    ("Linux", "ppc64le", False), ("Darwin", "arm64", False),
                                    ("Windows", "AMD64", False)):
        env = dict(platform_system=system, platform_machine=machine)
        assert triton.marker.evaluate(env) is wanted, (system, machine)
    extras = ast.literal_eval(keywords["extras_require"])
    assert "torchvision" in extras["dcn"] and "torchvision" in extras["test"]


def _run(code, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", WITHOUT_TRITON + code, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_without_triton_dla_fast_runs_eager_and_info_says_what_is_missing():
    done = _run("import runpy; sys.argv = ['dla_fast', 'info']; runpy.run_module('dla_fast', run_name='__main__')")
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("triton ")]
    assert "MISSING (ModuleNotFoundError: No module named 'triton')" in line
    assert "backend 'auto' runs every op as eager PyTorch" in line and "Linux x86_64 and aarch64" in line
    assert any(line.startswith("backend triton") and "unavailable" in line for line in done.stdout.splitlines())

    done = _run("""
import torch, dla_fast
model = dla_fast.create_model("dla46_c").double().eval()
ref = dla_fast.create_model("dla46_c").double().eval()
ref.load_state_dict(model.state_dict())
dla_fast.accelerate(model)
x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
with torch.no_grad():
    assert torch.allclose(model(x), ref(x), rtol=1e-9, atol=1e-12)
assert "triton is not importable" in dla_fast.available_backends()["triton"]
assert "triton" not in sys.modules
print("eager without triton: ok")
""")
    assert done.returncode == 0 and "eager without triton: ok" in done.stdout, done.stderr[-3000:]
