"""The paths that differ on GPU nodes, shown on the CPU: the device choice with the device files and CUDA queries
mocked (an old driver, a V100 under a CUDA 13 build), the precision auto picks, SLURM launches (the README's job
script under torchrun with SIGUSR1, `srun python train.py`), loader workers against /dev/shm, BYOLIP's momentum
model under --init, the --compile decision with SyncBatchNorm and the probe's gather to rank 0."""
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import config
import data
import evaluate
import train
from bench.signals import job_script, processes_naming, train_steps
from model import FORMAT, autocast_dtype, build_model
from test_cli import ENV, ROOT, assert_one_error_line

HANG = 300  # seconds: a hang guard far above what these runs take on a busy 2-core machine
CU130_ARCHS = ['sm_75', 'sm_80', 'sm_86', 'sm_90', 'sm_100', 'sm_120']  # torch 2.14.1's CUDA 13.0 build


def tiny(*flags):
    return config.resolve(config._split_flags(['--vision_layers=1', '--text_layers=1', '--vision_width=32',
                                               '--text_width=32', '--embed_dim=16', '--mlp_hidden_dim=32', *flags]),
                          verbose=False)


# --- Device choice ---
@pytest.fixture
def gpu_node(monkeypatch):
    """A node with two NVIDIA device files and a loaded R535 driver; CUDA as the test sets it."""
    monkeypatch.setattr(config, 'nvidia_devices', lambda: ['/dev/nvidia0', '/dev/nvidia1'])
    monkeypatch.setattr(config, 'nvidia_driver', lambda: '535.104.05')
    monkeypatch.setattr(torch.version, 'cuda', '13.0')
    monkeypatch.setattr(torch.cuda, 'get_arch_list', lambda: CU130_ARCHS)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Tesla V100-SXM2-32GB')
    return monkeypatch


def test_an_old_driver_stops_auto_instead_of_training_on_the_cpu(gpu_node):
    gpu_node.setattr(torch.cuda, 'is_available', lambda: False)
    for flag in ('auto', 'cuda'):
        with pytest.raises(config.UserError) as error:
            config.pick_device(tiny(f'--device={flag}'), 1)
        message = str(error.value)
        for part in (f'--device={flag}: 2 NVIDIA GPU(s) are here (/dev/nvidia0, ...)', 'built for CUDA 13.0',
                     'this one (535.104.05)', 'R580', '--index-url https://download.pytorch.org/whl/cu126',
                     'pip install torch==', 'or pass --device=cpu'):
            assert part in message, message
    assert config.pick_device(tiny('--device=cpu'), 1) == torch.device('cpu')  # insisting
    gpu_node.setattr(torch.version, 'cuda', None)
    with pytest.raises(config.UserError, match=r'is a CPU-only build; install PyTorch.s CUDA 12 build'):
        config.pick_device(tiny(), 1)


def test_without_nvidia_devices_auto_is_the_cpu_and_cuda_is_a_flag_error(monkeypatch):
    monkeypatch.setattr(config, 'nvidia_devices', lambda: [])
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert config.pick_device(tiny(), 4) == torch.device('cpu')
    with pytest.raises(config.ConfigError, match='--device=cuda but CUDA is not available here'):
        config.pick_device(tiny('--device=cuda'), 1)


@pytest.mark.parametrize('capability,usable', [((7, 0), False), ((7, 5), True), ((8, 9), True), ((9, 0), True),
                                               ((12, 1), True), ((6, 1), False)])
def test_a_gpu_without_kernels_in_the_build_is_one_line(gpu_node, capability, usable):
    gpu_node.setattr(torch.cuda, 'is_available', lambda: True)
    gpu_node.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    gpu_node.setenv('LOCAL_RANK', '1')
    if usable:
        assert config.pick_device(tiny(), 2) == torch.device('cuda', 1)
        assert config.pick_device(tiny('--device=cuda:0'), 1) == torch.device('cuda', 0)
        return
    with pytest.raises(config.UserError) as error:
        config.pick_device(tiny(), 2)
    arch = 'sm_{}{}'.format(*capability)
    assert f'GPU 1 (Tesla V100-SXM2-32GB, {arch}) has no kernels in torch' in str(error.value)
    assert '(CUDA 13.0: sm_75 sm_80' in str(error.value) and 'whl/cu126' in str(error.value)


