"""Train CLIP 🚀 and its baselines (recipe §5): one process or many, the same code.

    python train.py [--key=value ...]                                  # one process: CPU or one GPU
    torchrun --nproc_per_node=8 train.py --dataset=cc3m --root=... --metadata=...
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...

Checkpoints go to output_dir/checkpoint.pt (atomically; this module's "Checkpoints" section saves, keeps and resumes
them, evaluate.read_checkpoint reads them); --resume=auto continues at the exact next sample.
SIGTERM / SIGUSR1 (sent by SLURM before pre-emption) and a first Ctrl-C save a checkpoint at the next step and exit 0;
a second Ctrl-C exits at once.
"""
import contextlib
import copy
import errno
import importlib.util
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import config
from augment import finish_views
from data import READERS, build_tokenizer, build_train_loader, check_bad_fraction, checkpoint_merges, samples_read
from evaluate import epoch_datasets, evaluate, print_table, read_checkpoint
from model import FORMAT, autocast_dtype, build_model, compute_loss, restore_buffers


# --- Distributed set-up ---
def all_reduce(x, op=dist.ReduceOp.SUM):
    """All-reduce a tensor across ranks (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(x, op=op)
    return x


@contextlib.contextmanager
def on_every_rank(world_size):
    """Run a set-up stage on every rank, then agree: a UserError on any rank stops every rank at the end of the
    stage, printed once by rank 0, naming the rank that failed first when it is not rank 0."""
    error = None
    try:
        yield
    except config.UserError as e:
        error = e
    if world_size == 1:
        if error is not None:
            raise error
        return
    errors = [None] * world_size
    dist.all_gather_object(errors, None if error is None else (type(error), str(error)))
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, (kind, message) = failed[0]
        raise kind(message if r == 0 else f'rank {r}: {message}', every_rank=True) from None


FAILED_KEY = 'rocket-clip/failed'  # set in the process group's store by a rank that stops on its own UserError


def peer_failed():
    """Whether another rank stopped on a purposeful error (and printed it), so that this rank's failed collective
    is only its echo."""
    try:
        return dist.distributed_c10d._get_default_store().check([FAILED_KEY])
    except Exception:  # no store (its host rank is gone): nothing is known
        return False


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- Optimizer and schedule ---
def param_groups(model, weight_decay):
    """AdamW groups (recipe §5.2): no weight decay for tensors with ndim < 2 (biases, norm affines, logit scales) and
    those a module's no_weight_decay() names (the OpenAI-style ViT's class token); the timm-style CLS token decays."""
    exempt = {id(getattr(m, name)) for m in model.modules() if hasattr(m, 'no_weight_decay')
              for name in m.no_weight_decay()}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in exempt else no_decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def lr_schedule(step, cfg, steps_per_epoch):
    """Learning rate of optimizer step `step` (recipe §5.3): linspace(lr_start, lr) over the warmup steps,
    both ends included, then a cosine from lr to lr_end over the remaining steps."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total)
    step = min(step, total - 1)  # recipe §8.16: the index never runs past the end
    if step < warmup:
        return cfg.lr_start + (cfg.lr - cfg.lr_start) * step / max(warmup - 1, 1)
    progress = (step - warmup) / (total - warmup)
    return cfg.lr_end + 0.5 * (cfg.lr - cfg.lr_end) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def clamp_logit_scales(model, max_scale):
    """Keep exp(logit_scale) in [1, max_scale] (recipe §1.6), in log space, after every optimizer step."""
    for p in (model.logit_scale, getattr(model, 'l2l_logit_scale', None)):
        if p is not None:
            p.clamp_(0, math.log(max_scale))


@torch.no_grad()
def ema_update(momentum_model, model, tau):
    """BYOLIP (recipe §1.8): theta_m <- tau * theta_m + (1 - tau) * theta for parameters only; buffers
    (BN running statistics) evolve from the momentum model's own train-mode forwards."""
    for p_m, p in zip(momentum_model.parameters(), model.parameters()):
        p_m.lerp_(p.detach(), 1 - tau)


