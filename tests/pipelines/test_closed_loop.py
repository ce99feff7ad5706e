"""The closed loop at tiny scale on the session's small demo web: ingest, pass 1 with the outline
descriptor, a few pretraining iterations on its curated manifest, k-NN against a random network,
pass 2 with the trained teacher on pass 1's pool, the summary and the run report (opened in headless
Chromium); a rerun redoes nothing. The summary table is checked on hand-made figures."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import closed_loop
from pipelines.closed_loop import KnnFigures, LoopFigures, PassFigures
from pretrain.config import PretrainConfig
from pretrain.config_io import load_config

REPO = Path(__file__).resolve().parents[2]
ITERATIONS, EVAL_EVERY = 10, 5
QUALITY = ("dedup_precision", "dedup_recall", "leak_removal_recall", "retrieval_precision", "entropy_balanced",
           "entropy_random_sample", "entropy_deduplicated_pool")  # fmt: skip


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = closed_loop.main(argv)
    return code, out.getvalue()


def _mtimes(root: Path, pattern: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.glob(pattern)}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def loop(ray_session, demo_root, demo_urls, tiny_model, tmp_path_factory):
    """The loop run once; the same command again (what it left untouched, by kind); then once more with
    another pretraining config (its output and the teacher it replaced)."""
    urls, truth = demo_urls
    out = tmp_path_factory.mktemp("loop")
    argv = ["--out", str(out), "--urls", str(urls), "--ground-truth", str(truth), "--demo-root", str(demo_root),
            "--allow-network", "127.0.0.1/32", "--iterations", str(ITERATIONS), "--eval-every", str(EVAL_EVERY),
            "--no-progress", *tiny_model]  # fmt: skip
    code, stdout = _run(argv)
    assert code == 0, stdout
    finished = {
        name: _mtimes(out, pattern)
        for name, pattern in [("manifests", "pass*/manifests/*.parquet"), ("embeddings", "pass*/embeddings/*/part-*"),
                              ("training", "pretrain/*.*"), ("evaluation", "evaluation/**/*.*")]
    }  # fmt: skip
    finished["manifests"] = {p: t for p, t in finished["manifests"].items() if p.name != "curated.parquet"}  # always rewritten
    again_code, again_stdout = _run(argv)
    untouched = {name: bool(stamps) and {p: p.stat().st_mtime_ns for p in stamps} == stamps
                 for name, stamps in finished.items()}  # fmt: skip
    first_teacher = _digest(out / "pretrain" / "teacher_backbone.pt")
    retrained = _run([*argv, "schedule.base_lr=0.02"])
    return out, stdout, (again_code, again_stdout, untouched), (*retrained, first_teacher)


def test_pass_1_trains_the_teacher_and_pass_2_curates_its_pool_with_it(loop):
    out, _, _, _ = loop
    first, second = (json.loads((out / p / "lineage.json").read_text()) for p in ("pass1", "pass2"))
    teacher = (out / "pretrain" / "teacher_backbone.pt").resolve()
    assert first["embedders"] == {"copy": "pdq", "semantic": "hog"}
    assert second["embedders"] == {"copy": "pdq", "semantic": f"dino:{teacher}"}
    # The teacher trained on pass 1's curated manifest, with k-NN while training.
    config = yaml.safe_load((out / "pretrain" / "config.yaml").read_text())
    assert Path(config["data"]["manifest"]) == out / "pass1" / "manifests" / "curated.parquet"
    metrics = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == ITERATIONS
    assert [m["iteration"] + 1 for m in metrics if "eval/knn_top1" in m] == [EVAL_EVERY, ITERATIONS]
    # Pass 2 reads pass 1's pool, shards, copy descriptors and dedup; only its semantic embedding is new.
    for shared in ("manifests/pool", "manifests/dedup.parquet", "embeddings/copy", "embeddings/copy_mirrored"):
        assert (out / "pass2" / shared).is_symlink() and (out / "pass2" / shared).resolve() == (out / "pass1" / shared).resolve()
    assert not (out / "pass2" / "input").exists()
    embedder = json.loads((out / "pass2" / "embeddings" / "semantic" / "embedder.json").read_text())
    assert embedder["weights_sha256"] == _digest(teacher)
    curated = pq.read_table(out / "pass2" / "manifests" / "curated.parquet")
    for row in curated.to_pylist()[:: max(1, curated.num_rows // 10)]:  # every row reads through the links
        with open(out / "pass2" / row["shard"], "rb") as f:
            f.seek(row["offset"])
            assert len(f.read(row["nbytes"])) == row["nbytes"]


def test_summary_has_counts_quality_of_both_passes_and_knn_against_random(loop):
    out, stdout, _, _ = loop
    summary = json.loads((out / "summary.json").read_text())
    pool = pq.read_table(out / "pass1" / "manifests" / "pool")
    assert summary["urls"] == pool.num_rows and 0 < summary["stored"] < summary["urls"]
    first, second = summary["passes"]
    for figures in (first, second):
        assert set(QUALITY) <= set(figures["quality"]) and all(0 <= figures["quality"][n] <= 1 for n in QUALITY)
        assert list(figures["stages"]) == ["dedup", "retrieval", "balance", "curated"]
    # Dedup is pass 1's, shared: the same counts and figures.
    assert first["stages"]["dedup"] == second["stages"]["dedup"]
    assert first["quality"]["dedup_recall"] == second["quality"]["dedup_recall"]
    knn = summary["knn"]
    assert set(knn["trained"]) == set(knn["random"]) == {"10", "20", "100", "200"}
    assert all(0 <= v <= 1 for v in [*knn["trained"].values(), *knn["random"].values()])
    assert knn["classes"] == 12 and knn["query_images"] == 36
    assert summary["iterations"] == ITERATIONS
    assert set(summary["seconds"]) == {"ingest", "pass 1", "pretraining", "evaluation", "pass 2"}
    for text in ("retrieval precision", "k-NN top-1 after 10 iterations", "random network", "retrieval target",
                 "wall time of this invocation:", "run report:"):  # fmt: skip
        assert text in stdout, text


def test_a_rerun_redoes_nothing(loop):
    _, _, (code, stdout, untouched), _ = loop
    assert code == 0, stdout
    assert untouched == {"manifests": True, "embeddings": True, "training": True, "evaluation": True}
    assert "already done, skipped" in stdout and "holds the teacher of this config, skipped" in stdout
    assert "newer than the teacher, skipped" in stdout


def test_another_pretraining_config_trains_afresh_and_redoes_what_follows(loop):
    out, _, _, (code, stdout, first_teacher) = loop
    assert code == 0, stdout
    assert "was trained with another config (schedule.base_lr: 0.01" in stdout
    assert "embedded by an earlier teacher: embedding the pool again" in stdout
    assert "newer than the teacher, skipped" not in stdout
    teacher = out / "pretrain" / "teacher_backbone.pt"
    assert _digest(teacher) != first_teacher
    config = yaml.safe_load((out / "pretrain" / "config.yaml").read_text())
    assert config["schedule"]["base_lr"] == 0.02
    metrics = (out / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == ITERATIONS  # trained from iteration 0, not appended to the old run
    embedder = json.loads((out / "pass2" / "embeddings" / "semantic" / "embedder.json").read_text())
    assert embedder["weights_sha256"] == _digest(teacher)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes["src"] or "")
        elif tag == "a" and not (attributes.get("href") or "#").startswith("#"):
            self.links.append(attributes["href"] or "")


def test_run_report_links_both_passes_curves_and_pictures(loop):
    out, _, _, _ = loop
    report = out / "report"
    page = _Page()
    page.feed((report / "index.html").read_text(encoding="utf-8"))
    assert sorted((report / link).resolve() for link in page.links) == sorted(
        (out / p / "report" / "index.html").resolve() for p in ("pass1", "pass2"))
    assert {"img/losses.png", "img/knn.png"} <= set(page.images)
    names = [Path(src).name for src in page.images]
    # The teacher's and the random network's pictures, and those of both evaluations while training.
    assert sum(n.endswith("attention.png") for n in names) == sum(n.endswith("pca.png") for n in names) == 4
    assert all((report / src).is_file() for src in page.images)


@pytest.mark.browser
def test_run_report_renders_its_pictures_in_a_headless_browser(loop, headless_browser):
    out, _, _, _ = loop
    page = headless_browser(out / "report" / "index.html")
    loaded, total = page.images_loaded()
    assert total >= 10 and loaded == total, f"images loaded: {loaded}/{total}"
    assert page.screenshot.std() > 20, "the screenshot is blank"


# ---------------------------------------------------------------- the summary on hand-made figures


def _figures(first_precision: float | None, second_precision: float | None) -> LoopFigures:
    def one(spec: str, precision: float | None, retrieved: int) -> PassFigures:
        quality = {"dedup_precision": 0.96, "dedup_recall": 0.9, "leak_removal_recall": 0.975,
                   "entropy_balanced": 0.93, "entropy_random_sample": 0.91}  # fmt: skip
        if precision is not None:
            quality["retrieval_precision"] = precision
        return PassFigures(spec, {"dedup": (1930, 1622), "retrieval": (1622, retrieved), "balance": (1622, 243),
                                  "curated": (904, 821)}, quality)  # fmt: skip

    return LoopFigures(
        urls=1984, stored=1930,
        passes=(one("hog", first_precision, 517), one("dino:/x/runs/demo/pretrain/teacher_backbone.pt", second_precision, 794)),
        iterations=300,
        knn=KnnFigures({"10": 0.25, "20": 0.5}, {"10": 0.1, "20": 0.125}, classes=12, bank_images=1405, query_images=144),
        seconds={"ingest": 90.0, "pass 1": 60.0, "pretraining": 300.0},
    )  # fmt: skip


def test_summary_table_of_hand_made_figures():
    text = closed_loop.summary_text(_figures(0.932, 0.5))
    lines = text.splitlines()
    assert lines[0] == "Curation: 1,984 URLs, 1,930 images stored (both passes read the same pool)"

    def row(label: str) -> list[str]:
        line = next(line for line in lines if line.strip().startswith(label))
        return line.strip()[len(label):].split()

    assert row("semantic embedder") == ["hog", "dino:pretrain/teacher_backbone.pt"]
    assert row("retrieval: kept → retrieved") == ["1,622", "→", "517", "1,622", "→", "794"]
    assert row("retrieval precision") == ["0.932", "0.500", "-0.432"]
    assert row("dedup pair recall") == ["0.900", "0.900", "+0.000"]
    assert row("leak removal recall") == ["0.975", "0.975", "+0.000"]
    assert not any(line.strip().startswith("concept entropy: deduplicated pool") for line in lines)  # not measured
    assert "k-NN top-1 after 300 iterations: 144 held-out images, 12 classes (chance 8.3%)" in text
    assert row("k = 10") == ["25.0%", "10.0%", "+15.0"] and row("k = 20") == ["50.0%", "12.5%", "+37.5"]
    assert "NOT met: pass 2 0.500, pass 1 0.932" in text
    assert lines[-1] == "wall time of this invocation: ingest 90 s, pass 1 60 s, pretraining 300 s; total 7.5 min"


@pytest.mark.parametrize(("first", "second", "met"), [
    (0.932, 0.95, True), (0.932, 0.92, False), (0.85, 0.89, False), (0.95, 0.95, False), (None, 0.95, False),
])  # fmt: skip
def test_retrieval_target_needs_at_least_0_9_and_better_than_pass_1(first, second, met):
    verdict, sentence = closed_loop.retrieval_target(_figures(first, second))
    assert verdict is met
    assert ("not measured" in sentence) if first is None else (("NOT met" not in sentence) is met)


@pytest.mark.parametrize("recipe", ["v2_tiny", "v3_tiny"])
def test_rescaled_schedule_keeps_the_epochs_and_a_gram_stage_in_place(recipe):
    path = REPO / "pretrain" / "configs" / f"{recipe}.yaml"
    source = [f"data.image_folder={REPO}"]  # any source: a config needs one
    config = load_config(PretrainConfig, path, source)
    overrides = closed_loop.rescaled_schedule(config, 40)
    short = load_config(PretrainConfig, path, source + overrides)  # validates: a Gram stage still within the run
    assert short.schedule.epochs == config.schedule.epochs
    assert short.schedule.total_iters == config.schedule.epochs * max(1, 40 // config.schedule.epochs)
    if config.gram.enabled:
        before = config.gram.start_iteration / config.schedule.total_iters
        after = short.gram.start_iteration / short.schedule.total_iters
        assert after == pytest.approx(before, abs=1 / short.schedule.iters_per_epoch)


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        closed_loop.main(["--out", str(tmp_path), "--urls", "urls.parquet"])
    assert "--urls, --ground-truth and --demo-root go together" in capsys.readouterr().err
    code = closed_loop.main(["--out", str(tmp_path), "schedule.epochz=2"])
    assert code == 2 and "did you mean 'schedule.epochs'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
