"""What a run shows people: the markdown report, the bin-size table and plot."""

from __future__ import annotations

import io
from typing import Any

from dq_ops.config import DQConfig
from dq_ops.urls import redact_credentials


def bin_size_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per class: its name and how many samples each bin holds (Prefect table artifact)."""
    names = summary.get("class_names")
    rows = []
    for label, sizes in zip(summary["bins"]["classes"], summary["bins"]["bin_sizes"]):
        name = names[label] if names and 0 <= label < len(names) else ("all" if label < 0 else str(label))
        rows.append({"class": name, **{f"bin {b}": int(n) for b, n in enumerate(sizes)}, "total": int(sum(sizes))})
    return rows


def bin_size_plot(summary: dict[str, Any]) -> bytes:
    """PNG of stacked samples per bin for every class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = bin_size_rows(summary)
    sizes = np.array([[row[f"bin {b}"] for b in range(len(rows[0]) - 2)] for row in rows])
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = np.zeros(len(rows))
    for b in range(sizes.shape[1]):
        ax.bar([row["class"] for row in rows], sizes[:, b], bottom=bottom, label=f"bin {b}")
        bottom += sizes[:, b]
    ax.set_ylabel("samples")
    ax.set_title("Samples per class and bin")
    ax.legend(ncol=5, fontsize=7)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def render_report(config: DQConfig, summary: dict[str, Any], mlflow_url: str) -> str:
    """The run's markdown report: what was selected, how much was kept, bytes and accuracy."""
    counts = summary["dataset"]["counts"]
    lines = [
        f"# Dataset Quantization: {config.dataset.name}",
        "",
        f"- Store: `{summary['store_url']}`",
        f"- Dataset: {', '.join(f'{split} {n:,}' for split, n in counts.items())} samples "
        f"(fingerprint `{summary['dataset']['fingerprint'][:12]}`)",
        f"- Features: `{config.embedding.backbone}` ({config.embedding.mode}), "
        f"{summary['embeddings'].get('dim')}-d",
        f"- Bins: {config.bins.num_bins} GraphCut bins ({config.bins.kernel} kernel), seed {config.seed}",
        f"- MLflow run: {mlflow_url}",
        "",
        "## Subsets",
        "",
        "| keep ratio | samples | sample keep ratio | patch keep ratio | storage keep ratio | stored bytes | URL |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary["subsets"]:
        patches = s.get("patches") or {}
        stored = f"{patches['stored_bytes']:,}" if patches else "—"
        lines.append(
            f"| {s['ratio']:.1%} | {s['size']:,} | {s['sample_keep_ratio']:.2%} | "
            f"{patches.get('patch_keep_ratio', 1.0):.2%} | "
            f"{s['sample_keep_ratio'] * patches.get('patch_keep_ratio', 1.0):.2%} | {stored} | `{s['url']}` |"
        )
    pixel_rows = [s for s in summary["subsets"] if s.get("patches")]
    if pixel_rows:
        lines += ["", f"## Patch dropping (θ = {config.patches.drop_ratio}) and MAE reconstruction", "",
                  "| keep ratio | stored bytes | same images whole | byte ratio "
                  "| PSNR MAE (dropped pixels) | PSNR zero fill | PSNR mean fill |",
                  "|---|---|---|---|---|---|---|"]
        for s in pixel_rows:
            p = s["patches"]
            lines.append(
                f"| {s['ratio']:.1%} | {p['stored_bytes']:,} | {p['whole_image_bytes']:,} | {p['byte_ratio']:.3f} | "
                f"{p['psnr_mae_db']:.2f} dB | {p['psnr_zero_fill_db']:.2f} dB | {p['psnr_mean_fill_db']:.2f} dB |"
            )
    evaluations = [e for s in summary["subsets"] for e in s.get("evaluation", [])] + summary.get("full", [])
    if evaluations:
        lines += ["", "## Evaluation (test accuracy at the final epoch)", "",
                  "| keep ratio | arm | samples | accuracy mean ± std | seeds |", "|---|---|---|---|---|"]
        for e in evaluations:
            lines.append(
                f"| {e['ratio']:.1%} | {e['arm']} | {e['size']:,} | {e['mean']:.4f} ± {e['std']:.4f} | {len(e['accuracies'])} |"
            )
    lines += ["", "## Stage timings (this run; cached stages take ~0 s)", ""]
    lines += [f"- {stage}: {seconds:.1f} s" for stage, seconds in summary["timings_s"].items()]
    return redact_credentials("\n".join(lines) + "\n")  # URLs in the config may carry passwords