# --- Checkpoints ---
STALE_TMP = re.compile(r'\.checkpoint(_\d+)?\.pt\.\d+\.tmp')  # config.TMP_NAME of a checkpoint whose save was killed
def rng_state(device):
    """This process's RNG states as tensors and plain Python data (loadable with weights_only=True); the CUDA
    state only for a run on CUDA (asking for it elsewhere would open a CUDA context on GPU 0)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'python': random.getstate(), 'numpy': [name, keys.tolist(), pos, has_gauss, gauss],
            'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None}


def set_rng_state(state):
    random.setstate(state['python'])
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if state['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def save_checkpoint(cfg, model, optimizer, scaler, momentum_model, step, position, metrics, rank, world_size,
                    epoch_state=None):
    """Collective: gather every rank's RNG state and running epoch sums (epoch_state) to rank 0, which writes the
    checkpoint (write_checkpoint). Refuses (on every rank) to save non-finite weights."""
    device = next(model.parameters()).device
    finite = all(torch.isfinite(p).all() for m in (model, momentum_model) if m is not None for p in m.parameters())
    if all_reduce(torch.tensor(float(not finite), device=device), dist.ReduceOp.MAX).item():
        raise config.UserError(f"step {step}: the weights hold NaN/inf; not overwriting the last good checkpoint in "
                               f"{cfg.output_dir}; resume from it with a lower --lr", every_rank=True)
    states = [None] * world_size if rank == 0 else None
    if world_size > 1:
        dist.gather_object((rng_state(device), epoch_state), states, dst=0)
    else:
        states = [(rng_state(device), epoch_state)]
    if rank != 0:
        return
    ckpt = {'format': FORMAT, 'config': cfg.to_dict(), 'model': model.state_dict(),
            'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
            'momentum_model': momentum_model.state_dict() if momentum_model is not None else None,
            'epoch': position['epoch'], 'step': step, 'rng': [s[0] for s in states], 'data': position,
            'epoch_sums': [s[1] for s in states], 'metrics': metrics,
            'bpe_merges': checkpoint_merges(cfg.bpe_path)}  # the tokenizer travels with the weights
    write_checkpoint(ckpt, cfg.output_dir, cfg.keep_last)


def load_checkpoint(path, model, momentum_model, optimizer, scaler, rank, world_size, batch_size):
    """Restore training state in place; returns (step, data position, this rank's RNG state or None, this rank's
    running epoch sums or None)."""
    ckpt = read_resume(path)
    try:
        model.load_state_dict(ckpt['model'])
        if momentum_model is not None:
            momentum_model.load_state_dict(ckpt['momentum_model'])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise config.UserError(f"--resume={path}: its weights do not fit this config's model "
                               f"({str(e).splitlines()[0]}); resume with the config it was trained with") from None
    optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt['scaler']:  # empty when saved by a disabled scaler (a bf16, fp32 or CPU run)
        scaler.load_state_dict(ckpt['scaler'])
    position, rng, sums = ckpt['data'], ckpt['rng'], ckpt.get('epoch_sums')
    if (position.get('world_size'), position.get('batch_size')) != (world_size, batch_size):
        # the sampler's batches are laid out for the old world and batch size: restart the unfinished epoch
        position, rng, sums = {'epoch': position['epoch'], 'batch': 0}, None, None
        if rank == 0:
            print(f"resume: world or batch size changed; restarting epoch {position['epoch']} from its start")
    if rank == 0:
        print(f"resume: {path} at step {ckpt['step']}, epoch {position['epoch']}, batch {position['batch']}")
    return ckpt['step'], position, rng[rank] if rng is not None else None, sums[rank] if sums else None


def write_checkpoint(ckpt, output_dir, keep_last):
    """checkpoint.pt and a step-numbered copy in output_dir, keeping the last keep_last copies; a full disk raises
    one line saying what still loads."""
    out, step, saved = Path(output_dir), ckpt['step'], False
    try:
        config.atomic_save(ckpt, out / 'checkpoint.pt')
        saved = True

        def copy_into(f):
            with open(out / 'checkpoint.pt', 'rb') as src:
                shutil.copyfileobj(src, f, 1 << 24)
        # an independent file, not a hard link: damage done in place to checkpoint.pt (a truncating copy, a bad
        # block) must leave its numbered twin loadable, for the --resume that the corrupt-checkpoint error names
        config.atomic_write(out / f'checkpoint_{step:08d}.pt', copy_into, os.path.getsize(out / 'checkpoint.pt'))
    except OSError as e:
        if e.errno not in config.NO_SPACE:
            raise
        good = (f"{out}/checkpoint.pt holds step {step}" if saved else f"{out}/checkpoint.pt is unchanged and still "
                f"loads" if (out / 'checkpoint.pt').exists() else "no checkpoint was saved before")
        raise config.UserError(f"step {step}: {e.strerror}; {good}; free some space, then continue with "
                        f"--resume=auto") from None
    for old in sorted(out.glob('checkpoint_*.pt'))[:-keep_last]:
        old.unlink()


def find_resume(out, resume):
    """The checkpoint that --resume names (auto: out/checkpoint.pt if there is one), or None to start fresh."""
    if resume == 'auto':
        numbered = sorted(out.glob('checkpoint_*.pt'))
        if not (out / 'checkpoint.pt').exists() and numbered:  # starting over would delete them
            raise config.UserError(f"--resume=auto: {out} has no checkpoint.pt but holds {len(numbered)} numbered "
                            f"checkpoint(s); continue from the newest with --resume={numbered[-1]}")
        return out / 'checkpoint.pt' if (out / 'checkpoint.pt').exists() else None
    if resume and not Path(resume).is_file():
        raise config.UserError(f"--resume={resume}: no such checkpoint; give a checkpoint.pt path or auto")
    return Path(resume) if resume else None


def read_resume(path):
    """The checkpoint dict at `path`; when it does not load, one line naming the newest numbered copy that does."""
    try:
        return read_checkpoint(path)
    except (ValueError, config.UserError) as e:  # read_checkpoint's one-line refusals
        error = e
    for numbered in sorted(Path(path).parent.glob('checkpoint_*.pt'), reverse=True):
        try:
            step = read_checkpoint(numbered)['step']
        except (ValueError, config.UserError):
            continue
        if numbered.resolve() != Path(path).resolve():
            raise config.UserError(f"{error}; the newest numbered checkpoint that loads is step {step}: continue "
                            f"from it with --resume={numbered}") from None
    raise config.UserError(f"{error}; no numbered checkpoint beside it loads either: start over with --overwrite "
                    f"or another --output_dir") from None


# Config fields that shape the model and that a checkpoint's config (ours, or an import's) fixes
ARCH_FIELDS = ('vision', 'vision_width', 'vision_layers', 'vision_heads', 'patch_size', 'image_size', 'vit_style',
               'vision_act', 'text_width', 'text_layers', 'text_heads', 'text_act', 'context_length', 'embed_dim')
VIT_FIELDS = ARCH_FIELDS[1:8]


def maybe_init_weights(model, cfg, resume, master):
    """--init=PATH: the model weights of a checkpoint of ours or a released SLIP / CLIP 🚀 / open_clip one (fresh
    optimizer and schedule); heads the file lacks keep their initialisation and are listed. Skipped on resume."""
    if not cfg.init or resume is not None:
        return
    # a released file without an official model name does not tell its head counts: the run's are taken
    ckpt = read_checkpoint(cfg.init, defaults={k: getattr(cfg, k) for k in ('vision_heads', 'text_heads', 'bpe_path')})
    theirs = ckpt['config']
    fields = ['vision'] if theirs['vision'] != cfg.vision else [
        k for k in ARCH_FIELDS if k in theirs and (cfg.vision == 'vit' or k not in VIT_FIELDS)]
    differ = [k for k in fields if theirs[k] != getattr(cfg, k)]
    if differ:
        raise config.ConfigError(f"--init={cfg.init} holds another model than this config's: pass "
                                 + ' '.join(f"--{k}={theirs[k]}" for k in differ))
    state, own = {**ckpt['model'], **ckpt.get('extra_heads', {})}, model.state_dict()
    for key, value in state.items():
        if key in own and value.shape != own[key].shape:
            raise config.ConfigError(f"--init={cfg.init}: {key} is {tuple(value.shape)} in the file but "
                                     f"{tuple(own[key].shape)} in this model; match it (vocabulary: --bpe_path; "
                                     f"heads: --mlp_hidden_dim and the method's widths)")
    loaded = {k: v for k, v in state.items() if k in own}
    missing, _ = model.load_state_dict(loaded, strict=False)
    unused = sorted(set(state) - set(own))
    if master:
        print(f"init: model weights from {cfg.init} ({len(loaded)} tensors); fresh optimizer and schedule"
              + (f"; initialised here (not in the file): {_modules(missing)}" if missing else '')
              + (f"; not used by this model: {_modules(unused)}" if unused else ''))


def _modules(keys):
    """'image_heads.h, l2l_logit_scale' for the keys of those modules' tensors."""
    return ', '.join(dict.fromkeys(k.rsplit('.', 2)[0] if '.' in k else k for k in keys))


