"""What one call asks of a device: ATen ops, host-to-device copies (the blocking ones apart), device-to-host syncs and
collectives, counted with torch's dispatch modes. On the 'meta' device, which takes a GPU's code paths without one, a
CPU -> meta copy stands for a host-to-device copy, and a read of a meta tensor (.item(), .tolist(), bool()) counts as
a sync and reads zeros, so code that reads values runs through. On the CPU, host and device are one: syncs count the
host's reads of any tensor's values (what would wait for a GPU, were the tensor there).

python -m bench.dispatch [--batches=32,128,256] [--start=f4c13f9]
The step-side augment.finish_views of the cc3m recipe (1 weak + 2 strong views at 224 px) under the counter, on the
CPU and on 'meta' (and CUDA when present), at each batch size: the code at --start (git show) against this checkout's;
then the bytes of images a batch of 128 hands from the loader workers to the step, with --augment_device=cpu and cuda.
With CUDA: finish_views's samples/s before and after, and its views against the same batched kernels on the CPU,
under training's TF32 setting.
"""
import contextlib
import importlib.util
import io
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench import exit_on_help

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parents[1]


# --- The counter ---
@dataclass
class Counts:
    """What a call did: ops touching the device by ATen name, ops on CPU tensors alone, host-to-device copies (and how
    many of them block the host), syncs (device-to-host copies, reads of device scalars), collectives by name."""
    ops: Counter = field(default_factory=Counter)
    host_ops: int = 0
    copies: int = 0
    blocking_copies: int = 0
    syncs: int = 0
    collectives: Counter = field(default_factory=Counter)

    @property
    def device_ops(self):
        return sum(self.ops.values())


def copy_ends(func, args, kwargs):
    """(source device type, destination device type, non_blocking) of a copy op, else None."""
    if func is aten._to_copy.default:
        src = args[0].device.type
        return src, torch.device(kwargs.get('device') or args[0].device).type, kwargs.get('non_blocking', False)
    if func is aten.copy_.default:
        return args[1].device.type, args[0].device.type, args[2] if len(args) > 2 else kwargs.get('non_blocking', False)
    return None


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counts, device):
        super().__init__()
        self.counts, self.device = counts, device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, c = kwargs or {}, self.counts
        if func.namespace in ('c10d', '_c10d_functional'):
            c.collectives[func.overloadpacket.__name__] += 1
            return func(*args, **kwargs)
        ends = copy_ends(func, args, kwargs)
        if self.device != 'cpu' and ends and ends[:2] == ('cpu', self.device):
            c.copies += 1
            c.blocking_copies += not ends[2]
        if self.device != 'cpu' and ends and ends[:2] == (self.device, 'cpu'):
            c.syncs += 1
            if self.device == 'meta':  # no data to copy: zeros stand for it
                out = torch.zeros(args[0].shape, dtype=kwargs.get('dtype') or args[0].dtype)
                return args[0].copy_(out) if func is aten.copy_.default else out
        if func is aten._local_scalar_dense.default and args[0].device.type == self.device != 'cpu':
            c.syncs += 1
            if self.device == 'meta':
                return False if args[0].dtype == torch.bool else 0 if not args[0].is_floating_point() else 0.0
        out = func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == self.device for t in tensors):
            c.ops[func.overloadpacket.__name__] += 1
        else:
            c.host_ops += 1
        return out


READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__}


class _FunctionCounter(TorchFunctionMode):
    """What happens below the dispatcher, where no dispatch mode sees it: torch.tensor(data, device=...) copying to
    the device, and (on the CPU) the host reading values."""

    def __init__(self, counts, device):
        super().__init__()
        self.counts, self.device = counts, device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in (torch.tensor, torch.as_tensor) and self.device != 'cpu' and not isinstance(args[0], torch.Tensor)
                and torch.device(kwargs.get('device') or 'cpu').type == self.device):
            self.counts.copies += 1
            self.counts.blocking_copies += 1
        if self.device == 'cpu' and func in READS:
            self.counts.syncs += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count(device):
    """with count('meta') as counts: ... -- counts what the block asks of device (a device type: cpu, meta, cuda)."""
    counts = Counts()
    with _FunctionCounter(counts, device), _DispatchCounter(counts, device):
        yield counts


