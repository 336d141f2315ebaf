"""Stand-in transport for streamed tar shards (local files and plain http), replaced by the real module."""
from __future__ import annotations

import json
import os
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterator

from .shards import INFO_FILES, SampleKeys, _json_label, _split_key


class DataSourceError(Exception):
    pass


class ShardFailed(Exception):
    def __init__(self, url: str, reason: str, samples_read: int):
        super().__init__(f'{url}: {reason} after {samples_read} samples')
        self.url, self.reason, self.samples_read = url, reason, samples_read


@dataclass
class StreamSample:
    key: str
    image: bytes
    image_ext: str
    target: int
    name: str


def is_remote(root: str) -> bool:
    return '://' in str(root) or str(root).startswith('pipe:')


def join_url(base: str, name: str) -> str:
    return str(base).rstrip('/') + '/' + name


def _open(url: str, timeout: float):
    if url.startswith('file://'):
        url = url[len('file://'):]
    if not is_remote(url):
        return open(url, 'rb')
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError) as e:
        raise DataSourceError(f'{url}: {getattr(e, "reason", e)}') from None


def read_info(root: str) -> dict:
    for name in INFO_FILES:
        try:
            with _open(join_url(root, name), 10.0) as f:
                return json.loads(f.read())
        except DataSourceError:
            continue
    raise DataSourceError(f'{root}: no _info.json')


def iter_shard_samples(url: str, keys: SampleKeys = SampleKeys(), *, retries: int = 3, timeout: float = 30.0,
                       skip: int = 0) -> Iterator[StreamSample]:
    read = 0
    f = _open(url, timeout)
    try:
        with tarfile.open(fileobj=f, mode='r|') as tf:
            key, found = None, {}

            def emit():
                image = next((e for e in keys.image if e in found), None)
                label = 'json' if keys.target else 'cls'
                if image is None or label not in found:
                    return None
                if keys.target:
                    target, _ = _json_label(found['json'][1], keys.target)
                else:
                    text = found['cls'][1]
                    target = int(text) if text.strip().isdigit() else None
                if target is None:
                    return None
                return StreamSample(key, found[image][1], image, target,
                                    f'{os.path.basename(url)}:{found[image][0]}')

            for m in tf:
                if not m.isfile():
                    continue
                k, ext = _split_key(m.name)
                if k != key and key is not None:
                    s = emit()
                    if s is not None:
                        read += 1
                        if read > skip:
                            yield s
                    found = {}
                key = k
                found[ext] = (m.name, tf.extractfile(m).read())
            if key is not None:
                s = emit()
                if s is not None:
                    read += 1
                    if read > skip:
                        yield s
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardFailed(url, str(e), max(0, read - skip)) from None
    finally:
        f.close()
