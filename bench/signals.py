"""SIGUSR1 (SLURM's warning before the time limit) to a torchrun job, on the CPU, launched three ways.

python -m bench.signals
Two gloo ranks train the tiny model on the demo data; after their second logged step SIGUSR1 goes to the launcher:
plain torchrun, torchrun with --signals-to-handle=...,SIGUSR1 --shutdown-timeout, and the README's SLURM job
script (srun and scontrol stubbed: srun runs its command, scontrol names this host and notes a requeue), whose
trap passes the signal to torchrun. Per launch: the launcher's exit status and seconds after the signal, the ranks
still running 5 s later (their parent: 1 = orphaned), the checkpoint's step against the last logged one, and the
checkpoint files. Ranks left running are then stopped.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import exit_on_help

ROOT = Path(__file__).resolve().parents[1]
TINY = ('--vision_layers=1 --text_layers=1 --vision_width=32 --text_width=32 --image_size=32 --local_crop_size=32 '
        '--patch_size=16 --embed_dim=16 --mlp_hidden_dim=32 --method=clip --batch_size=8 --workers=1 --eval_every=0 '
        '--log_every=1 --demo_train_size=4000 --epochs=1000')  # 250 steps an epoch: no epoch-end save comes first
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def job_script(folder, out):
    """(path, environment) of the README's SLURM job script as it runs here: 2 CPU ranks of the tiny model writing
    to out, `srun` running its command, `scontrol` naming this host and writing a requeue to folder/scontrol.log."""
    readme = (ROOT / 'README.md').read_text()
    script = next(b for b in re.findall(r'```bash\n(.*?)```', readme, re.S) if '#SBATCH' in b)
    script = re.sub(r'train\.py [^&]*&', f'train.py {TINY} --output_dir={out} --resume=auto &', script)
    script = script.replace('--nproc_per_node=8', '--nproc_per_node=2').replace(':29500', f':{free_port()}')
    stubs = Path(folder) / 'bin'
    stubs.mkdir(exist_ok=True)
    (stubs / 'srun').write_text('#!/bin/sh\nexec "$@"\n')
    (stubs / 'scontrol').write_text(f'#!/bin/sh\nif [ "$1" = show ]; then echo 127.0.0.1; '
                                    f'else echo "$@" >> {Path(folder) / "scontrol.log"}; fi\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    (Path(folder) / 'job.sh').write_text(script)
    env = {**ENV, 'PATH': f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}", 'SLURM_NNODES': '1',
           'SLURM_JOB_ID': '42', 'SLURM_NODELIST': 'node1'}
    return Path(folder) / 'job.sh', env


def train_steps(out):
    """The steps of the whole 'train' records of out/log.jsonl."""
    path = Path(out) / 'log.jsonl'
    lines = path.read_text().split('\n')[:-1] if path.exists() else []
    return [r['step'] for r in map(json.loads, lines) if r['type'] == 'train']


def processes_naming(text):
    """{pid: parent pid} of the live processes whose command line holds text."""
    found = {}
    for proc in Path('/proc').glob('[0-9]*'):
        try:
            stat = (proc / 'stat').read_text().rsplit(')', 1)[1].split()
            if stat[0] not in 'ZX' and text in (proc / 'cmdline').read_bytes().decode(errors='replace'):
                found[int(proc.name)] = int(stat[1])
        except OSError:
            continue
    return found


def launch(kind, folder, out):
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    if kind == 'job script':
        script, env = job_script(folder, out)
        command = ['bash', str(script)]
    else:
        handled = ['--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1', '--shutdown-timeout=240']
        command = [*torchrun, *(handled if kind != 'torchrun' else []), 'train.py', *TINY.split(),
                   f'--output_dir={out}']
        env = ENV
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def measure(kind, folder):
    out = Path(folder) / 'run'
    job = launch(kind, folder, out)
    while len(train_steps(out)) < 2:
        if job.poll() is not None:
            return f"{kind}: ended before its second step (status {job.returncode})"
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGUSR1)
    start = time.perf_counter()
    status = job.wait(300)
    seconds = time.perf_counter() - start
    time.sleep(5)
    left = processes_naming(str(out))
    steps, saved = train_steps(out), sorted(p.name for p in out.glob('checkpoint_*.pt'))
    import torch
    ckpt = torch.load(out / 'checkpoint.pt', weights_only=True) if (out / 'checkpoint.pt').exists() else None
    for pid in left:  # the orphans go on training: stop them
        os.kill(pid, signal.SIGKILL)
    ranks = sorted(parent for pid, parent in left.items() if parent not in left)  # loader workers' parents: ranks
    return (f"{kind:28s} exit {status} after {seconds:.1f} s; 5 s later {len(ranks)} rank(s) alive"
            + (f" (parent pid {', '.join(map(str, ranks))})" if ranks else '')
            + f"; checkpoint.pt at step {ckpt['step'] if ckpt else '-'} with {len(ckpt['rng']) if ckpt else 0} "
              f"ranks' state, last logged step {steps[-1]}, files {saved}")


def main(argv):
    exit_on_help(argv, __doc__)
    for kind in ('torchrun', 'torchrun --signals-to-handle', 'job script'):
        with tempfile.TemporaryDirectory() as folder:
            print(measure(kind, folder), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
