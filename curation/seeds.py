"""The seed registry: named curated image sets that retrieval pulls the pool towards.

A name resolves to an ImageFolder root (one sub-folder of images per class) from, in order:
the file named by ``LVD_SEEDS_FILE`` (YAML ``name: path``), then the set's environment variable
(``IMAGENET_ROOT`` for ``imagenet``, ...). Datasets are never downloaded: a set that cannot be
found fails at once, naming what to set. Anything that is not a registered name is a path.
Each registered set carries its retrieval defaults (DINOv2, see docs/curation.md).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class SeedError(ValueError):
    """A seed set that cannot be used; the message says what to set or fix."""


@dataclass(frozen=True)
class SeedSet:
    name: str
    env_var: str | None  # where the root comes from when not in LVD_SEEDS_FILE
    retrieval: str  # "sample" (k nearest pool images per seed image) or "cluster"
    k: int = 4  # sample-based: neighbours per seed image
    cluster_min_seeds: int = 3  # cluster-based: a cluster needs more seed images than this
    cluster_max_images: int = 10_000  # cluster-based: images taken per kept cluster
    cap: int = 1_000_000  # images retrieved for this set at most
    root: Path | None = None

    def __post_init__(self) -> None:
        if self.retrieval not in ("sample", "cluster"):
            raise SeedError(f"seed set {self.name}: retrieval must be 'sample' or 'cluster', not {self.retrieval!r}")


REGISTRY: dict[str, SeedSet] = {
    s.name: s
    for s in (
        # ImageNet-1k is the core of LVD-142M: 32 neighbours per image.
        SeedSet("imagenet", "IMAGENET_ROOT", "sample", k=32),
        SeedSet("imagenet22k", "IMAGENET22K_ROOT", "sample", k=4),
        SeedSet("landmarks", "GLDV2_ROOT", "sample", k=4),
        # Small fine-grained sets are retrieved cluster-based, as in DINOv2.
        SeedSet("inaturalist", "INATURALIST_ROOT", "cluster"),
        SeedSet("food101", "FOOD101_ROOT", "cluster"),
        SeedSet("cars", "STANFORD_CARS_ROOT", "cluster"),
        SeedSet("aircraft", "FGVC_AIRCRAFT_ROOT", "cluster"),
        # The embedded demo web's seed set; the pipeline fills in its root after generating it.
        SeedSet("demo", None, "sample", k=8),
    )
}


def _seeds_file() -> dict[str, str]:
    path = os.environ.get("LVD_SEEDS_FILE")
    if not path:
        return {}
    if not Path(path).is_file():
        raise SeedError(f"LVD_SEEDS_FILE={path} is not a file")
    mapping = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(mapping, dict):
        raise SeedError(f"LVD_SEEDS_FILE={path} must map seed set names to ImageFolder paths")
    return {str(k): str(v) for k, v in mapping.items()}


def check_image_folder(root: Path, what: str) -> int:
    """Number of images in an ImageFolder; raises with the fix when there are none."""
    if not root.is_dir():
        raise SeedError(f"{what}: {root} is not a directory (expected one sub-folder of images per class)")
    count = sum(1 for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if count == 0:
        raise SeedError(f"{what}: {root} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class sub-folders")
    return count


def resolve(spec: str, demo_root: Path | None = None) -> SeedSet:
    """A registered name or a path to an ImageFolder, resolved to a SeedSet with its root."""
    if spec in REGISTRY:
        seed = REGISTRY[spec]
        if spec == "demo":
            if demo_root is None:
                raise SeedError("seed set 'demo' exists only in demo mode (no --urls): the pipeline generates it")
            root = demo_root
        else:
            configured = _seeds_file().get(spec) or (os.environ.get(seed.env_var) if seed.env_var else None)
            if not configured:
                raise SeedError(
                    f"seed set {spec!r} is not available here: set {seed.env_var} to its ImageFolder root "
                    f"(e.g. {seed.env_var}=/datasets/{spec}/train), or map {spec!r} to a path in the YAML file "
                    "named by LVD_SEEDS_FILE"
                )
            root = Path(configured)
        check_image_folder(root, f"seed set {spec!r}")
        return replace(seed, root=root)
    path = Path(spec)
    if not path.exists():
        close = difflib.get_close_matches(spec, REGISTRY, n=1)
        hint = f"; did you mean the registered set {close[0]!r}?" if close else ""
        raise SeedError(
            f"seed set {spec!r} is neither a registered name ({', '.join(sorted(REGISTRY))}) nor an existing path{hint}"
        )
    check_image_folder(path, f"seed set {spec!r}")
    return SeedSet(path.name or spec, None, "sample", root=path)
