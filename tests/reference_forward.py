"""An independent re-implementation of the FAT reference code's forward, written from METHOD.md §1–3
and ../shared/pretrained/fat-reference/README.md, working on the reference state dict directly.

It shares no code with fatq: it reads the reference keys (``P.act_alpha``, ``P.weight_quant.wgt_alpha``,
``P.weight_quant.transform.weight``, ``downsample.{0,1}``), computes every quantized weight in the
documented operation order and runs the network in float fake-quant, as the reference code does:

- body weight (METHOD.md §1): Ŵ = (W − mean) / std; F = FFT(Ŵ rows); mask = sigmoid(T(|F|ᵀ)ᵀ);
  W_t = Re(IFFT(F · mask)); u = clamp(W_t / α_w, −1, 1); q = sign(u) · round(|u| · n), n = 2^(b−1) − 1;
  the conv uses α_w · q / n.
- body input (§2, reference form): v = clamp(x / α_a, max=1); α_a · round(v · (2^b − 1)) / (2^b − 1).
- stem / classifier (§3, reference form): q = round(W / max(W) · 127) (signed max, no clamp), weight
  q / 127 · max(W); inputs float.
- residual Adds float; option-B shortcut = quantized 1×1 conv + BN; BN in eval mode (ε = 1e-5).

It computes in the dtype of the state dict's tensors (float32 as the reference does; float64 to
check the function without float32 rounding noise). Supported: CIFAR ResNets (any depth, option B)
and VGG (``features.{i}`` / ``classifier.{i}`` paths).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

from fatq.models import create_model

BN_EPS = 1e-5


def body_weight(state: dict, prefix: str, bits: int) -> tuple[Tensor, Tensor]:
    """(integers q, fake-quant weight α_w · q / n) of the FAT conv ``prefix``."""
    w = state[f"{prefix}.weight"]
    mask_layer = state[f"{prefix}.weight_quant.transform.weight"]  # [C_out, C_out]
    alpha = state[f"{prefix}.weight_quant.wgt_alpha"]
    rows = ((w - w.mean()) / w.std()).reshape(w.shape[0], -1)
    spectrum = torch.fft.fft(rows, dim=-1)
    gate = torch.sigmoid(spectrum.abs().t() @ mask_layer.t()).t()  # T applied across output channels
    transformed = torch.fft.ifft(spectrum * gate, dim=-1).real.reshape(w.shape)
    n = 2 ** (bits - 1) - 1
    u = torch.clamp(transformed / alpha, -1, 1)
    q = torch.sign(u) * torch.round(u.abs() * n)
    return q, alpha * q / n


def edge_weight(state: dict, prefix: str) -> tuple[Tensor, Tensor]:
    """(integers, fake-quant weight) of the stem/classifier: signed-max scale, no clamp."""
    w = state[f"{prefix}.weight"]
    peak = w.max()
    q = torch.round(w / peak * 127)
    return q, q / 127 * peak


def quantize_input(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    levels = 2**bits - 1
    return alpha * torch.round(torch.clamp(x / alpha, max=1) * levels) / levels


def batchnorm(x: Tensor, state: dict, prefix: str) -> Tensor:
    return F.batch_norm(
        x,
        state[f"{prefix}.running_mean"],
        state[f"{prefix}.running_var"],
        state[f"{prefix}.weight"],
        state[f"{prefix}.bias"],
        training=False,
        eps=BN_EPS,
    )


class ReferenceForward:
    """The reference forward of one state dict; ``integers`` holds every quantized layer's q."""

    def __init__(self, state: dict, bits: int):
        self.state = {k.removeprefix("module."): v for k, v in state.items()}
        self.bits = bits
        self.integers: dict[str, Tensor] = {}
        self.weights: dict[str, Tensor] = {}
        for key in self.state:
            if key.endswith(".weight_quant.wgt_alpha"):
                prefix = key.removesuffix(".weight_quant.wgt_alpha")
                self.integers[prefix], self.weights[prefix] = body_weight(self.state, prefix, bits)
        self.vgg = any(k.startswith("features.") for k in self.state)
        convs = sorted(
            (k.removesuffix(".weight") for k, v in self.state.items() if v.dim() == 4 and "transform" not in k),
            key=_natural,
        )
        linears = [k.removesuffix(".weight") for k, v in self.state.items() if v.dim() == 2 and "transform" not in k]
        self.stem, self.classifier = ("features.0" if self.vgg else "conv1"), linears[-1]
        assert self.stem in convs
        for prefix in (self.stem, self.classifier):
            self.integers[prefix], self.weights[prefix] = edge_weight(self.state, prefix)

    def conv(self, x: Tensor, prefix: str, stride: int, padding: int) -> Tensor:
        if prefix != self.stem:
            x = quantize_input(x, self.state[f"{prefix}.act_alpha"], self.bits)
        return F.conv2d(x, self.weights[prefix], None, stride, padding)

    def __call__(self, x: Tensor) -> Tensor:
        """Normalized images [B, 3, 32, 32] -> logits [B, classes]."""
        with torch.no_grad():
            features = self._vgg(x) if self.vgg else self._resnet(x)
            bias = self.state.get(f"{self.classifier}.bias")
            return F.linear(features, self.weights[self.classifier], bias)

    def _resnet(self, x: Tensor) -> Tensor:
        s = self.state
        out = F.relu(batchnorm(self.conv(x, "conv1", 1, 1), s, "bn1"))
        blocks = sorted({m.group(0) for k in s if (m := re.match(r"layer\d+\.\d+", k))}, key=_natural)
        for block in blocks:
            stride = 2 if s[f"{block}.conv1.weight"].shape[1] != s[f"{block}.conv1.weight"].shape[0] else 1
            branch = F.relu(batchnorm(self.conv(out, f"{block}.conv1", stride, 1), s, f"{block}.bn1"))
            branch = batchnorm(self.conv(branch, f"{block}.conv2", 1, 1), s, f"{block}.bn2")
            if f"{block}.downsample.0.weight" in s:
                shortcut = batchnorm(self.conv(out, f"{block}.downsample.0", stride, 0), s, f"{block}.downsample.1")
            else:
                shortcut = out
            out = F.relu(branch + shortcut)
        return out.mean(dim=(2, 3))

    def _vgg(self, x: Tensor) -> Tensor:
        s = self.state
        indices = sorted({int(m.group(1)) for k in s if (m := re.match(r"features\.(\d+)\.", k))})
        out = x
        for i in range(max(indices) + 1):
            key = f"features.{i}"
            if s.get(f"{key}.weight") is not None and s[f"{key}.weight"].dim() == 4:
                out = self.conv(out, key, 1, 1)
            elif f"{key}.running_mean" in s:
                out = F.relu(batchnorm(out, s, key))  # conv i-1, BN i, ReLU i+1, next item at i+2
                if f"features.{i + 2}.weight" not in s:
                    out = F.max_pool2d(out, 2)  # the next item is a max-pool
        return out.flatten(1)


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def reference_state(arch: str, bits: int, seed: int = 0, negative_stem: bool = False) -> dict:
    """A random state dict in the reference code's format (keys of fat-reference/README.md).

    Built from a fatq FP32 model's tensor shapes only to get the layer list; every reference key
    is written here by name. ``negative_stem`` shifts the stem weights so that min(W) < −max(W).
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = create_model(arch, bits=32, shortcut="B") if arch.startswith("resnet") else create_model(arch, bits=32)
    state = {}
    for key, value in shapes.state_dict().items():
        key = key.replace("shortcut.", "downsample.")
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=gen)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = 0.1 * torch.randn(value.shape, generator=gen)
        elif value.dim() == 1:  # BN gamma
            state[key] = 0.5 + torch.rand(value.shape, generator=gen)
        else:
            state[key] = torch.randn(value.shape, generator=gen) * (2.0 / value[0].numel()) ** 0.5
    if bits == 32:
        return state
    convs = [k.removesuffix(".weight") for k, v in state.items() if v.dim() in (2, 4)]
    stem, classifier = convs[0], convs[-1]
    for prefix in convs:
        out_channels = state[f"{prefix}.weight"].shape[0]
        mask = (1.0 + torch.randn(out_channels, out_channels, generator=gen)) / out_channels
        if prefix in (stem, classifier):
            state[f"{prefix}.transform.weight"] = mask  # present in reference files, unused by their forward
            continue
        state[f"{prefix}.act_alpha"] = torch.tensor(0.5 + 2.5 * torch.rand((), generator=gen).item())
        state[f"{prefix}.weight_quant.wgt_alpha"] = torch.tensor(1.5 + 1.5 * torch.rand((), generator=gen).item())
        state[f"{prefix}.weight_quant.transform.weight"] = mask
    w = state[f"{stem}.weight"]
    w = -w if w.min() < -w.max() else w  # max(W) >= |min(W)|: integers inside [-127, 127]
    state[f"{stem}.weight"] = w - 0.6 * w.abs().max() if negative_stem else w
    assert (state[f"{stem}.weight"].min() < -state[f"{stem}.weight"].max()) == negative_stem
    return state


def save_reference(tmp_path, state: dict, name: str = "ref.pth.tar") -> str:
    path = tmp_path / name
    torch.save({"epoch": 7, "state_dict": state, "best_top1_acc": torch.tensor(50.0), "optimizer": {}}, path)
    return str(path)
