"""The embedded demo web: a seeded generator of a small web of images, and a local server for it.

Everything the pipeline must handle is planted, with its ground truth written beside it:
- concept classes of procedurally drawn objects, with the object mask of each image, plus off-topic
  images. As on the web, a concept has its own outline, surface pattern and range of hues (an orange
  is orange and dimpled); position, scale, rotation, brightness, saturation and background vary;
- exact duplicates (same bytes under another URL) and near-duplicates (re-encoding, resizing,
  cropping, flipping, colour change, text overlay);
- near-copies of the evaluation set (test-set leakage);
- valid but awkward encodings and every kind of broken entry the ingest must survive.

``generate()`` writes files only; ``DemoServer`` serves them on 127.0.0.1 on a free port and
writes the URL list (the URLs contain the port, so they exist only once a server runs).
"""

from __future__ import annotations

import colorsys
import http.server
import io
import json
import math
import socket
import struct
import threading
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

CONCEPTS = (
    "disc", "square", "triangle", "star", "ring", "cross",
    "hexagon", "crescent", "arrow", "bars", "chevron", "kite",
)  # fmt: skip
# Each concept's surface pattern, as objects of one kind share a texture on the web (stripes of a
# zebra, the dimples of an orange). Patterns survive horizontal flips and colour changes, so two
# crops of one object share them; the period is a fraction of the image's shorter side.
CONCEPT_TEXTURES = {
    "disc": ("hstripes", 1 / 10), "square": ("vstripes", 1 / 10), "triangle": ("checker", 1 / 8),
    "star": ("dots", 1 / 9), "ring": ("hatch", 1 / 9), "cross": ("grid", 1 / 8),
    "hexagon": ("hstripes", 1 / 5), "crescent": ("vstripes", 1 / 5), "arrow": ("checker", 1 / 4),
    "bars": ("dots", 1 / 5), "chevron": ("rings", 1 / 8), "kite": ("plain", 1.0),
}  # fmt: skip
GENERATOR_VERSION = 3


@dataclass(frozen=True)
class DemoWebConfig:
    seed: int = 0
    images_per_concept: int = 120  # on average; the web is long-tailed, see concept_skew
    concept_skew: float = 12.0  # most common concept / least common one (geometric in between)
    off_topic: int = 200
    exact_duplicates: int = 100
    near_duplicates: int = 150
    seed_concepts: int = 6  # this many concepts have a seed set, spread over common and rare ones
    seed_images_per_concept: int = 24
    eval_images_per_concept: int = 12
    eval_leaks: int = 40
    awkward_per_format: int = 5
    broken_per_kind: int = 3
    min_side: int = 128
    max_side: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.seed_concepts <= len(CONCEPTS):
            raise ValueError(f"seed_concepts must be in [1, {len(CONCEPTS)}], got {self.seed_concepts}")
        if self.min_side < 32 or self.max_side < self.min_side:
            raise ValueError("need 32 <= min_side <= max_side")
        if self.concept_skew < 1:
            raise ValueError(f"concept_skew is a ratio >= 1, got {self.concept_skew}")

    def seeded_concepts(self) -> tuple[str, ...]:
        spread = CONCEPTS[::2] + CONCEPTS[1::2]
        return spread[: self.seed_concepts]

    def concept_counts(self) -> dict[str, int]:
        """Images per concept: a geometric long tail, as concepts are on the web."""
        weights = self.concept_skew ** -np.linspace(0, 1, len(CONCEPTS))
        counts = np.maximum(1, np.round(weights / weights.mean() * self.images_per_concept)).astype(int)
        return dict(zip(CONCEPTS, counts.tolist()))


# ---------------------------------------------------------------- drawing


