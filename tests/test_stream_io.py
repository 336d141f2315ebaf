"""The shard transport (loaders.stream_io): a shard streamed from a file, over HTTP (tests/shard_server.py on
127.0.0.1), from a ``pipe:`` command or through fsspec gives the samples of the random-access index, in shard
order; and each fault (5xx, a cut connection, a server that stops, stalls or ignores Range, 404, a bad
``_info.json``) ends as the documented retry, DataSourceError or ShardFailed, within bounded time."""
import bz2
import gzip
import importlib.util
import io
import json
import lzma
import multiprocessing
import pickle
import shutil
import sys
import socket
import subprocess
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest

import loaders
from loaders import shards as S
from loaders import stream_io as IO
from shard_server import ShardServer

FAST = dict(retries=2, timeout=2.0, backoff=0.02)  # small test timeouts: every fault ends within seconds


def _write_tar(path, members):
    with tarfile.open(path, 'w', format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _members(n, size=3000, start=0):
    """n samples KEY.jpg (distinct bytes) + KEY.cls + KEY.json, the layout make_shards.py writes."""
    out = []
    for i in range(start, start + n):
        out += [(f's{i:03d}.jpg', bytes([i % 251]) * (size + 37 * i)), (f's{i:03d}.cls', str(i % 7).encode()),
                (f's{i:03d}.json', json.dumps({'label': i % 5}).encode())]
    return out


def _as_tuples(samples):
    return [(s.key, s.image, s.image_ext, s.target, s.name) for s in samples]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """The tests talk to 127.0.0.1 directly, whatever proxy the machine's environment names."""
    for name in ('http_proxy', 'https_proxy', 'all_proxy', 'no_proxy'):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def shard_dir(tmp_path):
    _write_tar(tmp_path / 'x-train-0000.tar', _members(12))
    _write_tar(tmp_path / 'x-train-0001.tar', _members(5, start=12))
    info = {'splits': {'train': {'name': 'train', 'num_samples': 17, 'filenames': ['x-train-0000.tar',
                                                                                   'x-train-0001.tar'],
                                 'shard_lengths': [12, 5]}}}
    (tmp_path / '_info.json').write_text(json.dumps(info))
    return tmp_path


@pytest.fixture
def server(shard_dir):
    with ShardServer(shard_dir) as srv:
        yield srv


def _expected(path, keys=S.SampleKeys(), name_prefix=None):
    """The samples of the random-access index of ``path``, as (key, bytes, ext, target, name)."""
    samples, _, _ = S.index_shard(str(path), keys)
    data = path.read_bytes()
    prefix = name_prefix or str(path)
    return [(S._split_key(member)[0], data[off:off + size], S._split_key(member)[1], target, f'{prefix}:{member}')
            for off, size, target, member in samples]


# --- names, local files, equality with the index ---------------------------------------------------------------

def test_is_remote_and_join_url():
    for url in ('https://huggingface.co/datasets/timm/x/resolve/main/', 'http://h:8/d', 's3://b/p', 'gs://b',
                'hf://datasets/timm/x', 'pipe:curl -sfL https://h/x.tar', 'file:///data/x'):
        assert IO.is_remote(url), url
    for path in ('/data/in1k', 'data/in1k', 'C:\\data', 'x:y'):
        assert not IO.is_remote(path), path
    assert IO.join_url('https://h/d/', 'a.tar') == IO.join_url('https://h/d', 'a.tar') == 'https://h/d/a.tar'
    assert IO.join_url('https://h/d?sig=1', 'a.tar') == 'https://h/d/a.tar?sig=1'
    assert IO.join_url('s3://bucket', 'a.tar') == 's3://bucket/a.tar'
    assert IO.join_url('/data/in1k', 'a.tar') == '/data/in1k/a.tar'
    assert IO.join_url('pipe:aws s3 cp s3://b/d/{} -', 'a.tar') == 'pipe:aws s3 cp s3://b/d/a.tar -'
    assert IO.join_url('pipe:curl -sfL https://h/d', 'a.tar') == 'pipe:curl -sfL https://h/d/a.tar'
    assert IO.join_url('https://h/d', 's3://other/a.tar') == 's3://other/a.tar'  # already a URL


def test_local_stream_equals_the_index(demo_shards):
    ds = loaders.ShardDataset(demo_shards, 'train')
    streamed = [s for shard in ds.shards for s in IO.iter_shard_samples(shard)]
    assert len(streamed) == len(ds) == 24
    for i, s in enumerate(streamed):
        assert s.name == str(ds.path(i)) and s.image == ds.path(i).read_bytes() and s.target == ds.target(i)
        assert s.image_ext == 'jpg' and s.name.endswith(f'{s.key}.jpg')


def test_bad_members_are_left_out_as_the_index_does(tmp_path):
    odd = [('orphan.jpg', b'x'), ('nocls.png', b'y' * 10), ('badcls.jpg', b'z'), ('badcls.cls', b'-1'),
           ('d/k.webp', b'w' * 700), ('d/k.cls', b' 4\n')]
    members = _members(3) + odd + _members(2, start=3)
    path = _write_tar(tmp_path / 'a.tar', members)
    problems = []
    got = _as_tuples(IO.iter_shard_samples(path, problems=problems))
    assert got == _expected(path) and len(got) == 6 and got[3][2:4] == ('webp', 4)
    _, index_problems, _ = S.index_shard(str(path))
    assert problems == [p.replace('a.tar:', f'{path}:') for p in index_problems] and len(problems) == 3
    keys = S.SampleKeys.parse('png;jpg', 'label')  # timm's --input-key / --target-key
    assert _as_tuples(IO.iter_shard_samples(path, keys)) == _expected(path, keys)
    assert [s.target for s in IO.iter_shard_samples(path, keys)] == [0, 1, 2, 3, 4]


def test_skip_resumes_mid_shard(shard_dir):
    path = shard_dir / 'x-train-0000.tar'
    whole = _as_tuples(IO.iter_shard_samples(path))
    assert _as_tuples(IO.iter_shard_samples(f'file://{path}')) == [(*s[:4], f'file://{s[4]}') for s in whole]
    assert _as_tuples(IO.iter_shard_samples(path, skip=5)) == whole[5:]
    assert list(IO.iter_shard_samples(path, skip=40)) == []


def test_truncated_shard_yields_what_was_read_then_fails(shard_dir, tmp_path, server):
    data = (shard_dir / 'x-train-0000.tar').read_bytes()
    cut = tmp_path / 'cut.tar'
    cut.write_bytes(data[:len(data) // 2 + 100])
    kept, _, why = S.index_shard(str(cut))
    (shard_dir / 'cut.tar').write_bytes(cut.read_bytes())
    for url in (str(cut), f'{server.url}/cut.tar'):
        got = []
        with pytest.raises(IO.ShardFailed, match='cut short') as e:
            for s in IO.iter_shard_samples(url, **FAST):
                got.append(s)
        assert len(got) == len(kept) == e.value.samples_read and why and e.value.url == url
        assert str(e.value).startswith(url) and '\n' not in str(e.value)


def test_memory_stays_bounded_by_a_sample(tmp_path):
    big = _write_tar(tmp_path / 'big.tar', [(f'b{i:02d}.{e}', bytes([i]) * (1 << 20) if e == 'jpg' else b'3')
                                            for i in range(24) for e in ('jpg', 'cls')])  # 24 MiB of 1 MiB images
    with ShardServer(tmp_path) as srv:
        for url in (str(big), f'{srv.url}/big.tar', f'pipe:cat {big}'):
            tracemalloc.start()
            try:
                sizes = [len(s.image) for s in IO.iter_shard_samples(url)]
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert sizes == [1 << 20] * 24 and peak < 4 << 20, (url, peak)  # about one image at a time, not 24


def test_compressed_shards_stream(shard_dir, tmp_path):
    plain = shard_dir / 'x-train-0000.tar'
    zeros = _write_tar(tmp_path / 'zeros.tar', [('z.jpg', bytes(5 << 20)), ('z.cls', b'1')])  # 5 MiB, 1,000x smaller
    for source, compress, ext in ((plain, gzip.compress, 'gz'), (zeros, bz2.compress, 'bz2'),
                                  (plain, lzma.compress, 'xz')):
        packed = tmp_path / f'{source.stem}.tar.{ext}'
        packed.write_bytes(compress(source.read_bytes()))
        assert _as_tuples(IO.iter_shard_samples(packed)) == _expected(source, name_prefix=str(packed))
        packed.write_bytes(packed.read_bytes()[:len(packed.read_bytes()) // 2])
        with pytest.raises(IO.ShardFailed, match='cut short'):
            list(IO.iter_shard_samples(packed))
    (tmp_path / 'z.tar.zst').write_bytes(b'(\xb5/\xfd' + bytes(100))
    with pytest.raises(IO.DataSourceError, match='zstd'):
        next(IO.iter_shard_samples(tmp_path / 'z.tar.zst'))


# --- HTTP -----------------------------------------------------------------------------------------------------

def test_http_stream_equals_local_with_one_connection(shard_dir, server):
    for name in ('x-train-0000.tar', 'x-train-0001.tar', 'x-train-0000.tar'):
        url = f'{server.url}/{name}'
        assert _as_tuples(IO.iter_shard_samples(url)) == _expected(shard_dir / name, name_prefix=url)
    assert server.connections == 1  # keep-alive: the shards of a worker share one connection
    server.fault('moved.tar', ('redirect', '/x-train-0001.tar'))
    assert len(list(IO.iter_shard_samples(f'{server.url}/moved.tar'))) == 5


def test_http_proxy_from_the_environment(shard_dir, server, monkeypatch):
    monkeypatch.setenv('http_proxy', server.url)  # the test server answers as a forward proxy would
    url = 'http://shards.example.invalid/x-train-0001.tar'
    assert _as_tuples(IO.iter_shard_samples(url)) == _expected(shard_dir / 'x-train-0001.tar', name_prefix=url)
    assert server.requests[-1] == ('/x-train-0001.tar', None) and server.targets[-1] == url
    monkeypatch.setenv('http_proxy', 'http://127.0.0.1:9')  # a dead proxy, bypassed for this host
    monkeypatch.setenv('no_proxy', '127.0.0.1')
    assert len(list(IO.iter_shard_samples(f'{server.url}/x-train-0001.tar'))) == 5


def test_the_hub_token_goes_to_huggingface_co_only(shard_dir, server, monkeypatch):
    monkeypatch.setenv('http_proxy', server.url)  # every host is the test server, reached as a proxy
    monkeypatch.setenv('HF_TOKEN', 'hf_test_token')
    monkeypatch.setattr(IO, '_hf_token_cache', {})
    cdn = 'http://cdn.example.invalid/x-train-0001.tar'
    server.fault('datasets/timm/x/resolve/main/x-train-0001.tar', ('redirect', cdn))
    assert len(list(IO.iter_shard_samples('http://huggingface.co/datasets/timm/x/resolve/main/x-train-0001.tar'))) == 5
    assert server.targets[-2:] == ['http://huggingface.co/datasets/timm/x/resolve/main/x-train-0001.tar', cdn]
    assert server.authorization[-2:] == ['Bearer hf_test_token', None]  # the CDN it redirects to never sees it
    server.fault('x-train-0000.tar', 403)
    with pytest.raises(IO.DataSourceError, match='HTTP 403 Forbidden .*set HF_TOKEN'):
        next(IO.iter_shard_samples('http://huggingface.co/x-train-0000.tar'))


def test_an_error_page_served_as_a_shard(shard_dir, server):
    (shard_dir / 'page.tar').write_bytes(b'<!DOCTYPE html><html>Sign in to continue</html>\n' * 20)
    with pytest.raises(IO.DataSourceError, match=r"/page.tar: not a tar archive \(it starts with b'<!DOCTYPE html>"):
        next(IO.iter_shard_samples(f'{server.url}/page.tar'))


def test_https_checks_the_certificate(shard_dir, tmp_path, monkeypatch):
    if shutil.which('openssl') is None:
        pytest.skip('needs the openssl command to make a certificate')
    cert, key = tmp_path / 'cert.pem', tmp_path / 'key.pem'
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', str(key), '-out', str(cert),
                    '-days', '1', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'],
                   check=True, capture_output=True)
    monkeypatch.delenv('SSL_CERT_FILE', raising=False)
    with ShardServer(shard_dir, tls=(cert, key)) as srv:
        url = f'{srv.url}/x-train-0001.tar'
        assert url.startswith('https://')
        with pytest.raises(IO.DataSourceError, match=r'^https://127.0.0.1:\d+/x-train-0001.tar: TLS certificate not '
                                                     r'accepted \(self.signed certificate\)$'):
            next(IO.iter_shard_samples(url, **FAST))
        monkeypatch.setenv('SSL_CERT_FILE', str(cert))  # trusted: read as over http
        assert _as_tuples(IO.iter_shard_samples(url)) == _expected(shard_dir / 'x-train-0001.tar', name_prefix=url)


def _count_in_child(url, queue):
    queue.put(len(list(IO.iter_shard_samples(url))))


def test_a_forked_worker_opens_its_own_connection(server):
    url = f'{server.url}/x-train-0001.tar'
    assert len(list(IO.iter_shard_samples(url))) == 5  # the parent keeps an idle connection
    ctx = multiprocessing.get_context('fork')  # as DataLoader workers start on Linux
    queue = ctx.Queue()
    child = ctx.Process(target=_count_in_child, args=(url, queue))
    child.start()
    assert queue.get(timeout=30) == 5
    child.join(timeout=30)
    assert len(list(IO.iter_shard_samples(url))) == 5  # the parent's connection still works for the parent
    assert server.connections == 2  # the parent's, reused, and the child's own


def test_http_500_then_ok_is_retried(server):
    url = f'{server.url}/x-train-0000.tar'
    server.fault('x-train-0000.tar', 500, 503)
    assert len(list(IO.iter_shard_samples(url, **FAST))) == 12
    assert len(server.paths('x-train-0000.tar')) == 3
    server.fault('x-train-0000.tar', (429, 1))  # Too Many Requests, Retry-After: 1 s (not the 0.02 s backoff)
    start = time.monotonic()
    assert len(list(IO.iter_shard_samples(url, **FAST))) == 12
    assert 1 <= time.monotonic() - start < 2


@pytest.mark.parametrize('ranges', [True, False])
def test_cut_connection_resumes_without_repeating_a_member(shard_dir, ranges):
    with ShardServer(shard_dir, ranges=ranges) as srv:
        url = f'{srv.url}/x-train-0000.tar'
        srv.fault('x-train-0000.tar', ('cut', 10_000), ('cut', 30_000))
        got = _as_tuples(IO.iter_shard_samples(url, **FAST))
        assert got == _expected(shard_dir / 'x-train-0000.tar', name_prefix=url)
        # the 2nd request asks for byte 10,000 on; with ranges it gets 30,000 bytes from there, without them the
        # whole file again, cut at 30,000 (the first 10,000 bytes read again are dropped)
        assert srv.paths('x-train-0000.tar') == [None, 'bytes=10000-', 'bytes=40000-' if ranges else 'bytes=30000-']


def test_a_connection_cut_at_the_same_byte_every_time_fails_the_shard(shard_dir, server):
    url = f'{server.url}/x-train-0000.tar'
    server.fault('x-train-0000.tar', ('cut', 20_000), *[('cut', 0)] * 5)  # resumed at 20,000: nothing more comes
    got, start = [], time.monotonic()
    with pytest.raises(IO.ShardFailed, match=r'connection closed at byte 20000 .*gave up after 2 retries') as e:
        for s in IO.iter_shard_samples(url, **FAST):
            got.append(s)
    assert time.monotonic() - start < 3
    expected = _expected(shard_dir / 'x-train-0000.tar', name_prefix=url)
    assert _as_tuples(got) == expected[:len(got)] and e.value.samples_read == len(got) and 0 < len(got) < 12
    assert len(server.paths('x-train-0000.tar')) == 3  # the first try and 2 retries


def test_404_and_unknown_host_are_one_line_and_not_retried(server, monkeypatch):
    url = f'{server.url}/missing.tar'
    with pytest.raises(IO.DataSourceError) as e:
        next(IO.iter_shard_samples(url, **FAST))
    assert str(e.value) == f'{url}: HTTP 404 Not Found' and len(server.paths('missing.tar')) == 1
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):  # no DNS in tests: the resolver's answer for a name that does not exist
        if host == 'no-such-host.invalid':
            raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket, 'getaddrinfo', resolve)
    start = time.monotonic()
    with pytest.raises(IO.DataSourceError, match=r"^http://no-such-host.invalid/x.tar: host 'no-such-host.invalid' "
                                                 'not found'):
        next(IO.iter_shard_samples('http://no-such-host.invalid/x.tar', **FAST))
    assert time.monotonic() - start < 0.5  # not retried


def test_a_stopped_server_ends_within_seconds(shard_dir):
    srv = ShardServer(shard_dir)
    url = f'{srv.url}/x-train-0000.tar'
    assert len(list(IO.iter_shard_samples(url, **FAST))) == 12  # leaves a kept-alive connection behind
    srv.stop()
    start = time.monotonic()
    with pytest.raises(IO.DataSourceError, match=r'^http://127.0.0.1:\d+/x-train-0000.tar: connection refused '
                                                 r'by 127.0.0.1:\d+ \(after 2 retries\)$'):
        next(IO.iter_shard_samples(url, **FAST))
    assert time.monotonic() - start < 2


def test_a_server_that_stops_mid_shard_fails_the_shard(shard_dir):
    srv = ShardServer(shard_dir)
    url = f'{srv.url}/x-train-0000.tar'
    samples = IO.iter_shard_samples(url, **FAST)
    srv.fault('x-train-0000.tar', ('cut', 20_000))
    first = next(samples)
    srv.stop()
    rest = []
    with pytest.raises(IO.ShardFailed, match='connection refused') as e:
        for s in samples:
            rest.append(s)
    assert e.value.samples_read == 1 + len(rest) and first.key == 's000'


def test_a_slow_server_times_out(server):
    url = f'{server.url}/x-train-0001.tar'
    server.fault('x-train-0001.tar', ('stall', 5))  # one stalled response, then the file: retried and read
    start = time.monotonic()
    assert len(list(IO.iter_shard_samples(url, retries=2, timeout=0.3, backoff=0.02))) == 5
    server.fault('x-train-0001.tar', *[('stall', 5)] * 3)
    with pytest.raises(IO.ShardFailed, match=r'no response from 127.0.0.1:\d+ within 0.3 s; gave up after 2 retries'):
        next(IO.iter_shard_samples(url, retries=2, timeout=0.3, backoff=0.02))
    assert time.monotonic() - start < 3  # 4 timeouts of 0.3 s and the backoffs


# --- _info.json -----------------------------------------------------------------------------------------------

def test_read_info_local_and_http(shard_dir, server, tmp_path):
    local = IO.read_info(shard_dir)
    assert local == S.load_info(shard_dir) and local['splits']['train']['shard_lengths'] == [12, 5]
    assert IO.read_info(server.url + '/') == local
    (shard_dir / '_info.json').rename(shard_dir / 'info.json')  # timm's other name
    assert IO.read_info(server.url) == local
    assert IO.read_info(tmp_path / 'nothing', missing_ok=True) == {}
    with pytest.raises(IO.DataSourceError, match=rf'^no _info.json or info.json at {server.url}/sub \({server.url}'
                                                  r'/sub/_info.json: HTTP 404 Not Found\)$'):
        IO.read_info(server.url + '/sub')


@pytest.mark.parametrize('text,why', [
    ('<html>rate limited</html>', 'is not valid JSON'),
    ('[1, 2]', 'holds a JSON list'),
    ('{"splits": {"train": {"filenames": "a.tar"}}}', "split 'train': \"filenames\" is not a list"),
    ('{"splits": {"train": {"filenames": ["a.tar"], "shard_lengths": [1, 2]}}}', 'one sample count per shard'),
])
def test_a_bad_info_file_is_one_line_naming_it(shard_dir, server, text, why):
    (shard_dir / '_info.json').write_text(text)
    with pytest.raises(IO.DataSourceError) as e:
        IO.read_info(server.url)
    assert str(e.value).startswith(f'{server.url}/_info.json') and why in str(e.value) and '\n' not in str(e.value)


def test_read_info_retries_a_5xx(server):
    server.fault('_info.json', 502)
    assert IO.read_info(server.url, **FAST)['splits']['train']['num_samples'] == 17
    server.fault('_info.json', 502, 502, 502)
    with pytest.raises(IO.DataSourceError, match=r'_info.json: HTTP 502 Bad Gateway; gave up after 2 retries'):
        IO.read_info(server.url, **FAST)


# --- pipe: commands -------------------------------------------------------------------------------------------

def test_pipe_source_equals_local_and_reports_the_commands_error(shard_dir, tmp_path):
    path = shard_dir / 'x-train-0000.tar'
    url = f'pipe:cat {path}'
    assert _as_tuples(IO.iter_shard_samples(url)) == _expected(path, name_prefix=url)
    assert IO.read_info(f'pipe:cat {shard_dir}/{{}}') == IO.read_info(shard_dir)  # {}: each file's name
    with pytest.raises(IO.DataSourceError, match=r'^no _info.json or info.json at pipe:cat /nowhere/\{\} \(pipe:cat '
                                                 r'/nowhere/_info.json: the command exited with status 1: cat: '):
        IO.read_info('pipe:cat /nowhere/{}')
    with pytest.raises(IO.DataSourceError, match=r'^pipe:cat /nonexistent.tar: the command exited with status 1: '
                                                 r'cat: /nonexistent.tar: No such file or directory$'):
        next(IO.iter_shard_samples('pipe:cat /nonexistent.tar', **FAST))
    # fails once mid-shard, then works: run again, the bytes already read dropped, every sample once
    flag = tmp_path / 'failed-once'
    flaky = (f'pipe:if [ -e {flag} ]; then cat {path}; else touch {flag}; head -c 20000 {path}; '
             'echo connection reset >&2; exit 3; fi')
    assert [s.key for s in IO.iter_shard_samples(flaky, **FAST)] == [f's{i:03d}' for i in range(12)]
    broken = f'pipe:head -c 20000 {path}; echo connection reset >&2; exit 3'
    got = []
    with pytest.raises(IO.ShardFailed, match='the command exited with status 3: connection reset; gave up after 2 '
                                             'retries') as e:
        for s in IO.iter_shard_samples(broken, **FAST):
            got.append(s)
    assert 0 < len(got) == e.value.samples_read < 12


def test_a_silent_pipe_times_out_and_an_abandoned_one_is_killed(shard_dir, tmp_path):
    start = time.monotonic()
    with pytest.raises(IO.ShardFailed, match='no output for 0.3 s'):
        next(IO.iter_shard_samples('pipe:sleep 30', retries=1, timeout=0.3, backoff=0.02))
    assert time.monotonic() - start < 2
    pid_file = tmp_path / 'pid'
    samples = IO.iter_shard_samples(f'pipe:sleep 30 & echo $! > {pid_file}; cat {shard_dir / "x-train-0000.tar"}; '
                                    'wait')
    assert next(samples).key == 's000'
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.02)
    pid = int(pid_file.read_text())
    samples.close()  # the loader stops early: the command and what it started are killed
    for _ in range(100):
        try:  # gone, or a zombie waiting for its new parent to reap it
            if Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] == 'Z':
                break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    else:
        pytest.fail(f'the sleep {pid} started by the command still runs')


