"""The pad id of a text model: the `padding_idx` of the embedding that reads its token ids.

Where dynify itself derives lengths or a padding mask from token ids (batches for a model
called with `forward(ids, lengths)`, a narrower batch padded up to the converted length, the
trim of all-pad columns), it must pad and count with the id the model's vocabulary pads with:
0 in many vocabularies, 1 in fairseq-style ones, `len(vocab)` in others. The model says which:
the first `nn.Embedding` fed by the ids input (directly, or through casts and reshapes that
keep the ids' values) has `padding_idx` set to it. The fact is written on the ids placeholder
(`node.meta["pad_id"]`) and on the analysis; without such an embedding the pad id is 0, and a
user overrides it with `dynify.convert(..., pad_id=...)`.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from dynify.errors import InputError

PAD_ID = "pad_id"
DEFAULT_PAD_ID = 0

# Ops between the ids input and the embedding that keep the ids' values (not their layout).
_VALUE_KEEPING = {
    "long",
    "int",
    "to",
    "type",
    "contiguous",
    "transpose",
    "permute",
    "t",
    "view",
    "reshape",
    "flatten",
    "unsqueeze",
    "squeeze",
}


def embedding_pad_id(gm: torch.fx.GraphModule) -> int | None:
    """The `padding_idx` of the first embedding fed by the graph's first input, or None
    (no such embedding, or one without a padding index). Written on the placeholder's meta."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return None
    ids = placeholders[0]
    reached = {ids}
    pad = None
    for node in gm.graph.nodes:  # graph order: the first embedding the ids reach
        if node is ids or not node.args or node.args[0] not in reached:
            continue
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, nn.Embedding):
                pad = module.padding_idx
                break
        elif node.op == "call_function" and node.target is torch.nn.functional.embedding:
            pad = node.kwargs.get("padding_idx", node.args[2] if len(node.args) > 2 else None)
            pad = pad if isinstance(pad, int) else None
            break
        elif node.op == "call_method" and node.target in _VALUE_KEEPING:
            reached.add(node)
    if pad is not None:
        pad = int(pad)
        if pad < 0:  # nn.Embedding keeps a negative padding_idx counted from the end
            pad += _num_embeddings(gm, node)
    ids.meta[PAD_ID] = pad
    return pad


def _num_embeddings(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    if node.op == "call_module":
        return int(gm.get_submodule(str(node.target)).num_embeddings)
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    shape = getattr(weight, "meta", {}).get("tensor_meta")
    return int(shape.shape[0]) if shape is not None else 0


def module_pad_id(model: nn.Module) -> int:
    """The pad id of a module not traced by dynify (a static baseline): the `padding_idx` of
    its first `nn.Embedding` with one, else 0."""
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            return int(module.padding_idx) % module.num_embeddings
    return DEFAULT_PAD_ID


def example_token(model: nn.Module, pad_id: int | None = None) -> int:
    """A token id for an example input that is not the model's pad id (`pad_id`, else its
    first embedding's): 1, or 0 for a model padding with 1. A text of padding only can make
    a model divide by zero (a mean over no real token), and traces nothing a text would."""
    pad = module_pad_id(model) if pad_id is None else pad_id
    return 0 if pad == 1 else 1


def check_pad_id(pad_id: object) -> int:
    """A pad id given by a user: a token id, a whole number of at least 0."""
    if type(pad_id) is not int or pad_id < 0:
        raise InputError(
            f"pad_id is the token id the texts are padded with (a whole number of at least "
            f"0, e.g. 0, or 1 in fairseq-style vocabularies); got {pad_id!r}."
        )
    return pad_id


__all__ = [
    "DEFAULT_PAD_ID",
    "PAD_ID",
    "check_pad_id",
    "embedding_pad_id",
    "example_token",
    "module_pad_id",
]
