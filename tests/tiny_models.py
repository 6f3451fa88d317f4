"""Tiny random-weight causal LMs built from configs (no download), for every family we test.

They hide nothing: every bias a family has is switched on where its config offers the choice
(:data:`BIAS_SWITCHES`) and drawn non-zero, and every norm's gain is drawn away from 1
(:func:`perturb`), so that code which forgets a bias or a norm weight gives wrong numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import SimpleNamespace

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

VOCAB = 320
"""Matches the tiny tokenizer in conftest.py."""

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
)

FAMILY_DEFAULT = object()
"""An override value meaning: leave this :data:`TINY` key at the family's own default."""

_SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
_MLA = dict(
    num_key_value_heads=4,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    head_dim=4,
)
_MOE = dict(
    n_routed_experts=4,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
)
_LINEAR_ATTENTION = dict(
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
_MAMBA = dict(mamba_n_heads=8, mamba_d_state=16, mamba_chunk_size=8)
_MUP = dict(embedding_multiplier=3.0, logits_scaling=2.5)
_SWA = dict(head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8)

FAMILY_OVERRIDES: dict[str, dict[str, object]] = {
    "axk1": {**_MLA, **_MOE},
    "axk2": {**_MLA, **_MOE},
    "bamba": {**_MAMBA, "attn_layer_indices": [1]},
    "blt": {
        "encoder_hash_byte_group_vocab": 64,
        "patcher_config": {**_SMALL, "vocab_size": VOCAB, "num_hidden_layers": 1},
        "encoder_config": {**_SMALL, "vocab_size": VOCAB, "num_hidden_layers": 1, "hidden_size_global": 64},
        "decoder_config": {**_SMALL, "vocab_size": VOCAB, "num_hidden_layers": 3, "hidden_size_global": 64},
        "global_config": {**_SMALL, "hidden_size": 64, "num_hidden_layers": 2},
    },
    "codegen": {"rotary_dim": 4},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "dbrx": {
        "d_model": 32,  # hidden_size arrives too late for ffn_config, which copies d_model
        "attn_config": {"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
    },
    "deepseek_v2": {**_MLA, **_MOE},
    "deepseek_v3": {**_MLA, **_MOE, "first_k_dense_replace": 1},
    "deepseek_v32": {**_MLA, **_MOE, "first_k_dense_replace": 1},
    "dots1": {**_MOE, "first_k_dense_replace": 1},
    "dots3_note_text": {
        **_MLA,
        **_MOE,
        "index_head_dim": 8,
        "index_n_heads": 2,
        "index_topk": 4,
        "shared_experts_intermediate_size": 16,
    },
    "falcon_h1": {**_MAMBA, "mamba_d_ssm": 64, "embedding_multiplier": 3.0, "lm_head_multiplier": 0.5},
    "gemma3n_text": {
        "head_dim": 8,
        "num_kv_shared_layers": 0,
        "vocab_size_per_layer_input": VOCAB,
        "hidden_size_per_layer_input": 8,
        "laurel_rank": 8,
    },
    "glm_moe_dsa": {**_MLA, **_MOE},
    "gpt_neo": {"attention_types": [[["global", "local"], 1], [["global"], 1]]},
    "gptj": {"rotary_dim": 4},
    "granite": _MUP,
    "granite_swa": _MUP,
    "granitemoe": {**_MUP, "num_local_experts": 4},
    "granitemoe_swa": {**_MUP, "num_local_experts": 4},
    "granitemoehybrid": {**_MUP, **_MAMBA, "num_local_experts": 4, "shared_intermediate_size": 32},
    "granitemoeshared": {**_MUP, "num_local_experts": 4, "shared_intermediate_size": 32},
    "helium": {"head_dim": 8},
    "hunyuan_v1_dense": {"head_dim": 8},
    "hunyuan_v1_moe": {"head_dim": 8, "num_experts": 4, "moe_topk": 2},
    "hyperclovax": _MUP,
    "inkling_text": {**_MOE, **_SWA},
    "inkling2_text": {**_MOE, **_SWA},
    "kimi_linear": {**_MLA, **_MOE, "linear_head_dim": 8, "linear_num_heads": 4},
    "lfm2_moe": {
        "num_experts": 4,
        "num_dense_layers": 1,
        "moe_intermediate_size": 16,
        "layer_types": ["conv", "full_attention", "conv"],
    },
    "longcat_flash": {
        **_MLA,
        "num_hidden_layers": 6,  # counts two attention sublayers per block: 3 blocks
        "n_routed_experts": 4,
        "zero_expert_num": 2,
        "moe_topk": 2,
        "expert_ffn_hidden_size": 16,
    },
    "mamba2": {"num_heads": 8, "head_dim": 8, "n_groups": 1},
    "minicpm3": _MLA,
    "ministral": {"head_dim": 8},
    "mpt": {"logit_scale": 0.5},  # in the config, unused by the model
    "qwen3_5_moe_text": {**_MOE, **_LINEAR_ATTENTION, "head_dim": 8, "shared_expert_intermediate_size": 16},
    "qwen3_5_text": {**_LINEAR_ATTENTION, "head_dim": 8},
    "qwen3_next": {**_MOE, **_LINEAR_ATTENTION, "head_dim": 8, "shared_expert_intermediate_size": 16},
    "xlnet": {"max_position_embeddings": FAMILY_DEFAULT, "d_head": 8},
    "youtu": _MLA,
    "zamba": {
        "n_mamba_heads": 2,
        "layers_block_type": ["hybrid", "linear_attention", "hybrid"],
        "use_mamba_kernels": False,
    },
    "zamba2": {
        "n_mamba_heads": 4,
        "mamba_d_state": 16,
        "chunk_size": 8,
        "adapter_rank": 8,
        "layers_block_type": ["linear_attention", "hybrid", "linear_attention"],
        "use_mamba_kernels": False,
    },
}
"""Per-family config values beyond :data:`TINY`: what a family needs to build small and fast
(head dims, expert counts, layer type lists, SSM sizes), and scale factors set off 1 so that the
lens must apply them. One table for all families."""

_TOKEN_ID_NAMES = ("pad_token_id", "bos_token_id", "eos_token_id")
BIAS_SWITCHES = ("attention_bias", "mlp_bias")
"""Config switches that give a family's projections biases (Llama, Gemma, OLMo, …): set to
``True`` wherever the family's config has them, unless an override says otherwise."""


def tiny_config(model_type: str, **overrides: object) -> PretrainedConfig:
    """A config for ``model_type`` with 3 layers of width 32 and a 320-token vocabulary.

    :data:`FAMILY_OVERRIDES` supplies what a family needs beyond :data:`TINY`, every switch of
    :data:`BIAS_SWITCHES` the config has is on; special token ids
    that the default config puts outside the small vocabulary are moved to 0.
    """
    defaults = AutoConfig.for_model(model_type)
    switches = {name: True for name in BIAS_SWITCHES if getattr(defaults, name, None) is False}
    values = {**TINY, **switches, **FAMILY_OVERRIDES.get(model_type, {}), **overrides}
    config = AutoConfig.for_model(model_type, **{k: v for k, v in values.items() if v is not FAMILY_DEFAULT})
    for name in _TOKEN_ID_NAMES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= VOCAB:
            setattr(config, name, 0)
    return config


BIAS_STD = 0.1
"""Standard deviation of the noise given to every bias."""
GAIN_STD = 0.2
"""Standard deviation of the noise added to every norm's weight (its gain, 1 + w in Gemma's form)."""


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter named ``bias`` from N(0, BIAS_STD²) and add N(0, GAIN_STD²) noise to
    the weight of every norm module (a class whose name contains "Norm"), from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, parameter in module.named_parameters(recurse=False):
                if name == "bias":
                    parameter.copy_(BIAS_STD * torch.randn(parameter.shape, generator=generator))
                elif is_norm and name == "weight":
                    parameter.add_(GAIN_STD * torch.randn(parameter.shape, generator=generator))


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A float32 model in eval mode with random weights from ``seed``, biases and norm gains
    included (:func:`perturb`)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    perturb(model, seed)
    return model.eval()


def random_tuned_lens(model: PreTrainedModel, seed: int, std: float, bias: bool = True):
    """A tuned lens on ``model`` whose translators are drawn from N(0, std²) (weights, and biases
    when ``bias``), so that it differs from the logit lens at every layer but the last."""
    from depthlens import TunedLens

    lens = TunedLens(model)
    torch.manual_seed(seed)
    for translator in lens.translators:
        torch.nn.init.normal_(translator.weight, std=std)
        if bias:
            torch.nn.init.normal_(translator.bias, std=std)
    return lens


class LinearReadout:
    """A readout that is not a lens: logits ``h Wᵀ`` at layer 0, ``W [vocab, d]``."""

    kind = "linear"
    num_layers = 1

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.parts = SimpleNamespace(unembedding=SimpleNamespace(weight=weight), vocab_limit=None,
                                     d_model=weight.shape[1])

    def iter_logits(self, states: Sequence[torch.Tensor], layers: Iterable[int]) -> Iterator[tuple[int, torch.Tensor]]:
        for layer in layers:
            yield layer, states[layer] @ self.weight.T