# --- fsspec ---------------------------------------------------------------------------------------------------

@pytest.fixture
def memory_fs(shard_dir):
    fsspec = pytest.importorskip('fsspec')
    fs = fsspec.filesystem('memory')
    for name in ('x-train-0000.tar', '_info.json'):
        fs.pipe(f'/stream-io-test/{name}', (shard_dir / name).read_bytes())
    yield fs
    fs.rm('/stream-io-test', recursive=True)


def test_fsspec_urls(shard_dir, memory_fs):
    url = 'memory://stream-io-test/x-train-0000.tar'
    assert _as_tuples(IO.iter_shard_samples(url)) == _expected(shard_dir / 'x-train-0000.tar', name_prefix=url)
    assert IO.read_info('memory://stream-io-test') == IO.read_info(shard_dir)
    with pytest.raises(IO.DataSourceError, match='^memory://stream-io-test/no.tar: not found$'):
        next(IO.iter_shard_samples('memory://stream-io-test/no.tar'))
    with pytest.raises(IO.DataSourceError, match="^nosuchproto://b/x.tar: .*nosuchproto"):
        next(IO.iter_shard_samples('nosuchproto://b/x.tar'))
    if importlib.util.find_spec('s3fs') is None:  # a bucket without its back end: the extra to install
        with pytest.raises(IO.DataSourceError, match=r'^s3://b/x.tar: .*s3fs.*pip install "naflex-train\[cloud\]"'):
            next(IO.iter_shard_samples('s3://b/x.tar'))


