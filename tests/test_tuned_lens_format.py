"""tuned-lens files in and out, checked against what tuned-lens itself wrote and computed.

The golden files in ``tests/golden/tuned_lens`` come from tuned-lens 0.2.0, 0.1.0 and 0.0.5 run in
an environment of their own (``benchmarks/golden/tuned_lens_golden.sh``): two tiny random models
(GPT-2 with a tied unembedding and LayerNorm, Llama untied with RMSNorm; random non-zero biases,
norm gains away from 1), a lens per release with random translators, saved by the release's own
``save``, and the release's own per-layer logits ``lens(hidden_states[i], i)`` on fixed tokens.

Tolerances are first-order rounding bounds (:func:`decode_bound`): float32 sums of ``n`` terms are
off by at most ``n·eps`` times the sum of the terms' sizes, carried through the translator, the
final norm (by its Jacobian, computed in float64) and the unembedding. Both tuned-lens and depthlens
stay within that bound of the exact answer, so they agree within twice it.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import random_tuned_lens, tiny_model
from transformers import AutoModelForCausalLM

from depthlens.errors import LensFileError
from depthlens.lenses import registry
from depthlens.lenses.tuned import TunedLens
from depthlens.lenses.tuned_lens_format import (
    TunedLensHashWarning,
    detect,
    export_tuned_lens,
    load_tuned_lens_folder,
    unembedding_hash,
)
from depthlens.model.architecture import ModelParts, find_parts
from depthlens.model.hidden_states import capture

GOLDEN = Path(__file__).parent / "golden" / "tuned_lens"
EPS = torch.finfo(torch.float32).eps
FAMILIES = ("gpt2", "llama")
READS = [("gpt2", "0.2.0"), ("gpt2", "0.2.0_fp16"), ("gpt2", "0.1.0"), ("gpt2", "0.0.5"),
         ("llama", "0.2.0"), ("llama", "0.2.0_fp16"), ("llama", "0.1.0")]
"""Every golden lens: 0.0.5 predates Llama (it decodes without an RMSNorm), so it wrote GPT-2's only."""


@cache
def golden_model(family: str) -> tuple[torch.nn.Module, ModelParts]:
    """The golden tiny model, loaded by transformers 5 from the files transformers 4 wrote."""
    model = AutoModelForCausalLM.from_pretrained(GOLDEN / family / "model", dtype=torch.float32).eval()
    return model, find_parts(model)


def outputs(family: str, tag: str) -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / family / f"outputs_{tag}.safetensors")


def load_quietly(folder: Path, parts: ModelParts) -> TunedLens:
    """Load, failing on any warning (a golden lens matches its model's unembedding)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_tuned_lens_folder(folder, parts)


def decode_bound(parts: ModelParts, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 input_error: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bound ``[..., vocab]`` on |float32 logits − exact| for ``h + W h + b`` decoded by ``parts``.

    ``hidden [..., d]``; ``input_error`` bounds the error already in ``hidden`` (per element).
    Translator: ``d + 2`` terms per output; the norm's own rounding is ``(d + 4)·eps`` relative to
    its input (mean, variance, scale) plus ``eps`` for its output; unembedding: ``d`` terms.
    """
    assert parts.logit_multiplier is None and parts.logit_divisor is None and parts.logit_softcap is None
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d).double()
    w, b = weight.double(), bias.double()
    t = h + h @ w.T + b
    carried = torch.as_tensor(input_error, dtype=torch.float64).expand_as(h) @ (torch.eye(d) + w).abs().T
    e_t = (d + 2) * EPS * (h.abs() + h.abs() @ w.abs().T + b.abs()) + carried
    norms = [_double(module) for module in parts.final_norm]

    def norm(x: torch.Tensor) -> torch.Tensor:
        for module in norms:
            x = module(x).double()
        return x

    jacobian = torch.func.vmap(torch.func.jacrev(norm))(t)
    n = norm(t)
    e_n = ((jacobian.abs() @ (e_t + (d + 4) * EPS * t.abs()).unsqueeze(-1)).squeeze(-1) + EPS * n.abs())
    u = parts.unembedding.weight.detach().double().abs()
    bound = e_n @ u.T + d * EPS * (n.abs() @ u.T)
    return bound.reshape(*hidden.shape[:-1], -1)


