"""Batch norm folded into the preceding convolution, for the small modules dynify inserts.

Exit heads and the policy network run at batch 1 on the latency path, where each op costs a few
microseconds of dispatch whatever its size: folding BN into its conv saves one op per pair and
its module call. The folded weights are cached on the module and rebuilt when any source tensor
changes (storage or in-place version), so training, `load_state_dict` and `.to()` need no hook.
Autograd, training mode and export keep the unfolded modules: gradients must reach the real
parameters, and exported graphs stay the modules' own (ONNX Runtime folds BN itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from dynify.runtime.tensor_cache import cached_on_tensors


def use_folded(module: nn.Module) -> bool:
    """True when `module` may run its folded inference form."""
    if module.training or torch.is_grad_enabled():
        return False
    return not (torch.compiler.is_exporting() or torch.compiler.is_compiling())


def folded_conv_bn(
    owner: nn.Module,
    pairs: Sequence[tuple[nn.Conv2d, nn.BatchNorm2d]],
    memory_format: torch.memory_format = torch.contiguous_format,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) of each conv with its BN folded in, cached on `owner`.

    `memory_format=torch.channels_last` stores the weights channels-last, which makes
    `F.conv2d` run oneDNN's channels-last kernel even on an NCHW input: for the small strided
    convs of exit heads at batch 1 about twice as fast as the NCHW one (its output is then
    channels-last too, which pooling and flattening do not mind).
    """
    # This check runs on every forward: read the registries (no Module.__getattr__) and only
    # the tensors folding uses (not num_batches_tracked).
    sources = [
        t
        for conv, bn in pairs
        for t in (
            *conv._parameters.values(),
            *bn._parameters.values(),
            bn._buffers["running_mean"],
            bn._buffers["running_var"],
        )
    ]

    def fold() -> list[tuple[torch.Tensor, torch.Tensor]]:
        folded = []
        for conv, bn in pairs:
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            weight = weight.detach().contiguous(memory_format=memory_format)
            folded.append((weight, bias.detach()))
        return folded

    return cached_on_tensors(owner, "_folded_conv_bn", sources, fold, extra=(memory_format,))
