"""Every example in README.md runs as written, at a small size, and does what the text says.

The examples are the README's ```bash and ```python blocks, taken from the file itself, run in
README order in one working folder (``runs/smollm2-135m/lens`` is there from the start, and
trained again by the training examples). Each ``depthlens`` command runs in this process through the console
script's ``main`` and must exit 0, print no library warning, and leave what the README promises
(:data:`PROMISES`). What changes, and why, is this mapping and nothing else:

- **The model.** ``smollm2-135m`` becomes a tiny random-weight Llama with 30 layers, as many as
  smollm2-135m has (so ``--layers 0,9,18,27`` and ``0:30:2`` mean what they say), saved in a
  folder named ``smollm2-135m`` (so ``runs/smollm2-135m`` is still where runs go). Commands that
  name no model get ``--model`` pointing at it.
- **The size.** :data:`SMALL` sets, per command, the budgets a run on real text would take
  minutes with (tokens, examples, directions, new tokens); ``None`` drops an option.
- **The target token.** The tiny tokenizer has no single token ``" Paris"``, so ``dla`` attributes
  ``" foul"`` (:data:`SMALL`).
- **Built-in tasks.** ``depthlens tasks fetch`` downloads them; here ``sst2`` and ``rte`` are
  stand-in files of 32 rows in the same format (``$DEPTHLENS_TASK_DATA``).
- **Installing.** ``python3 -m venv … && pip install …`` is skipped (this runs inside an install);
  the test command (``python -m pytest``) is not run: it runs this test.
"""

from __future__ import annotations

import json
import re
import shlex
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import random_tuned_lens, tiny_model

from depthlens.apps.cli import main
from depthlens.viz.plotly_draw import bundle_name

README = Path(__file__).resolve().parents[1] / "README.md"
REPOSITORY = README.parent
MODEL = "smollm2-135m"
"""The README's model, replaced by the tiny one (see the module docstring)."""
TRAIN = {"--minutes": None, "--tokens": "256", "--init-tokens": "128", "--eval-tokens": "256", "--chunk-len": "64",
         "--batch-tokens": "128"}
SMALL: dict[str, dict[str, str | None]] = {
    "train": TRAIN,
    "eval": {"--tokens": "256"},
    "causal": {"--k": "3", "--tokens": "128", "--chunk-len": "32"},
    "drift": {"--tokens": "64", "--chunk-len": "32"},
    "inject": {"--limit": "16", "--demo-pool": "8"},
    "overthink": {"--limit": "12", "--shots": "2", "--demo-pool": "8"},
    "attribute": {"--train": "6", "--held-out": "3"},
    "dla": {"--target": " foul"},
    "generate": {"--max-new-tokens": "3"},
}
"""Per command: options set to a small value (added if missing), or dropped (``None``)."""
SETUP = re.compile(r"^python3 -m venv .*&&\s*")
"""The install steps before a command on the same line."""


