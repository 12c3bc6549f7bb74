"""What one flow run produced, typed: the flow builds a :class:`RunSummary` from its stages'
results, :mod:`tasks.publish` turns it into the report, the Prefect artifacts and the MLflow
records, and the flow returns its JSON form (:meth:`RunSummary.to_json`).

Artifacts are carried as :class:`~tasks.common.StageResult` values (kind, name, fingerprint,
figures), so nothing downstream parses a name back out of a URL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dq_ops.paired import paired_gap, summarize_accuracies
from dq_ops.selection import SelectionDiff
from dq_ops.store import QUANTIZED_SPLIT
from tasks.common import StageResult

# Paired comparisons a run states: (arm, reference arm).
GAPS = (("dq", "random"), ("dq_pixels", "dq"))


def class_name(label: int, class_names: list[str] | None) -> str:
    """A class's name in tables and plots: its name, else its label; -1 (unlabelled data) is "all"."""
    return class_names[label] if class_names and 0 <= label < len(class_names) else ("all" if label < 0 else str(label))


def arm_label(arm: str, ratio: float) -> str:
    """How an (arm, keep ratio) is named in Prefect task runs and MLflow nested runs."""
    return arm if arm == "full" else f"{arm}@{ratio:.0%}"


@dataclass(frozen=True)
class ArmResult:
    """One evaluation arm at one keep ratio: one training per evaluation seed, on that seed's draw.

    ``mean`` and ``std`` are the mean and sample standard deviation of the test accuracies over
    the seeds; ``train_seconds`` is the mean training time per seed.
    """

    arm: str
    ratio: float
    size: int
    seeds: list[int]
    accuracies: list[float]
    val_accuracies: list[float]
    mean: float
    std: float
    draws: list[str | None]  # the subset URL each seed trained on; None: the whole split
    evaluations: list[str]
    train_seconds: float

    @classmethod
    def from_runs(cls, arm: str, ratio: float, seeds: list[int], draws: list[StageResult | None],
                  runs: list[StageResult]) -> ArmResult:
        accuracies = [run.summary["test_accuracy"] for run in runs]
        stats = summarize_accuracies({arm: accuracies})[arm]
        return cls(arm, ratio, runs[0].summary["n_train"] + runs[0].summary["n_val"], seeds, accuracies,
                   [run.summary["val_accuracy"] for run in runs], stats.mean, stats.std,
                   [draw.url if draw else None for draw in draws], [run.url for run in runs],
                   sum(run.summary["train_seconds"] for run in runs) / len(runs))

    @property
    def label(self) -> str:
        return arm_label(self.arm, self.ratio)


@dataclass(frozen=True)
class Gap:
    """``arm − reference`` over paired seeds (fractions), with its 95% t-interval (None for one seed)."""

    arm: str
    reference: str
    ratio: float
    mean: float
    ci_low: float | None
    ci_high: float | None
    n: int
    verdict: str
    sentence: str


def paired_gaps(ratio: float, rows: list[ArmResult]) -> list[Gap]:
    """The :data:`GAPS` that both arms of ``rows`` allow, each over the seeds the arms share."""
    by_arm = {row.arm: row for row in rows}
    gaps = []
    for arm, reference in GAPS:
        if arm in by_arm and reference in by_arm:
            gap = paired_gap(by_arm[arm].accuracies, by_arm[reference].accuracies)
            gaps.append(Gap(arm, reference, ratio, gap.mean, gap.ci_low, gap.ci_high, gap.n, gap.verdict,
                            gap.sentence(arm, reference)))
    return gaps


@dataclass(frozen=True)
class SelectionRecord:
    """This run's entry in the store's selection history of one keep ratio (``dq_ops.selection``).

    ``previous_run`` is the entry of the run before (None on a first run), ``last_change`` the
    latest entry that changed the selection, this run's included (None if none did), and
    ``position`` this run's index in the history: its place in the schedule of these settings.
    ``key`` names that history (the store's ref ``refs/subsets/<key>.json``).
    """

    key: str
    diff: SelectionDiff
    diff_url: str | None  # this run's id lists, when it changed the selection
    previous_run: dict[str, Any] | None
    last_change: dict[str, Any] | None  # with the ``diff_url`` of its id lists
    position: int

    def to_json(self) -> dict[str, Any]:
        diff = self.diff
        return {"previous": diff.previous, "previous_size": diff.previous_size, "status": diff.status,
                **diff.counts(), "churn": diff.churn, "diff_url": self.diff_url}


