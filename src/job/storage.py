"""Where bytes live: local paths or object-store URIs behind one atomic `put`, and content fingerprints.

Locally an object is written to a hidden temp name, fsynced and renamed. Object stores have no
rename, but a PUT (or a completed multipart upload) is itself atomic: the object appears whole or
not at all. So on both, every object a reader can list is complete, and its presence is the commit.
Write failures become the one `OutputWriteError` here, so no caller has to translate them.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pyarrow.fs as pafs

from job.errors import OutputNotWritableError, OutputWriteError

# Local writes are staged here, outside the directories readers list (uniquely named: never shared).
TMP_DIR = "_state/tmp"
# Object-store requests that fail as stores do now and then (HTTP 500/503, throttling, a connection reset)
# are retried this many times in all, with the AWS SDK's exponential backoff and jitter (pyarrow's and
# boto3's "standard" mode): bounded, so a store that is really down still stops the run.
STORE_ATTEMPTS = 10


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode()


def parquet_bytes(frame: Any, **options: Any) -> bytes:
    """A polars DataFrame as Parquet bytes, for one `put`."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer, **options)
    return buffer.getvalue()


def is_uri(location: str | os.PathLike) -> bool:
    """s3://, gs://, ... (file:// and plain paths are local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for an object-store URI whose key may hold spaces or non-ASCII.

    `FileSystem.from_uri` parses the whole URI and rejects such keys, so only the bucket part
    goes through it (credentials and endpoints come from the environment, e.g. AWS_ENDPOINT_URL).
    """
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if scheme in ("gs", "gcs") and emulator:  # the variable google-cloud-storage and gcloud's emulators use
        endpoint_scheme, _, host = emulator.rpartition("://")
        return pafs.GcsFileSystem(anonymous=True, scheme=endpoint_scheme or "http", endpoint_override=host), rest
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    if isinstance(fs, pafs.S3FileSystem):
        fs = _s3_with_retries(fs.region)
    return fs, rest


def _s3_with_retries(region: str) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem as `from_uri` builds it (endpoint from AWS_ENDPOINT_URL, the bucket's
    region), retrying up to STORE_ATTEMPTS times instead of 3."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options = {}
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        options = {"endpoint_override": host, "scheme": scheme or "https"}
    return pafs.S3FileSystem(region=region, retry_strategy=pafs.AwsStandardS3RetryStrategy(STORE_ATTEMPTS),
                             **options)


def s3_client():
    """boto3's S3 client with the job's retries (the `s3` extra), or None without boto3.

    One request per small object: a PUT (pyarrow's output stream sends a 3-request multipart upload
    even for a status record) and a GET (pyarrow's input stream HEADs first). boto3 reads the same
    credentials and AWS_ENDPOINT_URL as pyarrow. One client per process and endpoint (building one
    costs tens of ms; clients are thread-safe).
    """
    return _s3_client_for(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
                          os.environ.get("AWS_ACCESS_KEY_ID"))


@functools.lru_cache(maxsize=8)
def _s3_client_for(endpoint: str | None, access_key: str | None):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return None
    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": STORE_ATTEMPTS}))


def download(uri: str, target: IO[bytes]) -> None:
    """An object's bytes into `target`: on S3 with boto3 one streamed GET (pyarrow HEADs first), else
    pyarrow's input stream. OSError if the store would not give them."""
    if uri.startswith("s3://") and (client := s3_client()) is not None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = uri.removeprefix("s3://").split("/", 1)
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(8 << 20):
                target.write(chunk)
        except (BotoCoreError, ClientError) as exc:
            raise OSError(f"GET {uri}: {exc}") from exc
    else:
        fs, remote = filesystem_for(uri)
        with fs.open_input_stream(remote) as stream:
            shutil.copyfileobj(stream, target, length=8 << 20)
    target.flush()


def s3_fingerprint(size: int, etag: str) -> str:
    """An object's content identity from what a listing or a HEAD says (no bytes read): its ETag
    changes whenever its content does."""
    return f"{size}:etag:{etag.strip(chr(34))}"


def _s3_put_if_absent(location: str, path: str, data: bytes) -> bool | None:
    """S3's conditional PUT (If-None-Match: *): whether it created the object; None without boto3.

    boto3 reads the same credentials and AWS_ENDPOINT_URL as pyarrow's S3 filesystem.
    """
    client = s3_client()
    if client is None:
        return None
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = path.split("/", 1)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise OutputWriteError(f"cannot write to output_dir={location}: {exc}") from exc
    except BotoCoreError as exc:
        raise OutputWriteError(f"cannot write to output_dir={location}: {exc}") from exc
    return True


