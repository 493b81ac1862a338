"""Gradient caching (--chunk): peak memory and samples/s of a training step against the chunk size at a fixed batch,
and the paper's global batch of 4,096 trained on this machine.

    python -m bench.chunks                                   # ResNet-50 at 64 px, batch 128, chunks 128/64/32/16
    python -m bench.chunks --model=vit_s16 --batch=512 --chunks=512,128,64,32
    python -m bench.chunks --rows=demo                       # train.py on the demo at --global_batch=4096

The step: train.py's micro-batch (train.forward_backward: weak + 2 strong views, 1+2 caption rows, every head, the
loss, the backward; a chunk of the whole batch is one pass, no caching) and an AdamW step, fp32 on the CPU, on
random images and captions. The image trunk is the model preset's; the text tower is the tiny preset's at 32 tokens
(its activations are small next to the image trunk's), so the rows show what the image trunk's chunks save and cost.

Memory rows: each chunk size in a fresh process, one warm-up step and one measured: its max RSS (getrusage) minus
its RSS once the model, AdamW's state and the batch exist = the step's working memory (activations, the cached
features and their gradients, the gradients). Speed rows: one process, the chunk sizes' steps interleaved
(--rounds rounds of one step each, after a warm-up round), so that a busy machine slows them alike: median
samples/s, and the ratio to one pass (or to the first chunk size when none is one pass).

Demo row: train.py in a subprocess on the demo data (the tiny model cut to 2 image and 1 text layers, 32 px images,
--demo_method, 2 warmup epochs) at the paper's --global_batch=4096, in chunks of --demo_chunk, for --demo_steps
steps: the loss and the image->text top-1 accuracy among the 4,096 (chance 0.02%) every 10 steps, the held-out demo
tasks at the end, the run's peak RSS (of the training process), its wall time.
"""
import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import config
import train
from bench import exit_on_help

ROOT = Path(__file__).resolve().parents[1]


# --- Steps at a fixed batch ---
def rss_mib():
    """This process's resident memory now, MiB (Linux /proc)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def setup(args, chunk):
    """(cfg, model, AdamW with its state, inputs) of the bench's step at one chunk size."""
    cfg = config.resolve({'model': args.model, 'batch_size': str(args.batch), 'chunk': str(chunk),
                          'image_size': str(args.size), 'local_crop_size': str(args.size), 'text_width': '128',
                          'text_heads': '4', 'text_layers': '3', 'context_length': '32'}, verbose=False)
    torch.manual_seed(0)
    model = train.build_model(cfg, 49408, verbose=False).train()
    optimizer = torch.optim.AdamW(train.param_groups(model, cfg.weight_decay), lr=1e-5)
    for p in model.parameters():  # AdamW's state exists from the start, as in a running job
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    B, A = cfg.batch_size, cfg.num_augs
    tokens = torch.randint(1, 49407, (B, 1 + A, cfg.context_length))
    tokens[..., -1] = 49407  # EOT, the largest id, ends every caption
    inputs = (torch.randn(B, 3, args.size, args.size), tokens,
              [torch.randn(B, 3, args.size, args.size) for _ in range(A)])
    return cfg, model, optimizer, inputs


