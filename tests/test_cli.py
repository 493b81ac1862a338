"""Command lines as a user meets them: one `error:` line per purposeful failure (on every rank, printed once),
tracebacks for bugs, plain progress lines in log files, and bad data that stops with a checkpoint to resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import config
import train

ROOT = Path(__file__).resolve().parents[1]
# the tiny model of test_train.py
TINY = ['--vision_layers=1', '--text_layers=1', '--vision_width=32', '--text_width=32', '--image_size=32',
        '--local_crop_size=32', '--patch_size=16', '--embed_dim=16', '--mlp_hidden_dim=32', '--demo_train_size=64',
        '--batch_size=8', '--workers=0', '--eval_every=0', '--log_every=1', '--epochs=4', '--method=clip']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
# train.py with a deliberate failure: FAIL=user raises a UserError, FAIL=bug a ZeroDivisionError, on rank FAIL_RANK
# only, in set-up (FAIL_AT=setup: building the loader) or in its second forward (FAIL_AT=step)
HOOK = '''
import os, sys
import config, train
kind, where, rank = os.environ['FAIL'], os.environ['FAIL_AT'], int(os.environ.get('RANK', 0))
def fail():
    if rank == int(os.environ['FAIL_RANK']):
        if kind == 'bug':
            1 / 0
        raise config.UserError(f'a purposeful failure in {where} (test hook)')
calls = []
def wrap(f):
    def wrapped(*args, **kwargs):
        calls.append(1)
        if where == 'setup' or len(calls) == 2:
            fail()
        return f(*args, **kwargs)
    return wrapped
name = 'build_train_loader' if where == 'setup' else 'compute_loss'
setattr(train, name, wrap(getattr(train, name)))
config.run_cli(train.main)
'''


def run(args, env=None, timeout=300):
    """A command in a fresh process with pipes (not a terminal): (exit code, stdout, stderr)."""
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)  # a hang guard, far above the seconds these runs take
    return r.returncode, r.stdout, r.stderr


def assert_one_error_line(stderr, *parts):
    """stderr holds exactly one `error:` line, containing each of parts, and no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in stderr, stderr
    assert all(p in errors[0] for p in parts), errors[0]
    return errors[0]


def records(out, kind):
    return [r for r in map(json.loads, (Path(out) / 'log.jsonl').read_text().splitlines()) if r['type'] == kind]


# --- One line per purposeful failure ---
def test_a_bad_flag_is_one_line():
    status, _, stderr = run(['train.py', '--lr=fast'])
    assert status == 2
    assert_one_error_line(stderr, "--lr: expected float, got 'fast'")


