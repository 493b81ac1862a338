"""The measurements of bench/gpu_check.sh, one per call; each prints its table cell as a last line `result: ...`
(`result: skipped: why` where it cannot run here). Runtime dependencies only: it runs after
`pip install -r requirements.txt`.

    python -m bench.gpu_check device                         # GPU, driver, capability, torch's CUDA and NCCL
    torchrun --nproc_per_node=N -m bench.gpu_check allreduce [--mib=256]   # all-reduce bus bandwidth
    python -m bench.gpu_check run OUT [OTHER]                # a train.py run's samples/s, peak memory and MFU
    python -m bench.gpu_check rocket MODEL [--batch=128]     # the full rocket step: samples/s, peak memory, MFU
    python -m bench.gpu_check channels_last [--batch=128]    # the ResNet-50 rocket step without and with it
    python -m bench.gpu_check loader [--batch=128]           # training batches/s of the loader alone
    python -m bench.gpu_check evaluate CKPT                  # evaluate.py on a checkpoint
"""
import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

import config
from bench import exit_on_help
from bench.step import count_flops, peak_tflops, random_tokens, rocket_case

CPU = torch.device('cpu')


def say(result):
    print(f"result: {result}", flush=True)


def options(argv):
    """(positional arguments, {--key: int value})."""
    return [a for a in argv if not a.startswith('--')], {k[2:]: int(v) for k, _, v in
                                                          (a.partition('=') for a in argv if a.startswith('--'))}


def device_row(_):
    cuda = torch.version.cuda or 'none (a CPU-only build)'
    if not torch.cuda.is_available():
        return say(f"skipped: no CUDA (torch {torch.__version__}, built for CUDA {cuda})")
    try:  # a container may have CUDA without nvidia-smi: then the kernel module's version
        smi = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True)
    except OSError:
        smi = None
    driver = smi.stdout.split('\n')[0].strip() if smi and smi.returncode == 0 else config.nvidia_driver() or '?'
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    say(f"{len(names)} x {names[0]}, driver {driver}, sm_{''.join(map(str, torch.cuda.get_device_capability(0)))}, "
        f"torch {torch.__version__} (CUDA {cuda}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))})")