def readme_examples() -> list[tuple[str, str]]:
    """``(language, code)`` of every ```bash and ```python block of the README, in order."""
    return re.findall(r"^```(bash|python)\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)


def commands(code: str) -> list[str]:
    """The ``depthlens`` commands of a bash block, one per line, comments and install steps removed."""
    lines = [SETUP.sub("", line.split("  #")[0].strip()) for line in code.splitlines()]
    return [line for line in lines if line.startswith("depthlens ")]


def small(argv: list[str], model: Path) -> list[str]:
    """``argv`` (without ``depthlens``) with the tiny model and :data:`SMALL`'s sizes."""
    settings = {"--model": str(model), **SMALL.get(argv[0], {})}
    out: list[str] = []
    words = iter(argv)
    for word in words:
        if word in settings:
            next(words, None)
            if settings[word] is not None:
                out += [word, settings.pop(word)]
            else:
                settings.pop(word)
        else:
            out.append(word)
    return out + [item for option, value in settings.items() if value is not None for item in (option, value)]


def _json(path: str) -> object:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _shared_plotlyjs(folder: str) -> bool:
    """Every HTML page in ``folder`` loads the one plotly.js copy beside it."""
    pages = list(Path(folder).glob("*.html"))
    return bool(pages) and (Path(folder) / bundle_name()).is_file() and all(
        f'src="{bundle_name()}"' in page.read_text() and page.stat().st_size < 2_000_000 for page in pages)


PROMISES: dict[str, Callable[[str], None]] = {}
"""What the README says each command does, checked on its printed output (the working folder is
the current one); keyed by the command line as the README writes it (its first words suffice)."""


def promise(start: str) -> Callable:
    def register(check: Callable[[str], None]) -> Callable[[str], None]:
        PROMISES[start] = check
        return check
    return register


@promise("depthlens train --model")
@promise("depthlens train")
def _trained(printed: str) -> None:
    run = Path("runs", MODEL)
    assert _json(run / "lens" / "config.json")["model"]["num_layers"] == 30
    for folder in (run / "eval", run / "eval" / "ood"):
        assert {p.name for p in folder.iterdir()} >= {"eval.json", "eval.csv", "curves.html", "curves.png"}
    assert "tuned" in printed


@promise("depthlens train --optimizer sgd")
def _paper_recipe(printed: str) -> None:
    config = _json("runs/paper-recipe/lens/config.json")
    assert config["training"]["config"]["optimizer"] == "sgd", config["training"]


@promise("depthlens eval")
def _evaluated(printed: str) -> None:
    report = _json(f"runs/{MODEL}/eval/eval.json")
    assert report["tokens"] <= 256 and "per-layer evaluation" in printed


@promise("depthlens show")
def _shown(printed: str) -> None:
    assert _shared_plotlyjs(".") and "fig.html" in printed


@promise("depthlens causal")
def _causal(printed: str) -> None:
    results = _json("causal/results.json")
    assert results["layers"] == [0, 9, 18, 27] and set(results["readouts"]) == {"logit", "tuned"}
    assert results["alignment"]["layers"] == [0, 9, 18, 27]
    assert _shared_plotlyjs("causal")


@promise("depthlens drift")
def _drift(printed: str) -> None:
    assert _shared_plotlyjs("drift") and Path("drift/results.json").is_file()


@promise("depthlens inject")
def _inject(printed: str) -> None:
    assert "AUROC" in printed and Path("inject/sst2/injection.json").is_file()


@promise("depthlens overthink")
def _overthink(printed: str) -> None:
    assert "calibrated accuracy" in printed and Path("overthink/rte/overthinking.json").is_file()


@promise("depthlens depth")
def _depth(printed: str) -> None:
    assert Path("depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@promise("depthlens anomaly")
def _anomaly(printed: str) -> None:
    texts = (REPOSITORY / "examples" / "suspects.txt").read_text(encoding="utf-8").splitlines()
    assert [row["text"] for row in _json("anomaly/anomaly.json")["scores"]] == texts


@promise("depthlens attribute")
def _attribute(printed: str) -> None:
    relations = {row["relation"] for row in _json("attr/faithfulness.json")}
    assert relations == {"country-capital", "country-language"} and "faithfulness" in printed


@promise("depthlens dla")
def _dla(printed: str) -> None:
    assert "foul" in printed and _shared_plotlyjs("dla")


@promise("depthlens patchscope")
def _patchscope(printed: str) -> None:
    assert [row["source_layer"] for row in _json("identity/identity-curve.json")] == list(range(0, 31, 2))


@promise("depthlens generate")
def _generate(printed: str) -> None:
    assert re.findall(r"^\s*(\d+)\s+\d+\s+-?[\d.]+\s", printed, flags=re.MULTILINE) == ["12", "18", "24"], printed


def _check_python(namespace: dict) -> None:
    """The Python blocks' promises: shapes and values the README's comments state."""
    if "log_probs" in namespace:  # Python API
        assert namespace["log_probs"].shape[:2] == (31, 1) and namespace["log_probs"].shape[-1] == 5
        assert len(namespace["states"]) == 31
    if "Sharpened" in namespace:  # the readout protocol
        traj = namespace["traj"]
        assert traj.num_layers == 30 and traj.lens_name.startswith("sharpened")
    if "run" in namespace:  # the hook layer
        clean = namespace["model"](namespace["input_ids"]).logits
        assert namespace["values"]["resid.3"].shape[-1] == namespace["mu"].shape[0]
        assert torch.equal(namespace["run"].logits[:, :4], clean[:, :4])  # positions before the edit are untouched
        assert not torch.allclose(namespace["run"].logits[:, 4:], clean[:, 4:])


def _library_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings a user should not see: all but depthlens's own (``UserWarning``) and the
    ``ResourceWarning`` of objects other tests left for the garbage collector."""
    return [str(w.message) for w in caught if w.category not in (UserWarning, ResourceWarning)]


EXAMPLES = [(language, code) for language, code in readme_examples() if language == "python" or commands(code)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A working folder with ``examples/`` from the repository, the tiny model as ``models/smollm2-135m``,
    stand-in built-in task files, and a random tuned lens in ``runs/smollm2-135m/lens`` (the README's
    training examples replace it), so that each example also runs alone."""
    root = tmp_path_factory.mktemp("readme")
    model = root / "models" / MODEL
    network = tiny_model("llama", num_hidden_layers=30, max_position_embeddings=2048)
    network.save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    random_tuned_lens(network, seed=0, std=0.05).save_pretrained(root / "runs" / MODEL / "lens")
    (root / "examples").mkdir()
    for path in (REPOSITORY / "examples").iterdir():
        (root / "examples" / path.name).write_bytes(path.read_bytes())
    _task_files(root / "tasks")
    return root


def _task_files(root: Path) -> None:
    """``sst2`` and ``rte`` validation splits of 32 rows each, in the format of the fetched files."""
    import pyarrow as pa

    rows = {
        "glue/sst2/validation": [{"sentence": f"a {word} film ", "label": i % 2, "idx": i}
                                 for i, word in enumerate(["fine", "dull", "bright", "slow"] * 8)],
        "glue/rte/validation": [{"sentence1": f"The {word} fell.", "sentence2": f"A {word} moved.", "label": i % 2,
                                 "idx": i} for i, word in enumerate(["rain", "stone", "leaf", "price"] * 8)],
    }
    for path, table_rows in rows.items():
        folder = root / path
        folder.mkdir(parents=True)
        table = pa.Table.from_pylist(table_rows)
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
            out.write_table(table)
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))


