"""Find the parts of a decoder-only language model that a lens needs.

A lens reads the residual stream between blocks and decodes it the way the model decodes its
last state. For that it needs four parts, which :func:`find_parts` discovers from the config and
the module tree of any Hugging Face causal LM:

- the **embedding** (``get_input_embeddings()``),
- the **blocks** (the ``ModuleList`` with ``num_hidden_layers`` entries),
- the **final norm** (the modules between the last block and the unembedding),
- the **unembedding** (``get_output_embeddings()``) and whatever the family does to its output
  (soft-capping, scaling).

Families that break the generic rules get one entry in :data:`FAMILY_RULES`, keyed by
``config.model_type``; that table is the only place where architectures differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from depthlens.errors import UnsupportedModelError
from depthlens.model.block_parts import count_heads, find_branch, find_projection, sandwich_norms
from depthlens.model.unwrap import unwrap_model

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")
"""Attribute names, tried in order on the base model, under which families keep the final norm."""

@dataclass(frozen=True)
class FamilyRule:
    """How one family departs from the generic discovery rules.

    Every field names a dotted module path (relative to the causal-LM module) or a config
    attribute; ``None`` means "discover generically" for paths and "absent" for attributes.
    """

    blocks: str | None = None
    """Path of the ``ModuleList`` of decoder blocks."""
    final_norm: tuple[str, ...] | None = None
    """Paths of the modules applied, in order, between the last block and the unembedding."""
    embedding_multiplier: str | None = None
    """Config attribute by which the model's forward multiplies the token embeddings."""
    logit_multiplier: str | None = "logit_scale"
    """Config attribute by which the model multiplies its logits."""
    logit_divisor: str | None = "logits_scaling"
    """Config attribute by which the model divides its logits."""
    logit_softcap: str | None = "final_logit_softcapping"
    """Config attribute ``c`` of the soft cap ``c * tanh(logits / c)``."""
    vocab_limit: str | None = "unpadded_vocab_size"
    """Config attribute ``n``: the model keeps only its first ``n`` logits (a padded unembedding)."""
    attention: str | None = None
    """Path, inside each block, of the module whose output is the attention branch's contribution
    to the residual stream; ``""`` when the family has none to hook."""
    mlp: str | None = None
    """Path, inside each block, of the module whose output is the MLP branch's contribution to the
    residual stream; ``""`` when the family has none to hook (OPT's ``fc1``/``fc2`` are inline)."""
    branches_add_residual: tuple[str, ...] = ()
    """The branches (``"attn"``, ``"mlp"``) whose module returns ``residual + branch`` rather than
    the branch alone (BLOOM's both, MPT's MLP); hooks subtract the ``residual`` argument so that a
    branch's value is its contribution."""
    heads: str | None = None
    """Path, inside each block, of the attention's output projection, whose input holds the heads'
    outputs side by side (``[..., heads · d_head]``); ``""`` when the family has none to split."""
    neurons: str | None = None
    """Path, inside each block, of the MLP's last projection, whose input is the neurons'
    activations; ``""`` when the family has none (a mixture of experts)."""
    num_heads: str | None = None
    """Config attribute holding the number of attention heads (``None``: the first of
    :data:`~depthlens.model.block_parts.HEAD_COUNTS` that the config has)."""
    bfloat16_forward: bool = True
    """Whether the model's forward pass may run in bfloat16 when the decoding does; ``False`` keeps
    it in float32 for families whose per-layer KLs drift by more than 1% with it."""
    note: str = ""


GENERIC = FamilyRule()

_GRANITE = FamilyRule(embedding_multiplier="embedding_multiplier")
_POST_NORM = FamilyRule(
    final_norm=(),
    note="Post-norm blocks: the last block's output goes straight to the unembedding.",
)
_HYPER_CONNECTIONS = FamilyRule(
    final_norm=("model.hc_head", "model.norm"),
    note="Hyper-connections: states are [batch, seq, hc_mult, d]; hc_head merges the streams before the norm.",
)

_FLOAT32_FORWARD = FamilyRule(
    bfloat16_forward=False,
    note="Forward pass in float32 under --dtype auto/bfloat16: in bfloat16 gemma3-270m's per-layer KLs moved by "
         "1.2-2.1%, against 0.06% with only the decoding in bfloat16.",
)

