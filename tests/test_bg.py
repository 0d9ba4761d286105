"""Host resolution: real bgflow when it imports, the built-in host otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import bgflow_gate
from bgflow_gate import bg
from bgflow_gate.bg import HostImportWarning, resolve


@pytest.fixture
def fake_bgflow(tmp_path, monkeypatch):
    """Put a stand-in ``bgflow`` package first on sys.path; returns a function writing its __init__."""

    def write(source: str):
        pkg = tmp_path / "bgflow"
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").write_text(textwrap.dedent(source))

    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {k: v for k, v in sys.modules.items() if k == "bgflow" or k.startswith("bgflow.")}
    for name in saved:
        del sys.modules[name]
    yield write
    for name in [k for k in sys.modules if k == "bgflow" or k.startswith("bgflow.")]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_builtin_is_used_when_asked_for():
    module, name = resolve("builtin")
    assert name == "builtin" and module is bgflow_gate.host


def test_an_importable_bgflow_is_used(fake_bgflow):
    fake_bgflow("Energy = 'the real one'\n")
    module, name = resolve("auto")
    assert name == "bgflow" and module.Energy == "the real one"
    assert resolve("bgflow")[1] == "bgflow"


def test_bgflow_that_fails_to_import_falls_back_with_a_one_line_warning(fake_bgflow):
    fake_bgflow("raise AttributeError('np.infty was removed in the NumPy 2.0 release')\n")
    with pytest.warns(HostImportWarning, match=r"bgflow is installed but failed to import \(AttributeError") as record:
        module, name = resolve("auto")
    assert name == "builtin" and module is bgflow_gate.host
    assert "\n" not in str(record[0].message)
    assert "bgflow" not in sys.modules  # no half-imported package left behind


def test_demanding_bgflow_that_does_not_import_is_a_clear_error(fake_bgflow):
    fake_bgflow("raise RuntimeError('broken install')\n")
    with pytest.raises(ImportError, match=r"BGFLOW_GATE_HOST=bgflow demands the real bgflow.*broken install"):
        resolve("bgflow")


def test_an_unknown_choice_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"BGFLOW_GATE_HOST='numpy' is not understood; use one of auto, builtin, bgflow"):
        resolve("numpy")


def test_bg_forwards_attributes_to_the_resolved_host():
    assert bg.Energy is bg.module.Energy
    assert bgflow_gate.HOST == bg.HOST in ("bgflow", "builtin")
    assert "Energy" in dir(bg)
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchFlow'"):
        bg.NoSuchFlow


def test_bg_utils_as_numpy_works_on_either_host_as_in_bgflow():
    import numpy as np
    import torch

    out = bg.utils.as_numpy(torch.tensor([1.5, 2.5], requires_grad=True))
    assert isinstance(out, np.ndarray) and out.tolist() == [1.5, 2.5]
    assert bg.utils.as_numpy(2.0).dtype == np.float32  # a Python float goes through torch


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_environment_variable_forces_the_builtin_host_at_import():
    done = run_python("import bgflow_gate; print(bgflow_gate.HOST, bgflow_gate.bg.Energy.__module__)", BGFLOW_GATE_HOST="builtin")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["builtin", "bgflow_gate.host.energy"]


def test_a_bad_environment_variable_stops_the_import_with_its_name():
    done = run_python("import bgflow_gate", BGFLOW_GATE_HOST="bgflw")
    assert done.returncode != 0
    assert "BGFLOW_GATE_HOST='bgflw' is not understood" in done.stderr
