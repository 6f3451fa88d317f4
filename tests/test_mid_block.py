"""Lenses inside a block: mid states ``resid.i + attn.i``, their lens, its training, evaluation and half-layer rows."""

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from depthlens.analysis.drift.transfer import transfer_matrix
from depthlens.analysis.evaluate import evaluate_held_out
from depthlens.analysis.trajectory import Trajectory
from depthlens.analysis.trajectory_grid import trajectory_grid
from depthlens.analysis.trajectory_halves import half_layer_trajectory, interleave
from depthlens.apps.cli import main
from depthlens.errors import DriftError, LayerError, LensFileError, TrainingError, TrajectoryError
from depthlens.lenses.logit import LogitLens
from depthlens.lenses.mid import MidTunedLens
from depthlens.lenses.registry import kind_of, load_readout
from depthlens.lenses.tuned import TunedLens
from depthlens.lenses.tuned_lens_format import export_tuned_lens
from depthlens.model.hidden_states import capture, capture_sites
from depthlens.model.load import load_model
from depthlens.text.data import TextSource
from depthlens.training.config import TrainConfig
from depthlens.training.train import train_lens
from depthlens.viz.report import comparison_table

SMALL = {"chunk_len": 16, "batch_tokens": 32, "init_tokens": 256, "checkpoint_minutes": 1e9}
TEXT = "Fair is foul, and foul is fair: hover through the fog and filthy air."


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """Two tragedies of the built-in corpus as a local .jsonl file, one scene a line."""
    corpus = TextSource("shakespeare")
    scenes = [d for split in ("train", "validation") for d in corpus.documents(split) if d.startswith(("Macbeth", "Hamlet"))]
    path = tmp_path_factory.mktemp("text") / "plays.jsonl"
    path.write_text("".join(json.dumps({"text": scene}) + "\n" for scene in scenes))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny llama whose layers disagree enough for a lens to have something to learn."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0, initializer_range=0.3).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def trained(loaded, text, tmp_path_factory):
    """A block-output tuned lens and a lens inside the blocks, each trained 20 steps on ``loaded``."""
    model, tokenizer = loaded
    runs = tmp_path_factory.mktemp("runs")
    mid = train_lens(model, tokenizer, text, 640, site="mid", out=runs / "mid", **SMALL)
    block = train_lens(model, tokenizer, text, 640, out=runs / "block", **SMALL)
    return block, mid


def _inputs_of(modules) -> tuple[dict[int, torch.Tensor], list]:
    seen: dict[int, torch.Tensor] = {}
    handles = [module.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
               for i, module in enumerate(modules)]
    return seen, handles


@pytest.mark.parametrize(("family", "norm"), [("llama", "post_attention_layernorm"), ("gemma3_text", "pre_feedforward_layernorm"),
                                              ("gpt2", "ln_2")])
def test_a_mid_state_is_what_a_sequential_block_feeds_its_mlp_norm(family, norm):
    model = tiny_model(family)
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    seen, handles = _inputs_of([getattr(block, norm) for block in blocks])
    ids = torch.randint(0, 300, (2, 9))
    try:
        sites = capture_sites(model, ids, sites=("block", "mid"))
    finally:
        for handle in handles:
            handle.remove()
    mid, block = sites["mid"], sites["block"]
    assert mid.site == "mid" and block.site == "block"
    for i in range(len(blocks)):
        torch.testing.assert_close(mid[i], seen[i], rtol=0, atol=1e-6)
        assert not torch.allclose(block[i], seen[i], atol=1e-3)
    assert torch.equal(mid[len(blocks)], block[len(blocks)])
    assert torch.equal(capture(model, ids, site="mid")[1], mid[1]) and torch.equal(capture(model, ids)[1], block[1])


def test_a_parallel_block_s_mid_state_is_its_output_less_its_mlp():
    model = tiny_model("gptj")
    seen: dict[int, torch.Tensor] = {}
    handles = [block.mlp.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out.detach().clone()))
               for i, block in enumerate(model.transformer.h)]
    ids = torch.randint(0, 300, (1, 7))
    try:
        sites = capture_sites(model, ids, sites=("mid", "block"))
    finally:
        for handle in handles:
            handle.remove()
    for i in range(len(model.transformer.h)):
        torch.testing.assert_close(sites["mid"][i], sites["block"][i + 1] - seen[i], rtol=0, atol=1e-5)


