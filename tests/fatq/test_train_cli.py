"""fatq-train: artifacts of a tiny run, evaluation of fatq and public checkpoints, bad input, recipe pieces."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_image_folder

from fatq import QuantSpec, create_model
from fatq.checkpoint import IMAGENET_NORMALIZATION, model_from_checkpoint
from fatq.cli_train import main
from fatq.data import channel_statistics, load_split, normalize
from fatq.train import LRSchedule, TrainConfig, default_milestones, parameter_groups

TINY = ["--arch", "resnet20", "--batch-size", "8", "--quiet", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models run faster on one thread, and far faster on a loaded machine (real-data tests keep all)."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("data") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """3 classes x 8 train / 8 test images of 32x32; the working directory is a temp dir."""
    monkeypatch.chdir(tmp_path)
    return make_image_folder(tmp_path / "data", classes=3, per_class=8)


def _accuracy_by_hand(model, data_dir, normalization) -> float:
    """Independent top-1: one forward over the whole test split, argmax, compare."""
    test = load_split(data_dir, "test")
    model.eval()
    with torch.no_grad():
        logits = model(normalize(test.images, normalization["mean"], normalization["std"]))
    return 100.0 * (logits.argmax(1) == test.labels).float().mean().item()


def test_training_writes_all_artifacts(tiny, tmp_path, capsys):
    job = tmp_path / "job"
    argv = [*TINY, "--bits", "4", "--data-dir", str(tiny), "--epochs", "2", "--job-dir", str(job)]
    assert main([*argv, "--json", "out.json"]) == 0
    assert {p.name for p in job.iterdir()} == {"last.pt", "best.pt", "metrics.jsonl", "config.json"}

    lines = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 6]  # 24 images / batch 8 = 3 steps per epoch
    assert all(line["train_images"] == 24 and line["images"] == 24 for line in lines)

    config = json.loads((job / "config.json").read_text())
    assert config["config"]["weight_bits"] == 4 and config["config"]["milestones"] == [0.75, 1.125]
    assert (
        config["invocations"][0]["command"][1:] == [*argv, "--json", "out.json"]
        and config["invocations"][0]["torch"] == torch.__version__
    )

    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["steps"] == 6 and summary["top1"] == lines[-1]["top1"]
    assert {"top1", "top5", "loss", "steps", "git_commit", "fatq_version"} <= set(summary)

    last = torch.load(job / "last.pt", weights_only=True)
    assert last["step"] == 6 and last["epoch"] == 2 and "optimizer" in last and "rng" in last
    assert last["provenance"]["command"] == config["invocations"][0]["command"]
    assert last["normalization"]["mean"] == [0.4914, 0.4822, 0.4465]  # CIFAR-10 constants, no checkpoint to inherit
    model = model_from_checkpoint(last)
    assert _accuracy_by_hand(model, tiny, last["normalization"]) == pytest.approx(summary["top1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("top-1 ") and "top-5" in out[-1]

    # --eval-only of the fatq checkpoint reproduces the reported figure
    assert main(["--eval-only", str(job / "last.pt"), "--data-dir", str(tiny), "--json", "eval.json", "--quiet"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["top1"] == pytest.approx(summary["top1"])


def test_eval_only_of_a_public_checkpoint_uses_imagenet_normalization(tiny, tmp_path):
    torch.manual_seed(3)
    fp32 = create_model("resnet20", bits=32, num_classes=3)
    for m in fp32.modules():  # give BN non-trivial statistics so normalization matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    public = {"best_prec1": 0.0, "state_dict": {f"module.{k}": v for k, v in fp32.state_dict().items()}}
    torch.save(public, tmp_path / "public.th")
    with pytest.raises(SystemExit):  # argparse --help exits 0 and lists the architectures
        main(["--help"])
    assert main(["--eval-only", "public.th", "--arch", "resnet20", "--data-dir", str(tiny), "--json", "e.json"]) == 0
    reported = json.loads((tmp_path / "e.json").read_text())
    assert reported["normalization"] == IMAGENET_NORMALIZATION and reported["weight_bits"] == 32
    assert reported["top1"] == pytest.approx(_accuracy_by_hand(fp32, tiny, IMAGENET_NORMALIZATION))


def test_amp_bf16_on_cpu_trains(tiny, tmp_path):
    assert main([*TINY, "--data-dir", str(tiny), "--amp", "--max-steps", "1", "--job-dir", "amp"]) == 0
    assert torch.load(tmp_path / "amp" / "last.pt", weights_only=True)["step"] == 1


def _write_public(path, arch):
    model = create_model(arch, bits=32, num_classes=3)
    torch.save({"best_prec1": 0.0, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)


R20 = ["--arch", "resnet20"]
BAD_INPUTS = {  # argv ("{data}" is the tiny dataset), expected part of the one-line message
    "unknown arch": (["--arch", "resnet21", "--data-dir", "{data}"], "invalid choice"),
    "bits out of range": ([*R20, "--bits", "9", "--data-dir", "{data}"], "bits must be in 2..8"),
    "missing data dir": ([*R20, "--data-dir", "nowhere"], "does not exist"),
    "empty data dir": ([*R20, "--data-dir", "empty"], "no image-folder dataset"),
    "data dir without classes": ([*R20, "--data-dir", "classless"], "has no class folders"),
    "checkpoint of another arch": ([*R20, "--data-dir", "{data}", "--pretrained", "r32.th"], "does not fit resnet20"),
    "corrupt checkpoint": ([*R20, "--data-dir", "{data}", "--pretrained", "junk.th"], "not a readable checkpoint"),
    "resume without last.pt": (["--data-dir", "{data}", "--resume", "--job-dir", "fresh"], "does not exist"),
    "resume without job dir": (["--data-dir", "{data}", "--resume"], "--resume needs --job-dir"),
    "bad milestones": ([*R20, "--data-dir", "{data}", "--milestones", "1,x"], "--milestones must be"),
    "eval-only without arch": (["--eval-only", "r32.th", "--data-dir", "{data}"], "pass --arch"),
    "unknown flag": ([*R20, "--data-dir", "{data}", "--bogus"], "unrecognized arguments"),
    "gpu decode in memory": ([*R20, "--data-dir", "{data}", "--gpu-decode"], "--gpu-decode needs the streaming"),
    "zero image size": ([*R20, "--data-dir", "{data}", "--image-size", "0"], "--image-size must be positive"),
    "stream torchvision cifar": ([*R20, "--data-dir", "tvcifar", "--loader", "stream"], "CIFAR-10 in torchvision"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny, tmp_path, capsys, case):
    _write_public(tmp_path / "r32.th", "resnet32")
    (tmp_path / "junk.th").write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty").mkdir()
    for split in ("train", "test"):
        (tmp_path / "classless" / split).mkdir(parents=True)
    (tmp_path / "tvcifar" / "cifar-10-batches-py").mkdir(parents=True)
    argv, message = BAD_INPUTS[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([a.replace("{data}", str(tiny)) for a in argv] + ["--quiet", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no job dir, no runs/, no partial file


def test_console_script_reports_user_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fatq.cli_train", "--arch", "resnet20", "--data-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_parameter_groups_follow_the_recipe():
    cfg = TrainConfig(arch="resnet20", data_dir="-")
    model = create_model("resnet20", spec=QuantSpec(4, 4))
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    expected = {
        "weights": (0.04, 5e-4),
        "act_alpha": (0.1, 1e-4),
        "weight_alpha": (0.02, 1e-4),
        "transform": (0.02, 1e-4),
    }
    assert {name: (g["lr"], g["weight_decay"]) for name, g in groups.items()} == expected
    from fatq.quantizers import ActivationQuantizer

    activation_alphas = {id(m.alpha) for m in model.modules() if isinstance(m, ActivationQuantizer)}
    assert {id(p) for p in groups["act_alpha"]["params"]} == activation_alphas
    assert len(groups["transform"]["params"]) == 18  # one mask per FAT conv of ResNet-20 (19 convs - first)
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))
    fp32 = parameter_groups(create_model("resnet20", bits=32), TrainConfig(arch="resnet20", data_dir="-", lr=0.1))
    assert [g["name"] for g in fp32] == ["weights"] and fp32[0]["lr"] == 0.1


def test_step_schedule_scales_reference_milestones_to_short_runs():
    cfg = TrainConfig(arch="resnet20", data_dir="-", epochs=1, milestones=default_milestones(1))
    schedule = LRSchedule.from_config(cfg, steps_per_epoch=196)
    assert schedule.milestone_steps == [round(196 * 150 / 400), round(196 * 225 / 400)]
    assert schedule.factor(0) == 1.0 and schedule.factor(73) == 1.0
    assert schedule.factor(74) == pytest.approx(0.1) and schedule.factor(110) == pytest.approx(0.01)
    full = LRSchedule.from_config(TrainConfig(arch="resnet20", data_dir="-"), steps_per_epoch=196)
    assert full.milestone_steps == [150 * 196, 225 * 196]  # the 400-epoch recipe is unchanged
    cosine = LRSchedule("cosine", 100, [])
    assert cosine.factor(0) == 1.0 and cosine.factor(50) == pytest.approx(0.5) and cosine.factor(100) == 0.0


@pytest.mark.data
def test_eval_only_of_the_public_fp32_resnet20(data_dir, pretrained_dir, tmp_path, capsys):
    checkpoint = pretrained_dir / "resnet20-cifar10-fp32.th"
    argv = ["--eval-only", str(checkpoint), "--arch", "resnet20", "--data-dir", str(data_dir), "--quiet"]
    assert main([*argv, "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["images"] == 10000 and result["weight_bits"] == 32
    assert result["top1"] == pytest.approx(81.03, abs=0.3)  # measured with the core; JPEG q75 test split
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"top-1 {result['top1']:.2f} %")


def test_imagefolder_training_resizes_and_normalizes_with_its_own_statistics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "folder", classes=5, per_class=2, size=20)
    argv = ["--arch", "resnet20", "--dataset", "imagefolder", "--image-size", "16", "--data-dir", str(data)]
    assert main([*argv, "--batch-size", "4", "--max-steps", "1", "--quiet", "--job-dir", "job"]) == 0
    last = torch.load(tmp_path / "job" / "last.pt", weights_only=True)
    train = load_split(data, "train", dataset="imagefolder", image_size=16)
    assert train.images.shape == (10, 3, 16, 16) and last["num_classes"] == 5
    expected = channel_statistics(train.images)
    assert last["normalization"]["mean"] == pytest.approx(expected["mean"])
    assert last["train_config"]["crop_padding"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_gpu_is_a_user_error(tiny, capsys):
    assert main([*R20, "--data-dir", str(tiny), "--device", "cuda"]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err


def _alphas(state_dict: dict) -> dict:
    return {k: float(v) for k, v in state_dict.items() if k.endswith(".alpha")}


def test_random_init_mobilenetv2_repro_writes_only_positive_alphas(tmp_path, monkeypatch):
    """The issue's repro: two steps of batch 4 drove six alphas negative (one weight alpha to -82.5)."""
    from fatq.quantizers import ALPHA_FLOOR

    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", classes=3, per_class=4)
    argv = ["--arch", "mobilenetv2", "--bits", "4", "--batch-size", "4", "--data-dir", str(data), "--max-steps", "2"]
    assert main([*argv, "--quiet", "--device", "cpu", "--job-dir", "job"]) == 0
    alphas = _alphas(torch.load(tmp_path / "job" / "last.pt", weights_only=True)["state_dict"])
    assert len(alphas) == 124 and min(alphas.values()) >= float(torch.tensor(ALPHA_FLOOR))


