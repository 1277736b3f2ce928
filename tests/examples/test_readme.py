import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    for code in blocks:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 0, f"README example failed:\n{code}\n{result.stderr}"


def test_readme_test_command_is_the_one_ci_runs():
    ci_commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    assert ci_commands[-1] == "python -m pytest -n auto"
    assert "the test command `python -m pytest -n auto`" in README
    assert "bash .ci/run" in README


def test_readme_torch_pin_matches_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    pins = set(re.findall(r"pip install torch==([\d.]+)", ci))
    assert pins and pins == set(re.findall(r"pip install torch==([\d.]+)", README))
