"""``fold_batchnorm``: merge an inference-mode BatchNorm into the convolution that feeds it.

Pattern, read from the traced graph: a ``conv2d`` whose only user is a ``batch_norm``.
The conv gets the scaled weight and a bias, the BatchNorm becomes ``nn.Identity``.
Function-preserving up to float rounding.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from presso import Context, Graph, Pass, PassConfig, PassResult


@dataclass(frozen=True, kw_only=True)
class FoldBatchNormConfig(PassConfig):
    skip: tuple[str, ...] = ()  # module paths of convolutions to leave alone


def conv_bn_pairs(graph: Graph) -> list[tuple[str, str]]:
    """(conv path, batchnorm path) for each conv2d -> batch_norm edge with a single user."""
    calls = Counter(info.module_path for _, info in graph.nodes(torch.ops.aten.conv2d.default,
                                                                 torch.ops.aten.batch_norm.default))
    pairs = []
    for node, info in graph.nodes(torch.ops.aten.conv2d.default):
        users = list(node.users)
        if len(users) != 1 or users[0].target != torch.ops.aten.batch_norm.default:
            continue
        bn_path = users[0].meta["presso"].module_path
        if calls[info.module_path] == 1 and calls[bn_path] == 1:
            pairs.append((info.module_path, bn_path))
    return pairs


@torch.no_grad()
def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return folded


class FoldBatchNorm(Pass):
    name = "fold_batchnorm"
    Config = FoldBatchNormConfig
    summary = "Fold inference BatchNorm2d into the preceding Conv2d (exact up to rounding)."

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        folded = []
        for conv_path, bn_path in conv_bn_pairs(graph):
            conv, bn = graph.module.get_submodule(conv_path), graph.module.get_submodule(bn_path)
            if conv_path in self.config.skip or not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None:
                continue
            graph.module.set_submodule(conv_path, fold(conv, bn))
            graph.module.set_submodule(bn_path, nn.Identity())
            folded.append(conv_path)
        return PassResult(graph, modified=bool(folded), stats={"folded": len(folded), "convs": folded})