def test_kernels_run_on_their_major_at_a_higher_minor_and_ptx_on_any_later_gpu():
    assert config.has_kernels((8, 6), ['sm_80'])  # an A100 binary on an RTX 3090
    assert not config.has_kernels((9, 0), ['sm_80', 'sm_100'])  # binaries of another major
    assert not config.has_kernels((8, 0), ['sm_86'])
    assert config.has_kernels((10, 0), ['sm_80', 'compute_90'])  # PTX, compiled when loaded
    assert not config.has_kernels((8, 0), ['compute_90'])
    assert config.has_kernels((9, 0), ['sm_90a']) and config.has_kernels((12, 0), ['sm_120'])
    assert not config.has_kernels((7, 0), [])  # a CPU-only build lists none


def test_the_driver_version_is_read_from_the_kernel_module_line(tmp_path):
    for line, version in [('NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 2023', '535.104.05'),
                          ('NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build', '580.65.06')]:
        (tmp_path / 'version').write_text(f'NVRM version: {line}\nGCC version:  gcc version 12.2.0\n')
        assert config.nvidia_driver(tmp_path / 'version') == version
    assert config.nvidia_driver(tmp_path / 'absent') is None


def test_train_py_on_a_node_whose_driver_is_too_old_says_so_in_one_line(gpu_node, capsys):
    gpu_node.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        config.run_cli(train.main, ['--max_steps=1', '--output_dir=/nonexistent/never-written'])
    assert exit_info.value.code == 1
    assert_one_error_line(capsys.readouterr().err, 'but this PyTorch cannot use them', 'whl/cu126')


@pytest.mark.parametrize('rank,device,warned', [('0', 'auto', True), ('1', 'auto', False), ('0', 'cpu', False)])
def test_several_cpu_ranks_warn_once(monkeypatch, capsys, rank, device, warned):
    monkeypatch.setattr(config, 'nvidia_devices', lambda: [])
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(dist, 'init_process_group', lambda *a, **k: None)  # the group itself is not the point
    for key, value in {'RANK': rank, 'WORLD_SIZE': '2', 'LOCAL_WORLD_SIZE': '2'}.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    try:
        assert config.setup_distributed(tiny(f'--device={device}'))[1:] == (2, torch.device('cpu'))
    finally:
        torch.set_num_threads(threads)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning:')]
    assert len(lines) == warned
    assert not warned or '2 processes on the CPU (gloo): no CUDA device here' in lines[0]


# --- Precision ---
@pytest.mark.parametrize('native,dtype,words', [(True, torch.bfloat16, 'bf16 (auto: sm_80 has native bf16)'),
                                                (False, torch.float16,
                                                 'fp16 + GradScaler (auto: sm_70 has no native bf16)')])
def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch, native, dtype, words):
    """V100 and T4 emulate bf16 (is_bf16_supported() is True there, but not without emulation): fp16 + GradScaler."""
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (8, 0) if native else (7, 0))
    gpu = torch.device('cuda', 0)
    assert autocast_dtype(tiny(), gpu) == dtype
    assert train.precision_note(tiny(), gpu, dtype) == words
    assert autocast_dtype(tiny('--precision=bf16'), gpu) == torch.bfloat16  # asked for: kept
    assert train.precision_note(tiny('--precision=bf16'), gpu, torch.bfloat16) == 'bf16 (--precision=bf16)'
    assert autocast_dtype(tiny(), torch.device('cpu')) == torch.float32
    assert train.precision_note(tiny(), torch.device('cpu'), torch.float32) == 'fp32 (auto: CPU)'