# --- The bench: finish_views before and after ---
def module_at(commit, name, tmp):
    """A module of this repository as it was at commit (git show), imported under another name."""
    path = Path(tmp) / f'{name}_{commit}.py'
    path.write_text(subprocess.run(['git', 'show', f'{commit}:{name}.py'], cwd=ROOT, check=True,
                                   capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location(f'{name}_{commit}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_batch(augment, cfg, images):
    """A --augment_device=cuda batch as the loader makes it with this augment module (its collate, rebuilt for the
    older packing of images, sizes, boxes and parameter dicts)."""
    import data as D
    views = augment.ImageViews(cfg)
    samples = [dict(zip(('images', 'boxes', 'photometric'), views.draw_for_step(img, torch.Generator().manual_seed(i))),
                    tokens=torch.zeros(3, 8, dtype=torch.long)) for i, img in enumerate(images)]
    if hasattr(augment, 'pack_views'):
        return D.collate(samples)
    parts = [s.pop('images') for s in samples]
    for s in samples:
        s['strong_params'] = s.pop('photometric')
    batch = torch.utils.data.default_collate(samples)
    batch['boxes'][:, :, 0] += torch.tensor([0] + [len(i) for i in parts[:-1]]).cumsum(0)[:, None]
    batch['pixels'], batch['image_sizes'] = augment.pack_images([x for i in parts for x in i])
    return batch


def finish_counts(augment, batch, cfg, device):
    augment.finish_views(batch, cfg, torch.device(device))  # constants made once per device: not the step's
    with count(device) as counts:
        augment.finish_views(batch, cfg, torch.device(device))
    return counts


def samples_per_second(augment, batch, cfg, calls=5):
    augment.finish_views(batch, cfg, torch.device('cuda'))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        augment.finish_views(batch, cfg, torch.device('cuda'))
    torch.cuda.synchronize()
    return calls * len(batch['tokens']) / (time.perf_counter() - start)


def cuda_views_against_cpu(augment, batch, cfg):
    """(largest difference, share of values off by over 1e-4) of the normalised views made on CUDA and by the same
    batched kernels on the CPU."""
    gpu = augment.finish_views(batch, cfg, torch.device('cuda'))
    cpu_kernels, augment.batched_kernels = augment.batched_kernels, lambda device: True
    try:
        cpu = augment.finish_views(batch, cfg, torch.device('cpu'))
    finally:
        augment.batched_kernels = cpu_kernels
    diff = torch.cat([(g.cpu() - c).abs().flatten() for g, c in zip([gpu[0], *gpu[1]], [cpu[0], *cpu[1]])])
    return diff.max().item(), (diff > 1e-4).float().mean().item()


def worker_bytes(augment, cfg, images):
    """Bytes of images in one --augment_device=cpu batch: the workers' views, stacked."""
    views = augment.ImageViews(cfg)
    out = [views(img, torch.Generator().manual_seed(i)) for i, img in enumerate(images)]
    return sum(w.nbytes + sum(s.nbytes for s in strong) for w, strong in out)


def main(argv):
    exit_on_help(argv, __doc__)
    if any(not a.startswith('--') or '=' not in a for a in argv):
        sys.exit('usage: python -m bench.dispatch [--batches=32,128,256] [--start=f4c13f9]')
    args = dict(a[2:].split('=', 1) for a in argv)
    sizes, start = [int(b) for b in args.get('batches', '32,128,256').split(',')], args.get('start', 'f4c13f9')
    from PIL import Image

    import augment
    from bench.augment import make_jpegs
    from config import Config, resolve
    cfg = resolve({'dataset': 'cc3m', 'augment_device': 'cuda'}, verbose=False)
    jpegs = make_jpegs(16)
    images = [Image.open(io.BytesIO(jpegs[i % len(jpegs)])) for i in range(max(sizes + [128]))]
    for img in images:
        img.load()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        before = module_at(start, 'augment', tmp)
        print(f"finish_views, cc3m recipe (1 weak + {cfg.num_augs} strong views, {cfg.image_size} px), 500x375 "
              f"JPEGs: ops on the device (+ host ops) / host-to-device copies (blocking) / syncs, {start} -> this "
              f"checkout")
        for b in sizes:
            batches = {name: step_batch(module, cfg, images[:b]) for name, module in (('at start', before),
                                                                                       ('now', augment))}
            for device in ('cpu', 'meta') + ('cuda',) * torch.cuda.is_available():
                row = []
                for name, module in (('at start', before), ('now', augment)):
                    c = finish_counts(module, batches[name], cfg, device)
                    row.append(f"{c.device_ops:6d} (+{c.host_ops:4d}) / {c.copies:3d} ({c.blocking_copies:3d}) / "
                               f"{c.syncs}")
                print(f"  B = {b:3d}, {device:<4}  {row[0]}  ->  {row[1]}")
        n = 128
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision('high')  # as training sets it (TF32)
            rates = [samples_per_second(m, step_batch(m, cfg, images[:n]), cfg) for m in (before, augment)]
            largest, share = cuda_views_against_cpu(augment, step_batch(augment, cfg, images[:n]), cfg)
            print(f"on {torch.cuda.get_device_name()}, batch {n}: {rates[0]:.0f} -> {rates[1]:.0f} samples/s "
                  f"({rates[1] / rates[0]:.1f}x); views against the CPU's batched kernels: largest difference "
                  f"{largest:.2e}, {100 * share:.3f}% of values over 1e-4")
        cpu = Config(**{**cfg.__dict__, 'augment_device': 'cpu'})
        old, new = worker_bytes(before, cpu, images[:n]), worker_bytes(augment, cpu, images[:n])
        packed = step_batch(augment, cfg, images[:n])
        step = sum(packed[k].nbytes for k in ('pixels', 'crops', 'photometric'))
        print(f"images in a batch of {n} handed to the step: --augment_device=cpu {old / 1e6:.1f} MB at {start}, "
              f"{new / 1e6:.1f} MB now ({old / new:.1f}x less); --augment_device=cuda {step / 1e6:.1f} MB")


if __name__ == '__main__':
    main(sys.argv[1:])
