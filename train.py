"""Train CLIP 🚀 and its baselines (SPEC.md section 5): one process or many, the same code.

    python train.py [--key=value ...]                                  # one process: CPU or one GPU
    torchrun --nproc_per_node=8 train.py --dataset=cc3m --root=... --metadata=...
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...

Checkpoints go to output_dir/checkpoint.pt (atomically); --resume=auto continues at the exact next sample.
SIGTERM / SIGUSR1 (sent by SLURM before pre-emption) save a checkpoint at the next step and exit 0.
"""
import contextlib
import copy
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import config
from data import build_tokenizer, build_train_loader, check_bad_fraction, checkpoint_merges
from evaluate import FORMAT as CHECKPOINT_FORMAT, evaluate, print_table, read_checkpoint
from model import autocast_dtype, build_model, compute_loss


# --- Distributed set-up ---
def setup_distributed(cfg):
    """Join torchrun's process group (NCCL on GPU, gloo on CPU); returns (rank, world_size, device)."""
    rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if cfg.device == 'cpu' or (cfg.device == 'auto' and not torch.cuda.is_available()):
        device = torch.device('cpu')
    elif not torch.cuda.is_available():
        raise ValueError(f"--device={cfg.device} but CUDA is not available here; use --device=cpu")
    elif cfg.device.startswith('cuda:') and world_size == 1:
        device = torch.device(cfg.device)
    else:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision('high')  # TF32 for fp32 matmuls on Ampere and later
    if world_size > 1:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                device_id=device if device.type == 'cuda' else None)
    return rank, world_size, device


def all_reduce(x, op=dist.ReduceOp.SUM):
    """All-reduce a tensor across ranks (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(x, op=op)
    return x


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- Optimizer and schedule ---
def param_groups(model, weight_decay):
    """AdamW groups (SPEC.md 5.2): tensors with ndim < 2 (biases, norm affines, logit scales) get no weight
    decay; weight matrices, conv kernels, embeddings, positional embeddings and the CLS token do."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def lr_schedule(step, cfg, steps_per_epoch):
    """Learning rate of optimizer step `step` (SPEC.md 5.3): linspace(lr_start, lr) over the warmup steps,
    both ends included, then a cosine from lr to lr_end over the remaining steps."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total)
    step = min(step, total - 1)  # SPEC.md 8.16: the index never runs past the end
    if step < warmup:
        return cfg.lr_start + (cfg.lr - cfg.lr_start) * step / max(warmup - 1, 1)
    progress = (step - warmup) / (total - warmup)
    return cfg.lr_end + 0.5 * (cfg.lr - cfg.lr_end) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def clamp_logit_scales(model, max_scale):
    """Keep exp(logit_scale) in [1, max_scale] (SPEC.md 1.6), in log space, after every optimizer step."""
    for p in (model.logit_scale, getattr(model, 'l2l_logit_scale', None)):
        if p is not None:
            p.clamp_(0, math.log(max_scale))


@torch.no_grad()
def ema_update(momentum_model, model, tau):
    """BYOLIP (SPEC.md 1.8): theta_m <- tau * theta_m + (1 - tau) * theta for parameters only; buffers
    (BN running statistics) evolve from the momentum model's own train-mode forwards."""
    for p_m, p in zip(momentum_model.parameters(), model.parameters()):
        p_m.lerp_(p.detach(), 1 - tau)


# --- Checkpoints ---
def atomic_save(obj, path):
    """torch.save to a temporary file in the same directory, fsync, rename over `path`, fsync the directory:
    a crash at any moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(device):
    """This process's RNG states as tensors and plain Python data (loadable with weights_only=True); the CUDA
    state only for a run on CUDA (asking for it elsewhere would open a CUDA context on GPU 0)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'python': random.getstate(), 'numpy': [name, keys.tolist(), pos, has_gauss, gauss],
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None}


