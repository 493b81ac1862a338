"""Every run ends, with a live loader worker (--workers=1), on one process and under torchrun: the normal end, a bug,
the bad-data stop, SIGTERM/SIGUSR1/SIGINT, a second Ctrl-C, a closed stdout, a full or read-only disk; each with
its one line, its exit code and the checkpoint written before still loading. Hang guards only, no timings."""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import config
import data
import evaluate
from test_cli import ENV, HOOK as FAIL_HOOK, ROOT, TINY, assert_one_error_line, image_folder, run

HANG = 300  # seconds: a hang guard far above what these runs take on a busy 2-core machine
WORKER = [*(f for f in TINY if not f.startswith('--workers')), '--workers=1']
# train.py with test hooks: SLOW=1 sleeps a second in every forward (time to send two signals within one step);
# HANG_IN_SAVE=N writes the N-th torch.save's bytes, touches out/saving and sleeps (for a kill -9 inside a save);
# NO_SPACE_AT=N makes the N-th torch.save fail as a full disk does (the fallback of the tmpfs case)
HOOK = '''
import errno, os, time
import config, torch, train
calls, save = [], torch.save
if os.environ.get('SLOW'):
    loss = train.compute_loss
    train.compute_loss = lambda *a, **k: (time.sleep(1), loss(*a, **k))[1]
def hooked_save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == int(os.environ.get('NO_SPACE_AT', 0)):
        f.write(b'x' * 1000)
        raise OSError(errno.ENOSPC, 'No space left on device')
    save(obj, f, *args, **kwargs)
    if len(calls) == int(os.environ.get('HANG_IN_SAVE', 0)):
        f.flush()
        open(os.environ['MARK'], 'w').close()
        time.sleep(600)
torch.save = hooked_save
config.run_cli(train.main)
'''


def start(args, env=None, hook=False):
    cmd = [sys.executable, *(['-c', HOOK] if hook else ['train.py']), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **(env or {})}, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)  # its own group, as a job's


def descendants(pid):
    """The pids of a process's children and theirs (loader workers), from /proc."""
    kids = []
    for task in Path(f'/proc/{pid}/task').glob('*'):
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / 'children').read_text().split()]
    return kids + [d for k in kids for d in descendants(k)]


def gone(pid):
    """True once pid has exited (absent, or a zombie waiting for a reaper)."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] in 'ZX'
    except OSError:
        return True


def finish(proc, workers):
    """Wait for the process (the hang guard), then for its workers: (exit code, stdout, stderr)."""
    out, err = proc.communicate(timeout=HANG)
    end = time.time() + HANG
    while not all(map(gone, workers)):
        assert time.time() < end, f'loader workers {workers} still alive'
        time.sleep(0.1)
    return proc.returncode, out, err


def wait_until(predicate, proc):
    end = time.time() + HANG
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, 'timed out'
        time.sleep(0.05)


def steps(out):
    """The 'train' records' steps, whole lines only."""
    path = Path(out) / 'log.jsonl'
    lines = path.read_text().split('\n')[:-1] if path.exists() else []
    return [r['step'] for r in map(json.loads, lines) if r['type'] == 'train']


def loads(path):
    return torch.load(path, map_location='cpu', weights_only=True)['step']


def running_workers(proc, out, at_least=2):
    """Wait for `at_least` logged steps; the process's loader workers (one here)."""
    wait_until(lambda: len(steps(out)) >= at_least, proc)
    workers = descendants(proc.pid)
    assert workers, 'no loader worker process'
    return workers


# --- Normal end, a bug, bad data ---
@pytest.mark.parametrize('fail', [None, 'user', 'bug'])
def test_the_normal_end_and_an_error_in_a_step_end_with_their_workers(tmp_path, fail):
    """The error (a purposeful one, or a bug) is raised in the main process's second step, its worker running."""
    args = [*WORKER, f'--output_dir={tmp_path}', '--max_steps=3', '--save_every=1']
    status, _, err = run(['-c', FAIL_HOOK, *args], {'FAIL': fail, 'FAIL_AT': 'step', 'FAIL_RANK': '0'}) if fail \
        else run(['train.py', *args])
    assert status == (1 if fail else 0), err
    if fail == 'user':
        assert_one_error_line(err, 'a purposeful failure in step (test hook)')
    assert ('ZeroDivisionError' in err) == (fail == 'bug') and ('Traceback' in err) == (fail == 'bug'), err
    assert loads(tmp_path / 'checkpoint.pt') == (1 if fail else 3)


