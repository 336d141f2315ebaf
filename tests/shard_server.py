"""A tiny threaded HTTP/1.1 server on 127.0.0.1 for the stream tests (loaders.stream_io): serves the files of a
folder with keep-alive and ``Range: bytes=N-`` requests (206), and injects faults per path, one action per request:

- an int status (500, 503, 404 ...): that status with a short body; ``(status, seconds)``: with ``Retry-After``;
- ``('cut', n)``: the headers with the full length, then n bytes of the body, then the connection is closed;
- ``('stall', s)``: s seconds of silence before the response (ended early when the server stops);
- ``('redirect', location)``: 302 to another path or URL.

``tls=(certfile, keyfile)`` serves https. ``ranges=False`` makes it a server that ignores Range (200 and the whole
file). ``requests`` records (path, Range header) of every request, ``targets`` the request targets as sent,
``authorization`` their Authorization headers, ``connections`` counts the TCP connections accepted. ``stop()``
closes the listening socket and every open connection, so later connections are refused.
"""
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class ShardServer:
    def __init__(self, root, ranges: bool = True, tls=None):
        self.root, self.ranges = Path(root), ranges
        self.faults = {}
        self.requests = []
        self.targets = []  # the request targets as sent (a whole URL when the client takes the server for a proxy)
        self.authorization = []  # the Authorization header of each request
        self.connections = 0
        self._open = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.scheme = 'https' if tls else 'http'
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f'{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}'

    def fault(self, name: str, *actions) -> None:
        """The next requests for ``name`` get ``actions``, one each; then the file as it is."""
        self.faults['/' + name.lstrip('/')] = list(actions)

    def paths(self, name: str):
        return [rng for path, rng in self.requests if path == '/' + name.lstrip('/')]

    def stop(self) -> None:
        self._stopping.set()
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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def setup(self):
        super().setup()
        srv = self.server.owner
        with srv._lock:
            srv.connections += 1
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

    def do_GET(self):
        srv = self.server.owner
        path = unquote(urlsplit(self.path).path)
        srv.requests.append((path, self.headers.get('Range')))
        srv.targets.append(self.path)
        srv.authorization.append(self.headers.get('Authorization'))
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
        size = file.stat().st_size
        m = re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range') or '') if srv.ranges else None
        start = int(m.group(1)) if m else 0
        self.send_response(206 if m else 200)
        if m:
            self.send_header('Content-Range', f'bytes {start}-{size - 1}/{size}')
        self.send_header('Accept-Ranges', 'bytes' if srv.ranges else 'none')
        self.send_header('Content-Length', str(size - start))
        self.end_headers()
        left = action[1] if action[0] == 'cut' else size - start
        with open(file, 'rb') as f:  # in chunks: the server holds no whole file in memory (the tests measure it)
            f.seek(start)
            while left > 0 and (chunk := f.read(min(left, 1 << 16))):
                self.wfile.write(chunk)
                left -= len(chunk)
        if action[0] == 'cut':
            self.wfile.flush()
            self.close_connection = True
        return None