def check_output_dir(cfg):
    """Refuse an output_dir that holds another run unless --resume or --overwrite; returns the checkpoint
    to resume from (or None). Reads only: init_output_dir writes once every rank has passed the checks."""
    out = Path(cfg.output_dir)
    check_writable(out)
    saved = out / 'config.json'
    mine = json.loads(json.dumps(cfg.to_dict()))
    if not cfg.resume and not cfg.overwrite:
        theirs = json.loads(saved.read_text()) if saved.exists() else mine
        changed = sorted(k for k in set(mine) | set(theirs)
                         if k not in ('resume', 'overwrite') and mine.get(k) != theirs.get(k))
        if changed:
            diff = ', '.join(f'{k}: {theirs.get(k)!r} -> {mine.get(k)!r}' for k in changed[:5])
            raise config.UserError(f"--output_dir={out} holds a run with another config ({diff}); pass --resume=auto "
                                   f"to continue it, --overwrite to start over, or choose another --output_dir")
        if (out / 'checkpoint.pt').exists():
            raise config.UserError(f"--output_dir={out} already holds checkpoint.pt; pass --resume=auto to continue "
                                   f"it or --overwrite to start over")
    return find_resume(out, cfg.resume)


def check_writable(out):
    """One line, before any work, when the output dir cannot be made or written: a file, under a file, read-only."""
    existing = next(p for p in [out, *out.parents] if p.exists())
    where = f"--output_dir={out}" + (f" (under {existing})" if existing != out else "")
    if not existing.is_dir():
        raise config.UserError(f"{where}: {existing} is a file, not a folder; choose another --output_dir")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise config.UserError(f"{where}: {existing} is on a read-only file system; choose another --output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise config.UserError(f"{where}: {existing} is not writable by this user; choose another --output_dir")


def init_output_dir(cfg, resume, rank):
    """Rank 0 writes config.json; a fresh run first removes the checkpoints and log of an overwritten one; every run
    removes the temporary files of a save that was killed."""
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.iterdir():
            if STALE_TMP.fullmatch(stale.name):
                stale.unlink(missing_ok=True)
        if resume is None:  # a fresh run: stale checkpoints and logs of an overwritten run would mix in
            for old in [*out.glob('checkpoint*.pt'), out / 'log.jsonl', out / SKIPPED_LOG]:
                old.unlink(missing_ok=True)
        config.save_json(cfg, out / 'config.json')


# --- Signals ---
STOP = {'signal': 0}  # set by the handler, acted on at the next optimizer-step boundary


def request_stop(signum, frame):
    """A stop at the next step; a second Ctrl-C exits at once (the checkpoints written so far are whole: atomic)."""
    if signum == signal.SIGINT and STOP['signal'] == signal.SIGINT:
        os.write(2, b"error: interrupted twice: exiting now, without saving\n")
        os._exit(128 + signal.SIGINT)  # loader workers end with it (data.init_worker)
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
    for log, _ in TRACKERS:
        log(record)


SKIPPED_LOG = 'skipped.jsonl'  # every unreadable sample: {"step", "sample": where, "reason": why}, one per line
SHOWN = 5  # unreadable samples named per log interval in its record and line


def write_skipped(cfg, loop, rank, world_size):
    """Append the unreadable samples of every rank met since the last call to output_dir/skipped.jsonl (rank 0),
    one line each, tagged with this step; returns them ([where, why] pairs; every rank gets all)."""
    files, loop.skipped_files = loop.skipped_files, []
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, files)
        files = [f for part in parts for f in part]
    if rank == 0 and files:  # appended lines: a kill tears at most the last one, which a resume drops (trim_log)
        with open(Path(cfg.output_dir) / SKIPPED_LOG, 'a') as f:
            f.write(''.join(json.dumps({'step': loop.step, 'sample': where, 'reason': why}) + '\n'
                            for where, why in files))
    return files


# --- Experiment tracking ---
# --report_to=tensorboard,wandb: every log.jsonl record mirrored, its numbers named <type>/<key>[/<key>...] as there
TRACKER_PACKAGES = {'tensorboard': 'tensorboard', 'wandb': 'wandb'}  # tracker -> the pip package it needs
TRACKERS = []  # (log(record), close()) of the trackers rank 0 has open


