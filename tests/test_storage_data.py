"""Datasets on object storage (a local moto S3): `raygen data prepare --out
s3://...`, a spec reading them back (a checked local copy plus read tasks
that stream the shards from S3), and the one-line errors for a wrong
endpoint, bucket or credentials. No Ray."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from raygen import storage
from raygen.data import DataError, ensure_dataset, load_split_images, read_manifest
from raygen.data.manifest import MANIFEST_NAME
from raygen.data.pipeline import _read_units, make_recipe
from raygen.data.decode import DecodeParams
from raygen.jobs.cli import main
from raygen.spec.schema import DataSpec, ScaleSpec

from s3_server import SECRET, s3_server  # noqa: F401  (fixture)



def _cli(*args: str) -> tuple[int, str, str]:
    """`raygen ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def s3_digits(s3_server):  # noqa: F811
    """`raygen data prepare digits --out s3://.../digits` through the CLI."""
    uri = s3_server.uri("datasets", "digits")
    rc, out, err = _cli("data", "prepare", "digits", "--out", uri, "--count", "96", "--resolution", "8",
                        "--shard-mb", "0.002")
    assert rc == 0, err
    assert uri in out and SECRET not in out + err
    return uri


def test_prepare_writes_shards_and_manifest_to_s3(s3_server, s3_digits):  # noqa: F811
    keys = s3_server.keys("datasets/digits/")
    names = [k.rsplit("/", 1)[1] for k in keys]
    assert MANIFEST_NAME in names
    shards = [n for n in names if n.endswith(".parquet")]
    assert any(n.startswith("train-") for n in shards) and any(n.startswith("val-") for n in shards)
    assert len(shards) > 2  # the size bound split it
    assert not [n for n in names if n.startswith(".tmp-")]  # no temp files uploaded


def test_a_spec_reads_the_dataset_from_s3(s3_digits, tmp_path):
    spec = DataSpec(dataset=s3_digits, root=str(tmp_path / "data"), resolution=8, channels=1)
    local = ensure_dataset(spec)
    m = read_manifest(local, verify=True)  # every shard copied with its checksum
    assert m.remote == s3_digits and m.counts["train"] == 96
    assert ensure_dataset(spec) == local  # the second call reuses the copy
    batch = load_split_images(local, "train", spec, limit=10)
    assert tuple(batch["image"].shape) == (10, 1, 8, 8) and float(batch["image"].std()) > 0

    # the pipeline's read tasks read the shards from S3 itself, not from the local copy
    recipe = make_recipe(m, "train", DecodeParams.for_spec(m, spec))
    assert all(u.file.startswith(s3_digits + "/train-") for u in recipe.units)
    u = recipe.units[0]
    rows = _read_units({"file": np.array([u.file]), "row_group": np.array([u.row_group]),
                        "lo": np.array([0]), "hi": np.array([u.hi])}, recipe.params)
    assert len(rows["index"]) == u.hi and list(rows["index"]) == list(range(u.first_index, u.first_index + u.hi))


def test_a_changed_remote_dataset_refreshes_the_copy(s3_server, s3_digits, tmp_path):  # noqa: F811
    spec = DataSpec(dataset=s3_digits, root=str(tmp_path / "data"), resolution=8, channels=1)
    first = ensure_dataset(spec)
    rc, _, err = _cli("data", "prepare", "digits", "--out", s3_digits, "--count", "80", "--resolution", "8")
    assert rc == 0, err
    assert read_manifest(ensure_dataset(spec)).counts["train"] == 80 and ensure_dataset(spec) == first


def test_missing_dataset_bucket_endpoint_and_keys_are_one_line(s3_server, tmp_path, monkeypatch):  # noqa: F811
    def error(uri: str) -> str:
        with pytest.raises((DataError, storage.StorageError)) as info:
            ensure_dataset(DataSpec(dataset=uri, root=str(tmp_path), resolution=8, channels=1))
        text = str(info.value)
        assert "\n" not in text and SECRET not in text
        return text

    assert "no manifest.json" in error(s3_server.uri("nothing-here"))
    assert "bucket 'no-such-bucket' does not exist" in error("s3://no-such-bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    assert "cannot reach the S3 endpoint http://127.0.0.1:9; check AWS_ENDPOINT_URL" in error(s3_server.uri("x"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in error(s3_server.uri("x"))
    # and through the CLI: exit 2 with the line, no traceback
    rc, _, err = _cli("data", "prepare", "digits", "--out", "s3://no-such-bucket/d", "--count", "16")
    assert rc == 2 and err.strip() == ("raygen data: error: s3://no-such-bucket/d: no S3 credentials; set "
                                       "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
                                       "environment of every process that reads or writes it")


def test_scale_storage_must_be_an_s3_uri():
    assert ScaleSpec(storage="s3://bucket/raygen").storage == "s3://bucket/raygen"
    for bad, words in (("gs://b/x", "unsupported storage scheme 'gs://'"), ("s3://", "no bucket")):
        with pytest.raises(ValueError, match=words):
            ScaleSpec(storage=bad)
