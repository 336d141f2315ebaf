"""The http(s) byte source of loaders.stream_io: redirects, ``Range`` requests (to resume at a byte, to start at a
remembered sample, to stop where a piece of a shard ends), keep-alive connections, proxies and the Hugging Face
token. Every failure becomes one of stream_io's exceptions: ``_Retry`` (worth another try), ``_Missing`` /
``DataSourceError`` (the source is wrong)."""
from __future__ import annotations

import base64
import http.client
import os
import re
import socket
import ssl
import threading
import urllib.request
from typing import Optional
from urllib.parse import quote, unquote, urljoin, urlsplit

from .stream_io import _CHUNK, DataSourceError, _Missing, _Retry

_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 8
_DRAIN = 1 << 16       # the rest of a body read to keep its connection alive (a tar's end-of-archive padding)
_MAX_WAIT = 60.0       # the longest Retry-After honoured
_HF_HOSTS = ('huggingface.co', 'hf.co')  # hosts that get the Hugging Face token (never the CDN they redirect to)


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
        if conn is not None and conn.sock is not None and conn.sock.fileno() == -1:
            # given back by a read the garbage collector ended: the collector closed its socket all the same
            conn.close()
        elif conn is not None and conn.sock is not None:
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


class HttpSource:
    """An http(s) URL, with redirects followed, ``Range`` to resume, and keep-alive connections. ``stop``: the byte
    where reading will end, when known: the request asks for the bytes up to it only."""
    seekable = True

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout, self.stop = url, timeout, None
        self.conn = self.resp = self.host = self.validator = None
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
        self.at, size = 0, None
        if resp.status == 206:
            content_range = resp.getheader('Content-Range') or ''
            m = re.match(r'bytes (\d+)-\d+/(\d+)?', content_range)
            if not m or int(m.group(1)) != pos:
                self.close()
                raise _Retry(f'asked for byte {pos}, got Content-Range {content_range!r}')
            self.at, size = pos, m.group(2) and int(m.group(2))
        length = resp.getheader('Content-Length')
        self.end = self.at + int(length) if length and length.isdigit() and not resp.chunked else None
        size = size if resp.status == 206 else self.end
        validator = {'etag': resp.getheader('ETag'), 'last_modified': resp.getheader('Last-Modified'), 'size': size}
        self.validator = {k: v for k, v in validator.items() if v is not None} or None
        while self.at < pos:  # the server ignored the Range: read up to where we were
            if not self.read(min(_CHUNK, pos - self.at)):
                raise _Retry(f'the body ends at byte {self.at}, before byte {pos}')

    def _request(self, url: str, pos: int):
        parts = urlsplit(url)
        if parts.scheme not in ('http', 'https'):
            raise DataSourceError(f'{self.url}: redirected to {url}, which is not http(s)')
        headers = {'User-Agent': 'naflex-train', 'Accept-Encoding': 'identity'}
        if pos or self.stop is not None:
            headers['Range'] = f'bytes={pos}-' + (f'{self.stop - 1}' if self.stop is not None else '')
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


__all__ = ['HttpSource']