def check_trackers(cfg):
    """One line naming the pip package of a --report_to tracker that is not installed (before anything is written)."""
    for name in filter(None, cfg.report_to.split(',')):
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise config.UserError(f"--report_to={name} needs the {TRACKER_PACKAGES[name]} package: pip install "
                                   f"{TRACKER_PACKAGES[name]}")


def scalars(record, prefix=None):
    """{name: number} of a log record: '<type>/<key>', nested dicts (the evaluation) joined by '/'."""
    prefix = record['type'] if prefix is None else prefix
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f'{prefix}/{key}'))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != 'type':
            out[f'{prefix}/{key}'] = value
    return out


def open_trackers(cfg, resume):
    """Open the --report_to trackers (rank 0), imported only here; a fresh run starts a fresh TensorBoard log."""
    for name in filter(None, cfg.report_to.split(',')):
        if name == 'tensorboard':
            from torch.utils.tensorboard import SummaryWriter
            if resume is None:
                shutil.rmtree(Path(cfg.output_dir) / 'tensorboard', ignore_errors=True)
            writer = SummaryWriter(str(Path(cfg.output_dir) / 'tensorboard'))

            def log(record, writer=writer):
                for key, value in scalars(record).items():
                    writer.add_scalar(key, value, record['step'])
                writer.flush()
            TRACKERS.append((log, writer.close))
        else:
            import wandb
            run = wandb.init(project='rocket-clip', name=Path(cfg.output_dir).name, dir=cfg.output_dir,
                             config=cfg.to_dict())
            TRACKERS.append((lambda record, run=run: run.log(scalars(record), step=record['step']), run.finish))


def close_trackers():
    while TRACKERS:
        TRACKERS.pop()[1]()


def trim_log(cfg, step):
    """On resume, drop the log and skipped-sample records of the steps past the checkpoint's (they are logged again)
    and a line torn by a kill, so that log.jsonl holds one record per step and skipped.jsonl each unreadable sample
    once. A 'nonfinite' record of step s is the update s -> s + 1."""
    for path in (Path(cfg.output_dir) / 'log.jsonl', Path(cfg.output_dir) / SKIPPED_LOG):
        if not path.exists():
            continue
        keep = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get('step', 0) + (record.get('type') == 'nonfinite') <= step:
                    keep.append(line + '\n')
        config.atomic_write(path, lambda f: f.write(''.join(keep).encode()))


# --- Gradient caching ---
def caches_gradients(cfg):
    """Whether a step encodes each process's batch in chunks (--chunk below --batch_size)."""
    return 0 < cfg.chunk < cfg.batch_size


def cached_forward_backward(cfg, model, momentum_model, scaler, autocast, inputs):
    """Gradient caching (Gao et al. 2021) of one micro-batch; returns its loss dict. 1: each chunk's trunk features
    without a graph, the RNG state saved before each chunk; 2: every head and the whole objective (gathers across ranks
    included) on the batch's features as leaves, backward: the heads' gradients and the features'; 3: each chunk
    encoded again with a graph under its saved RNG state (the same dropout masks), its rows of the feature gradients
    back-propagated. The same loss and gradients as one pass, but for the trunks' BatchNorm: a batch per chunk."""
    weak, tokens, strong = inputs
    rows = [slice(i, i + cfg.chunk) for i in range(0, len(weak), cfg.chunk)]
    chunks = [(weak[r], tokens[r], [view[r] for view in strong]) for r in rows]
    states, parts = [], []
    with torch.no_grad(), autocast:
        with restore_buffers(model):  # the BN running statistics count each chunk once: in phase 3
            for chunk in chunks:
                states.append(rng_state(weak.device))
                parts.append(model.trunks(*chunk))
        target = None
        if momentum_model is not None:  # BYOLIP's targets: its trunks per chunk, its heads on the whole batch
            target = momentum_model.project(*join_chunks([momentum_model.trunks(*chunk) for chunk in chunks]))
    after = rng_state(weak.device)
    f_image, f_text = join_chunks(parts)
    features = [f.requires_grad_() for f in f_image + f_text]
    with autocast:
        losses = compute_loss(model.project(f_image, f_text), cfg, target)
    scaler.scale(losses['loss'] / cfg.update_freq).backward()  # the feature gradients carry the scale
    for chunk, state, r in zip(chunks, states, rows):
        set_rng_state(state)
        with autocast:
            images, texts = model.trunks(*chunk)
        pairs = [(f, cached.grad[r]) for f, cached in zip(images + texts, features) if cached.grad is not None]
        torch.autograd.backward(*zip(*pairs))
    set_rng_state(after)  # as after one pass: the next draws follow phase 1's (and the momentum model's)
    return losses


def join_chunks(parts):
    """[(images, texts) of each chunk] -> (images, texts) of the batch: 1+A x (B, width), chunks concatenated."""
    return tuple([torch.cat(view) for view in zip(*side)] for side in zip(*parts))