# --- SLURM ---
def test_the_readme_job_script_saves_every_rank_on_sigusr1_and_requeues(tmp_path):
    """SLURM's --signal=B:USR1 reaches the batch script alone; its trap passes the signal to torchrun, which (with
    --signals-to-handle) passes it to both ranks: they save one checkpoint at the next step and exit 0."""
    out = tmp_path / 'run'
    script, env = job_script(tmp_path, out)
    job = subprocess.Popen(['bash', str(script)], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, start_new_session=True)
    end = time.time() + HANG
    while len(train_steps(out)) < 2:
        assert job.poll() is None, job.communicate()
        assert time.time() < end, 'no training step logged'
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGUSR1)  # the batch shell only
    stdout, stderr = job.communicate(timeout=HANG)
    assert job.returncode == 0, stderr[-3000:]
    ckpt = torch.load(out / 'checkpoint.pt', map_location='cpu', weights_only=True)
    assert ckpt['step'] == train_steps(out)[-1] >= 2
    assert f"train: stopped by SIGUSR1 at step {ckpt['step']}" in stdout
    assert len(ckpt['rng']) == 2  # both ranks took part in the save
    assert [p.name for p in out.glob('checkpoint_*.pt')] == [f"checkpoint_{ckpt['step']:08d}.pt"]  # saved once
    assert (tmp_path / 'scontrol.log').read_text().split() == ['requeue', '42']
    assert 'ChildFailedError' not in stderr  # no rank failed: torchrun's own exit is the trap's business
    end = time.time() + HANG
    while processes_naming(str(out)):  # no rank or loader worker left behind
        assert time.time() < end, processes_naming(str(out))
        time.sleep(0.1)