@pytest.mark.parametrize("arch", ["resnet20", "mobilenetv2"])
def test_aggressive_lr_never_saves_a_non_positive_or_non_finite_alpha(tmp_path, monkeypatch, capsys, arch):
    from fatq.quantizers import ALPHA_FLOOR

    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    argv = ["--arch", arch, "--lr", "10", "--batch-size", "4", "--data-dir", str(data), "--epochs", "2"]
    status = main([*argv, "--quiet", "--device", "cpu", "--job-dir", "job", "--save-every", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 0 or (status == 2 and len(err) == 1 and "training diverged at step" in err[0]), err
    saved = [p for p in (tmp_path / "job").glob("*.pt")]
    assert saved or status == 2
    for path in saved:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert min(_alphas(state).values()) >= float(torch.tensor(ALPHA_FLOOR)), path
        assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor)), path


def test_divergence_stops_with_one_sentence_and_saves_nothing_of_the_bad_step(tiny, tmp_path, capsys):
    argv = [*TINY, "--data-dir", str(tiny), "--lr", "1e38", "--epochs", "3", "--job-dir", "job", "--save-every", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training diverged at step" in err[0] and "nothing of that step was saved" in err[0], err
    step = int(err[0].split("training diverged at step ")[1].split(":")[0])
    last = tmp_path / "job" / "last.pt"
    if last.exists():  # what was saved is an earlier, healthy step
        state = torch.load(last, weights_only=True)
        assert state["step"] < step
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_lr_is_refused_before_training(tiny, tmp_path, capsys, value):
    assert main([*TINY, "--data-dir", str(tiny), f"--lr={value}", "--job-dir", "job"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid lr" in err[0] and not (tmp_path / "job").exists()


def test_clamp_alphas_raises_only_what_is_below_the_floor():
    from fatq.quantizers import ALPHA_FLOOR, clamp_alphas_

    model = create_model("resnet20", bits=4, num_classes=3)
    quantizers = [m for m in model.modules() if hasattr(m, "alpha")]
    with torch.no_grad():
        quantizers[0].alpha.fill_(-82.5)
        quantizers[1].alpha.fill_(0.0)
        quantizers[2].alpha.fill_(float("nan"))
        quantizers[3].alpha.fill_(2.5)
    clamp_alphas_(model)
    floor = float(torch.tensor(ALPHA_FLOOR))  # as float32 holds it
    assert [float(q.alpha.detach()) for q in quantizers[:2]] == [floor, floor]
    # NaN is reported, not hidden
    assert torch.isnan(quantizers[2].alpha) and float(quantizers[3].alpha.detach()) == 2.5


def test_imagenet_models_default_to_the_imagenet_recipe(tmp_path):
    from fatq.cli_train import build_parser, resolve_config

    make_image_folder(tmp_path / "d", classes=2, per_class=1, size=8)
    base = ["--data-dir", str(tmp_path / "d"), "--dataset", "imagefolder"]
    cfg = resolve_config(build_parser().parse_args(["--arch", "resnet18", *base]))
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.label_smoothing, cfg.batch_size) == (120, 0.01, 1e-4, 0.01, 512)
    assert cfg.milestones == (30.0, 60.0, 90.0) and cfg.quant_spec().act_alpha_init == 8.0
    short = resolve_config(build_parser().parse_args(["--arch", "mobilenetv2", *base, "--epochs", "12"]))
    assert short.milestones == (3.0, 6.0, 9.0) and short.lr == 0.01
    own = [
        "--arch",
        "resnet34",
        *base,
        "--lr",
        "0.1",
        "--batch-size",
        "64",
        "--label-smoothing",
        "0",
        "--weight-decay",
        "0",
    ]
    cfg = resolve_config(build_parser().parse_args(own))
    assert (cfg.lr, cfg.batch_size, cfg.label_smoothing, cfg.weight_decay) == (0.1, 64, 0.0, 0.0)
    cifar = resolve_config(build_parser().parse_args(["--arch", "resnet20", *base]))
    assert (cifar.epochs, cifar.lr, cifar.weight_decay, cifar.batch_size) == (400, 0.04, 5e-4, 256)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "mobilenetv2"])
