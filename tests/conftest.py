"""Shared fixtures: one torch thread, a tiny byte-level BPE tokenizer built in memory (no download),
and a tiny model saved to disk with it."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

os.environ["DEPTHLENS_FAST_BFLOAT16"] = "0"
"""``--dtype auto`` (the command line's default) means float32 in the tests, on every CPU, so that
results compared with float32 references do not depend on whether this CPU is fast at bfloat16;
``tests/test_precision.py`` forces each path itself."""

_TRAINING_TEXT = [
    "When shall we three meet again in thunder, lightning, or in rain?",
    "Fair is foul, and foul is fair: hover through the fog and filthy air.",
    "To be, or not to be, that is the question.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def build_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``<bos>``/``<eos>``/``<pad>``; its vocabulary is < vocab_size."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TRAINING_TEXT, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """Workers for ``-n auto`` (pyproject's addopts): none when the run names one test file, whose
    second worker would only repeat the imports; otherwise pytest-xdist's count of the cores."""
    files = {arg.split("::")[0] for arg in config.args}
    return 0 if len(files) == 1 and next(iter(files)).endswith(".py") else None


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and on a busy machine thread barriers cost more
    than the work: the cores go to pytest-xdist's workers instead (one per core, pyproject's addopts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """``tiny_model("llama")`` and the tiny tokenizer saved as a model directory (a model spec)."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