def average_gradients(model, world_size):
    """DDP's work for gradient caching, whose heads and trunks get their gradients in separate backward passes, which
    DDP's reducer cannot follow: the gradients' mean over ranks (once per step, one flat buffer), and rank 0's buffers
    (BatchNorm running statistics, per rank on CPU) on every rank, as DDP broadcasts them."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # every rank sends the same layout
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world_size
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)


# --- Training ---
@dataclass
class Sums:
    """Running sums of one log interval or one epoch on this rank: loss terms (on device, no host sync), micro-batches
    and unreadable samples skipped."""
    losses: dict = field(default_factory=dict)
    micro: int = 0
    skipped: torch.Tensor = None


def new_sums(device):
    return Sums(skipped=torch.zeros((), dtype=torch.long, device=device))


@dataclass
class Loop:
    """Where the loop is and what it has counted: the step, the data position, the running sums and the timers."""
    step: int = 0
    epoch: int = 0
    batch: int = 0  # micro-batches read this epoch
    log: Sums = None
    epoch_sums: Sums = None
    nonfinite_run: int = 0
    nonfinite_total: int = 0
    data_time: float = 0.0
    t_log: float = 0.0
    t_data: float = 0.0
    t_start: float = 0.0  # when this process's loop began, at step first_step (for the ETA)
    first_step: int = 0
    bad_base: tuple = (0, 0)  # (skipped, read) this epoch, all ranks, when bad data last stopped the run
    skipped_files: list = field(default_factory=list)  # [where, why] of this rank's unreadable samples not yet written
    metrics: dict = field(default_factory=dict)  # the last record, saved in the checkpoint


def epoch_state(loop):
    """This rank's running epoch sums as plain data for the checkpoint, so that a resumed epoch logs the same
    record as an uninterrupted one."""
    s = loop.epoch_sums
    return {'losses': {k: v.cpu() for k, v in s.losses.items()}, 'micro': s.micro, 'skipped': int(s.skipped),
            'bad_base': list(loop.bad_base)}


def restore_epoch_state(loop, state, device):
    loop.epoch_sums = Sums({k: v.to(device) for k, v in state['losses'].items()}, state['micro'],
                           torch.tensor(state['skipped'], dtype=torch.long, device=device))
    loop.bad_base = tuple(state['bad_base'])


def build_training(cfg, vocab_size, device, rank, world_size, resume=None):
    """(model with the --init weights unless resuming, its momentum copy for a row with momentum (BYOLIP), AdamW,
    GradScaler), initialised identically on every rank (recipe §5.5); rank 0 prints the model line."""
    seed_everything(cfg.seed)
    model = build_model(cfg, vocab_size, verbose=rank == 0).to(device)
    maybe_init_weights(model, cfg, resume, rank == 0)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if sync_batchnorm(device, world_size):  # recipe §1.2, 1.5: ResNet and MLP-head BN see the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    momentum_model = copy.deepcopy(model).requires_grad_(False) if config.METHODS[cfg.method].momentum else None
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, fused=device.type == 'cuda')
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg, device) == torch.float16)
    return model, momentum_model, optimizer, scaler


def sync_batchnorm(device, world_size):
    """Whether BatchNorm becomes SyncBatchNorm: across GPUs only (PyTorch's needs GPU tensors; on CPU each rank keeps
    its own BN)."""
    return world_size > 1 and device.type == 'cuda'


def compile_parts(model):
    """The modules --compile compiles: the whole model, or where it holds SyncBatchNorm (multi-GPU BN), which breaks
    the graph at every BN call, the towers without it (the text tower, a ViT); BN heads and a ResNet stay eager."""
    def synced(module):
        return any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())
    return [model] if not synced(model) else [m for m in (model.visual, model.text) if not synced(m)]


def wrap_model(model, cfg, device, world_size, rank=0):
    """The module the step calls: compiled in place when asked (compile_parts), DDP across ranks."""
    if cfg.compile:
        parts = compile_parts(model)
        for part in parts:
            part.compile()
        if parts != [model] and rank == 0:
            names = [name for name, m in model.named_children() if any(m is p for p in parts)]
            print(f"train: --compile with SyncBatchNorm compiles {' and '.join(names) or 'nothing'}; the modules "
                  f"holding SyncBatchNorm run eagerly", flush=True)
    if world_size > 1 and not caches_gradients(cfg):  # gradient caching averages the gradients itself
        # every method gives all its parameters a gradient (tested), so plain DDP: not the paper's static_graph,
        # which breaks under no_sync (pytorch/pytorch#143580), nor a per-step search for unused parameters
        return DDP(model, device_ids=[device.index] if device.type == 'cuda' else None, bucket_cap_mb=200)
    return model


def start_epoch(loader, loop):
    """An iterator over the loader from the loop's position (the sampler skips the batches already read)."""
    loader.sampler.set_epoch(loop.epoch, loop.batch)
    return iter(loader)


def to_device(batch, cfg, device):
    """(weak images, tokens, [strong images]) of a batch on the device."""
    weak, strong = finish_views(batch, cfg, device)  # --augment_device=cuda: colour, blur, flip run here
    tokens = batch['tokens'].to(device, non_blocking=True)
    if cfg.channels_last:
        weak, *strong = (x.to(memory_format=torch.channels_last) for x in (weak, *strong))
    return weak, tokens, strong


def forward_backward(cfg, train_model, model, momentum_model, scaler, autocast, inputs, last_micro):
    """One micro-batch (weak, tokens, strong): its loss dict; its gradients, scaled and / update_freq, added to the
    parameters'. In chunks when cfg.chunk asks (gradient caching), else in one pass through train_model."""
    if caches_gradients(cfg):
        return cached_forward_backward(cfg, model, momentum_model, scaler, autocast, inputs)
    # deviation from recipe §5.4: gradients are all-reduced on the last micro-step only
    sync = train_model.no_sync() if isinstance(train_model, DDP) and not last_micro else contextlib.nullcontext()
    with sync:
        with autocast:
            out = train_model(*inputs)
            target = None
            if momentum_model is not None:
                with torch.no_grad():
                    target = momentum_model(*inputs)
            losses = compute_loss(out, cfg, target)
        scaler.scale(losses['loss'] / cfg.update_freq).backward()
    return losses


