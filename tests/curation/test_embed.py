"""Embed stage: embedders chosen by spec, one L2-normalised vector per stored pool image, resume,
and failures that say what to do."""

from __future__ import annotations

import io
import json
import shutil
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curation.decode import ImageConfig
from curation.embed import (
    SPEC_HELP,
    EmbedConfig,
    EmbedderError,
    EmbedError,
    check_spec,
    embeddings_fingerprint,
    load_embedder,
    read_embeddings,
    run_embed,
)
from curation.fetch import FetchPolicy
from curation.ingest import IngestConfig, read_pool, run_ingest
from curation.schemas import embedding_schema
from pretrain.models import build_vit

TEACHER_CONFIG = {"name": "vit_test", "img_size": 64}  # as pretrain/train.py exports it: build_vit kwargs


@pytest.fixture(scope="module")
def run_dir(ray_session, demo_urls, tmp_path_factory) -> Path:
    """A demo ingest of the URLs planted to succeed (the broken ones only cost time here): 5 parts."""
    urls, truth = demo_urls
    truth = pq.read_table(truth)
    stored = truth.filter(pc.equal(truth.column("expected_status"), "success")).column("url")
    table = pq.read_table(urls)
    good = tmp_path_factory.mktemp("embed_input") / "urls.parquet"
    pq.write_table(table.filter(pc.is_in(table.column("url"), value_set=stored)), good)
    run = tmp_path_factory.mktemp("embed_run")
    run_ingest(
        IngestConfig(
            urls=good,
            run_dir=run,
            samples_per_shard=40,
            threads_per_shard=8,
            cpus_per_shard=0.5,
            timeout_s=2.0,
            image=ImageConfig(image_size=128),
            policy=FetchPolicy(allowed_networks=("127.0.0.1/32",)),
        ),
        progress=False,
    )
    return run