def test_torchvision_state_dict_files_load_and_compute_torchvisions_logits(tmp_path, arch):
    import torchvision

    from fatq.checkpoint import init_from_pretrained

    torch.manual_seed(0)
    builder = {"resnet18": torchvision.models.resnet18, "resnet34": torchvision.models.resnet34}
    reference = builder.get(arch, torchvision.models.mobilenet_v2)(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / f"{arch}.pth")  # torchvision's file format: a bare state dict
    model = create_model(arch, bits=32, num_classes=1000).eval()
    meta = init_from_pretrained(model, tmp_path / f"{arch}.pth")
    assert meta["normalization"] == IMAGENET_NORMALIZATION and meta["format"] == "public"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), rtol=1e-4, atol=1e-5)
    quantized = create_model(arch, bits=4, num_classes=1000)  # progressive init: quantizer keys keep their init
    init_from_pretrained(quantized, tmp_path / f"{arch}.pth")
    classifier = "fc.weight" if arch != "mobilenetv2" else "classifier.1.weight"
    assert torch.equal(quantized.state_dict()[classifier], reference.state_dict()[classifier])


def test_target_and_mask_init_are_part_of_the_run_and_the_model():
    from fatq.cli_train import build_parser, resolve_config

    args = ["--arch", "resnet20", "--data-dir", "d", "--target", "trt", "--mask-init", "unsaturated"]
    cfg = resolve_config(build_parser().parse_args(args))
    assert (cfg.target, cfg.mask_init) == ("trt", "unsaturated")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # saved with the run, so resume keeps them
    spec = cfg.quant_spec()
    assert (spec.target, spec.mask_init) == ("trt", "unsaturated")
    default = resolve_config(build_parser().parse_args(args[:4])).quant_spec()
    assert (default.target, default.mask_init) == ("portable", "paper")


def test_a_new_cpu_target_run_uses_full_range_8bit_and_a_resumed_old_one_keeps_int8():
    from fatq.cli_train import build_parser, resolve_config

    args = ["--arch", "resnet20", "--data-dir", "d", "--target", "cpu"]
    cfg = resolve_config(build_parser().parse_args(args))
    assert cfg.full_range_8bit and cfg.quant_spec().full_range_8bit
    assert not resolve_config(build_parser().parse_args(args[:4])).full_range_8bit  # portable
    # a run saved before the field existed resumes as it trained: unsigned 8-bit quantizers stay [0, 127]
    saved = {k: v for k, v in cfg.to_dict().items() if k != "full_range_8bit"}
    resumed = resolve_config(build_parser().parse_args(["--data-dir", "d"]), saved)
    assert resumed.target == "cpu" and not resumed.full_range_8bit
