"""Embed stage: every stored pool image becomes one L2-normalised vector, per pool part, on Ray Data.

An embedder is named by a spec string (``SPEC_HELP`` lists them): an open_clip image tower, a DINO
teacher exported by ``pretrain/train.py``, a TorchScript model (e.g. SSCD for copy detection) or the
weight-free PDQ descriptor. ``check_spec`` validates a spec cheaply in the driver, before any Ray
work; ``load_embedder`` builds it where it runs.

Run directory layout::

    RUN/embeddings/NAME/embedder.json        spec, dim, weights digest, versions (written first)
    RUN/embeddings/NAME/failed-NNNNN.parquet images of pool part NNNNN that did not decode (key, error)
    RUN/embeddings/NAME/part-NNNNN.parquet   embedding_schema(dim), one row per decoded image of
                                             pool part NNNNN; written last: the done marker

Actors read each image's bytes from its tar shard by offset, decode and preprocess them in threads,
and run the model on the batch; the driver gathers the vectors and writes each part once all its rows
are in. The driver holds the pending images' locations (~0.5 kB each) and every vector passes through
it: fine for a few million images per run on one node, not for a billion-image pool in one go.
"""

from __future__ import annotations

import abc
import difflib
import hashlib
import io
import json
import math
import os
import platform
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from curation import copy_descriptor, shape_descriptor
from curation.schemas import FAILED_SCHEMA, embedding_schema

SPEC_HELP = """valid embedder specs:
  open_clip:ARCH[:PRETRAINED]  open_clip image tower; PRETRAINED = hub tag, local weights file, or omitted (random init)
  dino:CHECKPOINT              teacher backbone exported by pretrain/train.py (OUTPUT_DIR/teacher_backbone.pt)
  torchscript:PATH[:SIZE]      TorchScript model on 3xSIZExSIZE ImageNet-normalised images (default 288, e.g. SSCD)
  pdq[:mirrored]               weight-free multi-scale PDQ copy-detection descriptor (256-d, CPU); :mirrored
                               describes the horizontally flipped images (PDQ is not flip-invariant)
  hog                          weight-free outline descriptor (300-d, CPU), a semantic
                               embedder for offline demos only, see curation/shape_descriptor.py"""
SCHEMES = ("open_clip", "dino", "torchscript", "pdq", "hog")
TORCHSCRIPT_DEFAULT_SIZE = 288  # SSCD's documented input size
# pretrain.data.augment's statistics, not imported from there: that module pulls in torchvision.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
RANDOM_INIT_SEED = 0  # random-init models must be the same in every actor and every rerun

_POOL_COLUMNS = ["key", "shard", "offset", "nbytes"]


class EmbedderError(ValueError):
    """An embedder spec that cannot be loaded: the message names the problem and the fix."""


class EmbedError(RuntimeError):
    """The embed stage cannot go on: the message says what to do; finished parts are kept."""


# ---------------------------------------------------------------- embedders


@dataclass(frozen=True)
class EmbedderInfo:
    """What the driver needs to know about a spec without loading the model."""

    name: str  # the spec with file paths made absolute: two runs with equal names embed alike
    dim: int
    image_size: int | None  # model input side; None: the embedder takes any size (pdq)
    weights: Path | None  # the weights file, whose digest guards a resumed run


class Embedder(abc.ABC):
    """Images -> (N, dim) float32 L2-normalised vectors. ``preprocess`` runs per image (in decode
    threads), ``embed_batch`` on a list of preprocessed items (the model step)."""

    def __init__(self, info: EmbedderInfo) -> None:
        self.name, self.dim, self.image_size = info.name, info.dim, info.image_size

    @abc.abstractmethod
    def preprocess(self, image: Image.Image) -> Any: ...

    @abc.abstractmethod
    def embed_batch(self, items: list[Any]) -> np.ndarray: ...

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.embed_batch([self.preprocess(image) for image in images])


