"""The HTTP server of the streaming tests, and the tar shards they serve.

``ShardServer(folder)`` serves the files of a folder on 127.0.0.1 over HTTP/1.1 with keep-alive, Range requests
(``bytes=N-`` and ``bytes=N-M``: 206), an ETag and a Last-Modified header, and injects faults per path, one action
per request:

- an int status (500, 503, 404 ...): that status with a short body; ``(status, seconds)``: with ``Retry-After``;
- ``('cut', n)``: the headers with the full length, then n bytes of the body, then the connection is closed;
- ``('stall', s)``: s seconds of silence before the response (ended early when the server stops);
- ``('redirect', location)``: 302 to another path or URL.

It runs in a thread of the test process, or with ``process=True`` in a process of its own: a listening socket of
the test process is inherited by every forked DataLoader worker, so a server there could never go away while the
workers live (what a test of a server that stops mid-run needs). Both modes serve, inject and record alike; the
process answers the test's questions on a control path.

``tls=(certfile, keyfile)`` serves https (in-process). ``ranges=False`` makes it a server that ignores Range (200
and the whole file). Recorded: ``requests`` (path, Range header) of every request, ``targets`` the request targets
as sent, ``authorization`` their Authorization headers, ``connections`` the TCP connections accepted,
``bytes_sent`` the body bytes of the files served. ``stop()`` closes the listening socket and every open
connection, so later connections are refused.

``write_shards`` writes shards whose sample k has class k, so a batch's targets say which samples it holds.
"""
import argparse
import io
import json
import re
import ssl
import subprocess
import sys
import tarfile
import threading
import urllib.request
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image

_CONTROL = '/__shard_server__'