def _gcs_put_if_absent(location: str, path: str, data: bytes) -> bool | None:
    """GCS's conditional PUT (ifGenerationMatch=0): whether it created the object; None without the client.

    google-cloud-storage finds credentials as pyarrow's GCS filesystem does (application default
    credentials), and STORAGE_EMULATOR_HOST for an emulator.
    """
    try:
        from google.api_core.exceptions import GoogleAPIError, PreconditionFailed
        from google.cloud import storage
    except ImportError:
        return None
    bucket, key = path.split("/", 1)
    try:
        storage.Client().bucket(bucket).blob(key).upload_from_string(data, if_generation_match=0)
    except PreconditionFailed:
        return False
    except (GoogleAPIError, OSError) as exc:
        raise OutputWriteError(f"cannot write to output_dir={location}: {exc}") from exc
    return True


_PUT_IF_ABSENT = {"s3": _s3_put_if_absent, "gs": _gcs_put_if_absent, "gcs": _gcs_put_if_absent}


class Store:
    """A directory (local or object-store prefix) whose objects are written whole or not at all.

    Make one per run in the driver and one per actor: an object-store filesystem is not free to build.
    """

    def __init__(self, location: str | os.PathLike) -> None:
        self.location = str(location)
        self.s3 = None
        if is_uri(self.location):
            self.fs, self.root = filesystem_for(self.location)
            self.local = False
            if self.location.startswith("s3://"):
                self.s3 = s3_client()
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = os.path.abspath(self.location.removeprefix("file://"))
            self.local = True

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def put(self, relative: str, data: bytes) -> None:
        try:
            if self.local:
                atomic_write(Path(self.path(relative)), lambda handle: handle.write(data), Path(self.path(TMP_DIR)))
            elif self.s3 is not None:
                self._s3_call("put_object", relative, Body=data)
            else:
                with self.fs.open_output_stream(self.path(relative)) as stream:
                    stream.write(data)
        except OSError as exc:
            raise OutputWriteError.from_os_error(self.location, exc) from exc

    def create_exclusive(self, relative: str, data: bytes) -> bool:
        """Write `relative` only if it does not exist; whether this call created it.

        Atomic on a local or shared POSIX filesystem (O_EXCL), on S3 with boto3 installed (the `s3` extra)
        and on GCS with google-cloud-storage installed (the `gcs` extra): a conditional PUT, which pyarrow
        cannot send. Otherwise checked, then written, which two writers starting within the same moment
        could both pass.
        """
        if self.local:
            path = Path(self.path(relative))
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return True
        put_if_absent = _PUT_IF_ABSENT.get(self.location.split("://", 1)[0])
        if put_if_absent is not None:
            created = put_if_absent(self.location, self.path(relative), data)
            if created is not None:
                return created
        if self.get(relative) is not None:
            return False
        self.put(relative, data)
        return True

    def _s3_call(self, operation: str, relative: str, **arguments):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self.path(relative).split("/", 1)
        try:
            return getattr(self.s3, operation)(Bucket=bucket, Key=key, **arguments)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(self.path(relative)) from None
            raise OSError(f"{operation} {self.path(relative)}: {exc}") from exc
        except BotoCoreError as exc:
            raise OSError(f"{operation} {self.path(relative)}: {exc}") from exc

    def get(self, relative: str) -> bytes | None:
        if self.s3 is not None:
            try:
                return self._s3_call("get_object", relative)["Body"].read()
            except FileNotFoundError:
                return None
        try:
            with self.fs.open_input_stream(self.path(relative)) as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def open_input_file(self, relative: str):
        return self.fs.open_input_file(self.path(relative))

    def names(self, relative_dir: str) -> list[str]:
        """File names directly under `relative_dir` (none if it does not exist)."""
        selector = pafs.FileSelector(self.path(relative_dir), allow_not_found=True)
        return [info.base_name for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]

    def versions(self, relative_dir: str) -> dict[str, str]:
        """{file name: version} directly under `relative_dir`, from one listing (a LIST per 1,000 objects):
        a name's version changes whenever its object is written again (S3: the ETag; else size and mtime)."""
        if self.local:
            try:
                with os.scandir(self.path(relative_dir)) as listing:
                    return {e.name: f"{(st := e.stat()).st_size}:{st.st_mtime_ns}" for e in listing if e.is_file()}
            except FileNotFoundError:
                return {}
        if self.s3 is not None:
            bucket, _, prefix = self.path(relative_dir).partition("/")
            prefix = prefix.rstrip("/") + "/"
            found = {}
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                for item in page.get("Contents", []):
                    found[item["Key"][len(prefix):]] = item["ETag"]
            return found
        selector = pafs.FileSelector(self.path(relative_dir), allow_not_found=True)
        return {info.base_name: f"{info.size}:{info.mtime_ns}" for info in self.fs.get_file_info(selector)
                if info.type == pafs.FileType.File}

    def entries(self, relative_dir: str = "") -> list[str]:
        """Names of the files and directories directly under `relative_dir` (none if it does not exist)."""
        selector = pafs.FileSelector(self.path(relative_dir) if relative_dir else self.root, allow_not_found=True)
        return [info.base_name for info in self.fs.get_file_info(selector)]

    def delete(self, relative: str) -> None:
        if self.s3 is not None:
            self._s3_call("delete_object", relative)  # one request; absent is fine on S3
            return
        try:
            self.fs.delete_file(self.path(relative))
        except FileNotFoundError:
            pass

    def delete_dir(self, relative: str) -> None:
        """An empty directory (object stores have none to delete)."""
        try:
            self.fs.delete_dir(self.path(relative))
        except (FileNotFoundError, OSError):
            pass

    def check_writable(self) -> None:
        """Fail at start-up, in one line, rather than after the first video."""
        probe = "_state/.write_check"
        try:
            if self.local:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            self.put(probe, b"ok")
            self.delete(probe)
        except (OSError, OutputWriteError) as exc:
            cause = exc.__cause__ if isinstance(exc, OutputWriteError) else exc
            raise OutputNotWritableError(
                f"output_dir={self.location} is not writable ({getattr(cause, 'strerror', None) or cause}); "
                f"pass a location you can write to"
            ) from exc