def test_fsspec_read_errors_resume_at_the_byte(shard_dir, memory_fs, monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    breaks = [15_000, 15_000, 40_000]  # the byte at which each opened file fails

    class Breaking(io.RawIOBase):
        def __init__(self, f, at):
            self.f, self.at = f, at

        def seek(self, pos, whence=0):
            return self.f.seek(pos, whence)

        def read(self, n=-1):
            if self.f.tell() >= self.at:
                raise ConnectionResetError('reset by peer')
            return self.f.read(min(n, self.at - self.f.tell()) if n >= 0 else self.at - self.f.tell())

    opened = []
    real_open = MemoryFileSystem._open

    def flaky_open(self, path, mode='rb', **kwargs):
        f = real_open(self, path, mode, **kwargs)
        opened.append(f)
        return Breaking(f, breaks.pop(0)) if breaks else f
    monkeypatch.setattr(MemoryFileSystem, '_open', flaky_open)
    url = 'memory://stream-io-test/x-train-0000.tar'
    assert _as_tuples(IO.iter_shard_samples(url, **FAST)) == _expected(shard_dir / 'x-train-0000.tar',
                                                                       name_prefix=url)
    assert len(opened) == 4  # the first open, a retry that made no progress, two that did


def test_errors_are_one_line_and_cross_processes(tmp_path):
    failed = pickle.loads(pickle.dumps(IO.ShardFailed('http://h/a.tar', 'cut short (x)', 7)))
    assert (failed.url, failed.reason, failed.samples_read) == ('http://h/a.tar', 'cut short (x)', 7)
    assert str(failed) == 'http://h/a.tar: cut short (x) (7 samples read)'
    with pytest.raises(IO.DataSourceError, match=f'^{tmp_path}/no.tar: no such file$'):
        next(IO.iter_shard_samples(tmp_path / 'no.tar'))


def test_bench_stream_runs(demo_shards, capsys):
    """scripts/bench/bench_stream.py: every reader reads every sample of the split, with its own server process."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts' / 'bench'))
    import bench_stream
    rows = bench_stream.main(['--shards', str(demo_shards), '--repeats', '1'])
    assert [what for what, *_ in rows][:2] == ['ours, local files', 'ours, HTTP from 127.0.0.1']
    assert {result for *_, result in rows} == {(24, sum(len(loaders.ShardDataset(demo_shards).path(i).read_bytes())
                                                        for i in range(24)))}
    assert '| ours, HTTP from 127.0.0.1 |' in capsys.readouterr().out
