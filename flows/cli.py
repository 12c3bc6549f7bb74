"""The ``dq`` command line.

Each subcommand is one :class:`Command` in :data:`COMMANDS`: a function that adds its arguments
and a function that runs it. Add ``dq run`` or ``dq export`` by appending a ``Command``. Heavy
imports (numpy, zarr, Prefect, ...) happen inside the run functions, so ``dq --help`` is fast.
Any failure prints one line ``error: <message> (details: <log file>)`` and exits with status 2
(``flows.console``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from dq_ops.config import DQConfig
    from flows.console import Console

DESCRIPTION = """\
Dataset Quantization (DQ): compress a training set into a small subset that trains models
nearly as well as the full set. dq ingests a dataset into a Zarr store, embeds it, splits it
into diverse bins (GraphCut), samples every bin, and evaluates the subset against baselines.
Every stage writes a fingerprinted artifact into the store, so reruns reuse finished work.

Start with `dq ingest` (no arguments: the bundled Fashion-MNIST into ./dq-store)."""

# Longest list of skipped items printed in full; the rest are counted.
MAX_SKIPPED_SHOWN = 20


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, longer description, arguments and runner."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Console], int]


# -- dq ingest ---------------------------------------------------------------------------------
def _ingest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", metavar="CONFIG.yaml",
        help="run configuration (its 'dataset' section and 'store_url' are used); default: built-in defaults",
    )
    parser.add_argument(
        "--format", metavar="F",
        help="source format: fashion-mnist, idx, image-folder, npz, zarr, parquet, webdataset, jsonl, json or fortunes",
    )
    parser.add_argument("--url", metavar="U", help="path or fsspec URL of the source")
    parser.add_argument("--name", metavar="N", help="dataset name in the store")
    parser.add_argument("--store", metavar="URL", help="store root (path or fsspec URL); default ./dq-store")
    parser.add_argument("--limit", metavar="N", type=int, help="ingest at most N samples per split")
    parser.add_argument("--resize", metavar="PX", type=int, help="resize images to PX x PX (needed when sizes differ)")
    parser.add_argument(
        "--on-error", choices=("raise", "skip"),
        help="bad items (corrupt image, bad JSON line): fail naming the item (default), or skip and report them",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the final summary, warnings and errors")


def _ingest(args: argparse.Namespace, console: Console) -> int:
    from pydantic import ValidationError

    from dq_ops.config import DatasetConfig, DQConfig
    from dq_ops.errors import DQInputError
    from dq_ops.ingest import ingest
    from dq_ops.preflight import check_store_writable
    from dq_ops.store import Store
    from tasks.cluster import close_dask_clients, cluster_client

    config = DQConfig.from_yaml(args.config) if args.config else DQConfig()
    flags = {"format": args.format, "url": args.url, "name": args.name, "limit": args.limit,
             "resize": args.resize, "on_error": args.on_error}
    overrides = {key: value for key, value in flags.items() if value is not None}
    try:
        dataset = DatasetConfig.model_validate({**config.dataset.model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise DQInputError(f"invalid option: {problems}") from None
    store_url = args.store or config.store_url
    check_store_writable(store_url)
    store = Store(store_url)
    store.clean_staging()  # what killed runs left behind

    try:  # a sharded source is decoded on the configured cluster's workers (started only for one)
        with console.progress(f"ingest {dataset.name}") as progress:
            result = ingest(dataset, store, progress=progress, client=cluster_client(config.cluster))
    finally:
        close_dask_clients()

    print(f"ingested {result.name} ({dataset.format}, {result.modality}) from {result.source}")
    for split, count in result.counts.items():
        print(f"  {split:<12}{count:,} samples")
    if result.class_names:
        print(f"  {'classes':<12}{len(result.class_names)}: {', '.join(result.class_names)}")
    print(f"  {'fingerprint':<12}{result.fingerprint}")
    print(f"  {'artifact':<12}{result.url}")
    for split, reuse in result.shards.items():
        print(f"  {split + ' read':<12}{reuse}")
    if result.skipped:
        print(f"  {'skipped':<12}{len(result.skipped)} bad items:")
        for item in result.skipped[:MAX_SKIPPED_SHOWN]:
            print(f"    {item}")
        if len(result.skipped) > MAX_SKIPPED_SHOWN:
            print(f"    ... and {len(result.skipped) - MAX_SKIPPED_SHOWN} more")
    return 0


# -- dq run -------------------------------------------------------------------------------------
def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="run configuration; default: built-in defaults")
    parser.add_argument("--store", metavar="URL", help="store root (path or fsspec URL); default ./dq-store")
    parser.add_argument("--ratio", metavar="R", type=float, action="append", help="keep ratio in (0, 1]; repeat for several")
    parser.add_argument("--limit", metavar="N", type=int, help="use at most N samples per split (a quick run)")
    parser.add_argument("--seed", type=int, help="seed of every random choice")
    parser.add_argument(
        "--ephemeral-server", action="store_true",
        help="use a temporary Prefect server for this run only (default: PREFECT_API_URL, else a local server kept "
             "running on 127.0.0.1:4200, started if needed; also DQ_PREFECT_SERVER=ephemeral)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the final summary, warnings and errors")


def _run(args: argparse.Namespace, console: Console) -> int:
    import os

    # A fresh machine's first temporary Prefect server can take longer than Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from pydantic import ValidationError

    from dq_ops.config import DQConfig
    from dq_ops.errors import DQInputError
    from dq_ops.preflight import check_config
    from dq_ops.urls import redact_credentials

    config = DQConfig.from_yaml(args.config) if args.config else DQConfig()
    raw = config.model_dump()
    overrides = ((args.store, ("store_url",)), (args.ratio, ("sampling", "ratios")),
                 (args.limit, ("dataset", "limit")), (args.seed, ("seed",)))
    for value, path in overrides:
        if value is not None:
            section = raw
            for key in path[:-1]:
                section = section[key]
            section[path[-1]] = value
    try:
        config = DQConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise DQInputError(f"invalid option: {problems}") from None

    check_config(config)  # before Prefect starts: a bad option fails in seconds
    from tasks.tracking import prewarm

    # Only a head start: the flow's Tracker starts this process itself (deployment runs), here it
    # connects while Prefect starts.
    prewarm(config)
    if args.ephemeral_server:
        os.environ["DQ_PREFECT_SERVER"] = "ephemeral"
    from flows.server import use_local_server

    api_url = use_local_server()  # before Prefect is imported: it reads its settings once
    from flows.quantize import quantize  # the telemetry switches are set: flows/__init__.py

    summary = _quantize_undamaged(quantize, config, console)
    print()
    print(f"dataset      {summary['dataset']['url']}")
    print(f"bins         {summary['bins']['url']}")
    print(f"embedded     {summary['embedded_samples']:,} samples this run; "
          f"{len(summary['classes_rebinned'])} class(es) re-binned")
    for subset in summary["subsets"]:
        print(f"subset {subset['ratio']:>5.1%} {subset['size']:,} samples  {subset['url']}")
        selection = subset["selection"]
        if selection["previous"] is not None:
            print(f"  selection vs previous run: +{selection['added']:,} −{selection['removed']:,}, "
                  f"{selection['modified']:,} modified, {selection['relabeled']:,} relabelled (churn {selection['churn']:.2%})")
        for gap in subset.get("gaps", []):
            if (gap["arm"], gap["reference"]) == ("dq", "random"):
                print(f"  verdict    {gap['sentence']}")
        for arm in subset.get("evaluation", []):
            seeds = len(arm["accuracies"])
            spread = f"± {arm['std']:.4f} over {seeds} seeds" if seeds > 1 else "on one draw"
            print(f"  {arm['arm']:<10} test accuracy {arm['mean']:.4f} {spread}")
    print(f"report       {summary['report_path']}")
    print()
    print("Open the UIs:")
    if api_url:
        print(f"  Prefect: {api_url.removesuffix('/api')} (a local server, kept running; stop: prefect server stop)")
    elif os.environ.get("PREFECT_API_URL"):
        print(f"  Prefect: {os.environ['PREFECT_API_URL'].removesuffix('/api')}")
    else:
        print("  Prefect: prefect server start   → http://127.0.0.1:4200 (this run is in its database)")
    tracking_uri = redact_credentials(summary["tracking_uri"])
    if tracking_uri.startswith(("http://", "https://")):  # a tracking server: the UI is already there
        print(f"  MLflow:  {tracking_uri} (run {summary['mlflow_run_id']})")
    else:
        print(f"  MLflow:  mlflow ui --backend-store-uri {tracking_uri} --workers 1 → http://127.0.0.1:5000")
    return 0


def _quantize_undamaged(quantize: Callable[..., dict], config: DQConfig, console: Console) -> dict:
    """Run the flow; when it meets a damaged derived artifact (which the store then removes, see
    ``Store.reading``), run it again so that artifact is recomputed, once per artifact. A damaged
    snapshot, or the same artifact damaged twice, ends the command with its error."""
    from dq_ops.store import ARTIFACT_KINDS, DQDamagedError, Store

    store, recomputed = Store(config.store_url), set()
    while True:
        try:
            with store.reading(store.artifacts):  # damage met outside a stage (the report's gallery)
                return quantize(config)
        except DQDamagedError as exc:
            if not exc.derived or exc.url in recomputed or len(recomputed) >= len(ARTIFACT_KINDS):
                raise
            recomputed.add(exc.url)
            console.logger.info("running the flow again to recompute %s", exc.url)


# -- dq export ----------------------------------------------------------------------------------
def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("subset", metavar="SUBSET", help="subset name (the last part of its URL, as `dq run` prints it)")
    parser.add_argument("out", metavar="OUT", help="output folder (path or fsspec URL)")
    parser.add_argument("--format", required=True, choices=("image-folder", "npz", "parquet", "webdataset", "jsonl"),
                        help="image-folder / npz / parquet / webdataset for image datasets, jsonl for text datasets")
    parser.add_argument("--shard-size", metavar="N", type=int,
                        help="samples per parquet or webdataset shard (default 10,000)")
    parser.add_argument("--store", metavar="URL", default="./dq-store", help="store root (default ./dq-store)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous export in OUT (OUT must otherwise be empty or absent)")


def _export(args: argparse.Namespace, console: Console) -> int:
    from dq_ops.export import SHARD_SIZE, export_subset
    from dq_ops.store import Store

    with console.progress(f"export {args.subset}") as progress:
        result = export_subset(Store(args.store), args.subset.rstrip("/").rsplit("/", 1)[-1], args.out, args.format,
                               progress=progress, overwrite=args.overwrite,
                               shard_size=SHARD_SIZE if args.shard_size is None else args.shard_size)
    print(f"exported {result.samples:,} samples as {result.format} to {result.out_url}")
    print(f"manifest {result.manifest_url}")
    return 0


# -- dq gc --------------------------------------------------------------------------------------
def _gc_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", metavar="N", type=int, required=True, help="dataset snapshots to keep per dataset (newest first)")
    parser.add_argument("--store", metavar="URL", default="./dq-store", help="store root (default ./dq-store)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")


def _gc(args: argparse.Namespace, console: Console) -> int:
    from dq_ops.store import Store

    store = Store(args.store)
    removed = store.gc(args.keep, dry_run=args.dry_run)
    for path in removed:
        print(f"{'would remove' if args.dry_run else 'removed'} {path}")
    print(f"{len(removed)} artifact(s) {'to remove' if args.dry_run else 'removed'}; everything a kept snapshot needs stays")
    if not args.dry_run:
        staging = store.clean_staging()
        print(f"{len(staging)} staging folder(s) of killed runs removed")
    return 0


# -- dq verify ----------------------------------------------------------------------------------
def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="URL", default="./dq-store", help="store root (default ./dq-store)")
    parser.add_argument("--deep", action="store_true",
                        help="also recompute every artifact's content digest and compare it with the one recorded at commit")
    parser.add_argument("--repair", action="store_true",
                        help="remove damaged derived artifacts and what was derived from them (the next run recomputes them); "
                             "damaged snapshots are kept and the dq ingest that replaces them is printed")


def _verify(args: argparse.Namespace, console: Console) -> int:
    from dq_ops.store import Store

    result = Store(args.store).verify(deep=args.deep, repair=args.repair)
    for damage in result.damaged:
        print(f"damaged {damage.kind}/{damage.name}: {damage.problem}; {damage.repair}")
    for path in result.removed:
        print(f"removed {path}")
    print(f"{result.checked} artifact(s) checked, {len(result.damaged)} damaged"
          + (f", {len(result.removed)} removed" if args.repair else ""))
    if result.without_checksums:
        print(f"{len(result.without_checksums)} artifact(s) written before chunk checksums (e.g. {result.without_checksums[0]}): "
              "a lost chunk or changed bytes there are found only by --deep; a rebuild (new store, dq ingest + dq run) adds checksums")
    return 1 if result.damaged else 0


COMMANDS: list[Command] = [
    Command(
        "ingest",
        help="read a dataset into the store as datasets/<name>",
        description=(
            "Read a dataset (IDX/Fashion-MNIST, an image folder, .npz, a Zarr group, Parquet or "
            "WebDataset shards, JSON or JSONL text records) and write it into the store as datasets/<name>, with stable sample ids. "
            "Flags override the config file; with neither, the bundled Fashion-MNIST is ingested. "
            "A failed ingest leaves any earlier dataset of the same name untouched."
        ),
        add_arguments=_ingest_arguments,
        run=_ingest,
    ),
    Command(
        "run",
        help="run the whole quantization flow (Prefect) and print where the results are",
        description=(
            "Run the quantization flow locally: ingest, embeddings on a dask cluster, GraphCut bins, "
            "sampling at every keep ratio, patch dropping with MAE reconstruction and evaluation "
            "training, as configured. Finished stages are served from the cache. With no config, the "
            "bundled Fashion-MNIST with CPU-sized defaults. Flags override the config file."
        ),
        add_arguments=_run_arguments,
        run=_run,
    ),
    Command(
        "export",
        help="write a subset as an image folder, .npz, Parquet/WebDataset shards or JSONL with a manifest of sample ids",
        description=(
            "Export a subset from the store. Image datasets: one PNG per sample under a folder per "
            "class (image-folder), one compressed .npz, or PNG bytes, label and id in shards of "
            "--shard-size samples (parquet, webdataset; dq ingest reads them back); text datasets: JSONL records. A "
            "manifest.jsonl beside it lists every sample's stable id, row and label."
        ),
        add_arguments=_export_arguments,
        run=_export,
    ),
    Command(
        "gc",
        help="remove old dataset snapshots and what only they need",
        description=(
            "Keep the N newest snapshots of every dataset, every artifact derived from them and "
            "everything those were made from; remove the other snapshots and artifacts. Reports, "
            "refs and the MLflow database stay."
        ),
        add_arguments=_gc_arguments,
        run=_gc,
    ),
    Command(
        "verify",
        help="check every artifact of the store for damage; exit 1 if any is damaged",
        description=(
            "Check every artifact: its completion marker, that every chunk written is present and "
            "that every chunk decodes (its checksum matches); --deep also recomputes content "
            "digests. Prints one line per damaged artifact and exits 1 if any, 0 if the store is "
            "clean. --repair removes damaged derived artifacts and what was derived from them, so "
            "the next run recomputes them; a damaged snapshot is kept, with the dq ingest that replaces it."
        ),
        add_arguments=_verify_arguments,
        run=_verify,
    ),
]


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors ending in the same ``error: …`` line as every other failure."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of :data:`COMMANDS`."""
    parser = _Parser(
        prog="dq", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.description)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run, command=command.name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return the exit status.

    Any failure ends in one ``error:`` line and status 2, Ctrl-C in ``interrupted`` and 130;
    tracebacks and the commands' logs go to a log file (``flows.console``).
    """
    args = build_parser().parse_args(argv)
    from dq_ops.errors import DQInputError  # light: no third-party imports
    from flows.console import Console

    console = Console.open(args.command, quiet=getattr(args, "quiet", False))  # -q: dq run, dq ingest
    console.handle_interrupts()
    try:
        return args.run(args, console)
    except KeyboardInterrupt:
        return console.interrupted()
    except DQInputError as exc:
        return console.fail(str(exc))
    except Exception as exc:  # anything else is still one line; the traceback is in the log
        return console.fail(f"{type(exc).__name__}: {exc}")


def entrypoint() -> NoReturn:
    """The ``dq`` command: :func:`main`, then a prompt exit.

    Other threads are joined and the exit handlers run (Prefect sends its last logs and events,
    MLflow closes its database); the interpreter's own teardown is skipped. With torch loaded it
    takes seconds, frees nothing the operating system would not, and would otherwise be the
    slowest part of an unchanged re-run.
    """
    import atexit
    import os
    import threading

    code = main()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # CPython's own exit sequence runs these the same way
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entrypoint()