class TorchEmbedder(Embedder):
    """A torch image model: fixed-size preprocessing, then a forward under inference mode (bf16
    autocast on CUDA) and L2 normalisation in float32."""

    def __init__(
        self,
        info: EmbedderInfo,
        model: torch.nn.Module,
        transform: Callable[[Image.Image], torch.Tensor],
        device: torch.device,
    ) -> None:
        super().__init__(info)
        self.model, self.transform, self.device = model, transform, device

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image.convert("RGB"))

    def embed_batch(self, items: list[torch.Tensor]) -> np.ndarray:
        batch = torch.stack(items).to(self.device)
        with (
            torch.inference_mode(),
            torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"),
        ):
            out = self.model(batch)
        out = F.normalize(out.float().flatten(1), dim=1)
        if out.shape[1] != self.dim:
            raise EmbedderError(f"{self.name} returned {out.shape[1]}-d vectors, expected {self.dim}")
        return out.cpu().numpy()


class PdqEmbedder(Embedder):
    """The multi-scale PDQ descriptor of ``curation.copy_descriptor`` (already unit vectors), of the
    image or of its mirror image: a flipped copy matches the original's mirrored descriptor."""

    def __init__(self, info: EmbedderInfo, mirrored: bool) -> None:
        super().__init__(info)
        self.mirrored = mirrored

    def preprocess(self, image: Image.Image) -> Image.Image:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.mirrored else image

    def embed_batch(self, items: list[Image.Image]) -> np.ndarray:
        return copy_descriptor.descriptors(items)


class HogEmbedder(Embedder):
    """The oriented-gradient descriptor of ``curation.shape_descriptor`` (already unit vectors)."""

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return shape_descriptor.preprocess(image)

    def embed_batch(self, items: list[torch.Tensor]) -> np.ndarray:
        return shape_descriptor.descriptors(torch.stack(items))


class ImageNetTransform:
    """PIL image -> (3, size, size) float32 tensor, bicubic resize and ImageNet normalisation; ``crop``:
    shorter side to ``size`` then centre crop (DINO evaluation style), else the whole frame squashed to
    size x size (SSCD's fixed-size preprocessing: a crop would hide edited borders from copy detection).
    PIL and numpy only, as torchvision does it: importing torchvision costs every actor ~2 s."""

    def __init__(self, size: int, crop: bool) -> None:
        self.size, self.crop = size, crop

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size, (width, height) = self.size, image.size
        if self.crop:
            short, long = (width, height) if width <= height else (height, width)
            scaled = (size, int(size * long / short))
            image = image.resize(scaled if width <= height else scaled[::-1], Image.Resampling.BICUBIC)
            left, top = round((image.width - size) / 2), round((image.height - size) / 2)
            image = image.crop((left, top, left + size, top + size))
        else:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy())


def _existing_file(path_text: str, what: str, spec: str) -> Path:
    path = Path(path_text).expanduser()
    if not path_text:
        raise EmbedderError(f"embedder spec {spec!r} names no {what} file\n{SPEC_HELP}")
    if not path.is_file():
        raise EmbedderError(
            f"embedder spec {spec!r}: {what} file {path} does not exist; pass the path of an existing file"
        )
    return path.resolve()


def _split_spec(spec: str) -> tuple[str, str]:
    scheme, _, argument = spec.partition(":")
    if scheme not in SCHEMES:
        raise EmbedderError(f"unknown embedder scheme {scheme!r} in spec {spec!r}\n{SPEC_HELP}")
    if scheme == "hog" and argument:
        raise EmbedderError(f"the hog embedder takes no argument, got {spec!r}; write 'hog'")
    if scheme == "pdq" and argument not in ("", "mirrored"):
        raise EmbedderError(f"the pdq embedder takes no argument but ':mirrored', got {spec!r}; write 'pdq'")
    return scheme, argument


# open_clip: the image tower of any architecture open_clip knows.