class ShardServer:
    def __init__(self, root, ranges: bool = True, tls=None, process: bool = False):
        self.root, self.ranges, self.process = Path(root), ranges, process
        self._stopping = threading.Event()
        if process:
            assert tls is None, 'https is served in-process only'
            cmd = [sys.executable, __file__, str(self.root)] + ([] if ranges else ['--no-ranges'])
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            port = self._proc.stdout.readline().strip()
            if not port.isdigit():
                self._proc.kill()
                raise RuntimeError(f'the test server did not start ({port!r})')
            self.scheme, self._port = 'http', int(port)
            return
        self.faults = {}
        self.log = {'requests': [], 'targets': [], 'authorization': [], 'connections': 0, 'bytes_sent': 0}
        self._open = set()
        self._lock = threading.Lock()
        self.httpd = _Server(('127.0.0.1', 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.scheme = 'https' if tls else 'http'
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self._port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f'{self.scheme}://127.0.0.1:{self._port}'

    def _control(self, what: str, payload=None):
        """Ask the server process (``stats``: its records; ``fault``: inject ``payload``)."""
        data = None if payload is None else json.dumps(payload).encode()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, whatever proxy is set
        with opener.open(urllib.request.Request(f'{self.url}{_CONTROL}/{what}', data=data), timeout=10) as r:
            return json.loads(r.read())

    def _log(self) -> dict:
        return self._control('stats') if self.process else self.log

    @property
    def requests(self):
        return [tuple(x) for x in self._log()['requests']]

    @property
    def targets(self):
        return self._log()['targets']

    @property
    def authorization(self):
        return self._log()['authorization']

    @property
    def connections(self) -> int:
        return self._log()['connections']

    @property
    def bytes_sent(self) -> int:
        return self._log()['bytes_sent']

    def fault(self, name: str, *actions) -> None:
        """The next requests for ``name`` get ``actions``, one each; then the file as it is."""
        if self.process:
            self._control('fault', {'name': name, 'actions': actions})
        else:
            self.faults['/' + name.lstrip('/')] = list(actions)

    def paths(self, name: str):
        return [rng for path, rng in self.requests if path == '/' + name.lstrip('/')]

    def stop(self) -> None:
        self._stopping.set()
        if self.process:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc.stdout.close()
            return
        self.httpd.shutdown()
        self.httpd.server_close()
        with self._lock:
            for sock in list(self._open):
                try:
                    sock.shutdown(2)
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._stopping.is_set():
            self.stop()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):  # a client that stops early
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def setup(self):
        super().setup()
        srv = self.server.owner
        with srv._lock:
            srv.log['connections'] += 1
            srv._open.add(self.connection)

    def finish(self):
        with self.server.owner._lock:
            self.server.owner._open.discard(self.connection)
        super().finish()

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes = b'', headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        srv = self.server.owner
        if self.path != f'{_CONTROL}/fault':
            return self._reply(404, b'not found\n')
        order = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        srv.faults['/' + order['name'].lstrip('/')] = list(order['actions'])
        return self._reply(200, b'{}')

    def do_GET(self):
        srv = self.server.owner
        if self.path == f'{_CONTROL}/stats':
            with srv._lock:
                return self._reply(200, json.dumps(srv.log).encode())
        path = unquote(urlsplit(self.path).path)
        srv.log['requests'].append((path, self.headers.get('Range')))
        srv.log['targets'].append(self.path)
        srv.log['authorization'].append(self.headers.get('Authorization'))
        actions = srv.faults.get(path)
        action = actions.pop(0) if actions else 'ok'
        if isinstance(action, int):
            return self._reply(action, f'status {action}\n'.encode())
        if isinstance(action[0], int):
            return self._reply(action[0], b'busy\n', [('Retry-After', str(action[1]))])
        if action[0] == 'stall':
            if srv._stopping.wait(action[1]):
                self.close_connection = True
                return None
        if action[0] == 'redirect':
            return self._reply(302, headers=[('Location', action[1])])
        file = srv.root / path.lstrip('/')
        if not file.is_file():
            return self._reply(404, b'not found\n')
        st = file.stat()
        size = st.st_size
        m = re.fullmatch(r'bytes=(\d+)-(\d*)', self.headers.get('Range') or '') if srv.ranges else None
        start = int(m.group(1)) if m else 0
        end = min(size, int(m.group(2)) + 1) if m and m.group(2) else size
        self.send_response(206 if m else 200)
        if m:
            self.send_header('Content-Range', f'bytes {start}-{end - 1}/{size}')
        self.send_header('Accept-Ranges', 'bytes' if srv.ranges else 'none')
        self.send_header('ETag', f'"{size:x}-{st.st_mtime_ns:x}"')
        self.send_header('Last-Modified', formatdate(st.st_mtime, usegmt=True))
        self.send_header('Content-Length', str(end - start))
        self.end_headers()
        left = action[1] if action[0] == 'cut' else end - start
        with open(file, 'rb') as f:  # in chunks: the server holds no whole file in memory (the tests measure it)
            f.seek(start)
            while left > 0 and (chunk := f.read(min(left, 1 << 16))):
                self.wfile.write(chunk)
                left -= len(chunk)
                with srv._lock:
                    srv.log['bytes_sent'] += len(chunk)
        if action[0] == 'cut':
            self.wfile.flush()
            self.close_connection = True
        return None


def write_shards(root: Path, lengths: Sequence[int], split: str = 'train', name: str = 'ds', bad: Sequence[int] = (),
                 start: int = 0, num_classes: int = 0) -> Path:
    """Shards ``name-split-NNNN.tar`` of ``lengths`` samples; sample k (from ``start``) is ``sKKKKK.jpg`` with class k
    (``bad``: those whose image bytes are garbage); ``_info.json`` lists them with their lengths (merged into an
    existing one) and names ``num_classes`` classes (default: one per sample)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(lengths) + start)
    names, k = [], start
    for s, n in enumerate(lengths):
        names.append(f'{name}-{split}-{s:04d}.tar')
        with tarfile.open(root / names[-1], 'w', format=tarfile.USTAR_FORMAT) as tf:
            for _ in range(n):
                buf = io.BytesIO()
                h, w = (int(x) for x in rng.integers(20, 70, 2))
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, 'JPEG')
                for ext, data in (('jpg', b'not a jpeg' if k in bad else buf.getvalue()), ('cls', str(k).encode())):
                    member = tarfile.TarInfo(f's{k:05d}.{ext}')
                    member.size = len(data)
                    tf.addfile(member, io.BytesIO(data))
                k += 1
    info_file = root / '_info.json'
    info = json.loads(info_file.read_text()) if info_file.is_file() else {'splits': {}}
    info['splits'][split] = {'name': split, 'num_samples': k - start, 'filenames': names,
                             'shard_lengths': list(lengths)}
    info['classes'] = [f'c{i}' for i in range(max(num_classes, k, len(info.get('classes', ()))))]
    info_file.write_text(json.dumps(info))
    return root


def _serve(argv=None) -> None:
    """The server process of ``ShardServer(process=True)``: prints its port, serves until killed."""
    p = argparse.ArgumentParser()
    p.add_argument('root')
    p.add_argument('--no-ranges', action='store_true')
    args = p.parse_args(argv)
    srv = ShardServer(args.root, ranges=not args.no_ranges)
    print(srv._port, flush=True)
    srv._thread.join()


if __name__ == '__main__':
    _serve()
