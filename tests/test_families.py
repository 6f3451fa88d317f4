"""Every text-only decoder family in transformers decodes its last residual state like the model.

The invariant: ``find_parts(model).decode(states[-1])`` reproduces the model's logits within
:data:`TOLERANCE` in float32, on a tiny random-weight model of each family.

Run as a script to rewrite ``docs/families.md`` from the survey of all families::

    python tests/test_families.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import VOCAB, tiny_model
from torch import nn
from transformers import CONFIG_MAPPING, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from depthlens.errors import UnsupportedModelError
from depthlens.model.architecture import (
    FAMILY_RULES,
    FamilyRule,
    ModelParts,
    find_parts,
    register_family,
)
from depthlens.model.hidden_states import capture

TOLERANCE = 1e-4
MIN_PASS_RATE = 0.8
DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"

REQUIRED = (
    "gpt2", "gpt_neo", "gptj", "gpt_neox", "opt", "bloom", "falcon", "llama", "mistral", "mixtral",
    "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "stablelm", "starcoder2",
    "olmo", "olmo2", "granite", "cohere",
)  # fmt: skip
"""Families that must pass, in the parametrized test and in the survey."""

OTHER_MODALITIES = ("vision", "audio", "image", "video", "speech", "vq")
"""Words that mark a sub-config as a non-text modality."""

WHY_IT_FAILS = {
    "cpmant": "CPM-Ant prepends prompt_length prompt positions to the stream and drops them before the head.",
    "gemma3n_text": "AltUp: blocks carry altup_num_inputs stacked streams, merged inline before the norm.",
    "hrm_text": "HRM runs its two block stacks repeatedly in H/L cycles; there is no single residual stream.",
    "inkling2_text": "Block attention residuals: the final state attends over earlier block outputs.",
    "xlnet": "XLNet's residual stream is time-major ([seq, batch, d]), the logits batch-major.",
}
"""What we know about the families that fail, for docs/families.md."""


@contextlib.contextmanager
def quiet_single_thread() -> Iterator[None]:
    """Run tiny models on one thread (more only adds overhead) without transformers' warnings."""
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread() -> Iterator[None]:
    with quiet_single_thread():
        yield


def random_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def head_input(parts: ModelParts, state: torch.Tensor) -> torch.Tensor:
    """``state`` after the modules between the last block and the unembedding."""
    for module in parts.final_norm:
        state = module(state)
    return state


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.shape == b.shape else float("inf")


# --------------------------------------------------------------------------- named families


@dataclasses.dataclass(frozen=True)
class Case:
    model_type: str
    overrides: dict = dataclasses.field(default_factory=dict)
    transforms: tuple[str, ...] = ()
    """``ModelParts`` fields that must matter: without them decode (or embed) misses."""
    embeds_exactly: bool = True
    """``parts.embed(ids)`` is state 0: no absolute position embeddings or embedding norm."""
    scales_embeddings: bool = False
    """State 0 is not the raw row of the embedding matrix."""