def set_rng_state(state):
    random.setstate(state['python'])
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if state['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def save_checkpoint(cfg, model, optimizer, scaler, momentum_model, step, position, metrics, rank, world_size):
    """Collective: gather every rank's RNG state to rank 0, which writes checkpoint.pt and a step-numbered
    copy, keeping the last cfg.keep_last copies. Refuses (on every rank) to save non-finite weights."""
    for m in (model, momentum_model):
        if m is not None and not all(torch.isfinite(p).all() for p in m.parameters()):
            raise FloatingPointError(f"step {step}: the weights hold NaN/inf; not overwriting the last good "
                                     f"checkpoint in {cfg.output_dir}; resume from it with a lower --lr")
    device = next(model.parameters()).device
    rngs = [None] * world_size if rank == 0 else None
    if world_size > 1:
        dist.gather_object(rng_state(device), rngs, dst=0)
    else:
        rngs = [rng_state(device)]
    if rank != 0:
        return
    ckpt = {'format': CHECKPOINT_FORMAT, 'config': cfg.to_dict(), 'model': model.state_dict(),
            'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
            'momentum_model': momentum_model.state_dict() if momentum_model is not None else None,
            'epoch': position['epoch'], 'step': step, 'rng': rngs, 'data': position, 'metrics': metrics,
            'bpe_merges': checkpoint_merges(cfg.bpe_path)}  # the tokenizer travels with the weights
    out = Path(cfg.output_dir)
    atomic_save(ckpt, out / 'checkpoint.pt')
    numbered = out / f'checkpoint_{step:08d}.pt'
    numbered.unlink(missing_ok=True)
    try:
        os.link(out / 'checkpoint.pt', numbered)  # a hard link: the next atomic rename leaves this copy intact
    except OSError:  # a file system without hard links
        shutil.copyfile(out / 'checkpoint.pt', numbered)
    for old in sorted(out.glob('checkpoint_*.pt'))[:-cfg.keep_last]:
        old.unlink()


def load_checkpoint(path, model, momentum_model, optimizer, scaler, rank, world_size, batch_size):
    """Restore training state in place; returns (step, data position, this rank's RNG state or None)."""
    ckpt = read_checkpoint(path)
    try:
        model.load_state_dict(ckpt['model'])
        if momentum_model is not None:
            momentum_model.load_state_dict(ckpt['momentum_model'])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"--resume={path}: its weights do not fit this config's model "
                         f"({str(e).splitlines()[0]}); resume with the config it was trained with") from None
    optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt['scaler']:  # empty when saved by a disabled scaler (a bf16, fp32 or CPU run)
        scaler.load_state_dict(ckpt['scaler'])
    position, rng = ckpt['data'], ckpt['rng']
    if (position.get('world_size'), position.get('batch_size')) != (world_size, batch_size):
        # the sampler's batches are laid out for the old world and batch size: restart the unfinished epoch
        position, rng = {'epoch': position['epoch'], 'batch': 0}, None
        if rank == 0:
            print(f"resume: world or batch size changed; restarting epoch {position['epoch']} from its start")
    if rank == 0:
        print(f"resume: {path} at step {ckpt['step']}, epoch {position['epoch']}, batch {position['batch']}")
    return ckpt['step'], position, rng[rank] if rng is not None else None


def prepare_output_dir(cfg, rank):
    """Refuse an output_dir that holds another run unless --resume or --overwrite; returns the checkpoint
    to resume from (or None) and writes config.json."""
    out = Path(cfg.output_dir)
    saved = out / 'config.json'
    mine = json.loads(json.dumps(cfg.to_dict()))
    if not cfg.resume and not cfg.overwrite:
        theirs = json.loads(saved.read_text()) if saved.exists() else mine
        changed = sorted(k for k in set(mine) | set(theirs)
                         if k not in ('resume', 'overwrite') and mine.get(k) != theirs.get(k))
        if changed:
            diff = ', '.join(f'{k}: {theirs.get(k)!r} -> {mine.get(k)!r}' for k in changed[:5])
            raise ValueError(f"--output_dir={out} holds a run with another config ({diff}); pass --resume=auto "
                             f"to continue it, --overwrite to start over, or choose another --output_dir")
        if (out / 'checkpoint.pt').exists():
            raise ValueError(f"--output_dir={out} already holds checkpoint.pt; pass --resume=auto to continue "
                             f"it or --overwrite to start over")
    resume = None
    if cfg.resume == 'auto':
        resume = out / 'checkpoint.pt' if (out / 'checkpoint.pt').exists() else None
    elif cfg.resume:
        resume = Path(cfg.resume)
        if not resume.is_file():
            raise FileNotFoundError(f"--resume={cfg.resume}: no such checkpoint; give a checkpoint.pt path or auto")
    if dist.is_initialized():
        dist.barrier()  # every rank has read config.json before rank 0 rewrites it
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resume is None:  # a fresh run: stale checkpoints and logs of an overwritten run would mix in
            for old in [*out.glob('checkpoint*.pt'), out / 'log.jsonl']:
                old.unlink(missing_ok=True)
        config.save_json(cfg, saved)
    return resume


# --- Signals ---
STOP = {'signal': 0}  # set by the handler, acted on at the next optimizer-step boundary


def request_stop(signum, frame):
    STOP['signal'] = signum


# --- Logging ---
def accumulate(sums, losses):
    """Add a loss dict's detached values into running on-device sums (no host sync)."""
    for k, v in losses.items():
        sums[k] = sums.get(k, 0) + v.detach().float()


