"""Per-rank local copies of a data source, for readers that cannot seek (real Caffe's layers).

Caffe's Data layer reads an LMDB from its first record and its ImageData layer reads a whole list
file, so a rank's contiguous shard is handed to them as a database (or list) of its own: rank r
of n copies records `shard_bounds(count, r, n)` of the source, found with `seek_record` (only
those records are read), into a cache folder. The copy may start part-way into the shard and
wrap around (`first`), so a resumed run continues where the interrupted one was; Caffe's layer
then reads it from the start and wraps around at its end as usual.

A copy is named by a hash of the source (real path, size and modification time of its data),
the rank, the number of ranks and `first`, and is written under a temporary name and renamed
into place when complete. Beside an LMDB copy goes the sha256 of the records it holds, in order:
a later run reuses it only if its records still have that digest (a copy changed since, or one
without a digest, is made again); a list copy is reused only if it equals the shard just read. Remove the cache folder to reclaim the space. The default
folder is private to the user (mode 0700), so nobody else can plant a copy there.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator

import lmdb

from mpicaffe.data import lmdb_io, sharding
from mpicaffe.errors import UserError

CACHE_ENV = "MPICAFFE_SHARD_CACHE"


def cache_dir(configured: str | None = None) -> str:
    """Where local shard copies live: `configured`, else $MPICAFFE_SHARD_CACHE, else the user's
    private <temporary folder>/mpicaffe-shards-<uid> (node-local storage on most clusters)."""
    chosen = configured or os.environ.get(CACHE_ENV)
    if chosen:
        return chosen
    path = os.path.join(tempfile.gettempdir(), f"mpicaffe-shards-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UserError(f"{path}: the default shard cache must be a folder of yours that nobody else can read or "
                        f"write (it is owned by uid {st.st_uid}, mode {st.st_mode & 0o777:o}); remove it, or give "
                        f"--shard-cache or ${CACHE_ENV}")
    return path


def _copy_name(kind: str, source: str, data_file: str, rank: int, size: int, first: int) -> str:
    st = os.stat(data_file)
    identity = f"{kind}\0{os.path.realpath(source)}\0{st.st_size}\0{st.st_mtime_ns}\0{rank}\0{size}\0{first}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:20]
    stem = os.path.basename(os.path.normpath(source)) or kind
    return f"{stem}.rank{rank}of{size}.{key}"


def lmdb_shard(source: str, rank: int, size: int, skip: int = 0, cache: str | None = None,
               ) -> tuple[str, tuple[int, int], bool]:
    """A local LMDB holding exactly `rank`'s shard of the LMDB `source`, starting `skip` records
    into the shard (modulo its length) and wrapping around.

    Returns (path of the copy, the shard's record range [start, end) in `source`, whether an
    existing copy was reused). Records are re-keyed `%08d` in the order they are to be read.
    Raises UserError when the source is not a readable LMDB or holds fewer records than ranks.
    """
    count = lmdb_io.count(source)
    start, end = sharding.shard_bounds(count, rank, size)
    length = end - start
    first = start + skip % length
    path = os.path.join(cache_dir(cache), _copy_name("lmdb", source, os.path.join(source, "data.mdb"), rank, size,
                                                     first))
    if _holds(path, length):
        return path, (start, end), True
    digest = hashlib.sha256()
    try:
        lmdb_io.write_datums(path, ((key, _hashed(digest, value)) for key, value in
                                    _rotated_records(source, count, start, end, first)), overwrite=True)
        _write_digest(os.path.join(path, DIGEST_FILE), digest)
    except (OSError, lmdb.Error) as e:
        raise _cannot_write(path, e) from None
    return path, (start, end), False


def _cannot_write(path: str, e: Exception) -> UserError:
    return UserError(f"cannot write the shard copy {path}: {getattr(e, 'strerror', None) or e} (choose another folder with "
                     "--stage-data or --shard-cache)")


DIGEST_FILE = "mpicaffe-records.sha256"  # inside a copied LMDB's folder (Caffe's reader ignores it)


def _hashed(digest, value: bytes) -> bytes:
    digest.update(len(value).to_bytes(8, "little"))
    digest.update(value)
    return value


def _write_digest(path: str, digest) -> None:
    with open(path, "w") as f:
        f.write(digest.hexdigest() + "\n")


def _digest_matches(path: str, values: Iterator[bytes]) -> bool:
    """Whether the digest file `path` exists and holds the sha256 of `values`."""
    try:
        with open(path) as f:
            recorded = f.read().strip()
    except OSError:
        return False
    digest = hashlib.sha256()
    for value in values:
        _hashed(digest, value)
    return digest.hexdigest() == recorded


def _holds(path: str, length: int) -> bool:
    """Whether `path` is an LMDB of `length` records whose contents are those it was made with
    (a copy left by an earlier run)."""
    if not os.path.isdir(path):
        return False
    try:
        return lmdb_io.count(path) == length and _digest_matches(
            os.path.join(path, DIGEST_FILE), (value for _, value in lmdb_io.iter_values(path)))
    except UserError:
        return False


def _rotated_records(source: str, count: int, start: int, end: int, first: int) -> Iterator[tuple[bytes, bytes]]:
    """Records first..end-1 then start..first-1 of `source`, keyed by their new position."""
    position = 0
    with lmdb_io.shared_env(source) as env, env.begin(buffers=False) as txn:
        cursor = txn.cursor()
        for lo, hi in ((first, end), (start, first)):
            if lo == hi:
                continue
            sharding.seek_record(cursor, lo, count)
            for _ in range(hi - lo):
                yield lmdb_io.datum_key(position), cursor.value()
                position += 1
                cursor.next()


def list_shard(source: str, rank: int, size: int, skip: int = 0, cache: str | None = None,
               ) -> tuple[str, tuple[int, int], bool]:
    """A local image list holding `rank`'s contiguous shard of the lines of the list file
    `source` (ImageData), starting `skip` lines into the shard and wrapping around.

    Lines are copied verbatim (image paths stay relative to the layer's root_folder); blank lines
    are not entries. Returns as `lmdb_shard` does.
    """
    try:
        with open(source, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{source}: cannot read the image list: {e}") from None
    start, end = sharding.shard_bounds(len(lines), rank, size)
    first = start + skip % (end - start)
    path = os.path.join(cache_dir(cache), _copy_name("list", source, source, rank, size, first) + ".txt")
    text = "".join(line + "\n" for line in lines[first:end] + lines[start:first]).encode()
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == text:  # the list was read anyway: the copy is compared with it whole
                return path, (start, end), True
    partial = f"{path}.partial-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(partial, "wb") as f:
            f.write(text)
        os.replace(partial, path)
    except OSError as e:
        raise _cannot_write(path, e) from None
    return path, (start, end), False