def train_step(cfg, train_model, model, momentum_model, optimizer, scaler, autocast, data_iter, lr, loop, world_size):
    """One optimizer step over cfg.update_freq micro-batches (recipe §5.4), skipped when the loss is non-finite on
    any rank; returns whether any rank asked to stop (a signal)."""
    device = next(model.parameters()).device
    for group in optimizer.param_groups:
        group['lr'] = lr
    step_loss = torch.zeros((), device=device)
    for micro in range(cfg.update_freq):
        batch = next(data_iter)
        loop.batch += 1
        loop.data_time += time.perf_counter() - loop.t_data
        weak, tokens, strong = to_device(batch, cfg, device)
        skipped = batch['skipped'].to(device, non_blocking=True).sum()  # pinned: no copy that blocks the host
        loop.skipped_files += [f for names in batch['skipped_files'] if names != '[]' for f in json.loads(names)]
        losses = forward_backward(cfg, train_model, model, momentum_model, scaler, autocast, (weak, tokens, strong),
                                  last_micro=micro == cfg.update_freq - 1)
        step_loss += losses['loss'].detach()
        for sums in (loop.log, loop.epoch_sums):
            accumulate(sums.losses, losses)
            sums.micro += 1
            sums.skipped += skipped
        loop.t_data = time.perf_counter()
    if caches_gradients(cfg) and world_size > 1:
        average_gradients(model, world_size)

    # the one host sync per step: agree across ranks on a non-finite loss and on a stop request (torch.full: a fill on
    # the device, where torch.tensor would be a blocking host-to-device copy)
    flags = torch.stack([(~torch.isfinite(step_loss)).float(), torch.full((), float(STOP['signal']), device=device)])
    nonfinite, stopping = (v > 0 for v in all_reduce(flags, dist.ReduceOp.MAX).tolist())
    if nonfinite:  # skip the update: no optimizer or scaler step, no EMA
        optimizer.zero_grad(set_to_none=True)
        skip_nonfinite(cfg, loop, lr, rank=dist.get_rank() if dist.is_initialized() else 0)
    else:
        loop.nonfinite_run = 0
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if momentum_model is not None:
            ema_update(momentum_model, model, cfg.momentum_tau)
        clamp_logit_scales(model, cfg.logit_scale_max)
    loop.step += 1
    return stopping


def skip_nonfinite(cfg, loop, lr, rank):
    """Count a skipped update; stop after cfg.max_nonfinite in a row (every rank agrees: the flag was all-reduced)."""
    loop.nonfinite_run, loop.nonfinite_total = loop.nonfinite_run + 1, loop.nonfinite_total + 1
    if rank == 0:
        write_log(cfg, {'type': 'nonfinite', 'step': loop.step, 'epoch': loop.epoch, 'lr': lr})
        print(f"step {loop.step}: non-finite loss, update skipped ({loop.nonfinite_run} in a row)", file=sys.stderr)
    if loop.nonfinite_run >= cfg.max_nonfinite:
        ckpt = Path(cfg.output_dir) / 'checkpoint.pt'
        restart = f"Resume from {ckpt}" if ckpt.exists() else "No checkpoint was saved yet: start over (--overwrite)"
        raise config.UserError(f"{loop.nonfinite_run} non-finite losses in a row at step {loop.step}; stopping. "
                               f"{restart} with a lower --lr or --precision=bf16/fp32, or raise --max_nonfinite",
                               every_rank=True)


def log_train(cfg, loop, model, lr, last_step, micro_per_epoch, device, rank, world_size, bar):
    """Write the log interval's 'train' record (means over its micro-batches and all ranks) and show it; returns the
    unreadable samples of this epoch so far, all ranks."""
    sums = loop.log
    elapsed = time.perf_counter() - loop.t_log
    skipped, skipped_epoch = all_reduce(torch.stack([sums.skipped, loop.epoch_sums.skipped])).tolist()
    files = write_skipped(cfg, loop, rank, world_size)
    record = {'type': 'train', 'step': loop.step, 'epoch': loop.epoch + loop.batch / micro_per_epoch, 'lr': lr,
              **mean_over_ranks(sums.losses, sums.micro), 'logit_scale': model.logit_scale.exp().item(),
              'samples_per_s': sums.micro * cfg.batch_size * world_size / elapsed,
              'data_time': loop.data_time / sums.micro, 'peak_mem_gb': peak_memory_gb(device),
              'skipped': skipped, 'nonfinite_steps': loop.nonfinite_total,
              **({'skipped_files': [where for where, _ in files[:SHOWN]]} if files else {})}
    loop.metrics = record
    if rank == 0:
        write_log(cfg, record)
        show_progress(record, loop, last_step, bar)
        if files:
            with tqdm.external_write_mode():
                print(f"step {loop.step}: {skipped} unreadable sample(s) skipped: " +
                      ', '.join(f"{where} ({why.split(':')[0]})" for where, why in files[:SHOWN]) +
                      (' ...' if len(files) > SHOWN else '') + f"; each with its reason in "
                      f"{Path(cfg.output_dir) / SKIPPED_LOG}", flush=True)
    loop.log, loop.data_time, loop.t_log = new_sums(device), 0.0, time.perf_counter()
    return skipped_epoch


def show_progress(record, loop, last_step, bar):
    """The bar's figures on a terminal; elsewhere (a file, SLURM, nohup) one plain line per log interval."""
    if bar is not None:
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", scale=f"{record['logit_scale']:.1f}",
                        sps=f"{record['samples_per_s']:.0f}")
        return
    eta = (time.perf_counter() - loop.t_start) / max(loop.step - loop.first_step, 1) * (last_step - loop.step)
    print(f"step {loop.step}/{last_step}  epoch {record['epoch']:.2f}  loss {record['loss']:.4f}  "
          f"lr {record['lr']:.2e}  scale {record['logit_scale']:.1f}  {record['samples_per_s']:.0f} samples/s  "
          f"ETA {tqdm.format_interval(eta)}", flush=True)


