"""A training schedule as a pipeline of stages, each a job that starts from the previous stage's
networks: DINOv3's pretraining, Gram-anchoring refinement and high-resolution adaptation.

    python -m pretrain.stages --pipeline pretrain/configs/stages/v3.yaml --output runs/pretrain/v3_stages \\
        --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00 data.manifest=runs/lvd/manifests/curated

A pipeline file (``PipelineConfig``; unknown keys are errors, as in every config):

    config: ../v3.yaml                  # the recipe of every stage, relative to this file
    stages:
      - name: pretrain
        overrides: [gram.enabled=false, data.augment.gram_crop_factor=0, checkpoint.keep_every=25000]
      - name: gram
        init_from: pretrain             # networks of that stage's final checkpoint
        gram_teacher: {stage: pretrain, iteration: 25000}  # first Gram teacher: that EMA teacher
        overrides: [gram.start_iteration=0, gram.refresh_every=10000, gram.n_refreshes=3]
      - name: highres
        init_from: gram
        gram_teacher: {stage: gram}     # the final checkpoint's EMA teacher, kept (n_refreshes=0)
        overrides: [data.augment.global_crop_size=512, gram.n_refreshes=0]

Stage NAME trains in OUTPUT/NAME with the recipe, then the stage's overrides, then the command line's
overrides (every stage), then what the pipeline sets: ``output_dir``, ``checkpoint.init_from`` and
``gram.teacher_checkpoint``. It is finished when its last checkpoint
(``OUTPUT/NAME/checkpoints/step-<last iteration>``) is complete, and a rerun skips it; an unfinished
stage resumes from its own newest checkpoint like any run.

On SLURM the unfinished stages are queued at once, each waiting for the one before it to succeed
(``afterok``; a failed stage cancels those after it), and each requeues itself on time limit or
preemption (pretrain/launch.py). With ``--cluster local`` or ``debug`` they run one after the other.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.checkpoint import MARKER_FILE, step_name
from pretrain.config import PretrainConfig
from pretrain.config_io import ConfigError, load_config
from pretrain.launch import (
    TrainingJob,
    add_cluster_arguments,
    check_resources,
    make_executor,
    submit,
    watch_hint,
)
from pretrain.ownership import Owner, check_free
from pretrain.preflight import check_run, check_sources
from pretrain.warm_start import CHECKPOINTS_FOLDER

__all__ = ["GramTeacherSource", "PipelineConfig", "Stage", "StageConfig", "finished", "main", "plan"]

# Keys that the pipeline sets for each stage; a stage or the command line setting them is an error.
PIPELINE_KEYS = ("output_dir", "checkpoint.init_from", "gram.teacher_checkpoint")


@dataclass(frozen=True)
class GramTeacherSource:
    """A checkpoint of an earlier stage whose EMA teacher becomes a stage's first Gram teacher."""

    stage: str
    iteration: int | None = None  # None: the stage's final checkpoint


@dataclass(frozen=True)
class StageConfig:
    name: str
    overrides: list[str] = field(default_factory=list)
    init_from: str | None = None  # an earlier stage: start from the networks of its final checkpoint
    gram_teacher: GramTeacherSource | None = None

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"stage name {self.name!r} must be a plain folder name")
        for override in self.overrides:
            if override.partition("=")[0].strip() in PIPELINE_KEYS:
                raise ValueError(
                    f"stage {self.name} sets {override.partition('=')[0]}, which the pipeline sets: remove it "
                    "(use init_from and gram_teacher)"
                )


@dataclass(frozen=True)
class PipelineConfig:
    config: Path  # the recipe, relative to the pipeline file
    stages: list[StageConfig] = field(default_factory=list)

    def validate(self) -> None:
        if not self.stages:
            raise ValueError("a pipeline needs at least one stage")
        seen: list[str] = []
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"two stages are named {stage.name!r}")
            sources = {
                "init_from": stage.init_from,
                "gram_teacher.stage": stage.gram_teacher.stage if stage.gram_teacher else None,
            }
            for key, source in sources.items():
                if source is not None and source not in seen:
                    raise ValueError(
                        f"stage {stage.name}: {key} {source!r} is not an earlier stage (earlier: {seen or 'none'})"
                    )
            seen.append(stage.name)


@dataclass(frozen=True)
class Stage:
    """A stage resolved: its config, and what its job runs (the recipe file and overrides)."""

    name: str
    recipe: Path
    overrides: tuple[str, ...]
    config: PretrainConfig

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def final_checkpoint(self) -> Path:
        return self.output_dir / CHECKPOINTS_FOLDER / step_name(self.config.schedule.total_iters)


def finished(stage: Stage) -> bool:
    return (stage.final_checkpoint / MARKER_FILE).is_file()


