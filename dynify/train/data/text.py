"""Text classification data as token ids: a tokenizer, a vocabulary and `text<TAB>label` files.

A sequence model takes a tensor of token ids `[B, T]` (int64), padded on the right with its
pad id (0 in this vocabulary; the model's embedding names it, `dynify.frontend.padding`) to a
fixed length T; it derives lengths or masks from `ids != pad_id` itself, or, converted with its
lengths or mask as a second input, gets them from the batches (`model_inputs`). The vocabulary
is built from training texts only (so test words the model never saw map to the unknown id 1),
and is saved beside the model as JSON: a list of tokens, nothing that could run.
"""

from __future__ import annotations

import csv
import html
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dynify.errors import DataError
from dynify.files import write_text_atomic

PAD_ID = 0
UNK_ID = 1
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
VOCABULARY_FORMAT = "dynify-vocabulary"
VOCABULARY_VERSION = 1
MAX_LEN_LIMIT = 100_000

# AG News keeps HTML entities with their ampersand turned into a space: "It #39;s", "hasn #39;t".
_BARE_ENTITY = re.compile(r" ?(?<!&)#(x[0-9a-fA-F]{1,6}|[0-9]{1,7});")
_TAG = re.compile(r"<[^>]{0,400}>")
_APOSTROPHES = re.compile(r"['\u2019`]")
_WORD = re.compile(r"[^\W\d_]+")  # runs of letters, in any script


def tokenize(text: str) -> list[str]:
    """Lower-cased runs of letters: what an LSTM baseline needs, with no model to download.

    HTML entities are decoded first, also those whose `&` became a space (AG News' `It #39;s`
    is `It's`), HTML
    tags are dropped, and apostrophes join rather than split words (`it's` -> `its`,
    `hasn't` -> `hasnt`), so a contraction stays one token.
    """
    text = html.unescape(_BARE_ENTITY.sub(r"&#\1;", text))
    text = _APOSTROPHES.sub("", _TAG.sub(" ", text))
    return _WORD.findall(text.lower())


