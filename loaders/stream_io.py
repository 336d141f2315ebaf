"""Tar shards read front to back as byte streams: from local files, http(s) URLs, ``pipe:CMD`` commands (a command
that writes the shard to its stdout, as webdataset's ``gopen`` runs it) and any fsspec URL (``s3://``, ``gs://``,
``hf://`` ...). The transport under the streaming loader (loaders.stream).

Why streams: an object store or a web server answers one request per read, so the random access of
loaders.shards (one ``pread`` per image) would cost a round trip per sample; read front to back, a shard costs one
request and memory bounded by one sample. What this layer adds is reliability. Every connect and read of an http(s)
URL and every wait for a command's output has a timeout (a dead server never hangs a worker). A dropped connection,
a timeout or a 5xx is retried with exponential backoff and the read resumes at the byte where it stopped (an HTTP
Range request; where the server ignores ranges, or for a ``pipe:`` command, the shard is read again from its start
and the bytes already delivered are discarded), so no member is delivered twice. What retries cannot fix ends in
one of two exceptions: DataSourceError, the source itself is wrong (404, unknown host, a server refusing
connections, a bad ``_info.json``) and the run should stop with its one-line message; or ShardFailed, this shard
could not be read to its end, which the caller counts like a bad file before going on with the next shard.

Tar headers and the rules that make members a sample are those of the random-access index (loaders.shards:
``tar_members``, ``sample_label``), so a shard streamed gives the samples its index gives, in shard order.
"""
from __future__ import annotations

import base64
import bz2
import http.client
import json
import lzma
import os
import random
import re
import select
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

from .shards import INFO_FILES, SampleKeys, _ShardCut, _split_key, _Unsupported, label_ext, sample_label, tar_members

_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 8
_CHUNK = 1 << 16
_OUT = 1 << 20         # the most a decompressor gives at a time
_DRAIN = 1 << 16       # the rest of a body read to keep its connection alive (a tar's end-of-archive padding)
_INFO_LIMIT = 64 << 20
_MAX_WAIT = 60.0       # the longest Retry-After honoured
_HF_HOSTS = ('huggingface.co', 'hf.co')  # hosts that get the Hugging Face token (never the CDN they redirect to)
_COMPRESSED = {b'\x1f\x8b': lambda: zlib.decompressobj(31), b'BZh': bz2.BZ2Decompressor,
               b'\xfd7zXZ': lzma.LZMADecompressor}
_ZSTD = b'(\xb5/\xfd'


class DataSourceError(Exception):
    """A problem with the data source itself (a wrong URL, a missing object, an unknown host, a server refusing
    connections, a bad ``_info.json``): fatal; ``str(e)`` is one line naming the URL."""


class _Missing(DataSourceError):
    """The object is not there (HTTP 404/410, no such file, a ``pipe:`` command failing before any output)."""


class ShardFailed(Exception):
    """The shard could not be read to its end after the retries. ``samples_read``: the samples of the shard read
    before the failure, counted from its start (those passed over by ``skip`` included)."""

    def __init__(self, url: str, reason: str, samples_read: int):
        super().__init__(f'{url}: {reason} ({samples_read} samples read)')
        self.url, self.reason, self.samples_read = url, reason, samples_read

    def __reduce__(self):  # crosses process boundaries (DataLoader workers, queues) whole
        return type(self), (self.url, self.reason, self.samples_read)


class _Retry(Exception):
    """A failure worth another try. ``unreachable``: no connection could be made at all; ``wait``: the seconds the
    server asked for (``Retry-After``)."""

    def __init__(self, reason: str, unreachable: bool = False, wait: float = 0.0):
        super().__init__(reason)
        self.reason, self.unreachable, self.wait = reason, unreachable, wait


class _GaveUp(Exception):
    """The retries are spent; the message says why."""


# --- names ----------------------------------------------------------------------------------------------------

def is_remote(root) -> bool:
    """Whether ``root`` is read as a stream rather than a local folder: ``pipe:CMD`` or any ``scheme://`` URL
    (http, https, s3, gs, hf, file, ... : whatever fsspec knows)."""
    root = os.fspath(root)
    return isinstance(root, str) and (root.startswith('pipe:') or bool(_URL.match(root)))


