"""Benchmark: how good would the demo's curation be with an embedder that separates its concepts?

The demo's quality figures depend on its semantic embedder: `hog` in the first pass, the self-trained
tiny teacher in the second. This bench measures a ceiling that neither can reach offline: the same
tiny backbone as the tiny recipes (`vit_test/8`, 32-pixel inputs, learned positions) trained *with the
demo web's labels* (cross-entropy on the CLS) for a fixed number of iterations. On the deduplicated
pool of a finished first pass it compares three embedders, `hog` (the pass's own embeddings), the
supervised network and the same network at random initialisation, on what the demo reports:

- the share of each concept image's 10 nearest pool neighbours (cosine) that show the same concept;
- retrieval precision: the demo's sample-based retrieval (k = 8 per seed image), share of retrieved
  images whose concept is seeded;
- concept balance: normalised concept entropy of the balanced sample (hierarchical k-means at the
  pipeline's default levels, 15% of the pool) over 8 k-means seeds, against 20 uniform random samples
  of the same size.

It trains on the web's concept and off-topic images, the very images of the pool it is then scored
on, so the ceiling is optimistic. Labels are used for the ceiling only; nothing in the pipeline uses
them.

    python pipelines/build_lvd.py --seeds demo --out runs/ceiling/pass1    # a first pass (about 3 min)
    python bench/embedder_ceiling.py --run runs/ceiling/pass1             # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before bench/, whose curation.py would shadow the package

from curation import quality  # noqa: E402
from curation.balance import HierarchicalKMeansConfig, KMeansConfig, balanced_sample, hierarchical_kmeans  # noqa: E402
from curation.curate import CurationConfig  # noqa: E402
from curation.demo_quality import OFF_TOPIC  # noqa: E402
from curation.embed import load_embedder, read_embeddings  # noqa: E402
from curation.ingest import read_pool  # noqa: E402
from curation.retrieval import SampleRetrievalConfig, sample_retrieval  # noqa: E402
from curation.seeds import REGISTRY  # noqa: E402
from pretrain.eval.features import load_eval_images, random_backbone  # noqa: E402
from pretrain.models import build_vit  # noqa: E402

SIZE = 32  # the tiny recipes' global crop
BACKBONE = {"name": "vit_test", "patch_size": 8, "img_size": SIZE, "layerscale_init": None}
TRAIN_KINDS = ("concept", "off_topic")
BALANCE_SEEDS = 8
RANDOM_SAMPLES = 20


def web_file(demo: Path, url: str) -> Path:
    return demo / "site" / "web" / url.rsplit("/", 1)[1]


def train_supervised(
    images: torch.Tensor, labels: torch.Tensor, classes: int, iterations: int
) -> torch.nn.Module:
    """vit_test/8 with a linear classifier on its CLS, cross-entropy, AdamW; random-resized crops and
    flips of 64-pixel copies, as the tiny recipes' global crops."""
    torch.manual_seed(0)
    model = build_vit(**BACKBONE)
    classifier = torch.nn.Linear(model.embed_dim, classes)
    optimizer = torch.optim.AdamW([*model.parameters(), *classifier.parameters()], lr=1e-3, weight_decay=0.04)
    augment = v2.Compose(
        [v2.RandomResizedCrop(SIZE, scale=(0.32, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    )
    model.train()
    for _ in range(iterations):
        batch = torch.randint(len(images), (64,))
        crops = torch.stack([augment(images[i]) for i in batch])
        loss = F.cross_entropy(classifier(model.forward_features(crops)["cls"]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def cls_features(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    return F.normalize(
        torch.cat([model.forward_features(c)["cls"] for c in images.split(256)]), dim=1
    ).numpy()


def figures(
    pool: np.ndarray,
    seeds: np.ndarray,
    concepts: np.ndarray,
    seeded: set[str],
    levels: tuple[int, ...],
    target: int,
) -> dict:
    pool, seeds = pool.astype(np.float32), seeds.astype(np.float32)
    similarity = pool @ pool.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argsort(-similarity, axis=1)[:, :10]
    is_concept = concepts != OFF_TOPIC
    retrieved = sample_retrieval(
        pool, seeds, SampleRetrievalConfig(k=REGISTRY["demo"].k)
    ).retrieved.pool_index
    num_concepts = len(set(concepts))
    balanced = []
    for seed in range(BALANCE_SEEDS):
        hierarchy = hierarchical_kmeans(
            pool, HierarchicalKMeansConfig(clusters_per_level=levels, kmeans=KMeansConfig(seed=seed))
        )
        sample = balanced_sample(hierarchy.assignments, target, seed=seed)
        balanced.append(quality.normalised_entropy(concepts[sample], num_concepts))
    return {
        "neighbour_concept_share_10": float((concepts[neighbours] == concepts[:, None])[is_concept].mean()),
        "retrieval_precision": quality.retrieval_precision(
            concepts[retrieved], np.array(sorted(seeded), dtype=object)
        ),
        "entropy_balanced_mean": float(np.mean(balanced)),
        "entropy_balanced_std": float(np.std(balanced)),
        "entropy_balanced_min": float(np.min(balanced)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", type=Path, required=True, help="a finished demo first pass (build_lvd.py --seeds demo)"
    )
    parser.add_argument("--iterations", type=int, default=2400, help="supervised iterations (batch 64)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_ceiling/results.json"))
    args = parser.parse_args()
    demo = args.run / "demo"
    clusters = args.run / "manifests" / "clusters.parquet"
    if not (demo / "ground_truth.parquet").is_file() or not clusters.is_file():
        sys.exit(f"error: {args.run} is not a finished demo first pass: run "
                 f"`python pipelines/build_lvd.py --seeds demo --out {args.run}` first")  # fmt: skip

    truth = {row["url"]: row for row in pq.read_table(demo / "ground_truth.parquet").to_pylist()}
    pool_table = read_pool(args.run)
    url_of = dict(zip(pool_table.column("key").to_pylist(), pool_table.column("url").to_pylist()))
    keys = pq.read_table(clusters, columns=["key"]).column("key").to_pylist()
    concepts = np.array([truth[url_of[k]]["concept"] or OFF_TOPIC for k in keys], dtype=object)
    seed_files = sorted((demo / "site" / "seeds").glob("*/*"))
    seeded = {path.parent.name for path in seed_files}

    training = [row for row in truth.values() if row["kind"] in TRAIN_KINDS]
    classes = sorted({row["concept"] or OFF_TOPIC for row in training})
    labels = torch.tensor([classes.index(row["concept"] or OFF_TOPIC) for row in training])
    started = time.perf_counter()
    model = train_supervised(load_eval_images([web_file(demo, row["url"]) for row in training], 2 * SIZE), labels, len(classes),
                             args.iterations)  # fmt: skip
    train_seconds = time.perf_counter() - started

    pool_images = load_eval_images([web_file(demo, url_of[k]) for k in keys], SIZE)
    seed_images = load_eval_images(seed_files, SIZE)
    hog_keys, hog = read_embeddings(args.run, "semantic")
    position = {key: i for i, key in enumerate(hog_keys)}
    hog_seeds = load_embedder("hog").embed([Image.open(path).convert("RGB") for path in seed_files])
    levels = CurationConfig().levels(len(keys))
    target = round(CurationConfig().balanced_share * len(keys))
    random_model = random_backbone(BACKBONE, seed=0)  # the supervised network's starting point
    embedders = {
        "hog": (hog[[position[k] for k in keys]], hog_seeds),
        "supervised vit_test/8": (cls_features(model, pool_images), cls_features(model, seed_images)),
        "random vit_test/8": (
            cls_features(random_model, pool_images),
            cls_features(random_model, seed_images),
        ),
    }
    rng = np.random.default_rng(0)
    random_entropy = [
        quality.normalised_entropy(rng.choice(concepts, target, replace=False), len(set(concepts)))
        for _ in range(RANDOM_SAMPLES)
    ]
    results = {
        name: figures(pool, seeds, concepts, seeded, levels, target)
        for name, (pool, seeds) in embedders.items()
    }
    summary = {
        "run": str(args.run), "pool": len(keys), "levels": list(levels), "supervised_iterations": args.iterations,
        "supervised_train_seconds": train_seconds, "seeded_share_of_pool": float(np.isin(concepts, list(seeded)).mean()),
        "entropy_random_mean": float(np.mean(random_entropy)), "entropy_random_std": float(np.std(random_entropy)),
        "embedders": results,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"pool {len(keys)} images, levels {levels}; seeded concepts are {summary['seeded_share_of_pool']:.3f} of it; "
          f"supervised: {args.iterations} iterations in {train_seconds:.0f} s")  # fmt: skip
    print(f"random samples: concept entropy {np.mean(random_entropy):.3f} ± {np.std(random_entropy):.3f}")
    print(f"{'embedder':<22} {'10-NN share':>11} {'retrieval':>9} {'balanced entropy':>22}")
    for name, r in results.items():
        print(f"{name:<22} {r['neighbour_concept_share_10']:>11.3f} {r['retrieval_precision']:>9.3f} "
              f"{r['entropy_balanced_mean']:>10.3f} ± {r['entropy_balanced_std']:.3f} (min {r['entropy_balanced_min']:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
