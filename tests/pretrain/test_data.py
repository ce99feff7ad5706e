"""Tests of pretrain.data: sources, the resumable mixture sampler, multi-crop views, block masks, collate."""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from pretrain.data import (
    AugmentConfig,
    BlockMaskConfig,
    BlockMaskGenerator,
    EpochPermutations,
    ImageFolderSource,
    ManifestSource,
    MixtureConfig,
    MixtureSampler,
    MultiCropAugmentation,
    PretrainDataset,
    collate_multicrop,
    draw_masks,
)
from pretrain.data.augment import IMAGENET_MEAN, IMAGENET_STD


def binomial_tolerance(p: float, n: int) -> float:
    """Four standard deviations of a share of n Bernoulli(p) draws, plus one count."""
    return 4 * math.sqrt(p * (1 - p) / n) + 1 / n


# ---------------------------------------------------------------- sources


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_image(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_shard(run_dir: Path, name: str, payloads: dict[str, bytes]) -> list[dict]:
    """A tar under RUN_DIR/images and the manifest rows (key, shard, offset, nbytes) of its members."""
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    with tarfile.open(run_dir / "images" / name, "w") as tar:
        for key, data in payloads.items():
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(run_dir / "images" / name) as tar:
        return [
            {
                "key": member.name.removesuffix(".png"),
                "shard": f"images/{name}",
                "offset": member.offset_data,
                "nbytes": member.size,
            }
            for member in tar.getmembers()
        ]


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """RUN_DIR with two shards, a folder manifest of two parts, failed rows and one corrupt image."""
    run = tmp_path / "run"
    first = write_shard(run, "00000.tar", {f"img{i}": encode_png(noise_image(i)) for i in range(4)})
    second = write_shard(run, "00001.tar", {"img4": b"not an image", "img5": encode_png(noise_image(5))})
    failed = [{"key": f"bad{i}", "shard": None, "offset": None, "nbytes": None} for i in range(3)]
    success = [dict(row, status="success", width=16) for row in first + second]
    rows = success[:3] + [dict(row, status="failed_to_download", width=None) for row in failed] + success[3:]
    write_manifest(run / "manifests" / "pool" / "part-00000.parquet", rows[:4])
    write_manifest(run / "manifests" / "pool" / "part-00001.parquet", rows[4:])
    return run


def test_manifest_source_reads_the_right_bytes(run_dir: Path) -> None:
    source = ManifestSource(run_dir / "manifests" / "pool")
    assert source.root == run_dir.absolute()
    assert len(source) == 6
    assert [source.key(i) for i in range(6)] == [f"img{i}" for i in range(6)]
    for i in (0, 3, 5):
        assert source.read_bytes(i) == encode_png(noise_image(i))
        loaded = source.load(i)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), noise_image(i))


def test_manifest_source_skips_a_corrupt_image_deterministically(run_dir: Path) -> None:
    source = ManifestSource(run_dir / "manifests" / "pool")
    index, image = source.load_indexed(4)  # img4 holds garbage bytes
    assert index == 5 and source.n_skipped == 1
    np.testing.assert_array_equal(np.asarray(image), noise_image(5))
    np.testing.assert_array_equal(np.asarray(source.load(4)), noise_image(5))
    assert source.n_skipped == 2


def test_manifest_source_root(run_dir: Path, tmp_path: Path) -> None:
    rows = pq.read_table(run_dir / "manifests" / "pool" / "part-00000.parquet").to_pylist()
    elsewhere = write_manifest(tmp_path / "elsewhere" / "curated.parquet", rows)
    with pytest.raises(ValueError, match="pass root"):
        ManifestSource(elsewhere)
    source = ManifestSource(elsewhere, root=run_dir)
    np.testing.assert_array_equal(np.asarray(source.load(1)), noise_image(1))


def test_curated_manifest_without_status_counts_every_row(run_dir: Path) -> None:
    rows = pq.read_table(run_dir / "manifests" / "pool" / "part-00000.parquet").to_pylist()
    curated = [{k: v for k, v in row.items() if k != "status"} for row in rows if row["status"] == "success"]
    path = write_manifest(run_dir / "manifests" / "curated" / "curated.parquet", curated)
    source = ManifestSource(path)
    assert len(source) == 3 and source.key(2) == "img2"