def check_data(cfg, loop, skipped, world_size, epoch_end=False):
    """The error that stops training when more than --bad_sample_threshold of the samples read this epoch (since the
    last stop; mid-epoch once --bad_sample_min are read) were unreadable, else None; skipped: all ranks' so far."""
    read = samples_read(loop.epoch_sums.micro * cfg.batch_size * world_size, skipped, cfg)
    base_skipped, base_read = loop.bad_base
    if read - base_read < (1 if epoch_end else cfg.bad_sample_min):
        return None
    try:
        check_bad_fraction(skipped - base_skipped, read - base_read, cfg)
    except config.UserError as e:  # every rank decides alike on all-reduced counts
        loop.bad_base = (skipped, read)  # a resumed run judges the data it reads after this stop
        return config.UserError(f"{e}, then continue from the checkpoint saved at step {loop.step} with "
                                f"--resume=auto", every_rank=True)
    return None


def end_epoch(cfg, loop, model, tokenizer, rank, world_size, stopping, eval_names):
    """Write the epoch's record (mean training losses, skipped samples, the zero-shot evaluation of eval_names when
    due) and move the loop to the next epoch; returns the bad-data error of check_data, or None."""
    sums = loop.epoch_sums
    total_skipped = int(all_reduce(sums.skipped.clone()).item())
    bad = check_data(cfg, loop, total_skipped, world_size, epoch_end=True)
    record = {'type': 'epoch', 'epoch': loop.epoch + 1, 'step': loop.step, 'skipped': total_skipped,
              **{f'train_{k}': v for k, v in mean_over_ranks(sums.losses, sums.micro).items()}}
    if eval_names and (loop.epoch + 1) % cfg.eval_every == 0 and not stopping and bad is None:
        record['test'] = evaluate(model, tokenizer, cfg, rank, world_size, eval_names)  # {dataset: {metric: value}}
    loop.metrics = record
    if rank == 0:
        write_log(cfg, record)
        with tqdm.external_write_mode():
            print(f"epoch {loop.epoch + 1}: train loss {record['train_loss']:.4f}, {total_skipped} samples skipped",
                  flush=True)
            if 'test' in record:
                print_table([{'checkpoint': cfg.output_dir, 'epoch': loop.epoch + 1, 'results': record['test']}])
    loop.epoch, loop.batch, loop.epoch_sums, loop.bad_base = loop.epoch + 1, 0, new_sums(sums.skipped.device), (0, 0)
    return bad


def set_up(cfg, rank, world_size, device):
    """Checks and reads on every rank (nothing is written before every rank has passed them), then the output dir:
    (tokenizer, loader, steps per epoch, (model, momentum model, optimizer, scaler), loop, saved RNG state)."""
    with on_every_rank(world_size):
        resume = check_output_dir(cfg)
        check_trackers(cfg)
        tokenizer = build_tokenizer(cfg)
        loader = build_train_loader(cfg, tokenizer, rank, world_size)
        steps_per_epoch = len(loader) // cfg.update_freq
        if steps_per_epoch == 0:
            raise config.ConfigError(f"{len(loader)} batches per epoch is fewer than --update_freq={cfg.update_freq}; "
                                     f"lower --batch_size or --update_freq")
        parts = build_training(cfg, tokenizer.vocab_size, device, rank, world_size, resume)
        seed_everything(cfg.seed + rank)  # per-rank randomness from here on (recipe §5.5)
        loop, rng = Loop(log=new_sums(device), epoch_sums=new_sums(device)), None
        if resume is not None:
            loop.step, position, rng, state = load_checkpoint(resume, *parts, rank, world_size, cfg.batch_size)
            loop.epoch, loop.batch = position['epoch'], position['batch']
            if state is not None:
                restore_epoch_state(loop, state, device)
    init_output_dir(cfg, resume, rank)
    if rank == 0:
        if resume is not None:
            trim_log(cfg, loop.step)
        open_trackers(cfg, resume)
    return tokenizer, loader, steps_per_epoch, parts, loop, rng


def announce(cfg, loop, steps_per_epoch, last_step, amp_dtype, device, world_size):
    """Rank 0's start line (the global batch, per process, in chunks), and warnings: a paper recipe at another global
    batch than the paper's, a warmup that covers the whole run."""
    batch = cfg.batch_size * world_size
    chunks = f"in chunks of {cfg.chunk} (gradient caching)" if caches_gradients(cfg) else "in one pass"
    accumulated = f", {cfg.update_freq} accumulated per step" if cfg.update_freq > 1 else ''
    print(f"train: {world_size} process(es) on {device}, {precision_note(cfg, device, amp_dtype)}, {cfg.workers} "
          f"loader worker(s) + {cfg.threads} thread(s) per process, {steps_per_epoch} steps/epoch, steps {loop.step} "
          f"-> {last_step}, global batch {batch} = {world_size} x {cfg.batch_size} per process, {chunks}{accumulated}",
          flush=True)
    paper = config.RECIPES[cfg.dataset]['global_batch'] if cfg.dataset in config.PAPER_RECIPES else batch
    if batch != paper:
        print(f"train: warning: --dataset={cfg.dataset} is the paper's recipe at a global batch of {paper} (the set "
              f"of negatives; its lr was tuned for it), but this run's is {batch}; drop --batch_size/--global_batch to "
              f"run {paper} on any number of GPUs (--chunk bounds the memory)", flush=True)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if warmup >= last_step > loop.step:
        print(f"train: warning: the warmup (--warmup_epochs={cfg.warmup_epochs}, {warmup} steps) covers the whole "
              f"run of {last_step} steps: the learning rate never decays and ends at its peak at most; lower "
              f"--warmup_epochs", flush=True)


def precision_note(cfg, device, amp_dtype):
    """The start line's words on the precision and why: 'fp16 + GradScaler (auto: sm_70 has no native bf16)'."""
    name = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16 + GradScaler'}[amp_dtype]
    if cfg.precision != 'auto':
        return f"{name} (--precision={cfg.precision})"
    if device.type != 'cuda':
        return f"{name} (auto: CPU)"
    arch = 'sm_{}{}'.format(*torch.cuda.get_device_capability(device))
    return f"{name} (auto: {arch} {'has native bf16' if amp_dtype == torch.bfloat16 else 'has no native bf16'})"


