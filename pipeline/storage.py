"""Object storage and local paths behind one interface (pyarrow filesystems).

A URI is a local path or `s3://bucket/prefix`. S3 endpoint, region and credentials come from the
standard AWS environment/config (`AWS_ENDPOINT_URL` for MinIO-compatible stores and for the moto
server in tests); nothing here logs or stores a credential. Writes are atomic for readers: a local
file is written under a temporary name and renamed; an S3 object appears only when its upload
completes.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from bpr_core.formats import InputError


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # filesystem path (bucket/key for S3, absolute path locally)
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts) if self.is_s3 else os.path.join(self.path, *parts)
        uri = posixpath.join(self.uri, *parts) if self.is_s3 else path
        return Location(self.fs, path, uri)


def s3_filesystem() -> pafs.S3FileSystem:
    kwargs = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        u = urlparse(endpoint)
        kwargs["endpoint_override"] = u.netloc or u.path
        kwargs["scheme"] = u.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> Location:
    if uri.startswith("s3://"):
        return Location(s3_filesystem(), uri[len("s3://"):].rstrip("/"), uri.rstrip("/"))
    if "://" in uri and not uri.startswith("file://"):
        raise InputError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    path = os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)
    return Location(pafs.LocalFileSystem(), path, path)


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def makedirs(loc: Location) -> None:
    if not loc.is_s3:
        os.makedirs(loc.path, exist_ok=True)


def sha256_hex(loc: Location, chunk_size: int = 1 << 22) -> str:
    """Content hash, read in chunks (detector outputs can be larger than memory should hold)."""
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path) as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def write_bytes_atomic(loc: Location, data: bytes) -> None:
    with AtomicWriter(loc) as f:
        f.write(data)


class AtomicWriter:
    """Stream text or bytes to a location; the object/file appears under its name only on success."""

    def __init__(self, loc: Location):
        self.loc = loc
        if loc.is_s3:
            self._target = loc.path
        else:
            os.makedirs(os.path.dirname(loc.path), exist_ok=True)
            self._target = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
        self._raw = loc.fs.open_output_stream(self._target)

    def write(self, s: str | bytes) -> int:
        self._raw.write(s.encode() if isinstance(s, str) else s)
        return len(s)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._raw.close()
        if self.loc.is_s3:
            if exc_type is not None:
                delete(self.loc)
            return False
        if exc_type is None:
            os.replace(self._target, self.loc.path)
        else:
            os.unlink(self._target)
        return False


def delete(loc: Location) -> None:
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.Directory:
        loc.fs.delete_dir(loc.path)
    elif info.type == pafs.FileType.File:
        loc.fs.delete_file(loc.path)


def list_files(loc: Location, suffix: str = "") -> list[Location]:
    if not exists(loc):
        return []
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    out = []
    for i in sorted(infos, key=lambda i: i.path):
        if i.type == pafs.FileType.File and i.path.endswith(suffix):
            rel = i.path[len(loc.path):].lstrip("/")
            out.append(loc.join(rel))
    return out


def check_readable(uri: str, what: str) -> Location:
    """Fail fast, before any work, with one clear message if an input is missing."""
    loc = resolve(uri)
    try:
        ok = exists(loc)
    except OSError as e:  # e.g. missing bucket, no credentials, endpoint unreachable
        raise InputError(f"cannot read {what} {uri}: {str(e).splitlines()[0]}") from None
    if not ok:
        raise InputError(f"{what} not found: {uri}")
    return loc
