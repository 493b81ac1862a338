"""Gradient caching (--chunk): peak memory and samples/s of a training step against the chunk size at a fixed batch,
and the paper's global batch of 4,096 trained on this machine.

    python -m bench.chunks                                   # ResNet-50 at 64 px, batch 128, chunks 128/64/32/16
    python -m bench.chunks --model=vit_s16 --batch=512 --chunks=512,128,64,32
    python -m bench.chunks --rows=demo                       # train.py on the demo at --global_batch=4096

Step rows: each chunk size in a fresh process, one after the other (--rounds repeats the sequence): train.py's
micro-batch (train.forward_backward: weak + 2 strong views, 1+2 caption rows, every head, the loss, the backward; a
chunk equal to the batch is one pass, no caching) and an AdamW step, fp32 on the CPU, on random images and captions.
The image trunk is the model preset's; the text tower is the tiny preset's at 32 tokens (its activations are small
next to the image trunk's), so the rows show what the image trunk's chunks save and cost. Peak memory: the process's
max RSS (getrusage) minus its RSS once the model, AdamW's state and the batch exist (the step's working memory: its
activations, the cached features and their gradients, the gradients). samples/s over --steps after a warm-up step.

Demo row: train.py in a subprocess on the demo data (tiny model, 32 px images) at the paper's --global_batch=4096,
in chunks of --demo_chunk, for --demo_steps steps: the loss per step, the run's peak RSS (of the training process),
its wall time.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import exit_on_help

ROOT = Path(__file__).resolve().parents[1]


def rss_mib():
    """This process's resident memory now, MiB (Linux /proc)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def one_row(args):
    """One chunk size in this process: prints a JSON row."""
    import config
    import train
    torch.set_num_threads(args.threads)
    cfg = config.resolve({'model': args.model, 'batch_size': str(args.batch), 'chunk': str(args.chunk),
                          'image_size': str(args.size), 'local_crop_size': str(args.size), 'text_width': '128',
                          'text_heads': '4', 'text_layers': '3', 'context_length': '32'}, verbose=False)
    torch.manual_seed(0)
    model = train.build_model(cfg, 49408, verbose=False).train()
    optimizer = torch.optim.AdamW(train.param_groups(model, cfg.weight_decay), lr=1e-5)
    B, A = cfg.batch_size, cfg.num_augs
    tokens = torch.randint(1, 49407, (B, 1 + A, cfg.context_length))
    tokens[..., -1] = 49407  # EOT, the largest id, ends every caption
    inputs = (torch.randn(B, 3, args.size, args.size), tokens,
              [torch.randn(B, 3, args.size, args.size) for _ in range(A)])
    scaler, autocast = torch.amp.GradScaler('cpu', enabled=False), torch.autocast('cpu', enabled=False)

    def step():
        train.forward_backward(cfg, model, model, None, scaler, autocast, inputs, last_micro=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for p in model.parameters():  # AdamW's state exists before the baseline, as in a running job
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    base = rss_mib()
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB
    print(json.dumps({'chunk': args.chunk, 'batch': B, 'samples_per_s': B / seconds, 'step_s': seconds,
                      'peak_mib': peak, 'base_mib': base, 'step_mib': peak - base}))


def step_rows(args):
    print(f"{args.model} at {args.size} px, batch {args.batch}, {args.threads} torch thread(s), fp32; each row a "
          f"fresh process", flush=True)
    print(f"{'chunk':>6} {'samples/s':>10} {'x one pass':>10} {'step MiB':>9} {'x one pass':>10} {'peak RSS MiB':>13}")
    for _ in range(args.rounds):
        rows = []
        for chunk in args.chunks:
            cmd = [sys.executable, '-m', 'bench.chunks', '--one', f'--model={args.model}', f'--batch={args.batch}',
                   f'--chunk={chunk}', f'--size={args.size}', f'--steps={args.steps}', f'--threads={args.threads}']
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.splitlines()[-1]))
        full = next((r for r in rows if r['chunk'] >= r['batch'] or r['chunk'] == 0), rows[0])
        for r in rows:
            print(f"{r['chunk']:>6} {r['samples_per_s']:>10.2f} {r['samples_per_s'] / full['samples_per_s']:>10.2f} "
                  f"{r['step_mib']:>9.0f} {r['step_mib'] / full['step_mib']:>10.2f} {r['peak_mib']:>13.0f}",
                  flush=True)


def demo_row(args):
    """train.py at the paper's global batch on the demo data: it finishes, and the loss falls."""
    with tempfile.TemporaryDirectory() as out:
        size = 4096 * args.demo_steps // args.demo_epochs
        cmd = [sys.executable, 'train.py', '--global_batch=4096', f'--chunk={args.demo_chunk}', '--image_size=32',
               '--local_crop_size=32', f'--demo_train_size={size}', '--demo_val_size=256', f'--epochs={args.demo_epochs}',
               '--eval_every=0', '--log_every=1', f'--lr={args.demo_lr}', '--warmup_epochs=0.25',
               f'--output_dir={out}']
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            sys.exit(proc.stdout + proc.stderr)
        records = [json.loads(line) for line in (Path(out) / 'log.jsonl').read_text().splitlines()]
        train_records = [r for r in records if r['type'] == 'train']
        start_line = next(line for line in proc.stdout.splitlines() if line.startswith('train: '))
        print(start_line)
        print('loss per step: ' + ' '.join(f"{r['loss']:.3f}" for r in train_records))
        print(f"{len(train_records)} steps of 4096 in {seconds:.0f} s ({seconds / len(train_records):.0f} s a step, "
              f"process start and demo data generation included); peak RSS {train_records[-1]['peak_mem_gb']:.2f} GiB")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    exit_on_help(argv, __doc__)
    p = argparse.ArgumentParser()
    p.add_argument('--rows', default='steps', choices=['steps', 'demo', 'all'])
    p.add_argument('--model', default='resnet50')
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--chunks', type=lambda s: [int(c) for c in s.split(',')], default=[128, 64, 32, 16])
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--rounds', type=int, default=1)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--demo_chunk', type=int, default=512)
    p.add_argument('--demo_steps', type=int, default=12)
    p.add_argument('--demo_epochs', type=int, default=3)
    p.add_argument('--demo_lr', type=float, default=2e-3)
    p.add_argument('--one', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--chunk', type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return one_row(args)
    if args.rows in ('steps', 'all'):
        step_rows(args)
    if args.rows in ('demo', 'all'):
        demo_row(args)


if __name__ == '__main__':
    main()