def save_teacher(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save({"config": TEACHER_CONFIG, "state_dict": build_vit(**TEACHER_CONFIG).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher_backbone.pt")


@pytest.fixture(scope="module")
def pdq_run(run_dir):
    return run_embed(run_dir, "pdq", EmbedConfig("pdq", batch_size=16), progress=False)


def stored(run_dir: Path) -> pa.Table:
    pool = read_pool(run_dir)
    return pool.filter(pc.equal(pool.column("status"), "success")).sort_by("key")


def decode(run_dir: Path, row: dict) -> Image.Image:
    with open(run_dir / row["shard"], "rb") as f:
        f.seek(row["offset"])
        return Image.open(io.BytesIO(f.read(row["nbytes"])))


def test_one_unit_vector_per_stored_image(run_dir, pdq_run):
    keys, vectors = read_embeddings(run_dir, "pdq")
    pool = stored(run_dir)
    assert keys == pool.column("key").to_pylist() and pdq_run.images == len(keys) > 100
    assert vectors.dtype == np.float32 and vectors.shape == (len(keys), 256)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    parts = sorted((pdq_run.out_dir).glob("part-*.parquet"))
    assert [p.name for p in parts] == sorted(p.name for p in (run_dir / "manifests" / "pool").glob("part-*"))
    assert all(pq.read_schema(p) == embedding_schema(256) for p in parts)
    record = json.loads((pdq_run.out_dir / "embedder.json").read_text())
    assert record["spec"] == "pdq" and record["dim"] == 256 and "pdqhash" in record["versions"]
    assert pdq_run.parts_total == len(parts) and pdq_run.failed == [] and "img/s" in pdq_run.summary()
    assert 0 < pdq_run.startup_seconds < pdq_run.seconds


def test_exact_duplicates_get_identical_pdq_vectors(run_dir, pdq_run):
    keys, vectors = read_embeddings(run_dir, "pdq")
    rows = {key: row for row, key in enumerate(keys)}
    by_hash = defaultdict(list)
    for row in stored(run_dir).select(["key", "sha256"]).to_pylist():
        by_hash[row["sha256"]].append(rows[row["key"]])
    groups = [members for members in by_hash.values() if len(members) > 1]
    assert len(groups) >= 5
    for members in groups:
        np.testing.assert_array_equal(
            vectors[members], np.broadcast_to(vectors[members[0]], (len(members), 256))
        )


def test_resume_recomputes_only_the_missing_part(run_dir, pdq_run):
    parts = {p.name: p.stat().st_mtime_ns for p in pdq_run.out_dir.glob("part-*.parquet")}
    victim = pdq_run.out_dir / "part-00002.parquet"
    before = pq.read_table(victim)
    victim.unlink()
    again = run_embed(run_dir, "pdq", EmbedConfig("pdq", batch_size=16), progress=False)
    assert (again.parts_skipped, again.images) == (len(parts) - 1, before.num_rows)
    after = {p.name: p.stat().st_mtime_ns for p in pdq_run.out_dir.glob("part-*.parquet")}
    assert [n for n in parts if after[n] != parts[n]] == [victim.name]
    assert pq.read_table(victim).equals(before)  # the same vectors, bit for bit
    finished = run_embed(run_dir, "pdq", EmbedConfig("pdq"), progress=False)
    assert (finished.parts_skipped, finished.images, finished.startup_seconds) == (len(parts), 0, None)


def test_dino_stage_matches_the_embedder_on_the_same_images(run_dir, teacher):
    spec = f"dino:{teacher}"
    result = run_embed(run_dir, "dino", EmbedConfig(spec, batch_size=32), progress=False)
    keys, vectors = read_embeddings(run_dir, "dino")
    assert vectors.shape == (len(stored(run_dir)), 48) and result.dim == 48
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sample = stored(run_dir).slice(0, 24).to_pylist()
    direct = load_embedder(spec, "cpu").embed([decode(run_dir, row) for row in sample])
    np.testing.assert_allclose(vectors[: len(sample)], direct, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])  # a random teacher still tells images apart


def _failed_only_run(run_dir: Path, tmp_path: Path) -> Path:
    """A run whose one pool part stored nothing: the stage finishes it without starting any actor."""
    run = tmp_path / "run"
    (run / "manifests" / "pool").mkdir(parents=True)
    part = pq.read_table(run_dir / "manifests" / "pool" / "part-00000.parquet")
    status = part.schema.get_field_index("status")
    part = part.set_column(status, "status", pa.array(["failed"] * part.num_rows))
    pq.write_table(part, run / "manifests" / "pool" / "part-00000.parquet")
    return run


def test_resume_with_another_spec_or_changed_weights_is_refused(run_dir, tmp_path):
    run = _failed_only_run(run_dir, tmp_path)
    teacher = save_teacher(tmp_path / "teacher.pt")
    done = run_embed(run, "main", EmbedConfig(f"dino:{teacher}"), progress=False)
    assert (
        done.images == 0 and pq.read_table(run / "embeddings" / "main" / "part-00000.parquet").num_rows == 0
    )
    with pytest.raises(
        EmbedError, match=r"holds embeddings made with dino:.*asks for pdq.*another embedding name"
    ):
        run_embed(run, "main", EmbedConfig("pdq"), progress=False)
    save_teacher(teacher, seed=1)  # retrained in place: same spec, other weights
    with pytest.raises(EmbedError, match="different weights in the same file.*delete that folder"):
        run_embed(run, "main", EmbedConfig(f"dino:{teacher}"), progress=False)


def test_corrupt_image_is_recorded_and_a_missing_shard_stops_with_its_name(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir / "manifests" / "pool", run / "manifests" / "pool")
    shutil.copytree(run_dir / "images", run / "images", ignore=shutil.ignore_patterns("*.parquet", "*.json"))
    pool = stored(run)
    broken = pool.filter(pc.equal(pool.column("shard"), "images/00000.tar")).to_pylist()[3]
    with open(run / broken["shard"], "r+b") as f:  # overwrite the JPEG's header: undecodable
        f.seek(broken["offset"])
        f.write(b"\0" * 64)
    (run / "images" / "00003.tar").unlink()
    with open(run / "images" / "00004.tar", "r+b") as f:
        f.truncate(2048)
    with pytest.raises(EmbedError) as caught:
        run_embed(run, "pdq", EmbedConfig("pdq", batch_size=16), progress=False)
    message = str(caught.value)
    assert "images/00003.tar" in message and "images/00004.tar" in message and "truncated" in message
    assert "rerun the ingest" in message.lower() and "part-00003.parquet" in message
    out = run / "embeddings" / "pdq"
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]
    failed = pq.read_table(out / "failed-00000.parquet").to_pylist()
    assert [row["key"] for row in failed] == [broken["key"]] and "cannot identify" in failed[0]["error"]
    part = pq.read_table(out / "part-00000.parquet")
    assert broken["key"] not in part.column("key").to_pylist()
    assert part.num_rows == pool.filter(pc.equal(pool.column("shard"), "images/00000.tar")).num_rows - 1


class _TinyCopyModel(torch.nn.Module):
    """Stands in for an SSCD TorchScript file: images -> (B, 8), or feature maps when ``maps``."""

    def __init__(self, maps: bool) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.maps = maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        return features if self.maps else features.mean(dim=(2, 3))


def _tiny_scripted(path: Path, maps: bool = False) -> Path:
    torch.manual_seed(0)
    with (
        warnings.catch_warnings()
    ):  # torch.jit.script is deprecated for new code; SSCD ships TorchScript files
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(_TinyCopyModel(maps)), str(path))
    return path