def test_the_least_squares_start_finds_the_identity_where_the_mid_state_is_the_output(text, tiny_tokenizer, tmp_path):
    """With the last block's MLP silenced, mid state L − 1 *is* the last state: its least-squares
    translator must be exactly zero (the identity map), unlike the block lens's at layer L − 1."""
    model = tiny_model("llama", seed=1)
    down = model.model.layers[-1].mlp.down_proj
    with torch.no_grad():
        down.weight.zero_()
        if down.bias is not None:
            down.bias.zero_()
    options = {**SMALL, "lr": 0.0, "ridge": 0.0, "init_tokens": 512}
    mid = train_lens(model, tiny_tokenizer, text, 32, site="mid", out=tmp_path / "mid", **options).lens
    block = train_lens(model, tiny_tokenizer, text, 32, out=tmp_path / "block", **options).lens
    assert isinstance(mid, MidTunedLens) and type(block) is TunedLens
    last = mid.num_layers - 1
    assert mid.translators[last].weight.abs().max() < 1e-5 and mid.translators[last].bias.abs().max() < 1e-5
    assert block.translators[last].weight.abs().max() > 1e-2
    assert mid.translators[last - 1].weight.abs().max() > 1e-2


def test_a_mid_lens_trained_a_few_steps_beats_the_logit_lens_at_mid_points(loaded, trained, text):
    model, tokenizer = loaded
    block, mid = trained
    lenses = {"logit": LogitLens(model), "logit at mid": MidTunedLens(model), "tuned": block.lens, "tuned-mid": mid.lens}
    report = evaluate_held_out(model, tokenizer, lenses, str(text), tokens=256, chunk_len=16, progress=False)
    untrained, tuned = report.mean("logit at mid", "kl"), report.mean("tuned-mid", "kl")
    assert sum(tuned[:-1]) < 0.85 * sum(untrained[:-1])
    assert tuned[-1] == pytest.approx(0.0, abs=1e-5)
    layers = sorted({row["layer"] for row in report.table if row["lens"] == "tuned-mid"})
    assert layers == [0.5, 1.5, 2.5, 3]
    alone = evaluate_held_out(model, tokenizer, {"logit": LogitLens(model)}, str(text), tokens=256, chunk_len=16,
                              progress=False)
    assert alone.mean("logit", "kl") == pytest.approx(report.mean("logit", "kl"), abs=1e-6)
    rows = comparison_table(report).columns[0]._cells
    assert rows[:-1] == ["0", "0.5", "1", "1.5", "2", "2.5", "3"]


def test_a_mid_lens_folder_loads_by_its_kind_and_shows_half_layers(loaded, trained, model_dir, capsys):
    model, _ = loaded
    _, mid = trained
    assert kind_of(mid.lens_path) == "tuned-mid"
    lens = load_readout(str(mid.lens_path), model)
    assert isinstance(lens, MidTunedLens)
    assert all(torch.equal(a, b) for a, b in zip(lens.state_dict().values(), mid.lens.state_dict().values()))
    assert main(["show", TEXT, "--model", str(model_dir), "--lens", str(mid.lens_path), "--dtype", "float32"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["0.5", "1.5", "2.5", "output"]
    assert main(["table", TEXT, "--model", str(model_dir), "--lens", str(mid.lens_path)]) == 2
    assert "decodes mid states but was given block states" in capsys.readouterr().err


def test_eval_puts_a_block_and_a_mid_lens_side_by_side_as_half_layers(loaded, trained, model_dir, text, tmp_path):
    model, tokenizer = loaded
    block, mid = trained
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model_dir), "--lens", str(block.lens_path), "--lens", str(mid.lens_path),
                 "--data", str(text), "--tokens", "512", "--out", str(out), "--dtype", "float32"]) == 0
    table = json.loads((out / "eval.json").read_text())["table"]
    layers = {lens: sorted({row["layer"] for row in table if row["lens"] == lens}) for lens in ("logit", "tuned", "tuned-mid")}
    assert layers == {"logit": [0, 1, 2, 3], "tuned": [0, 1, 2, 3], "tuned-mid": [0.5, 1.5, 2.5, 3]}
    expected = evaluate_held_out(model, tokenizer, {"tuned-mid": mid.lens}, TextSource(str(text)), tokens=512,
                                 progress=False)
    kl = {row["layer"]: row["value"] for row in table if (row["lens"], row["metric"], row["unit"]) == ("tuned-mid", "kl", "nats")}
    assert [kl[layer] for layer in (0.5, 1.5, 2.5)] == pytest.approx(expected.mean("tuned-mid", "kl")[:3], rel=1e-5)


