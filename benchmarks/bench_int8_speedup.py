"""int8 vs fp32 speed per core: each architecture is built (resnet50 with generated weights,
efficientnet-lite0 from its checkpoint), quantised with the l2 method on a few real images, and
both models are timed side by side in this run, one onnxruntime thread each, pinned to one core,
on the same input batch (no decoding: the model cost alone). Writes the rates and ratios to
benchmarks/results/int8_speedup.json (and .md) with the machine and the commit.

    PYTHONPATH=. python benchmarks/bench_int8_speedup.py [--archs resnet50,efficientnet-lite0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.config import load_preset
from pipeline.onnx_model import make_session
from pipeline.models import ARCHITECTURES, build_model
from pipeline.preprocess import decode_image, preprocess_image
from pipeline.quantize import quantize_model
from results_file import write_results

SAMPLE_1000 = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-1000"


def real_inputs(preset: str, count: int) -> np.ndarray:
    files = sorted(p for p in SAMPLE_1000.iterdir() if p.suffix.upper() == ".JPEG")[:count]
    if len(files) < count:
        raise SystemExit(f"{SAMPLE_1000} is absent or short: the shared ImageNet data lives in ../shared")
    preset_obj = load_preset(preset)
    return np.stack([preprocess_image(decode_image(f.read_bytes()), preset_obj) for f in files])


def images_per_second(session, inputs: np.ndarray, seconds: float) -> float:
    feed = {session.get_inputs()[0].name: inputs}
    session.run(None, feed)  # warm-up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feed)
        runs += 1
    return runs * len(inputs) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="resnet50,efficientnet-lite0")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0, help="timing per model and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternate fp32/int8 this many times")
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for both models
    lines = ["| model | fp32 img/s per core | int8 img/s per core | int8 / fp32 |", "|---|---:|---:|---:|"]
    figures = {}
    header = f"batch {args.batch}, 1 thread pinned to one core, best of {args.rounds} rounds of {args.seconds:.0f} s"
    print(header, *lines, sep="\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            spec = ARCHITECTURES[arch]
            fp32 = build_model(arch, "generated" if spec.generated_weights else None, Path(tmp) / f"{arch}.onnx")
            inputs = real_inputs(spec.preset, args.calibration_images)
            batches = [inputs[i:i + 8] for i in range(0, len(inputs), 8)]
            int8 = quantize_model(fp32, batches, Path(tmp) / f"{arch}-int8.onnx", "l2")
            sessions = {"fp32": make_session(str(fp32), threads=1), "int8": make_session(str(int8), threads=1)}
            rates = {"fp32": [], "int8": []}
            for _ in range(args.rounds):
                for name, session in sessions.items():
                    rates[name].append(images_per_second(session, inputs[: args.batch], args.seconds))
            fp32_rate, int8_rate = max(rates["fp32"]), max(rates["int8"])
            figures[arch] = {"fp32_images_per_s": fp32_rate, "int8_images_per_s": int8_rate,
                             "int8_over_fp32": int8_rate / fp32_rate}
            lines.append(f"| {arch} | {fp32_rate:.1f} | {int8_rate:.1f} | {int8_rate / fp32_rate:.2f}x |")
            print(lines[-1], flush=True)
    text = header + "\n\n" + "\n".join(lines)
    write_results(__file__, {"batch": args.batch, "rounds": args.rounds, "seconds": args.seconds,
                             "models": figures}, text)

if __name__ == "__main__":
    main()
