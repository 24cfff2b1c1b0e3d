"""An SCRFD-10G-like face detector with random weights, exported to ONNX with insightface's
exact SCRFD signature (input `input.1`, 9 outputs: scores, boxes and keypoints for strides
8/16/32, 2 anchors per cell) and a dynamic batch axis, for timing model compute.

The layout follows insightface's `scrfd_10g_bnkps` config: a ResNet-v1e backbone (deep stem,
BasicBlock stages of 3/4/2/3 blocks, 56/88/88/224 channels, avg-pool shortcuts), a PAFPN on
the stride 8/16/32 stages with 56 channels, and one head shared by the three levels (3 stacked
3x3 convs of 80 channels, then 3x3 convs for scores, boxes and keypoints). Normalisation layers
are left out: an exported model has them folded into the convolutions.

Throughput does not depend on the weights, but the post-processing does (how many anchors pass
the score threshold, how big the boxes are). So the output convolutions are rescaled once, on
real images, so that a few anchors per image score over 0.5 and fewer over 0.98, boxes are a few
strides wide and keypoints sit where a face's would: a realistic amount of work for NMS,
filtering and alignment afterwards. The rescaling changes no shapes and no compute.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional

STRIDES = (8, 16, 32)
ANCHORS = 2
KEYPOINTS = 5
INPUT_NAME = "input.1"
OPSET = 17
STEM = 56
STAGE_BLOCKS = (3, 4, 2, 3)
STAGE_PLANES = (56, 88, 88, 224)
NECK = 56
HEAD = 80
HEAD_CONVS = 3
# Scores: per image, about this many anchors over 0.5 and this many over 0.98 (on average).
CANDIDATES_PER_IMAGE = 12.0
CONFIDENT_PER_IMAGE = 2.0
CONFIDENT_LOGIT = 4.6  # sigmoid(4.6) = 0.99
BOX_DISTANCE = (2.5, 0.4)  # mean, std of each box side's distance from the anchor, in strides
# 5 points (eyes, nose, mouth corners) around the anchor, in strides, and their spread.
KEYPOINT_MEANS = ((-0.9, -0.7), (0.9, -0.7), (0.0, 0.2), (-0.7, 1.1), (0.7, 1.1))
KEYPOINT_STD = 0.1


def conv(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv(cin, cout, stride)
        self.conv2 = conv(cout, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:  # ResNet-v1e: average pool, then a 1x1 conv
            pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
            self.shortcut = nn.Sequential(pool, conv(cin, cout, kernel=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.relu(self.conv2(functional.relu(self.conv1(x))) + self.shortcut(x))


class ScrfdLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            conv(3, STEM // 2, 2),
            nn.ReLU(),
            conv(STEM // 2, STEM // 2),
            nn.ReLU(),
            conv(STEM // 2, STEM),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, cin = [], STEM
        for index, (blocks, planes) in enumerate(zip(STAGE_BLOCKS, STAGE_PLANES, strict=True)):
            layers = [BasicBlock(cin, planes, 1 if index == 0 else 2)]
            layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = planes
        self.stages = nn.ModuleList(stages)
        taps = STAGE_PLANES[1:]  # strides 8, 16, 32
        self.lateral = nn.ModuleList(conv(c, NECK, kernel=1) for c in taps)
        self.fpn = nn.ModuleList(conv(NECK, NECK) for _ in taps)
        self.down = nn.ModuleList(conv(NECK, NECK, 2) for _ in taps[1:])
        self.pafpn = nn.ModuleList(conv(NECK, NECK) for _ in taps[1:])
        head = [conv(NECK if i == 0 else HEAD, HEAD) for i in range(HEAD_CONVS)]
        self.head = nn.ModuleList(head)
        self.cls = conv(HEAD, ANCHORS)
        self.reg = conv(HEAD, ANCHORS * 4)
        self.kps = conv(HEAD, ANCHORS * 2 * KEYPOINTS)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # He init, no bias: features follow the content
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        taps = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index >= 1:
                taps.append(x)
        laterals = [lateral(tap) for lateral, tap in zip(self.lateral, taps, strict=True)]
        for level in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[level - 1] = laterals[level - 1] + functional.interpolate(
                laterals[level], size=laterals[level - 1].shape[2:], mode="nearest"
            )
        outs = [fpn(x) for fpn, x in zip(self.fpn, laterals, strict=True)]
        for level in range(len(outs) - 1):  # bottom-up (PAFPN)
            outs[level + 1] = outs[level + 1] + self.down[level](outs[level])
        return [outs[0], *(pa(x) for pa, x in zip(self.pafpn, outs[1:], strict=True))]

    def head_raw(self, feature: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for layer in self.head:
            feature = functional.relu(layer(feature))
        return self.cls(feature), self.reg(feature), self.kps(feature)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores, boxes, kpss = [], [], []
        for feature in self.features(x):
            cls, reg, kps = self.head_raw(feature)
            batch = cls.shape[0]
            # (B, A*k, H, W) -> (B, H*W*A, k): anchors innermost, rows of cells, as SCRFD's ONNX
            scores.append(cls.permute(0, 2, 3, 1).reshape(batch, -1, 1).sigmoid())
            boxes.append(reg.permute(0, 2, 3, 1).reshape(batch, -1, 4))
            kpss.append(kps.permute(0, 2, 3, 1).reshape(batch, -1, 2 * KEYPOINTS))
        return (*scores, *boxes, *kpss)


def conv_macs(model: nn.Module, side: int) -> int:
    """Multiply-accumulates of every convolution for one side x side image."""
    total = 0

    def count(module: nn.Conv2d, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() * kernel * module.in_channels // module.groups

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    for hook in hooks:
        hook.remove()
    return total


def _rescale(layer: nn.Conv2d, raw: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Give the layer's output channels this mean and std on `raw` ((cells, channels), what the
    layer outputs now)."""
    scale = std / raw.std(dim=0).clamp_min(1e-6)
    with torch.no_grad():
        layer.weight.mul_(scale[:, None, None, None])
        layer.bias.copy_((layer.bias - raw.mean(dim=0)) * scale + mean)