def train(cfg, rank, world_size, device):
    """Set up, then the loop: batch -> train_step -> log -> epoch end -> maybe save."""
    amp_dtype = autocast_dtype(cfg, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    tokenizer, loader, steps_per_epoch, parts, loop, rng = set_up(cfg, rank, world_size, device)
    model, momentum_model, optimizer, scaler = parts
    micro_per_epoch = steps_per_epoch * cfg.update_freq  # recipe §8.16: a trailing partial step is dropped
    last_step = min(cfg.max_steps or math.inf, cfg.epochs * steps_per_epoch)
    train_model = wrap_model(model, cfg, device, world_size, rank)
    data_iter = start_epoch(loader, loop)
    if rng is not None:  # after iter(): a fresh iterator draws a seed that the saved run had already drawn
        set_rng_state(rng)
    if rank == 0:
        announce(cfg, loop, steps_per_epoch, last_step, amp_dtype, device, world_size)
    eval_names = epoch_datasets(cfg, print if rank == 0 else lambda *a, **k: None) if cfg.eval_every else []
    interactive = rank == 0 and sys.stdout.isatty() and sys.stderr.isatty()
    bar = tqdm(total=last_step, initial=loop.step, dynamic_ncols=True) if interactive else None
    loop.t_start = loop.t_log = loop.t_data = time.perf_counter()
    loop.first_step = loop.step
    model.train()
    stopping = False
    first = loop.step if loop.epoch < cfg.epochs else last_step  # a finished run trains no further
    for step in range(first, last_step):
        lr = lr_schedule(step, cfg, steps_per_epoch)
        stopping = train_step(cfg, train_model, model, momentum_model, optimizer, scaler, autocast, data_iter, lr,
                              loop, world_size)
        if bar is not None:
            bar.update(1)
        bad = None  # the error when too much of this epoch's data was unreadable
        if loop.step % cfg.log_every == 0 or loop.step == last_step:
            skipped = log_train(cfg, loop, model, lr, last_step, micro_per_epoch, device, rank, world_size, bar)
            bad = check_data(cfg, loop, skipped, world_size)
        epoch_end = loop.batch == micro_per_epoch
        if epoch_end:
            bad = end_epoch(cfg, loop, model, tokenizer, rank, world_size, stopping, eval_names) or bad
        done = stopping or bad is not None or loop.step >= last_step or loop.epoch >= cfg.epochs
        if epoch_end or done or (cfg.save_every and loop.step % cfg.save_every == 0):
            write_skipped(cfg, loop, rank, world_size)  # a resume never reads these samples again
            position = {'epoch': loop.epoch, 'batch': loop.batch, 'world_size': world_size,
                        'batch_size': cfg.batch_size}
            save_checkpoint(cfg, model, optimizer, scaler, momentum_model, loop.step, position, loop.metrics, rank,
                            world_size, epoch_state(loop))
        if bad is not None:  # after the save, so that --resume=auto continues once the data is fixed
            if dist.is_initialized():
                dist.barrier()  # no rank exits (and torchrun ends the others) before rank 0 has written it
            raise bad
        if done:
            break
        if epoch_end:
            data_iter = start_epoch(loader, loop)
    if bar is not None:
        bar.close()
    finish(cfg, loop, stopping, rank)


def finish(cfg, loop, stopping, rank):
    """Rank 0 says where the run stopped and why; every rank leaves the process group together."""
    if rank == 0:
        why = f"stopped by {signal.Signals(STOP['signal']).name if STOP['signal'] else 'a stop signal'} at" \
            if stopping else "stopped at"
        print(f"train: {why} step {loop.step}; checkpoint in {cfg.output_dir}/checkpoint.pt", flush=True)
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing; a peer leaving early aborts gloo's teardown
        dist.destroy_process_group()


@contextlib.contextmanager
def full_disk_is_one_line():
    """A write that fails for lack of space or on a read-only file system (the log, a cache) is one line, not a bug."""
    try:
        yield
    except OSError as e:
        if e.errno not in (*config.NO_SPACE, errno.EROFS):
            raise
        raise config.UserError(f"cannot write {e.filename or 'a file'}: {e.strerror}; free some space or choose "
                               f"another --output_dir") from None


def main(argv=None):
    """Train with the config of the command-line flags (see config.py / --help). Purposeful errors are
    config.UserError (printed as one line by config.run_cli); under torchrun each is printed once."""
    cfg = config.parse_args(argv, datasets=READERS)
    rank, world_size, device = config.setup_distributed(cfg)
    # SIGTERM/SIGUSR1 (SLURM before pre-emption) and a first Ctrl-C save a checkpoint at the next step boundary and
    # exit 0. Installed first, so that torchrun's SIGTERM, sent to every rank when one fails, cannot cut off this
    # rank's own error message (kept until exit under torchrun); loader workers ignore them (data.init_worker)
    STOP['signal'] = 0
    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        with full_disk_is_one_line():
            train(cfg, rank, world_size, device)
    except config.UserError as e:
        if world_size > 1 and not e.every_rank:  # this rank alone: the others will see their collectives fail
            with contextlib.suppress(Exception):
                dist.distributed_c10d._get_default_store().set(FAILED_KEY, str(rank))
        raise
    except Exception:
        if world_size > 1 and peer_failed():  # a failed collective, echoing the error that the failed rank printed
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(1)  # not sys.exit: tearing down a process group whose peer is gone can abort (SIGABRT)
        raise
    finally:
        close_trackers()
        if world_size == 1:
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)


if __name__ == '__main__':
    config.run_cli(main)
