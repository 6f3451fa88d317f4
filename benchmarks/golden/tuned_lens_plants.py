"""Plant the bugs ``tests/test_tuned_lens_format.py`` must catch, in memory, one pytest run each.

A pytest plugin in the manner of ``benchmarks/planted_bugs.py``: no file is edited, the bug is
monkeypatched in when pytest starts::

    PLANT=no_residual python -m pytest -p tuned_lens_plants tests/test_tuned_lens_format.py -q
    python benchmarks/golden/tuned_lens_plants.py       # every bug, with a summary

(``benchmarks/golden`` must be on ``PYTHONPATH`` for ``-p tuned_lens_plants``; the script sets it.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = "tests/test_tuned_lens_format.py"


def _no_residual() -> None:
    """Translators map ``h`` to ``W h + b``, dropping tuned-lens's residual ``h +``."""
    from depthlens.lenses.tuned import TunedLens

    def transform(self, hidden, layer):
        if layer == self.num_layers:
            return hidden
        translator = self.translators[layer]
        return translator(hidden.to(translator.weight.device, translator.weight.dtype))

    TunedLens.transform = transform


def _off_by_one() -> None:
    """tuned-lens's translator ``i`` is put on state ``i + 1`` (its last on state 0)."""
    import depthlens.lenses.tuned_lens_format as tlf

    real = tlf.read_translators

    def read(folder, parts):
        config, translators = real(folder, parts)
        return config, translators[-1:] + translators[:-1]

    tlf.read_translators = read


def _dropped_bias() -> None:
    """Biases are read but not copied in: every translator is ``h + W h``."""
    import torch

    import depthlens.lenses.tuned_lens_format as tlf

    real = tlf.read_translators

    def read(folder, parts):
        config, translators = real(folder, parts)
        return config, [(weight, torch.zeros_like(bias)) for weight, bias in translators]

    tlf.read_translators = read


def _wrong_hash_key() -> None:
    """Only the ``unembed_hash`` spelling is read, so April 2023 lenses are never checked."""
    import depthlens.lenses.tuned_lens_format as tlf

    tlf.HASH_KEYS = ("unembed_hash",)


def _old_layout_unshifted() -> None:
    """In the 0.0.x layout, ``layer_translators.j`` is read as state ``j``, not ``j + 1``."""
    import depthlens.lenses.tuned_lens_format as tlf

    real = tlf._translator_index
    tlf._translator_index = lambda key, shifted: real(key, False)


def _hash_without_summary() -> None:
    """The hash formats the whole matrix, not numpy's default summary of it."""
    import hashlib

    import numpy as np
    import torch

    import depthlens.lenses.tuned_lens_format as tlf

    def unembedding_hash(parts):
        weight = parts.unembedding.weight.detach().to("cpu", torch.float32).numpy()
        with np.printoptions(threshold=sys.maxsize):
            return hashlib.sha256(np.array_str(weight, precision=1).encode()).hexdigest()

    tlf.unembedding_hash = unembedding_hash


PLANTS: dict[str, Callable[[], None]] = {
    "no_residual": _no_residual,
    "off_by_one_layer": _off_by_one,
    "dropped_bias": _dropped_bias,
    "wrong_hash_key": _wrong_hash_key,
    "old_layout_unshifted": _old_layout_unshifted,
    "hash_without_summary": _hash_without_summary,
}


def pytest_configure(config) -> None:
    name = os.environ.get("PLANT")
    if name:
        PLANTS[name]()


def main() -> int:
    """Run every planted bug against the tuned-lens format tests; each must fail at least one."""
    names = sys.argv[1:] or list(PLANTS)
    path = os.pathsep.join([str(ROOT / "benchmarks" / "golden"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    caught = {}
    for name in names:
        command = [sys.executable, "-m", "pytest", "-p", "tuned_lens_plants", "-p", "no:cacheprovider", "-n", "0", "-q", TESTS]
        began = time.monotonic()
        done = subprocess.run(command, cwd=ROOT, env={**env, "PLANT": name}, capture_output=True, text=True, check=False)
        failed = [line.split(" - ")[0].split("::")[-1] for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        caught[name] = done.returncode == 1 and bool(failed)
        print(f"{'CAUGHT' if caught[name] else 'MISSED'} {name} ({time.monotonic() - began:.0f} s): "
              f"{len(failed)} failed: {', '.join(failed)}", flush=True)
    print(f"{sum(caught.values())}/{len(caught)} planted bugs caught")
    return 0 if all(caught.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
