"""A reference text classifier: embedding, one whole `nn.LSTM`/`nn.GRU`, the state at each
text's last token, linear.

Its input is ONE tensor of token ids `[B, T]` (int64) padded on the right with `pad_id`; the
lengths come from `ids != pad_id` inside `forward`, so the model traces with torch.fx as one
graph with the RNN kept whole (torch.nn modules are leaves) and no (ids, lengths) tuple. The RNN
runs over all T steps (no packing): right padding comes after a text's last token, so the state
read there is the same whatever the padding.

Text classifiers are often called with the lengths or the padding mask next to the ids instead;
`inputs="lengths"` builds a `LengthsTextClassifier` (`forward(ids, lengths)`: the output at
`lengths - 1`) and `inputs="mask"` a `MaskedTextClassifier` (`forward(ids, mask)`: the mean of
the outputs over the real tokens), both without packing, as the temporal strategies need.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynify.errors import ModelError

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
INPUTS = ("ids", "lengths", "mask")


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

    inputs = "ids"  # what forward takes besides the ids: nothing, "lengths" or "mask"

    def builtin_config(self) -> dict[str, Any]:
        """The arguments that rebuild this architecture as the built-in `text_<cell>` (ints,
        strings and booleans only: an artifact stores them as data)."""
        config: dict[str, Any] = {
            "vocab_size": self.vocab_size,
            "embed_dim": self.embed_dim,
            "hidden": self.hidden,
            "layers": self.layers,
            "pad_id": self.pad_id,
            "batch_first": self.batch_first,
        }
        if self.inputs != "ids":
            config["inputs"] = self.inputs
        return config

    def outputs(self, ids: torch.Tensor) -> torch.Tensor:
        """The RNN's outputs [B, T, H] (batch first) over every step, padding included."""
        x = self.embedding(ids)
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.rnn(x)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out

    def at_last_token(self, out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Each text's output at its last token [B, H] (gathered along time)."""
        index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, self.hidden)
        return out.gather(1, index).squeeze(1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        state = self.at_last_token(self.outputs(ids), (ids != self.pad_id).sum(1))
        return self.classifier(self.dropout(state))


class LengthsTextClassifier(TextClassifier):
    """A TextClassifier called with each text's length: `forward(ids, lengths)`, lengths int
    [B] in [1, T]; reads the output at `lengths - 1`."""

    inputs = "lengths"

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        state = self.at_last_token(self.outputs(ids), lengths)
        return self.classifier(self.dropout(state))


class MaskedTextClassifier(TextClassifier):
    """A TextClassifier called with a padding mask: `forward(ids, mask)`, mask [B, T] (1 = a
    real token, padding at the end); the mean of the outputs over the real tokens."""

    inputs = "mask"

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        weights = mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.outputs(ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))


def text_classifier(
    vocab_size: int, num_classes: int, *, inputs: str = "ids", **kwargs: Any
) -> TextClassifier:
    """A text classifier taking the ids alone (`inputs="ids"`), the ids and the lengths
    ("lengths") or the ids and a padding mask ("mask"); other arguments as TextClassifier's."""
    classes = {
        "ids": TextClassifier,
        "lengths": LengthsTextClassifier,
        "mask": MaskedTextClassifier,
    }
    if inputs not in classes:
        raise ModelError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}.")
    return classes[inputs](vocab_size, num_classes, **kwargs)


def text_lstm(
    vocab_size: int,
    num_classes: int = 2,
    embed_dim: int = 100,
    hidden: int = 256,
    layers: int = 1,
    pad_id: int = 0,
    batch_first: bool = True,
    inputs: str = "ids",
) -> TextClassifier:
    """The built-in `text_lstm`: a TextClassifier with an LSTM (`inputs`: see
    `text_classifier`)."""
    return text_classifier(
        vocab_size,
        num_classes,
        inputs=inputs,
        embed_dim=embed_dim,
        hidden=hidden,
        layers=layers,
        cell="lstm",
        pad_id=pad_id,
        batch_first=batch_first,
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
