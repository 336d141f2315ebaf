"""Published weights by name (``name.tag`` + ``--pretrained``), through timm's Hub loader and huggingface_hub's cache.

Nothing here touches the network: a temporary Hugging Face cache is filled with a tiny model's safetensors in the
exact layout huggingface_hub writes (``models--ORG--NAME/{blobs,snapshots/<rev>,refs/main}``) and the runs are
offline (``HF_HUB_OFFLINE=1``, and an endpoint nobody listens on), so the real loading code reads it. The scenarios
run in one subprocess because huggingface_hub reads its environment once, at import; the tiny model's test-only
repositories are registered inside that subprocess only.
"""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import naflex
from naflex.model.registry import hub_id, split_name

REPO = Path(__file__).resolve().parents[1]
NAME = 'naflexvit_tiny_test.hubtest'              # test-only tag of the tiny variant
HUB_REPO = 'naflex-tests/naflexvit_tiny_test.hubtest'  # test-only repository, only ever in the temporary cache
MISSING = 'naflexvit_tiny_test.missing'             # test-only, never in the cache
MISSING_REPO = 'naflex-tests/naflexvit_tiny_test.missing'
MODEL_ARGS = ['--model', NAME, '--pretrained']
TRAIN_ARGS = ['--device', 'cpu', '-b', '8', '--epochs', '1', '--warmup-epochs', '0', '--lr', '1e-12',
              '--weight-decay', '0', '--opt', 'adamw', '--naflex-train-seq-lens', '32', '--val-split', '']


def fill_hub_cache(cache: Path, repo: str, state: dict) -> Path:
    """Put ``state`` as ``repo``'s model.safetensors into a Hugging Face cache, as huggingface_hub lays it out:
    the file under blobs/<sha256>, a snapshot folder per commit linking to it, refs/main naming that commit."""
    folder = cache / f'models--{repo.replace("/", "--")}'
    revision = hashlib.sha1(repo.encode()).hexdigest()
    (folder / 'blobs').mkdir(parents=True, exist_ok=True)
    tmp = folder / 'blobs' / 'incoming'
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    blob = folder / 'blobs' / hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(blob)
    snapshot = folder / 'snapshots' / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / 'model.safetensors').symlink_to(os.path.relpath(blob, snapshot))
    (folder / 'refs').mkdir(exist_ok=True)
    (folder / 'refs' / 'main').write_text(revision)
    return snapshot / 'model.safetensors'