def atomic_write(path: Path, write: Callable[[IO[bytes]], object], tmp_dir: Path | None = None) -> None:
    """Write through `write(handle)` to a temp file, fsync, rename over `path`, fsync the dir.

    The temp file lives in `tmp_dir` (on the same filesystem) when given, so the directory of `path`
    only ever holds complete files: a reader of a partition never meets a half-written part.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_parent = tmp_dir or path.parent
    tmp_parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_identity(path: str) -> str | None:
    """What `stat` says of a local file (size, mtime, ctime, inode, device); None for a URI or a file
    that cannot be stat'ed. Any write, replacement or copy changes ctime or the inode (`cp -p` keeps
    mtime, not ctime), so an unchanged identity means unchanged content without reading a byte; a
    changed one only means "may have changed": `fingerprint` decides."""
    if is_uri(path):
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}:{stat.st_dev}"


def fingerprint(path: str, sample: int = 1 << 20) -> str:
    """What identifies a video's content cheaply: size, modification time, and a hash of its first and
    last MiB. A file replaced, or still being copied in, gets another fingerprint; an untouched one keeps it.
    """
    digest = hashlib.sha1()
    if path.startswith("s3://") and (client := s3_client()) is not None:  # what the listing also gives
        bucket, key = path.removeprefix("s3://").split("/", 1)
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - botocore's errors: the object is not there to read
            raise FileNotFoundError(path) from exc
        return s3_fingerprint(head["ContentLength"], head["ETag"])
    if is_uri(path):
        fs, where = filesystem_for(path)
        info = fs.get_file_info(where)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(path)
        size, mtime = info.size, info.mtime_ns or 0
        with fs.open_input_file(where) as handle:
            digest.update(handle.read_at(min(sample, size), 0))
            if size > sample:
                digest.update(handle.read_at(sample, max(sample, size - sample)))
    else:  # Python's own I/O: file names need not be UTF-8 (pyarrow's paths must be)
        stat = os.stat(path)
        size, mtime = stat.st_size, stat.st_mtime_ns
        with open(path, "rb") as handle:
            digest.update(handle.read(sample))
            if size > sample:
                handle.seek(max(sample, size - sample))
                digest.update(handle.read(sample))
    return f"{size}:{mtime}:{digest.hexdigest()}"