def test_mirrored_pdq_describes_the_flipped_image():
    image = Image.linear_gradient("L").convert("RGB").resize((160, 120))
    image.paste((255, 0, 0), (10, 10, 60, 50))
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    plain, mirrored = load_embedder("pdq"), load_embedder("pdq:mirrored")
    assert (mirrored.name, mirrored.dim) == ("pdq:mirrored", 256)
    np.testing.assert_array_equal(mirrored.embed([image]), plain.embed([flipped]))
    assert (plain.embed([image]) @ plain.embed([flipped]).T)[0, 0] < 0.9  # PDQ alone misses flips


def test_torchscript_embedder(tmp_path):
    model = _tiny_scripted(tmp_path / "sscd.pt")
    assert check_spec(f"torchscript:{model}").image_size == 288
    embedder = load_embedder(f"torchscript:{model}:32", "cpu")
    assert (embedder.dim, embedder.image_size, embedder.name) == (8, 32, f"torchscript:{model}:32")
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("L", (16, 50), 90)]
    vectors = embedder.embed(images)
    assert vectors.shape == (2, 8) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_open_clip_random_init_uses_the_image_tower_and_is_reproducible():
    first, second = (load_embedder("open_clip:ViT-S-32", "cpu") for _ in range(2))
    assert (first.dim, first.image_size) == (384, 224)
    assert {name.split(".")[0] for name, _ in first.model.named_parameters()} == {"visual"}  # no text tower
    images = [Image.new("RGB", (300, 200), (10, 120, 240)), Image.new("RGB", (64, 64), (250, 250, 0))]
    vectors = first.embed(images)
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, second.embed(images), atol=1e-6)


def test_open_clip_hub_tag_offline_says_to_pass_a_local_file(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, no retries
    assert check_spec("open_clip:RN50:openai").dim == 1024  # a known tag passes the cheap check
    with pytest.raises(
        EmbedderError, match=r"could not be loaded.*may be offline.*local file.*open_clip:RN50:/"
    ):
        load_embedder("open_clip:RN50:openai", "cpu")


def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    torch.save({"model": build_vit(**TEACHER_CONFIG).state_dict()}, tmp_path / "no_keys.pt")
    torch.save({"config": {"name": "vit_huge"}, "state_dict": {}}, tmp_path / "bad_name.pt")
    torch.save(
        {
            "config": {**TEACHER_CONFIG, "n_registers": 4},
            "state_dict": build_vit(**TEACHER_CONFIG).state_dict(),
        },
        tmp_path / "mismatch.pt",
    )
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"not": "scripted"}, tmp_path / "pickle.pt")
    _tiny_scripted(tmp_path / "maps.pt", maps=True)
    return {p.stem: p for p in tmp_path.iterdir()}


