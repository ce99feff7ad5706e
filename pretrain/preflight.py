"""Checks a run can pass without a GPU, in seconds: before a job is queued (``python -m pretrain.launch``,
``python -m pretrain.stages``) and at once when an sbatch script starts (slurm/pretrain_v3.sh).

    python -m pretrain.preflight --config CONFIG [--claim] [KEY=VALUE ...]

Exit 0, or ``error: ...`` and exit 2, when:

- the config does not load (an unknown key, a value of the wrong type, an impossible combination);
- a data source does not exist (a manifest path, an ImageFolder);
- ``output_dir`` holds checkpoints of another architecture (``model`` and ``heads`` sections);
- a checkpoint named by ``checkpoint.init_from``, ``gram.teacher_checkpoint`` or ``distill.teacher``
  is missing or does not fit (the networks are built on the meta device, no memory);
- ``output_dir`` belongs to another job that is still alive (pretrain/ownership.py). With ``--claim``
  this process's SLURM job (or the process) then takes it.

The trainer checks the same things again when it starts; these checks only make them fail early,
before a job waits in the queue for hours.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from pretrain.checkpoint import (
    CONFIG_FILE,
    Checkpointer,
    CheckpointError,
    architecture_differences,
    describe_differences,
)
from pretrain.config import PretrainConfig
from pretrain.config_io import dump_config, load_config
from pretrain.meta_arch import SSLMetaArch
from pretrain.ownership import Owner, check_free, claim
from pretrain.warm_start import CHECKPOINTS_FOLDER, read_saved_config

__all__ = ["check_run", "main"]


def check_sources(config: PretrainConfig) -> None:
    """Every data source exists (its content is the trainer's to read)."""
    for index, source in enumerate(config.data.all_sources()):
        if source.manifest is not None and not Path(source.manifest).exists():
            raise FileNotFoundError(
                f"manifest not found: {source.manifest} (data source {index}); point data.manifest at a "
                "curated manifest, RUN/manifests/NAME or one of its part-*.parquet files"
            )
        if source.image_folder is not None and not Path(source.image_folder).is_dir():
            raise FileNotFoundError(
                f"image folder not found: {source.image_folder} (data source {index}); point "
                "data.image_folder at a folder DIR/<class>/<image>"
            )


def check_existing_checkpoints(config: PretrainConfig) -> None:
    """Checkpoints already in ``output_dir`` (a run to continue) have this config's architecture."""
    complete = Checkpointer(Path(config.output_dir) / CHECKPOINTS_FOLDER, config.checkpoint).complete()
    if not complete or not config.checkpoint.resume:
        return  # nothing to resume; with resume=false the trainer refuses the folder itself
    newest = complete[-1]
    differences = architecture_differences(read_saved_config(newest), dump_config(config))
    if differences:
        raise CheckpointError(
            f"output_dir {config.output_dir} holds checkpoints of another architecture (newest {newest}: "
            f"{describe_differences(differences)}); set these keys back to the checkpoint's values "
            f"(see {newest / CONFIG_FILE}) to continue that run, or choose a new output_dir"
        )


def check_run(config: PretrainConfig, me: Owner) -> None:
    """Every check above but the config's own (load_config did it); raises ValueError or OSError."""
    check_sources(config)
    check_existing_checkpoints(config)
    with torch.device("meta"):
        SSLMetaArch(config)  # the checkpoints it starts from or distils: they exist and fit
    check_free(Path(config.output_dir), me)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.preflight", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", type=Path, help="YAML config file (pretrain/configs/*.yaml)")
    parser.add_argument(
        "--claim", action="store_true", help="take output_dir for this job once the checks pass"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    args = parser.parse_args(argv)
    me = Owner.current()
    try:
        config = load_config(PretrainConfig, args.config, args.overrides)
        check_run(config, me)
        if args.claim:
            claim(Path(config.output_dir), me)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
