"""Mixed precision helpers, MFU, and data parallelism: 2 gloo processes under torchrun (DDP and FSDP2) must end with
the parameters of one process trained on the same global batches; the sharded checkpoint must load unsharded."""
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minillm import distributed as D
from minillm.model import ModelConfig, Transformer, flops_per_token

ROOT = Path(D.__file__).resolve().parents[1]
STEPS, BATCH, ACCUM, LR = 3, 8, 2, 0.5   # SGD: unlike Adam it notices a wrongly scaled gradient


def torchrun(args, nproc=2, timeout=300):
    env = {**os.environ, 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", 'OMP_NUM_THREADS': '1',
           'CUDA_VISIBLE_DEVICES': ''}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', '-m', 'minillm.distributed', *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, f'torchrun failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}'
    return r


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "One process with 4 micro-batches per step, and 2 processes x 2 micro-batches with DDP and with FSDP (same global batch)."
    out = tmp_path_factory.mktemp('dp')
    single = D.train_data_parallel(D.byte_model_fn(), 'none', steps=STEPS, batch_size=BATCH, grad_accum=2 * ACCUM,
                                   optim='sgd', lr=LR)
    torchrun(['--strategy', 'ddp', 'fsdp', '--steps', str(STEPS), '--batch-size', str(BATCH), '--grad-accum', str(ACCUM),
              '--optim', 'sgd', '--lr', str(LR), '--out', str(out), '--checkpoint', str(out / 'ckpt')])
    return single, out


@pytest.mark.parametrize('strategy', ['ddp', 'fsdp'])
def test_two_processes_match_one(runs, strategy):
    from safetensors.torch import load_file
    single, out = runs
    got = load_file(str(out / f'{strategy}.safetensors'))
    ref = single['state']
    assert sorted(got) == sorted(ref)
    for k in ref: torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5)
    info = json.loads((out / f'{strategy}.json').read_text())
    assert info['world_size'] == 2 and info['strategy'] == strategy
    np.testing.assert_allclose(info['losses'], single['losses'], rtol=1e-5)
    init = Transformer(ModelConfig.preset('tiny', vocab_size=256, context_length=32)).state_dict()
    assert any((got[k] - init[k]).abs().max() > 1e-3 for k in got)      # training moved the weights


def test_sharded_checkpoint_loads_into_one_process(runs):
    from safetensors.torch import load_file
    _, out = runs
    assert (out / 'ckpt' / 'fsdp' / '.metadata').exists()
    model = D.byte_model_fn()()
    opt = D.make_optimizer(model, 'sgd', LR)
    D.load_sharded_checkpoint(model, opt, out / 'ckpt' / 'fsdp')
    final = load_file(str(out / 'fsdp.safetensors'))
    for k, v in model.state_dict().items(): torch.testing.assert_close(v, final[k])
    bufs = [opt.state[p]['momentum_buffer'] for p in model.parameters()]
    assert len(bufs) == len(list(model.parameters())) and all(b.abs().sum() > 0 for b in bufs)
    with pytest.raises(FileNotFoundError): D.load_sharded_checkpoint(model, opt, out / 'missing')


def test_single_process_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = D.byte_model_fn()()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randint(0, 256, (2, 8))).sum().backward(); opt.step()
    D.save_sharded_checkpoint(m, opt, tmp_path / 'c')
    m2 = D.byte_model_fn()()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    D.load_sharded_checkpoint(m2, opt2, tmp_path / 'c')
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()): torch.testing.assert_close(a, b)


def test_gradient_accumulation_equals_one_big_batch():
    a = D.train_data_parallel(D.byte_model_fn(), 'none', steps=2, batch_size=8, grad_accum=1, optim='sgd', lr=LR)
    b = D.train_data_parallel(D.byte_model_fn(), 'none', steps=2, batch_size=8, grad_accum=4, optim='sgd', lr=LR)
    for k in a['state']: torch.testing.assert_close(a['state'][k], b['state'][k], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='divisible'): D.train_data_parallel(D.byte_model_fn(), 'none', batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match='optimizer'): D.make_optimizer(torch.nn.Linear(2, 2), 'lion')


def test_batches_are_deterministic_and_shifted():
    tokens = D.byte_tokens(10_000)
    assert tokens.dtype == torch.uint8 and len(tokens) == 10_000
    x, y = D.global_batch(tokens, 5, 4, 16, seed=1)
    x2, y2 = D.global_batch(tokens, 5, 4, 16, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(x, D.global_batch(tokens, 6, 4, 16, seed=1)[0])


def test_wrap_model_needs_a_process_group():
    m = torch.nn.Linear(2, 2)
    assert D.wrap_model(m, 'none') is m
    with pytest.raises(RuntimeError, match='torchrun'): D.wrap_model(m, 'fsdp')
    with pytest.raises(ValueError, match='strategy'): D.wrap_model(m, 'zero9')
    assert D.setup_distributed()[:2] == (0, 1)


def test_mixed_precision_helpers():
    assert not D.grad_scaler('cpu', None).is_enabled() and not D.grad_scaler('cpu', torch.bfloat16).is_enabled()
    assert D.grad_scaler('cpu', torch.float16).is_enabled()
    lin = torch.nn.Linear(8, 8)
    with D.autocast('cpu', torch.bfloat16): assert lin(torch.randn(2, 8)).dtype == torch.bfloat16
    with D.autocast('cpu', None): assert lin(torch.randn(2, 8)).dtype == torch.float32
    model = Transformer(ModelConfig.preset('tiny', vocab_size=256))
    x = torch.randint(0, 256, (2, 32))
    with D.count_saved_bytes() as s32: model(x).sum()
    with D.count_saved_bytes() as s16, D.autocast('cpu', torch.bfloat16): model(x).float().sum()
    assert 0 < s16['bytes'] < 0.75 * s32['bytes']


def test_mfu_and_throughput():
    assert D.mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert D.peak_flops('cpu') is None
    cfg = ModelConfig.preset('tiny', vocab_size=256)
    r = D.measure_throughput(Transformer(cfg), batch_size=2, context=16, steps=1)
    assert r['tokens_per_second'] > 0 and r['step_seconds'] > 0
    assert 0 < D.mfu(r['tokens_per_second'], flops_per_token(cfg, 16), 1e11) < 1


def test_main_single_process(tmp_path):
    D.main(['--strategy', 'none', '--steps', '1', '--batch-size', '2', '--context', '16', '--out', str(tmp_path)])
    info = json.loads((tmp_path / 'none.json').read_text())
    assert info['world_size'] == 1 and len(info['losses']) == 1 and (tmp_path / 'none.safetensors').exists()


@pytest.mark.cuda
def test_bf16_training_step_on_gpu():
    if not torch.cuda.is_available(): pytest.skip('needs a CUDA GPU')
    cfg = ModelConfig.preset('tiny', vocab_size=256)
    m = Transformer(cfg).cuda()
    r = D.measure_throughput(m, batch_size=8, context=64, steps=2, amp=torch.bfloat16)
    assert r['tokens_per_second'] > 0 and r['peak_memory_bytes'] > 0
    assert D.peak_flops('cuda') is None or D.peak_flops('cuda') > 1e14
