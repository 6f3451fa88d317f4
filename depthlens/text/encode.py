"""Turn text into model input: token ids and an attention mask, padded on the right."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from depthlens.errors import DataError


def encode(
    tokenizer: PreTrainedTokenizerBase, text: str | Sequence[str], max_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize one text or a batch, keeping at most ``max_tokens`` tokens of each.

    Returns ``(input_ids, attention_mask)``, both ``[batch, seq]`` (``torch.long`` and
    ``torch.bool``); shorter texts are padded on the right with the tokenizer's pad id (0 if it
    has none) and their padding has mask ``False``. Raises :class:`DataError` for an empty text.
    """
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or any(not t.strip() for t in texts):
        raise DataError("the text is empty: give at least one non-blank text")
    encoded = [tokenizer(t).input_ids[:max_tokens] for t in texts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in encoded], dtype=torch.long)
    attention_mask = torch.tensor([[True] * len(ids) + [False] * (width - len(ids)) for ids in encoded])
    return input_ids, attention_mask


__all__ = ["encode"]
