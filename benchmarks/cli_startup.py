"""How fast the ``depthlens`` command answers: ``--help``, each command's ``--help`` and an
argument error, against the 1-second target, and which heavy libraries each one imported.

Each case runs as a fresh subprocess (``python -m depthlens …``, as the console script does) a
few times; the best wall time is reported, so a busy machine inflates it least. A second
subprocess per case imports the CLI, parses the same arguments and lists the heavy modules
(torch, transformers, gradio, plotly, scikit-learn) left in ``sys.modules``.

With ``--baseline DIR`` (a folder holding another version's ``depthlens`` package, e.g. made by
``git archive <commit> depthlens | tar -x -C DIR``) each case is also timed with that version,
alternating runs, and the ratio is printed, so both are measured under the same load.

    python benchmarks/cli_startup.py [--repeats 5] [--baseline DIR] [--commands NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TARGET_S = 1.0
HEAVY = ("torch", "transformers", "gradio", "plotly", "sklearn")

_PROBE = """
import json, sys
from depthlens.apps.cli import build_parser
try:
    build_parser().parse_args(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps([name for name in {heavy} if name in sys.modules]))
"""


def commands() -> list[str]:
    """Every ``depthlens`` command, read from the parser itself."""
    from depthlens.apps.cli import build_parser

    parser = build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return sorted(subparsers.choices)


def _environment(source: str | None) -> dict[str, str]:
    """The environment that makes ``python`` import depthlens from ``source`` (default: as installed)."""
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    return env


def one_run(argv: list[str], source: str | None) -> tuple[float, int]:
    """Seconds and exit code of one ``python -m depthlens *argv``, run in ``source`` if given (``-m``
    looks in the working folder first)."""
    began = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "depthlens", *argv], capture_output=True, check=False,
                          env=_environment(source), cwd=source).returncode
    return time.perf_counter() - began, code


def heavy_imports(argv: list[str], source: str | None = None) -> list[str]:
    """The heavy modules that parsing ``argv`` left imported."""
    probe = _PROBE.format(heavy=repr(HEAVY))
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True,
                          env=_environment(source))
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per case; the best counts (default: 5)")
    parser.add_argument("--baseline", help="folder holding another version's depthlens package to compare with")
    parser.add_argument("--commands", nargs="+", metavar="NAME", help="time only these commands' --help (default: all)")
    args = parser.parse_args()
    names = args.commands or commands()
    cases = [["--help"], *([name, "--help"] for name in names), ["show", "--max-tokens", "many"]]
    print(f"python {sys.version.split()[0]}; best of {args.repeats} runs per case; target {TARGET_S:.1f} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    baseline_columns = f" {'baseline s':>10s} {'speed-up':>8s}" if args.baseline else ""
    print(f"{'command':32s} {'exit':>4s} {'best s':>7s} {'× target':>9s}{baseline_columns}  heavy modules imported")
    worst = 0.0
    for argv in cases:
        runs = {None: [], args.baseline: []} if args.baseline else {None: []}
        for _ in range(args.repeats):
            for source, times in runs.items():
                times.append(one_run(argv, source))
        seconds, code = min(runs[None])
        worst = max(worst, seconds)
        extra = ""
        if args.baseline:
            before = min(runs[args.baseline])[0]
            extra = f" {before:10.3f} {before / seconds:7.1f}×"
        label = "depthlens " + " ".join(argv)
        heavy = ", ".join(heavy_imports(argv)) or "none"
        print(f"{label:32s} {code:4d} {seconds:7.3f} {seconds / TARGET_S:9.2f}{extra}  {heavy}", flush=True)
    print(f"slowest case: {worst:.3f} s = {worst / TARGET_S:.2f} × the {TARGET_S:.1f} s target"
          f" ({'met' if worst <= TARGET_S else 'missed'})")


if __name__ == "__main__":
    main()