def _gram_teacher_checkpoint(stage: StageConfig, source: Stage) -> Path:
    """The checkpoint folder of ``source`` that ``stage`` takes its Gram teacher from; it must be one
    that the source stage writes and keeps."""
    assert stage.gram_teacher is not None
    total = source.config.schedule.total_iters
    iteration = total if stage.gram_teacher.iteration is None else stage.gram_teacher.iteration
    checkpoint = source.config.checkpoint
    kept = iteration == total or (
        0 < iteration < total
        and checkpoint.every > 0
        and iteration % checkpoint.every == 0
        and checkpoint.keep_every > 0
        and iteration % checkpoint.keep_every == 0
    )
    if not kept:
        raise ConfigError(
            f"stage {stage.name} takes its Gram teacher from iteration {iteration} of stage {source.name}, "
            f"which that stage does not keep (it runs {total} iterations, checkpoint.every "
            f"{checkpoint.every}, checkpoint.keep_every {checkpoint.keep_every}): in stage {source.name} set "
            f"checkpoint.keep_every (and checkpoint.every) to divide {iteration}, or choose another iteration"
        )
    return source.output_dir / CHECKPOINTS_FOLDER / step_name(iteration)


def plan(pipeline: Path, output: Path, overrides: Sequence[str] = ()) -> list[Stage]:
    """The stages of ``pipeline`` under ``output``, each config loaded and validated."""
    for override in overrides:
        if override.partition("=")[0].strip() in PIPELINE_KEYS:
            raise ConfigError(
                f"{override.partition('=')[0]} is set by the pipeline for each stage; remove it"
            )
    spec = load_config(PipelineConfig, pipeline)
    recipe = (Path(pipeline).parent / spec.config).resolve()
    stages: dict[str, Stage] = {}
    for stage in spec.stages:
        pipeline_keys = [f"output_dir={Path(output) / stage.name}"]
        if stage.init_from is not None:
            pipeline_keys.append(f"checkpoint.init_from={stages[stage.init_from].final_checkpoint}")
        if stage.gram_teacher is not None:
            source = stages[stage.gram_teacher.stage]
            pipeline_keys.append(f"gram.teacher_checkpoint={_gram_teacher_checkpoint(stage, source)}")
        stage_overrides = (*stage.overrides, *overrides, *pipeline_keys)
        try:
            config = load_config(PretrainConfig, recipe, stage_overrides)
        except ConfigError as error:
            raise ConfigError(f"stage {stage.name}: {error}") from error
        stages[stage.name] = Stage(stage.name, recipe, stage_overrides, config)
    return list(stages.values())


def run(args: argparse.Namespace) -> int:
    stages = plan(args.pipeline, args.output, args.overrides)
    done = [finished(stage) for stage in stages]
    first = done.index(False) if False in done else len(stages)
    if any(done[first:]):
        later = [stage.name for stage, is_done in zip(stages, done) if is_done][first:]
        raise ConfigError(
            f"stages {later} are finished but an earlier one is not: remove their folders to rerun them"
        )
    for stage in stages[:first]:
        print(f"stage {stage.name}: finished ({stage.final_checkpoint}), skipped", flush=True)
    todo = stages[first:]
    if not todo:
        print("every stage is finished", flush=True)
        return 0
    check_resources(args)
    # The first stage to run starts from finished stages: check it all. The later ones start from
    # checkpoints that do not exist yet: check what can be.
    check_run(todo[0].config, Owner.current())
    for stage in todo[1:]:
        check_sources(stage.config)
        check_free(stage.output_dir, Owner.current())
    previous = None
    for stage in todo:
        if args.cluster != "slurm" and stage is not todo[0]:
            check_run(stage.config, Owner.current())  # the stage before it has finished now
        dependency = (
            f"afterok:{previous.job_id}" if previous is not None and args.cluster == "slurm" else None
        )
        job = TrainingJob(stage.recipe, stage.overrides, stage.output_dir, args.max_requeues)
        previous = submit(make_executor(args, stage.output_dir, dependency), job, args.cluster)
        print(f"stage {stage.name}: {watch_hint(previous, stage.output_dir, args.cluster)}", flush=True)
        if args.cluster != "slurm":
            previous.results()  # local and debug: one stage after the other
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.stages", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_cluster_arguments(parser)
    parser.add_argument(
        "--pipeline", type=Path, required=True, help="pipeline file (pretrain/configs/stages/*.yaml)"
    )
    parser.add_argument("--output", type=Path, required=True, help="folder of the stages' output folders")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a local or debug stage failed; submitit re-raises it with its log's tail
        print(f"error: a stage failed: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from pretrain.stages import main as stages_main  # pickled jobs name pretrain.launch, not __main__

    sys.exit(stages_main())
