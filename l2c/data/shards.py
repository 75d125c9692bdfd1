"""Shard lists and the one webdataset tar reader, shared by embed-captions, train-vision, eval and make-shards.

`expand_shards` turns paths, directories, globs, brace ranges (`shard-{000000..000009}.tar`), `::`-separated
lists, `pipe:` commands and fsspec URLs (`s3://bucket/tars/*.tar`) into an ordered, de-duplicated list.

`read_tar` streams the samples of one tar (local path, `pipe:`, fsspec URL, or an open binary file object)
the webdataset way: members are grouped into samples by key, the member's path up to the first dot of its
basename; the rest of the name is the member's suffix (`jpg`, `json`, `seg.png`). Suffixes are kept as
written and matched case-insensitively (`k.JPG` is the sample's `jpg`, `k.TXT` its `txt`). Every reader of
tars goes through it, so the caption cache (rows in tar key order) and the image stream that is zipped with
it see the very same samples. What cannot become a sample is a counted `TarReject`, never an exception:

  duplicate_member  a sample holds one member twice (`k.txt` twice, or `k.jpg` and `k.JPG`): the sample is
                    rejected, the reason names the tar and the member;
  unreadable_tar    the tar cannot be opened, is damaged or ends early: the samples read before the damage
                    are kept (yielded), the sample being read when it happened is dropped (it may be
                    incomplete) and the reject names the file.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from l2c.errors import L2CError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: `__key__`-style members are not data


class ShardSpecError(L2CError, FileNotFoundError):
    """A shard spec that names no file (no glob match, missing file, empty directory)."""


# -------------------------------------------------------------------------------------------- lists


def expand_shards(
    specs: str | Path | list | tuple,
    suffixes: tuple[str, ...] = TAR_SUFFIXES,
    require_suffix: bool = False,
    what: str = "shard",
) -> list[str]:
    """Files named by `specs`, in order, each once (local paths resolved, URLs kept as URLs).

    A spec may be a path, a directory (its files ending in `suffixes`, sorted), a glob (local or any fsspec
    URL, through `l2c.storage.glob_urls`), brace ranges, several specs joined by `::`, a `pipe:` command or
    an fsspec URL. With `require_suffix`, every file must end in one of `suffixes`."""
    import braceexpand

    from l2c.storage import glob_urls, is_url, normalize

    items = list(specs) if isinstance(specs, (list, tuple)) else [specs]
    out: list[str] = []
    for spec in items:
        for part in str(spec).split("::"):
            for url in braceexpand.braceexpand(part):
                url = normalize(url)  # a file:// URL is a local path (recorded as one, so reruns match)
                if url.startswith("pipe:"):
                    out.append(url)
                elif any(ch in url for ch in "*?["):
                    hits = glob_urls(url if is_url(url) else str(Path(url).expanduser()))
                    if not hits:
                        raise ShardSpecError(f"no file matches {url!r}")
                    out += hits
                elif is_url(url):
                    out.append(url)
                else:
                    p = Path(url).expanduser()
                    if p.is_dir():
                        hits = sorted(h for h in p.iterdir() if h.is_file() and h.name.endswith(suffixes))
                        if not hits:
                            raise ShardSpecError(f"directory {url!r} holds no {'/'.join(suffixes)} files")
                        out += [str(h) for h in hits]
                    elif not p.exists():
                        raise ShardSpecError(f"{what} {url} does not exist")
                    else:
                        out.append(str(p))
    seen: set[str] = set()
    unique: list[str] = []
    for p in out:
        if is_url(p):
            p = normalize(p)  # `memory:///a` as `memory://a`, as the URL is typed
        elif not p.startswith("pipe:"):
            p = str(Path(p).resolve())
        if p not in seen:
            seen.add(p)
            unique.append(p)
    if require_suffix:
        for p in unique:
            if not p.endswith(suffixes):
                raise ShardSpecError(f"{p}: unknown {what} type (expected {', '.join(suffixes)})")
    if not unique:
        raise ShardSpecError(f"no {what}s in {specs!r}")
    return unique


def open_shard(url: str) -> IO[bytes]:
    """A binary stream for a local path, a `pipe:` command, or any URL fsspec can open."""
    from l2c.storage import is_url, normalize

    url = normalize(url)
    if url.startswith("pipe:"):
        from webdataset import gopen

        return gopen(url)
    if is_url(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(Path(url).expanduser(), "rb")


# ------------------------------------------------------------------------------------------ samples


def split_member(name: str) -> tuple[str | None, str | None]:
    """(sample key, suffix) of a member name: `a/b/k01.seg.png` -> (`a/b/k01`, `seg.png`); (None, None)
    for a name without a suffix."""
    m = _MEMBER.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


class Sample(dict):
    """One sample: `__key__`, `__url__` and its members' bytes by suffix as written in the tar; suffixes are
    looked up case-insensitively (`sample["jpg"]`, `"txt" in sample` find `k.JPG`, `k.TXT`)."""

    def member(self, suffix: str) -> str | None:
        """The suffix as written in the tar for `suffix` (any case), or None."""
        if dict.__contains__(self, suffix):
            return suffix
        if isinstance(suffix, str):
            low = suffix.lower()
            for name in self:
                if isinstance(name, str) and name.lower() == low:
                    return name
        return None

    def __getitem__(self, suffix):
        name = self.member(suffix)
        if name is None:
            raise KeyError(suffix)
        return dict.__getitem__(self, name)

    def __contains__(self, suffix) -> bool:
        return self.member(suffix) is not None

    def get(self, suffix, default=None):
        name = self.member(suffix)
        return default if name is None else dict.__getitem__(self, name)

    @property
    def key(self) -> str:
        return dict.__getitem__(self, "__key__")


@dataclass(frozen=True)
class TarReject:
    """Something in a tar that could not become a sample: `reason` is `duplicate_member` or `unreadable_tar`."""

    url: str
    reason: str
    key: str | None
    member: str | None
    detail: str

    def __str__(self) -> str:
        return self.detail

    def as_dict(self) -> dict:
        return {
            "url": self.url,
            "reason": self.reason,
            "key": self.key,
            "member": self.member,
            "detail": self.detail,
        }


class _Member(tarfile.TarInfo):
    """TarInfo that notes why a stream ended: the standard library ends a tar quietly at a header that is
    empty, cut short or invalid, which is how a truncated download looks; only a zero block is a real end."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            if tf.offset > 0:
                tf._l2c_bad_end = "ends without the end-of-archive marker (truncated)" if isinstance(
                    e, tarfile.EmptyHeaderError) else f"damaged at byte {tf.offset}: {e}"  # fmt: skip
            raise


