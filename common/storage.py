"""Storage is a URL: where a user names data, a local path or any fsspec URL (`s3://bucket/key`,
`gs://...`, `memory://...`) is taken, through fsspec (s3fs for S3: the `object-store` extra).

Credentials come only from each store's standard chain (for S3: the AWS environment variables and
profiles, AWS_ENDPOINT_URL for an S3-compatible store); none are taken from the URL's text into
anything written: `redact_url` drops a user:password part before a URL is printed, logged, put in
a manifest or an MLflow tag.

- `fetch(url, dest)`: an object, or every object under a prefix, copied to a local path in blocks
  of 8 MiB (memory stays flat whatever the size);
- `upload(local, url)`: a local file put under a temporary key beside the destination, then moved
  to the destination, so the destination holds the whole file or nothing (s3fs aborts a failed
  multipart upload itself; the temporary key is deleted on failure; what a failure could not clean
  up, the store being unreachable, the next upload of the destination clears);
- `create(url, data)`: an object created only if none exists (S3 `If-None-Match: *`; on a local
  folder a hard link of a complete temporary file, which fails when the name exists, like O_EXCL):
  the ledger's claims and records (serving.inbox).

A plain path is served by the os module (fsspec is only needed for URLs: the `object-store` extra).
Every failure of the store is one StoreError line naming the URL without credentials and what
failed: not found, access denied, no credentials, the endpoint unreachable.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from common.errors import ServingError

log = logging.getLogger(__name__)

# Object stores a data source may name (fsspec: s3fs, gcsfs, adlfs, each an optional install); memory://
# is fsspec's own in-process store.
STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
SOURCE_KINDS = ("expected a folder, a file:// URL or an http(s):// mirror, or an object-store prefix "
                "(s3://, gs://, az://)")
BLOCK = 8 << 20  # bytes per read of a remote object: a few of these are all the memory a copy takes
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class StoreError(ServingError):
    """An object store (or a local folder reached through a URL) failed: one line, exit code 1."""


def is_url(location: object) -> bool:
    """A URL that fsspec opens (s3://, gs://, memory://, ...); a plain path or a file:// URL is local."""
    return isinstance(location, str) and bool(_URL.match(location)) and not location.startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    """A plain path or a file:// URL as a Path."""
    s = str(location)
    return Path(s[len("file://"):] if s.startswith("file://") else s).expanduser()


def redact_url(url: str) -> str:
    """The URL without its user:password part: credentials never go into params, tags or artifacts."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def shown(location: str | os.PathLike) -> str:
    """How a location is printed: a URL redacted, a path as it is."""
    s = str(location)
    return redact_url(s) if is_url(s) else s


# The filesystems this process made, by (process, store, bucket or host, the store's environment).
_filesystems: dict[tuple, Any] = {}
_CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "GCE_", "AZURE_", "FSSPEC_")


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path in it) for `url`. One instance per store and bucket in a process:
    making an s3fs filesystem makes a botocore session (~0.3 s of CPU, more than scoring an input),
    and a bucket inbox asks for one per object it lists, reads or records. A new one is made in a new
    process (s3fs instances are not fork-safe) and when the store's environment changes (other
    credentials, another endpoint). Listings are never cached: an inbox is listed afresh on every run."""
    import fsspec

    parts = urlsplit(str(url))
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CREDENTIAL_PREFIXES)))
    key = (os.getpid(), parts.scheme, parts.netloc, env)
    try:
        fs = _filesystems.get(key)
        if fs is None:
            fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, use_listings_cache=False)
            if len(_filesystems) >= 16:
                _filesystems.clear()
            _filesystems[key] = fs
            return fs, path
        return fs, fsspec.core.strip_protocol(url)
    except ImportError as e:  # the store's package is missing: e.g. s3fs for s3://
        raise StoreError(f"{shown(url)}: no support for this kind of URL installed ({e}); "
                         "install mnistops[object-store]") from e
    except ValueError as e:
        raise StoreError(f"{shown(url)}: not a URL this job can open ({e})") from e