def run_cli(main, argv, capsys):
    """config.run_cli in this process (what `python X.py` runs, without a new interpreter): (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        config.run_cli(main, argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize('module, argv, code, parts', [
    ('train', ['--bpe_path=missing.txt.gz'], 1, ['--bpe_path=missing.txt.gz not found']),
    ('train', ['--update_freq=9'], 2, ['8 batches per epoch is fewer than --update_freq=9']),
    ('data', [], 2, ['expected a command, build-vocab or build-demo-vocab (got none); usage: python data.py']),
    ('data', ['build-vocab'], 2, ['the following arguments are required: captions; usage: python data.py']),
    ('data', ['build-vocab', 'missing.txt'], 1, ['captions file missing.txt not found']),
    ('data', ['build-vocab', 'x.txt', '--vocab_size=0'], 2, ['vocab_size=0 must be in [514, ']),
    ('data', ['build-demo-vocab', '--size=3'], 2, ['build-demo-vocab takes --vocab_size=N and --out=PATH']),
])
def test_purposeful_errors_print_one_line(tmp_path, capsys, module, argv, code, parts):
    (tmp_path / 'x.txt').write_text('a photo of a dog\n')
    if module == 'train':
        status, stderr = run_cli(train.main, [*TINY, f'--output_dir={tmp_path / "out"}', *argv], capsys)
    else:
        import data
        status, stderr = run_cli(data.main, [str(tmp_path / a) if a == 'x.txt' else a for a in argv], capsys)
    assert status == code
    assert_one_error_line(stderr, *parts)


def test_used_output_dir_corrupt_checkpoint_and_plain_progress(tmp_path, capsys):
    """A non-terminal run logs one plain line per log interval; a second run into its output_dir, and a resume
    from its in-place truncated checkpoint.pt, each stop with one line that names the flag to pass."""
    out = tmp_path / 'run'
    status, stdout, stderr = run(['train.py', *TINY, f'--output_dir={out}', '--max_steps=3', '--save_every=1'])
    assert status == 0, stderr
    assert '\r' not in stdout + stderr
    lines = [line for line in stdout.splitlines() if line.startswith('step ')]
    assert [line.split()[1] for line in lines] == ['1/3', '2/3', '3/3'] == [f"{r['step']}/3" for r in records(out, 'train')]
    assert all(f in lines[-1] for f in ('epoch 0.38', 'loss ', 'lr ', 'samples/s', 'ETA 00:00'))

    status, stderr = run_cli(train.main, [*TINY, f'--output_dir={out}', '--max_steps=3', '--save_every=1'], capsys)
    assert status == 1
    assert_one_error_line(stderr, 'already holds checkpoint.pt; pass --resume=auto')

    # independent numbered copies: truncating checkpoint.pt in place leaves checkpoint_00000003.pt whole
    size = (out / 'checkpoint.pt').stat().st_size
    with open(out / 'checkpoint.pt', 'r+b') as f:
        f.truncate(size // 2)
    assert (out / 'checkpoint_00000003.pt').stat().st_size == size
    status, _, stderr = run(['train.py', *TINY, f'--output_dir={out}', '--max_steps=4', '--resume=auto'])
    assert status == 1
    line = assert_one_error_line(stderr, f'checkpoint {out}/checkpoint.pt is corrupt or unreadable',
                                 'the newest numbered checkpoint that loads is step 3')
    assert line.endswith(f'continue from it with --resume={out}/checkpoint_00000003.pt')
    train.main([*TINY, f'--output_dir={out}', '--max_steps=4', f'--resume={out}/checkpoint_00000003.pt'])
    assert 'at step 3' in capsys.readouterr().out and torch.load(out / 'checkpoint.pt')['step'] == 4


def test_a_bug_keeps_its_traceback(tmp_path):
    status, _, stderr = run(['-c', HOOK, *TINY, f'--output_dir={tmp_path}', '--max_steps=3'],
                            {'FAIL': 'bug', 'FAIL_AT': 'step', 'FAIL_RANK': '0'})
    assert status == 1
    assert 'Traceback (most recent call last)' in stderr and 'ZeroDivisionError' in stderr


@pytest.mark.parametrize('where', [pytest.param('setup', marks=pytest.mark.slow), 'step'])
def test_an_error_on_rank_1_alone_is_printed_once_and_every_rank_exits(tmp_path, where):
    """Two gloo ranks started by hand (no torchrun to end a survivor): rank 1 alone fails, in set-up (the ranks
    agree at its end, rank 0 prints) or in its second step (rank 1 prints; rank 0's collective fails, and it exits
    without a word of its own)."""
    env = {**ENV, 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(29500 + os.getpid() % 1000), 'WORLD_SIZE': '2',
           'FAIL': 'user', 'FAIL_AT': where, 'FAIL_RANK': '1'}
    cmd = [sys.executable, '-c', HOOK, *TINY, '--batch_size=4', f'--output_dir={tmp_path}', '--max_steps=3']
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, 'RANK': str(r), 'LOCAL_RANK': str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    results = [p.communicate(timeout=300) for p in procs]  # a hang guard: both exit in well under a minute
    assert [p.returncode for p in procs] == [1, 1], results
    stderr = ''.join(err for _, err in results)
    assert_one_error_line(stderr, f'error: rank 1: a purposeful failure in {where} (test hook)')
    if where == 'setup':
        assert not (tmp_path / 'config.json').exists()  # nothing is written before every rank has passed set-up


# --- Bad data ---
def image_folder(tmp_path, n, missing):
    """n 32-pixel images listed in a CSV; the indices in `missing` are listed but not written (yet)."""
    rows = ['filepath,title']
    for i in range(n):
        rows.append(f'{i}.png,a photo of shape {i % 5}')
        if i not in missing:
            Image.new('RGB', (32, 32), (8 * (i % 32), 100, 50)).save(tmp_path / f'{i}.png')
    (tmp_path / 'data.csv').write_text('\n'.join(rows) + '\n')
    return ['--dataset=csv', f'--metadata={tmp_path / "data.csv"}', f'--bpe_path={ROOT / "assets/demo_bpe.txt.gz"}',
            '--image_size=32', '--local_crop_size=32']


def test_bad_data_stops_mid_epoch_with_a_checkpoint_and_resumes_once_fixed(tmp_path):
    """Every other image missing (half the rows: each missing one is counted once and replaced by a drawn row): the
    threshold trips at the first log line past --bad_sample_min reads, after a checkpoint is saved; once the
    images exist, --resume=auto finishes the epoch with the counts of before the stop."""
    flags = [*TINY, *image_folder(tmp_path, 64, missing=set(range(0, 64, 2))), f'--output_dir={tmp_path / "run"}',
             '--bad_sample_threshold=0.1', '--bad_sample_min=16', '--epochs=1']
    status, _, stderr = run(['train.py', *flags])
    assert status == 1
    line = assert_one_error_line(stderr, 'samples read this epoch', 'above --bad_sample_threshold=0.1',
                                 'then continue from the checkpoint saved at step')
    words = line.split()  # "error: S of R samples ... saved at step N with --resume=auto"
    skipped, read, step = int(words[1]), int(words[3]), int(words[-3])
    assert line.endswith(f'saved at step {step} with --resume=auto') and step < 8  # mid-epoch
    assert read == 8 * step >= 16 > 8 * (step - 1) and skipped / read > 0.1  # each row read has its own turn
    ckpt = torch.load(tmp_path / 'run' / 'checkpoint.pt', weights_only=True)
    assert ckpt['step'] == step and ckpt['epoch_sums'][0]['skipped'] == skipped
    assert sum(r['skipped'] for r in records(tmp_path / 'run', 'train')) == skipped  # per log interval

    image_folder(tmp_path, 64, missing=set())  # the data fixed
    train.main([*flags, '--resume=auto'])
    epoch = records(tmp_path / 'run', 'epoch')
    assert len(epoch) == 1 and epoch[0]['skipped'] == skipped and epoch[0]['step'] == 8  # nothing lost


def test_a_resumed_epoch_logs_the_record_of_an_uninterrupted_one(tmp_path):
    """Stopped mid-epoch and resumed, the epoch record (mean losses over the whole epoch, skipped samples) is the
    uninterrupted run's, to the bit."""
    data = image_folder(tmp_path, 32, missing={5, 17})  # 4 batches an epoch, two samples replaced
    flags = [*TINY, *data, '--epochs=2', '--log_every=2', '--bad_sample_threshold=0.5']
    train.main([*flags, f'--output_dir={tmp_path / "straight"}', '--max_steps=6'])
    train.main([*flags, f'--output_dir={tmp_path / "resumed"}', '--max_steps=3'])
    train.main([*flags, f'--output_dir={tmp_path / "resumed"}', '--max_steps=6', '--resume=auto'])
    straight, resumed = records(tmp_path / 'straight', 'epoch'), records(tmp_path / 'resumed', 'epoch')
    assert len(straight) == 1 and straight[0]['skipped'] == 2
    assert resumed == straight