def mean_over_ranks(sums, count):
    """Means of the running sums over `count` micro-steps and all ranks, as Python floats (one sync)."""
    if not sums:
        return {}
    values = torch.stack(list(sums.values())) / count
    if dist.is_initialized():
        values = all_reduce(values) / dist.get_world_size()
    return dict(zip(sums, values.tolist()))


def peak_memory_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def write_log(cfg, record):
    with open(Path(cfg.output_dir) / 'log.jsonl', 'a') as f:
        f.write(json.dumps(record) + '\n')


# --- Training ---
def main(argv=None):
    """Train with the config of the command-line flags (see config.py / --help)."""
    cfg = config.parse_args(argv)
    rank, world_size, device = setup_distributed(cfg)
    master = rank == 0
    resume = prepare_output_dir(cfg, rank)
    amp_dtype = autocast_dtype(cfg, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)

    # data
    tokenizer = build_tokenizer(cfg)
    loader = build_train_loader(cfg, tokenizer, rank, world_size)
    steps_per_epoch = len(loader) // cfg.update_freq
    if steps_per_epoch == 0:
        raise ValueError(f"{len(loader)} batches per epoch is fewer than --update_freq={cfg.update_freq}; "
                         f"lower --batch_size or --update_freq")
    micro_per_epoch = steps_per_epoch * cfg.update_freq  # SPEC.md 8.16: a trailing partial step is dropped
    last_step = min(cfg.max_steps or math.inf, cfg.epochs * steps_per_epoch)

    # model: identical initialisation on every rank, then per-rank randomness (SPEC.md 5.5)
    seed_everything(cfg.seed)
    model = build_model(cfg, tokenizer.vocab_size).to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1 and device.type == 'cuda':  # SPEC.md 1.2, 1.5: ResNet and MLP-head BN see the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (GPU only: on CPU each rank keeps its own BN)
    momentum_model = None
    if cfg.method == 'byolip':
        momentum_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, fused=device.type == 'cuda')
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    seed_everything(cfg.seed + rank)

    step, position, rng = 0, {'epoch': 0, 'batch': 0}, None
    if resume is not None:
        step, position, rng = load_checkpoint(resume, model, momentum_model, optimizer, scaler, rank, world_size,
                                              cfg.batch_size)

    train_model = torch.compile(model) if cfg.compile else model
    if world_size > 1:
        # every method gives all its parameters a gradient (tested), so plain DDP: not the paper's static_graph,
        # which breaks under no_sync (pytorch/pytorch#143580), nor a per-step search for unused parameters
        train_model = DDP(train_model, device_ids=[device.index] if device.type == 'cuda' else None,
                          bucket_cap_mb=200)
    # installed before iter(loader), so that forked data workers inherit it
    STOP['signal'] = 0
    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGUSR1)}

    epoch, batch_index = position['epoch'], position['batch']
    loader.sampler.set_epoch(epoch, batch_index)
    data_iter = iter(loader)
    if rng is not None:  # after iter(): a fresh iterator draws a seed that the saved run had already drawn
        set_rng_state(rng)
    if master:
        print(f"train: {world_size} process(es) on {device}, {amp_dtype}, {steps_per_epoch} steps/epoch, "
              f"steps {step} -> {last_step}, global batch {cfg.batch_size * world_size * cfg.update_freq}")
    bar = tqdm(total=last_step, initial=step, dynamic_ncols=True, disable=not master)
    log_sums, epoch_sums, log_micro, epoch_micro = {}, {}, 0, 0
    skipped = torch.zeros((), dtype=torch.long, device=device)
    nonfinite_run, nonfinite_total, data_time, metrics = 0, 0, 0.0, {}
    t_log = t_data = time.perf_counter()
    model.train()
    stopping = False
    done = step >= last_step or epoch >= cfg.epochs
    while not done:
        # one optimizer step = update_freq micro-batches (SPEC.md 5.4)
        lr = lr_schedule(step, cfg, steps_per_epoch)
        for group in optimizer.param_groups:
            group['lr'] = lr
        step_loss = torch.zeros((), device=device)
        for micro in range(cfg.update_freq):
            batch = next(data_iter)
            batch_index += 1
            data_time += time.perf_counter() - t_data
            weak = batch['weak'].to(device, non_blocking=True)
            tokens = batch['tokens'].to(device, non_blocking=True)
            strong = [s.to(device, non_blocking=True) for s in batch['strong']]
            if cfg.channels_last:
                weak, strong = weak.to(memory_format=torch.channels_last), [
                    s.to(memory_format=torch.channels_last) for s in strong]
            skipped += batch['skipped'].sum().to(device)
            # deviation from SPEC.md 5.4: gradients are all-reduced on the last micro-step only
            last_micro = micro == cfg.update_freq - 1
            sync = contextlib.nullcontext() if last_micro or world_size == 1 else train_model.no_sync()
            with sync:
                with autocast:
                    out = train_model(weak, tokens, strong)
                    target = None
                    if momentum_model is not None:
                        with torch.no_grad():
                            target = momentum_model(weak, tokens, strong)
                    losses = compute_loss(out, cfg, target)
                scaler.scale(losses['loss'] / cfg.update_freq).backward()
            step_loss += losses['loss'].detach()
            accumulate(log_sums, losses)
            accumulate(epoch_sums, losses)
            log_micro, epoch_micro = log_micro + 1, epoch_micro + 1
            t_data = time.perf_counter()

        # the one host sync per step: agree across ranks on a non-finite loss and on a stop request
        flags = torch.stack([(~torch.isfinite(step_loss)).float(), torch.tensor(float(STOP['signal']), device=device)])
        nonfinite, stopping = (v > 0 for v in all_reduce(flags, dist.ReduceOp.MAX).tolist())
        if nonfinite:  # skip the update: no optimizer or scaler step, no EMA
            optimizer.zero_grad(set_to_none=True)
            nonfinite_run, nonfinite_total = nonfinite_run + 1, nonfinite_total + 1
            if master:
                write_log(cfg, {'type': 'nonfinite', 'step': step, 'epoch': epoch, 'lr': lr})
                print(f"step {step}: non-finite loss, update skipped ({nonfinite_run} in a row)", file=sys.stderr)
            if nonfinite_run >= cfg.max_nonfinite:
                raise FloatingPointError(f"{nonfinite_run} non-finite losses in a row at step {step}; stopping. "
                                         f"Resume from {cfg.output_dir}/checkpoint.pt with a lower --lr or "
                                         f"--precision=bf16/fp32, or raise --max_nonfinite")
        else:
            nonfinite_run = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if momentum_model is not None:
                ema_update(momentum_model, model, cfg.momentum_tau)
            clamp_logit_scales(model, cfg.logit_scale_max)
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == last_step:
            elapsed = time.perf_counter() - t_log
            record = {'type': 'train', 'step': step, 'epoch': epoch + batch_index / micro_per_epoch, 'lr': lr,
                      **mean_over_ranks(log_sums, log_micro),
                      'logit_scale': model.logit_scale.exp().item(),
                      'samples_per_s': log_micro * cfg.batch_size * world_size / elapsed,
                      'data_time': data_time / log_micro, 'peak_mem_gb': peak_memory_gb(device),
                      'skipped': int(all_reduce(skipped.clone()).item()), 'nonfinite_steps': nonfinite_total}
            metrics = record
            if master:
                write_log(cfg, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f'{lr:.2e}', scale=f"{record['logit_scale']:.1f}",
                                sps=f"{record['samples_per_s']:.0f}")
            log_sums, log_micro, data_time, t_log = {}, 0, 0.0, time.perf_counter()

        epoch_end = batch_index == micro_per_epoch
        if epoch_end:
            total_skipped = int(all_reduce(skipped).item())
            samples = epoch_micro * cfg.batch_size * world_size
            check_bad_fraction(total_skipped, samples + total_skipped, cfg)
            record = {'type': 'epoch', 'epoch': epoch + 1, 'step': step, 'skipped': total_skipped,
                      **{f'train_{k}': v for k, v in mean_over_ranks(epoch_sums, epoch_micro).items()}}
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and not stopping:
                record['test'] = evaluate(model, tokenizer, cfg, rank, world_size)  # {dataset: {metric: value}}
            metrics = record
            if master:
                write_log(cfg, record)
                with tqdm.external_write_mode():
                    print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, {total_skipped} samples skipped")
                    if 'test' in record:
                        print_table([{'checkpoint': cfg.output_dir, 'epoch': epoch + 1, 'results': record['test']}])
            epoch, batch_index, epoch_sums, epoch_micro = epoch + 1, 0, {}, 0
            skipped = torch.zeros_like(skipped)

        done = stopping or step >= last_step or epoch >= cfg.epochs
        if epoch_end or done or (cfg.save_every and step % cfg.save_every == 0):
            position = {'epoch': epoch, 'batch': batch_index, 'world_size': world_size, 'batch_size': cfg.batch_size}
            save_checkpoint(cfg, model, optimizer, scaler, momentum_model, step, position, metrics, rank, world_size)
        if epoch_end and not done:
            loader.sampler.set_epoch(epoch, 0)
            data_iter = iter(loader)

    bar.close()
    for s, handler in previous_handlers.items():
        signal.signal(s, handler)
    if master:
        why = "a stop signal at step" if stopping else "step"
        print(f"train: stopped at {why} {step}; checkpoint in {cfg.output_dir}/checkpoint.pt")
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing; a peer leaving early aborts gloo's teardown
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
