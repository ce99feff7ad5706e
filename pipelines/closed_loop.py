"""The closed loop on a demo web: curate, pretrain on the curated set, evaluate, and curate again with
the trained teacher as the semantic embedder (what `make demo` runs).

    python -m pipelines.closed_loop --out runs/demo          # the embedded demo web, generated and served
    python -m pipelines.closed_loop --out RUN --urls URLS --ground-truth TRUTH --demo-root ROOT \\
        --allow-network 127.0.0.1/32 [--iterations N] [KEY=VALUE ...]   # a demo web served elsewhere

Stages, under --out; a rerun skips what is finished:

1. ingest (pipelines/build_lvd.py --stop-after ingest) into pass1/; with the embedded demo web, the
   web is generated under pass1/demo/site and served while it runs. Finished shards are kept.
2. pass 1: the copy descriptor (pdq) and the first semantic embedder (--first-embedder, default
   hog), dedup and decontamination, retrieval, balance, curated manifest, report. Stamped stages.
3. pretraining: the recipe (--recipe, the tiny v3 by default) on pass1/manifests/curated.parquet
   into pretrain/, with k-NN and pictures every --eval-every iterations. Skipped when its teacher
   export is there for the same resolved config, resumed from its checkpoints when interrupted;
   a pretrain/ trained with another config (a changed recipe) is removed and trained afresh.
4. evaluation: k-NN of the teacher and of a random network of the same shape (evaluation/knn.json;
   bank: the web's concept images, linked under bank/; queries: the web's held-out eval/ images),
   attention and PCA pictures of both. Skipped when newer than the teacher export.
5. pass 2: pass2/ reads pass 1's pool, image shards, copy descriptors and dedup through symlinks;
   the pool is embedded with the teacher (dino:pretrain/teacher_backbone.pt) and curated again.
6. summary: the table (printed, and summary.json) and the run report report/index.html.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import yaml

from curation import seeds
from curation.curate import CurationConfig, CurationError
from curation.demo_web import concept_folder
from curation.embed import EmbedderError, EmbedError, check_spec
from curation.ingest import read_pool
from pipelines import build_lvd
from pipelines.loop_report import LoopReportInputs, Table, build_loop_report
from pretrain.checkpoint import CONFIG_FILE, config_differences, describe_differences
from pretrain.config import PretrainConfig
from pretrain.config_io import dump_config, load_config
from pretrain.eval import knn, pictures
from pretrain.export import EXPORT_CONFIG_FILE, TORCH_EXPORT_FILE

COPY_SPEC = "pdq"
# The tiny v3 is the recipe that learns the demo's concepts within minutes on a CPU (docs/benchmarks.md,
# learning check); `make demo` runs 1,200 iterations of it (about 7 minutes).
DEFAULT_RECIPE = Path("pretrain/configs/v3_tiny.yaml")
EVALUATIONS_WHILE_TRAINING = 6  # --eval-every defaults to the run's length over this
PROBE_IMAGES = 6  # pictured images: the first held-out image of this many classes
RETRIEVAL_TARGET = 0.9  # issue 7: pass 2 retrieves at least this precisely, and better than pass 1
# Pass 2 reads these from pass 1 (relative to a run folder); images/ is linked shard by shard, since
# the curated stage writes the seed images into its own run's images/.
SHARED_WITH_PASS_1 = ("manifests/pool", "manifests/dedup.parquet", "embeddings/copy", "embeddings/copy_mirrored")
STAGE_LABELS = {
    "dedup": "dedup + decontamination: in → kept",
    "retrieval": "retrieval: kept → retrieved",
    "balance": "balance: kept → balanced sample",
    "curated": "curated manifest: candidates → rows",
}
QUALITY_LABELS = {
    "dedup_precision": "dedup pair precision",
    "dedup_recall": "dedup pair recall",
    "single_survivor_share": "copy groups left with one image",
    "leak_removal_recall": "leak removal recall",
    "retrieval_precision": "retrieval precision",
    "entropy_balanced": "concept entropy: balanced sample",
    "entropy_random_sample": "concept entropy: random sample of that size",
    "entropy_deduplicated_pool": "concept entropy: deduplicated pool",
}


class LoopError(RuntimeError):
    """A stage of the loop failed; the message says which and what to do."""


# ---------------------------------------------------------------- figures and the summary (pure)


@dataclass(frozen=True)
class PassFigures:
    """One curation pass, as its lineage.json records it."""

    semantic_embedder: str
    stages: dict[str, tuple[int, int]]  # stage -> (images in, images out)
    quality: dict[str, float]  # demo_quality's figures


@dataclass(frozen=True)
class KnnFigures:
    trained: dict[str, float]  # k -> top-1 of the teacher
    random: dict[str, float]  # k -> top-1 of a random network of the same shape
    classes: int
    bank_images: int
    query_images: int


@dataclass(frozen=True)
class LoopFigures:
    urls: int
    stored: int
    passes: tuple[PassFigures, PassFigures]
    iterations: int
    knn: KnnFigures
    seconds: dict[str, float]  # stage -> wall seconds of this invocation


def short_spec(spec: str) -> str:
    """An embedder spec without the folders of its file: 'dino:.../pretrain/teacher_backbone.pt' ->
    'dino:pretrain/teacher_backbone.pt'."""
    scheme, _, argument = spec.partition(":")
    if "/" not in argument:
        return spec
    path = Path(argument)
    return f"{scheme}:{path.parent.name}/{path.name}"


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _counts(figures: PassFigures, stage: str) -> str:
    if stage not in figures.stages:
        return "–"
    images_in, images_out = figures.stages[stage]
    return f"{images_in:,} → {images_out:,}"


def summary_tables(figures: LoopFigures) -> list[Table]:
    """Counts and quality of both passes side by side, and the k-NN of the teacher against a random
    network: the tables that the terminal and the run report show."""
    first, second = figures.passes
    header = ["", "pass 1", "pass 2", "change"]
    rows = [["semantic embedder", short_spec(first.semantic_embedder), short_spec(second.semantic_embedder), ""]]
    for stage, label in STAGE_LABELS.items():
        if stage in first.stages or stage in second.stages:
            rows.append([label, *(_counts(p, stage) for p in figures.passes), ""])
    names = [*QUALITY_LABELS, *(n for p in figures.passes for n in p.quality if n not in QUALITY_LABELS)]
    for name in dict.fromkeys(names):
        values = [p.quality.get(name) for p in figures.passes]
        if values == [None, None]:
            continue
        change = _signed(values[1] - values[0]) if None not in values else ""
        rows.append([QUALITY_LABELS.get(name, name), *("–" if v is None else f"{v:.3f}" for v in values), change])
    knn_figures = figures.knn
    knn_rows = [
        [f"k = {k}", f"{100 * knn_figures.trained[k]:.1f}%", f"{100 * knn_figures.random[k]:.1f}%",
         f"{100 * (knn_figures.trained[k] - knn_figures.random[k]):+.1f}"]
        for k in knn_figures.trained if k in knn_figures.random
    ]  # fmt: skip
    return [
        Table(f"Curation: {figures.urls:,} URLs, {figures.stored:,} images stored (both passes read the same pool)",
              header, rows),  # fmt: skip
        Table(
            f"k-NN top-1 after {figures.iterations} iterations: {knn_figures.query_images} held-out images, "
            f"{knn_figures.classes} classes (chance {100 / knn_figures.classes:.1f}%), bank of "
            f"{knn_figures.bank_images} concept images",
            ["", "teacher", "random network", "points"],
            knn_rows,
        ),
    ]


def retrieval_target(figures: LoopFigures, target: float = RETRIEVAL_TARGET) -> tuple[bool, str]:
    """Whether pass 2 retrieves at least ``target`` precisely and better than pass 1, and the sentence."""
    first, second = (p.quality.get("retrieval_precision") for p in figures.passes)
    if first is None or second is None:
        return False, "retrieval target: not measured (no ground truth for the quality figures)"
    met = second >= target and second > first
    verdict = "met" if met else "NOT met"
    return met, (f"retrieval target (pass 2 >= {target:.2f} and above pass 1): {verdict}: "
                 f"pass 2 {second:.3f}, pass 1 {first:.3f}")  # fmt: skip


def timing_line(seconds: dict[str, float]) -> str:
    parts = ", ".join(f"{stage} {value:.0f} s" for stage, value in seconds.items())
    return f"wall time of this invocation: {parts}; total {sum(seconds.values()) / 60:.1f} min"


def format_table(table: Table) -> str:
    cells = [table.header, *table.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(table.header))]
    lines = [table.title]
    for row in cells:
        first = row[0].ljust(widths[0])
        lines.append("  " + "  ".join([first, *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))]).rstrip())
    return "\n".join(lines)


def summary_text(figures: LoopFigures) -> str:
    """The closing summary: both tables, the retrieval target's verdict and the wall time per stage."""
    blocks = [format_table(table) for table in summary_tables(figures)]
    return "\n\n".join([*blocks, retrieval_target(figures)[1], timing_line(figures.seconds)])