def _open_clip_parse(argument: str, spec: str) -> tuple[str, str | None, Path | None]:
    """(architecture, pretrained for open_clip, local weights file or None)."""
    import open_clip

    arch, _, pretrained = argument.partition(":")
    models = open_clip.list_models()
    if arch not in models:
        close = difflib.get_close_matches(arch, models, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise EmbedderError(
            f"embedder spec {spec!r}: open_clip has no architecture {arch!r}; {hint}"
            "open_clip.list_models() lists them"
        )
    if not pretrained:
        return arch, None, None
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained in tags:
        return arch, pretrained, None
    if Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser().resolve()
        return arch, str(path), path
    raise EmbedderError(
        f"embedder spec {spec!r}: {pretrained!r} is neither an existing weights file nor a pretrained tag of "
        f"{arch} (tags: {', '.join(tags) or 'none'}); pass a local weights file path or one of those tags"
    )


def _open_clip_info(arch: str, pretrained: str | None, weights: Path | None) -> EmbedderInfo:
    import open_clip

    config = open_clip.get_model_config(arch)
    size = config["vision_cfg"].get("image_size", 224)
    name = f"open_clip:{arch}" + (f":{pretrained}" if pretrained else "")
    return EmbedderInfo(
        name, int(config["embed_dim"]), int(size if isinstance(size, int) else size[0]), weights
    )


class _ImageTower(torch.nn.Module):
    """open_clip's ``visual`` alone (the text tower is dropped); CoCa's returns (pooled, tokens)."""

    def __init__(self, visual: torch.nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.visual(images)
        return out[0] if isinstance(out, tuple) else out


def _open_clip_load(argument: str, spec: str, device: torch.device) -> Embedder:
    import open_clip

    arch, pretrained, weights = _open_clip_parse(argument, spec)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    except Exception as err:  # open_clip raises bare RuntimeErrors for download and load failures alike
        if weights is not None:
            raise EmbedderError(
                f"embedder spec {spec!r}: weights file {weights} could not be loaded into {arch} "
                f"({err}); pass an open_clip checkpoint of this architecture"
            ) from err
        raise EmbedderError(
            f"embedder spec {spec!r}: the {pretrained!r} weights of {arch} could not be loaded ({err}). This machine "
            f"may be offline: download them where there is internet and pass the local file instead, "
            f"open_clip:{arch}:/path/to/open_clip_model.safetensors"
        ) from err
    tower = _ImageTower(model.visual).to(device).eval()
    return TorchEmbedder(_open_clip_info(arch, pretrained, weights), tower, transform, device)


# dino: a teacher backbone exported by pretrain/train.py.


def _dino_checkpoint(path: Path, spec: str, device: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model built from the checkpoint's config on ``device`` ('meta': no memory) and the weights,
    checked key by key and shape by shape against it."""
    from pretrain.models import build_vit

    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # pickle, zip and mmap errors: anything means "not a torch file we can read"
        raise EmbedderError(
            f"embedder spec {spec!r}: {path} is not a readable torch checkpoint ({err}); "
            "pass OUTPUT_DIR/teacher_backbone.pt from pretrain/train.py"
        ) from err
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise EmbedderError(
            f"embedder spec {spec!r}: {path} lacks the 'config' and 'state_dict' entries of a teacher export "
            f"(found {found}); pass OUTPUT_DIR/teacher_backbone.pt from pretrain/train.py, or save "
            "{'config': build_vit keyword arguments incl. 'name', 'state_dict': backbone weights}"
        )
    config, state_dict = dict(checkpoint["config"]), checkpoint["state_dict"]
    try:
        with torch.device(device):
            model = build_vit(**config)
    except (ValueError, TypeError) as err:
        raise EmbedderError(
            f"embedder spec {spec!r}: the config in {path} does not build a backbone: {err}"
        ) from err
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state_dict.items()}
    mismatches = {
        "missing": sorted(set(expected) - set(found)),
        "unexpected": sorted(set(found) - set(expected)),
        "wrong shape": [
            f"{n} {found[n]} vs {expected[n]}"
            for n in sorted(set(expected) & set(found))
            if found[n] != expected[n]
        ],
    }
    if any(mismatches.values()):
        details = "; ".join(
            f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
            for label, names in mismatches.items()
            if names
        )
        raise EmbedderError(
            f"embedder spec {spec!r}: the weights in {path} do not fit the {config.get('name')!r} backbone its "
            f"config describes ({details}); re-export the checkpoint from the run that trained it"
        )
    return model, state_dict


def _dino_info(path: Path, model: torch.nn.Module) -> EmbedderInfo:
    # The learned position grid's reference size (the export's img_size) is the embedding input size.
    return EmbedderInfo(f"dino:{path}", model.embed_dim, model.ref_grid[0] * model.patch_size, path)


def _dino_load(argument: str, spec: str, device: torch.device) -> Embedder:
    path = _existing_file(argument, "checkpoint", spec)
    model, state_dict = _dino_checkpoint(path, spec, "cpu")
    model.load_state_dict(state_dict)
    info = _dino_info(path, model)
    return TorchEmbedder(info, model.to(device).eval(), ImageNetTransform(info.image_size, crop=True), device)


# torchscript: any scripted or traced model taking ImageNet-normalised images.


def _torchscript_parse(argument: str, spec: str) -> tuple[Path, int]:
    path_text, _, size_text = argument.rpartition(":")
    if not path_text or not size_text.isdigit():  # no ":SIZE" suffix
        path_text, size_text = argument, str(TORCHSCRIPT_DEFAULT_SIZE)
    size = int(size_text)
    if not 16 <= size <= 4096:
        raise EmbedderError(f"embedder spec {spec!r}: input size {size} is out of range; use e.g. :288")
    return _existing_file(path_text, "TorchScript model", spec), size


def _torchscript_module(path: Path, spec: str, device: torch.device) -> torch.jit.ScriptModule:
    try:
        # torch.jit.load is deprecated for new models, but SSCD is published only as TorchScript.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except Exception as err:  # torch.jit.load raises RuntimeError or ValueError for non-TorchScript files
        raise EmbedderError(
            f"embedder spec {spec!r}: {path} is not a TorchScript model ({err}); "
            "save one with torch.jit.save(torch.jit.script(model), path)"
        ) from err


def _torchscript_info(argument: str, spec: str) -> EmbedderInfo:
    """Runs the model once on a blank image: the output size is the dimension."""
    path, size = _torchscript_parse(argument, spec)
    module = _torchscript_module(path, spec, torch.device("cpu"))
    try:
        with torch.inference_mode():
            out = module(torch.zeros(1, 3, size, size))
    except Exception as err:  # whatever the scripted code raises for this input
        raise EmbedderError(
            f"embedder spec {spec!r}: {path} fails on a 1x3x{size}x{size} input ({err}); "
            "pass the input size it expects as torchscript:PATH:SIZE"
        ) from err
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EmbedderError(
            f"embedder spec {spec!r}: {path} must return one (batch, dim) tensor, got {shape}"
        )
    return EmbedderInfo(f"torchscript:{path}:{size}", int(out.shape[1]), size, path)


def _torchscript_load(argument: str, spec: str, device: torch.device) -> Embedder:
    info = _torchscript_info(argument, spec)
    module = _torchscript_module(info.weights, spec, device)
    return TorchEmbedder(info, module, ImageNetTransform(info.image_size, crop=False), device)


def check_spec(spec: str) -> EmbedderInfo:
    """Validate a spec without building the model (a TorchScript model runs once on CPU): raises
    ``EmbedderError`` for anything ``load_embedder`` would fail on."""
    scheme, argument = _split_spec(spec)
    if scheme == "open_clip":
        return _open_clip_info(*_open_clip_parse(argument, spec))
    if scheme == "dino":
        path = _existing_file(argument, "checkpoint", spec)
        return _dino_info(path, _dino_checkpoint(path, spec, "meta")[0])
    if scheme == "torchscript":
        return _torchscript_info(argument, spec)
    if scheme == "hog":
        return EmbedderInfo(spec, shape_descriptor.DIM, shape_descriptor.SIDE, None)
    return EmbedderInfo(spec, copy_descriptor.DIM, None, None)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_embedder(spec: str, device: str = "auto") -> Embedder:
    """Build the embedder a spec names, on ``device`` ('auto': CUDA when there is one); pdq and hog are
    CPU only."""
    scheme, argument = _split_spec(spec)
    if scheme == "open_clip":
        return _open_clip_load(argument, spec, resolve_device(device))
    if scheme == "dino":
        return _dino_load(argument, spec, resolve_device(device))
    if scheme == "torchscript":
        return _torchscript_load(argument, spec, resolve_device(device))
    if scheme == "hog":
        return HogEmbedder(check_spec(spec))
    return PdqEmbedder(check_spec(spec), mirrored=argument == "mirrored")


# ---------------------------------------------------------------- the stage


@dataclass(frozen=True)
class EmbedConfig:
    spec: str
    batch_size: int = 32
    num_actors: int | None = None  # None: one per GPU, or one per `ceil(cpus_per_actor)` CPUs without GPUs
    # Fractional so that a 2-core machine keeps a CPU for Ray Data itself. Each actor decodes and
    # (on CPU) runs torch with ceil(cpus_per_actor) threads: raise it on GPU nodes to feed the GPU.
    cpus_per_actor: float = 0.5
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs (pdq, hog: always 0)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise EmbedError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.num_actors is not None and self.num_actors < 1:
            raise EmbedError(f"num_actors must be at least 1 (or None for auto), got {self.num_actors}")
        if self.cpus_per_actor <= 0:
            raise EmbedError(f"cpus_per_actor must be positive, got {self.cpus_per_actor}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise EmbedError(f"gpus_per_actor must be >= 0 (or None for auto), got {self.gpus_per_actor}")


@dataclass
class EmbedResult:
    out_dir: Path
    spec: str
    dim: int
    parts_total: int
    parts_skipped: int
    images: int = 0  # embedded by this run
    seconds: float = 0.0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, error) of images that did not decode
    # From the start of the Ray work until the first batch came back (actors started, model loaded,
    # one forward): the fixed cost of a run. None: there was nothing to embed.
    startup_seconds: float | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        startup = (
            f" (first batch after {self.startup_seconds:.1f} s)" if self.startup_seconds is not None else ""
        )
        failed = f"; {len(self.failed)} failed to decode (failed-*.parquet)" if self.failed else ""
        return (
            f"embed {self.spec} ({self.dim}-d): {self.parts_total} parts ({self.parts_skipped} already done, "
            f"skipped); this run: {self.images} images in {self.seconds:.1f} s = "
            f"{self.images_per_second:.1f} img/s{startup}{failed}"
        )


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


class _EmbedBatches:
    """Ray Data actor: reads a batch's JPEGs from the tar shards by offset, decodes and preprocesses
    them in threads, and runs the model on those that decoded. A shard that cannot be read marks its
    rows ``unreadable``; an image that does not decode gets an ``error``; neither raises."""

    def __init__(self, spec: str, run_dir: str, device: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.embedder = load_embedder(spec, device)
        self.run_dir = Path(run_dir)
        self.threads = ThreadPoolExecutor(threads)

    def _read(
        self, shards: list[str], offsets: list[int], sizes: list[int]
    ) -> tuple[list[bytes | None], list[str | None]]:
        data: list[bytes | None] = [None] * len(shards)
        unreadable: list[str | None] = [None] * len(shards)
        rows_of: dict[str, list[int]] = defaultdict(list)
        for row, shard in enumerate(shards):
            rows_of[shard].append(row)
        for shard, rows in rows_of.items():
            try:
                with open(self.run_dir / shard, "rb") as tar:
                    for row in rows:
                        tar.seek(offsets[row])
                        data[row] = tar.read(sizes[row])
                        if len(data[row]) != sizes[row]:
                            raise EOFError("truncated: shorter than the pool manifest says")
            except (OSError, EOFError) as err:
                for row in rows:
                    data[row], unreadable[row] = None, f"{shard}: {err}"
        return data, unreadable

    def _prepare(self, data: bytes | None) -> tuple[Any, str | None]:
        if data is None:
            return None, None
        try:
            return self.embedder.preprocess(_decode(data)), None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # what PIL raises
            return None, f"{type(err).__name__}: {err}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        data, unreadable = self._read(
            batch.column("shard").to_pylist(),
            batch.column("offset").to_pylist(),
            batch.column("nbytes").to_pylist(),
        )
        prepared = list(self.threads.map(self._prepare, data))
        ok = [row for row, (item, _) in enumerate(prepared) if item is not None]
        vectors = np.zeros((batch.num_rows, self.embedder.dim), dtype=np.float32)
        if ok:
            vectors[ok] = self.embedder.embed_batch([prepared[row][0] for row in ok])
        return pa.table(
            {
                "key": batch.column("key"),
                "part": batch.column("part"),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), self.embedder.dim),
                "error": pa.array([error for _, error in prepared], pa.string()),
                "unreadable": pa.array(unreadable, pa.string()),
            }
        )


def _atomic_write(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _versions(spec: str) -> dict[str, str]:
    packages = {"open_clip": "open_clip_torch", "pdq": "pdqhash"}
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    package = packages.get(spec.partition(":")[0])
    if package:
        versions[package] = metadata.version(package)
    return versions


def _claim(out_dir: Path, info: EmbedderInfo) -> None:
    """Write embedder.json, or check that the folder was embedded with the same spec and weights."""
    record = {
        "spec": info.name,
        "dim": info.dim,
        "image_size": info.image_size,
        "weights_sha256": _file_sha256(info.weights) if info.weights else None,
    }
    path = out_dir / "embedder.json"
    if path.exists() or any(out_dir.glob("part-*.parquet")):
        found = json.loads(path.read_text()) if path.exists() else {"spec": "unknown (no embedder.json)"}
        if {k: found.get(k) for k in record} != record:
            what = "different weights in the same file" if found.get("spec") == info.name else found["spec"]
            raise EmbedError(
                f"{out_dir} holds embeddings made with {what}; this run asks for {info.name}. "
                "Use another embedding name, or delete that folder to embed it again"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**record, "versions": _versions(info.name)}, indent=2) + "\n")
    os.replace(tmp, path)


def _pending_rows(part: Path, index: int) -> pa.Table:
    table = pq.read_table(part, columns=[*_POOL_COLUMNS, "status"])
    table = table.filter(pc.equal(table.column("status"), "success")).select(_POOL_COLUMNS)
    return table.append_column("part", pa.array(np.full(table.num_rows, index, dtype=np.int32)))


def _actors(config: EmbedConfig, scheme: str, blocks: int) -> tuple[int, float, int, str]:
    """(actors, GPUs per actor, threads per actor, device) for this cluster."""
    import ray

    resources = ray.cluster_resources()
    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if scheme in ("pdq", "hog"):
        gpus = 0.0
    threads = max(1, math.ceil(config.cpus_per_actor))
    actors = config.num_actors
    if actors is None:
        actors = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1) // threads)
    return max(1, min(actors, blocks)), gpus, threads, "cuda" if gpus else "cpu"


def _split_parts(block: pa.Table) -> Iterator[tuple[int, pa.Table]]:
    parts = block.column("part")
    for index in pc.unique(parts).to_pylist():
        yield index, block.filter(pc.equal(parts, index))


def _finish_part(pieces: list[pa.Table], path: Path, dim: int) -> tuple[list[tuple[str, str]], list[str]]:
    """Write one part (failures first, the part last); returns its decode failures, or the shards
    that could not be read (then nothing is written)."""
    table = pa.concat_tables(pieces)
    unreadable = sorted(set(pc.drop_null(table.column("unreadable")).to_pylist()))
    if unreadable:
        return [], unreadable
    failed = table.filter(pc.is_valid(table.column("error")))
    if failed.num_rows:
        failures = failed.select(["key", "error"]).sort_by("key").cast(FAILED_SCHEMA)
        _atomic_write(failures, path.with_name(path.name.replace("part-", "failed-")))
    done = table.filter(pc.is_null(table.column("error"))).select(["key", "embedding"]).sort_by("key")
    _atomic_write(done.cast(embedding_schema(dim)), path)
    return list(zip(failed.column("key").to_pylist(), failed.column("error").to_pylist())), []


def run_embed(
    run_dir: Path, name: str, config: EmbedConfig, ray_address: str | None = None, progress: bool = True
) -> EmbedResult:
    """Embed every stored pool image of ``run_dir`` into RUN/embeddings/NAME; resumes finished parts.
    ``progress``: a bar over images whose last line gives the rate; ``summary()`` of the result says
    the rest."""
    start = time.perf_counter()
    if not name or Path(name).name != name or name.startswith("."):
        raise EmbedError(f"embedding name {name!r} must be a plain folder name, e.g. 'dinov2' or 'sscd'")
    info = check_spec(config.spec)
    run_dir = Path(run_dir).resolve()
    pool_parts = sorted((run_dir / "manifests" / "pool").glob("part-*.parquet"))
    if not pool_parts:
        raise EmbedError(f"{run_dir} has no pool manifest yet: run the ingest first")
    out_dir = run_dir / "embeddings" / name
    _claim(out_dir, info)
    todo = [part for part in pool_parts if not (out_dir / part.name).exists()]
    tables = [_pending_rows(part, index) for index, part in enumerate(todo)]
    for part, table in zip(todo, tables):
        if table.num_rows == 0:  # nothing stored in this shard: done at once
            _atomic_write(embedding_schema(info.dim).empty_table(), out_dir / part.name)
    result = EmbedResult(out_dir, info.name, info.dim, len(pool_parts), len(pool_parts) - len(todo))
    bad_shards = {}
    if any(table.num_rows for table in tables):
        bad_shards = _embed_parts(
            run_dir, [out_dir / p.name for p in todo], tables, info, config, ray_address, progress, result
        )
    result.seconds = time.perf_counter() - start
    if bad_shards:
        lines = [f"  pool part {part}: {', '.join(errors)}" for part, errors in sorted(bad_shards.items())]
        raise EmbedError(
            f"{len(bad_shards)} pool parts could not be read from their tar shards (missing or truncated); the other "
            "parts are finished and kept. Rerun the ingest for these shards (delete their pool part under "
            "manifests/pool/ and run the ingest again), then rerun the embedding:\n" + "\n".join(lines)
        )
    return result


def _embed_parts(
    run_dir: Path,
    outputs: list[Path],
    tables: list[pa.Table],
    info: EmbedderInfo,
    config: EmbedConfig,
    ray_address: str | None,
    progress: bool,
    result: EmbedResult,
) -> dict[str, list[str]]:
    """Run the actors over every pending row; write each part as soon as all its rows are back.
    Counts into ``result``; returns the unreadable shards by pool part."""
    import ray
    from tqdm import tqdm

    from curation.ray_runtime import init_ray

    started = time.perf_counter()
    init_ray(ray_address)
    rows = pa.concat_tables(tables).to_pylist()
    blocks = -(-len(rows) // config.batch_size)
    actors, gpus, threads, device = _actors(config, info.name.partition(":")[0], blocks)
    # from_items builds block metadata here; from_arrow would first wait for a worker to compute it.
    dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        _EmbedBatches,
        fn_constructor_args=(info.name, str(run_dir), device, threads),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=gpus,
    )
    dataset.context.enable_progress_bars = False
    dataset.context.print_on_execution_start = False
    expected = {index: table.num_rows for index, table in enumerate(tables)}
    pieces: dict[int, list[pa.Table]] = defaultdict(list)
    received: dict[int, int] = defaultdict(int)
    bad_shards: dict[str, list[str]] = {}
    bar = tqdm(
        total=sum(expected.values()),
        unit="img",
        desc=f"embed {Path(outputs[0]).parent.name}",
        disable=not progress,
        smoothing=0,
    )
    try:
        for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            if result.startup_seconds is None:
                result.startup_seconds = time.perf_counter() - started
            for index, piece in _split_parts(block):
                pieces[index].append(piece)
                received[index] += piece.num_rows
                if received[index] == expected[index]:
                    part_failed, unreadable = _finish_part(pieces.pop(index), outputs[index], info.dim)
                    result.failed += part_failed
                    if unreadable:
                        bad_shards[outputs[index].name] = unreadable
                    else:
                        result.images += expected[index] - len(part_failed)
            bar.update(block.num_rows)
    # Ray wraps what failed in an actor (model load, out of memory): say how to go on.
    except Exception as err:
        raise EmbedError(f"embedding stopped: {err}\nFinished parts are kept; rerun to resume") from err
    finally:
        bar.close()
    return bad_shards


def read_embeddings(run_dir: Path, name: str) -> tuple[list[str], np.ndarray]:
    """(keys sorted, (N, dim) float32) of a finished embedding run, for the later stages."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "embeddings" / name
    parts = sorted(out_dir.glob("part-*.parquet"))
    pool = {p.name for p in (run_dir / "manifests" / "pool").glob("part-*.parquet")}
    missing = sorted(pool - {p.name for p in parts})
    if not parts or missing:
        raise EmbedError(
            f"embeddings {name!r} of {run_dir} are not finished ({len(missing)} of {len(pool)} pool "
            "parts missing): run the embed stage (it resumes)"
        )
    table = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("key")
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return table.column("key").to_pylist(), np.ascontiguousarray(vectors, dtype=np.float32)


def embeddings_fingerprint(run_dir: Path, name: str) -> str:
    """A digest of what the later stages read from an embedding run: its embedder.json and the name,
    size and modification time of every part. Their stamps include it, so re-embedding (a new
    descriptor version, other weights under the same path) redoes them."""
    out_dir = Path(run_dir) / "embeddings" / name
    digest = hashlib.sha256((out_dir / "embedder.json").read_bytes())
    for part in sorted(out_dir.glob("part-*.parquet")):
        status = part.stat()
        digest.update(f"{part.name} {status.st_size} {status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


__all__ = [
    "SPEC_HELP",
    "EmbedConfig",
    "EmbedError",
    "EmbedResult",
    "Embedder",
    "EmbedderError",
    "EmbedderInfo",
    "check_spec",
    "load_embedder",
    "embeddings_fingerprint",
    "read_embeddings",
    "run_embed",
]