def why(e: BaseException) -> str:
    """What failed, in words a user can act on (the exception's class says more than its text)."""
    name = type(e).__name__
    if isinstance(e, FileNotFoundError):
        return "not found (no such bucket, object or prefix)"
    if isinstance(e, PermissionError):  # the store's reason counts: a key it does not know, a bad signature
        detail = e.strerror or (str(e).splitlines()[0] if str(e) else "")
        return f"access denied ({detail})" if detail.lower() not in ("", "access denied", "permission denied") \
            else "access denied"
    if isinstance(e, FileExistsError):
        return "already exists"
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return "no credentials (none in the standard chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile)"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
                "ConnectionClosedError") or isinstance(e, ConnectionError):
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        return f"the store is unreachable ({'AWS_ENDPOINT_URL=' + redact_url(endpoint) if endpoint else name})"
    text = str(e).splitlines()[0] if str(e) else name
    return f"{name}: {text}"


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a store raises: OSError (s3fs maps S3's errors onto it) and botocore's own."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError

        errors.append(BotoCoreError)
    except ImportError:
        pass
    return tuple(errors)


def failed(url: str, doing: str, e: BaseException) -> StoreError:
    return StoreError(f"{shown(url)}: {doing} failed: {why(e)}")


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    try:
        return fs.isdir(path)
    except _store_errors() as e:
        raise failed(url, "listing", e) from e


def exists(url: str) -> bool:
    if not is_url(url):
        return local_path(url).exists()
    fs, path = filesystem(url)
    try:
        return fs.exists(path)
    except _store_errors() as e:
        raise failed(url, "looking up", e) from e


def check_bucket(url: str) -> None:
    """The URL's bucket (its first path part) exists and is reachable with these credentials: a
    missing bucket is an error up front, not an empty inbox."""
    fs, path = filesystem(url)
    root = path.split("/", 1)[0]
    try:
        fs.ls(root, detail=False)
    except _store_errors() as e:
        raise failed(url, "listing the bucket", e) from e


def _copy(src, dst) -> None:
    while block := src.read(BLOCK):
        dst.write(block)


def fetch(url: str, dest: Path) -> Path:
    """The object at `url` (or every object under the prefix `url`, as a folder) copied to `dest`."""
    fs, path = filesystem(url)
    try:
        if fs.isdir(path):
            files = [p for p in fs.find(path) if not p.endswith("/")]
            for p in files:
                rel = p[len(path.rstrip("/")) + 1:]
                if any(part.startswith(".") or part == ".." for part in rel.split("/")):
                    continue  # hidden (an upload in progress), and never a path out of `dest`
                _fetch_one(fs, p, dest / rel)
            dest.mkdir(parents=True, exist_ok=True)
        else:
            _fetch_one(fs, path, dest)
    except _store_errors() as e:
        raise failed(url, "reading", e) from e
    return dest


def _fetch_one(fs: Any, path: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with fs.open(path, "rb", block_size=BLOCK) as src, open(dest, "wb") as dst:
        _copy(src, dst)


def upload(local: Path, url: str) -> None:
    """`local` put at `url` so that `url` holds the whole file or nothing: under a temporary key
    beside it first, then moved into place; the temporary key is removed on failure. Once it is in
    place, what earlier failed uploads of `url` left is cleared (`_clear_leftovers`)."""
    fs, path = filesystem(url)
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        try:
            fs.put_file(str(local), tmp, **_parts(fs))
            fs.mv(tmp, path)
        except BaseException:
            _remove_quietly(fs, tmp)
            raise
    except _store_errors() as e:
        raise failed(url, "writing", e) from e
    _clear_leftovers(fs, url, parent, name)


def _clear_leftovers(fs: Any, url: str, parent: str, name: str) -> None:
    """The temporary keys of `url` and, on S3, their multipart uploads that an earlier upload left
    when it could neither finish nor clean up: its process killed, or the store unreachable when
    s3fs tried to abort (S3 keeps an unfinished multipart upload, and bills its parts, until it is
    aborted). Cleared after this upload landed, so a failure here never costs the output; an
    upload of the same destination in flight elsewhere at this moment then fails (one line) and
    the destination keeps this whole file. Other stores drop an unfinished upload themselves (GCS
    resumable uploads and Azure uncommitted blocks expire within a week)."""
    if not _is_s3(fs):
        return
    bucket, _, key_parent = parent.partition("/")
    prefix = f"{key_parent}/.{name}." if key_parent else f".{name}."
    theirs = re.compile(rf"^{re.escape(prefix)}[0-9a-f]{{12}}\.tmp$")
    try:
        for u in fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", []):
            if theirs.match(u["Key"]):
                _gone_or(fs.call_s3, "abort_multipart_upload", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        for o in fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix).get("Contents", []):
            if theirs.match(o["Key"]):
                _gone_or(fs.call_s3, "delete_object", Bucket=bucket, Key=o["Key"])
    except _store_errors() as e:  # the output is in place; leftovers are S3's lifecycle rule's to expire
        log.warning("%s: written; could not clear what earlier failed uploads left: %s (an "
                    "AbortIncompleteMultipartUpload lifecycle rule on the bucket clears them)", shown(url), why(e))


def _gone_or(call: Any, *args: Any, **kwargs: Any) -> None:
    try:
        call(*args, **kwargs)
    except FileNotFoundError:  # finished or cleared by another writer meanwhile
        pass


def _parts(fs: Any) -> dict[str, int]:
    """s3fs uploads a file of 2 x 50 MiB or more in 50 MiB parts, 10 at a time: 500 MiB of memory for a
    large output. Parts of BLOCK keep it at 10 x 8 MiB, as flat as a download."""
    return {"chunksize": BLOCK} if _is_s3(fs) else {}


def _is_s3(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool({"s3", "s3a"} & set(protocol))


def _remove_quietly(fs: Any, path: str) -> None:
    try:
        fs.rm_file(path)
    except (FileNotFoundError, *_store_errors()):  # the failure being reported is the one that counts
        pass


def read_bytes(url: str) -> bytes | None:
    """A small object's bytes, or None when there is none."""
    if not is_url(url):
        try:
            return local_path(url).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise failed(url, "reading", e) from e
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None
    except _store_errors() as e:
        raise failed(url, "reading", e) from e


def write_bytes(url: str, data: bytes) -> None:
    """A small object written whole (replacing any): the ledger's rescoring record."""
    if not is_url(url):
        from common.atomic import atomic_path

        try:
            with atomic_path(local_path(url), suffix=".json") as tmp:
                tmp.write_bytes(data)
        except OSError as e:
            raise failed(url, "writing", e) from e
        return
    fs, path = filesystem(url)
    try:
        fs.pipe_file(path, data)
    except _store_errors() as e:
        raise failed(url, "writing", e) from e


def create(url: str, data: bytes) -> bool:
    """`data` at `url` if nothing is there yet: True when created, False when the name exists. Never
    a half-written object: S3 stores a PUT whole, a local file is linked into place complete."""
    if not is_url(url):
        try:
            return _create_local(local_path(url), data)
        except OSError as e:
            raise failed(url, "creating", e) from e
    fs, path = filesystem(url)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except _store_errors() as e:
        raise failed(url, "creating", e) from e


def _create_local(path: Path, data: bytes) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.new")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails when `path` exists: the O_EXCL of a file with its content
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def glob(prefix_url: str) -> list[str]:
    """Names (last parts) of the objects whose key starts with `prefix_url`'s last part, sorted (all
    the entries of a folder for a prefix ending in '/')."""
    if not is_url(prefix_url):
        whole = str(prefix_url).endswith("/")
        folder, start = (str(local_path(prefix_url)), "") if whole else os.path.split(str(local_path(prefix_url)))
        try:
            return sorted(n for n in os.listdir(folder) if n.startswith(start))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise failed(prefix_url, "listing", e) from e
    fs, path = filesystem(prefix_url)
    if str(prefix_url).endswith("/"):  # fsspec drops the trailing '/' of a URL
        path = path.rstrip("/") + "/"
    try:
        found = fs.glob(path + "*")
    except FileNotFoundError:
        return []
    except _store_errors() as e:
        raise failed(prefix_url, "listing", e) from e
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found)


def listing(url: str) -> list[dict[str, Any]]:
    """The entries directly under a folder or prefix: name (last part), type (file/directory), size."""
    fs, path = filesystem(url)
    try:
        entries = fs.ls(path, detail=True)
    except _store_errors() as e:
        raise failed(url, "listing", e) from e
    out = []
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e["name"].rstrip("/") != path.rstrip("/"):
            out.append({"name": name, "type": e["type"], "size": e.get("size") or 0, "version": _version(e)})
    return sorted(out, key=lambda e: e["name"])


# What names an object's content in each store's listing: S3's ETag and LastModified, GCS's
# generation and md5Hash, Azure's etag and last_modified.
_VERSION_KEYS = ("ETag", "LastModified", "generation", "md5Hash", "etag", "last_modified")


def _version(info: dict[str, Any]) -> str | None:
    """The object's version as its store names it (None where the store names none: a local file).
    Times in whole seconds: a listing gives milliseconds where a HEAD request does not."""
    if info.get("type") != "file" or not any(info.get(k) for k in _VERSION_KEYS[::2]):
        return None
    parts = [info[k] for k in _VERSION_KEYS if info.get(k) is not None]
    return " ".join(str(int(p.timestamp())) if hasattr(p, "timestamp") else str(p) for p in parts)


def version(url: str) -> str | None:
    """The version `listing` gives the object at `url` now (None: no object, or no version)."""
    fs, path = filesystem(url)
    try:
        fs.invalidate_cache(path)
        return _version(fs.info(path))
    except FileNotFoundError:
        return None
    except _store_errors() as e:
        raise failed(url, "reading", e) from e


def remove(url: str) -> None:
    fs, path = filesystem(url)
    _remove_quietly(fs, path)

