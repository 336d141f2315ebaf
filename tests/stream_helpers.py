"""Helpers of the streaming tests: tar shards whose sample i has class i (so a batch's targets say which samples it
holds), and a plain HTTP server on 127.0.0.1 that serves a folder and can be stopped mid-run."""
import io
import json
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


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


class Server:
    """``with Server(folder) as url:`` serves ``folder`` at ``url`` (``http://127.0.0.1:PORT``) from its own process
    (``python -m http.server``: a server thread of the test process would leave its listening socket open in every
    forked DataLoader worker, so it could never go away); ``stop()`` ends it at once (later connections are
    refused)."""

    def __init__(self, folder: Path):
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', 0))
            port = sock.getsockname()[1]
        self.url = f'http://127.0.0.1:{port}'
        self.cmd = [sys.executable, '-m', 'http.server', str(port), '--bind', '127.0.0.1', '--directory', str(folder)]
        self.proc = None

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:  # until it answers
            try:
                urllib.request.urlopen(self.url + '/', timeout=1).close()
                return self.url
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f'the test server at {self.url} did not start')

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __exit__(self, *exc):
        self.stop()
