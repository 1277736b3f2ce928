import subprocess
import sys

import snnopt


def _snnopt(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=120)


def test_version_prints_the_package_version():
    result = _snnopt("--version")
    assert result.returncode == 0, result.stderr
    assert snnopt.__version__ in result.stdout


def test_info_names_torch_numba_and_the_cpu_backend():
    result = _snnopt("info")
    assert result.returncode == 0, result.stderr
    for word in ("torch", "numba", "cpu"):
        assert word in result.stdout.lower()


def test_unknown_command_exits_2_with_one_line_on_stderr():
    result = _snnopt("frobnicate")
    assert result.returncode == 2
    assert "frobnicate" in result.stderr