def test_the_bad_data_stop_ends(tmp_path):
    flags = [*WORKER, *image_folder(tmp_path, 64, missing=set(range(0, 64, 2))), f'--output_dir={tmp_path / "run"}',
             '--bad_sample_threshold=0.1', '--bad_sample_min=16', '--epochs=1']
    status, _, err = finish(start(flags), [])
    assert status == 1
    line = assert_one_error_line(err, 'above --bad_sample_threshold=0.1', 'then continue from the checkpoint saved')
    assert loads(tmp_path / 'run' / 'checkpoint.pt') == int(line.split()[-3])


# --- Signals ---
@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGUSR1', 'SIGINT'])
def test_a_stop_signal_saves_at_the_next_step_and_ends(tmp_path, sig):
    proc = start([*WORKER, f'--output_dir={tmp_path}', '--epochs=1000'])
    workers = running_workers(proc, tmp_path)
    os.killpg(proc.pid, getattr(signal, sig))  # to the whole group, as SLURM and a terminal's Ctrl-C do
    status, out, err = finish(proc, workers)
    assert status == 0 and 'Traceback' not in err, err
    step = loads(tmp_path / 'checkpoint.pt')
    assert step == steps(tmp_path)[-1] >= 2
    assert f'train: stopped by {sig} at step {step}; checkpoint in {tmp_path}/checkpoint.pt' in out


def test_a_second_ctrl_c_exits_at_once_and_keeps_the_last_checkpoint(tmp_path):
    proc = start([*WORKER, f'--output_dir={tmp_path}', '--epochs=1000', '--save_every=1'], hook=True,
                 env={'SLOW': '1'})
    workers = running_workers(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)  # the first one's handler has run (the step sleeps a second): two interrupts, not one
    os.killpg(proc.pid, signal.SIGINT)
    status, _, err = finish(proc, workers)
    assert status == 130
    assert_one_error_line(err, 'interrupted twice: exiting now, without saving')
    assert loads(tmp_path / 'checkpoint.pt') >= 2


def test_a_closed_stdout_moves_progress_to_stderr_and_training_goes_on(tmp_path):
    """python train.py | head -2: the run ends as it would have, its later lines on stderr, no BrokenPipeError."""
    proc = start([*WORKER, f'--output_dir={tmp_path}', '--max_steps=16'])
    workers = running_workers(proc, tmp_path, at_least=1)
    for _ in range(2):
        proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, as head's does
    status = proc.wait(timeout=HANG)
    err = proc.stderr.read()
    finish(proc, workers)
    assert status == 0 and 'BrokenPipe' not in err and 'Traceback' not in err, err
    assert 'train: stopped at step 16' in err
    assert loads(tmp_path / 'checkpoint.pt') == 16 and steps(tmp_path) == list(range(1, 17))


def test_two_ranks_with_a_worker_each_end_on_the_bad_data_stop(tmp_path):
    flags = [*WORKER, *image_folder(tmp_path, 64, missing=set(range(0, 64, 2))), f'--output_dir={tmp_path / "run"}',
             '--bad_sample_threshold=0.1', '--bad_sample_min=16', '--epochs=1', '--batch_size=4']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone', 'train.py', *flags]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=HANG)
    assert result.returncode != 0
    ranks, _, summary = result.stderr.partition('torch.distributed.elastic.multiprocessing.errors.ChildFailedError')
    assert summary and ranks.count('Traceback') == 1, result.stderr  # torchrun's own summary alone
    line = assert_one_error_line(ranks.replace('Traceback', ''), 'above --bad_sample_threshold=0.1', 'saved at step')
    ckpt = torch.load(tmp_path / 'run' / 'checkpoint.pt', weights_only=True)
    assert ckpt['step'] == int(line.split()[-3]) and ckpt['data']['world_size'] == 2