def run_offline(cache: Path, body: str, *argv) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter whose Hugging Face cache is ``cache``, offline, with the test-only
    tiny-model repositories registered (``NAME`` is in the cache, ``MISSING`` is not)."""
    code = textwrap.dedent(f'''
        import contextlib, io, json, sys
        from naflex.model import registry
        registry._HUB_WEIGHTS.update({{{NAME!r}: {HUB_REPO!r}, {MISSING!r}: {MISSING_REPO!r}}})
    ''') + textwrap.dedent(body)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1', HF_ENDPOINT='http://127.0.0.1:9',
               HF_HUB_DISABLE_TELEMETRY='1', PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, '-c', code, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


# One interpreter runs every offline scenario (interpreter start-up is most of the cost): create_model, validate.py
# and train.py by name, and both CLIs on a name whose weights are not cached. Prints one JSON line of results.
SCENARIOS = '''
    import naflex, train, validate
    from safetensors.torch import save_file
    plan = json.loads(sys.argv[1])
    results = {}
    model = naflex.create_model(plan['name'], pretrained=True, num_classes=4)
    save_file(model.state_dict(), plan['loaded'])
    other = naflex.create_model(plan['name'], pretrained=True, num_classes=7)  # another head: re-initialized
    results['other_head'] = [other.num_classes, float(other.embeds.pos_embed.sum())]
    for key in ('validate', 'validate_default', 'validate_hub_name'):
        results[key] = validate.main(plan[key])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results['validate_pattern'] = [validate.main(plan['validate_pattern']), err.getvalue()]
    train.main(plan['train'])
    for script, argv in plan['missing'].items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                {'train': train, 'validate': validate}[script].main(argv)
                code = 0
            except SystemExit as e:
                code = e.code
        results[script + '_missing'] = [code, err.getvalue()]
    print(json.dumps(results))
'''


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """(cache folder, the tiny model's 4-class weights in it, the same weights as a local file)."""
    torch.manual_seed(3)
    model = naflex.create_model('naflexvit_tiny_test', num_classes=4)
    with torch.no_grad():
        model.head.weight.mul_(50)  # logits that spread, so top-1 is not a tie-break
    cache = tmp_path_factory.mktemp('hf_cache')
    snapshot_file = fill_hub_cache(cache, HUB_REPO, model.state_dict())
    return cache, model.state_dict(), snapshot_file


@pytest.fixture(scope='module')
def offline(published, demo_dataset, tmp_path_factory):
    """The scenarios' results, their stdout, and the folder they wrote to."""
    cache, _, _ = published
    work = tmp_path_factory.mktemp('offline')
    common = ['--data-dir', str(demo_dataset), '-j', '0']
    plan = {
        'name': NAME, 'loaded': str(work / 'loaded.safetensors'),
        'validate': [*common, *MODEL_ARGS, '--naflex-max-seq-len', '36', '64'],
        'validate_default': [*common, '--model', NAME, '--naflex-max-seq-len', '36', '64'],  # timm: no --checkpoint
        'validate_hub_name': [*common, '--model', f'hf-hub:timm/{NAME}', '--naflex-max-seq-len', '36', '64'],
        # timm's bulk mode: a wildcard over the published names (NAME is cached, MISSING is not)
        'validate_pattern': [*common, '--model', 'naflexvit_tiny_test.*', '--naflex-max-seq-len', '36'],
        # lr 1e-12: the run ends where it started, so last.pth shows which weights it started from
        'train': [*common, *MODEL_ARGS, *TRAIN_ARGS, '--output', str(work), '--experiment', 'hub'],
        'missing': {'validate': [*common, '--model', MISSING, '--pretrained'],
                    'train': [*common, '--model', MISSING, '--pretrained', *TRAIN_ARGS, '--output', str(work)]},
    }
    out = run_offline(cache, SCENARIOS, json.dumps(plan))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout, work


def test_names_and_tags_follow_timm():
    """Our published names are timm 1.0.31's (for the architectures we register), each in its timm/ repository;
    a bare name means its default tag; unknown tags and weights-less variants are one clear ValueError."""
    import timm
    ours = set(naflex.list_models())
    timm_published = sorted(n for n in timm.list_pretrained('naflexvit*') if n.partition('.')[0] in ours)
    assert naflex.list_models(pretrained=True) == timm_published
    for name in timm_published:
        assert hub_id(name) == timm.models.get_pretrained_cfg(name).hf_hub_id == f'timm/{name}'
    assert split_name('naflexvit_base_patch16_gap') == ('naflexvit_base_patch16_gap', 'e300_s576_in1k')
    assert hub_id('naflexvit_base_patch16_gap') == 'timm/naflexvit_base_patch16_gap.e300_s576_in1k'
    with torch.device('meta'):
        tagged = naflex.create_model('naflexvit_base_patch16_gap.e300_s576_in1k')
        untrained = naflex.create_model('naflexvit_base_patch16_map.untrained')
    assert (tagged.pretrained_cfg['architecture'], tagged.pretrained_cfg['tag']) == (
        'naflexvit_base_patch16_gap', 'e300_s576_in1k')
    assert 'hf_hub_id' not in untrained.pretrained_cfg  # timm publishes no 'untrained' weights
    with pytest.raises(ValueError, match="unknown pretrained tag 'e1' for naflexvit_base_patch16_gap; valid tags: "
                                         "'e300_s576_in1k'"):
        naflex.create_model('naflexvit_base_patch16_gap.e1')
    with pytest.raises(ValueError, match='naflexvit_base_patch16_map has no published weights'):
        naflex.create_model('naflexvit_base_patch16_map', pretrained=True)


def test_create_model_pretrained_reads_the_hub_cache(published, offline):
    _, state, _ = published
    results, _, work = offline
    loaded = load_file(str(work / 'loaded.safetensors'))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    num_classes, pos_sum = results['other_head']
    assert num_classes == 7 and pos_sum == pytest.approx(float(state['embeds.pos_embed'].sum()), rel=1e-6)


def test_validate_pretrained_by_name_equals_the_file(published, offline, demo_dataset):
    import validate
    _, _, snapshot_file = published
    by_name = offline[0]['validate']
    by_file = validate.main(['--data-dir', str(demo_dataset), '-j', '0', '--naflex-max-seq-len', '36', '64',
                             '--model', 'naflexvit_tiny_test', '--checkpoint', str(snapshot_file)])
    assert [r['checkpoint'] for r in by_name] == [f'hf-hub:{HUB_REPO}'] * 2
    assert [r['model'] for r in by_name] == [NAME] * 2
    assert [(r['top1'], r['loss']) for r in by_name] == [(r['top1'], r['loss']) for r in by_file]
    # bulk: a pattern validates every published name it matches; the one not cached is one error line
    rows, err = offline[0]['validate_pattern']
    assert [(r['model'], r['checkpoint'], r['top1']) for r in rows] == [
        (NAME, f'hf-hub:{HUB_REPO}', by_name[0]['top1'])]
    assert err.strip().splitlines()[0].startswith(f"validate.py: error ({MISSING}): {MISSING}'s published weights: ")
    # as timm's validate.py: no --checkpoint means the published weights; timm's hf-hub:timm/NAME names them too
    for key in ('validate_default', 'validate_hub_name'):
        assert [(r['checkpoint'], r['top1'], r['loss']) for r in offline[0][key]] == [
            (r['checkpoint'], r['top1'], r['loss']) for r in by_name], key


def test_train_pretrained_by_name_starts_from_the_published_weights(published, offline):
    _, state, _ = published
    _, stdout, work = offline
    assert f'loaded weights from hf-hub:{HUB_REPO}' in stdout
    trained = torch.load(work / 'hub' / 'last.pth', map_location='cpu', weights_only=True)['state_dict']
    assert trained.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(trained[k], state[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize('script, what, flag', [('validate', f"{MISSING}'s published weights", '--checkpoint FILE'),
                                                ('train', '--pretrained', '--pretrained-path FILE')])
def test_not_cached_and_offline_is_one_line_saying_what_to_do(script, what, flag, offline, published):
    cache = published[0]
    code, err = offline[0][f'{script}_missing']
    err = err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f'{script}.py: error: {what}: {MISSING_REPO} is not in the Hugging Face cache '
                             f'{cache} and the Hub cannot be reached (HF_HUB_OFFLINE=1)'), err
    assert flag in err[0] and 'run with HF_HUB_OFFLINE=1' in err[0]


def test_no_network_without_offline_mode_is_quick(published):
    """Without HF_HUB_OFFLINE and with the Hub unreachable, the cached weights load and missing ones fail in a
    second or two (huggingface_hub alone retries for ~25 s first)."""
    cache, state, _ = published
    body = f'''
        import time
        from naflex.model.weights import HubUnavailable, read_hub_state_dict
        t = time.perf_counter()
        loaded = read_hub_state_dict({HUB_REPO!r})
        try:
            read_hub_state_dict({MISSING_REPO!r})
            message = ''
        except HubUnavailable as e:
            message = str(e)
        print(json.dumps([sorted(loaded), message, time.perf_counter() - t]))
    '''
    code = textwrap.dedent(body)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_ENDPOINT='http://127.0.0.1:9', HF_HUB_DISABLE_TELEMETRY='1',
               PYTHONPATH=str(REPO))
    env.pop('HF_HUB_OFFLINE', None)
    out = subprocess.run([sys.executable, '-c', 'import json\n' + code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    keys, message, seconds = json.loads(out.stdout.strip().splitlines()[-1])
    assert keys == sorted(state) and seconds < 10
    assert message.endswith('the Hub cannot be reached (no connection to http://127.0.0.1:9)'), message