def test_every_readme_block_is_found():
    """The examples this test runs are the README's: every bash and Python block but the install
    and test commands, and every command of each bash block."""
    found = [cmd.split()[1] for language, code in EXAMPLES if language == "bash" for cmd in commands(code)]
    assert {"train", "eval", "show", "causal", "drift", "inject", "overthink", "depth", "anomaly", "attribute", "dla",
            "patchscope", "generate"} <= set(found)
    assert sum(language == "python" for language, _ in EXAMPLES) == 3
    missing = [cmd for language, code in EXAMPLES if language == "bash" for cmd in commands(code)
               if not any(cmd.startswith(start) for start in PROMISES)]
    assert missing == []


@pytest.mark.parametrize(("language", "code"), EXAMPLES, ids=[f"{lang}-{i}" for i, (lang, _) in enumerate(EXAMPLES)])
def test_readme_example_runs_as_written(language, code, workdir, monkeypatch, capfd):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("DEPTHLENS_TASK_DATA", str(workdir / "tasks"))
    monkeypatch.setenv("DEPTHLENS_NO_CACHE", "1")
    model = workdir / "models" / MODEL
    if language == "python":
        namespace: dict = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            source = code.replace(f'"{MODEL}"', repr(str(model)))
            exec(compile(source, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
        _check_python(namespace)
        assert _library_warnings(caught) == []
        return
    for line in commands(code):
        argv = small(shlex.split(line)[1:], model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            status = main(argv)
        printed, errors = capfd.readouterr()
        assert status == 0, f"{line}\n→ depthlens {shlex.join(argv)}\n{errors[-2000:]}"
        assert _library_warnings(caught) == [], line
        assert "deprecated" not in errors and "return func(" not in errors, errors[-2000:]
        check = max((start for start in PROMISES if line.startswith(start)), key=len)
        PROMISES[check](printed)