FAMILY_RULES: dict[str, FamilyRule] = {
    "gemma3": _FLOAT32_FORWARD,
    "gemma3_text": _FLOAT32_FORWARD,
    "opt": FamilyRule(
        final_norm=("model.decoder.final_layer_norm", "model.decoder.project_out"),
        mlp="",
        note="OPT may project down after its final norm (word_embed_proj_dim); its MLP (fc1, fc2) is inline.",
    ),
    "bloom": FamilyRule(branches_add_residual=("attn", "mlp"), note="Attention and MLP modules add the residual themselves."),
    "granite": _GRANITE,
    "granite_swa": _GRANITE,
    "granitemoe": _GRANITE,
    "granitemoe_swa": _GRANITE,
    "granitemoehybrid": _GRANITE,
    "granitemoeshared": _GRANITE,
    "hyperclovax": FamilyRule(
        embedding_multiplier="embedding_multiplier",
        logit_multiplier="logits_scaling",
        logit_divisor=None,
        note="Multiplies its logits by logits_scaling, where Granite divides by it.",
    ),
    "falcon_h1": FamilyRule(embedding_multiplier="embedding_multiplier", logit_multiplier="lm_head_multiplier"),
    "mpt": FamilyRule(
        logit_multiplier=None,
        branches_add_residual=("mlp",),
        note="config.logit_scale exists but the model does not apply it; the MLP adds the residual itself.",
    ),
    "inkling_text": FamilyRule(
        logit_divisor="logits_mup_width_multiplier",
        note="Divides the normed state (so the logits) by the muP width multiplier.",
    ),
    "recurrent_gemma": FamilyRule(logit_softcap="logits_soft_cap"),
    "xlstm": FamilyRule(logit_softcap="output_logit_soft_cap"),
    "openai-gpt": _POST_NORM,
    "bert-generation": _POST_NORM,
    "xlnet": _POST_NORM,
    "trocr": FamilyRule(
        final_norm=(),
        note="Post-norm blocks; layernorm_embedding normalizes the embeddings, not the last state.",
    ),
    "modernbert-decoder": FamilyRule(
        final_norm=("model.final_norm", "lm_head"),
        note="A prediction head (dense, activation, norm) runs between the final norm and the decoder.",
    ),
    "deepseek_v4": _HYPER_CONNECTIONS,
    "hy_v4": _HYPER_CONNECTIONS,
    "qwen4_exp_text": FamilyRule(
        final_norm=("model.hyper_connection_mixer",),
        note="Hyper-connections: the mixer normalizes and merges the residual streams.",
    ),
    "longcat_flash": FamilyRule(
        blocks="model.layers",
        note="num_hidden_layers counts the two attention sublayers of each block.",
    ),
}
"""Per-family exceptions, keyed by ``config.model_type``. Register new ones with
:func:`register_family`."""


def register_family(model_type: str, rule: FamilyRule) -> None:
    """Teach depthlens a family whose parts the generic rules do not find."""
    FAMILY_RULES[model_type] = rule