def allreduce(argv):
    """Bus bandwidth of an all-reduce over every rank of torchrun (NCCL on GPUs, else gloo): 2 (n - 1) / n x bytes /
    time, nccl-tests' measure, the median of 20 after 5 warm-up calls."""
    _, opts = options(argv)
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    cuda = torch.cuda.is_available()
    device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))) if cuda else CPU
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if cuda else 'gloo', device_id=device if cuda else None)
    x = torch.ones(opts.get('mib', 256 if cuda else 16) << 18, device=device)  # float32: 4 bytes
    times = []
    for _ in range(25):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(x)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times[5:])[len(times[5:]) // 2]
    dist.destroy_process_group()
    if rank == 0:
        bus = 2 * (world - 1) / world * x.numel() * 4 / seconds / 1e9
        say(f"{'nccl' if cuda else 'gloo (CPU stand-in)'}, {world} rank(s), {x.numel() * 4 >> 20} MiB: "
            + (f"{bus:.1f} GB/s bus bandwidth" if world > 1 else f"{seconds * 1e3:.2f} ms (one rank: no peer)"))


def flops_per_sample(cfg, vocab_size, device):
    """Model FLOPs of one training sample of cfg (forward and backward, counted on a batch of 2)."""
    from model import CLIPModel, compute_loss
    model = CLIPModel(cfg, vocab_size).to(device).train()
    views = [torch.randn(2, 3, size, size, device=device)
             for size in [cfg.image_size] + [cfg.local_crop_size] * cfg.num_augs]
    tokens = random_tokens(2 * (1 + cfg.num_augs), device, vocab_size, cfg.context_length)

    def step():
        out = model(views[0], tokens.view(2, 1 + cfg.num_augs, -1), views[1:])
        compute_loss(out, cfg)['loss'].backward()
    return count_flops(step) / 2


def run(argv):
    """A train.py run in folder OUT: the last log interval's samples/s (all ranks), peak memory (rank 0), MFU (model
    FLOPs at the run's shapes over the GPUs' bf16 peak), skipped updates and the GradScaler's scale; OTHER: a second
    run of the same shapes, whose samples/s this one is divided by."""
    out, *other = options(argv)[0]
    log = [json.loads(line) for line in (Path(out) / 'log.jsonl').read_text().splitlines()]
    last = [r for r in log if r['type'] == 'train'][-1]
    cfg = config.load_json(Path(out) / 'config.json')
    ckpt = torch.load(Path(out) / 'checkpoint.pt', map_location='cpu', weights_only=True)
    cells = [f"{last['samples_per_s']:.1f} samples/s", f"peak {last['peak_mem_gb']:.1f} GB"]
    device = torch.device('cuda') if torch.cuda.is_available() else CPU
    peak = peak_tflops(device, 0)
    if peak:
        from data import build_tokenizer
        flops = flops_per_sample(cfg, build_tokenizer(cfg).vocab_size, device)
        gpus = ckpt['data']['world_size']
        cells.append(f"MFU {100 * last['samples_per_s'] * flops / (peak * 1e12 * gpus):.1f}%")
    if ckpt['scaler']:
        cells.append(f"GradScaler scale {ckpt['scaler']['scale']:g}")
    first = next(r for r in log if r['type'] == 'train')
    cells.append(f"{last['nonfinite_steps']} skipped updates, loss {first['loss']:.3f} -> {last['loss']:.3f}")
    if other:
        theirs = [r for r in map(json.loads, (Path(other[0]) / 'log.jsonl').read_text().splitlines())
                  if r['type'] == 'train'][-1]['samples_per_s']
        cells.append(f"{last['samples_per_s'] / theirs:.2f}x {Path(other[0]).name}'s {theirs:.1f}")
    say(', '.join(cells))


def fresh(*case):
    """rocket_case in a fresh process (its own peak memory)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
        return pool.submit(rocket_case, *case).result()


def rocket(argv):
    """The full rocket step of MODEL at 224 px, bf16: samples/s, peak memory, MFU (bench.step's)."""
    (name,), opts = options(argv)
    if not torch.cuda.is_available():
        return say('skipped: no CUDA')
    rate, peak_mib, flop_rate = fresh(name, opts.get('batch', 128), 10, 3, 1, 'cuda', False, False)
    tflops = peak_tflops(torch.device('cuda'), 0)
    mfu = f"MFU {100 * flop_rate / 1e12 / tflops:.1f}%" if tflops else 'MFU n/a (device not in the peak table)'
    say(f"{name}: {rate:.1f} samples/s, peak {peak_mib / 1024:.1f} GiB, {flop_rate / 1e12:.0f} TFLOP/s, {mfu}")


def channels_last(argv):
    """The ResNet-50 rocket step without and with channels_last: whether the latter is faster on this GPU."""
    _, opts = options(argv)
    if not torch.cuda.is_available():
        return say('skipped: no CUDA')
    plain, last = (fresh('resnet50', opts.get('batch', 128), 10, 3, 1, 'cuda', False, on)[0] for on in (False, True))
    say(f"{plain:.1f} -> {last:.1f} samples/s with channels_last ({last / plain:.2f}x)")


def loader(argv):
    """Training batches of the demo recipe at 224 px (CPU views, this node's automatic workers per GPU) read by the
    loader alone: samples/s per rank after the workers' first batches."""
    from data import build_tokenizer, build_train_loader
    _, opts = options(argv)
    cuda = torch.cuda.is_available()
    gpus = max(1, torch.cuda.device_count())
    size = 224 if cuda else 32
    flags = {'model': 'resnet50', 'image_size': str(size), 'local_crop_size': str(size),
             'batch_size': str(opts.get('batch', 128 if cuda else 16)), 'demo_train_size': '20000'}
    cfg = config.resolve(flags, verbose=False)
    cfg.workers, _ = config.cpu_split(-1, 0, 'cuda' if cuda else 'cpu', gpus)
    batches = iter(build_train_loader(cfg, build_tokenizer(cfg)))
    for _ in range(max(2, cfg.workers)):  # every worker's first batch: start-up
        next(batches)
    count = 20 if cuda else 3
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    rate = count * cfg.batch_size / (time.perf_counter() - start)
    say(f"{rate:.0f} samples/s at {size} px with {cfg.workers} workers ({rate / max(1, cfg.workers):.0f} a worker)"
        + ('' if cuda else ' (CPU stand-in)'))


def evaluate_row(argv):
    """evaluate.py on a checkpoint (its config's default sets): images/s of each set and the z-head top-1."""
    import evaluate
    (ckpt,), _ = options(argv)
    lines = []
    start = time.perf_counter()
    evaluate.main([ckpt, f'--out={Path(ckpt).with_suffix(".eval.json")}'])
    found = json.loads(Path(ckpt).with_suffix('.eval.json').read_text())[0]['results']  # --out: a list of records
    for name, metrics in found.items():
        lines.append(f"{name} {metrics.get('acc1_z', metrics.get('i2t_r1_z', float('nan'))):.1f}")
    say(f"{time.perf_counter() - start:.0f} s; z head: {', '.join(lines)}")


COMMANDS = {'device': device_row, 'allreduce': allreduce, 'run': run, 'rocket': rocket,
            'channels_last': channels_last, 'loader': loader, 'evaluate': evaluate_row}


def main(argv):
    exit_on_help(argv, __doc__)
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: python -m bench.gpu_check {{{','.join(COMMANDS)}}} ...")
    COMMANDS[argv[0]](argv[1:])


if __name__ == '__main__':
    main(sys.argv[1:])
