import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SEED_MODEL = REPO / "examples" / "seed_network_model.py"


def _snnopt(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def _python(code: str, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + str(cwd)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def _zoo_model_file(folder: Path, case_name: str) -> Path:
    path = folder / f"{case_name}_model.py"
    path.write_text(textwrap.dedent(f"""
        from tests.compiler.style_models import ALL_CASES

        CASE = next(c for c in ALL_CASES if c.name == {case_name!r})

        def build_model():
            return CASE.build()

        def example_inputs(batch=None, steps=None):
            return CASE.example_inputs(batch, steps)
    """))
    return path


def _one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("snnopt: error:"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def seed_compiled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seed")
    result = _snnopt("compile", SEED_MODEL, "--out", folder / "seed_opt", "--onnx", folder / "seed.onnx",
                     "--graph", folder / "seed.svg", "--json", cwd=folder)
    return folder, result


def test_compile_seed_example_writes_report_package_onnx_and_graph(seed_compiled):
    folder, result = seed_compiled
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert [layer["kind"] for layer in payload["report"]["layers"]] == ["lif", "lif", "leaky_integrator"]
    assert payload["report"]["skipped"] == []
    assert set(payload["written"]) == {"package", "onnx", "graph"}
    assert (folder / "seed.svg").read_text().startswith("<svg")
    assert {p.name for p in (folder / "seed_opt").iterdir()} >= {"__init__.py", "module.py", "weights.pt", "report.json"}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_emitted_package_imports_only_torch_and_snnopt_and_matches_original_and_onnx(seed_compiled):
    folder, _ = seed_compiled
    package_text = (folder / "seed_opt" / "module.py").read_text()
    assert str(REPO) not in package_text and "/tmp" not in package_text
    imported = {line.split()[1].split(".")[0] for line in package_text.splitlines()
                if line.startswith(("import ", "from "))}
    assert imported <= {"json", "math", "operator", "pathlib", "torch", "snnopt"}, imported
    # A fresh process that has never seen the model file's classes: import the package, then compare.
    check = _python(f"""
        import sys, numpy as np, onnx, onnxruntime, torch, snnopt
        import seed_opt
        optimized = seed_opt.load()
        assert not any("seed_network" in name for name in sys.modules), "the package imported the model's code"
        assert [l.kind for l in snnopt.explain(optimized).layers] == ["lif", "lif", "leaky_integrator"]
        sys.path.insert(0, {str(REPO / "examples")!r})
        import seed_network_model as original_file
        model, x = original_file.build_model(), original_file.example_inputs()
        with torch.no_grad():
            expected, (s1, s2) = model(x)
            got, (o1, o2) = optimized(x)
        assert torch.equal(s1, o1) and torch.equal(s2, o2)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        proto = onnx.load("seed.onnx")
        onnx.checker.check_model(proto, full_check=True)
        assert {{f.domain for f in proto.functions}} == {{"snnopt"}}
        assert any(n.op_type == "Scan" for f in proto.functions for n in f.node)
        session = onnxruntime.InferenceSession("seed.onnx", providers=["CPUExecutionProvider"])
        for batch, steps in ((3, 37), (16, 100)):   # dynamic batch and time
            xs = original_file.example_inputs(batch, steps)
            with torch.no_grad():
                logits, (t1, t2) = model(xs)
            onnx_logits, r1, r2 = session.run(None, {{session.get_inputs()[0].name: xs.numpy()}})
            assert np.array_equal(r1, t1.numpy()) and np.array_equal(r2, t2.numpy())
            np.testing.assert_allclose(onnx_logits, logits.numpy(), rtol=1e-4, atol=1e-5)
        print("ok")
    """, cwd=folder)
    assert check.returncode == 0 and "ok" in check.stdout, check.stderr


def test_inspect_package_folder_shows_which_nodes_became_which_fused_op(seed_compiled):
    folder, _ = seed_compiled
    result = _snnopt("inspect", folder / "seed_opt")
    assert result.returncode == 0, result.stderr
    assert "replaces" in result.stdout and "superspike(100)" in result.stdout and "beta=0.904837" in result.stdout
    assert "Graph before" in result.stdout and "apply_SuperSpikeSpike×100" in result.stdout
    for fmt, start in (("dot", "digraph"), ("html", "<!doctype html>"), ("json", "{")):
        out = folder / f"inspect.{fmt}"
        result = _snnopt("inspect", folder / "seed_opt", "--format", fmt, "--output", out)
        assert result.returncode == 0, result.stderr
        assert out.read_text().startswith(start)


@pytest.mark.parametrize("case_name", ["recurrent_layernorm_readout", "time_first_where_zero", "snntorch_init_leaky"])
def test_compile_style_zoo_models_to_package_and_onnx(tmp_path, case_name):
    model_file = _zoo_model_file(tmp_path, case_name)
    result = _snnopt("compile", model_file, "--out", tmp_path / "opt", "--onnx", tmp_path / "m.onnx",
                     "--graph", tmp_path / "g.html", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Fused layers" in result.stdout and "wrote package" in result.stdout
    check = _python(f"""
        import numpy as np, onnxruntime, torch
        from tests.compiler.style_models import ALL_CASES, run
        import opt
        case = next(c for c in ALL_CASES if c.name == {case_name!r})
        model, x = case.build(), case.example_inputs()
        loaded = opt.load()
        model.load_state_dict(loaded.state_dict())  # statistics the compile run updated (batch norm)
        model.eval(), loaded.eval()
        for a, b in zip(run(model, x), run(loaded, x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        session = onnxruntime.InferenceSession("m.onnx", providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = run(model, x)
        for a, b in zip(expected, session.run(None, {{session.get_inputs()[0].name: x[0].numpy()}})):
            np.testing.assert_allclose(b, a.numpy(), rtol=1e-4, atol=1e-5)
        print("ok")
    """, cwd=tmp_path)
    assert check.returncode == 0 and "ok" in check.stdout, check.stderr


def test_data_dependent_loop_exits_0_with_nothing_fused_and_the_reason(tmp_path):
    model_file = _zoo_model_file(tmp_path, "data_dependent_while")
    result = _snnopt("compile", model_file, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Fused layers: none" in result.stdout and "control flow" in result.stdout
    strict = _snnopt("compile", model_file, "--strict", cwd=tmp_path)
    assert strict.returncode == 1 and "control flow" in strict.stderr
    emit = _snnopt("compile", model_file, "--out", tmp_path / "opt", cwd=tmp_path)
    assert "left whole" in _one_error_line(emit)
    assert not (tmp_path / "opt").exists()


def test_bench_runs_both_variants_and_writes_json_and_png(tmp_path):
    model_file = _zoo_model_file(tmp_path, "linear_per_step_two_layers")
    result = _snnopt("bench", model_file, "--batch", 3, "--steps", 8, "--repeat", 1, "--json", "--plot",
                     tmp_path / "b.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["inputs"] == [[3, 8, 32]]
    for variant in ("original", "optimized"):
        assert set(payload["variants"][variant]) == {"forward_ms", "backward_ms", "step_ms", "saved_mb"}
    assert (tmp_path / "b.png").read_bytes().startswith(b"\x89PNG")


def test_bench_refuses_a_device_it_cannot_use_in_one_line(tmp_path):
    model_file = _zoo_model_file(tmp_path, "linear_per_step_two_layers")
    assert "--device meta: snnopt bench runs on cpu or cuda" in _one_error_line(
        _snnopt("bench", model_file, "--device", "meta", cwd=tmp_path))
    assert "--device nowhere: not a device" in _one_error_line(
        _snnopt("bench", model_file, "--device", "nowhere", cwd=tmp_path))
    assert "--cuda-graphs: CUDA graphs need a GPU; add --device cuda" in _one_error_line(
        _snnopt("bench", model_file, "--cuda-graphs", cwd=tmp_path))
    if not torch.cuda.is_available():
        assert "--device cuda: this machine has no CUDA GPU" in _one_error_line(
            _snnopt("bench", model_file, "--device", "cuda", cwd=tmp_path))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_a_gpu_with_cuda_graphs(tmp_path):
    result = _snnopt("bench", SEED_MODEL, "--batch", 32, "--steps", 50, "--repeat", 2, "--device", "cuda",
                     "--cuda-graphs", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload["variants"]) == {"original", "optimized", "optimized_cuda_graphs"}
    assert payload["machine"]["device"].startswith("cuda") and payload["machine"]["gpu"]
    assert payload["variants"]["optimized_cuda_graphs"]["step_ms"] > 0
    assert payload["cuda_graphs"]["plan"] and payload["ratio_original_over_optimized_cuda_graphs"]["step_ms"] > 0


def test_missing_file_is_one_line_exit_2(tmp_path):
    assert "no such file" in _one_error_line(_snnopt("compile", tmp_path / "nope.py"))


def test_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef build_model(:\n    pass\n")
    assert "bad.py:3: syntax error" in _one_error_line(_snnopt("compile", bad))


def test_no_model_says_which_names_were_looked_for(tmp_path):
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    line = _one_error_line(_snnopt("inspect", empty))
    assert "build_model" in line and "`model`" in line
    assert "`net`" in _one_error_line(_snnopt("compile", empty, "--model", "net"))


def test_example_inputs_raising_is_reported_with_its_line(tmp_path):
    model_file = tmp_path / "raises.py"
    model_file.write_text(textwrap.dedent("""
        import torch

        def build_model():
            return torch.nn.Linear(3, 2)

        def example_inputs():
            raise RuntimeError("no data here")
    """))
    line = _one_error_line(_snnopt("compile", model_file))
    assert "raises.py:8" in line and "RuntimeError: no data here" in line
    debug = _snnopt("compile", model_file, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_model_raising_on_its_inputs_is_one_line(tmp_path):
    model_file = tmp_path / "shape.py"
    model_file.write_text(textwrap.dedent("""
        import torch

        model = torch.nn.Linear(3, 2)
        example_inputs = torch.zeros(4, 5)
    """))
    assert "the model raised RuntimeError" in _one_error_line(_snnopt("compile", model_file))


def test_unwritable_output_path_fails_before_work_and_leaves_nothing(tmp_path):
    model_file = _zoo_model_file(tmp_path, "einsum_hoisted")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        assert "cannot write" in _one_error_line(_snnopt("compile", model_file, "--onnx", locked / "m.onnx"))
    finally:
        locked.chmod(0o700)
    assert "is a folder" in _one_error_line(_snnopt("compile", model_file, "--graph", tmp_path / "g.svg",
                                                    "--onnx", tmp_path))
    assert "not a valid Python package name" in _one_error_line(_snnopt("compile", model_file, "--out",
                                                                        tmp_path / "my-model"))
    assert not (tmp_path / "g.svg").exists()


def test_imports_beside_the_model_file_work(tmp_path):
    (tmp_path / "helpers.py").write_text("from tests.compiler.style_models import ALL_CASES\n"
                                         "CASE = next(c for c in ALL_CASES if c.name == 'zero_reset_mul')\n")
    model_file = tmp_path / "sub_model.py"
    model_file.write_text("from helpers import CASE\nmodel = CASE.build()\nexample_inputs = CASE.example_inputs()\n")
    result = _snnopt("compile", model_file, "--json", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert [layer["kind"] for layer in json.loads(result.stdout)["report"]["layers"]] == ["lif"]


def test_every_command_help_has_an_example():
    for command in ("compile", "inspect", "bench"):
        result = _snnopt(command, "--help")
        assert result.returncode == 0 and "Example: snnopt " + command in " ".join(result.stdout.split())


def test_cli_choices_match_the_library():
    from cli.commands import BACKWARD_CHOICES, ONNX_MODES
    from snnopt.export import MODES
    from snnopt.spec import BACKWARD_MODES

    assert tuple(BACKWARD_CHOICES) == tuple(BACKWARD_MODES) and tuple(ONNX_MODES) == tuple(MODES)


@pytest.mark.parametrize("case_name", [c.name for c in __import__("tests.compiler.style_models", fromlist=["x"]).ALL_CASES])
def test_whole_zoo_packages_and_onnx_in_process(tmp_path, case_name):
    import torch

    import snnopt
    from snnopt.emit import EmitError, emit_package
    from snnopt.export import ExportError, export_onnx
    from tests.compiler.style_models import ALL_CASES

    case = next(c for c in ALL_CASES if c.name == case_name)
    model, x = case.build(), case.example_inputs()
    optimized = snnopt.optimize(model, x, backward="sparse" if "sparse" in case.modes else "exact")
    left_whole = any(getattr(n.target, "__name__", "") == "run_unchanged" for n in optimized.graph.nodes)
    try:
        emit_package(optimized, tmp_path / "opt", example_inputs=x)
        export_onnx(optimized, x, tmp_path / "m.onnx")
    except (EmitError, ExportError) as error:
        assert left_whole or "not recognised" in str(error), error
    else:
        assert not left_whole
    assert isinstance(optimized, torch.nn.Module)
