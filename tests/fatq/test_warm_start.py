"""fatq.warm_start: a quantized model initialised from FP32 gets BN statistics and α_a from data, nothing else."""

from __future__ import annotations

import torch
from torch import nn

from fatq.cli_train import build_parser, resolve_config
from fatq.models import create_model
from fatq.quantizers import ActivationQuantizer
from fatq.warm_start import reestimate_batchnorm, training_batches, warm_start


def quantized_from_fp32() -> nn.Module:
    fp32 = create_model("resnet20", bits=32)
    model = create_model("resnet20", bits=4)
    model.load_state_dict(fp32.state_dict(), strict=False)
    return model


def batches(count: int = 2, size: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(size, 3, 32, 32, generator=gen) for _ in range(count)]


def test_batchnorm_statistics_are_the_average_over_the_batches():
    model, data = quantized_from_fp32(), batches()
    reestimate_batchnorm(model, data)
    bn = model.layer2[0].bn1
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()  # before the checking pass moves them
    seen = []
    hook = model.layer2[0].conv1.register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)
    hook.remove()
    # cumulative average (momentum None) of the per-batch means / unbiased variances
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in seen])
    variances = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1) for o in seen])
    torch.testing.assert_close(running_mean, means.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(running_var, variances.mean(0), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1


def test_warm_start_changes_only_statistics_and_activation_ranges():
    model = quantized_from_fp32()
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    record = warm_start(model, batches(), method="minmax")
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    allowed = ("running_mean", "running_var", "num_batches_tracked", "input_quantizer.alpha", "_quantizer.alpha")
    # (FAT layers: α_w stays; only --no-transform layers get α_w = 3σ(W))
    assert changed and all(k.endswith(allowed) for k in changed)
    body = model.layer1[0].conv1.input_quantizer
    assert record["act_alpha"]["layer1.0.conv1.input_quantizer"] == body.alpha.item() != 5.0
    assert all(q.enabled for q in model.modules() if isinstance(q, ActivationQuantizer))
    assert record["images"] == 16


def test_untransformed_layers_start_with_the_clip_fat_starts_with():
    """--no-transform: α_w = 3·σ(W) (FAT's 3.0 in units of σ); FAT layers keep α_w = 3.0."""
    from fatq.qconfig import QuantSpec

    fp32 = create_model("resnet20", bits=32)
    ablation = create_model("resnet20", spec=QuantSpec.from_bits(4, transform=False))
    ablation.load_state_dict(fp32.state_dict(), strict=False)
    conv = ablation.layer2[0].conv2
    zeros_before = (conv.weight_integers()[0] == 0).float().mean().item()
    record = warm_start(ablation, batches(), method="minmax")
    sigma = conv.weight.std().item()
    assert abs(conv.weight_quantizer.alpha.item() - 3.0 * sigma) < 1e-6 * sigma
    assert record["weight_alpha_of_untransformed_layers"]["layer2.0.conv2"] == conv.weight_quantizer.alpha.item()
    zeros_after = (conv.weight_integers()[0] == 0).float().mean().item()
    assert zeros_before > 0.95 and zeros_after < 0.3  # 4 bits, 3σ clip: |W| < 0.21σ rounds to 0 (~17 %)
    fat = quantized_from_fp32()
    assert warm_start(fat, batches(), method="minmax")["weight_alpha_of_untransformed_layers"] == {}
    assert fat.layer2[0].conv2.weight_quantizer.alpha.item() == 3.0


def test_training_batches_are_normalized_and_seeded():
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    norm = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    first, second = training_batches(images, norm, 8, 3, 0), training_batches(images, norm, 8, 3, 0)
    assert [b.shape[0] for b in first] == [8, 8, 8]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert first[0].min() >= -2.0 and first[0].max() <= 2.0


def test_paper_start_flag_turns_it_off(tmp_path):
    args = ["--arch", "resnet20", "--data-dir", str(tmp_path), "--pretrained", "x.th"]
    assert resolve_config(build_parser().parse_args(args)).warm_start
    assert not resolve_config(build_parser().parse_args([*args, "--paper-start"])).warm_start