def _shape_polygon(concept: str, cx: float, cy: float, r: float, angle: float) -> list[list[tuple]]:
    """Polygons (outer first; later ones are cut out) of a concept centred at (cx, cy)."""

    def rot(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    def regular(n, radius, phase=0.0):
        return [(radius * math.cos(phase + 2 * math.pi * i / n), radius * math.sin(phase + 2 * math.pi * i / n))
                for i in range(n)]  # fmt: skip

    def circle(radius, ox=0.0, oy=0.0):
        return [(ox + radius * math.cos(2 * math.pi * i / 48), oy + radius * math.sin(2 * math.pi * i / 48))
                for i in range(48)]  # fmt: skip

    if concept == "disc":
        return [rot(circle(r))]
    if concept == "square":
        return [rot(regular(4, r, math.pi / 4))]
    if concept == "triangle":
        return [rot(regular(3, r, -math.pi / 2))]
    if concept == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + math.pi * i / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return [rot(pts)]
    if concept == "ring":
        return [rot(circle(r)), rot(circle(r * 0.55))]
    if concept == "cross":
        w = r * 0.33
        return [rot([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                     (-r, -w), (-w, -w)])]  # fmt: skip
    if concept == "hexagon":
        return [rot(regular(6, r))]
    if concept == "crescent":
        return [rot(circle(r)), rot(circle(r * 0.85, r * 0.45, -r * 0.1))]
    if concept == "arrow":
        return [rot([(-r, -0.25 * r), (0.2 * r, -0.25 * r), (0.2 * r, -0.7 * r), (r, 0), (0.2 * r, 0.7 * r),
                     (0.2 * r, 0.25 * r), (-r, 0.25 * r)])]  # fmt: skip
    if concept == "bars":
        bars = []
        for k in (-1, 0, 1):
            x0 = k * 0.7 * r
            bars.append(rot([(x0 - 0.2 * r, -r), (x0 + 0.2 * r, -r), (x0 + 0.2 * r, r), (x0 - 0.2 * r, r)]))
        return bars
    if concept == "chevron":
        return [rot([(-r, -0.8 * r), (-0.45 * r, -0.8 * r), (r * 0.45, 0), (-0.45 * r, 0.8 * r), (-r, 0.8 * r),
                     (-0.1 * r, 0)])]  # fmt: skip
    if concept == "kite":
        return [rot([(0, -r), (0.55 * r, -0.25 * r), (0, r), (-0.55 * r, -0.25 * r)])]
    raise ValueError(f"unknown concept {concept!r}")


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    kind = rng.integers(3)
    base = rng.integers(0, 256, 3)
    if kind == 0:
        return Image.new("RGB", (width, height), tuple(int(v) for v in base))
    if kind == 1:
        other = rng.integers(0, 256, 3)
        t = np.linspace(0, 1, width)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, height)[:, None, None]
        array = base * (1 - t) + other * t
        return Image.fromarray(np.broadcast_to(array, (height, width, 3)).astype(np.uint8))
    noise = rng.normal(0, 28, (height // 8 + 1, width // 8 + 1, 3))
    tile = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(tile).resize((width, height), Image.Resampling.BILINEAR)


def _object_colour(rng: np.random.Generator, background: Image.Image, hue: float) -> tuple[int, int, int]:
    """A colour of ``hue`` (within +-0.03 of the wheel) that stands out from the background."""
    mean = np.asarray(background).reshape(-1, 3).mean(0)
    for _ in range(20):
        red, green, blue = colorsys.hsv_to_rgb((hue + rng.uniform(-0.03, 0.03)) % 1.0, rng.uniform(0.45, 1.0),
                                               rng.uniform(0.35, 1.0))  # fmt: skip
        colour = np.array([red, green, blue]) * 255
        if np.abs(colour - mean).sum() > 180:
            break
    return tuple(int(v) for v in colour)


def _texture(kind: str, period: float, cx: float, cy: float, angle: float, width: int, height: int) -> np.ndarray:
    """A (height, width) pattern in [0, 1] that rotates with the object."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    c, s = math.cos(angle), math.sin(angle)
    u = ((x - cx) * c + (y - cy) * s) / period
    v = (-(x - cx) * s + (y - cy) * c) / period
    if kind == "hstripes":
        return (np.cos(2 * math.pi * v) > 0).astype(np.float64)
    if kind == "vstripes":
        return (np.cos(2 * math.pi * u) > 0).astype(np.float64)
    if kind == "checker":
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float64)
    if kind == "dots":
        return (np.hypot(u - np.round(u), v - np.round(v)) < 0.28).astype(np.float64)
    if kind == "hatch":
        a, b = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
        return ((np.abs(a - np.round(a)) < 0.15) | (np.abs(b - np.round(b)) < 0.15)).astype(np.float64)
    if kind == "grid":
        return ((np.abs(u - np.round(u)) < 0.15) | (np.abs(v - np.round(v)) < 0.15)).astype(np.float64)
    if kind == "rings":
        return (np.cos(2 * math.pi * np.hypot(u, v)) > 0).astype(np.float64)
    if kind == "plain":
        return np.zeros((height, width))
    raise ValueError(f"unknown texture {kind!r}")


def draw_concept(rng: np.random.Generator, concept: str, width: int, height: int) -> tuple[Image.Image, Image.Image]:
    """One image of a concept and its object mask (L, 255 = object)."""
    img = _background(rng, width, height)
    side = min(width, height)
    r = side * rng.uniform(0.2, 0.4)
    cx = rng.uniform(r, width - r)
    cy = rng.uniform(r, height - r)
    angle = rng.uniform(-0.35, 0.35)
    polygons = _shape_polygon(concept, cx, cy, r, angle)
    mask = Image.new("L", (width, height), 0)
    mask_draw = ImageDraw.Draw(mask)
    for i, polygon in enumerate(polygons):
        # Later polygons of the ring and crescent cut holes; the bars are all solid.
        fill = 0 if i > 0 and concept in ("ring", "crescent") else 255
        mask_draw.polygon(polygon, fill=fill)
    kind, period = CONCEPT_TEXTURES[concept]
    pattern = _texture(kind, period * side, cx, cy, angle, width, height)[:, :, None]
    colour = np.asarray(_object_colour(rng, img, CONCEPTS.index(concept) / len(CONCEPTS)), dtype=np.float64)
    # The pattern's second tone: the object colour darkened to 35% (a dark colour: 60% of the way to white).
    other = colour * 0.35 if colour.mean() > 110 else colour + (255 - colour) * 0.6
    surface = colour * (1 - pattern) + other * pattern
    img.paste(Image.fromarray(surface.astype(np.uint8)), mask=mask)
    return img, mask


def draw_off_topic(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    img = _background(rng, width, height)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
        draw.line(points, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 5)))
    return img


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


NEAR_DUPLICATE_TRANSFORMS = ("reencode", "resize", "crop", "flip", "colour", "text")


def near_duplicate(img: Image.Image, transform: str, rng: np.random.Generator) -> bytes:
    """A near-copy of ``img``: what re-hosting an image on the web does to it."""
    if transform == "reencode":
        return _jpeg(img, quality=int(rng.integers(35, 60)))
    if transform == "resize":
        scale = rng.uniform(0.5, 0.8)
        return _jpeg(img.resize((max(16, int(img.width * scale)), max(16, int(img.height * scale)))))
    if transform == "crop":
        f = rng.uniform(0.88, 0.95)
        w, h = int(img.width * f), int(img.height * f)
        x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
        return _jpeg(img.crop((x, y, x + w, y + h)))
    if transform == "flip":
        return _jpeg(ImageOps.mirror(img))
    if transform == "colour":
        return _jpeg(ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2)))
    if transform == "text":
        marked = img.copy()
        ImageDraw.Draw(marked).text((4, img.height - 14), "demo.example", fill=(255, 255, 255))
        return _jpeg(marked)
    raise ValueError(f"unknown transform {transform!r}")


def _awkward(img: Image.Image, fmt: str) -> tuple[bytes, str]:
    """Valid images in encodings that trip naive decoders; returns (bytes, file suffix)."""
    if fmt == "cmyk_jpeg":
        return _encode(img.convert("CMYK"), "JPEG", quality=92), "jpg"
    if fmt == "palette_png":
        return _encode(img.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "png"
    if fmt == "rgba_png":
        rgba = img.convert("RGBA")
        alpha = Image.new("L", img.size, 255)
        ImageDraw.Draw(alpha).rectangle((0, 0, img.width // 6, img.height), fill=0)
        rgba.putalpha(alpha)
        return _encode(rgba, "PNG"), "png"
    if fmt == "png16":
        grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        return _encode(Image.fromarray(grey), "PNG"), "png"
    if fmt == "webp":
        return _encode(img, "WEBP", quality=90), "webp"
    if fmt == "animated_gif":
        frames = [img.convert("P", palette=Image.Palette.ADAPTIVE), ImageOps.invert(img).convert("P")]
        out = io.BytesIO()
        frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        return out.getvalue(), "gif"
    if fmt == "exif_rotated_jpeg":
        # Stored rotated 90 degrees counter-clockwise; orientation 6 tells viewers to turn it back.
        stored = img.transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        return _encode(stored, "JPEG", quality=92, exif=exif.tobytes()), "jpg"
    raise ValueError(f"unknown format {fmt!r}")


AWKWARD_FORMATS = ("cmyk_jpeg", "palette_png", "rgba_png", "png16", "webp", "animated_gif", "exif_rotated_jpeg")

# Broken entries: (kind, expected error class). URL templates are filled by the server.
BROKEN_KINDS = (
    ("http_404", "http_404"),
    ("http_500", "http_500"),
    ("connection_refused", "connection_refused"),
    ("dns_failure", "dns_failure"),
    ("timeout", "timeout"),
    ("redirect_loop", "redirect_loop"),
    ("empty_body", "empty_body"),
    ("html_as_image", "not_an_image"),
    ("truncated_jpeg", "truncated_image"),
    ("random_bytes", "undecodable_image"),
    ("svg", "unsupported_format"),
    ("decompression_bomb", "too_many_pixels"),
    ("too_large_declared", "too_large"),
    ("too_large_streamed", "too_large"),
    ("file_scheme", "unsupported_scheme"),
    ("ftp_scheme", "unsupported_scheme"),
    ("internal_address", "blocked_address"),
    ("redirect_to_internal", "blocked_address"),
)


def _bomb_png(side: int = 40000) -> bytes:
    """A valid 1-bit PNG of side x side pixels that compresses to a few hundred kilobytes."""
    row = b"\x00" + bytes(math.ceil(side / 8))
    compressor = zlib.compressobj(9)
    chunks = [compressor.compress(row * 1000) for _ in range(side // 1000)]
    chunks.append(compressor.compress(row * (side % 1000)))
    chunks.append(compressor.flush())
    idat = b"".join(chunks)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- generation

GROUND_TRUTH_SCHEMA = pa.schema(
    [
        ("url_template", pa.string()),
        ("caption", pa.string()),
        ("kind", pa.string()),  # concept, off_topic, exact_duplicate, near_duplicate, eval_leak, awkward, broken
        ("concept", pa.string()),  # null for off-topic and broken entries
        ("dup_group", pa.int64()),  # entries with the same group are copies of one image; -1: none
        ("transform", pa.string()),  # near-duplicate transform, awkward format or broken kind
        ("leak_of", pa.string()),  # evaluation image (path under eval/) this entry copies
        ("mask_path", pa.string()),  # object mask under the demo root, for concept images
        ("expected_status", pa.string()),
        ("expected_error_class", pa.string()),
    ]
)


def _caption(concept: str | None) -> str:
    return f"a {concept} on a plain background" if concept else "an abstract pattern"


def generate(root: str | Path, config: DemoWebConfig = DemoWebConfig()) -> Path:
    """Write the demo web under ``root`` (web/, masks/, seeds/, eval/, pages.parquet); idempotent."""
    root = Path(root)
    marker = root / "demo_web.json"
    stamp = {"generator_version": GENERATOR_VERSION, **asdict(config)}
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return root
    rng = np.random.default_rng(config.seed)
    web, masks = root / "web", root / "masks"
    for folder in (web, masks):
        folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    originals: list[tuple[Image.Image, str | None, int]] = []  # image, concept, dup group

    def size() -> tuple[int, int]:
        return int(rng.integers(config.min_side, config.max_side + 1)), int(rng.integers(config.min_side, config.max_side + 1))

    def add(name: str, data: bytes, **fields) -> None:
        (web / name).write_bytes(data)
        row = dict.fromkeys(GROUND_TRUTH_SCHEMA.names)
        row.update({"url_template": "{base}/img/" + name, "dup_group": -1, "expected_status": "success", **fields})
        row.setdefault("caption", _caption(row["concept"]))
        rows.append(row)

    n = 0
    awkward_jobs = [fmt for fmt in AWKWARD_FORMATS for _ in range(config.awkward_per_format)]
    for concept, count in config.concept_counts().items():
        for _ in range(count):
            img, mask = draw_concept(rng, concept, *size())
            mask_path = f"masks/{n:05d}.png"
            mask.save(root / mask_path)
            if awkward_jobs and rng.random() < 0.05:
                fmt = awkward_jobs.pop()
                data, suffix = _awkward(img, fmt)
                add(f"{n:05d}.{suffix}", data, kind="awkward", concept=concept, transform=fmt, mask_path=mask_path,
                    dup_group=n)  # fmt: skip
            else:
                add(f"{n:05d}.jpg", _jpeg(img), kind="concept", concept=concept, mask_path=mask_path, dup_group=n)
            originals.append((img, concept, n))
            n += 1
    for fmt in awkward_jobs:  # whatever the random placement above left over
        concept = CONCEPTS[n % len(CONCEPTS)]
        img, mask = draw_concept(rng, concept, *size())
        mask.save(root / f"masks/{n:05d}.png")
        data, suffix = _awkward(img, fmt)
        add(f"{n:05d}.{suffix}", data, kind="awkward", concept=concept, transform=fmt, mask_path=f"masks/{n:05d}.png",
            dup_group=n)  # fmt: skip
        n += 1
    for _ in range(config.off_topic):
        img = draw_off_topic(rng, *size())
        add(f"{n:05d}.jpg", _jpeg(img), kind="off_topic", dup_group=n)
        originals.append((img, None, n))
        n += 1
    # Exact copies: the same bytes as an original under a new URL.
    concept_rows = [r for r in rows if r["kind"] == "concept"]
    for i in rng.choice(len(concept_rows), config.exact_duplicates, replace=True):
        source = concept_rows[int(i)]
        name = source["url_template"].rsplit("/", 1)[1]
        add(f"{n:05d}_copy.jpg", (web / name).read_bytes(), kind="exact_duplicate", concept=source["concept"],
            dup_group=source["dup_group"], mask_path=source["mask_path"])  # fmt: skip
        n += 1
    for j, i in enumerate(rng.choice(len(originals), config.near_duplicates, replace=False)):
        img, concept, group = originals[int(i)]
        transform = NEAR_DUPLICATE_TRANSFORMS[j % len(NEAR_DUPLICATE_TRANSFORMS)]
        add(f"{n:05d}_near.jpg", near_duplicate(img, transform, rng), kind="near_duplicate", concept=concept,
            dup_group=group, transform=transform)  # fmt: skip
        n += 1
    # Seed and evaluation sets, drawn from the same generator but never served as such.
    for concept in config.seeded_concepts():
        folder = root / "seeds" / concept
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(config.seed_images_per_concept):
            draw_concept(rng, concept, *size())[0].save(folder / f"{k:03d}.jpg", quality=90)
    eval_images: list[tuple[str, Image.Image, str]] = []
    for concept in CONCEPTS:
        folder = root / "eval" / concept
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(config.eval_images_per_concept):
            img = draw_concept(rng, concept, *size())[0]
            img.save(folder / f"{k:03d}.jpg", quality=90)
            eval_images.append((f"eval/{concept}/{k:03d}.jpg", img, concept))
    leak_group = n + 100_000  # groups of leaks are disjoint from pool groups
    for j, i in enumerate(rng.choice(len(eval_images), config.eval_leaks, replace=False)):
        path, img, concept = eval_images[int(i)]
        transform = ("reencode", "resize", "crop", "colour")[j % 4]
        add(f"{n:05d}_leak.jpg", near_duplicate(img, transform, rng), kind="eval_leak", concept=concept,
            transform=transform, leak_of=path, dup_group=leak_group + int(i))  # fmt: skip
        n += 1
    _add_broken(rows, web, config, rng)
    order = rng.permutation(len(rows))  # planted entries are spread over the list, as on the web
    table = pa.Table.from_pylist([rows[i] for i in order], schema=GROUND_TRUTH_SCHEMA)
    pq.write_table(table, root / "pages.parquet")
    marker.write_text(json.dumps(stamp))
    return root


def concept_folder(root: str | Path, folder: str | Path) -> Path:
    """An ImageFolder of symlinks to the web's concept images, ``folder/<concept>/<file>``: a labelled
    set with the classes of ``root/eval/`` (e.g. the bank of a k-NN evaluation whose queries are
    eval/). Only plain concept pages: no copies, leaks, awkward encodings or broken files. Idempotent."""
    root, folder = Path(root), Path(folder)
    pages_path = root / "pages.parquet"
    if not pages_path.is_file():
        raise FileNotFoundError(f"{pages_path} not found: {root} is not a demo web written by generate()")
    pages = pq.read_table(pages_path, columns=["url_template", "kind", "concept"]).to_pylist()
    for page in pages:
        if page["kind"] != "concept":
            continue
        name = page["url_template"].rsplit("/", 1)[1]
        link = folder / page["concept"] / name
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((root / "web" / name).resolve())
    return folder


def _add_broken(rows: list[dict], web: Path, config: DemoWebConfig, rng: np.random.Generator) -> None:
    (web / "broken").mkdir(exist_ok=True)
    static = {
        "truncated_jpeg": lambda k: _jpeg(draw_off_topic(rng, 200, 200))[:900],
        "random_bytes": lambda k: rng.bytes(3000),
        "svg": lambda k: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
        b'<circle cx="32" cy="32" r="20"/></svg>',
        "decompression_bomb": lambda k: _bomb_png(),
    }
    suffix = {"truncated_jpeg": "jpg", "random_bytes": "jpg", "svg": "svg", "decompression_bomb": "png"}
    for kind, error_class in BROKEN_KINDS:
        for k in range(config.broken_per_kind):
            if kind in static:
                name = f"broken/{kind}_{k}.{suffix[kind]}"
                (web / name).write_bytes(static[kind](k))
                template = "{base}/img/" + name
            else:
                template = {
                    "http_404": "{base}/status/404/" + f"{k}.jpg",
                    "http_500": "{base}/status/500/" + f"{k}.jpg",
                    "connection_refused": "{refused}/" + f"{k}.jpg",
                    "dns_failure": f"http://demo-web-{k}.invalid/image.jpg",
                    "timeout": "{base}/slow/" + f"{k}.jpg",
                    "redirect_loop": "{base}/loop/a/" + f"{k}",
                    "empty_body": "{base}/empty/" + f"{k}.jpg",
                    "html_as_image": "{base}/html/" + f"{k}.jpg",
                    "too_large_declared": "{base}/large/declared/" + f"{k}.jpg",
                    "too_large_streamed": "{base}/large/streamed/" + f"{k}.jpg",
                    "file_scheme": "file:///etc/hostname",
                    "ftp_scheme": "ftp://{host}/" + f"{k}.jpg",
                    "internal_address": "{internal}/img/broken/" + f"{k}.jpg",
                    "redirect_to_internal": "{base}/redirect?to={internal}/img/" + f"{k}.jpg",
                }[kind]
            row = dict.fromkeys(GROUND_TRUTH_SCHEMA.names)
            row.update(url_template=template, caption="a broken link", kind="broken", dup_group=-1,
                       transform=kind, expected_status="failed", expected_error_class=error_class)  # fmt: skip
            rows.append(row)


# ---------------------------------------------------------------- serving


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class DemoServer:
    """Serves a generated demo web on 127.0.0.1; the special routes play the broken web.

    ``delay_s`` slows every image response (tests use it to interrupt an ingest mid-run).
    """

    def __init__(self, root: str | Path, port: int | None = None, refused_port: int | None = None,
                 delay_s: float = 0.0, slow_s: float = 30.0, large_bytes: int = 48 * 1024 * 1024):  # fmt: skip
        self.root = Path(root)
        if not (self.root / "pages.parquet").exists():
            raise FileNotFoundError(f"{self.root} holds no generated demo web: call demo_web.generate() first")
        self.delay_s, self.slow_s, self.large_bytes = delay_s, slow_s, large_bytes
        self._stopping = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self._pick_port(port)), self._handler())
        self._server.daemon_threads = True
        # A bound socket that never listens: connecting to its port is refused, and no other
        # program can take the port while the server runs.
        self._refusing = socket.socket()
        self._refusing.bind(("127.0.0.1", self._pick_port(refused_port)))
        self._thread: threading.Thread | None = None

    @staticmethod
    def ports_of(ground_truth: str | Path) -> tuple[int | None, int | None]:
        """The (server, refused) ports of an earlier URL list, so a rerun can serve the same URLs."""
        rows = pq.read_table(ground_truth, columns=["url", "transform"]).to_pylist()
        served = next((r["url"] for r in rows if r["url"].startswith("http://127.0.0.1:")), None)
        refused = next((r["url"] for r in rows if r["transform"] == "connection_refused"), None)
        return (urlsplit(served).port if served else None, urlsplit(refused).port if refused else None)

    @staticmethod
    def _pick_port(preferred: int | None) -> int:
        # A rerun prefers the port of the first run, so that a resumed ingest sees the same URLs.
        if preferred:
            try:
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
        return free_port()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DemoServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-web", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._refusing.close()

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_url_list(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``urls.parquet`` (url, caption) and ``ground_truth.parquet`` for this server."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        pages = pq.read_table(self.root / "pages.parquet")
        fill = {
            "base": self.base_url,
            "host": "127.0.0.1",
            "refused": f"http://127.0.0.1:{self._refusing.getsockname()[1]}",
            "internal": f"http://127.0.0.2:{self.port}",
        }
        urls = [template.format(**fill) for template in pages.column("url_template").to_pylist()]
        truth = pages.add_column(0, "url", pa.array(urls, pa.string()))
        pq.write_table(truth, out_dir / "ground_truth.parquet")
        url_list = pa.table({"url": urls, "caption": pages.column("caption")})
        pq.write_table(url_list, out_dir / "urls.parquet")
        return out_dir / "urls.parquet", out_dir / "ground_truth.parquet"

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test and demo output readable
                pass

            def _send(self, status: int, body: bytes, content_type: str = "image/jpeg", length: bool = True) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                try:
                    self._route()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (size limit, timeout): expected

            def _route(self) -> None:
                parts = urlsplit(self.path)
                path = parts.path
                if path.startswith("/img/"):
                    target = (server.root / "web" / path[len("/img/"):]).resolve()
                    if server.root.resolve() not in target.parents or not target.is_file():
                        return self._send(404, b"not found", "text/plain")
                    if server.delay_s:
                        server._stopping.wait(server.delay_s)
                    return self._send(200, target.read_bytes())
                if path.startswith("/status/"):
                    code = int(path.split("/")[2])
                    return self._send(code, b"error page", "text/html")
                if path.startswith("/slow/"):
                    server._stopping.wait(server.slow_s)
                    return self._send(404, b"too late", "text/plain")
                if path.startswith("/loop/"):
                    _, _, side, k = path.split("/")
                    self.send_response(302)
                    self.send_header("Location", f"/loop/{'b' if side == 'a' else 'a'}/{k}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", parse_qs(parts.query)["to"][0])
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if path.startswith("/empty/"):
                    return self._send(200, b"")
                if path.startswith("/html/"):
                    return self._send(200, b"<!DOCTYPE html><html><body>Not an image</body></html>")
                if path.startswith("/large/"):
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    if "declared" in path:
                        self.send_header("Content-Length", str(server.large_bytes))
                    else:
                        self.close_connection = True  # body ends when the connection closes
                    self.end_headers()
                    chunk = b"\xff" * 65536
                    for _ in range(server.large_bytes // len(chunk)):
                        if server._stopping.is_set():
                            break
                        self.wfile.write(chunk)
                    return None
                return self._send(404, b"not found", "text/plain")

        return Handler
