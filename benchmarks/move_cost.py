"""What the engine-exact moves cost: how far they take a model from the model as trained.

    python benchmarks/move_cost.py --checkpoint best.pt --data-dir ../shared/datasets --images 2000

Prints, on the first ``--images`` test images (the seeded subset ``fatq-export --check`` uses):

1. the top-1 predictions that change when one residual-sum reader's range is scaled by 1 + ε (its reading
   convs compensated, so only its own rounding changes), for ε = 1e-6, 1e-5, 1e-4: how chaotic the model is;
2. the agreement of the moved model (float-bias and int32-bias files) with the model as trained, without and
   with calibration visits (``--calib-batches`` × 64 train images), and the time the visit counting took;
3. for the float-bias moves with visits: the quantizer where each changed prediction first differs.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from engines.deploy_check import check_images
from export import engine_exact
from export.lattice_visits import LatticeVisits
from export.pipeline import CALIB_BATCH_SIZE, CalibrationSettings, _calibration_images, deploy_graph
from fatq.checkpoint import load_fatq_checkpoint, model_from_checkpoint
from fatq.quantizers import ActivationQuantizer


def _predictions(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i : i + 500]).argmax(1) for i in range(0, len(images), 500)])


def _integers(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{quantizer: integers [N, ...]} on ``images``, in graph order."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        q.register_forward_hook(lambda m, args, _, n=n: seen.setdefault(n, []).append(m.integers(args[0])[0]))
        for n, q in model.named_modules()
        if isinstance(q, ActivationQuantizer)
    ]
    _predictions(model, images)
    for hook in hooks:
        hook.remove()
    return {n: torch.cat(parts) for n, parts in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--calib-batches", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = load_fatq_checkpoint(args.checkpoint)
    base = model_from_checkpoint(data).eval()
    shape = list(data["input_size"])
    images, _, _ = check_images(data, args.data_dir, args.images, shape)
    lower = lambda model: deploy_graph(model, shape)  # noqa: E731
    before = _predictions(base, images)

    def changed(model) -> float:
        return 100.0 * float((_predictions(model, images) != before).float().mean())

    graph = lower(base)
    reader = next(lattice for lattice in engine_exact._sum_lattices(graph) if lattice.name.endswith("input_quantizer"))
    print(f"1. {reader.name} range scaled by 1 + e (readers compensated), {len(images)} test images:")
    for epsilon in (1e-6, 1e-5, 1e-4):
        moved = copy.deepcopy(base)
        modules = dict(moved.named_modules())
        with torch.no_grad():
            modules[reader.name].alpha.mul_(1 + epsilon)
            engine_exact._compensate_readers(graph, modules, reader.output, epsilon, set())
        print(f"   e = {epsilon:g}: {changed(moved):.2f} % of top-1 predictions change")

    calibration = CalibrationSettings(args.data_dir, args.calib_batches)
    started = time.perf_counter()
    calib = _calibration_images(calibration, data)
    loaded = time.perf_counter()
    count = f"{len(calib)} = {args.calib_batches} x {CALIB_BATCH_SIZE}"
    print(f"2. moved model vs the model as trained ({count} calibration images):")
    float_visited = None
    for arithmetic in ("float", "int32"):
        counted = time.perf_counter()
        visits = LatticeVisits.measure(graph, calib, arithmetic)
        seconds = time.perf_counter() - counted
        for label, used in (("no visits", None), ("visits", visits)):
            moved = copy.deepcopy(base)
            _, report = engine_exact.make_engine_exact(moved, lower, arithmetic=arithmetic, visits=used)
            print(
                f"   {arithmetic:5} {label:9}: agreement {100 - changed(moved):.2f} %   sum moves crossed "
                f"{report['sum_ties']['crossed']}, conv moves crossed {report['ties']['crossed']}"
            )
            if arithmetic == "float" and used is not None:
                float_visited = moved
        print(f"   ({arithmetic} visit counting: {seconds:.1f} s; loading the images: {loaded - started:.1f} s)")

    flips = torch.nonzero(_predictions(float_visited, images) != before).flatten().tolist()
    ours, theirs = _integers(float_visited, images), _integers(base, images)
    first: dict[str, int] = {}
    for image in flips:
        name = next((n for n in theirs if not torch.equal(ours[n][image], theirs[n][image])), "(logits only)")
        first[name] = first.get(name, 0) + 1
    print(f"3. float moves with visits, {len(flips)} changed predictions first differ at: {first}")


if __name__ == "__main__":
    main()
