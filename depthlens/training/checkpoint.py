"""Training checkpoints: translators, optimizer state, RNG and progress, without the model.

A checkpoint is a directory with ``state.safetensors`` (every tensor) and ``state.json``
(everything else), written atomically, so an interrupted run always finds the last complete one.
Like lens files, it never uses pickle.

The checkpoint of a finished run (``progress["complete"]``) leaves out the optimizer state: nothing
is left to resume, so it only records the translators and the progress (a third of the size with
Adam). Loading it restores the module and the RNG and leaves the optimizers as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from depthlens.atomic import write_dir
from depthlens.errors import CheckpointError

TENSORS_NAME = "state.safetensors"
JSON_NAME = "state.json"


def save_checkpoint(
    directory: str | os.PathLike,
    module: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    progress: dict[str, Any],
) -> Path:
    """Write ``module``'s parameters, the optimizers' states, the torch RNG state and the
    JSON-serialisable ``progress`` (step, data position, elapsed time, config…). Pass no
    ``optimizers`` for a finished run's checkpoint (``progress["complete"]`` true)."""
    tensors = {f"module.{name}": t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    tensors["rng.torch"] = torch.get_rng_state()
    optimizer_meta = []
    for index, optimizer in enumerate(optimizers):
        state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for param_id, entries in state["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{param_id}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(param_id), {})[key] = value
        optimizer_meta.append({"param_groups": state["param_groups"], "scalars": scalars})
    document = {"progress": progress, "optimizers": optimizer_meta}
    return write_dir(directory, {TENSORS_NAME: save(tensors), JSON_NAME: json.dumps(document, indent=1).encode()})


def load_checkpoint(
    directory: str | os.PathLike,
    module: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``module`` and ``optimizers`` (in place)
    and the torch RNG; returns the saved ``progress``."""
    path = Path(directory)
    try:
        document = json.loads((path / JSON_NAME).read_text())
        tensors = load((path / TENSORS_NAME).read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint in {path}; start without --resume") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as error:
        raise CheckpointError(f"the checkpoint in {path} is damaged ({error}); start without --resume") from None
    try:
        if document["progress"].get("complete"):
            document["optimizers"], optimizers = [], []
        elif len(document["optimizers"]) != len(optimizers):
            raise CheckpointError(f"the checkpoint in {path} was made with other optimizer settings; start without --resume")
        _restore(document, tensors, module, optimizers)
        progress = document["progress"]
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):
        raise CheckpointError(
            f"the checkpoint in {path} was made for another model or with other optimizer settings; "
            "start without --resume, or pass the --out of a run with these settings"
        ) from None
    return progress


def _restore(
    document: dict[str, Any], tensors: dict[str, torch.Tensor], module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]
) -> None:
    """Load the module's parameters, the optimizers' states and the RNG state from a checkpoint;
    raises ``KeyError``/``ValueError``/``RuntimeError`` for one that does not fit them."""
    module.load_state_dict({k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")})
    for index, (optimizer, meta) in enumerate(zip(optimizers, document["optimizers"])):
        state: dict[int, dict[str, Any]] = {}
        for param_id, entries in meta["scalars"].items():
            state.setdefault(int(param_id), {}).update(entries)
        prefix = f"optim.{index}."
        for name, tensor in tensors.items():
            if name.startswith(prefix):
                param_id, key = name[len(prefix):].split(".", 1)
                state.setdefault(int(param_id), {})[key] = tensor
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