def _double(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).double()


def translator(lens: TunedLens, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    return lens.translators[layer].weight.detach(), lens.translators[layer].bias.detach()


def copy_lens(tmp_path: Path, family: str, tag: str) -> Path:
    folder = tmp_path / f"{family}_{tag}"
    shutil.copytree(GOLDEN / family / f"lens_{tag}", folder)
    return folder


# Our reading of tuned-lens's files reproduces tuned-lens's own per-layer outputs.


@pytest.mark.parametrize(("family", "tag"), READS)
def test_reads_each_release_as_tuned_lens_computes_it(family, tag):
    """Decoding tuned-lens's own hidden states, every layer matches tuned-lens's logits."""
    _, parts = golden_model(family)
    lens = load_quietly(GOLDEN / family / f"lens_{tag}", parts)
    golden = outputs(family, tag)
    assert golden["logits"].shape[0] == lens.num_layers == 3
    for layer in range(lens.num_layers):
        hidden = golden["hidden"][layer]
        ours = lens(hidden, layer)
        bound = 2 * decode_bound(parts, hidden, *translator(lens, layer))
        assert (ours - golden["logits"][layer]).abs().le(bound).all(), f"layer {layer}"
        assert bound.max() < 1e-3 * golden["logits"][layer].abs().max()  # the check has teeth


@pytest.mark.parametrize("family", FAMILIES)
def test_end_to_end_on_our_own_hidden_states(family):
    """depthlens's states (transformers 5) are tuned-lens's ``hidden_states[i]`` (transformers 4),
    state ``i`` goes to translator ``i``, and layer ``L`` is the model's own output."""
    model, parts = golden_model(family)
    lens = load_quietly(GOLDEN / family / "lens_0.2.0", parts)
    golden = outputs(family, "0.2.0")
    states = capture(model, golden["input_ids"])
    config = model.config.to_dict()
    # Each block's longest float32 sums: d (projections), the MLP's width, seq (attention).
    inner = config.get("intermediate_size") or config.get("n_inner")
    terms = parts.d_model + inner + golden["input_ids"].shape[1]
    for layer in range(lens.num_layers + 1):
        state_error = layer * terms * EPS * states[layer].abs().max()
        if layer < lens.num_layers:
            assert (states[layer] - golden["hidden"][layer]).abs().max() <= 2 * state_error
            expected, (weight, bias) = golden["logits"][layer], translator(lens, layer)
        else:
            expected, weight, bias = golden["model_logits"], torch.zeros(parts.d_model, parts.d_model), torch.zeros(parts.d_model)
        bound = 2 * decode_bound(parts, states[layer], weight, bias, state_error)
        assert (lens(states[layer], layer) - expected).abs().le(bound).all(), f"layer {layer}"


def test_float16_file_reads_as_its_float32_values():
    """A float16 params.pt gives float32 translators holding exactly the float16 values."""
    _, parts = golden_model("gpt2")
    lens = load_quietly(GOLDEN / "gpt2" / "lens_0.2.0_fp16", parts)
    saved = torch.load(GOLDEN / "gpt2" / "lens_0.2.0_fp16" / "params.pt", weights_only=True)
    assert saved["1.weight"].dtype == torch.float16
    assert lens.translators[1].weight.dtype == torch.float32
    assert torch.equal(lens.translators[1].weight, saved["1.weight"].float())
    assert torch.equal(lens.translators[2].bias, saved["2.bias"].float())


def test_layouts_map_onto_the_same_states(tmp_path):
    """The 0.0.x layout (input_translator = state 0, layer_translators.j = state j + 1) and a
    ``layer_translators.`` prefix without input_translator (= state i) are read as documented."""
    _, parts = golden_model("gpt2")
    old = torch.load(GOLDEN / "gpt2" / "lens_0.0.5" / "params.pt", weights_only=True)
    lens = load_quietly(GOLDEN / "gpt2" / "lens_0.0.5", parts)
    assert torch.equal(lens.translators[0].weight, old["input_translator.weight"])
    assert torch.equal(lens.translators[2].bias, old["layer_translators.1.bias"])
    new = torch.load(GOLDEN / "gpt2" / "lens_0.2.0" / "params.pt", weights_only=True)
    folder = copy_lens(tmp_path, "gpt2", "0.2.0")
    torch.save({f"layer_translators.{key}": value for key, value in new.items()}, folder / "params.pt")
    config = json.loads((folder / "config.json").read_text())
    config["num_layers"] = config.pop("num_hidden_layers")
    (folder / "config.json").write_text(json.dumps(config))
    prefixed = load_quietly(folder, parts)
    for i in range(3):
        assert torch.equal(prefixed.translators[i].weight, new[f"{i}.weight"])
        assert torch.equal(prefixed.translators[i].bias, new[f"{i}.bias"])


# The unembedding hash.


@pytest.mark.parametrize("family", FAMILIES)
def test_unembedding_hash_is_tuned_lens_hash(family):
    _, parts = golden_model(family)
    config = json.loads((GOLDEN / family / "lens_0.2.0" / "config.json").read_text())
    assert unembedding_hash(parts) == config["unembed_hash"]
    april = json.loads((GOLDEN / family / "lens_0.1.0" / "config.json").read_text())
    assert unembedding_hash(parts) == april["unemebd_hash"]  # tuned-lens 0.1.0's spelling


@pytest.mark.parametrize(("tag", "key"), [("0.2.0", "unembed_hash"), ("0.1.0", "unemebd_hash")])
def test_either_hash_spelling_is_checked(tmp_path, tag, key):
    """A lens whose hash (under either spelling) is not the model's warns what that means."""
    _, parts = golden_model("gpt2")
    folder = copy_lens(tmp_path, "gpt2", tag)
    config = json.loads((folder / "config.json").read_text())
    assert key in config
    config[key] = "0" * 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(TunedLensHashWarning, match="trained for another unembedding matrix") as caught:
        load_tuned_lens_folder(folder, parts)
    assert "depthlens-golden/tiny-gpt2" in str(caught[0].message) and "\n" not in str(caught[0].message)


def test_lens_for_another_model_of_the_same_shape_warns():
    """The GPT-2 lens fits the Llama model's shapes (3 layers of 16) but not its unembedding."""
    _, parts = golden_model("llama")
    with pytest.warns(TunedLensHashWarning, match=r"differs from this model's .*another model, revision or fine-tune"):
        load_tuned_lens_folder(GOLDEN / "gpt2" / "lens_0.2.0", parts)


def test_old_layout_checks_its_stored_unembedding():
    _, parts = golden_model("llama")
    with pytest.warns(TunedLensHashWarning, match="copy of the unembedding differs"):
        load_tuned_lens_folder(GOLDEN / "gpt2" / "lens_0.0.5", parts)


# Export: a lens trained here, for tuned-lens users.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_export_import_round_trip(tmp_path, dtype):
    model = tiny_model("llama", seed=3)
    lens = random_tuned_lens(model, seed=4, std=0.05)
    export_tuned_lens(lens, tmp_path / "lens", dtype=dtype)
    state = torch.load(tmp_path / "lens" / "params.pt", weights_only=True)
    assert sorted(state) == sorted(f"{i}.{name}" for i in range(3) for name in ("weight", "bias"))
    assert all(tensor.dtype == dtype for tensor in state.values())
    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["d_model"] == 32 and config["lens_type"] == "linear_tuned_lens"
    assert config["unembed_hash"] == unembedding_hash(lens.parts)
    assert detect(tmp_path / "lens")
    back = load_quietly(tmp_path / "lens", lens.parts)
    for ours, theirs in zip(lens.translators, back.translators):
        assert torch.equal(theirs.weight, ours.weight.detach().to(dtype).float())
        assert torch.equal(theirs.bias, ours.bias.detach().to(dtype).float())


@pytest.mark.parametrize("family", FAMILIES)
def test_tuned_lens_loaded_our_export(family, tmp_path):
    """The recorded check: tuned-lens 0.2.0 loaded depthlens's export of a lens for the golden
    model without a warning and reproduced depthlens's per-layer logits. Our export still writes
    the config keys that check saw."""
    check = json.loads((GOLDEN / family / "export_check.json").read_text())
    assert check["agree"] and check["hash_matches"] and check["warnings"] == []
    assert max(check["max_abs_diff_per_layer"]) <= check["tolerance"]
    _, parts = golden_model(family)
    export_tuned_lens(TunedLens(parts), tmp_path / "lens")
    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    assert set(config) == set(check["lens_dir_config"])
    assert config["unembed_hash"] == check["lens_dir_config"]["unembed_hash"]


# Files that cannot be used: one clear line each.


def _one_line_error(folder: Path, parts: ModelParts, match: str) -> None:
    with pytest.raises(LensFileError, match=match) as raised:
        load_tuned_lens_folder(folder, parts)
    assert "\n" not in str(raised.value)


def test_lens_for_another_width_is_refused():
    parts = find_parts(tiny_model("llama"))
    _one_line_error(GOLDEN / "gpt2" / "lens_0.2.0", parts, r"3 layers of width 16 .*has 3 layers of width 32; load the model")


def test_translator_of_the_wrong_shape_is_refused(tmp_path):
    _, parts = golden_model("gpt2")
    folder = copy_lens(tmp_path, "gpt2", "0.2.0")
    state = torch.load(folder / "params.pt", weights_only=True)
    state["1.weight"] = state["1.weight"][:, :8]
    torch.save(state, folder / "params.pt")
    _one_line_error(folder, parts, r"translator 1 weight is shape \(16, 8\), expected \(16, 16\)")
    del state["2.bias"], state["2.weight"]
    torch.save(state, folder / "params.pt")
    _one_line_error(folder, parts, r"translators for states \[0, 1\], expected 0 … 2")


@pytest.mark.parametrize(("key", "value", "match"), [
    ("lens_type", "low_rank_tuned_lens", "reads only 'linear_tuned_lens'"),
    ("include_input", False, "translator for the embeddings"),
    ("reuse_unembedding", False, "model's own unembedding"),
])
def test_lens_kinds_depthlens_cannot_decode_are_refused(tmp_path, key, value, match):
    _, parts = golden_model("gpt2")
    folder = copy_lens(tmp_path, "gpt2", "0.0.5")
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    _one_line_error(folder, parts, match)


def test_pickle_of_objects_is_refused(tmp_path):
    _, parts = golden_model("gpt2")
    folder = copy_lens(tmp_path, "gpt2", "0.2.0")
    torch.save({"0.weight": torch.zeros(16, 16), "note": Path("x")}, folder / "params.pt")
    _one_line_error(folder, parts, "weights_only=True")


# The readout registry.


def test_registry_recognises_a_tuned_lens_folder(tmp_path):
    model, parts = golden_model("gpt2")
    assert registry.kind_of(GOLDEN / "gpt2" / "lens_0.2.0") == "tuned-lens"
    assert registry.kind_of(GOLDEN / "gpt2" / "lens_0.0.5") == "tuned-lens"
    readout = registry.load_readout(GOLDEN / "gpt2" / "lens_0.2.0", model)
    golden = outputs("gpt2", "0.2.0")
    assert torch.allclose(readout(golden["hidden"][1], 1), golden["logits"][1], rtol=0, atol=1e-4)
    TunedLens(parts).save_pretrained(tmp_path / "ours")
    assert not detect(tmp_path / "ours") and registry.kind_of(tmp_path / "ours") == "tuned"
    (tmp_path / "half").mkdir()
    shutil.copy(GOLDEN / "gpt2" / "lens_0.2.0" / "config.json", tmp_path / "half")
    assert not detect(tmp_path / "half")
