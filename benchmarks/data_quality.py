"""Data-quality benchmark: planted label errors, duplicates, leakage and outliers on digits.

scikit-learn's 1,797 handwritten digits (written by :func:`visionflow.demo.write_digits`, 8x8
PNG files; ``--size`` upscales them, bicubic) become a dataset with a train/val/test split in a
label file, and then we plant, with known ground truth:

* label errors: a share (``--rates``) of the base images gets a random wrong label, over several
  seeds; precision at k = the share of the k most suspicious images that were flipped, with k
  the number flipped;
* exact duplicates (byte copies) and near duplicates (JPEG re-encoded at quality 70, resized by
  0.8x or 1.25x, a slight centre crop of 6 %, brightness +15 %) of other base images, in the same
  split; a planted group is found when all its members end in one duplicate group;
* two cross-split duplicates (a train image copied into test: one byte copy, one re-encoded):
  the leakage warning must name them;
* outliers: uniform noise, a checkerboard, a blank image and two inverted digits.

Images and embeddings are the same for every seed (only the label file changes), so the
embeddings are computed once (cached, labels are not part of the key) and each seed measures
the analysis itself. Prints a Markdown table (paste into BENCHMARKS.md) and writes the raw
results as JSON.

    flock /tmp/visionflow-bench.lock .venv/bin/python benchmarks/data_quality.py
    flock /tmp/visionflow-bench.lock .venv/bin/python benchmarks/data_quality.py --size 8
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from visionflow.data.readers import read_dataset
from visionflow.demo import write_digits
from visionflow.explain.quality import QualityConfig, QualityResult, analyze_quality

CLASSES = [str(d) for d in range(10)]
NEAR_KINDS = ("jpeg70", "resize0.8", "resize1.25", "crop6", "bright1.15")


def _variant(image: Image.Image, kind: str) -> tuple[Image.Image | bytes, str]:
    """A near-duplicate of ``image``: (image or encoded bytes, file suffix)."""
    w, h = image.size
    if kind == "jpeg70":
        buf = io.BytesIO()
        image.convert("RGB").save(buf, "JPEG", quality=70)
        return buf.getvalue(), ".jpg"
    if kind.startswith("resize"):
        f = float(kind.removeprefix("resize"))
        return image.resize((max(4, round(w * f)), max(4, round(h * f))), Image.BICUBIC), ".png"
    if kind == "crop6":
        c = max(1, round(0.03 * w))
        return image.crop((c, c, w - c, h - c)), ".png"
    if kind == "bright1.15":
        return ImageEnhance.Brightness(image).enhance(1.15), ".png"
    raise ValueError(kind)


def _outliers(size: int, rng: np.random.Generator, digits: list[Image.Image]) -> dict[str, Any]:
    noise = Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L")
    board = np.indices((size, size)).sum(axis=0) // max(1, size // 8) % 2 * 255
    blank = Image.new("L", (size, size), 128)
    inverted = [Image.fromarray(255 - np.asarray(d.convert("L"))) for d in digits]
    return {
        "noise": noise,
        "checkerboard": Image.fromarray(board.astype(np.uint8), "L"),
        "blank": blank,
        "inverted_a": inverted[0],
        "inverted_b": inverted[1],
    }


def build(root: Path, size: int, seed: int = 1234) -> dict[str, Any]:
    """Write the images once: base digits, planted duplicates and outliers; return the truth."""
    src = write_digits(root.parent / "digits_src")
    base_index = read_dataset(src)
    rng = np.random.default_rng(seed)
    base: list[dict[str, Any]] = []
    for i, s in enumerate(base_index.samples):
        img = Image.open(s.path).convert("L")
        if size != img.width:
            img = img.resize((size, size), Image.BICUBIC)
        rel = f"images/{s.label}/{i:04d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel)
        base.append({"path": rel, "label": s.label})
    n = len(base)
    order = rng.permutation(n)
    split = np.empty(n, dtype=object)
    split[order[: int(0.7 * n)]] = "train"
    split[order[int(0.7 * n) : int(0.85 * n)]] = "val"
    split[order[int(0.85 * n) :]] = "test"
    for b, s in zip(base, split, strict=True):
        b["split"] = s
    used = set()
    pick = iter(int(i) for i in rng.permutation(n))

    def take(where: str | None = None) -> int:
        for i in pick:
            if i not in used and (where is None or base[i]["split"] == where):
                used.add(i)
                return i
        raise RuntimeError("ran out of base images")

    planted: list[dict[str, Any]] = []
    extra: list[dict[str, Any]] = []
    (root / "planted").mkdir(exist_ok=True)
    for k in range(6):  # exact copies
        i = take()
        rel = f"planted/exact_{k}.png"
        shutil.copyfile(root / base[i]["path"], root / rel)
        extra.append({"path": rel, "label": base[i]["label"], "split": base[i]["split"]})
        planted.append({"kind": "exact", "paths": [base[i]["path"], rel]})
    for kind in NEAR_KINDS:
        for k in range(4):
            i = take()
            out, suffix = _variant(Image.open(root / base[i]["path"]), kind)
            rel = f"planted/{kind}_{k}{suffix}"
            if isinstance(out, bytes):
                (root / rel).write_bytes(out)
            else:
                out.save(root / rel)
            extra.append({"path": rel, "label": base[i]["label"], "split": base[i]["split"]})
            planted.append({"kind": kind, "paths": [base[i]["path"], rel]})
    leaks = []
    for k, kind in enumerate(("exact", "jpeg70")):
        i = take("train")
        rel = f"planted/leak_{k}" + (".png" if kind == "exact" else ".jpg")
        if kind == "exact":
            shutil.copyfile(root / base[i]["path"], root / rel)
        else:
            out, _ = _variant(Image.open(root / base[i]["path"]), kind)
            assert isinstance(out, bytes)
            (root / rel).write_bytes(out)
        extra.append({"path": rel, "label": base[i]["label"], "split": "test"})
        planted.append({"kind": f"leak-{kind}", "paths": [base[i]["path"], rel]})
        leaks.append([base[i]["path"], rel])
    outlier_paths = []
    digits = [Image.open(root / base[take()]["path"]) for _ in range(2)]
    for name, img in _outliers(size, rng, digits).items():
        rel = f"planted/outlier_{name}.png"
        img.save(root / rel)
        extra.append({"path": rel, "label": str(rng.integers(0, 10)), "split": "train"})
        outlier_paths.append(rel)
    return {
        "base": base,
        "extra": extra,
        "used": sorted(used),
        "planted": planted,
        "leaks": leaks,
        "outliers": outlier_paths,
    }


def write_labels(root: Path, truth: dict[str, Any], rate: float, seed: int) -> tuple[Path, set]:
    """A label file with ``rate`` of the (unplanted) base images flipped; returns the flips."""
    rng = np.random.default_rng(seed)
    base = truth["base"]
    free = [i for i in range(len(base)) if i not in set(truth["used"])]
    k = round(rate * len(base))
    flipped = {int(i) for i in rng.choice(free, size=k, replace=False)}
    path = root / f"labels_r{round(rate * 100):02d}_s{seed}.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for i, b in enumerate(base):
            label = b["label"]
            if i in flipped:
                label = str(rng.choice([c for c in CLASSES if c != label]))
            w.writerow([b["path"], label, b["split"]])
        for e in truth["extra"]:
            w.writerow([e["path"], e["label"], e["split"]])
    return path, {base[i]["path"] for i in flipped}


def score(result: QualityResult, truth: dict[str, Any], flipped: set[str]) -> dict[str, Any]:
    k = len(flipped)
    ranked = [x.path for x in result.label_issues]
    hits = sum(1 for p in ranked[:k] if p in flipped)
    likely = [x.path for x in result.label_issues if x.likely]
    group_of: dict[str, int] = {}
    for g in result.duplicate_groups:
        for p in g.paths:
            group_of[p] = g.id
    found: dict[str, list[bool]] = {}
    planted_pairs = set()
    for p in truth["planted"]:
        a, b = p["paths"]
        planted_pairs.add(frozenset((a, b)))
        ok = a in group_of and group_of.get(a) == group_of.get(b)
        found.setdefault(p["kind"], []).append(ok)
    false_groups = 0
    oversized = 0
    for g in result.duplicate_groups:
        members = set(g.paths)
        if not any(pair <= members for pair in planted_pairs):
            false_groups += 1
        elif len(members) > 2:
            oversized += 1
    leak_paths = [set(x.paths) for x in result.leaks]
    leaks_found = sum(1 for a, b in truth["leaks"] if any({a, b} <= s for s in leak_paths))
    warned = any(w.startswith("leakage") for w in result.warnings)
    outl = {o.path for o in result.outliers}
    return {
        "k": k,
        "precision_at_k": hits / k if k else None,
        "listed": len(ranked),
        "recall_listed": sum(1 for p in ranked if p in flipped) / k if k else None,
        "likely": len(likely),
        "likely_precision": (sum(1 for p in likely if p in flipped) / len(likely))
        if likely
        else None,
        "estimated": result.estimated_label_errors,
        "duplicates_found": {kind: f"{sum(v)}/{len(v)}" for kind, v in found.items()},
        "duplicates_recall": sum(sum(v) for v in found.values())
        / sum(len(v) for v in found.values()),
        "groups": len(result.duplicate_groups),
        "false_groups": false_groups,
        "planted_groups_with_extra_members": oversized,
        "leaks_found": f"{leaks_found}/{len(truth['leaks'])}",
        "leak_warning": warned,
        "false_leaks": len(result.leaks) - leaks_found,
        "outliers_found": f"{len(outl & set(truth['outliers']))}/{len(truth['outliers'])}",
        "outliers_flagged": len(outl),
        "timings": result.timings,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (8 = native)")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--img-size", type=int, default=None, help="backbone input size")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="vf-dq-"))
    root = work / f"digits{args.size}"
    t0 = time.monotonic()
    saved = root / "truth.json"
    if saved.is_file():  # the same images again: their cached embeddings stay valid
        truth = json.loads(saved.read_text())
    else:
        if root.exists():
            shutil.rmtree(root)
        truth = build(root, args.size)
        saved.write_text(json.dumps(truth))
    build_s = time.monotonic() - t0
    cache = work / "cache"
    rows = []
    for rate in args.rates:
        for seed in args.seeds:
            labels, flipped = write_labels(root, truth, rate, seed)
            index = read_dataset(labels)
            t = time.monotonic()
            result = analyze_quality(
                index,
                backbone=args.backbone,
                img_size=args.img_size,
                cache_dir=cache,
                out_dir=work / f"out_r{rate}_s{seed}",
                config=QualityConfig(),
                progress=False,
            )
            seconds = time.monotonic() - t
            cached = result.embedding.get("backend") == "cache"
            row = {"rate": rate, "seed": seed, "seconds": seconds, "embeddings_cached": cached}
            row |= score(result, truth, flipped)
            row["embedding"] = result.embedding.get("backend")
            rows.append(row)
            print(json.dumps(row), flush=True)
    load = os.getloadavg()
    print(
        f"\nimages: {len(truth['base']) + len(truth['extra'])} ({args.size} px), "
        f"build {build_s:.1f}s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        "\n| flipped | seed | k | precision@k | listed | likely (precision) | cleanlab estimate |"
        " duplicates found | false groups | leakage | outliers found (flagged) | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lp = (
            f"{r['likely']} ({r['likely_precision']:.2f})"
            if r["likely_precision"] is not None
            else "0"
        )
        print(
            f"| {r['rate']:.0%} | {r['seed']} | {r['k']} | {r['precision_at_k']:.3f} |"
            f" {r['listed']} | {lp} | {r['estimated']} | {r['duplicates_recall']:.0%} |"
            f" {r['false_groups']} | {r['leaks_found']}{' warned' if r['leak_warning'] else ''}"
            f" (false {r['false_leaks']}) |"
            f" {r['outliers_found']} ({r['outliers_flagged']}) |"
            f" {r['seconds']:.1f}{'' if r['embeddings_cached'] else ' (embeddings)'} |"
        )
    print("\nduplicates by kind (first run):", json.dumps(rows[0]["duplicates_found"]))
    print(
        "timings by stage (last run):",
        json.dumps({k: round(v, 2) for k, v in rows[-1]["timings"].items()}),
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"work": str(work), "json": str(args.json)},
                    "rows": rows,
                    "load": load,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
