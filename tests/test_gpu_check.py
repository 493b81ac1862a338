"""bench/gpu_check.sh without a GPU: its dry run prints the whole table and exits 0, a section that fails or runs out
of time gets its row and stops nothing, and (slow) its CPU stand-ins fill their rows with numbers."""
import subprocess

import pytest
import torch

from test_cli import ENV, ROOT

HANG = 900  # seconds: a guard far above these runs on a busy 2-core machine
SECTIONS = ['device', 'nccl', 'smoke', 'vit_b16 rocket step', 'fp16 + GradScaler', 'augment_device cuda/cpu',
            'gradient caching', 'loader', 'evaluate', 'channels_last']


def rows(stdout):
    """{section: (status, result)} of the table."""
    cells = [line.strip('|').split(' | ') for line in stdout.splitlines() if line.startswith('| ')][1:]
    return {c[0].strip(): (c[1], c[3].strip()) for c in cells}


@pytest.mark.skipif(torch.cuda.is_available(), reason='with CUDA the script runs every section for real')
def test_the_dry_run_prints_every_row_and_exits_0(tmp_path):
    r = subprocess.run(['bash', 'bench/gpu_check.sh'], cwd=ROOT, env={**ENV, 'GPU_CHECK_DIR': str(tmp_path)},
                       capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 0, r.stderr
    table = rows(r.stdout)
    assert list(table) == SECTIONS
    assert table['device'] == ('skipped', f'skipped: no CUDA (torch {torch.__version__}, built for CUDA '
                                          f'{torch.version.cuda or "none (a CPU-only build)"})')
    assert all(status == 'skipped' and result.startswith('skipped: no CUDA') for status, result in table.values())


def test_a_failing_or_hanging_section_gets_its_row_and_the_table_still_comes(tmp_path):
    script = f'''source bench/gpu_check.sh
DIR={tmp_path}; MODE=test
section fine 20 "echo noise; echo 'result: 42 samples/s'"
section "broken cuda/cpu" 20 "echo 'result: half done'; echo 'Traceback: boom'; exit 3"
section silent 20 "echo 'the last line'; exit 2"
section hangs 1 "sleep 60"
section absent 20 "echo 'result: skipped: no CUDA'"
table
echo "failed $FAILED"'''
    r = subprocess.run(['bash', '-c', script], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 0, r.stderr
    assert rows(r.stdout) == {'fine': ('ok', '42 samples/s'), 'broken cuda/cpu': ('failed (3)', 'half done'),
                              'silent': ('failed (2)', 'the last line'), 'hangs': ('timeout (1 s)', ''),
                              'absent': ('skipped', 'skipped: no CUDA')}
    assert r.stdout.rstrip().endswith('failed 1')
    assert (tmp_path / 'broken_cuda_cpu.log').read_text() == 'result: half done\nTraceback: boom\n'


@pytest.mark.slow
def test_the_cpu_stand_ins_fill_their_rows(tmp_path):
    r = subprocess.run(['bash', 'bench/gpu_check.sh', '--cpu'], cwd=ROOT, env={**ENV, 'GPU_CHECK_DIR': str(tmp_path)},
                       capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 0, r.stdout + r.stderr
    table = rows(r.stdout)
    assert 'GB/s bus bandwidth' in table['nccl (gloo stand-in)'][1]
    assert 'samples/s, peak' in table['smoke (2 CPU ranks, tiny)'][1]
    assert 'samples/s, peak' in table['gradient caching (2 CPU ranks, chunks of 4)'][1]
    assert 'samples/s at 32 px with 1 workers' in table['loader'][1]
    assert 'z head: demo_shape' in table['evaluate'][1]
    assert sum(status == 'ok' for status, _ in table.values()) == 5