def test_manifest_source_errors(run_dir: Path) -> None:
    missing = run_dir / "manifests" / "nope.parquet"
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        ManifestSource(missing)
    rows = [
        {"key": f"k{i}", "status": "failed_to_download", "shard": None, "offset": None, "nbytes": None}
        for i in range(3)
    ] + [{"key": "k3", "status": "failed_to_resize", "shard": None, "offset": None, "nbytes": None}]
    no_success = write_manifest(run_dir / "manifests" / "failed.parquet", rows)
    with pytest.raises(ValueError, match=r"no readable image: 0 of 4 rows .*'failed_to_download': 3"):
        ManifestSource(no_success)
    no_shard = write_manifest(run_dir / "manifests" / "keys.parquet", [{"key": "a", "status": "success"}])
    with pytest.raises(ValueError, match="lacks the columns"):
        ManifestSource(no_shard)


def test_image_folder_source(tmp_path: Path) -> None:
    for relative, seed in [("cat/a.png", 0), ("dog/b.jpg", 1), ("dog/sub/c.PNG", 2)]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise_image(seed)).save(tmp_path / relative, format="PNG")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    source = ImageFolderSource(tmp_path)
    assert source.classes == ["cat", "dog"]
    assert [source.key(i) for i in range(len(source))] == ["cat/a.png", "dog/b.jpg", "dog/sub/c.PNG"]
    assert [source.label(i) for i in range(len(source))] == [0, 1, 1]
    np.testing.assert_array_equal(np.asarray(source.load(2)), noise_image(2))
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no image"):
        ImageFolderSource(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderSource(tmp_path / "missing")


# ---------------------------------------------------------------- sampler


def test_epoch_permutations_are_seeded_by_seed_plus_epoch() -> None:
    stream = EpochPermutations(10, seed=7)
    positions = np.arange(30)
    indices = stream[positions]
    for epoch in range(3):
        assert sorted(indices[epoch * 10 : epoch * 10 + 10]) == list(range(10))
    np.testing.assert_array_equal(indices[10:20], EpochPermutations(10, seed=8).permutation(0))
    assert not np.array_equal(indices[:10], indices[10:20])
    np.testing.assert_array_equal(EpochPermutations(10, seed=7)[positions[::-1]], indices[::-1])


def test_ranks_and_workers_partition_each_epoch() -> None:
    size, per_rank, world, workers = 48, 4, 2, 2
    sampler = MixtureSampler([size], per_rank * world, seed=3)
    iterations_per_epoch = size // (per_rank * world)  # 6, so 3 per worker
    for epoch in range(2):
        seen = []
        for rank in range(world):
            for worker in range(workers):
                stream = sampler.iterate(
                    rank=rank,
                    world_size=world,
                    worker=worker,
                    num_workers=workers,
                    start_iteration=epoch * iterations_per_epoch,
                )
                for _ in range(iterations_per_epoch // workers):
                    share = next(stream)
                    assert share.iteration % workers == worker
                    assert (share.positions % world == rank).all() and len(share.indices) == per_rank
                    seen += share.indices.tolist()
        assert sorted(seen) == list(range(size))


def test_sampler_is_deterministic_and_resumes_exactly() -> None:
    mixture = MixtureConfig(weights=(0.7, 0.3), p_homogeneous=0.3)
    reference = MixtureSampler([37, 11], 12, mixture, seed=5).iterate(rank=1, world_size=3)
    shares = [next(reference) for _ in range(60)]
    again = MixtureSampler([37, 11], 12, mixture, seed=5).iterate(rank=1, world_size=3)
    resumed = MixtureSampler([37, 11], 12, mixture, seed=5).iterate(rank=1, world_size=3, start_iteration=23)
    for expected in shares:
        actual = next(again)
        np.testing.assert_array_equal(actual.indices, expected.indices)
    for expected in shares[23:]:
        actual = next(resumed)
        assert actual.iteration == expected.iteration
        assert actual.homogeneous_source == expected.homogeneous_source
        np.testing.assert_array_equal(actual.sources, expected.sources)
        np.testing.assert_array_equal(actual.indices, expected.indices)
    other_seed = MixtureSampler([37, 11], 12, mixture, seed=6).batch(0)
    assert not np.array_equal(other_seed.indices, shares[0].indices)


def test_sources_are_read_as_contiguous_streams_across_chunks() -> None:
    """Source cursors carry over batches and composition chunks: no image skipped or repeated."""
    sizes, batch, n_iterations = [13, 7], 8, 1100  # crosses the 1024-iteration chunk boundary
    sampler = MixtureSampler(sizes, batch, MixtureConfig(weights=(0.6, 0.4), p_homogeneous=0.2), seed=1)
    drawn: list[list[int]] = [[], []]
    for iteration in range(n_iterations):
        share = sampler.batch(iteration)
        for source in range(2):
            drawn[source] += share.indices[share.sources == source].tolist()
    for source, size in enumerate(sizes):
        expected = EpochPermutations(size, 1 + source * 2**32)[np.arange(len(drawn[source]))]
        np.testing.assert_array_equal(drawn[source], expected)
    late = MixtureSampler(sizes, batch, sampler.mixture, seed=1).batch(n_iterations - 1)
    np.testing.assert_array_equal(late.indices, share.indices)


def test_mixing_proportions_and_homogeneous_batches() -> None:
    weights, homogeneous_weights, p_homogeneous = (0.5, 0.3, 0.2), (1.0, 0.0, 0.0), 0.2
    mixture = MixtureConfig(
        weights=weights, p_homogeneous=p_homogeneous, homogeneous_weights=homogeneous_weights
    )
    n_batches, batch = 3000, 16
    sampler = MixtureSampler([50, 30, 20], batch, mixture, seed=0)
    homogeneous, mixed_counts = 0, np.zeros(3)
    for iteration in range(n_batches):
        global_batch = sampler.batch(iteration)
        if global_batch.homogeneous_source is not None:
            homogeneous += 1
            assert global_batch.homogeneous_source == 0 and (global_batch.sources == 0).all()
        else:
            mixed_counts += np.bincount(global_batch.sources, minlength=3)
    assert abs(homogeneous / n_batches - p_homogeneous) < binomial_tolerance(p_homogeneous, n_batches)
    shares = mixed_counts / mixed_counts.sum()
    for share, weight in zip(shares, weights, strict=True):
        assert abs(share - weight) < binomial_tolerance(weight, int(mixed_counts.sum()))


# ---------------------------------------------------------------- augmentation


def to_pixels(view: torch.Tensor) -> torch.Tensor:
    """First channel of a normalised view back in 8-bit pixel units."""
    return view[0] * IMAGENET_STD[0] * 255 + IMAGENET_MEAN[0] * 255


def high_frequency_energy(pixels: torch.Tensor) -> float:
    return float((pixels.diff(dim=0) ** 2).mean() + (pixels.diff(dim=1) ** 2).mean())


def checkerboard(size: int = 32, square: int = 2) -> Image.Image:
    """Grey 2-pixel squares at 140 and 255: all above the solarisation threshold, so solarising maps
    every pixel v to 255 - v, an inversion that keeps the high-frequency energy."""
    y, x = np.mgrid[:size, :size]
    values = np.where((y // square + x // square) % 2 == 0, 140, 255).astype(np.uint8)
    return Image.fromarray(np.stack([values] * 3, axis=-1))


TINY = AugmentConfig(global_crop_size=32, local_crop_size=16, n_local_crops=3)


def test_number_and_shape_of_views() -> None:
    image = Image.fromarray(noise_image(0, size=48))
    views = MultiCropAugmentation(TINY)(image)
    assert set(views) == {"global_crops", "local_crops"}
    assert [tuple(v.shape) for v in views["global_crops"]] == [(3, 32, 32)] * 2
    assert [tuple(v.shape) for v in views["local_crops"]] == [(3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in views["global_crops"] + views["local_crops"])
    with_gram = MultiCropAugmentation(dataclasses.replace(TINY, gram_crop_factor=2.0))(image)
    assert [tuple(v.shape) for v in with_gram["gram_crops"]] == [(3, 64, 64)] * 2


def test_gram_view_has_the_global_crop_geometry_without_colour() -> None:
    plain = dataclasses.replace(
        TINY,
        color_jitter_p=0.0,
        grayscale_p=0.0,
        global1_blur_p=0.0,
        global2_solarize_p=0.0,
        global2_blur_p=0.0,
    )
    gram = MultiCropAugmentation(dataclasses.replace(plain, gram_crop_factor=2.0))
    image = Image.fromarray(np.asarray(Image.fromarray(noise_image(1, size=12)).resize((64, 64))))
    torch.manual_seed(0)
    for _ in range(10):
        views = gram(image)
        for global_crop, gram_crop in zip(views["global_crops"], views["gram_crops"], strict=True):
            downsized = F.resize(gram_crop, [32, 32], antialias=True)
            assert (downsized - global_crop).abs().mean() < 0.1 * global_crop.abs().mean()
        coloured = MultiCropAugmentation(dataclasses.replace(TINY, gram_crop_factor=2.0))(image)
        assert coloured["gram_crops"][0].shape == (3, 64, 64)


def test_realised_blur_and_solarisation_probabilities() -> None:
    """Per-view blur/solarise rates of the default config, measured on the views themselves."""
    # Colour distortion off so that only blur and solarisation change the pattern; sigma from 1 so
    # that every blur is visible (sigma near 0.1 leaves a 9-tap kernel almost an identity); global
    # crops of the whole image so that unblurred views keep the pattern's energy.
    config = dataclasses.replace(
        AugmentConfig(),
        global_crop_size=32,
        global_crop_scale=(1.0, 1.0),
        local_crop_size=16,
        local_crop_scale=(0.2, 0.3),
        n_local_crops=2,
        color_jitter_p=0.0,
        grayscale_p=0.0,
        blur_sigma=(1.0, 2.0),
    )
    image = checkerboard()
    reference = MultiCropAugmentation(
        dataclasses.replace(
            config, global1_blur_p=0.0, global2_blur_p=0.0, global2_solarize_p=0.0, local_blur_p=0.0
        )
    )
    torch.manual_seed(0)
    reference_energy = high_frequency_energy(to_pixels(reference(image)["global_crops"][0]))

    def is_blurred(view: torch.Tensor) -> bool:
        # Unblurred views keep > 40% of the energy (crop resampling), blurred ones < 5%.
        return high_frequency_energy(to_pixels(view)) < 0.2 * reference_energy

    def is_solarised(view: torch.Tensor) -> bool:
        return float(to_pixels(view).mean()) < 128  # the pattern's mean is about 197 before

    augmentation = MultiCropAugmentation(config)
    n_images = 400
    counts = {name: np.zeros(2) for name in ("global1", "global2", "local")}
    for _ in range(n_images):
        views = augmentation(image)
        named = [("global1", views["global_crops"][0]), ("global2", views["global_crops"][1])]
        named += [("local", view) for view in views["local_crops"]]
        for name, view in named:
            counts[name] += (is_blurred(view), is_solarised(view))
    expected = {"global1": (1.0, 0.0), "global2": (0.1, 0.2), "local": (0.5, 0.0)}
    for name, (blur_p, solarize_p) in expected.items():
        n_views = n_images * (config.n_local_crops if name == "local" else 1)
        blur_rate, solarize_rate = counts[name] / n_views
        assert abs(blur_rate - blur_p) < binomial_tolerance(blur_p, n_views), (name, blur_rate)
        assert abs(solarize_rate - solarize_p) < binomial_tolerance(solarize_p, n_views), (
            name,
            solarize_rate,
        )
    # The DINOv2/v3 public-code choice is one config change away and realised as written.
    inverted = MultiCropAugmentation(dataclasses.replace(config, global1_blur_p=0.0, global2_blur_p=0.9))
    blurred = np.array([[is_blurred(view) for view in inverted(image)["global_crops"]] for _ in range(100)])
    assert blurred[:, 0].sum() == 0 and abs(blurred[:, 1].mean() - 0.9) < binomial_tolerance(0.9, 100)


# ---------------------------------------------------------------- masking and collate


def test_block_masks_are_rectangles_before_random_completion() -> None:
    grid = (14, 14)
    blocks_only = BlockMaskGenerator(grid, BlockMaskConfig(complete_to_target=False))
    completed = BlockMaskGenerator(grid, BlockMaskConfig())
    scattered_components, block_components = 0, 0
    for seed in range(200):
        target = random.Random(seed).randint(20, 98)
        mask, blocks = blocks_only.blocks(target, random.Random(seed))
        union = np.zeros(grid, dtype=bool)
        for block in blocks:
            assert block.height * block.width <= blocks_only.max_block_patches
            union[block.top : block.top + block.height, block.left : block.left + block.width] = True
        np.testing.assert_array_equal(mask, union)
        assert mask.sum() <= target
        np.testing.assert_array_equal(blocks_only(target, random.Random(seed)), mask)
        full = completed(target, random.Random(seed))
        assert full.sum() == target and (full >= mask).all()  # completion only adds to the blocks
        block_components += count_components(mask)
        scattered = np.zeros(196, dtype=bool)
        scattered[random.Random(seed).sample(range(196), int(mask.sum()))] = True
        scattered_components += count_components(scattered.reshape(grid))
    assert block_components < 0.5 * scattered_components  # blocks cluster, random patches do not


def count_components(mask: np.ndarray) -> int:
    """4-connected components of a bool grid."""
    seen = np.zeros_like(mask)
    components = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        components += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return components


def test_mask_ratios_are_stratified_and_half_the_crops_masked() -> None:
    n_crops, grid, low, high = 16, (14, 14), 0.1, 0.5
    n_patches = grid[0] * grid[1]
    bounds = np.linspace(low, high, n_crops // 2 + 1)
    generator = torch.Generator().manual_seed(0)
    masked_slots = np.zeros(n_crops)
    n_draws = 200
    for _ in range(n_draws):
        masks = draw_masks(
            n_crops, grid, mask_ratio_range=(low, high), mask_probability=0.5, generator=generator
        )
        assert masks.shape == (n_crops, n_patches) and masks.dtype == torch.bool
        counts = masks.sum(dim=1).numpy()
        assert (counts > 0).sum() == n_crops // 2
        masked_slots += counts > 0
        ratios = np.sort(counts[counts > 0]) / n_patches
        assert (ratios >= np.floor(bounds[:-1] * n_patches) / n_patches).all()
        assert (ratios <= bounds[1:]).all()
    assert (np.abs(masked_slots / n_draws - 0.5) < binomial_tolerance(0.5, n_draws)).all()
    first = draw_masks(n_crops, grid, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, draw_masks(n_crops, grid, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(first, draw_masks(n_crops, grid, generator=torch.Generator().manual_seed(2)))


def test_collate_is_crop_major_with_mask_bookkeeping() -> None:
    n_images, n_local = 3, 2

    def sample(image: int) -> dict[str, list[torch.Tensor]]:
        return {
            "global_crops": [torch.full((3, 16, 16), 10.0 * view + image) for view in range(2)],
            "local_crops": [torch.full((3, 8, 8), 100.0 + 10 * view + image) for view in range(n_local)],
            "gram_crops": [torch.full((3, 32, 32), -10.0 * view - image) for view in range(2)],
        }

    batch = collate_multicrop(
        [sample(i) for i in range(n_images)],
        patch_size=4,
        mask_probability=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    assert batch["global_crops"].shape == (2 * n_images, 3, 16, 16)
    assert batch["local_crops"].shape == (n_local * n_images, 3, 8, 8)
    assert batch["gram_crops"].shape == (2 * n_images, 3, 32, 32)
    for view in range(2):
        for image in range(n_images):
            assert batch["global_crops"][view * n_images + image, 0, 0, 0] == 10 * view + image
            assert batch["gram_crops"][view * n_images + image, 0, 0, 0] == -10 * view - image
    for view in range(n_local):
        for image in range(n_images):
            assert batch["local_crops"][view * n_images + image, 0, 0, 0] == 100 + 10 * view + image
    masks = batch["masks"]
    assert masks.shape == (2 * n_images, 16) and (masks.sum(dim=1) > 0).sum() == 3
    assert torch.equal(batch["mask_indices"], masks.view(-1).nonzero().squeeze(1))
    assert torch.equal(batch["n_masked"], masks.sum(dim=1))
    crop_of_patch = batch["mask_indices"] // masks.shape[1]
    torch.testing.assert_close(batch["mask_weights"], 1.0 / batch["n_masked"][crop_of_patch].float())
    assert math.isclose(float(batch["mask_weights"].sum()), 3.0, rel_tol=1e-6)


# ---------------------------------------------------------------- dataset


def make_dataset(run_dir: Path, **overrides) -> PretrainDataset:
    config = AugmentConfig(global_crop_size=16, local_crop_size=8, n_local_crops=1)
    source = ManifestSource(run_dir / "manifests" / "pool")
    folder = run_dir / "folder"
    for i in range(3):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise_image(100 + i)).save(folder / f"class{i % 2}" / f"{i}.png")
    arguments = {
        "sources": [source, ImageFolderSource(folder)],
        "transform": MultiCropAugmentation(config),
        "collate": functools.partial(collate_multicrop, patch_size=4),
        "batch_size": 2,
        "mixture": MixtureConfig(weights=(0.5, 0.5), p_homogeneous=0.3),
        "seed": 11,
    }
    return PretrainDataset(**{**arguments, **overrides})


def assert_same_batches(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.keys() == want.keys() and got["iteration"] == want["iteration"]
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), key


def test_dataset_resumes_exactly_and_is_independent_of_workers(run_dir: Path) -> None:
    rng_state = torch.get_rng_state()
    stream = iter(make_dataset(run_dir))
    batches = [next(stream) for _ in range(6)]
    assert torch.equal(torch.get_rng_state(), rng_state)  # the trainer's generator is untouched
    assert [batch["iteration"] for batch in batches] == list(range(6))
    assert batches[0]["global_crops"].shape == (4, 3, 16, 16) and batches[0]["masks"].shape == (4, 16)
    assert batches[0]["local_crops"].shape == (2, 3, 8, 8) and batches[0]["source_ids"].shape == (2,)
    resumed = iter(make_dataset(run_dir, start_iteration=3).loader(num_workers=0))
    assert_same_batches([next(resumed) for _ in range(3)], batches[3:])
    workers = iter(make_dataset(run_dir).loader(num_workers=2))
    assert_same_batches([next(workers) for _ in range(6)], batches)


def test_dataset_ranks_build_their_share_of_each_global_batch(run_dir: Path) -> None:
    single = next(iter(make_dataset(run_dir, batch_size=4)))
    halves = [next(iter(make_dataset(run_dir, rank=rank, world_size=2))) for rank in range(2)]
    assert torch.equal(single["source_ids"][0::2], halves[0]["source_ids"])
    assert torch.equal(single["source_ids"][1::2], halves[1]["source_ids"])
    # Augmentations are keyed by global sample position, so they survive a change of world size.
    n_first = len(halves[0]["source_ids"])
    assert torch.equal(single["global_crops"][0], halves[0]["global_crops"][0])
    assert torch.equal(single["global_crops"][1], halves[1]["global_crops"][0])
    assert torch.equal(single["global_crops"][4], halves[0]["global_crops"][n_first])


def test_dataset_counts_skipped_corrupt_images(run_dir: Path) -> None:
    dataset = make_dataset(run_dir, mixture=MixtureConfig(weights=(1.0, 0.0)), batch_size=6)
    batch = next(iter(dataset))  # one epoch of the 6-row manifest, with its one corrupt image
    assert batch["n_skipped"] == 1 and batch["global_crops"].shape == (12, 3, 16, 16)
