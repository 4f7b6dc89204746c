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


def redact(uri: str) -> str:
    """A URI safe to print: any user:password@ part and query string masked."""
    head, sep, rest = uri.partition("://")
    if not sep:
        return uri
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    out = f"{head}://{netloc}{slash}{path}"
    return out.split("?", 1)[0] + ("?***" if "?" in out else "")


def resolve(uri: str) -> Location:
    if uri.startswith("s3://"):
        netloc = uri[len("s3://"):].split("/", 1)[0]
        if "@" in netloc or "?" in uri:
            # Never echo the URI as given: it may hold an access key and secret.
            raise InputError(f"credentials or query parameters in an s3:// URI are not accepted ({redact(uri)}): "
                             "give them through the standard AWS variables, profile or instance role")
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


class PathRejected(ValueError):
    """An image path from an index that is not allowed: it leaves the image root, or is absolute."""


def confine(root: Location, name: str, allow_absolute: bool = False) -> Location:
    """The location of image `name` (a file_name from an image index) under `root`, refusing any
    that leaves the root: `..` components, absolute paths (unless `allow_absolute`), and locally
    a symlink inside the root that points outside it. On S3 the key must stay in the root's bucket
    under its prefix (S3 has no `..`, but a joined path is normalised by the client, which is how
    another bucket could be read)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise PathRejected(f"file_name {name!r} is not a usable path")
    absolute = "://" in name or name.startswith(("/", "\\")) or os.path.isabs(name)
    if absolute:
        if not allow_absolute:
            raise PathRejected(f"file_name {name!r} is an absolute path; absolute paths are refused unless "
                               "--allow-absolute-paths is given")
        return resolve(name)
    if root.is_s3:
        prefix = root.path.rstrip("/")
        path = posixpath.normpath(posixpath.join(prefix, name))
        if not path.startswith(prefix + "/"):
            raise PathRejected(f"file_name {name!r} resolves outside the image root {root.uri}")
        return Location(root.fs, path, "s3://" + path)
    path = os.path.normpath(os.path.join(root.path, name))
    if not path.startswith(root.path.rstrip(os.sep) + os.sep):
        raise PathRejected(f"file_name {name!r} resolves outside the image root {root.uri}")
    real, real_root = os.path.realpath(path), os.path.realpath(root.path)
    if not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise PathRejected(f"file_name {name!r} is a symlink that leads outside the image root {root.uri}")
    return Location(root.fs, real, path)


def check_writable(uri: str, what: str = "output location") -> Location:
    """Fail fast, before any work, if the output location cannot be created or written."""
    loc = resolve(uri)
    if loc.is_s3:
        bucket = loc.path.split("/", 1)[0]
        try:
            info = loc.fs.get_file_info(bucket)
        except OSError as e:
            raise InputError(f"cannot reach {what} {loc.uri}: {str(e).splitlines()[0]}") from None
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"{what} {loc.uri}: bucket {bucket!r} does not exist")
        return loc
    if os.path.exists(loc.path) and not os.path.isdir(loc.path):
        raise InputError(f"{what} {loc.path} exists and is not a directory")
    try:
        os.makedirs(loc.path, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create {what} {loc.path}: {e.strerror}") from None
    if not os.access(loc.path, os.W_OK | os.X_OK):
        raise InputError(f"{what} {loc.path} is not writable")
    return loc


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


def local_file(uri: str | None, cache: str | None = None, what: str = "checkpoint") -> str | None:
    """A local path for a file that may live on S3 (a checkpoint that `jobs.train` wrote to
    s3://..., a training set's annotations): S3 objects are downloaded once per machine into a cache keyed by URI, size and
    modification time (written under a temporary name, then renamed); local paths pass through."""
    if not uri or not uri.startswith("s3://"):
        return uri
    loc = resolve(uri)
    try:
        info = loc.fs.get_file_info(loc.path)
    except OSError as e:
        raise InputError(f"cannot read {redact(uri)}: {str(e).splitlines()[0]}") from None
    if info.type != pafs.FileType.File:
        raise InputError(f"{what} not found: {redact(uri)}")
    cache = cache or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bpr", "s3")
    tag = hashlib.sha256(f"{uri}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:16]
    path = os.path.join(cache, f"{tag}-{posixpath.basename(loc.path)}")
    if not os.path.isfile(path):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with loc.fs.open_input_stream(loc.path) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(tmp, path)
    return path
