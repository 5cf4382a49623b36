"""report.html: one self-contained page (plots and thumbnails inline as base64, no script, nothing
fetched) with what `evaluate` and `compare` measured.

Plots are matplotlib SVGs: drawn on the driver with no browser-side code or network, one small
vector image each, and matplotlib is the plotting library most Python users already know."""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.classes import imagenet_classes
from pipeline.output import write_text

THUMBNAIL_SIZE = 112


def percent(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def with_interval(value: float, ci: dict) -> str:
    return f"{percent(value)} <span class=ci>[{percent(ci['low'])}, {percent(ci['high'])}]</span>"


def svg_image(figure) -> str:
    """A matplotlib figure as an inline <img> (SVG, base64), the figure closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    return f'<img alt="plot" src="data:image/svg+xml;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(name: str, quality: dict) -> str:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(4.2, 4.0))
    bins = quality["reliability"]
    width = 1.0 / quality["ece_bins"]
    axes.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
             edgecolor="#1f4e79", color="#6fa8dc", label="accuracy")
    axes.plot([0, 1], [0, 1], "--", color="#999999", label="perfect calibration")
    axes.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="#cc4125", markersize=3,
              label="mean confidence")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-1 confidence", ylabel="top-1 accuracy",
             title=f"{name}: ECE {100 * quality['ece']:.2f}%")
    # below the axes: inside, it hides the bars of whichever corner it is put in
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=7, frameon=False)
    return svg_image(figure)


def class_accuracy_plot(models: list[dict]) -> str:
    """Each model's per-class top-1, classes sorted from worst to best."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7.0, 3.2))
    for model in models:
        values = sorted(row["top1"] for row in model["metrics"]["per_class"].values())
        axes.plot(np.arange(len(values)), values, label=model["name"], linewidth=1.2)
    axes.set(xlabel="classes, worst to best", ylabel="top-1 accuracy", ylim=(-0.02, 1.02),
             title="per-class top-1 accuracy")
    axes.legend(fontsize=8)
    return svg_image(figure)


def thumbnail(image: Optional[bytes]) -> str:
    if image is None:
        return "<div class=nothumb>image not read</div>"
    return f'<img class=thumb alt="" src="data:image/jpeg;base64,{base64.b64encode(image).decode()}">'


def table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def headline_table(models: list[dict]) -> str:
    rows = []
    for model in models:
        m = model["metrics"]
        rows.append([escape(model["name"]), f"{m['evaluated']:,}", f"{m['errors']:,}",
                     with_interval(m["top1"], m["top1_ci"]), with_interval(m["top5"], m["top5_ci"]),
                     percent(m.get("real_top1")), percent(m["ece"]), f"{m['images_per_s']:.1f}"])
    return table(["model", "images", "errors", "top-1 [95% CI]", "top-5 [95% CI]", "ReaL top-1", "ECE", "images/s"],
                 rows)


def comparison_table(comparisons: list[dict]) -> str:
    rows = [[escape(c["name"]), f"{c['images']:,}", percent(c["top1_agreement"]), str(c["right_to_wrong"]),
             str(c["wrong_to_right"]), f"{c['mcnemar_p']:.3g}",
             "n/a" if c["mean_kl_from_baseline"] is None else f"{c['mean_kl_from_baseline']:.5f}",
             f"{c['mean_top5_overlap']:.3f}"] for c in comparisons]
    return table(["model", "images", "top-1 agreement", "right &rarr; wrong", "wrong &rarr; right",
                  "McNemar exact p", "mean KL from baseline (nats)", "mean top-5 overlap"], rows)


def confused_pairs_table(quality: dict) -> str:
    return table(["true class", "predicted as", "images"],
                 [[escape(p["label_name"]), escape(p["predicted_name"]), str(p["images"])]
                  for p in quality["confused_pairs"]])


def changed_classes_table(comparison: dict) -> str:
    return table(["class", "images", "baseline top-1", "model top-1"],
                 [[escape(c["name"]), str(c["images"]), percent(c["baseline_top1"], 1), percent(c["model_top1"], 1)]
                  for c in comparison["changed_classes"]])


def flipped_gallery(flips: list[dict], thumbnails: dict[str, bytes]) -> str:
    if not flips:
        return "<p>none</p>"
    cards = "".join(
        f"<figure>{thumbnail(thumbnails.get(f['key']))}<figcaption><b>{escape(f['key'])}</b><br>"
        f"true: {escape(f['label_name'])}<br>baseline: {escape(f['baseline_name'])} "
        f"({percent(f['baseline_confidence'], 1)})<br>model: {escape(f['model_name'])} "
        f"({percent(f['model_confidence'], 1)})</figcaption></figure>" for f in flips)
    return f"<div class=gallery>{cards}</div>"


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child { text-align: left; }
.ci { color: #666; font-size: 12px; } .note { color: #555; font-size: 13px; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 180px; font-size: 12px; } .thumb { max-width: 112px; max-height: 112px; }
.nothumb { width: 112px; height: 112px; background: #eee; font-size: 11px; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
"""


def render_report(title: str, models: list[dict], comparisons: list[dict],
                  thumbnails: Optional[dict[str, bytes]] = None) -> str:
    """The page. MODELS: `name` and `metrics` (metrics.json with the quality fields), baseline first.
    COMPARISONS: `pipeline.quality.against_baseline` results with the compared model's `name`.
    THUMBNAILS: JPEG bytes of flipped images by key."""
    imagenet_classes()  # fail here, not half-way, if the class list is broken
    first = models[0]["metrics"]
    parts = [f"<h1>{escape(title)}</h1>",
             f"<p>data: <code>{escape(str(first['data']))}</code>; {first['images']:,} records</p>",
             "<h2>Accuracy</h2>", headline_table(models),
             "<p class=note>Intervals are 95% Wilson score intervals. ECE: expected calibration error over "
             f"{first['ece_bins']} equal-width bins of top-1 confidence. ReaL: ImageNet-ReaL top-1 (Beyer et al. "
             "2020, Apache-2.0), images with no ReaL label left out.</p>"]
    notes = [m["metrics"]["real_note"] for m in models if m["metrics"].get("real_note")]
    parts += [f"<p class=note>{escape(note)}</p>" for note in dict.fromkeys(notes)]
    if comparisons:
        parts += [f"<h2>Against the baseline, {escape(models[0]['name'])}</h2>", comparison_table(comparisons),
                  "<p class=note>McNemar's exact test on the flips (two-sided binomial, p = 1/2). KL: mean "
                  "KL(baseline || model) of the class distributions.</p>"]
    parts += ["<h2>Calibration and per-class accuracy</h2><div class=plots>",
              *(reliability_diagram(m["name"], m["metrics"]) for m in models), class_accuracy_plot(models), "</div>"]
    for model in models:
        parts += [f"<h2>{escape(model['name'])}: the {len(model['metrics']['confused_pairs'])} most confused class "
                  "pairs</h2>", confused_pairs_table(model["metrics"])]
    for comparison in comparisons:
        name = escape(comparison["name"])
        parts += [f"<h2>{name}: classes whose top-1 changed most</h2>", changed_classes_table(comparison),
                  f"<h3>{name}: right &rarr; wrong, most confident first</h3>",
                  flipped_gallery(comparison["flipped_right_to_wrong"], thumbnails or {}),
                  f"<h3>{name}: wrong &rarr; right, most confident first</h3>",
                  flipped_gallery(comparison["flipped_wrong_to_right"], thumbnails or {})]
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(path: str | Path, title: str, models: list[dict], comparisons: list[dict] = (),
                 thumbnails: Optional[dict[str, bytes]] = None) -> Path:
    path = Path(path)
    write_text(path, render_report(title, models, list(comparisons), thumbnails))
    return path


def model_name(path: str | Path) -> str:
    return Path(path).stem


def add_quality_and_report(output: str | Path, metrics: dict, real) -> dict:
    """METRICS with the quality fields of OUTPUT/predictions.parquet (`pipeline.quality.model_quality`,
    REAL: the ReaL labels or None), and OUTPUT/report.html written: what `evaluate` adds after its run."""
    from pipeline.quality import Predictions, model_quality

    metrics = {**metrics, **model_quality(Predictions.read(Path(output) / "predictions.parquet"), real)}
    name = model_name(metrics["model"])
    write_report(Path(output) / "report.html", f"{name} on {Path(str(metrics['data'])).name}",
                 [{"name": name, "metrics": metrics}])
    return metrics