@dataclass(frozen=True)
class SubsetRun:
    """What one keep ratio produced: the published subset and what it was compared with."""

    ratio: float
    subset: StageResult
    random: StageResult  # a random draw of the same per-class sizes: the coverage reference
    selection: SelectionRecord
    patches: StageResult | None = None
    reconstruction: StageResult | None = None
    evaluation: list[ArmResult] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.subset.summary["size"]

    @property
    def coverage(self) -> dict[str, dict[str, float]]:
        return {"dq": self.subset.summary["coverage"], "random": self.random.summary["coverage"]}

    @property
    def dq_vs_random(self) -> Gap | None:
        return next((g for g in self.gaps if (g.arm, g.reference) == ("dq", "random")), None)

    def psnr(self) -> dict[str, float]:
        """The reconstruction's PSNRs (``psnr_<fill>_db``); empty without patches."""
        figures = self.reconstruction.summary if self.reconstruction else {}
        return {k: v for k, v in figures.items() if k.startswith("psnr_")}


@dataclass(frozen=True)
class RunSummary:
    """Everything one flow run produced. ``embedded_samples`` and ``classes_rebinned`` count only
    what this run computed (a stage served from the cache did nothing)."""

    store_url: str
    dataset: StageResult
    embeddings: StageResult
    bins: StageResult
    subsets: list[SubsetRun]
    full: list[ArmResult]
    timings_s: dict[str, float]
    embedded_samples: int
    classes_rebinned: list[int]
    mae: StageResult | None = None

    @property
    def modality(self) -> str:
        return self.dataset.summary["modality"]

    @property
    def counts(self) -> dict[str, int]:
        return self.dataset.summary["counts"]

    @property
    def class_names(self) -> list[str] | None:
        return self.dataset.summary.get("class_names")

    @property
    def train_size(self) -> int:
        return self.counts[QUANTIZED_SPLIT]

    def class_name(self, label: int) -> str:
        return class_name(label, self.class_names)

    def sample_keep_ratio(self, subset: SubsetRun) -> float:
        return subset.size / self.train_size

    @property
    def schedule(self) -> SelectionRecord:
        """The selection history that numbers this run in its schedule: the longest of its keep
        ratios' (so a ratio added later joins the line; ties go to the first key, whatever the
        order of the ratios)."""
        return min((s.selection for s in self.subsets), key=lambda record: (-record.position, record.key))

    @property
    def schedule_step(self) -> int:
        """This run's index among the runs of its dataset and settings (0 for the first)."""
        return self.schedule.position

    def to_json(self, report_path: str, tracking_uri: str, mlflow_run_id: str) -> dict[str, Any]:
        """The flow's result: plain JSON, readable without dq's classes (a deployment's caller)."""
        return {
            "store_url": self.store_url,
            "dataset": {"url": self.dataset.url, "fingerprint": self.dataset.fingerprint, "counts": self.counts,
                        "modality": self.modality},
            "embeddings": {"url": self.embeddings.url, "fingerprint": self.embeddings.fingerprint,
                           **self.embeddings.summary},
            "bins": {"url": self.bins.url, "fingerprint": self.bins.fingerprint, **self.bins.summary},
            "subsets": [self._subset_json(s) for s in self.subsets],
            "timings_s": self.timings_s,
            "class_names": self.class_names,
            "embedded_samples": self.embedded_samples,
            "classes_rebinned": self.classes_rebinned,
            "full": [asdict(row) for row in self.full],
            "tracking_uri": tracking_uri,
            "mlflow_run_id": mlflow_run_id,
            "report_path": report_path,
        }

    def _subset_json(self, s: SubsetRun) -> dict[str, Any]:
        patches = s.patches and s.patches.summary | {
            "url": s.patches.url, "reconstruction_url": s.reconstruction.url,
            "mae_final_loss": self.mae.summary["final_loss"],
        } | s.psnr()
        return {
            "ratio": s.ratio, "name": s.subset.name, "url": s.subset.url, "fingerprint": s.subset.fingerprint,
            "size": s.size, "sample_keep_ratio": self.sample_keep_ratio(s),
            "evaluation": [asdict(row) for row in s.evaluation], "gaps": [asdict(g) for g in s.gaps],
            "patches": patches, "coverage": s.coverage, "selection": s.selection.to_json(),
            "previous_run": s.selection.previous_run, "last_change": s.selection.last_change,
        }