def test_a_mid_lens_refuses_block_outputs(loaded, trained):
    model, tokenizer = loaded
    lens = trained[1].lens
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with pytest.raises(LayerError, match="capture them with capture"):
        lens.iter_logits(capture(model, ids), [0])
    with pytest.raises(LayerError):
        Trajectory.from_states(lens, capture(model, ids))
    assert next(iter(lens.iter_logits(capture(model, ids, site="mid"), [0])))[1].shape[-1] == model.config.vocab_size


def test_tuned_lens_export_and_drift_refuse_a_mid_lens(loaded, trained, tmp_path):
    """Both would read a mid lens's translators as block-output ones."""
    model, tokenizer = loaded
    lens = trained[1].lens
    with pytest.raises(LensFileError, match="inside blocks"):
        export_tuned_lens(lens, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
    with pytest.raises(DriftError, match="block-output tuned lens"):
        transfer_matrix(model, lens, tokenizer(TEXT, return_tensors="pt").input_ids)


def test_half_layer_rows_interleave_the_block_and_mid_trajectories(loaded, trained):
    model, tokenizer = loaded
    block, mid = (result.lens for result in trained)
    both = half_layer_trajectory(model, tokenizer, block, mid, TEXT, k=3)
    assert both.layers == (0, 0.5, 1, 1.5, 2, 2.5, 3)
    assert list(trajectory_grid(both, "kl").row_labels) == ["0", "0.5", "1", "1.5", "2", "2.5", "output"]
    alone = {lens.kind: Trajectory.from_text(model, tokenizer, lens, TEXT, k=3) for lens in (block, mid)}
    assert alone["tuned-mid"].layers == (0.5, 1.5, 2.5, 3)
    torch.testing.assert_close(both.kl_to_final[1::2][:3], alone["tuned-mid"].kl_to_final[:3])
    torch.testing.assert_close(both.kl_to_final[0::2], alone["tuned"].kl_to_final)
    assert torch.equal(both.top_ids[[1, 3, 5]], alone["tuned-mid"].top_ids[:3])
    assert both.strided(2).layers == (0, 0.5, 2, 2.5, 3)
    with pytest.raises(TrajectoryError, match="in that order"):
        interleave(alone["tuned-mid"], alone["tuned"])
    with pytest.raises(TrajectoryError, match="--site mid"):
        half_layer_trajectory(model, tokenizer, block, block, TEXT)


def test_the_command_trains_a_mid_lens_into_its_own_run_folder(model_dir, text, tmp_path):
    assert TrainConfig(model="org/tiny", site="mid").run_path == Path("runs/tiny/mid")
    assert TrainConfig(model="org/tiny").run_path == Path("runs/tiny")
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--data", str(text), "--site", "mid", "--tokens", "32",
                 "--chunk-len", "16", "--batch-tokens", "32", "--init-tokens", "64", "--no-eval", "--out", str(out)])
    assert code == 0
    config = json.loads((out / "lens" / "config.json").read_text())
    assert config["kind"] == "tuned-mid" and config["training"]["config"]["site"] == "mid"


def test_a_checkpoint_from_before_sites_resumes_as_a_block_run(loaded, text, tmp_path):
    model, tokenizer = loaded
    first = train_lens(model, tokenizer, text, 32, out=tmp_path, **SMALL)
    state = tmp_path / "checkpoint" / "state.json"
    document = json.loads(state.read_text())
    del document["progress"]["config"]["site"]
    state.write_text(json.dumps(document))
    again = train_lens(model, tokenizer, text, 32, out=tmp_path, resume=True, **SMALL)
    assert again.steps == first.steps == 1
    with pytest.raises(TrainingError, match="other settings"):
        train_lens(model, tokenizer, text, 32, site="mid", out=tmp_path, resume=True, **SMALL)