def calibrate(model: ScrfdLike, blobs: torch.Tensor) -> None:
    """Rescale the output convolutions on real letterboxed inputs (see the module doc)."""
    with torch.no_grad():
        heads = [model.head_raw(feature) for feature in model.features(blobs)]
    scores, boxes, kpss = (_cells(heads, index) for index in range(3))
    logits = scores.ravel().double()
    per_image = logits.numel() / blobs.shape[0]
    low = torch.quantile(logits, 1 - CANDIDATES_PER_IMAGE / per_image)
    high = torch.quantile(logits, 1 - CONFIDENT_PER_IMAGE / per_image)
    gain = CONFIDENT_LOGIT / float(high - low)
    with torch.no_grad():
        model.cls.weight.mul_(gain)
        model.cls.bias.copy_((model.cls.bias - float(low)) * gain)
    mean, std = BOX_DISTANCE
    _rescale(model.reg, boxes, torch.full((ANCHORS * 4,), mean), torch.full((ANCHORS * 4,), std))
    kps_mean = torch.tensor(KEYPOINT_MEANS, dtype=torch.float32).ravel().repeat(ANCHORS)
    _rescale(model.kps, kpss, kps_mean, torch.full_like(kps_mean, KEYPOINT_STD))


def _cells(heads: list[tuple[torch.Tensor, ...]], index: int) -> torch.Tensor:
    """One head output of every level and image as (cells, channels)."""
    return torch.cat(
        [level[index].permute(0, 2, 3, 1).reshape(-1, level[index].shape[1]) for level in heads]
    )


def build_onnx(path: Path, calibration: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Write the model to `path`; calibration: N x 3 x 640 x 640 float blobs as insightface
    feeds them. Returns its size: parameters and GMACs at 640 x 640."""
    torch.manual_seed(seed)
    model = ScrfdLike().eval()
    calibrate(model, torch.from_numpy(calibration))
    outputs = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in STRIDES]
    dynamic = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    dynamic |= {name: {0: "batch", 1: "anchors"} for name in outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 640, 640),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gmacs_640": conv_macs(model, 640) / 1e9,
    }
