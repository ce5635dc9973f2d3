"""A colour dataset that is not in this repo, for the benchmarks: emoji by Unicode category.

The npm package ``emoji-datasource-<vendor>`` (MIT/Apache/CC-BY, by vendor) ships one 64x64
RGBA PNG per emoji and ``emoji.json`` with each emoji's Unicode category. This script writes a
folder-per-class dataset from it: ``OUT/<category>/<codepoints>.png`` for every emoji the
vendor draws, nine classes (Smileys & Emotion, People & Body, Animals & Nature, Food & Drink,
Travel & Places, Activities, Objects, Symbols, Flags; the five skin-tone swatches of
"Component" are left out). Google's set: 1,906 images, 85 (Activities) to 386 (People & Body)
per class. Real artwork, colour, transparent backgrounds (visionflow lays them on white).

    .venv/bin/python benchmarks/emoji_data.py OUT [--vendor google] [--tarball PATH]

Without ``--tarball`` it runs ``npm pack emoji-datasource-<vendor>`` (the npm registry, ~75 MB).
Then, for example:

    .venv/bin/python benchmarks/search_efficiency.py --data OUT ...
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

VENDORS = ("google", "apple", "twitter", "facebook")
LEFT_OUT = {"Component"}


def _slug(category: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-")


def fetch(vendor: str, into: Path) -> Path:
    """``npm pack`` the vendor's package into ``into`` and return the tarball."""
    if shutil.which("npm") is None:
        raise SystemExit("npm is not on PATH: install Node.js, or pass --tarball")
    done = subprocess.run(
        ["npm", "pack", f"emoji-datasource-{vendor}", "--pack-destination", str(into)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"npm pack emoji-datasource-{vendor} failed:\n{done.stderr}")
    return into / done.stdout.strip().splitlines()[-1]


def write_dataset(tarball: Path, vendor: str, out: Path) -> Counter[str]:
    """Write ``out/<category>/<unified>.png``; return the images per class."""
    counts: Counter[str] = Counter()
    with tarfile.open(tarball) as tar:
        meta = tar.extractfile("package/emoji.json")
        if meta is None:
            raise SystemExit(f"{tarball}: no package/emoji.json")
        for emoji in json.load(meta):
            if not emoji.get(f"has_img_{vendor}") or emoji["category"] in LEFT_OUT:
                continue
            member = tar.extractfile(f"package/img/{vendor}/64/{emoji['image']}")
            if member is None:
                raise SystemExit(f"{tarball}: no image {emoji['image']} for {emoji['name']}")
            folder = out / _slug(emoji["category"])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / emoji["image"]).write_bytes(member.read())
            counts[folder.name] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--vendor", choices=VENDORS, default="google")
    parser.add_argument("--tarball", type=Path, default=None, help="an npm pack of the package")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.tarball or fetch(args.vendor, Path(tmp))
        counts = write_dataset(tarball, args.vendor, args.out)
    for name, n in sorted(counts.items()):
        print(f"{name:20s} {n:5d}")
    print(f"{'total':20s} {sum(counts.values()):5d}  -> {args.out}")


if __name__ == "__main__":
    main()