def step(cfg, model, optimizer, inputs):
    """One training step at cfg.chunk; its seconds."""
    start = time.perf_counter()
    train.forward_backward(cfg, model, model, None, torch.amp.GradScaler('cpu', enabled=False),
                           torch.autocast('cpu', enabled=False), inputs, last_micro=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def reference_chunk(args):
    """(the chunk size the ratios divide by, its name): one pass if a row is one, else the first row."""
    one = next((c for c in args.chunks if c == 0 or c >= args.batch), None)
    return (one, 'one pass') if one is not None else (args.chunks[0], f'chunk {args.chunks[0]}')


def memory_row(args):
    """One chunk size in this fresh process: prints its JSON row."""
    cfg, model, optimizer, inputs = setup(args, args.chunk)
    base = rss_mib()
    step(cfg, model, optimizer, inputs)  # warm-up
    step(cfg, model, optimizer, inputs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB
    print(json.dumps({'chunk': args.chunk, 'peak_mib': peak, 'base_mib': base, 'step_mib': peak - base}))


def memory_rows(args):
    ref, name = reference_chunk(args)
    print(f"memory: {args.model} at {args.size} px, batch {args.batch}, fp32; each chunk size a fresh process",
          flush=True)
    rows = {}
    for chunk in sorted(args.chunks, key=lambda c: c != ref):  # the reference first
        cmd = [sys.executable, '-m', 'bench.chunks', '--one', f'--model={args.model}', f'--batch={args.batch}',
               f'--chunk={chunk}', f'--size={args.size}', f'--threads={args.threads}']
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        rows[chunk] = row = json.loads(out.splitlines()[-1])
        print(f"  chunk {chunk:>4}: step {row['step_mib']:6.0f} MiB (x{row['step_mib'] / rows[ref]['step_mib']:.2f} "
              f"{name}), peak RSS {row['peak_mib']:6.0f} MiB", flush=True)


def speed_rows(args):
    ref, name = reference_chunk(args)
    print(f"speed: {args.model} at {args.size} px, batch {args.batch}, fp32, {args.threads} thread(s); the chunk "
          f"sizes' steps interleaved in one process, {args.rounds} rounds after a warm-up round", flush=True)
    cfg, model, optimizer, inputs = setup(args, args.chunks[0])
    times = {c: [] for c in args.chunks}
    for round in range(args.rounds + 1):
        for chunk in args.chunks:
            seconds = step(dataclasses.replace(cfg, chunk=chunk), model, optimizer, inputs)
            if round:
                times[chunk].append(seconds)
    speed = {c: args.batch / statistics.median(t) for c, t in times.items()}
    for chunk in args.chunks:
        print(f"  chunk {chunk:>4}: {speed[chunk]:6.2f} samples/s (x{speed[chunk] / speed[ref]:.2f} {name}; "
              f"steps {' '.join(f'{t:.1f}' for t in times[chunk])} s)", flush=True)


# --- The paper's global batch on the demo ---
def demo_row(args):
    """train.py at the paper's global batch on the demo data: it finishes, the loss falls, the held-out tasks rise."""
    with tempfile.TemporaryDirectory() as out:
        size = 4096 * args.demo_steps // args.demo_epochs
        cmd = [sys.executable, 'train.py', f'--method={args.demo_method}', '--global_batch=4096',
               f'--chunk={args.demo_chunk}', '--image_size=32', '--local_crop_size=32', '--vision_layers=2',
               '--text_layers=1', f'--demo_train_size={size}', '--demo_val_size=1000', f'--epochs={args.demo_epochs}',
               f'--eval_every={args.demo_epochs}', '--log_every=10', f'--lr={args.demo_lr}', '--warmup_epochs=2', f'--output_dir={out}']
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            sys.exit(proc.stdout + proc.stderr)
        records = [json.loads(line) for line in (Path(out) / 'log.jsonl').read_text().splitlines()]
        steps = [r for r in records if r['type'] == 'train']
        print(next(line for line in proc.stdout.splitlines() if line.startswith('train: ')))
        acc = 'image_acc' if 'image_acc' in steps[0] else 'global_acc'
        print('steps:    ' + ' '.join(f"{r['step']:>6}" for r in steps))
        print('loss:     ' + ' '.join(f"{r['loss']:6.3f}" for r in steps) + '  (ln 4096 = 8.318)')
        print('top-1 %:  ' + ' '.join(f"{r[acc]:6.2f}" for r in steps) + '  (chance 0.02)')
        test = [r for r in records if r['type'] == 'epoch'][-1]['test']  # the held-out demo tasks, at the end
        print('held-out: ' + ', '.join(f"{task} {metric} {value:.1f}" for task, metrics in test.items()
                                       for metric, value in metrics.items()))
        print(f"{steps[-1]['step']} steps of 4096 in {seconds:.0f} s ({seconds / steps[-1]['step']:.0f} s a step, "
              f"process start and demo data generation included); peak RSS {steps[-1]['peak_mem_gb']:.2f} GiB",
              flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    exit_on_help(argv, __doc__)
    p = argparse.ArgumentParser()
    p.add_argument('--rows', default='steps', choices=['steps', 'memory', 'speed', 'demo', 'all'])
    p.add_argument('--model', default='resnet50')
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--chunks', type=lambda s: [int(c) for c in s.split(',')], default=[128, 64, 32, 16])
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--demo_method', default='clip')
    p.add_argument('--demo_chunk', type=int, default=1024)
    p.add_argument('--demo_steps', type=int, default=150)
    p.add_argument('--demo_epochs', type=int, default=15)
    p.add_argument('--demo_lr', type=float, default=1e-3)
    p.add_argument('--one', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--chunk', type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        return memory_row(args)
    if args.rows in ('steps', 'memory', 'all'):
        memory_rows(args)
    if args.rows in ('steps', 'speed', 'all'):
        speed_rows(args)
    if args.rows in ('demo', 'all'):
        demo_row(args)


if __name__ == '__main__':
    main()