def join_url(base, name: str) -> str:
    """``name`` (a shard or ``_info.json``) under ``base``: a folder, a URL (its query string kept), or a ``pipe:``
    command, where ``{}`` stands for the name (``pipe:aws s3 cp s3://b/d/{} -``) or, without one, the name is
    appended to the command's last word (``pipe:curl -sfL https://host/d`` -> ``... https://host/d/NAME``). A name
    that is itself a URL, a command or an absolute path is returned as it is."""
    base = os.fspath(base)
    if is_remote(name) or os.path.isabs(name):
        return name
    if base.startswith('pipe:'):
        return base.replace('{}', name) if '{}' in base else base.rstrip('/') + '/' + name
    if _URL.match(base):
        parts = urlsplit(base)
        return urlunsplit(parts._replace(path=parts.path.rstrip('/') + '/' + name))
    return os.path.join(base, name)


# --- byte sources: open at a byte, read forward -----------------------------------------------------------------

class _FileSource:
    """A local file."""

    def __init__(self, url: str, path: str):
        self.url, self.path, self.f = url, path, None

    def open(self, pos: int) -> None:
        try:
            self.f = open(self.path, 'rb')
        except FileNotFoundError:
            raise _Missing(f'{self.url}: no such file') from None
        except OSError as e:
            raise DataSourceError(f'{self.url}: {e.strerror or e}') from None
        self.f.seek(pos)

    def read(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except OSError as e:  # a network file system's hiccup
            raise _Retry(f'read error ({e.strerror or e})') from None

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


class _Connections:
    """This process's idle keep-alive HTTP(S) connections, one per host, for the next request to that host. Tied to
    the process id, so a forked DataLoader worker makes its own instead of sharing its parent's sockets."""

    def __init__(self):
        self._lock = threading.Lock()
        self._idle: dict = {}
        self._pid = None

    def take(self, scheme: str, netloc: str, timeout: float):
        """(connection, whether it is a kept-alive one, ``via``): ``via`` is None for a direct connection (or a
        tunnel), else the headers for the http proxy it goes to, which takes whole URLs as request targets."""
        with self._lock:
            if self._pid != os.getpid():
                self._idle, self._pid = {}, os.getpid()
            conn, via = self._idle.pop((scheme, netloc), (None, None))
        if conn is not None and conn.sock is not None:
            conn.timeout = timeout
            conn.sock.settimeout(timeout)
            return conn, True, via
        proxy = _proxy(scheme, netloc)
        if proxy is None:
            cls = http.client.HTTPSConnection if scheme == 'https' else http.client.HTTPConnection
            return cls(netloc, timeout=timeout), False, None
        auth = {}
        if proxy.username:
            basic = base64.b64encode(f'{unquote(proxy.username)}:{unquote(proxy.password or "")}'.encode()).decode()
            auth = {'Proxy-Authorization': f'Basic {basic}'}
        proxy_host = proxy.netloc.rpartition('@')[2]
        if scheme == 'https':  # a CONNECT tunnel through the proxy, TLS to the host inside it
            conn = http.client.HTTPSConnection(proxy_host, timeout=timeout)
            conn.set_tunnel(netloc, headers=auth)
            return conn, False, None
        return http.client.HTTPConnection(proxy_host, timeout=timeout), False, auth

    def give(self, scheme: str, netloc: str, conn, via: Optional[dict]) -> None:
        with self._lock:
            old, _ = self._idle.pop((scheme, netloc), (None, None))
            self._idle[(scheme, netloc)] = conn, via
        if old is not None:
            old.close()


def _proxy(scheme: str, netloc: str):
    """The proxy of ``$http_proxy`` / ``$https_proxy`` for this host (``$no_proxy`` honoured), as curl and urllib
    take them, or None."""
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(netloc):
        return None
    return urlsplit(proxy if '://' in proxy else f'http://{proxy}')


_connections = _Connections()
_hf_token_cache: dict = {}


def _hf_token(host: Optional[str]) -> Optional[str]:
    """``$HF_TOKEN`` or the token ``huggingface-cli login`` stored, for huggingface.co itself (gated datasets such as
    ImageNet need it); the CDN it redirects to gets a signed URL instead."""
    if host not in _HF_HOSTS:
        return None
    if 'token' not in _hf_token_cache:
        token = os.environ.get('HF_TOKEN')
        if not token:
            try:
                import huggingface_hub
                token = huggingface_hub.get_token()
            except Exception:  # no hub library or an unreadable token file: read without a token
                token = None
        _hf_token_cache['token'] = token
    return _hf_token_cache['token']


class _HttpSource:
    """An http(s) URL, with redirects followed, ``Range`` to resume, and keep-alive connections."""

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url, timeout
        self.conn = self.resp = self.host = None
        self.at = 0        # the byte of the shard the next read gives
        self.end = None    # the byte where the body ends, when the server says

    def open(self, pos: int) -> None:
        url = self.url
        for _ in range(_MAX_REDIRECTS + 1):
            resp = self._request(url, pos)
            if resp.status not in _REDIRECTS:
                break
            url = urljoin(url, resp.getheader('Location') or '')
            self.close()
        else:
            raise DataSourceError(f'{self.url}: more than {_MAX_REDIRECTS} redirects')
        if resp.status not in (200, 206):
            reason = f'HTTP {resp.status} {resp.reason}'.strip()
            self.close()
            if resp.status in (408, 429) or resp.status >= 500:
                after = resp.getheader('Retry-After') or ''
                raise _Retry(reason, wait=min(float(after), _MAX_WAIT) if after.isdigit() else 0.0)
            if resp.status in (401, 403) and urlsplit(self.url).hostname in _HF_HOSTS:
                reason += ' (a gated or private dataset: set HF_TOKEN or run `huggingface-cli login`)'
            raise (_Missing if resp.status in (404, 410) else DataSourceError)(f'{self.url}: {reason}')
        self.at = 0
        if resp.status == 206:
            content_range = resp.getheader('Content-Range') or ''
            m = re.match(r'bytes (\d+)-\d+/', content_range)
            if not m or int(m.group(1)) != pos:
                self.close()
                raise _Retry(f'asked for byte {pos}, got Content-Range {content_range!r}')
            self.at = pos
        length = resp.getheader('Content-Length')
        self.end = self.at + int(length) if length and length.isdigit() and not resp.chunked else None
        while self.at < pos:  # the server ignored the Range: read up to where we were
            if not self.read(min(_CHUNK, pos - self.at)):
                raise _Retry(f'the body ends at byte {self.at}, before byte {pos}')

    def _request(self, url: str, pos: int):
        parts = urlsplit(url)
        if parts.scheme not in ('http', 'https'):
            raise DataSourceError(f'{self.url}: redirected to {url}, which is not http(s)')
        headers = {'User-Agent': 'naflex-train', 'Accept-Encoding': 'identity'}
        if pos:
            headers['Range'] = f'bytes={pos}-'
        token = _hf_token(parts.hostname)
        if token:
            headers['Authorization'] = f'Bearer {token}'
        target = quote(parts.path or '/', safe="/%:@!$&'()*+,;=-._~") + (f'?{parts.query}' if parts.query else '')
        for attempt in (0, 1):
            conn, kept_alive, via = _connections.take(parts.scheme, parts.netloc, self.timeout)
            try:
                if conn.sock is None:
                    self._connect(conn, parts)
                if via is not None:  # an http proxy: the whole URL as the target, and the proxy's credentials
                    conn.request('GET', f'http://{parts.netloc}{target}', headers={**headers, **via})
                else:
                    conn.request('GET', target, headers=headers)
                resp = conn.getresponse()
            except (DataSourceError, _Retry):
                conn.close()
                raise
            except TimeoutError:
                conn.close()
                raise _Retry(f'no response from {parts.netloc} within {self.timeout:g} s') from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                if kept_alive and attempt == 0:
                    continue  # the server had closed the idle connection: a new one, not a retry
                raise _Retry(f'request failed ({type(e).__name__}: {e})') from None
            self.conn, self.resp, self.host = conn, resp, (parts.scheme, parts.netloc, via)
            return resp

    def _connect(self, conn, parts) -> None:
        try:
            conn.connect()
        except socket.gaierror as e:
            raise DataSourceError(f'{self.url}: host {parts.hostname!r} not found ({e.strerror})') from None
        except ssl.SSLCertVerificationError as e:
            raise DataSourceError(f'{self.url}: TLS certificate not accepted ({e.verify_message})') from None
        except ConnectionRefusedError:
            raise _Retry(f'connection refused by {parts.netloc}', unreachable=True) from None
        except TimeoutError:
            raise _Retry(f'no connection to {parts.netloc} within {self.timeout:g} s', unreachable=True) from None
        except OSError as e:
            raise _Retry(f'cannot connect to {parts.netloc} ({e.strerror or e})', unreachable=True) from None

    def read(self, n: int) -> bytes:
        try:
            data = self.resp.read(n)
        except TimeoutError:
            raise _Retry(f'no data for {self.timeout:g} s at byte {self.at}') from None
        except (OSError, http.client.HTTPException) as e:
            raise _Retry(f'connection lost at byte {self.at} ({type(e).__name__})') from None
        self.at += len(data)
        if not data and self.end is not None and self.at < self.end:
            raise _Retry(f'connection closed at byte {self.at} of {self.end}')
        return data

    def close(self) -> None:
        conn, resp, self.conn, self.resp = self.conn, self.resp, None, None
        if conn is None:
            return
        try:  # a short rest (a tar's end padding, a redirect's or an error's page) is read to keep the connection
            if not resp.isclosed() and resp.length is not None and resp.length <= _DRAIN:
                resp.read()
        except (OSError, http.client.HTTPException):
            pass
        if resp.isclosed() and not resp.will_close:
            scheme, netloc, via = self.host
            _connections.give(scheme, netloc, conn, via)
        else:
            conn.close()


class _PipeSource:
    """``pipe:CMD``: the shard is what the shell command writes to stdout (``pipe:curl -sfL URL``,
    ``pipe:aws s3 cp s3://bucket/shard.tar -``). Resuming runs the command again and discards what was read."""

    def __init__(self, url: str, timeout: float):
        self.url, self.cmd, self.timeout = url, url[len('pipe:'):], timeout
        self.proc = self.stderr = None
        self.at = 0
        self.delivered = False  # some output came, in this or an earlier run

    def open(self, pos: int) -> None:
        self.stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(self.cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=self.stderr, bufsize=0, start_new_session=True)
        except OSError as e:
            raise DataSourceError(f'{self.url}: cannot run the command ({e})') from None
        self.at = 0
        while self.at < pos:
            if not self.read(min(_CHUNK, pos - self.at)):
                raise _Retry(f'the output ends at byte {self.at}, before byte {pos}')

    def read(self, n: int) -> bytes:
        fd = self.proc.stdout.fileno()
        poller = select.poll()  # not select(): a worker may hold more than 1024 descriptors (loaders.shards)
        poller.register(fd, select.POLLIN)
        if not poller.poll(self.timeout * 1000):
            raise _Retry(f'no output for {self.timeout:g} s at byte {self.at}')
        data = os.read(fd, n)
        if data:
            self.at += len(data)
            self.delivered = True
            return data
        try:
            status = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise _Retry(f'the command closed its output but did not exit within {self.timeout:g} s') from None
        if status != 0:
            tail = self._stderr_tail()
            reason = f'the command exited with status {status}' + (f': {tail}' if tail else '')
            if not self.delivered:  # a wrong command or object: nothing to retry
                raise _Missing(f'{self.url}: {reason}')
            raise _Retry(reason)
        return b''

    def _stderr_tail(self) -> str:
        self.stderr.seek(max(0, self.stderr.seek(0, os.SEEK_END) - 4096))
        lines = [x.strip() for x in self.stderr.read().decode('utf-8', 'replace').splitlines() if x.strip()]
        return lines[-1][:300] if lines else ''

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the shell and what it started (curl, aws ...)
                except ProcessLookupError:
                    pass
            proc.stdout.close()
            proc.wait()
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None


class _FsspecSource:
    """Any other ``scheme://`` URL through fsspec (``s3://`` needs s3fs, ``gs://`` gcsfs: the ``[cloud]`` extra;
    ``hf://`` comes with huggingface_hub). Timeouts are the backend's own (s3fs, gcsfs and aiohttp have them)."""

    def __init__(self, url: str):
        self.url, self.f = url, None

    def open(self, pos: int) -> None:
        try:
            import fsspec
            fs, path = fsspec.core.url_to_fs(self.url)
        except ImportError as e:
            raise DataSourceError(f'{self.url}: {e} (pip install "naflex-train[cloud]")') from None
        except ValueError as e:
            raise DataSourceError(f'{self.url}: {e}') from None
        try:
            self.f = fs.open(path, 'rb')
            self.f.seek(pos)
        except FileNotFoundError:
            raise _Missing(f'{self.url}: not found') from None
        except PermissionError as e:
            raise DataSourceError(f'{self.url}: permission denied ({e})') from None
        except Exception as e:  # the backends raise their own types (botocore, aiohttp ...): worth a retry
            raise _Retry(f'cannot open ({type(e).__name__}: {e})', unreachable=True) from None

    def read(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except Exception as e:
            raise _Retry(f'read failed ({type(e).__name__}: {e})') from None

    def close(self) -> None:
        if self.f is not None:
            try:
                self.f.close()
            except Exception:
                pass
            self.f = None


def _source(url: str, timeout: float):
    if url.startswith('pipe:'):
        return _PipeSource(url, timeout)
    scheme = urlsplit(url).scheme.lower() if _URL.match(url) else ''
    if scheme in ('http', 'https'):
        return _HttpSource(url, timeout)
    if scheme == 'file':
        return _FileSource(url, unquote(urlsplit(url).path))
    return _FsspecSource(url) if scheme else _FileSource(url, url)


class _Resuming:
    """``read(n)`` over a source that reconnects at the byte where a failure stopped it, after a backoff of
    ``backoff * 2**(k-1)`` seconds (times a random 0.5-1, so workers do not retry in step) for the k-th failure in a
    row, or what the server's ``Retry-After`` asks for (up to a minute); a read that makes progress starts the count
    again. Beyond ``retries`` failures in a row: _GaveUp, or
    DataSourceError where no connection was ever made."""

    def __init__(self, source, url: str, retries: int, backoff: float):
        self.source, self.url, self.retries, self.backoff = source, url, retries, backoff
        self.pos, self.failures = 0, 0
        self.is_open = self.opened_once = False

    def read(self, n: int) -> bytes:
        while True:
            try:
                if not self.is_open:
                    self.source.open(self.pos)
                    self.is_open = self.opened_once = True
                data = self.source.read(n)
            except _Retry as e:
                self._failed(e)
                continue
            except DataSourceError as e:
                self.close()
                if self.pos:  # the object went away mid-read: this shard fails, not the run
                    raise _GaveUp(str(e).removeprefix(f'{self.url}: ')) from None
                raise
            if data:
                self.pos += len(data)
                self.failures = 0
            return data

    def _failed(self, e: _Retry) -> None:
        self.close()
        self.failures += 1
        if self.failures > self.retries:
            tries = f'{self.retries} retr{"y" if self.retries == 1 else "ies"}'
            if not self.opened_once and e.unreachable:
                raise DataSourceError(f'{self.url}: {e.reason} (after {tries})') from None
            raise _GaveUp(f'{e.reason}; gave up after {tries}') from None
        time.sleep(max(self.backoff * 2 ** (self.failures - 1) * random.uniform(0.5, 1.0), e.wait))

    def close(self) -> None:
        self.source.close()
        self.is_open = False


# --- from bytes to samples ------------------------------------------------------------------------------------

class _Decompressed:
    """A gzip / bzip2 / xz stream decompressed on the fly (streams, unlike random access, can read them), at most
    1 MiB of output at a time however well the input compresses."""

    def __init__(self, head: bytes, read: Callable[[int], bytes], decompressor):
        self.head, self._read, self.d = head, read, decompressor
        self.buf, self.off = b'', 0

    def read(self, n: int) -> bytes:
        while self.off >= len(self.buf) and not self.d.eof:
            if hasattr(self.d, 'unconsumed_tail'):  # zlib's interface
                self.buf = self.d.decompress(self.d.unconsumed_tail or self._input(), _OUT)
            else:  # bz2's and lzma's
                self.buf = self.d.decompress(self._input() if self.d.needs_input else b'', _OUT)
            self.off = 0
        out = self.buf[self.off:self.off + n]
        self.off += len(out)
        return out

    def _input(self) -> bytes:
        data, self.head = (self.head or self._read(_CHUNK)), b''
        if not data:
            raise _ShardCut('the compressed stream ends early')
        return data


class _TarStream:
    """``read_at(offset, size)`` for loaders.shards.tar_members over a stream: offsets only move forward, the bytes
    in between are read and dropped."""

    def __init__(self, read: Callable[[int], bytes], head: bytes = b''):
        self._read, self.head, self.pos = read, head, 0
        self.start = b''  # the first bytes, for the message when they are no tar header

    def read_at(self, offset: int, size: int) -> bytes:
        assert offset >= self.pos, (offset, self.pos)
        while self.pos < offset:
            if not self._next(min(_CHUNK, offset - self.pos)):
                raise _ShardCut(f'the stream ends at byte {self.pos}, inside a member')
        chunks, left = [], size
        while left:
            chunk = self._next(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = chunks[0] if len(chunks) == 1 else b''.join(chunks)
        self.start = self.start or data[:32]
        return data

    def _next(self, n: int) -> bytes:
        if self.head:
            data, self.head = self.head[:n], self.head[n:]
        else:
            data = self._read(n)
        self.pos += len(data)
        return data


def _tar_stream(raw: _Resuming, url: str) -> _TarStream:
    """The shard's tar bytes, decompressed when its first bytes say so."""
    head = b''
    while len(head) < 6:
        chunk = raw.read(6 - len(head))
        if not chunk:
            break
        head += chunk
    if head.startswith(_ZSTD):
        raise DataSourceError(f'{url}: zstd-compressed; decompress it to .tar or read it as pipe:zstd -dc ...')
    for magic, make in _COMPRESSED.items():
        if head.startswith(magic):
            return _TarStream(_Decompressed(head, raw.read, make()).read)
    return _TarStream(raw.read, head)


@dataclass
class StreamSample:
    """One sample of a shard, in shard order: ``name`` is ``SHARD:MEMBER`` as loaders.shards names a local one."""
    key: str
    image: bytes
    image_ext: str
    target: int
    name: str


def iter_shard_samples(url: str, keys: SampleKeys = SampleKeys(), *, retries: int = 3, timeout: float = 30.0,
                       skip: int = 0, backoff: float = 1.0,
                       problems: Optional[List[str]] = None) -> Iterator[StreamSample]:
    """The samples of one shard (a local path or a URL, see the module docstring), read front to back with memory
    bounded by one sample. ``skip`` samples are passed over first (resuming mid-shard; their images are not kept).
    Members that make no sample (no image, no valid label: loaders.shards' rules) are left out and described in
    ``problems`` when given. ``timeout``: seconds any single connect or read may wait; ``retries``, ``backoff``:
    see the module docstring. Raises DataSourceError (before any sample) or ShardFailed (after the samples read
    before the failure)."""
    url = os.fspath(url)
    raw = _Resuming(_source(url, timeout), url, retries, backoff)
    label = label_ext(keys)
    count = 0  # samples of the shard passed so far, skipped ones included
    key, found = None, {}

    def complete() -> Optional[StreamSample]:
        nonlocal count
        if key is None:
            return None
        image, target, why = sample_label(found, keys, lambda entry, limit: entry[3][:limit])
        if image is None:
            if problems is not None:
                problems.append(f'{url}: sample {key!r} {why}')
            return None
        count += 1
        if count <= skip:
            return None
        return StreamSample(key, image[3], _split_key(image[0])[1], target, f'{url}:{image[0]}')

    try:
        tar = _tar_stream(raw, url)
        for member, offset, size in tar_members(tar.read_at):
            k, ext = _split_key(member)
            if k != key:
                sample = complete()
                key, found = k, {}
                if sample is not None:
                    yield sample
            data = None
            if ext == label or (ext in keys.image and count >= skip):
                data = tar.read_at(offset, size)
                if len(data) < size:
                    raise _ShardCut(f'the stream ends inside member {member!r}')
            found[ext] = (member, offset, size, data)
        sample = complete()
        if sample is not None:
            yield sample
    except (_ShardCut, _Unsupported, _GaveUp) as e:
        if isinstance(e, _Unsupported) and key is None:  # the first header already: an error page, not a shard
            raise DataSourceError(f'{url}: not a tar archive (it starts with {tar.start!r})') from None
        sample = complete()  # the members before the failure make a sample when they are whole, as in the index
        if sample is not None:
            yield sample
        what = {_ShardCut: 'cut short', _Unsupported: 'unsupported tar header'}.get(type(e))
        raise ShardFailed(url, f'{what} ({e})' if what else str(e), count) from None
    finally:
        raw.close()


# --- _info.json -----------------------------------------------------------------------------------------------

def read_info(root, *, timeout: float = 30.0, retries: int = 3, backoff: float = 1.0,
              missing_ok: bool = False) -> dict:
    """``_info.json`` (or ``info.json``) of a local folder or a URL, checked to be the layout timm's wds reader
    takes: ``{"splits": {NAME: {"filenames": [...], "shard_lengths": [...], ...}}, ...}``. None there: ``{}``
    with ``missing_ok``, else DataSourceError; one that cannot be read or parsed: DataSourceError."""
    root = os.fspath(root)
    first_error = None
    for name in INFO_FILES:
        url = join_url(root, name)
        try:
            data = _read_all(url, timeout, retries, backoff)
        except _Missing as e:
            first_error = first_error or e
            continue
        try:
            info = json.loads(data)
        except ValueError as e:
            raise DataSourceError(f'{url} is not valid JSON ({e})') from None
        _check_info(info, url)
        return info
    if missing_ok:
        return {}
    raise DataSourceError(f'no {" or ".join(INFO_FILES)} at {root} ({first_error})')


def _read_all(url: str, timeout: float, retries: int, backoff: float) -> bytes:
    raw = _Resuming(_source(url, timeout), url, retries, backoff)
    chunks, total = [], 0
    try:
        while chunk := raw.read(_CHUNK):
            chunks.append(chunk)
            total += len(chunk)
            if total > _INFO_LIMIT:
                raise DataSourceError(f'{url}: larger than {_INFO_LIMIT >> 20} MiB, not a dataset info file')
    except _GaveUp as e:
        raise DataSourceError(f'{url}: {e}') from None
    finally:
        raw.close()
    return b''.join(chunks)


def _check_info(info, url: str) -> None:
    def bad(what: str):
        return DataSourceError(f'{url}: {what}')
    if not isinstance(info, dict):
        raise bad(f'holds a JSON {type(info).__name__}, not an object with "splits"')
    splits = info.get('splits', {})
    if not isinstance(splits, dict):
        raise bad('"splits" is not an object of split names')
    for name, split in splits.items():
        if not isinstance(split, dict):
            raise bad(f'split {name!r} is not an object')
        files = split.get('filenames', [])
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise bad(f'split {name!r}: "filenames" is not a list of shard names')
        lengths = split.get('shard_lengths')
        if lengths is not None and (not isinstance(lengths, list) or len(lengths) != len(files) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in lengths)):
            raise bad(f'split {name!r}: "shard_lengths" is not one sample count per shard ({len(files)} shards)')


__all__ = ['DataSourceError', 'ShardFailed', 'StreamSample', 'is_remote', 'iter_shard_samples', 'join_url',
           'read_info']
