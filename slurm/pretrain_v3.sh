#!/bin/bash
# DINOv3 pretraining (pretrain/configs/v3.yaml, ViT-L/16) on SLURM: one task per GPU on every node of
# the allocation. Submit from the repository root:
#
#   MANIFEST=runs/lvd/manifests/curated OUTPUT_DIR=runs/pretrain/v3 sbatch slurm/pretrain_v3.sh
#   sbatch --nodes=4 --partition=gpu --account=vision --qos=high slurm/pretrain_v3.sh schedule.epochs=50
#
# Environment (sbatch hands the submitting shell's environment to the job):
#   CONFIG        recipe file (default pretrain/configs/v3.yaml)
#   MANIFEST      a curated manifest, passed as data.manifest
#   IMAGE_FOLDER  an ImageFolder tree, passed as data.image_folder (or data.sources in CONFIG)
#   OUTPUT_DIR    the run folder (default runs/pretrain/v3): config.yaml, metrics.jsonl, checkpoints/,
#                 the teacher export, OWNER.json. Submitting again with the same folder continues the run.
#   PYTHON        interpreter with the project installed (default .venv/bin/python)
#   MAX_REQUEUES  requeues on the time-limit signal (default 3)
# Arguments: config overrides KEY=VALUE, applied after the above (docs/pretrain.md lists every key).
#
# The header below asks for 2 nodes of 8 GPUs for 48 hours; sbatch's own flags override it. Five
# minutes before the limit SLURM sends SIGUSR1 to this shell; the tasks checkpoint the iteration they
# are at and stop, and the job requeues itself: it restarts with the same id and resumes there.
# Log: slurm-dinov3-<job id>.out in the submission folder, each line prefixed with its task's rank.
# See docs/slurm.md.
#SBATCH --job-name=dinov3
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

RECIPE=v3
source "${SLURM_SUBMIT_DIR:-.}/slurm/pretrain_job.sh"
