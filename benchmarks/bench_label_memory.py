"""The driver's peak memory of `pipeline label` does not grow with the archive: label a generated
archive of 10,000 and of 100,000 small images (tar shards of 1,000 32x32 JPEGs) and print the
driver's peak resident memory (VmHWM) for both, and their ratio.

    python benchmarks/bench_label_memory.py [--sizes 10000 100000] [--workdir DIR]

The model is a tiny real ONNX classifier built here with onnx.helper (global average pool and one
dense layer to 1,000 classes, on 32x32 inputs, with a matching preset): what is measured is the
driver's bookkeeping of a long stream (unit writers, shards, progress), not waiting on inference.
Each size runs in a fresh driver process, so the peaks are the drivers' own. The figures go to
benchmarks/results/label_memory.json (and .md) with the machine and the commit.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_file import write_results  # noqa: E402

IMAGES_PER_SHARD = 1000
DISTINCT_IMAGES = 256
PRESET_YAML = """\
name: tiny32
channel_order: RGB
mean: [123.675, 116.28, 103.53]
std: [58.395, 57.12, 57.375]
interpolation: bilinear
scale: 32
crop: 32
crop_offset: round
"""


def tiny_classifier(path: Path) -> Path:
    """[N,3,32,32] -> GlobalAveragePool -> Flatten -> MatMul + Add -> [N,1000] logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["features"]),
         helper.make_node("MatMul", ["features", "weights"], ["scores"]),
         helper.make_node("Add", ["scores", "bias"], ["logits"])],
        "tiny32",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        [numpy_helper.from_array(rng.normal(size=(3, 1000)).astype(np.float32), "weights"),
         numpy_helper.from_array(rng.normal(size=1000).astype(np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def small_jpegs() -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(1)
    images = []
    for _ in range(DISTINCT_IMAGES):
        pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def make_archive(folder: Path, count: int) -> Path:
    """COUNT images in tar shards of IMAGES_PER_SHARD under FOLDER (kept between runs)."""
    done_marker = folder / ".complete"
    if done_marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = small_jpegs()
    for shard, start in enumerate(range(0, count, IMAGES_PER_SHARD)):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as archive:
            for i in range(start, min(start + IMAGES_PER_SHARD, count)):
                data = jpegs[i % len(jpegs)]
                info = tarfile.TarInfo(f"{i:07d}.jpg")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    done_marker.touch()
    return folder


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(model: str, data: str, preset: str, output: str) -> None:
    """Child mode: label DATA in this fresh process and print the driver's figures as JSON."""
    from pipeline.label import label

    started = time.perf_counter()
    manifest = label(model, data, output, preset=preset, overwrite=True)
    print(json.dumps({"images": manifest["images"], "labelled": manifest["labelled"],
                      "wall_s": time.perf_counter() - started, "images_per_s": manifest["images_per_s"],
                      "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-label-memory")
    parser.add_argument("--measure", nargs=4, metavar=("MODEL", "DATA", "PRESET", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = tiny_classifier(args.workdir / "tiny32.onnx")
    preset = args.workdir / "tiny32.yaml"
    preset.write_text(PRESET_YAML)
    results = {}
    lines = ["| images | driver peak RSS | wall | images/s |", "|---:|---:|---:|---:|"]
    for size in args.sizes:
        started = time.perf_counter()
        data = make_archive(args.workdir / f"archive-{size}", size)
        print(f"{size} images in {data} ({time.perf_counter() - started:.1f} s to generate)", flush=True)
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(model), str(data), str(preset),
             str(args.workdir / f"labels-{size}")],
            check=True, stdout=subprocess.PIPE, text=True)
        results[size] = json.loads(child.stdout.strip().splitlines()[-1])
        r = results[size]
        assert r["images"] == r["labelled"] == size, r
        lines.append(f"| {size} | {r['peak_rss_mb']:.0f} MB | {r['wall_s']:.0f} s | {r['images_per_s']:.0f} |")
        print(lines[-1], flush=True)
    small, large = min(results), max(results)
    figures = {"sizes": {str(size): r for size, r in results.items()}}
    if small != large:
        figures["peak_rss_ratio"] = results[large]["peak_rss_mb"] / results[small]["peak_rss_mb"]
        lines += ["", f"peak RSS ratio {large} / {small} images: {figures['peak_rss_ratio']:.2f} "
                  f"(archive {large / small:.0f}x larger)"]
        print(lines[-1])
    write_results(__file__, figures, "\n".join(lines))

if __name__ == "__main__":
    main()