def read_pass(run_dir: Path) -> PassFigures:
    lineage = json.loads((run_dir / "lineage.json").read_text())
    return PassFigures(
        lineage["embedders"]["semantic"],
        {stage["name"]: (stage["in"], stage["out"]) for stage in lineage["stages"]},
        lineage["quality"],
    )


def read_knn(path: Path) -> KnnFigures:
    results = json.loads(path.read_text())
    return KnnFigures(results["top1"], results["random_top1"], len(results["classes"]), results["train_images"],
                      results["val_images"])  # fmt: skip


# ---------------------------------------------------------------- configs and folders


@dataclass(frozen=True)
class Layout:
    """Where each stage writes, under --out."""

    out: Path

    @property
    def pass1(self) -> Path:
        return self.out / "pass1"

    @property
    def pass2(self) -> Path:
        return self.out / "pass2"

    @property
    def pretrain(self) -> Path:
        return self.out / "pretrain"

    @property
    def bank(self) -> Path:
        return self.out / "bank"

    @property
    def evaluation(self) -> Path:
        return self.out / "evaluation"

    @property
    def report(self) -> Path:
        return self.out / "report"

    @property
    def teacher(self) -> Path:
        return self.pretrain / TORCH_EXPORT_FILE


def loop_curation(demo_root: Path) -> CurationConfig:
    """Both passes curate alike (build_lvd's defaults): the web's seed set retrieved as the registered
    demo set, its held-out images as the evaluation set to decontaminate against."""
    return CurationConfig(copy_spec=COPY_SPEC, eval_sets=(demo_root / "eval",),
                          seed_sets=(seeds.resolve("demo", demo_root / "seeds"),))  # fmt: skip