CASES = {
    **{family: Case(family) for family in REQUIRED},
    "gpt2": Case("gpt2", embeds_exactly=False),  # absolute position embeddings, here and in OPT
    "gpt_neo": Case("gpt_neo", embeds_exactly=False),
    "opt": Case("opt", embeds_exactly=False),
    "bloom": Case("bloom", embeds_exactly=False),  # word_embeddings_layernorm after the embedding
    "gemma": Case("gemma", scales_embeddings=True),
    "gemma2": Case("gemma2", {"final_logit_softcapping": 0.2}, ("logit_softcap",), scales_embeddings=True),
    "gemma3_text": Case("gemma3_text", {"final_logit_softcapping": 0.2}, ("logit_softcap",), scales_embeddings=True),
    "cohere": Case("cohere", {"logit_scale": 8.0}, ("logit_multiplier",)),
    "granite": Case(
        "granite",
        {"logits_scaling": 0.125, "embedding_multiplier": 12.0},
        ("logit_divisor", "embedding_multiplier"),
        scales_embeddings=True,
    ),
    "opt-project-out": Case("opt", {"word_embed_proj_dim": 16}, embeds_exactly=False),
    "opt-post-norm": Case("opt", {"do_layer_norm_before": False}, embeds_exactly=False),
    "inkling-padded-vocab": Case("inkling_text", {"unpadded_vocab_size": 300}, ("vocab_limit",)),
    "llama-tied": Case("llama", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_family_decodes_its_last_state_like_the_model(case: Case) -> None:
    model = tiny_model(case.model_type, **case.overrides)  # norms already off their init (weight 1, bias 0)
    parts, ids = find_parts(model), random_ids()
    hs = capture(model, ids, parts=parts)

    assert len(hs.states) == model.config.num_hidden_layers + 1
    assert gap(parts.decode(hs.states[-1]), hs.logits) <= TOLERANCE

    with torch.no_grad():
        reported = model(ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
        assert gap(reported, head_input(parts, hs.states[-1])) <= TOLERANCE
    if parts.final_norm:
        pre_norm = reported.shape != hs.states[-1].shape or gap(reported, hs.states[-1]) > 1e-3
        assert pre_norm, "states[-1] must be the state before the final norm"

    if case.embeds_exactly:
        assert gap(parts.embed(ids), hs.states[0]) <= TOLERANCE
    if case.scales_embeddings:
        assert gap(parts.embedding.weight[ids], hs.states[0]) > 1e-3
    for transform in case.transforms:
        without = dataclasses.replace(parts, **{transform: None})
        assert max(gap(without.decode(hs.states[-1]), hs.logits), gap(without.embed(ids), hs.states[0])) > 1e-3


def test_opt_projects_down_after_its_final_norm() -> None:
    parts = find_parts(tiny_model("opt", word_embed_proj_dim=16))
    assert parts.paths["final_norm"] == ("model.decoder.final_layer_norm", "model.decoder.project_out")
    assert (parts.d_model, parts.unembedding.weight.shape[1]) == (32, 16)


def test_post_norm_opt_has_no_final_norm() -> None:
    assert find_parts(tiny_model("opt", do_layer_norm_before=False)).final_norm == ()


def test_llama_comes_tied_and_untied() -> None:
    tied, untied = find_parts(tiny_model("llama", tie_word_embeddings=True)), find_parts(tiny_model("llama"))
    assert tied.unembedding.weight is tied.embedding.weight
    assert untied.unembedding.weight is not untied.embedding.weight
    assert not torch.equal(untied.unembedding.weight, untied.embedding.weight)


BLOCK_PARTS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj", ""),
    "gpt2": ("attn.c_proj", "mlp.c_proj", ""),
    "opt": ("self_attn.out_proj", "fc2", ""),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h", ""),
    "gptj": ("attn.out_proj", "mlp.fc_out", ""),
    "gpt_neo": ("attn.attention.out_proj", "mlp.c_proj", ""),
    "phi": ("self_attn.dense", "mlp.fc2", ""),
    "bloom": ("self_attention.dense", "mlp.dense_4h_to_h", ""),
    "falcon": ("self_attention.dense", "mlp.dense_4h_to_h", ""),
    "mpt": ("attn.out_proj", "ffn.down_proj", ""),
    "gemma2": ("self_attn.o_proj", "mlp.down_proj", "post_attention_layernorm"),
    "olmo2": ("self_attn.o_proj", "mlp.down_proj", "post_attention_layernorm"),
    "mixtral": ("self_attn.o_proj", "", ""),
}
"""Per family, inside a block: the attention's output projection, the MLP's last projection
(none in a mixture of experts) and the sandwich norm after attention (none in most)."""


@pytest.mark.parametrize("family", BLOCK_PARTS)
def test_the_projections_and_sandwich_norms_inside_a_block(family: str) -> None:
    model = tiny_model(family)
    parts = find_parts(model)
    heads, neurons, attn_norm = BLOCK_PARTS[family]
    assert (parts.paths["heads"], parts.paths["neurons"], parts.paths["attn_norm"]) == BLOCK_PARTS[family]
    assert parts.paths["mlp_norm"] == ("post_feedforward_layernorm" if attn_norm else "")
    assert parts.num_heads == model.config.num_attention_heads == 4
    assert parts.branch("heads", 0) is parts.blocks[0].get_submodule(heads)
    assert (parts.branch("neurons", 2) is None) == (not neurons)


def test_a_family_rule_names_the_projections_and_the_head_count(monkeypatch) -> None:
    monkeypatch.setitem(FAMILY_RULES, "llama", FamilyRule(heads="", neurons="mlp.up_proj", num_heads="num_key_value_heads"))
    parts = find_parts(tiny_model("llama"))
    assert (parts.paths["heads"], parts.paths["neurons"], parts.num_heads) == ("", "mlp.up_proj", 2)
    assert parts.branch("heads", 1) is None and parts.branch("neurons", 1) is parts.blocks[1].mlp.up_proj


# --------------------------------------------------------------------------- all families


def exclusion(model_type: str) -> str | None:
    """Why ``model_type`` is not a text-only decoder family, or ``None`` if it is.

    Decided from the config class alone: encoder-decoder configs, configs with a sub-config for
    another modality (vision, audio, ...), configs that wrap a text model in ``text_config``,
    and encoders that transformers also registers a masked-LM head for.
    """
    config_class = CONFIG_MAPPING[model_type]
    if config_class.is_encoder_decoder:
        return "encoder-decoder"
    modalities = [name for name in config_class.sub_configs if any(word in name for word in OTHER_MODALITIES)]
    if modalities:
        return f"multimodal ({', '.join(modalities)})"
    if "text_config" in config_class.sub_configs:
        return "wraps a text model (text_config)"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder (also has a masked-LM head)"
    return None


def text_decoder_families() -> list[str]:
    return [family for family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if exclusion(family) is None]


def invariant_failure(model_type: str) -> str | None:
    """``None`` if a tiny ``model_type`` decodes its last state like the model, else why not."""
    try:
        model = tiny_model(model_type)
        parts = find_parts(model)
        hs = capture(model, random_ids(), parts=parts)
        decoded = parts.decode(hs.states[-1])
    except Exception as error:  # noqa: BLE001 (a family that cannot be built or decoded fails with its reason)
        return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
    if decoded.shape != hs.logits.shape:
        return f"decode(states[-1]) has shape {tuple(decoded.shape)}, the logits {tuple(hs.logits.shape)}"
    off = gap(decoded, hs.logits)
    return None if off <= TOLERANCE else f"decode(states[-1]) is {off:.1e} off the logits"


def survey() -> dict[str, str | None]:
    """Every text-only decoder family and why it fails (``None`` when it passes)."""
    return {family: invariant_failure(family) for family in text_decoder_families()}


def test_required_families_are_text_decoders() -> None:
    assert set(REQUIRED) <= set(text_decoder_families())


def test_survey_of_all_text_decoder_families() -> None:
    results = survey()
    failures = {family: reason for family, reason in results.items() if reason is not None}
    report = "\n".join(f"  {family}: {reason}" for family, reason in failures.items())
    print(f"\n{len(results) - len(failures)}/{len(results)} text-only decoder families pass; failures:\n{report}")
    assert not set(REQUIRED) & set(failures), report
    assert (len(results) - len(failures)) / len(results) >= MIN_PASS_RATE, report
    if transformers.__version__ == documented_transformers_version():
        # The README and docs/families.md name the failures: hold the table to exactly those.
        assert set(failures) == set(WHY_IT_FAILS) == documented_failures(), report
        assert f"**{len(results) - len(failures)} of {len(results)} pass" in DOC.read_text()


def documented_transformers_version() -> str:
    """The transformers version docs/families.md was generated with."""
    return DOC.read_text().split("transformers ", 1)[1].split("'s", 1)[0]


def documented_failures() -> set[str]:
    """The families docs/families.md lists as failing."""
    return {line.split("`")[1] for line in DOC.read_text().splitlines() if "| **fail** |" in line}


# --------------------------------------------------------------------------- unsupported models


class OddConfig(PretrainedConfig):
    model_type = "depthlens_odd"
    vocab_size: int = VOCAB
    hidden_size: int = 16
    num_hidden_layers: int = 2
    sequential_blocks: bool = False


class Squash(nn.Module):
    """A final norm that neither its name nor its class gives away."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 2.0, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * x / x.norm(dim=-1, keepdim=True)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.mix(x))


class OddLM(PreTrainedModel):
    """A causal LM whose final norm is a ``Squash`` and, with ``sequential_blocks``, whose blocks
    sit in an ``nn.Sequential`` instead of a ``ModuleList``."""

    config_class = OddConfig

    def __init__(self, config: OddConfig) -> None:
        super().__init__(config)
        blocks = [Block(config.hidden_size) for _ in range(config.num_hidden_layers)]
        self.tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.stack = nn.Sequential(*blocks) if config.sequential_blocks else nn.ModuleList(blocks)
        self.squash = Squash(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, **_: object) -> CausalLMOutput:
        hidden = self.tokens(input_ids)
        for block in self.stack:
            hidden = block(hidden)
        return CausalLMOutput(logits=self.head(self.squash(hidden)))


@pytest.mark.parametrize(
    ("sequential_blocks", "missing", "field"),
    [(True, "ModuleList of decoder blocks", "blocks"), (False, "final norm", "final_norm")],
)
def test_unsupported_model_names_the_missing_part_until_registered(
    sequential_blocks: bool, missing: str, field: str
) -> None:
    model = OddLM(OddConfig(sequential_blocks=sequential_blocks)).eval()
    with pytest.raises(UnsupportedModelError) as error:
        find_parts(model)
    message = str(error.value)
    assert missing in message and "register_family('depthlens_odd'" in message
    assert f"FamilyRule({field}=" in message

    register_family("depthlens_odd", FamilyRule(blocks="stack", final_norm=("squash",)))
    try:
        parts = find_parts(model)
        hs = capture(model, random_ids(), parts=parts)
    finally:
        del FAMILY_RULES["depthlens_odd"]
    assert parts.final_norm == (model.squash,) and len(hs.states) == 3
    assert gap(parts.decode(hs.states[-1]), hs.logits) <= TOLERANCE


# --------------------------------------------------------------------------- docs/families.md


def families_markdown(results: dict[str, str | None]) -> str:
    passed = sum(reason is None for reason in results.values())
    excluded = {family: exclusion(family) for family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if family not in results}
    lines = [
        "# Model families",
        "",
        "Generated by `python tests/test_families.py`; do not edit by hand.",
        "",
        (f"Every `model_type` in transformers {transformers.__version__}'s `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` "
         "that is a text-only decoder, built tiny from its config with random weights "
         "(`tests/tiny_models.py`), norms moved off their init. A family passes when "
         f"`find_parts(model).decode(states[-1])` reproduces the model's logits within {TOLERANCE:g} "
         "(float32, a [2, 7] batch of random tokens)."),
        "",
        ("A family is left out when its config class is encoder-decoder, has a sub-config for another "
         f"modality ({', '.join(OTHER_MODALITIES)}), wraps a text model in `text_config`, or belongs to "
         "an encoder that transformers also registers a masked-LM head for."),
        "",
        (f"**{passed} of {len(results)} pass ({100 * passed / len(results):.1f}%); "
         f"{len(results) - passed} fail.**"),
        "",
        "| Family | Result | Reason |",
        "| --- | --- | --- |",
    ]
    for family, reason in results.items():
        if reason is None:
            lines.append(f"| `{family}` | pass | |")
        else:
            known = f"{WHY_IT_FAILS[family]} " if family in WHY_IT_FAILS else ""
            lines.append(f"| `{family}` | **fail** | {known}({reason.replace('|', '/')}) |")
    lines += ["", f"## Left out ({len(excluded)})", "", "| Family | Why |", "| --- | --- |"]
    lines += [f"| `{family}` | {why} |" for family, why in excluded.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with quiet_single_thread():
        survey_results = survey()
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(families_markdown(survey_results))
    passing = sum(reason is None for reason in survey_results.values())
    print(f"{passing}/{len(survey_results)} pass; wrote {DOC}")
    sys.exit(0 if passing / len(survey_results) >= MIN_PASS_RATE else 1)