@dataclass
class ModelParts:
    """The parts of one model that a lens uses; all modules are the model's own (shared weights)."""

    model_type: str
    model_name: str
    embedding: nn.Module
    blocks: nn.ModuleList
    final_norm: tuple[nn.Module, ...]
    unembedding: nn.Module
    embedding_multiplier: float | None = None
    logit_multiplier: float | None = None
    logit_divisor: float | None = None
    logit_softcap: float | None = None
    vocab_limit: int | None = None
    branches_add_residual: tuple[str, ...] = ()
    num_heads: int = 0
    """Attention heads per block (0 if the config does not say)."""
    bfloat16_forward: bool = True
    """Whether the forward pass may run in bfloat16 (:meth:`forward_dtype`)."""
    paths: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    """Where the parts live: ``blocks``, ``final_norm``, and inside each block ``attn`` and
    ``mlp`` (the modules whose outputs are the branches), ``heads`` and ``neurons`` (the
    attention's output projection and the MLP's last projection), ``attn_norm`` and ``mlp_norm``
    (the sandwich norms that end the branches); ``""`` where the family has no such module."""

    def branch(self, kind: str, index: int) -> nn.Module | None:
        """Block ``index``'s module at ``paths[kind]`` (``"attn"``, ``"mlp"``, ``"heads"``,
        ``"neurons"``, ``"attn_norm"``, ``"mlp_norm"``), or ``None`` where the family has none."""
        path = self.paths.get(kind) or ""
        try:
            return self.blocks[index].get_submodule(path) if path else None
        except AttributeError:
            return None

    def forward_dtype(self, products: torch.dtype) -> torch.dtype:
        """The dtype of the model's forward products when the decoding's are ``products``: the
        same, or float32 where the family's rule keeps its forward pass in float32."""
        return products if self.bfloat16_forward else torch.float32

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks ``L``; the residual stream has ``L + 1`` states."""
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        """Width of the residual stream, read off the first final-norm or unembedding weight."""
        for module in (*self.final_norm, self.unembedding):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                return weight.shape[-1] if module is self.unembedding else weight.shape[0]
        raise UnsupportedModelError("cannot tell the residual width: the unembedding has no weight")

    @property
    def vocab_size(self) -> int:
        """Number of logits the model produces (the unembedding's rows, less any padding)."""
        rows = self.unembedding.weight.shape[0]
        return rows if self.vocab_limit is None else min(rows, self.vocab_limit)

    def decode(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Decode residual states ``[..., d]`` into logits ``[..., vocab]`` exactly as the model
        decodes its last state: final norm, unembedding, then scaling and soft-capping.

        With ``vocab`` (token ids ``[k]``, each below :attr:`vocab_size`) only those logits are
        computed, ``[..., k]``, at ``k / vocab_size`` of the unembedding's cost when it is a
        linear layer.
        """
        for module in self.final_norm:
            hidden = module(_to_module(hidden, module))
        hidden = _to_module(hidden, self.unembedding)
        if vocab is None:
            logits = self.unembedding(hidden)[..., : self.vocab_size]
        elif isinstance(self.unembedding, nn.Linear):
            bias = None if self.unembedding.bias is None else self.unembedding.bias[vocab]
            logits = nn.functional.linear(hidden, self.unembedding.weight[vocab], bias)
        else:
            logits = self.unembedding(hidden)[..., vocab]
        if self.logit_multiplier is not None:
            logits = logits * self.logit_multiplier
        if self.logit_divisor is not None:
            logits = logits / self.logit_divisor
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[batch, seq, d]`` as they enter the residual stream, including any
        family-specific embedding scale but not absolute position embeddings (GPT-2's ``wpe``)."""
        embeddings = self.embedding(input_ids)
        if self.embedding_multiplier is not None:
            embeddings = embeddings * self.embedding_multiplier
        return embeddings

    def decoding_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Named weights that determine :meth:`decode`, in a fixed order (for fingerprints)."""
        named = []
        for index, module in enumerate((*self.final_norm, self.unembedding)):
            for name, tensor in sorted(module.state_dict().items()):
                named.append((f"{index}.{name}", tensor))
        return named


def _to_module(hidden: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``hidden`` on the device and in the floating dtype of ``module``'s first parameter."""
    parameter = next((p for p in module.parameters() if p.is_floating_point()), None)
    return hidden if parameter is None else hidden.to(parameter.device, parameter.dtype)


def find_parts(model: nn.Module) -> ModelParts:
    """Discover the embedding, blocks, final norm and unembedding of a causal LM.

    Raises :class:`UnsupportedModelError` naming the part that could not be found and how to
    register the family. ``model`` may also be another toolkit's wrapper of one
    (:func:`~depthlens.model.unwrap.unwrap_model`).
    """
    model = unwrap_model(model)
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", None) or getattr(config, "model_type", "?")
    rule = FAMILY_RULES.get(model_type, FAMILY_RULES.get(getattr(config, "model_type", ""), GENERIC))

    embedding = model.get_input_embeddings()
    unembedding = model.get_output_embeddings()
    if embedding is None or unembedding is None or not hasattr(unembedding, "weight"):
        raise _unsupported(model, model_type, "the input or output embedding (get_input_embeddings / get_output_embeddings)")

    blocks_path = rule.blocks or _find_blocks(model, getattr(text_config, "num_hidden_layers", None))
    if blocks_path is None:
        raise _unsupported(model, model_type, "the ModuleList of decoder blocks", "blocks")
    blocks = model.get_submodule(blocks_path)

    norm_paths = rule.final_norm if rule.final_norm is not None else _find_final_norm(model, blocks_path)
    if norm_paths is None:
        raise _unsupported(model, model_type, f"the final norm (tried {', '.join(FINAL_NORM_NAMES)} beside {blocks_path})", "final_norm")
    final_norm = tuple(m for m in (_optional_submodule(model, model_type, p) for p in norm_paths) if m is not None)

    def number(attribute: str | None) -> float | None:
        value = getattr(text_config, attribute, None) if attribute else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return ModelParts(
        model_type=model_type,
        model_name=str(getattr(config, "_name_or_path", "") or type(model).__name__),
        embedding=embedding,
        blocks=blocks,
        final_norm=final_norm,
        unembedding=unembedding,
        embedding_multiplier=number(rule.embedding_multiplier),
        logit_multiplier=number(rule.logit_multiplier),
        logit_divisor=number(rule.logit_divisor),
        logit_softcap=number(rule.logit_softcap),
        vocab_limit=None if (limit := number(rule.vocab_limit)) is None else int(limit),
        branches_add_residual=rule.branches_add_residual,
        num_heads=count_heads(text_config, rule.num_heads),
        bfloat16_forward=rule.bfloat16_forward,
        paths={
            "blocks": blocks_path,
            "final_norm": tuple(norm_paths),
            "attn": rule.attention if rule.attention is not None else find_branch(blocks[0], "attn"),
            "mlp": rule.mlp if rule.mlp is not None else find_branch(blocks[0], "mlp"),
            "heads": rule.heads if rule.heads is not None else find_projection(blocks[0], "attn"),
            "neurons": rule.neurons if rule.neurons is not None else find_projection(blocks[0], "mlp"),
            **sandwich_norms(blocks[0]),
        },
    )


def _find_blocks(model: nn.Module, num_layers: int | None) -> str | None:
    """Path of the shallowest ``ModuleList`` with ``num_layers`` entries (or the longest one)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if num_layers is not None:
        matching = [(name, m) for name, m in lists if len(m) == num_layers]
        if matching:
            return min(matching, key=lambda item: item[0].count("."))[0]
    if not lists:
        return None
    return max(lists, key=lambda item: (len(item[1]), -item[0].count(".")))[0]


def _find_final_norm(model: nn.Module, blocks_path: str) -> tuple[str, ...] | None:
    """Path of the final norm: a known name beside the blocks, else the only norm there."""
    parent_path = blocks_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    prefix = f"{parent_path}." if parent_path else ""
    for name in FINAL_NORM_NAMES:
        if isinstance(getattr(parent, name, None), nn.Module):
            return (prefix + name,)
    norms = [name for name, child in parent.named_children() if "norm" in type(child).__name__.lower()]
    return (prefix + norms[0],) if len(norms) == 1 else None


def _optional_submodule(model: nn.Module, model_type: str, path: str) -> nn.Module | None:
    """The module at ``path``; ``None`` if the config switched it off (the attribute is ``None``,
    as OPT's ``project_out``). A path that does not exist at all is an error."""
    parent_path, _, name = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        parent = None
    if parent is None or not hasattr(parent, name):
        raise _unsupported(model, model_type, f"the module {path!r} named by its family rule", "final_norm")
    return getattr(parent, name)


def _unsupported(model: nn.Module, model_type: str, what: str, field_name: str = "") -> UnsupportedModelError:
    how = (
        f" Register the family: depthlens.register_family({model_type!r}, "
        f"FamilyRule({field_name}=...)) with the module path(s) from print(model)."
        if field_name
        else ""
    )
    return UnsupportedModelError(
        f"cannot find {what} in {type(model).__name__} (model_type {model_type!r}).{how}"
    )


__all__ = ["FAMILY_RULES", "FamilyRule", "ModelParts", "find_parts", "register_family"]
