"""ArcFace IResNet-100: the identity encoder shared by MICA, OFER IdGen and OFER IdRank.

The module tree reproduces the official state-dict names (925 keys, no prefix), so the ``arcface``
section of ``mica.tar``, ``model_idgen_flame20.tar`` and ``model_idrank.tar`` loads with
``strict=True``.

RNG replay (for OFER's reproduce-official mode): the constructor consumes the torch default RNG
exactly as the official ``Arcface(IResNet)`` constructor does, because OFER's unregistered q/k/v
weights are drawn after it. What is matched:

1. PyTorch default initialisers in the official construction order: stem ``conv1``; then per layer
   the ``downsample`` 1x1 conv (the official ``_make_layer`` builds it *before* the first block),
   then each block's ``conv1`` and ``conv2``; then ``fc`` (weight, then bias). BatchNorm, PReLU and
   Dropout draw nothing.
2. Then every ``Conv2d`` weight is re-drawn with ``normal_(0, 0.1)`` in ``self.modules()`` order
   (registration order: stem, then per block conv1, conv2, downsample.0); BatchNorm2d weight/bias
   are set to 1/0 and ``features.weight`` to 1 (no RNG).

Checkpoint loading replaces all of these values; only the RNG state afterwards matters.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

ARCFACE_INPUT_SIZE = 112
ARCFACE_EMBEDDING_DIM = 512
IRESNET100_LAYERS = (3, 13, 30, 3)
_BN_EPS = 1e-5


def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block: BN, conv, BN, PReLU, conv (stride), BN, + identity."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        # Registered last (state-dict order) although it was built first (RNG order).
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet100(nn.Module):
    """IResNet-100 with the official key names; ``forward`` returns the raw 512-d embedding.

    ``apply_features=True`` is MICA's behaviour (always) and OFER's for batch > 1; OFER skips the
    ``features`` BatchNorm1d at batch 1, and the caller decides. L2 normalisation is the caller's.
    """

    def __init__(
        self, layers: tuple[int, int, int, int] = IRESNET100_LAYERS, num_features: int = ARCFACE_EMBEDDING_DIM
    ) -> None:
        super().__init__()
        self._inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=_BN_EPS)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(512, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=_BN_EPS)
        self.channels_last = False  # set by ``fused_for_inference``; the shipped layout runs NCHW contiguous
        self._official_reinit()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=_BN_EPS),
            )
        modules = [IBasicBlock(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes
        modules += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    @torch.no_grad()
    def _official_reinit(self) -> None:
        nn.init.constant_(self.features.weight, 1.0)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0.0)

    def forward(self, blob: Tensor, *, apply_features: bool = True) -> Tensor:
        """(B,3,112,112) normalised blob -> (B,512) float32: ``fc`` output, through ``features`` if asked.

        The blob is cast to the weights' dtype (a no-op for the shipped float32 model) and the embedding
        comes back as float32, so a half-precision copy (``fused_for_inference(dtype=...)``) is a drop-in."""
        weight_dtype = self.conv1.weight.dtype
        if blob.dtype != weight_dtype:
            blob = blob.to(weight_dtype)
        if self.channels_last:
            blob = blob.contiguous(memory_format=torch.channels_last)
        x = self.prelu(self.bn1(self.conv1(blob)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        x = self.fc(x)
        x = self.features(x) if apply_features else x
        return x.float()


def fused_for_inference(
    model: IResNet100, *, channels_last: bool = True, dtype: torch.dtype | None = None
) -> IResNet100:
    """An inference copy of ``model`` for the fast numerics mode; ``model`` itself is left untouched.

    Every BatchNorm that follows a convolution (stem, each block's conv1 -> bn2 and conv2 -> bn3, the
    downsample pairs) is folded into that convolution, the final ``bn2`` into ``fc``, and the copy runs
    channels-last (faster on CPU and on tensor cores). Each block's leading ``bn1`` stays: it precedes a
    zero-padded convolution, so folding it would change the border pixels, not just the rounding. The
    folded model computes the same function up to float rounding (``tests/unit/test_fast_networks.py``
    states the measured deviation); its state dict has fewer keys, so checkpoints always load into the
    shipped layout first. ``dtype`` (e.g. ``torch.float16`` on CUDA) casts the copy's weights.
    """
    if model.training:
        raise ValueError("fused_for_inference: put the model in eval mode first (BatchNorm uses running stats)")
    fused = copy.deepcopy(model)
    with torch.no_grad():
        fused.conv1 = fuse_conv_bn_eval(fused.conv1, fused.bn1)
        fused.bn1 = nn.Identity()  # type: ignore[assignment]
        for block in [m for m in fused.modules() if isinstance(m, IBasicBlock)]:
            block.conv1 = fuse_conv_bn_eval(block.conv1, block.bn2)
            block.bn2 = nn.Identity()  # type: ignore[assignment]
            block.conv2 = fuse_conv_bn_eval(block.conv2, block.bn3)
            block.bn3 = nn.Identity()  # type: ignore[assignment]
            if isinstance(block.downsample, nn.Sequential):
                conv, bn = block.downsample.children()
                block.downsample = nn.Sequential(fuse_conv_bn_eval(cast(nn.Conv2d, conv), cast(nn.BatchNorm2d, bn)))
        fused.fc = _fold_channel_bn_into_linear(fused.bn2, fused.fc)
        fused.bn2 = nn.Identity()  # type: ignore[assignment]
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if dtype is not None:
        fused = fused.to(dtype)
    fused.channels_last = channels_last
    return fused.eval()


def _fold_channel_bn_into_linear(bn: nn.BatchNorm2d, fc: nn.Linear) -> nn.Linear:
    """``fc(flatten(bn(x)))`` as one Linear: BN's per-channel affine, repeated over the 7x7 positions that
    ``flatten`` lays out channel-major, scales fc's columns and shifts its bias."""
    running_var, running_mean = cast(Tensor, bn.running_var), cast(Tensor, bn.running_mean)
    scale = bn.weight / torch.sqrt(running_var + bn.eps)
    shift = bn.bias - running_mean * scale
    positions = fc.in_features // scale.shape[0]
    scale_cols, shift_cols = scale.repeat_interleave(positions), shift.repeat_interleave(positions)
    folded = copy.deepcopy(fc)  # a copy, not a new Linear: constructing one would draw from the global RNG
    folded.weight.copy_(fc.weight * scale_cols)
    folded.bias.copy_(fc.bias + fc.weight @ shift_cols)
    return folded