def test_srun_without_torchrun_stops_with_one_line_from_task_0(tmp_path):
    tasks = [subprocess.Popen([sys.executable, 'train.py', '--device=cpu', f'--output_dir={tmp_path}'], cwd=ROOT,
                              env={**ENV, 'SLURM_PROCID': task, 'SLURM_LOCALID': task, 'SLURM_NTASKS': '2'},
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for task in '01']
    (status0, err0), (status1, err1) = [(t.wait(HANG), t.communicate()[1]) for t in tasks]
    assert status0 == status1 == 1 and not (tmp_path / 'config.json').exists()
    assert_one_error_line(err0, '2 SLURM tasks started this command without torchrun',
                          'srun --ntasks-per-node=1 torchrun')
    assert 'error:' not in err1 and 'Traceback' not in err1, err1


def test_one_slurm_task_or_torchrun_inside_srun_passes(monkeypatch):
    monkeypatch.setenv('SLURM_PROCID', '0')
    monkeypatch.setenv('SLURM_NTASKS', '1')
    config.check_launcher()
    monkeypatch.setenv('SLURM_NTASKS', '4')  # one torchrun per node: RANK is torchrun's
    monkeypatch.setenv('RANK', '5')
    config.check_launcher()


# --- Loader workers and /dev/shm ---
def test_automatic_workers_per_gpu_are_capped_and_explicit_ones_kept(monkeypatch):
    monkeypatch.setattr(config.os, 'sched_getaffinity', lambda pid: set(range(224)))  # an 8-GPU 224-thread node
    assert config.cpu_split(-1, 0, 'cuda', 8) == (config.MAX_AUTO_WORKERS, 28 - config.MAX_AUTO_WORKERS)
    assert config.cpu_split(27, 0, 'cuda', 8) == (27, 1)
    assert config.cpu_split(-1, 0, 'cpu', 8) == (7, 21)  # CPU ranks: one worker per 4 cores, as before
    monkeypatch.setattr(config.os, 'sched_getaffinity', lambda pid: set(range(6)))
    assert config.cpu_split(-1, 0, 'cuda', 1) == (5, 1)  # under the cap: all cores but one


def test_a_batch_in_shared_memory_is_the_views_in_uint8_and_the_tokens():
    # 128 per process (the paper's 32 GPUs) x (224 px weak + 2 x 224 px strong), 77 tokens
    cfg = config.resolve({'dataset': 'cc3m', 'batch_size': '128'}, verbose=False)
    assert data.batch_bytes(cfg) == 128 * (3 * 224 * 224 * 3 + 3 * 77 * 8) == 58_039_296
    cuda = dataclasses.replace(cfg, augment_device='cuda', local_crop_size=192)
    assert data.batch_bytes(cuda) == 128 * (2 * (3 * 224 ** 2 + 2 * 3 * 192 ** 2) + 3 * 77 * 8)  # regions <= 2x


def test_dev_shm_too_small_for_the_workers_is_one_line_naming_workers_that_fit(monkeypatch):
    cfg = dataclasses.replace(config.resolve({'dataset': 'cc3m', 'batch_size': '128'}, verbose=False), workers=10)
    per_worker = data.PREFETCH * data.batch_bytes(cfg) * 8
    monkeypatch.setattr(data, 'shm_free', lambda: 3 * per_worker + 1)
    with pytest.raises(config.UserError) as error:
        data.check_shared_memory(cfg, 8)
    assert 'x 10 loader workers x 2 batches of 55.4 MiB need 8,856 MiB there' in str(error.value)
    assert '--workers=3,' in str(error.value) and '--shm-size=10g' in str(error.value)
    data.check_shared_memory(dataclasses.replace(cfg, workers=3), 8)  # the suggestion fits
    monkeypatch.setattr(data, 'shm_free', lambda: 64 << 20)  # Docker's default
    with pytest.raises(config.UserError, match=r'--workers=0 \(loading in the training process: slow\)'):
        data.check_shared_memory(cfg, 1)
    data.check_shared_memory(dataclasses.replace(cfg, workers=0), 8)
    monkeypatch.setattr(data, 'shm_free', lambda: None)  # no /dev/shm: nothing to check
    data.check_shared_memory(cfg, 8)


def test_train_py_stops_before_any_work_when_dev_shm_is_too_small(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(data, 'shm_free', lambda: 1 << 20)
    with pytest.raises(SystemExit) as exit_info:
        config.run_cli(train.main, ['--device=cpu', '--workers=1', f'--output_dir={tmp_path / "run"}'])
    assert exit_info.value.code == 1 and not (tmp_path / 'run').exists()
    assert_one_error_line(capsys.readouterr().err, '/dev/shm has 1 MiB free', '--workers=0', '--ipc=host')


# --- BYOLIP with --init ---
def test_byolip_momentum_model_starts_from_the_init_weights(tmp_path):
    cfg = tiny('--method=byolip', '--siamlip_hidden_dim=32', '--siamlip_proj_dim=16')
    torch.manual_seed(123)
    donor = build_model(cfg, 100)
    torch.save({'format': FORMAT, 'config': cfg.to_dict(), 'model': donor.state_dict()}, tmp_path / 'w.pt')
    model, momentum, _, _ = train.build_training(dataclasses.replace(cfg, init=str(tmp_path / 'w.pt')), 100,
                                                 torch.device('cpu'), 0, 1)
    for states in (model.state_dict(), momentum.state_dict()):
        assert states.keys() == donor.state_dict().keys()
        assert all(torch.equal(v, donor.state_dict()[k]) for k, v in states.items())
    fresh = train.build_training(cfg, 100, torch.device('cpu'), 0, 1)[1].state_dict()
    assert not torch.equal(fresh['visual.conv1.weight'], donor.state_dict()['visual.conv1.weight'])
    resumed = train.build_training(dataclasses.replace(cfg, init=str(tmp_path / 'w.pt')), 100, torch.device('cpu'),
                                   0, 1, resume='checkpoint.pt')[1].state_dict()  # resume: its own weights load later
    assert torch.equal(resumed['visual.conv1.weight'], fresh['visual.conv1.weight'])


# --- --compile with SyncBatchNorm ---
def test_batchnorm_is_synchronised_across_gpus_only():
    assert train.sync_batchnorm(torch.device('cuda', 0), 8)
    assert not train.sync_batchnorm(torch.device('cuda', 0), 1)
    assert not train.sync_batchnorm(torch.device('cpu'), 8)


@pytest.mark.parametrize('model,method,compiled', [('tiny', 'rocket', ['visual', 'text']),
                                                   ('tiny', 'clip', 'all'), ('resnet50', 'clip', ['text'])])
def test_compile_leaves_the_modules_holding_syncbatchnorm_eager(monkeypatch, capsys, model, method, compiled):
    """SyncBatchNorm breaks the graph at every call: with it (multi-GPU), the towers without it are compiled."""
    cfg = config.resolve({'model': model, 'method': method, 'text_layers': '1', 'compile': 'true'}, verbose=False)
    net = nn.SyncBatchNorm.convert_sync_batchnorm(build_model(cfg, 100))  # what 8 GPUs get (needs no GPU)
    calls = []
    monkeypatch.setattr(nn.Module, 'compile', lambda self, *a, **k: calls.append(self))
    assert train.wrap_model(net, cfg, torch.device('cpu'), 1, rank=0) is net
    names = [name for name, m in net.named_children() if any(m is c for c in calls)]
    assert calls == [net] if compiled == 'all' else names == compiled
    said = capsys.readouterr().out
    assert ('run eagerly' in said) == (compiled != 'all')
    plain = build_model(cfg, 100)
    assert train.compile_parts(plain) == [plain]  # one GPU: BatchNorm, the whole model


# --- Linear probe: features gathered to rank 0 ---
def _gather_worker(rank, world_size, tmp, rows):
    dist.init_process_group('gloo', init_method=f'file://{tmp}/rendezvous', rank=rank, world_size=world_size)
    evaluate.GATHER_CHUNK_BYTES = 2 * 3 * 4  # two rows of 3 float32 a round: several rounds, a ragged last one
    mine = torch.arange(rows[rank] * 3, dtype=torch.float32).reshape(-1, 3) + 100 * rank
    parts = [mine[:1], mine[1:]] if rows[rank] else []
    features = evaluate._gather_to_first(parts, world_size, torch.zeros(0))
    labels = evaluate._gather_to_first([torch.full((rows[rank],), rank)], world_size)
    torch.save({'features': features, 'labels': labels}, Path(tmp) / f'rank{rank}.pt')
    dist.destroy_process_group()


def test_probe_features_reach_rank_0_alone_in_bounded_rounds(tmp_path):
    rows = [0, 5]  # rank 0's slice is empty: the row shape comes from rank 1
    torch.multiprocessing.spawn(_gather_worker, args=(2, str(tmp_path), rows), nprocs=2)
    got = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    assert torch.equal(got[0]['features'], torch.arange(15, dtype=torch.float32).reshape(5, 3) + 100)
    assert torch.equal(got[0]['labels'], torch.ones(5, dtype=torch.long))
    assert got[1]['features'] is None and got[1]['labels'] is None


def test_a_probe_too_big_for_the_gpu_is_fitted_on_the_cpu(monkeypatch):
    gib, said = 2 ** 30, []
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (10 * gib, 80 * gib))
    gpu = torch.device('cuda', 0)
    # ImageNet: 1.28M train, 50k test features; ViT-B/16's 768 dims fit in 10 GiB? 8 x 768 x (3.6 x 1.28M + 50k)
    assert evaluate.probe_device(gpu, 1_281_167, 50_000, 768, said.append) == torch.device('cpu')
    assert said == ['probe: its fit needs ~26.7 GiB, cuda:0 has 10.0 GiB free: fitting on the CPU']
    assert evaluate.probe_device(gpu, 100_000, 10_000, 768, said.append) == gpu  # 2.1 GiB
    assert evaluate.probe_device('cpu', 10 ** 9, 0, 4096) == torch.device('cpu')