class Vocabulary:
    """Tokens to ids: `<pad>` = 0, `<unk>` = 1, then the training tokens, most frequent first.

    Build it from training texts only (`Vocabulary.build`); `encode` maps every other word to
    the unknown id. `save`/`load` keep it as a JSON list of tokens.
    """

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tokens[:2] != [PAD_TOKEN, UNK_TOKEN]:
            raise DataError(
                f"A vocabulary starts with {PAD_TOKEN!r} (id {PAD_ID}) and {UNK_TOKEN!r} (id "
                f"{UNK_ID}); got {tokens[:2]}. Build it with Vocabulary.build(texts)."
            )
        if not all(isinstance(t, str) and t for t in tokens):
            raise DataError("Every vocabulary token must be a non-empty string.")
        self.tokens = tokens
        self.index = {token: i for i, token in enumerate(tokens)}
        if len(self.index) != len(tokens):
            twice = next(t for t, c in Counter(tokens).items() if c > 1)
            raise DataError(f"The vocabulary holds the token {twice!r} more than once.")

    @classmethod
    def build(
        cls, texts: Iterable[str], *, min_count: int = 1, max_size: int | None = None
    ) -> Vocabulary:
        """The tokens of `texts` seen at least `min_count` times, at most `max_size` ids in all
        (the two special tokens included); ties in frequency are broken alphabetically, so the
        same texts always give the same ids."""
        if min_count < 1:
            raise DataError(f"min_count must be at least 1, got {min_count}.")
        if max_size is not None and max_size < 3:
            raise DataError(f"max_size must leave room for a token (at least 3), got {max_size}.")
        counts = Counter(token for text in texts for token in tokenize(text))
        counts.pop(PAD_TOKEN, None)
        counts.pop(UNK_TOKEN, None)
        kept = sorted(
            (t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t)
        )
        if max_size is not None:
            kept = kept[: max_size - 2]
        return cls([PAD_TOKEN, UNK_TOKEN, *kept])

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens)"

    def encode(self, text: str, max_len: int) -> list[int]:
        """The first `max_len` token ids of `text` (unknown words -> 1), unpadded."""
        return [self.index.get(t, UNK_ID) for t in tokenize(text)[:max_len]]

    def encode_batch(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """Token ids `[N, max_len]` int64, cut at `max_len` and padded on the right with 0."""
        _check_max_len(max_len)
        ids = torch.full((len(texts), max_len), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            encoded = self.encode(text, max_len)
            ids[row, : len(encoded)] = torch.tensor(encoded, dtype=torch.long)
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The tokens of `ids`, padding left out."""
        return [self.tokens[int(i)] for i in ids if int(i) != PAD_ID]

    def to_dict(self) -> dict[str, Any]:
        return {"format": VOCABULARY_FORMAT, "version": VOCABULARY_VERSION, "tokens": self.tokens}

    def save(self, path: str | Path) -> Path:
        """Write the vocabulary as JSON, atomically."""
        return write_text_atomic(path, json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary `save` wrote; a damaged or foreign file is refused, naming why."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"The vocabulary file {path} does not exist.") from None
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are too
            raise DataError(
                f"{path} is not a readable vocabulary ({exc}). The file is damaged or was "
                "not written by Vocabulary.save; build the vocabulary again from the training "
                "texts."
            ) from exc
        problem = None
        if not isinstance(data, dict) or data.get("format") != VOCABULARY_FORMAT:
            problem = f"it is not a {VOCABULARY_FORMAT} file"
        elif data.get("version") != VOCABULARY_VERSION:
            problem = (
                f"it has version {data.get('version')!r}, this dynify reads {VOCABULARY_VERSION}"
            )
        elif not isinstance(data.get("tokens"), list):
            problem = "it has no list of tokens"
        if problem is None:
            try:
                return cls(data["tokens"])
            except DataError as exc:
                problem = str(exc).rstrip(".")
        raise DataError(
            f"{path} is not a usable vocabulary: {problem}. The file is damaged or was edited; "
            "build the vocabulary again from the training texts (Vocabulary.build) and save it."
        )


class TextDataset(Dataset):
    """Token ids `[N, T]` (int64, right-padded with the model's pad id: 0 for `Vocabulary`)
    and labels: items are `(ids[T], label)`.

    `classes` names labels 0..K-1 (the labels as the file spelt them; by default their
    numbers), `vocab` made the ids (None when they came from elsewhere);
    `targets` lets `split_dataset` stratify without reading the items.
    """

    def __init__(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor,
        classes: Sequence[str] | None = None,
        vocab: Vocabulary | None = None,
    ):
        if ids.dtype != torch.long or ids.dim() != 2:
            raise DataError(
                f"Token ids must be an int64 [N, T] tensor, got {ids.dtype} {list(ids.shape)}."
            )
        if len(torch.as_tensor(targets).flatten()) != len(ids):
            raise DataError(f"Got {len(ids)} texts but {len(targets)} labels.")
        self.ids = ids
        self.targets = torch.as_tensor(targets).long().flatten()
        if len(self.targets) and int(self.targets.min()) < 0:
            raise DataError("Labels must be class indices 0, 1, ...; found a negative label.")
        if classes is None:
            count = int(self.targets.max()) + 1 if len(self.targets) else 0
            classes = [str(i) for i in range(count)]
        self.classes = list(classes)
        self.vocab = vocab

    @property
    def max_len(self) -> int:
        return self.ids.shape[1]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.ids[index], int(self.targets[index])

    def __repr__(self) -> str:
        vocab = f", {len(self.vocab)}-token vocabulary" if self.vocab is not None else ""
        return (
            f"TextDataset({len(self)} texts of up to {self.max_len} tokens, "
            f"{len(self.classes)} classes{vocab})"
        )


def load_text_dataset(
    path: str | Path,
    vocab: Vocabulary | None = None,
    max_len: int = 60,
    *,
    classes: Sequence[str] | None = None,
    min_count: int = 1,
    max_size: int | None = None,
) -> TextDataset:
    """Token ids and labels from a `text<TAB>label` file (UTF-8, one example a line).

    Without `vocab` the vocabulary is built from this file (a training file; `min_count`,
    `max_size` as in `Vocabulary.build`); for test data pass the training set's `vocab` and
    `classes`, so ids and labels mean the same. Labels are mapped to 0..K-1 in sorted order
    (numerically when they are all whole numbers), recorded in `classes`. A header line
    `...<TAB>label` (SST-2's) is skipped; fields may be CSV-quoted; a malformed row is refused
    with its line number.
    """
    _check_max_len(max_len)
    path = Path(path)
    texts, labels, lines = _read_rows(path)
    if classes is None:
        classes = _sorted_labels(labels)
    classes = [str(c) for c in classes]
    label_ids = {name: i for i, name in enumerate(classes)}
    targets = []
    for label, line in zip(labels, lines, strict=True):
        if label not in label_ids:
            raise DataError(
                f"{path}, line {line}: the label {label!r} is not one of the classes "
                f"{classes[:12]}. Pass the training set's classes (classes=train.classes), "
                "and check that this file belongs to the same data set."
            )
        targets.append(label_ids[label])
    if vocab is None:
        vocab = Vocabulary.build(texts, min_count=min_count, max_size=max_size)
    ids = vocab.encode_batch(texts, max_len)
    return TextDataset(ids, torch.tensor(targets, dtype=torch.long), classes, vocab)


def _read_rows(path: Path) -> tuple[list[str], list[str], list[int]]:
    """Texts, labels and the line each row starts on; header skipped, malformed rows refused."""
    texts, labels, lines = [], [], []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quotechar='"', strict=True)
            start = 1
            for row in reader:
                line, start = start, reader.line_num + 1
                if not row or row == [""]:
                    continue
                if len(row) != 2 or not row[1].strip():
                    raise DataError(
                        f"{path}, line {line}: expected 'text<TAB>label', got {len(row)} "
                        f"field{'s' if len(row) != 1 else ''} ({_clip(row)}). Each line holds "
                        "one example: the text, a tab, then its label."
                    )
                if not texts and line == 1 and row[1].strip().lower() == "label":
                    continue  # a header line, as SST-2's `sentence<TAB>label`
                texts.append(row[0])
                labels.append(row[1].strip())
                lines.append(line)
    except FileNotFoundError:
        raise DataError(f"The text file {path} does not exist.") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder; name a text<TAB>label file in it.") from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}). Convert it to UTF-8."
        ) from None
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: {exc}. Fix the quoting there.") from None
    if not texts:
        raise DataError(f"{path} holds no examples: expected lines of 'text<TAB>label'.")
    return texts, labels, lines


def read_labels(path: str | Path) -> list[str]:
    """The labels of a `text<TAB>label` file as written (header skipped), one per example."""
    return _read_rows(Path(path))[1]


def _sorted_labels(labels: Iterable[str]) -> list[str]:
    names = set(labels)
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _check_max_len(max_len: int) -> None:
    if type(max_len) is not int or not 1 <= max_len <= MAX_LEN_LIMIT:
        raise DataError(
            f"max_len is the number of tokens per text, a whole number from 1 to "
            f"{MAX_LEN_LIMIT}; got {max_len!r}."
        )


def _clip(row: list[str]) -> str:
    text = " | ".join(row)
    return repr(text if len(text) <= 60 else text[:57] + "...")
