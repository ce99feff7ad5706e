"""Session-wide fixtures: one Ray instance, one small demo web and its server."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


# The pieces of a DINO run small enough for a loaded CPU, for tests to combine: a 2-block ViT/8 with
# K=64 (TINY_NETWORK), 32-pixel global and 16-pixel local crops (TINY_CROPS), and 2-iteration epochs
# without warm-up whose first epoch freezes the last layer (TINY_SCHEDULE; the test picks the epochs).
TINY_NETWORK = (
    "model.arch=vit_test",
    "model.patch_size=8",
    "heads.out_dim=64",
    "heads.hidden_dim=32",
    "heads.bottleneck_dim=16",
)
TINY_CROPS = ("data.augment.global_crop_size=32", "data.augment.local_crop_size=16", "data.augment.n_local_crops=2")
TINY_SCHEDULE = (
    "schedule.iters_per_epoch=2",
    "schedule.warmup_epochs=0",
    "schedule.warmup_teacher_temp_epochs=1",
    "schedule.freeze_last_layer_epochs=1",
)
# Any recipe's networks and batches made tiny (batch 4, no data-loader workers, 2 local crops);
# schedules, crop sizes and sources are the test's to choose.
TINY_MODEL = (
    *TINY_NETWORK,
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


CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_SIZE = (1200, 3000)  # width, height


@dataclass(frozen=True)
class RenderedPage:
    dom: str  # the DOM once the page's scripts ran
    screenshot: np.ndarray  # grey levels, (height, width)

    def images_loaded(self) -> tuple[int, int]:
        """(images loaded, images on the page), as the reports' load script records them on <body>."""
        found = re.search(r'data-images-ok="(\d+)/(\d+)"', self.dom)
        assert found, "the page's load script did not run"
        return int(found[1]), int(found[2])


@pytest.fixture
def headless_browser(tmp_path) -> Callable[[Path], RenderedPage]:
    """Opens an HTML file in real headless Chromium: its DOM after load and a screenshot. CI must run
    it (the Makefile installs Debian's `chromium`); elsewhere it skips without Chromium."""
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing: CI must run the browser tests (apt-get install -y chromium)")
        pytest.skip(f"headless chromium not installed ({CHROMIUM}); apt-get install -y chromium to run it")

    def render(page: Path) -> RenderedPage:
        from PIL import Image

        url = page.resolve().as_uri()
        common = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                  f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]  # fmt: skip
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=60,
                             check=True).stdout  # fmt: skip
        shot = tmp_path / "screenshot.png"
        width, height = SCREENSHOT_SIZE
        subprocess.run([*common, f"--screenshot={shot}", f"--window-size={width},{height}", url],
                       capture_output=True, timeout=60, check=True)  # fmt: skip
        with Image.open(shot) as image:
            return RenderedPage(dom, np.asarray(image.convert("L"), dtype=np.float32))

    return render


def pytest_collection_modifyitems(config, items):
    # CI must run every test; a skip there is a failure of the set-up, not of the code.
    if os.environ.get("CI") == "true":
        config.option.strict_markers = True
