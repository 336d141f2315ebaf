"""Benchmark: streaming the same tar shards from local files and over HTTP (loaders.stream_io).

Command (~1 min on 2 shared vCPUs for caltech101's train split, 5,784 samples in 6 shards):
    python scripts/make_shards.py ../shared/data/caltech101 /tmp/cal_wds
    python scripts/bench/bench_stream.py --shards /tmp/cal_wds --repeats 3

Reads every sample of the split (image bytes + label) front to back, shard after shard, in one process, and reports
samples/s, MiB/s and the CPU milliseconds per sample of this process (the reader's own cost; the server runs in a
separate process started here, serving the shards from 127.0.0.1 with keep-alive and Range support, so its CPU is
not counted). Rows: ours from local files, ours over HTTP, ours from ``pipe:cat`` (a command's stdout), and for
reference ``tarfile`` reading each shard as a stream, as webdataset's pipeline does (from the file, and from a
urllib response over the same server). Best of ``--repeats``; the files are read once first, so all rows read from
the page cache: these are CPU costs and loopback transfer, not disk or network latency.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# loaders (which imports torch) is imported in main(), after the server process has branched off without it


class _RangeHandler(SimpleHTTPRequestHandler):
    """Static files over HTTP/1.1 (keep-alive), with ``Range: bytes=N-`` answered by 206."""
    protocol_version = 'HTTP/1.1'

    def log_message(self, *args):
        pass

    def send_head(self):
        m = re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range') or '')
        path = self.translate_path(self.path)
        if not m or not os.path.isfile(path):
            return super().send_head()
        f = open(path, 'rb')
        size, start = os.fstat(f.fileno()).st_size, int(m.group(1))
        f.seek(start)
        self.send_response(206)
        self.send_header('Content-Range', f'bytes {start}-{size - 1}/{size}')
        self.send_header('Content-Length', str(size - start))
        self.end_headers()
        return f


def serve(folder: str) -> None:
    """The server process: prints its port, serves ``folder`` until killed."""
    os.chdir(folder)
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), _RangeHandler)
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()


def read_ours(urls):
    from loaders import stream_io
    samples = nbytes = 0
    for url in urls:
        for s in stream_io.iter_shard_samples(url):
            samples += 1
            nbytes += len(s.image)
    return samples, nbytes


def read_tarfile(opens):
    """What a webdataset pipeline does per shard: tarfile in stream mode, every member's bytes."""
    samples = nbytes = 0
    for open_shard in opens:
        with open_shard() as f, tarfile.open(fileobj=f, mode='r|') as tf:
            for m in tf:
                if m.isfile():
                    data = tf.extractfile(m).read()
                    if m.name.endswith('.cls'):
                        samples += 1
                    elif not m.name.endswith('.json'):
                        nbytes += len(data)
    return samples, nbytes


def measure(repeats: int, fn):
    """(best wall seconds, CPU seconds of that run, result)."""
    best = None
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        result = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if best is None or wall < best[0]:
            best = (wall, cpu, result)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shards', required=True, help='a folder of tar shards + _info.json')
    p.add_argument('--split', default='train')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--serve', action='store_true', help=argparse.SUPPRESS)  # the server process
    args = p.parse_args(argv)
    if args.serve:
        return serve(args.shards)
    from loaders import shards as S
    from loaders import stream_io
    root = Path(args.shards)
    _, shards = S.split_shards(root, args.split, S.load_info(root))
    names = [os.path.relpath(s, root) for s in shards]
    server = subprocess.Popen([sys.executable, __file__, '--shards', str(root), '--serve'], stdout=subprocess.PIPE,
                              text=True)
    try:
        base = f'http://127.0.0.1:{int(server.stdout.readline())}'
        http_urls = [stream_io.join_url(base, n) for n in names]
        print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {platform.node()} cpus={os.cpu_count()} "
              f"python={platform.python_version()} {len(shards)} shards of split {args.split!r} in {root}")
        read_tarfile([lambda s=s: open(s, 'rb') for s in shards])  # warm the page cache for every reader alike
        runs = [
            ('ours, local files', lambda: read_ours(shards)),
            ('ours, HTTP from 127.0.0.1', lambda: read_ours(http_urls)),
            ('ours, pipe:cat', lambda: read_ours([f'pipe:cat {s}' for s in shards])),
            ('tarfile stream, local files', lambda: read_tarfile([lambda s=s: open(s, 'rb') for s in shards])),
            ('tarfile stream, urllib HTTP', lambda: read_tarfile([lambda u=u: urllib.request.urlopen(u, timeout=30)
                                                                  for u in http_urls])),
        ]
        rows = [(what, *measure(args.repeats, fn)) for what, fn in runs]
    finally:
        server.kill()
        server.wait()
    print('\n| reader | samples/s | MiB/s | CPU ms per sample (this process) |')
    print('|---|---:|---:|---:|')
    for what, wall, cpu, (samples, nbytes) in rows:
        print(f'| {what} | {samples / wall:,.0f} | {nbytes / wall / 2**20:.0f} | {cpu / samples * 1e3:.3f} |')
    return rows


if __name__ == '__main__':
    main()
