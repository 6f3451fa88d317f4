"""``benchmarks/gpu.py --tiny``: the GPU run's code, on a tiny model, where only the GPU machine's
packages exist (torch, transformers, accelerate, safetensors and what they need).

The packages that machine lacks are blocked in a subprocess by ``sys.modules[name] = None``, which
makes ``import name`` fail and ``importlib.util.find_spec(name)`` answer ``None``, as if they were
not installed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ABSENT_ON_GPU_MACHINE = ("gradio", "plotly", "matplotlib", "sklearn", "scipy", "pandas", "pyarrow", "datasets",
                         "rich", "transformer_lens", "gguf", "PIL", "kaleido")
"""Packages the GPU machine does not have; depthlens's training and evaluation must not need them."""


def _run_blocked(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python with :data:`ABSENT_ON_GPU_MACHINE` blocked."""
    blocker = f"import sys\nfor name in {ABSENT_ON_GPU_MACHINE!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", blocker + code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False, env={"OMP_NUM_THREADS": "1", "PATH": "", "HOME": str(ROOT)})


def test_training_and_evaluation_import_without_the_web_and_plotting_packages():
    """Planted bug: a module-level ``import pandas`` in a module on the path fails here."""
    modules = ("depthlens.training.train", "depthlens.analysis.evaluate", "depthlens.analysis.trajectory",
               "depthlens.model.precision", "depthlens.lenses.tuned")
    done = _run_blocked("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules))
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_gpu_script_runs_every_phase_on_a_tiny_model(tmp_path):
    out = tmp_path / "gpu.json"
    script = "import runpy\nsys.argv = sys.argv[0:1] + sys.argv[1:]\nrunpy.run_path('benchmarks/gpu.py', run_name='__main__')\n"
    done = _run_blocked(script, "--tiny", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["phases"]) == ["build", "least-squares start", "KL steps", "evaluation"]
    assert result["phases"]["KL steps"]["tokens"] == 2 * 32
    assert result["phases"]["evaluation"]["tokens"] == 8 * 15
    assert len(result["step_losses"]) == 2 and all(math.isfinite(loss) for loss in result["step_losses"])
    assert all(math.isfinite(value) and value >= 0 for value in result["mean_kl"].values())
    assert result["dtype"] == "bfloat16" and "peak_gib" not in result["phases"]["build"]
