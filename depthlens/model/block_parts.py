"""Inside one decoder block: which modules hold the attention and MLP branches, their last
projections and their sandwich norms. Generic discovery by name; :mod:`depthlens.model.architecture`
applies the family table's exceptions on top."""

from __future__ import annotations

from torch import nn

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
"""Attribute names, tried in order on a block, of its attention module."""
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn", "moe")
"""Attribute names, tried in order on a block, of its MLP (or mixture-of-experts) module."""
POST_NORMS = {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}
"""Sandwich-norm blocks (Gemma 2/3, OLMo 2) normalise each branch's output before adding it; a
block that has ``post_feedforward_layernorm`` uses these as the branches' last modules."""
OUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o")
"""Names, tried in order inside a block's attention module, of its output projection."""
DOWN_PROJECTIONS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out", "w2", "wo")
"""Names, tried in order among the children of a block's MLP (or of the block, where the MLP is
inline), of the MLP's last projection."""
HEAD_COUNTS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
"""Config attributes, tried in order, that hold the number of attention heads."""


def count_heads(config: object, attribute: str | None = None) -> int:
    """The number of attention heads: the config's ``attribute``, or else the first of
    :data:`HEAD_COUNTS` that it has; 0 if none."""
    for name in (attribute,) if attribute else HEAD_COUNTS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _is_projection(module: nn.Module) -> bool:
    """A linear layer, or GPT-2's ``Conv1D`` (a linear layer with its weight stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_projection(block: nn.Module, kind: str) -> str:
    """Path inside ``block`` of the attention's output projection (``kind="attn"``: searched below
    the attention module, outside module lists) or the MLP's last projection (``"mlp"``: a child of
    the MLP module, or of the block where the MLP is inline); ``""`` if there is none."""
    names = ATTENTION_NAMES if kind == "attn" else MLP_NAMES
    inner = next((name for name in names if isinstance(getattr(block, name, None), nn.Module)), "")
    if kind == "attn" and not inner:
        return ""
    root = block.get_submodule(inner) if inner else block
    wanted = OUT_PROJECTIONS if kind == "attn" else DOWN_PROJECTIONS
    found = [
        (wanted.index(path.rpartition(".")[2]), path.count("."), path)
        for path, child in root.named_modules()
        if path
        and path.rpartition(".")[2] in wanted
        and _is_projection(child)
        and (kind == "attn" or "." not in path)
        and not any(part.isdigit() for part in path.split("."))
    ]
    return ".".join(filter(None, (inner, min(found)[2]))) if found else ""


def sandwich_norms(block: nn.Module) -> dict[str, str]:
    """``attn_norm`` and ``mlp_norm``: the paths of the norms that end each branch in a sandwich
    block (:data:`POST_NORMS`), ``""`` in other blocks."""
    sandwich = isinstance(getattr(block, POST_NORMS["mlp"], None), nn.Module)
    return {f"{kind}_norm": POST_NORMS[kind] if sandwich else "" for kind in ("attn", "mlp")}


def find_branch(block: nn.Module, kind: str) -> str:
    """Path inside ``block`` of its ``"attn"`` or ``"mlp"`` branch's last module, ``""`` if none."""
    if isinstance(getattr(block, POST_NORMS["mlp"], None), nn.Module):
        return POST_NORMS[kind]
    names = ATTENTION_NAMES if kind == "attn" else MLP_NAMES
    return next((name for name in names if isinstance(getattr(block, name, None), nn.Module)), "")


__all__ = [
    "ATTENTION_NAMES",
    "DOWN_PROJECTIONS",
    "HEAD_COUNTS",
    "MLP_NAMES",
    "OUT_PROJECTIONS",
    "POST_NORMS",
    "count_heads",
    "find_branch",
    "find_projection",
    "sandwich_norms",
]