# --- Full and read-only disks, unwritable output dirs ---
@contextlib.contextmanager
def mounted(folder, options):
    """A tmpfs at folder (root only): yields whether it is mounted; unmounted at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    ok = os.geteuid() == 0 and subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(folder)],
                                              capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(['umount', '-l', str(folder)], check=True)


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_loads(tmp_path):
    status, _, err = run(['train.py', *WORKER, f'--output_dir={tmp_path / "probe"}', '--max_steps=1'])
    assert status == 0, err
    size = (tmp_path / 'probe' / 'checkpoint.pt').stat().st_size
    out = tmp_path / 'full'
    with mounted(out, f'size={(7 * size // 2) // 4096 * 4096 + 4096}') as on_tmpfs:
        flags = [*WORKER, f'--output_dir={out}', '--epochs=1000', '--save_every=1']
        if on_tmpfs:  # room for three checkpoints and a half: a save of the second or third step fails
            status, _, err = run(['train.py', *flags])
        else:  # not root: the fourth torch.save fails as a full disk does
            status, _, err = run(['-c', HOOK, *flags], {'NO_SPACE_AT': '4'})
        assert status == 1
        line = assert_one_error_line(err, 'no space left on the device of', 'free some space, then continue with '
                                     '--resume=auto')
        needed = int(re.search(r'needs ~([\d,]+) bytes', line)[1].replace(',', ''))
        assert size // 2 < needed <= size  # about one checkpoint (the tensors, or the file copied)
        assert not list(out.glob('.*.tmp'))
        assert ('is unchanged and still loads' in line) != ('holds step' in line)
        good = [loads(p) for p in [out / 'checkpoint.pt', *out.glob('checkpoint_*.pt')]]
        assert min(good) >= 1


@pytest.mark.parametrize('kind', ['file', 'under a file', 'read-only'])
def test_an_unwritable_output_dir_is_one_line_before_any_work(tmp_path, kind):
    (tmp_path / 'f').write_text('')
    target = {'file': tmp_path / 'f', 'under a file': tmp_path / 'f' / 'run', 'read-only': tmp_path / 'ro' / 'run'}
    with mounted(tmp_path / 'ro', 'ro,size=64k') if kind == 'read-only' else contextlib.nullcontext() as read_only:
        if kind == 'read-only' and not read_only:
            (tmp_path / 'ro').chmod(0o500)  # not root: no permission stands in for the read-only mount
        status, out, err = run(['train.py', *WORKER, f'--output_dir={target[kind]}', '--max_steps=2'])
    assert status == 1 and 'train:' not in out
    assert_one_error_line(err, f'--output_dir={target[kind]}',
                          {'file': 'is a file, not a folder', 'under a file': 'is a file, not a folder',
                           'read-only': 'read-only file system' if read_only else 'not writable'}[kind])


# --- One line for bad inputs and bad checkpoints ---
def test_missing_metadata_and_an_empty_shard_pattern_are_one_line(tmp_path):
    bpe = f'--bpe_path={ROOT / "assets/demo_bpe.txt.gz"}'
    status, _, err = run(['train.py', *WORKER, '--dataset=csv', f'--metadata={tmp_path / "nope.csv"}', bpe,
                          f'--output_dir={tmp_path / "a"}'])
    assert status == 1
    assert_one_error_line(err, f'--metadata={tmp_path / "nope.csv"} not found')
    pattern = f'{tmp_path}/shard-{{000..009}}.tar'
    status, _, err = run(['train.py', *WORKER, '--dataset=wds', f'--metadata={pattern}', bpe,
                          f'--output_dir={tmp_path / "b"}'])
    assert status == 1
    assert_one_error_line(err, f'the pattern {pattern} matches 0 files', '10 of 10 shards not found')


def test_the_nonfinite_stop_names_a_checkpoint_only_when_there_is_one(tmp_path):
    status, _, err = run(['train.py', *WORKER, f'--output_dir={tmp_path}', '--lr=1e9', '--max_nonfinite=1',
                          '--lr_start=1e9', '--warmup_epochs=0'])
    assert status == 1
    assert_one_error_line(err, 'non-finite losses in a row', 'No checkpoint was saved yet: start over (--overwrite)')
    assert not (tmp_path / 'checkpoint.pt').exists()


class Pickled:
    """A class that weights_only=True does not admit."""


def test_a_pickle_refused_by_weights_only_is_called_unsafe_not_corrupt(tmp_path):
    torch.save({'model': {}, 'hook': Pickled()}, tmp_path / 'evil.pt')
    with pytest.raises(config.UserError, match='was refused as unsafe: it pickles test_exits.Pickled beyond tensors'):
        evaluate.read_checkpoint(tmp_path / 'evil.pt')
    (tmp_path / 'cut.pt').write_bytes((tmp_path / 'evil.pt').read_bytes()[:100])
    with pytest.raises(config.UserError, match='is corrupt or unreadable'):
        evaluate.read_checkpoint(tmp_path / 'cut.pt')


# --- Clean restarts ---
def test_a_kill_inside_a_save_then_resume_leaves_no_temporary_file_and_one_record_per_step(tmp_path):
    mark = tmp_path / 'saving'
    proc = start([*WORKER, f'--output_dir={tmp_path}', '--epochs=1000', '--save_every=4'], hook=True,
                 env={'HANG_IN_SAVE': '2', 'MARK': str(mark)})  # the 2nd torch.save: the step-8 checkpoint.pt
    wait_until(mark.exists, proc)
    workers = descendants(proc.pid)
    proc.kill()
    finish(proc, workers)
    assert [p.name for p in tmp_path.glob('.checkpoint*.tmp')] == [f'.checkpoint.pt.{proc.pid}.tmp']
    (tmp_path / '.checkpoint.pt.notours.tmp').write_text('')  # not our naming: left alone
    assert loads(tmp_path / 'checkpoint.pt') == 4 and steps(tmp_path) == list(range(1, 9))
    status, _, err = run(['train.py', *WORKER, f'--output_dir={tmp_path}', '--epochs=2', '--save_every=4',
                          '--resume=auto'])
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.glob('.*.tmp')) == ['.checkpoint.pt.notours.tmp']
    assert steps(tmp_path) == list(range(1, 17))  # steps 5-8 once, from the resumed run


# --- Bounded images, empty captions ---
def test_an_image_over_the_pixel_budget_is_drafted_or_skipped():
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.new('RGB', (3000, 2000), (9, 9, 9)).save(png, 'PNG')
    Image.new('RGB', (3000, 2000), (9, 9, 9)).save(jpeg, 'JPEG')
    with pytest.raises(ValueError, match='a 3000x2000 PNG image is over --max_image_pixels=1000000'):
        data.open_image(png.getvalue(), 1_000_000)
    img = data.open_image(jpeg.getvalue(), 1_000_000)
    img.load()
    assert img.size == (750, 500)  # 1/4: the largest DCT scale that fits (1/2 would be 1.5M pixels)
    assert data.open_image(png.getvalue()).size == (3000, 2000)  # no budget: evaluation decodes everything


def test_huge_images_and_empty_captions_are_counted_as_unreadable(tmp_path):
    flags = image_folder(tmp_path, 16, missing=set())
    Image.new('RGB', (2000, 2000), (9, 9, 9)).save(tmp_path / '3.png')
    rows = (tmp_path / 'data.csv').read_text().splitlines()
    rows[1 + 7], rows[1 + 11] = '7.png,', '11.png,"  \t "'
    (tmp_path / 'data.csv').write_text('\n'.join(rows) + '\n')
    status, _, err = run(['train.py', *WORKER, *flags, f'--output_dir={tmp_path / "run"}', '--epochs=1',
                          '--batch_size=8', '--max_image_pixels=1000000', '--bad_sample_threshold=0.5'])
    assert status == 0, err
    epoch = [r for r in map(json.loads, (tmp_path / 'run' / 'log.jsonl').read_text().splitlines())
             if r['type'] == 'epoch']
    assert epoch[0]['skipped'] == 3


def test_data_that_is_almost_all_unreadable_ends_in_one_line_from_a_worker(tmp_path):
    """One readable row of 301: a loader worker gives up on a sample after MAX_BAD_IN_A_ROW failed draws; the error
    it raises reaches the main process wrapped in the worker's traceback and is printed as its own one line."""
    flags = [*WORKER, *image_folder(tmp_path, 301, missing=set(range(1, 301))), f'--output_dir={tmp_path / "run"}',
             '--batch_size=16', '--epochs=1']
    status, _, err = finish(start(flags), [])
    assert status == 1
    assert_one_error_line(err, f'{data.MAX_BAD_IN_A_ROW} unreadable samples in a row for index', 'check --root')
