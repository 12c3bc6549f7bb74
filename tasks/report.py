"""What a run shows people: the markdown report, the bin-size table and plot."""

from __future__ import annotations

import io
from typing import Any

from dq_ops.config import DQConfig
from dq_ops.store import QUANTIZED_SPLIT, Artifact
from dq_ops.urls import redact_credentials
from tasks.summary import RunSummary, class_name


def bin_size_rows(classes: list[int], bin_sizes: list[list[int]], class_names: list[str] | None) -> list[dict[str, Any]]:
    """One row per class: its name and how many samples each bin holds (Prefect table artifact)."""
    return [{"class": class_name(label, class_names), **{f"bin {b}": int(n) for b, n in enumerate(sizes)},
             "total": int(sum(sizes))} for label, sizes in zip(classes, bin_sizes)]


# matplotlib's "tab10" colours: bin b gets colour b (mod 10).
_BIN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def bin_size_plot(rows: list[dict[str, Any]], width: int = 800, height: int = 400) -> bytes:
    """PNG of stacked samples per bin for every class (:func:`bin_size_rows`): one bar per class,
    bin 0 at the bottom.

    Drawn with PIL (a plotting library's import would cost a refresh more than its work).
    """
    from PIL import Image, ImageDraw, ImageFont

    num_bins = len(rows[0]) - 2
    font = ImageFont.load_default()
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 10, 50, height - 40
    tallest = max(1, max(row["total"] for row in rows))
    step = _tick_step(tallest)
    for tick in range(0, tallest + 1, step):
        y = bottom - (bottom - top) * tick / tallest
        draw.line([(left - 4, y), (right, y)], fill="#dddddd")
        draw.text((left - 8, y), f"{tick:,}", fill="black", font=font, anchor="rm")
    slot = (right - left) / len(rows)
    for i, row in enumerate(rows):
        x0, x1 = left + slot * (i + 0.15), left + slot * (i + 0.85)
        y = float(bottom)
        for b in range(num_bins):
            h = (bottom - top) * row[f"bin {b}"] / tallest
            if h > 0:
                draw.rectangle([x0, y - h, x1, y], fill=_BIN_COLOURS[b % len(_BIN_COLOURS)])
            y -= h
        label = row["class"] if draw.textlength(row["class"], font=font) <= slot else row["class"][: max(1, int(slot // 7))] + "…"
        draw.text(((x0 + x1) / 2, bottom + 6), label, fill="black", font=font, anchor="mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    draw.text((width / 2, 8), "Samples per class and bin", fill="black", font=font, anchor="mt")
    for b in range(min(num_bins, len(_BIN_COLOURS))):  # legend
        x = left + b * 70
        draw.rectangle([x, 26, x + 10, 36], fill=_BIN_COLOURS[b])
        draw.text((x + 14, 31), f"bin {b}", fill="black", font=font, anchor="lm")
    if num_bins > len(_BIN_COLOURS):
        draw.text((right, 8), f"colours repeat every {len(_BIN_COLOURS)} bins", fill="black", font=font, anchor="rt")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _tick_step(largest: int) -> int:
    """A 1-2-5 step giving about five axis ticks up to ``largest``."""
    step = 1
    while largest / step > 6:
        step *= 5 if str(step)[0] == "2" else 2
    return step


def verdict_lines(summary: RunSummary) -> list[str]:
    """The report's first lines: per keep ratio, DQ − random with its interval and verdict, or why
    there is none; then the subsets' coverage next to a random draw's."""
    lines = []
    for s in summary.subsets:
        gap = s.dq_vs_random
        if gap is None:
            lines.append(f"- **{s.ratio:.1%}**: no verdict: evaluation is off or has no `random` arm.")
        elif gap.ci_low is None:
            lines.append(f"- **{s.ratio:.1%}**: DQ − random = {100 * gap.mean:+.2f} points on one draw, which decides "
                         f"nothing: draws of one method differ by more. Set `evaluation.seeds` to 10 seeds for a verdict.")
        else:
            word = {"ahead": "ahead", "behind": "behind", "indistinguishable": "tie"}[gap.verdict]
            lines.append(f"- **{s.ratio:.1%}**: DQ − random = {100 * gap.mean:+.2f} points, 95% interval "
                         f"{100 * gap.ci_low:+.2f} to {100 * gap.ci_high:+.2f} over {gap.n} paired draws: **{word}**.")
        cov = s.coverage
        lines.append(f"  Coverage (distance to the nearest selected sample of the class, mean / p95): DQ "
                     f"{cov['dq']['coverage_mean']:.4f} / {cov['dq']['coverage_p95']:.4f}, random "
                     f"{cov['random']['coverage_mean']:.4f} / {cov['random']['coverage_p95']:.4f}; largest gap between a "
                     f"class's share of the subset and of the split {cov['dq']['class_share_error']:.2%}.")
    return lines


def since_previous_lines(summary: RunSummary) -> list[str]:
    """The report's "Since the previous run" section: which run and snapshot came before, what this
    run embedded and re-binned, and per keep ratio the selection diff with the file of its id lists
    (a ratio whose selection did not change names its last change instead)."""
    previous = [s.selection.previous_run for s in summary.subsets if s.selection.previous_run]
    lines = ["## Since the previous run", ""]
    if not previous:
        return [*lines, "This is the first run of these settings on this store.", ""]
    last = max(previous, key=lambda entry: entry["at"])
    snapshot = summary.dataset.name
    same = "the same snapshot as this run" if last.get("snapshot") == snapshot else f"this run reads `{snapshot}`"
    rebinned = [summary.class_name(c) for c in summary.classes_rebinned]
    lines += [
        f"- Previous run: `{last['run']}` at {last['at']}, on snapshot `{last.get('snapshot') or 'unknown'}` ({same})",
        f"- Samples embedded this run: {summary.embedded_samples:,}",
        f"- Classes re-binned: {len(rebinned)}" + (f" ({', '.join(rebinned)})" if rebinned else ""),
        "",
        "| keep ratio | selection | added | removed | relabelled | modified | churn | id lists |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary.subsets:
        diff, change = s.selection.diff, s.selection.last_change
        n = diff.counts()
        counts = f"{n['added']:,} | {n['removed']:,} | {n['relabeled']:,} | {n['modified']:,} | {diff.churn:.2%}"
        if diff.status == "changed":
            status, diff_url = "changed", s.selection.diff_url
        elif diff.status == "no change" and change:
            status = (f"no change; last change at {change['at']} (run `{change['run']}`): +{change['added']:,} "
                      f"−{change['removed']:,}, {change['relabeled']:,} relabelled, {change['modified']:,} modified")
            diff_url = change["diff_url"]
        else:
            status, diff_url = diff.status, None  # a first run of this ratio, or no change ever
        lines.append(f"| {s.ratio:.1%} | {status} | {counts} | {f'`{diff_url}`' if diff_url else '—'} |")
    return [*lines, ""]


def render_report(config: DQConfig, summary: RunSummary, mlflow_url: str, gallery: str) -> str:
    """The run's markdown report: the verdict, what was selected, how much was kept, bytes and
    accuracy. ``gallery`` says where the bin examples are shown."""
    lines = [
        f"# Dataset Quantization: {config.dataset.name}",
        "",
        *verdict_lines(summary),
        "",
        f"- Store: `{summary.store_url}`",
        f"- Dataset: {', '.join(f'{split} {n:,}' for split, n in summary.counts.items())} samples "
        f"(fingerprint `{summary.dataset.fingerprint[:12]}`)",
        (f"- Features: `{config.embedding.text_model}` sentence embeddings, " if summary.modality == "texts"
         else f"- Features: `{config.embedding.backbone}` ({config.embedding.mode}) at {config.embedding.image_size} px, ")
        + f"{summary.embeddings.summary.get('dim')}-d",
        f"- Bins: {config.bins.num_bins} GraphCut bins ({config.bins.kernel} kernel), seed {config.seed}",
        f"- MLflow run: {mlflow_url}",
        "",
        *since_previous_lines(summary),
        "## Subsets",
        "",
    ]
    pixel_rows = [s for s in summary.subsets if s.patches]
    # Patch columns only when patches were dropped: with patches off the report says nothing about them.
    patch_header = "patch keep ratio | storage keep ratio | stored bytes | " if pixel_rows else ""
    lines += [f"| keep ratio | samples | sample keep ratio | {patch_header}bins touched per class (min) | URL |",
              "|---|---|---|" + "---|" * patch_header.count("|") + "---|---|"]
    for s in summary.subsets:
        keep = summary.sample_keep_ratio(s)
        patches = s.patches and s.patches.summary
        patch_cells = (f"{patches['patch_keep_ratio']:.2%} | {keep * patches['patch_keep_ratio']:.2%} | "
                       f"{patches['stored_bytes']:,} | " if patches else "— | — | — | ") if pixel_rows else ""
        touched = s.coverage["dq"].get("bins_touched_min", "—")
        lines.append(f"| {s.ratio:.1%} | {s.size:,} | {keep:.2%} | {patch_cells}{touched} | `{s.subset.url}` |")
    if pixel_rows:
        lines += ["", f"## Patch dropping (θ = {config.patches.drop_ratio}) and MAE reconstruction", "",
                  "| keep ratio | stored bytes | same images whole | byte ratio "
                  "| PSNR MAE (dropped pixels) | PSNR zero fill | PSNR mean fill |",
                  "|---|---|---|---|---|---|---|"]
        for s in pixel_rows:
            p = s.patches.summary | s.psnr()
            lines.append(
                f"| {s.ratio:.1%} | {p['stored_bytes']:,} | {p['whole_image_bytes']:,} | {p['byte_ratio']:.3f} | "
                f"{p['psnr_mae_db']:.2f} dB | {p['psnr_zero_fill_db']:.2f} dB | {p['psnr_mean_fill_db']:.2f} dB |"
            )
    evaluations = [e for s in summary.subsets for e in s.evaluation] + summary.full
    if evaluations:
        lines += ["", "## Evaluation (test accuracy at the final epoch)", "",
                  "Paired draws: evaluation seed s draws every sampled arm's subset and seeds its training "
                  "(k-center and herding select once); `dq_pixels` trains on the MAE reconstruction of the same "
                  "draws as `dq`.", "",
                  "| keep ratio | arm | samples | accuracy mean ± std | seeds |", "|---|---|---|---|---|"]
        for e in evaluations:
            spread = f" ± {e.std:.4f}" if len(e.accuracies) > 1 else " (one draw)"
            lines.append(f"| {e.ratio:.1%} | {e.arm} | {e.size:,} | {e.mean:.4f}{spread} | {len(e.accuracies)} |")
    gaps = [g for s in summary.subsets for g in s.gaps]
    if gaps:
        lines += ["", "### Paired gaps (same seeds; 95% Student-t interval over the per-seed differences)", "",
                  "| keep ratio | comparison | gap (points) | 95% interval | verdict |", "|---|---|---|---|---|"]
        for g in gaps:
            interval = "—" if g.ci_low is None else f"{100 * g.ci_low:+.2f} to {100 * g.ci_high:+.2f}"
            lines.append(f"| {g.ratio:.1%} | {g.arm} − {g.reference} | {100 * g.mean:+.2f} | {interval} | {g.verdict} |")
        lines += [""] + [f"- {g.ratio:.1%}: {g.sentence}." for g in gaps]
    lines += ["", "## Bins", "", f"Examples per bin (bin 0 most typical, last bins rare or boundary cases): {gallery}"]
    lines += ["", "## Stage timings (this run; cached stages take ~0 s)", ""]
    lines += [f"- {stage}: {seconds:.1f} s" for stage, seconds in summary.timings_s.items()]
    return redact_credentials("\n".join(lines) + "\n")  # URLs in the config may carry passwords


def bin_gallery(dataset: Artifact, bins: Artifact, class_names: list[str] | None, classes: int = 3) -> bytes | list[dict[str, Any]]:
    """What the bins hold, for the first ``classes`` classes: a PNG (images) or table rows (texts).
    Only the samples shown are read from the store."""
    import numpy as np

    from dq_ops.gallery import gallery_picks, image_gallery, text_gallery
    from dq_ops.stages import split_labels

    split = dataset[QUANTIZED_SPLIT]
    bin_of_sample = np.asarray(bins["bin_of_sample"][:])
    labels = split_labels(dataset)  # read once per run by the stages before
    shown = [-1] if labels is None else np.unique(labels)[:classes].tolist()
    shown_from = split["images" if "images" in split else "texts"]
    per_bin = 6 if "images" in split else 2
    picks = gallery_picks(bin_of_sample, labels, shown, per_bin, chunk_rows=shown_from.chunks[0])
    rows = np.unique(np.concatenate(list(picks.values())))
    # Each (class, bin) group among the rows read has at most per_bin members: the gallery shows them all.
    shown_labels = None if labels is None else labels[rows]
    if "images" in split:
        pixels = np.asarray(shown_from.get_orthogonal_selection((rows,)))
        return image_gallery(pixels, bin_of_sample[rows], shown_labels, shown, class_names, per_bin=per_bin)
    texts = np.asarray(shown_from.get_orthogonal_selection((rows,))).tolist()
    return text_gallery(texts, bin_of_sample[rows], shown_labels, shown, class_names, per_bin=per_bin)
