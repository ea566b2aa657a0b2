"""Imports stream: `raygen data prepare` of a parquet or webdataset source
writes its shards in bounded memory (the peak RSS of the prepare process is
the same for a source 4x larger), the splits and order are those of the
seeded permutation of the whole pool, and corrupt records are skipped and
counted per split. Each prepare runs in a fresh process (its peak RSS is
its own) with the import's buffers set small, so the bound shows on a
source of tens of MiB."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raygen.data import read_manifest
from raygen.data.registry import pool_split

UNIQUE = 64           # distinct images, repeated (the import holds nothing either way)
SIDE = 64             # 64x64 RGB noise: about 12 KiB of PNG each
SEED, VAL = 3, 0.1

# Runs `raygen data prepare` in a fresh process with the import's buffers at
# 1 MiB and prints how far its RSS rose above where it stood after a warm-up
# prepare (which loads the code: the CLI imports Ray and torch): the peak
# (VmHWM, reset first) less the RSS before.
PREPARE = """
import sys, tempfile
from pathlib import Path
import raygen.data.sources._reorder as reorder
import raygen.data.sources.parquet_import as parquet_import
from raygen.jobs.cli import main
reorder.BUFFER_BYTES = reorder.BUCKET_BYTES = 2**20
parquet_import.BATCH_BYTES = 2**18
def status(field):
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))
with tempfile.TemporaryDirectory() as warm:
    assert main(["data", "prepare", "digits", "--out", warm + "/d", "--count", "20"]) == 0
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
rc = main(["data", "prepare", *sys.argv[1:]])
print("GROWTH_MB", status("VmHWM") - before, "RC", rc)
"""


def _pngs() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(UNIQUE):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def corrupt_rows(n: int) -> list[int]:
    return [7, n // 3, n // 2 + 1, n - 2]


def image_of(i: int, pngs: list[bytes], corrupt: set[int]) -> bytes:
    png = pngs[i % UNIQUE]
    return png[: len(png) // 2] if i in corrupt else png  # a truncated PNG cannot be decoded


def write_parquet(folder: Path, n: int) -> None:
    """n rows in files of 400 rows, row groups of 200 (a parquet import holds
    about one row group: the same size at 1x and 4x); `row` (an extra
    column) is the row's index."""
    pngs, corrupt = _pngs(), set(corrupt_rows(n))
    folder.mkdir(parents=True)
    for k, start in enumerate(range(0, n, 400)):
        rows = range(start, min(n, start + 400))
        pq.write_table(pa.table({"image": [image_of(i, pngs, corrupt) for i in rows], "label": [i % 5 for i in rows],
                                 "row": [float(i) for i in rows]}), folder / f"part-{k:03d}.parquet",
                       row_group_size=200, compression="none", use_dictionary=False)


def write_tar(path: Path, n: int) -> None:
    """n samples; the caption names the sample's index; every 25th has no image (not part of the pool)."""
    pngs, corrupt = _pngs(), set(corrupt_rows(n))
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            members = [("cls", str(i % 5).encode()), ("txt", f"row {i}".encode())]
            members.insert(0, ("png", image_of(i, pngs, corrupt))) if i % 25 != 24 else None
            for ext, data in members:
                info = tarfile.TarInfo(f"s/{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def prepare(source: Path, out: Path) -> float:
    args = [str(source), "--out", str(out), "--seed", str(SEED), "--val-fraction", str(VAL), "--shard-mb", "1"]
    done = subprocess.run([sys.executable, "-c", PREPARE, *args], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "RC 0" in done.stdout, done.stdout + done.stderr
    return float(done.stdout.split("GROWTH_MB")[1].split()[0])


def expected(pool_rows: list[int], corrupt: set[int]) -> dict[str, tuple[list[int], int]]:
    """Per split: the source rows it holds, in order, and how many it skips."""
    idx = pool_split(len(pool_rows), count=None, val_fraction=VAL, seed=SEED)
    out = {}
    for split, order in idx.items():
        rows = [pool_rows[i] for i in order]
        out[split] = ([r for r in rows if r not in corrupt], sum(r in corrupt for r in rows))
    return out


def check_dataset(out: Path, pool_rows: list[int], corrupt: set[int], row_of) -> None:
    m = read_manifest(out, verify=True)
    for split, (rows, skipped) in expected(pool_rows, corrupt).items():
        info = m.splits[split]
        assert (info.rows, info.skipped) == (len(rows), skipped), split
        got = [row_of(r) for p in m.shard_paths(split) for r in pq.read_table(p).to_pylist()]
        assert got == rows, split
    assert sum(s.skipped for s in m.splits.values()) == len(corrupt)


@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_import_streams_in_bounded_memory_and_counts_corrupt_records(tmp_path, kind):
    n1 = 800
    growth = {}
    for scale in (1, 4):
        n = n1 * scale
        if kind == "parquet":
            source = tmp_path / f"src-{scale}"
            write_parquet(source, n)
            pool_rows = list(range(n))
            row_of = lambda r: int(r["row"])  # noqa: E731
        else:
            source = tmp_path / f"src-{scale}.tar"
            write_tar(source, n)
            pool_rows = [i for i in range(n) if i % 25 != 24]
            row_of = lambda r: int(r["caption"].split()[1])  # noqa: E731
        source_mb = sum(f.stat().st_size for f in ([source] if source.is_file() else source.iterdir())) / 2**20
        out = tmp_path / f"out-{scale}"
        growth[scale] = prepare(source, out)
        print(f"{kind} {scale}x: {n} records, source {source_mb:.1f} MiB, peak RSS rose {growth[scale]:.1f} MiB")
        check_dataset(out, pool_rows, set(corrupt_rows(n)), row_of)
        # 12 MiB of PNG per 1,000 records: holding the 4x source would add 3x the 1x source's size
        assert source_mb > 8 * scale
    assert growth[4] <= growth[1] * 1.1 + 3, growth
