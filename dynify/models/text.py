"""A reference text classifier: embedding, one whole `nn.LSTM`/`nn.GRU`, the state at each
text's last token, linear.

Its input is ONE tensor of token ids `[B, T]` (int64) padded on the right with `pad_id`; the
lengths come from `ids != pad_id` inside `forward`, so the model traces with torch.fx as one
graph with the RNN kept whole (torch.nn modules are leaves) and no (ids, lengths) tuple. The RNN
runs over all T steps (no packing): right padding comes after a text's last token, so the state
read there is the same whatever the padding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynify.errors import ModelError

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class TextClassifier(nn.Module):
    """Embedding -> LSTM or GRU -> the output at each text's last non-pad token -> dropout ->
    linear. An all-pad row reads the output of step 0."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        embed_dim: int = 100,
        hidden: int = 256,
        layers: int = 1,
        cell: str = "lstm",
        pad_id: int = 0,
        batch_first: bool = True,
        dropout: float = 0.5,
    ):
        super().__init__()
        if cell not in CELLS:
            raise ModelError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}.")
        for name, value in (
            ("vocab_size", vocab_size),
            ("num_classes", num_classes),
            ("embed_dim", embed_dim),
            ("hidden", hidden),
            ("layers", layers),
        ):
            if type(value) is not int or value < 1:
                raise ModelError(f"{name} must be a whole number of at least 1, got {value!r}.")
        if type(pad_id) is not int or not 0 <= pad_id < vocab_size:
            raise ModelError(f"pad_id must be a token id below vocab_size, got {pad_id!r}.")
        self.vocab_size, self.num_classes = vocab_size, num_classes
        self.embed_dim, self.hidden, self.layers = embed_dim, hidden, layers
        self.cell, self.pad_id, self.batch_first = cell, pad_id, batch_first
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.rnn = CELLS[cell](embed_dim, hidden, layers, batch_first=batch_first)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def builtin_config(self) -> dict[str, Any]:
        """The arguments that rebuild this architecture as the built-in `text_<cell>` (ints,
        strings and booleans only: an artifact stores them as data)."""
        return {
            "vocab_size": self.vocab_size,
            "embed_dim": self.embed_dim,
            "hidden": self.hidden,
            "layers": self.layers,
            "pad_id": self.pad_id,
            "batch_first": self.batch_first,
        }

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != self.pad_id).sum(1)
        last = (lengths - 1).clamp(min=0)
        x = self.embedding(ids)
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.rnn(x)
        if not self.batch_first:
            out = out.transpose(0, 1)
        index = last.view(-1, 1, 1).expand(-1, 1, self.hidden)
        state = out.gather(1, index).squeeze(1)
        return self.classifier(self.dropout(state))


def text_lstm(
    vocab_size: int,
    num_classes: int = 2,
    embed_dim: int = 100,
    hidden: int = 256,
    layers: int = 1,
    pad_id: int = 0,
    batch_first: bool = True,
) -> TextClassifier:
    """The built-in `text_lstm`: a TextClassifier with an LSTM."""
    return TextClassifier(
        vocab_size, num_classes, embed_dim, hidden, layers, "lstm", pad_id, batch_first
    )


def text_gru(
    vocab_size: int,
    num_classes: int = 2,
    embed_dim: int = 100,
    hidden: int = 256,
    layers: int = 1,
    pad_id: int = 0,
    batch_first: bool = True,
) -> TextClassifier:
    """The built-in `text_gru`: a TextClassifier with a GRU."""
    return TextClassifier(
        vocab_size, num_classes, embed_dim, hidden, layers, "gru", pad_id, batch_first
    )
