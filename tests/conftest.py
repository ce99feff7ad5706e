"""Session-wide fixtures: one Ray instance, one small demo web and its server."""

from __future__ import annotations

import os

import pytest

from curation import ray_runtime
from curation.demo_web import DemoServer, DemoWebConfig, generate

# A demo web about a tenth of the default size: every planted kind, a few of each.
SMALL_DEMO = DemoWebConfig(
    images_per_concept=10,
    off_topic=20,
    exact_duplicates=10,
    near_duplicates=12,
    seed_images_per_concept=4,
    eval_images_per_concept=3,
    eval_leaks=6,
    awkward_per_format=2,
    broken_per_kind=1,
)


@pytest.fixture(scope="session")
def ray_session():
    """One small Ray instance for the whole session (starting Ray costs seconds)."""
    import ray

    ray_runtime.init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("demo_web"), SMALL_DEMO)


@pytest.fixture(scope="session")
def demo_server(demo_root):
    with DemoServer(demo_root, slow_s=12) as server:
        yield server


@pytest.fixture(scope="session")
def demo_urls(demo_server, tmp_path_factory):
    """(urls.parquet, ground_truth.parquet) for the session's demo server."""
    return demo_server.write_url_list(tmp_path_factory.mktemp("demo_urls"))


# A DINO run small enough for a loaded CPU: a 2-block ViT/8 on 32-pixel crops (16-pixel locals), K=64,
# batch 4, no data-loader workers. Schedules, crops and sources are the test's to choose.
TINY_MODEL = (
    "model.arch=vit_test",
    "model.patch_size=8",
    "heads.out_dim=64",
    "heads.hidden_dim=32",
    "heads.bottleneck_dim=16",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.augment.n_local_crops=2",
    "train.device=cpu",
    "train.tensorboard=false",
    "train.log_every=1",
)


@pytest.fixture(scope="session")
def tiny_model() -> tuple[str, ...]:
    """Config overrides that make any recipe's networks and batches tiny (see TINY_MODEL)."""
    return TINY_MODEL


@pytest.fixture(scope="session")
def noise_images(tmp_path_factory):
    """An ImageFolder of 8 seeded 40x40 noise images in 2 classes."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("noise_images")
    for i in range(8):
        (folder / f"class{i % 2}").mkdir(exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"class{i % 2}" / f"{i}.png")
    return folder


def pytest_collection_modifyitems(config, items):
    # CI must run every test; a skip there is a failure of the set-up, not of the code.
    if os.environ.get("CI") == "true":
        config.option.strict_markers = True
