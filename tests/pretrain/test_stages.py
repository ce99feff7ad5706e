"""The v3 stage pipeline at tiny scale, and starting a run from another run's networks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain import stages
from pretrain.checkpoint import CheckpointError
from pretrain.config import PretrainConfig
from pretrain.config_io import load_config
from pretrain.meta_arch import SSLMetaArch
from pretrain.train import Trainer

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "pretrain" / "configs"
TINY_PIPELINE = CONFIGS / "stages" / "v3_tiny.yaml"


def model_state(output_dir: Path, iteration: int) -> dict[str, torch.Tensor]:
    return torch.load(output_dir / "checkpoints" / f"step-{iteration:07d}" / "model.pt", weights_only=True)


def same(state: dict, prefix: str, other: dict, other_prefix: str) -> bool:
    """Whether ``state[prefix*]`` equals ``other[other_prefix*]``, tensor by tensor."""
    mine = {name.removeprefix(prefix): t for name, t in state.items() if name.startswith(prefix)}
    theirs = {
        name.removeprefix(other_prefix): t for name, t in other.items() if name.startswith(other_prefix)
    }
    return bool(mine) and mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_v3_stages_run_in_order_each_from_the_previous_and_a_rerun_skips_them(
    tmp_path: Path, tiny_model: tuple[str, ...], noise_images: Path, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "stages"
    args = ["--cluster", "debug", "--gpus-per-node", "0", "--pipeline", str(TINY_PIPELINE), "--output", str(output),
            *tiny_model, f"data.image_folder={noise_images}"]  # fmt: skip
    assert stages.main(args) == 0
    pretrain, gram, highres = output / "pretrain", output / "gram", output / "highres"
    for folder, last in ((pretrain, 12), (gram, 8), (highres, 4)):
        assert (folder / "checkpoints" / f"step-{last:07d}" / "COMPLETE").is_file()
        assert (folder / "teacher_backbone.safetensors").is_file()

    # Gram refinement: the first Gram teacher is the EMA teacher of pretraining's early checkpoint (step 4,
    # kept by checkpoint.keep_every), until its refresh from the current EMA teacher at iteration 4.
    early = model_state(pretrain, 4)
    assert same(model_state(gram, 4), "gram_teacher.", early, "teacher.backbone.")
    assert not same(model_state(gram, 8), "gram_teacher.", early, "teacher.backbone.")
    # High resolution: the Gram teacher is the refinement's final EMA teacher, kept throughout.
    assert same(model_state(highres, 4), "gram_teacher.", model_state(gram, 8), "teacher.backbone.")
    highres_config = load_config(PretrainConfig, highres / "config.yaml")
    assert highres_config.data.augment.global_crop_size == 64
    assert highres_config.checkpoint.init_from == gram / "checkpoints" / "step-0000008"

    capsys.readouterr()
    modified = {path: path.stat().st_mtime_ns for path in output.rglob("*") if path.is_file()}
    assert stages.main(args) == 0
    out = capsys.readouterr().out
    assert all(f"stage {name}: finished" in out for name in ("pretrain", "gram", "highres"))
    assert "every stage is finished" in out
    assert {path: path.stat().st_mtime_ns for path in output.rglob("*") if path.is_file()} == modified


@pytest.fixture(scope="module")
def finished_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[str, ...], noise_images: Path
) -> Path:
    """A finished 2-iteration v3 tiny run without Gram anchoring."""
    output_dir = tmp_path_factory.mktemp("finished")
    overrides = [*tiny_model, "gram.enabled=false", "data.augment.gram_crop_factor=0", "schedule.epochs=1",
                 "schedule.iters_per_epoch=2", "schedule.warmup_epochs=0", f"data.image_folder={noise_images}",
                 f"output_dir={output_dir}"]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(PretrainConfig, CONFIGS / "v3_tiny.yaml", overrides)).train()
    finally:
        torch.set_num_threads(threads)
    return output_dir


def tiny_config(tiny_model: tuple[str, ...], *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, CONFIGS / "v3_tiny.yaml", [*tiny_model, "data.image_folder=x", *extra])


def test_init_from_starts_from_the_networks_and_centers_of_another_run(
    finished_run: Path, tiny_model: tuple[str, ...]
) -> None:
    source = model_state(finished_run, 2)
    torch.manual_seed(0)
    model = SSLMetaArch(tiny_config(tiny_model, f"checkpoint.init_from={finished_run}"))
    state = model.state_dict()
    for prefix in ("student.", "teacher.", "dino_loss.", "ibot_loss."):
        assert same(state, prefix, source, prefix), prefix
    # The Gram teacher is not inherited: it is taken on the stage's own schedule.
    torch.manual_seed(0)
    fresh = SSLMetaArch(tiny_config(tiny_model))
    assert same(state, "gram_teacher.", fresh.state_dict(), "gram_teacher.")


def test_gram_teacher_checkpoint_is_that_runs_ema_teacher_and_the_refreshes_follow(
    finished_run: Path, tiny_model: tuple[str, ...]
) -> None:
    config = tiny_config(tiny_model, f"gram.teacher_checkpoint={finished_run}/checkpoints/step-0000002",
                         "gram.start_iteration=0", "gram.refresh_every=30", "gram.n_refreshes=2")  # fmt: skip
    model = SSLMetaArch(config)
    assert same(model.state_dict(), "gram_teacher.", model_state(finished_run, 2), "teacher.backbone.")
    assert config.gram.refresh_iterations(config.schedule.total_iters) == [30, 60]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("model.arch=vit_tiny",), "the networks of"),
        (("heads.out_dim=32",), "wrong shape: dino_loss.center"),
    ],
    ids=["architecture", "prototypes"],
)
def test_init_from_a_run_of_another_architecture_is_an_error(
    extra: tuple[str, ...], message: str, finished_run: Path, tiny_model: tuple[str, ...]
) -> None:
    with pytest.raises(CheckpointError, match="checkpoint.init_from") as error:
        SSLMetaArch(tiny_config(tiny_model, f"checkpoint.init_from={finished_run}", *extra))
    assert message in str(error.value)


def test_the_real_v3_pipeline_plans_three_stages() -> None:
    planned = stages.plan(CONFIGS / "stages" / "v3.yaml", Path("runs/v3"), ["data.image_folder=x"])
    assert [stage.name for stage in planned] == ["pretrain", "gram", "highres"]
    pretrain, gram, highres = (stage.config for stage in planned)
    assert not pretrain.gram.enabled and pretrain.schedule.total_iters == 125_000
    assert gram.gram.teacher_checkpoint == Path("runs/v3/pretrain/checkpoints/step-0025000")
    assert gram.checkpoint.init_from == Path("runs/v3/pretrain/checkpoints/step-0125000")
    assert gram.gram.refresh_iterations(gram.schedule.total_iters) == [10_000, 20_000, 30_000]
    assert highres.gram.refresh_iterations(highres.schedule.total_iters) == []
    assert highres.data.augment.global_crop_size == 512 and highres.gram.weight == 1.5


@pytest.mark.parametrize(
    ("pipeline", "cli", "message"),
    [
        (
            "config: {recipe}\nstages:\n  - name: a\n    overide: []\n",
            (),
            "did you mean 'stages[0].overrides'",
        ),
        (
            "config: {recipe}\nstages:\n  - name: a\n    init_from: b\n  - name: b\n",
            (),
            "'b' is not an earlier stage",
        ),
        (
            "config: {recipe}\nstages:\n  - name: a\n    overrides: [gram.enabled=false, data.augment.gram_crop_factor=0]\n"
            "  - name: b\n    gram_teacher: {{stage: a, iteration: 30}}\n",
            (),
            "which that stage does not keep",
        ),
        (
            "config: {recipe}\nstages:\n  - name: a\n    overrides: [output_dir=x]\n",
            (),
            "which the pipeline sets",
        ),
        ("config: {recipe}\nstages:\n  - name: a\n", ("output_dir=x",), "is set by the pipeline"),
        (
            "config: {recipe}\nstages:\n  - name: a\n",
            ("losses.ibot_wieght=1",),
            "stage a: unknown config key",
        ),
    ],
    ids=[
        "unknown key",
        "later stage",
        "teacher not kept",
        "stage sets output_dir",
        "cli sets output_dir",
        "typo",
    ],
)
def test_a_bad_pipeline_fails_with_a_message(
    pipeline: str, cli: tuple[str, ...], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(pipeline.format(recipe=CONFIGS / "v3_tiny.yaml"))
    args = [
        "--cluster",
        "debug",
        "--pipeline",
        str(path),
        "--output",
        str(tmp_path / "out"),
        "data.image_folder=x",
        *cli,
    ]
    assert stages.main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert not (tmp_path / "out").exists()