def rescaled_schedule(config: PretrainConfig, iterations: int) -> list[str]:
    """Overrides that run the recipe's epochs (and a Gram stage, at the same place) in about
    ``iterations`` iterations: each epoch becomes max(1, iterations // epochs) iterations long."""
    schedule, gram = config.schedule, config.gram
    per_epoch = max(1, iterations // schedule.epochs)
    overrides = [f"schedule.iters_per_epoch={per_epoch}"]
    if gram.enabled:
        scale = per_epoch / schedule.iters_per_epoch
        overrides += [f"gram.start_iteration={int(gram.start_iteration * scale)}",
                      f"gram.ramp_iterations={int(gram.ramp_iterations * scale)}",
                      f"gram.refresh_every={max(1, int(gram.refresh_every * scale))}"]  # fmt: skip
    return overrides


def pretraining_overrides(args: argparse.Namespace, layout: Layout, queries: Path) -> tuple[list[str], PretrainConfig]:
    """The overrides of the recipe that train on pass 1's curated manifest (with evaluation while
    training), and the config they resolve to. The command line's KEY=VALUE come last."""
    overrides = [f"data.manifest={layout.pass1 / 'manifests' / 'curated.parquet'}", f"output_dir={layout.pretrain}",
                 f"eval.train_folder={layout.bank}", f"eval.val_folder={queries}"]  # fmt: skip
    config = load_config(PretrainConfig, args.recipe, [*overrides, *args.overrides])
    if args.iterations is not None:
        overrides += rescaled_schedule(config, args.iterations)
        config = load_config(PretrainConfig, args.recipe, [*overrides, *args.overrides])
    every = args.eval_every or max(1, config.schedule.total_iters // EVALUATIONS_WHILE_TRAINING)
    overrides.append(f"eval.every={every}")
    overrides += args.overrides
    return overrides, load_config(PretrainConfig, args.recipe, overrides)


def trained_differently(config: PretrainConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (value then, value now) where the config that output_dir was trained with differs
    from ``config``; empty when they agree or nothing was trained there yet."""
    saved = Path(config.output_dir) / CONFIG_FILE
    if not saved.is_file():
        return {}
    return config_differences(yaml.safe_load(saved.read_text()) or {}, dump_config(config))


def trained(config: PretrainConfig) -> bool:
    """Whether output_dir holds a teacher export trained to the end of ``config``'s schedule (that it
    was this config is ``trained_differently``'s to say)."""
    out = Path(config.output_dir)
    export = out / EXPORT_CONFIG_FILE
    if not (export.is_file() and (out / TORCH_EXPORT_FILE).is_file()):
        return False
    return json.loads(export.read_text()).get("iteration") == config.schedule.total_iters


def link_pass(first: Path, second: Path) -> None:
    """Let ``second`` read ``first``'s ingest, copy descriptors and dedup through relative symlinks."""
    links = [rel for rel in SHARED_WITH_PASS_1 if (first / rel).exists()]
    links += [f"images/{p.name}" for p in sorted((first / "images").iterdir())
              if p.is_file() and not p.name.startswith(("seeds-", "."))]  # fmt: skip
    for rel in links:
        link = second / rel
        if link.is_symlink() or link.exists():  # linked before, or redone in pass 2 with other settings
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(first / rel, link.parent))


def drop_stale_embeddings(run_dir: Path, name: str, spec: str) -> None:
    """Remove RUN/embeddings/NAME when it was embedded by other weights than ``spec``'s file holds
    now (the teacher was trained again), so that the embed stage starts it afresh."""
    folder = run_dir / "embeddings" / name
    record = folder / "embedder.json"
    if not record.is_file():
        return
    weights = check_spec(spec).weights
    with open(weights, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if json.loads(record.read_text()).get("weights_sha256") != digest:
        print(f"{folder} was embedded by an earlier teacher: embedding the pool again", flush=True)
        shutil.rmtree(folder)


def probe_images(queries: Path, count: int = PROBE_IMAGES) -> list[Path]:
    """The first image of each of the first ``count`` classes of an ImageFolder."""
    classes = sorted(p for p in queries.iterdir() if p.is_dir())[:count]
    return [min(p for p in folder.iterdir() if p.is_file()) for folder in classes]


# ---------------------------------------------------------------- stages


def ingest_argv(args: argparse.Namespace, layout: Layout) -> list[str]:
    """build_lvd's command line for the ingest: the embedded demo web, or the URL list served elsewhere."""
    argv = ["--out", str(layout.pass1), "--stop-after", "ingest", "--semantic-embedder", args.first_embedder]
    if args.urls is None:
        argv += ["--seeds", "demo"]
    else:
        argv += ["--urls", str(args.urls), "--ground-truth", str(args.ground_truth),
                 "--seeds", str(args.demo_root / "seeds"), "--eval-sets", str(args.demo_root / "eval")]  # fmt: skip
    for network in args.allow_network:
        argv += ["--allow-network", network]
    if args.ray_address:
        argv += ["--ray-address", args.ray_address]
    return argv + (["--no-progress"] if args.no_progress else [])


def curation_pass(run_dir: Path, semantic_spec: str, curation: CurationConfig, ground_truth: Path,
                  args: argparse.Namespace) -> None:  # fmt: skip
    build_lvd.embed_pool(run_dir, COPY_SPEC, semantic_spec, ray_address=args.ray_address,
                         progress=not args.no_progress)  # fmt: skip
    build_lvd.curate(run_dir, curation, semantic_spec, ground_truth)


def pretrain(args: argparse.Namespace, overrides: list[str], config: PretrainConfig) -> None:
    """Train, resume an interrupted run of the same config, or skip a finished one. The loop owns its
    pretraining folder: one trained with another config (a changed recipe) is removed and trained
    afresh, since resuming it would keep the old networks."""
    differences = trained_differently(config)
    if differences:
        print(f"pretraining: {config.output_dir} was trained with another config "
              f"({describe_differences(differences)}); removed, training afresh", flush=True)  # fmt: skip
        shutil.rmtree(config.output_dir)
    elif trained(config):
        print(f"pretraining: {config.output_dir} holds the teacher of this config, skipped", flush=True)
        return
    command = [sys.executable, "-m", "pretrain.train", "--config", str(args.recipe), *overrides]
    print("pretraining: " + " ".join(command[1:]), flush=True)
    done = subprocess.run(command, check=False)
    if done.returncode:
        raise LoopError(f"pretraining stopped with exit code {done.returncode} (its message is above); "
                        "fix that and run again: finished stages are skipped, training resumes")  # fmt: skip


def evaluate(layout: Layout, queries: Path) -> Path:
    """k-NN (teacher and random network) into evaluation/knn.json, written last; pictures before it."""
    result = layout.evaluation / "knn.json"
    if result.is_file() and result.stat().st_mtime_ns >= layout.teacher.stat().st_mtime_ns:
        found = json.loads(result.read_text())
        if (found["train_folder"], found["val_folder"]) == (str(layout.bank), str(queries)):
            print(f"evaluation: {result} is newer than the teacher, skipped", flush=True)
            return result
    images = [str(p) for p in probe_images(queries)]
    steps = [
        (pictures.main, ["--checkpoint", str(layout.teacher), "--images", *images, "--max-images", str(len(images)),
                         "--random-baseline", "--output-dir", str(layout.evaluation / "pictures")]),
        (knn.main, ["--checkpoint", str(layout.teacher), "--train", str(layout.bank), "--val", str(queries),
                    "--random-baseline", "--num-workers", "0", "--output", str(result)]),
    ]  # fmt: skip
    for command, argv in steps:
        if command(argv):
            raise LoopError(f"evaluation of {layout.teacher} failed (its message is above)")
    return result


@contextmanager
def timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    print(f"\n== {stage}", flush=True)
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = time.perf_counter() - started


def loop_figures(layout: Layout, knn_result: Path, config: PretrainConfig, seconds: dict[str, float]) -> LoopFigures:
    status = read_pool(layout.pass1).column("status")
    return LoopFigures(
        urls=len(status),
        stored=int(pc.sum(pc.equal(status, "success")).as_py() or 0),
        passes=(read_pass(layout.pass1), read_pass(layout.pass2)),
        iterations=config.schedule.total_iters,
        knn=read_knn(knn_result),
        seconds=seconds,
    )


def report_inputs(layout: Layout, figures: LoopFigures, config: PretrainConfig) -> LoopReportInputs:
    random_at_k = figures.knn.random.get(str(config.eval.knn_k))
    baselines = {f"random network (k = {config.eval.knn_k})": random_at_k} if random_at_k is not None else {}
    baselines["chance"] = 1 / figures.knn.classes
    return LoopReportInputs(
        tables=summary_tables(figures),
        notes=[retrieval_target(figures)[1], timing_line(figures.seconds)],
        pass_reports={f"pass {i} ({short_spec(p.semantic_embedder)})": run / "report" / "index.html"
                      for i, (p, run) in enumerate(zip(figures.passes, (layout.pass1, layout.pass2)), start=1)},  # fmt: skip
        metrics=layout.pretrain / "metrics.jsonl",
        knn_baselines=baselines,
        pictures={f"teacher after {figures.iterations} iterations": layout.evaluation / "pictures",
                  "random network of the same shape": layout.evaluation / "pictures" / "random"},  # fmt: skip
        training_pictures=layout.pretrain / "eval",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="the loop's folder (default runs/demo)")
    parser.add_argument("--first-embedder", default=build_lvd.DEMO_SEMANTIC,
                        help=f"semantic embedder of pass 1 (default {build_lvd.DEMO_SEMANTIC}; any spec of "
                        "build_lvd.py --semantic-embedder)")  # fmt: skip
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help=f"pretraining config (default {DEFAULT_RECIPE})")
    parser.add_argument("--iterations", type=int,
                        help="stretch or shorten the recipe to about this many iterations (default: its own schedule)")
    parser.add_argument("--eval-every", type=int,
                        help=f"k-NN and pictures every N iterations (default: {EVALUATIONS_WHILE_TRAINING} per run)")
    parser.add_argument("--urls", type=Path, help="URL list of a demo web served elsewhere (with --ground-truth and --demo-root)")
    parser.add_argument("--ground-truth", type=Path, help="its ground_truth.parquet (DemoServer.write_url_list)")
    parser.add_argument("--demo-root", type=Path, help="its root (curation.demo_web.generate): seeds/, eval/, pages.parquet")
    parser.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                        help="let the crawler reach this internal network (a demo web served elsewhere)")
    parser.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="pretraining config overrides, e.g. data.num_workers=0")  # fmt: skip
    args = parser.parse_args(argv)
    external = [args.urls, args.ground_truth, args.demo_root]
    if any(external) and not all(external):
        parser.error("--urls, --ground-truth and --demo-root go together (a demo web served elsewhere); "
                     "give all three, or none for the embedded demo web")  # fmt: skip
    for value, flag in ((args.iterations, "--iterations"), (args.eval_every, "--eval-every")):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    layout = Layout(args.out)
    embedded = args.urls is None
    demo_root = layout.pass1 / "demo" / "site" if embedded else args.demo_root
    ground_truth = layout.pass1 / "demo" / "ground_truth.parquet" if embedded else args.ground_truth
    queries = demo_root / "eval"
    seconds: dict[str, float] = {}
    try:
        # The pretraining config is checked before the first download.
        overrides, config = pretraining_overrides(args, layout, queries)
        with timed(seconds, "ingest"):
            if build_lvd.main(ingest_argv(args, layout)):
                return 2
        curation = loop_curation(demo_root)
        with timed(seconds, "pass 1"):
            curation_pass(layout.pass1, args.first_embedder, curation, ground_truth, args)
        with timed(seconds, "pretraining"):
            concept_folder(demo_root, layout.bank)
            pretrain(args, overrides, config)
        with timed(seconds, "evaluation"):
            knn_result = evaluate(layout, queries)
        with timed(seconds, "pass 2"):
            teacher_spec = f"dino:{layout.teacher.resolve()}"
            link_pass(layout.pass1, layout.pass2)
            drop_stale_embeddings(layout.pass2, "semantic", teacher_spec)
            curation_pass(layout.pass2, teacher_spec, curation, ground_truth, args)
        figures = loop_figures(layout, knn_result, config, seconds)
        (args.out / "summary.json").write_text(json.dumps(dataclasses.asdict(figures), indent=2) + "\n")
        report = build_loop_report(layout.report, report_inputs(layout, figures, config))
    except (LoopError, CurationError, EmbedderError, EmbedError, seeds.SeedError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\n{summary_text(figures)}\nrun report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
