"""Object-storage URIs (`s3://bucket/key`) through pyarrow filesystems.

The endpoint and credentials come only from the standard AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION`/`AWS_REGION`, or a profile / role
the AWS SDK finds), the same ones boto3 and MLflow read. Nothing here ever
prints or logs a key: errors name the variables, never their values.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

SCHEMES = ("s3",)
#: other standard ways the AWS SDK finds credentials (profiles, web identity, container roles)
_OTHER_CREDENTIALS = ("AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                      "AWS_CONTAINER_CREDENTIALS_FULL_URI")


class StorageError(RuntimeError):
    """One line: what is wrong with a storage URI or its endpoint, and the fix."""


def is_uri(path: str | os.PathLike | None) -> bool:
    """True for `s3://...` (an object-store URI), False for a local path."""
    return isinstance(path, str) and re.match(r"^[a-z][a-z0-9+.-]*://", path) is not None


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; raises StorageError for anything else."""
    scheme, _, rest = uri.partition("://")
    if scheme not in SCHEMES:
        raise StorageError(f"{uri}: unsupported storage scheme '{scheme}://'; use s3://BUCKET/PATH or a local folder")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket; write s3://BUCKET/PATH")
    return bucket, key.strip("/")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _check_credentials(uri: str) -> None:
    has_keys = bool(os.environ.get("AWS_ACCESS_KEY_ID")) and bool(os.environ.get("AWS_SECRET_ACCESS_KEY"))
    if has_keys or any(os.environ.get(k) for k in _OTHER_CREDENTIALS):
        return
    raise StorageError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                       "(or AWS_PROFILE) in the environment of every process that reads or writes it")


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for an s3:// URI."""
    from pyarrow import fs as pafs
    bucket, key = split_uri(uri)
    _check_credentials(uri)
    kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
              "connect_timeout": 5, "request_timeout": 60,
              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
    url = endpoint()
    if url:
        scheme, _, host = url.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/") if host else url, scheme=scheme if host else "https")
        # a custom endpoint (MinIO, moto, Ceph) serves buckets as paths, not as subdomains
        kwargs["force_virtual_addressing"] = False
    # keys come from the environment through the AWS SDK's own chain (never passed around here)
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def explain(uri: str, err: BaseException) -> StorageError:
    """A one-line StorageError for a failed S3 call (unreachable endpoint,
    missing bucket, refused credentials), naming the variable to fix."""
    text = str(err)
    where = endpoint() or "the default AWS endpoint"
    bucket = split_uri(uri)[0]
    if re.search(r"curlCode: (6|7|28)|Couldn't connect|Could not resolve|Connection refused|timed out", text, re.I):
        return StorageError(f"{uri}: cannot reach the S3 endpoint {where}; check AWS_ENDPOINT_URL and that the "
                            "server is up")
    if re.search(r"NoSuchBucket|bucket does not exist|HTTP status 404", text, re.I):
        return StorageError(f"{uri}: bucket '{bucket}' does not exist at {where}; create it first "
                            f"(e.g. `aws s3 mb s3://{bucket}`)")
    if re.search(r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|HTTP status 403|credentials", text, re.I):
        return StorageError(f"{uri}: S3 refused the credentials; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return StorageError(f"{uri}: S3 error at {where}: {first}")


def check(uri: str) -> None:
    """Fail fast, in one line, when `uri`'s endpoint, bucket or credentials are wrong."""
    from pyarrow import fs as pafs
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
        # listing the prefix checks the credentials too (moto and S3 answer a bucket HEAD without signing checks)
        fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as err:
        raise explain(uri, err) from None
    if info.type == pafs.FileType.NotFound:
        raise explain(uri, OSError("NoSuchBucket"))


def exists(uri: str) -> bool:
    from pyarrow import fs as pafs
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        raise explain(uri, err) from None


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as err:
        if "NoSuchKey" in str(err) or "Path does not exist" in str(err):
            raise FileNotFoundError(uri) from None
        raise explain(uri, err) from None


def write_bytes(uri: str, data: bytes) -> None:
    """An S3 PUT is atomic: readers see the old object or the whole new one."""
    fs, path = filesystem(uri)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as err:
        raise explain(uri, err) from None


def open_input_file(uri: str):
    """A seekable file (parquet readers need random access)."""
    fs, path = filesystem(uri)
    try:
        return fs.open_input_file(path)
    except OSError as err:
        raise explain(uri, err) from None


def upload_dir(local: str | Path, uri: str, *, last: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> int:
    """Copy the folder `local` to `uri`; files named in `last` go after all
    others (a completion marker or manifest, so a reader never sees it before
    the files it vouches for); top-level names in `skip` stay behind.
    Returns the number of files copied."""
    from pyarrow import fs as pafs
    fs, path = filesystem(uri)
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.relative_to(local).parts[0] not in skip)
    files.sort(key=lambda p: p.name in last)  # stable: markers last
    lfs = pafs.LocalFileSystem()
    try:
        for p in files:
            pafs.copy_files(str(p), f"{path}/{p.relative_to(local).as_posix()}", source_filesystem=lfs,
                            destination_filesystem=fs)
    except OSError as err:
        raise explain(uri, err) from None
    return len(files)


def download_dir(uri: str, local: str | Path) -> int:
    """Copy every object under `uri` into the folder `local`; returns the count."""
    from pyarrow import fs as pafs
    fs, path = filesystem(uri)
    local = Path(local)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        files = [i for i in infos if i.type == pafs.FileType.File]
        for info in files:
            dest = local / info.path[len(path):].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(dest), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
    except OSError as err:
        raise explain(uri, err) from None
    return len(files)