BAD_SPECS = [
    (
        "clip:ViT-B-32",
        r"(?s)unknown embedder scheme 'clip'.*valid embedder specs:.*open_clip:ARCH.*dino:.*torchscript:.*pdq",
    ),
    ("pdq:fast", "takes no argument but ':mirrored'"),
    ("hog:64", "the hog embedder takes no argument.*write 'hog'"),
    ("dino:", "names no checkpoint file"),
    ("dino:{tmp}/absent.pt", "absent.pt does not exist; pass the path of an existing file"),
    ("dino:{no_keys}", r"lacks the 'config' and 'state_dict'.*found \['model'\].*teacher_backbone.pt"),
    ("dino:{bad_name}", "does not build a backbone: unknown model 'vit_huge'; did you mean"),
    ("dino:{mismatch}", r"do not fit the 'vit_test' backbone.*missing: register_tokens.*re-export"),
    ("dino:{text}", "not a readable torch checkpoint"),
    ("torchscript:{tmp}/absent.pt:288", "TorchScript model file .*absent.pt does not exist"),
    ("torchscript:{pickle}", "not a TorchScript model.*torch.jit.save"),
    ("torchscript:{maps}:32", r"must return one \(batch, dim\) tensor, got \(1, 8, 30, 30\)"),
    ("torchscript:{maps}:8", "input size 8 is out of range"),
    ("open_clip:ViT-B-33", "open_clip has no architecture 'ViT-B-33'; did you mean ViT-B-32"),
    (
        "open_clip:RN50:laion9000",
        r"neither an existing weights file nor a pretrained tag of RN50 \(tags: openai",
    ),
    ("open_clip:ViT-B-32:{tmp}/absent.safetensors", "neither an existing weights file"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS, ids=[spec for spec, _ in BAD_SPECS])
def test_each_bad_spec_says_what_is_wrong(spec, message, tmp_path):
    files = _bad_checkpoints(tmp_path) if "{" in spec else {}
    spec = spec.format(tmp=tmp_path, **files)
    with pytest.raises(EmbedderError, match=message):
        check_spec(spec)
    with pytest.raises(EmbedderError, match=message):
        load_embedder(spec, "cpu")


def test_bad_spec_name_or_config_fails_before_any_work(run_dir):
    with pytest.raises(EmbedderError, match="valid embedder specs"):
        run_embed(run_dir, "nothing", EmbedConfig("sscd:/model.pt"), progress=False)
    assert not (run_dir / "embeddings" / "nothing").exists()
    assert "open_clip:ARCH[:PRETRAINED]" in SPEC_HELP
    with pytest.raises(EmbedError, match="plain folder name"):
        run_embed(run_dir, "../elsewhere", EmbedConfig("pdq"), progress=False)
    with pytest.raises(EmbedError, match="batch_size must be at least 1"):
        EmbedConfig("pdq", batch_size=0)


def test_fingerprint_changes_when_embeddings_are_redone_under_the_same_spec(tmp_path):
    """The later stages' stamps hold it: re-embedding (a newer descriptor, other weights at the same
    path) must redo them, and an untouched folder must not."""
    out = tmp_path / "embeddings" / "semantic"
    out.mkdir(parents=True)
    (out / "embedder.json").write_text('{"spec": "hog", "dim": 300}')
    part = out / "part-00000.parquet"
    part.write_bytes(b"first")
    first = embeddings_fingerprint(tmp_path, "semantic")
    assert embeddings_fingerprint(tmp_path, "semantic") == first
    time.sleep(0.01)
    part.write_bytes(b"again")  # same size, rewritten
    rewritten = embeddings_fingerprint(tmp_path, "semantic")
    assert rewritten != first
    (out / "embedder.json").write_text('{"spec": "hog", "dim": 252}')
    assert embeddings_fingerprint(tmp_path, "semantic") != rewritten
    (out / "part-00001.parquet").write_bytes(b"more")
    assert len({first, rewritten, embeddings_fingerprint(tmp_path, "semantic")}) == 3
