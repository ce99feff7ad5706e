"""The run report of a closed loop (pipelines/closed_loop.py): one page with the summary tables, links
to the curation report of each pass, the training curves (loss by term, k-NN accuracy while
training) and the attention and PCA pictures of the teacher beside a random network's.

OUT/report/index.html; its plots and pictures are files under OUT/report/img/ (pictures are copied
there), the pass reports are linked relatively: the run folder can be moved or served as it is.
docs/evaluation.md says how to read the pictures.
"""

from __future__ import annotations

import html
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from curation.report import IMAGE_CHECK_SCRIPT, PAGE_CSS, html_table
from pretrain.eval.curves import knn_curve, plot_knn, plot_losses, read_metrics
from pretrain.eval.pictures import ATTENTION_FILE, PCA_FILE

__all__ = ["LoopReportInputs", "Table", "build_loop_report"]

PICTURES = (ATTENTION_FILE, PCA_FILE)
_CSS = """
table.pictures td, table.pictures th { vertical-align: top; text-align: left; }
table.pictures img { max-width: 540px; display: block; }
.step img { max-width: 360px; }
"""


class Table(NamedTuple):
    title: str
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class LoopReportInputs:
    tables: list[Table]
    notes: list[str]  # sentences under the tables
    pass_reports: dict[str, Path]  # label -> a curation pass's report/index.html
    metrics: Path  # the pretraining's metrics.jsonl
    knn_baselines: dict[str, float]  # label -> accuracy: lines beside the k-NN curve
    pictures: dict[str, Path]  # label -> folder holding attention.png and pca.png
    training_pictures: Path  # OUTPUT_DIR/eval: a step-XXXXXXX folder of pictures per evaluation


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _figure(src: str, caption: str) -> str:
    return (f'<figure class="plot"><img src="{_esc(src)}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")  # fmt: skip


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


class _Page:
    def __init__(self, report_dir: Path, inputs: LoopReportInputs) -> None:
        self.report_dir, self.inputs = report_dir, inputs
        self.img = report_dir / "img"

    def _copied(self, source: Path, name: str) -> str | None:
        """The picture copied into img/ as ``name``, or None when it is missing."""
        if not source.is_file():
            return None
        shutil.copyfile(source, self.img / name)
        return f"img/{name}"

    def _picture(self, folder: Path, picture: str, prefix: str, label: str) -> str:
        src = self._copied(folder / picture, f"{prefix}-{picture}")
        return _figure(src, f"{label}: {picture}") if src else _note(f"missing: {folder / picture}")

    def summary(self) -> str:
        tables = "".join(f"<h3>{_esc(t.title)}</h3>{html_table(t.header, t.rows)}" for t in self.inputs.tables)
        return tables + "".join(f"<p>{_esc(note)}</p>" for note in self.inputs.notes)

    def passes(self) -> str:
        items = []
        for label, page in self.inputs.pass_reports.items():
            if page.is_file():
                href = os.path.relpath(page, self.report_dir)
                items.append(f'<li><a href="{_esc(href)}">{_esc(label)}</a></li>')
            else:
                items.append(f"<li>{_esc(label)}: {_esc(page)} is missing</li>")
        return f"<ul>{''.join(items)}</ul>"

    def curves(self) -> str:
        if not self.inputs.metrics.is_file():
            return _note(f"{self.inputs.metrics} is missing: the pretraining has not run")
        metrics = read_metrics(self.inputs.metrics)
        plot_losses(metrics, self.img / "losses.png")
        parts = [_figure("img/losses.png", "loss and its weighted terms by iteration")]
        if len(knn_curve(metrics)[0]):
            plot_knn(metrics, self.img / "knn.png", self.inputs.knn_baselines)
            parts.append(_figure("img/knn.png", "k-NN top-1 of the teacher at each evaluation while training"))
        else:
            parts.append(_note("no evaluation while training (eval.every = 0): no k-NN curve"))
        return "".join(parts)

    def final_pictures(self) -> str:
        labels = list(self.inputs.pictures)
        head = "".join(f"<th>{_esc(label)}</th>" for label in labels)
        rows = "".join(
            "<tr>" + "".join(f"<td>{self._picture(folder, picture, f'final{i}', label)}</td>"
                             for i, (label, folder) in enumerate(self.inputs.pictures.items())) + "</tr>"
            for picture in PICTURES
        )  # fmt: skip
        return ("<p>First row: the last block's attention from the CLS token to each patch, one panel per head; "
                "second row: the first three principal components of the patch features as colours. "
                "docs/evaluation.md says how to read them.</p>"
                f'<table class="pictures"><tr>{head}</tr>{rows}</table>')  # fmt: skip

    def training_pictures(self) -> str:
        steps = sorted(self.inputs.training_pictures.glob("step-*")) if self.inputs.training_pictures.is_dir() else []
        if not steps:
            return _note("no pictures written while training (eval.every = 0 or eval.probe_images = 0)")
        rows = [f'<div class="grid step">{"".join(self._picture(step, p, step.name, step.name) for p in PICTURES)}</div>'
                for step in steps]  # fmt: skip
        return "".join(rows)

    def render(self) -> str:
        sections = (
            ("summary", "Summary", self.summary()),
            ("passes", "Curation reports", self.passes()),
            ("curves", "Training curves", self.curves()),
            ("pictures", "Teacher and random network", self.final_pictures()),
            ("training-pictures", "Pictures during training", self.training_pictures()),
        )
        nav = "".join(f'<a href="#{sid}">{_esc(title)}</a>' for sid, title, _ in sections)
        body = "".join(f'<section id="{sid}"><h2>{_esc(title)}</h2>{content}</section>' for sid, title, content in sections)
        title = f"Closed loop: {self.report_dir.parent.name}"
        return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
                f"<title>{_esc(title)}</title><style>{PAGE_CSS}{_CSS}</style></head>"
                f"<body><h1>{_esc(title)}</h1><nav>{nav}</nav>{body}<script>{IMAGE_CHECK_SCRIPT}</script></body></html>\n")  # fmt: skip


def build_loop_report(report_dir: Path, inputs: LoopReportInputs) -> Path:
    """Write report_dir/index.html and its img/ folder (rebuilt from scratch); returns the page."""
    shutil.rmtree(report_dir / "img", ignore_errors=True)
    (report_dir / "img").mkdir(parents=True)
    page = _Page(report_dir, inputs).render()
    index = report_dir / "index.html"
    partial = index.with_suffix(".html.tmp")
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, index)
    return index