def read_tar(url: str, rejects: list | None = None, fileobj: IO[bytes] | None = None) -> Iterator[Sample]:
    """The samples of one tar in file order; what cannot be a sample is appended to `rejects` as a
    `TarReject` (see the module docstring). Streams: nothing but the current sample is held in memory.
    `fileobj` (any binary file object, e.g. from `fsspec.open`) is read instead of opening `url`, and not closed."""
    rejects = [] if rejects is None else rejects
    try:
        stream = fileobj if fileobj is not None else open_shard(url)
    except Exception as e:  # unreachable URL, permissions, missing file
        rejects.append(
            TarReject(url, "unreadable_tar", None, None, f"{url}: cannot open: {type(e).__name__}: {e}")
        )
        return
    current: Sample | None = None
    duplicate: str | None = None  # the first member of `current` seen twice
    n_read = 0

    def finish():
        nonlocal n_read
        n_read += 1
        if duplicate is not None:
            rejects.append(
                TarReject(
                    url,
                    "duplicate_member",
                    current.key,
                    duplicate,
                    f"{url}: member {duplicate!r} appears twice in sample {current.key!r}",
                )
            )
            return None
        return current

    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_Member) as tf:
            for info in tf:
                name = info.name
                if not info.isreg() or not _is_data(name):
                    continue
                key, suffix = split_member(name)
                if key is None:
                    continue
                if current is None or key != current.key:  # the previous sample is whole
                    if current is not None and (done := finish()) is not None:
                        yield done
                    current, duplicate = Sample(__key__=key, __url__=url), None
                data = tf.extractfile(info).read()
                tf.members = []  # streaming: do not keep every header
                if suffix in current:
                    duplicate = duplicate or name
                else:
                    current[suffix] = data
            bad_end = getattr(tf, "_l2c_bad_end", None)
        if bad_end:
            raise tarfile.ReadError(bad_end)
        if fileobj is None:
            stream.close()  # a `pipe:` command reports its failure here
    except Exception as e:  # damaged or truncated: keep what was read whole, name the file
        lost = f"; sample {current.key!r} being read is dropped" if current is not None else ""
        rejects.append(
            TarReject(
                url,
                "unreadable_tar",
                None,
                None,
                f"{url}: {type(e).__name__}: {str(e)[:200]} after {n_read} sample(s){lost}",
            )
        )
        return
    finally:
        if fileobj is None:
            try:
                stream.close()
            except Exception:  # already reported above
                pass
    if current is not None and (done := finish()) is not None:
        yield done


def _is_data(name: str) -> bool:
    """False for webdataset's metadata members (`__index__`, `__meta__/...`) and empty names."""
    return bool(name) and not _META.match(name) and not (
        "/" not in name and name.startswith("__") and name.endswith("__"))  # fmt: skip


def count_keys(url: str) -> int:
    """Samples in a local uncompressed tar, from its headers only (for progress bars)."""
    keys = set()
    with tarfile.open(url) as tf:
        for m in tf.getmembers():
            if m.isfile() and _is_data(m.name):
                key, _ = split_member(m.name)
                if key is not None:
                    keys.add(key)
    return len(keys)
