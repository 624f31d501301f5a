"""Tests for minillm.train: the hand-written pieces against PyTorch, checkpoints, the loop, NaN guard and exact resume after kill -9."""
import json, math, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.core import RunDir
from hypothesis import given, settings, strategies as st

from minillm.model import ModelConfig, Transformer
from minillm.train import (AdamW, LanguageModelLoss, TrainConfig, clip_grad_norm_, cross_entropy, forward_backward,
                           latest_checkpoint, lce_chunk_rows, linear_cross_entropy, load_checkpoint, load_model, lr_at,
                           make_optimizer, param_groups, save_checkpoint, train)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the hand-written pieces
@pytest.mark.parametrize('shape', [(7, 13), (2, 5, 50), (3, 4, 8192)])
def test_cross_entropy_matches_torch(shape):
    torch.manual_seed(0)
    logits = (torch.randn(*shape) * 5).requires_grad_()
    targets = torch.randint(0, shape[-1], shape[:-1])
    targets.view(-1)[::3] = -100                                              # ignored positions
    ours, ref = cross_entropy(logits, targets), F.cross_entropy(logits.view(-1, shape[-1]), targets.view(-1))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])


def test_cross_entropy_is_stable_for_huge_logits():
    logits = torch.tensor([[1e4, 1e4 - 5, -1e4], [-3e4, 0.0, 3e4]])
    targets = torch.tensor([1, 2])
    out = cross_entropy(logits, targets)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, F.cross_entropy(logits, targets))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), vocab=st.integers(2, 300), dim=st.integers(1, 24), chunk=st.one_of(st.none(), st.integers(1, 50)),
       n_ignored=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_linear_cross_entropy_equals_unfused(rows, vocab, dim, chunk, n_ignored, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, dim, generator=g).requires_grad_()
    W = (torch.randn(vocab, dim, generator=g) * 2).requires_grad_()
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[:min(n_ignored, rows - 1)] = -100                                       # ignored rows, at least one row counted
    ours, ref = linear_cross_entropy(h, W, t, chunk_size=chunk), F.cross_entropy(h @ W.T, t)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, (h, W)), torch.autograd.grad(ref, (h, W))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_linear_cross_entropy_without_grad_and_bad_input():
    h, W, t = torch.randn(2, 5, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True), torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        out = linear_cross_entropy(h, W, t)
    assert out.grad_fn is None
    torch.testing.assert_close(out, F.cross_entropy((h @ W.T).view(-1, 30), t.view(-1)))
    with pytest.raises(ValueError, match='one target'): linear_cross_entropy(h, W, t[:, :4])
    with pytest.raises(ValueError, match='features'): linear_cross_entropy(h, W[:, :4], t)
    with pytest.raises(ValueError, match='chunk_size'): linear_cross_entropy(h, W, t, chunk_size=0)
    assert lce_chunk_rows(4096, 8192, 256) == 512 and lce_chunk_rows(8192, 50257, 768) == 128


@pytest.mark.parametrize('tie,amp', [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)])
def test_language_model_loss_fused_equals_logits_path(tie, amp):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset('tiny', tie_embeddings=tie))
    x, y = torch.randint(0, 512, (3, 64)), torch.randint(0, 512, (3, 64))
    fused, plain = LanguageModelLoss(model), LanguageModelLoss(model, fused=False)
    assert fused.fused_loss is linear_cross_entropy and plain.fused_loss is None
    a = forward_backward(fused, [(x, y)], amp); grads = [p.grad.clone() for p in model.parameters()]; model.zero_grad()
    b = forward_backward(plain, [(x, y)], amp)                               # bf16 autocast: the GPU recipe, here on a CPU
    torch.testing.assert_close(a, b)
    tol = dict(atol=1e-6, rtol=1e-4) if amp == torch.float32 else dict(atol=1e-3, rtol=2e-2)
    for p, g in zip(model.parameters(), grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(p.grad, g, **tol)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 3))


@pytest.mark.parametrize('wd,betas', [(0.0, (0.9, 0.999)), (0.1, (0.9, 0.95)), (0.5, (0.8, 0.9))])
def test_adamw_matches_torch_step_by_step(wd, betas):
    a, b = _net(), _net()
    opt_a = AdamW(param_groups(a, wd), lr=3e-3, betas=betas, eps=1e-8)
    opt_b = torch.optim.AdamW(param_groups(b, wd), lr=3e-3, betas=betas, eps=1e-8, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(40):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad(); F.mse_loss(net(x), y).backward(); opt.step()
        with torch.no_grad():
            for p, q in zip(a.parameters(), b.parameters()): torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with torch.no_grad():   # and it really moved: bias correction and decay were exercised
        assert (a[0].weight - _net()[0].weight).abs().max() > 1e-2


def test_adamw_first_step_is_lr_times_sign():
    "With bias correction, Adam's first update is lr * g / (|g| + eps), i.e. lr * sign(g) (and decay shrinks first)."
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.tensor([0.3, -4.0, 1e-3])
    opt.step()
    expected = torch.tensor([1.0, -2.0, 3.0]) * (1 - 0.1 * 0.5) - 0.1 * torch.tensor([1.0, -1.0, 1.0])
    torch.testing.assert_close(p.data, expected, rtol=0, atol=1e-4)


def test_adamw_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match='betas'): AdamW(_net().parameters(), betas=(0.9, 1.0))


def test_param_groups_decay_matrices_only():
    net = _net()
    decay, no_decay = param_groups(net, 0.1)
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert all(p.dim() == 2 for p in decay['params']) and all(p.dim() == 1 for p in no_decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(net.parameters()))


def test_make_optimizer_is_torch_adamw_fused_on_cpu():
    opt = make_optimizer(_net(), TrainConfig.preset('tiny'), 'cpu')
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults['fused'] is True
    assert [g['weight_decay'] for g in opt.param_groups] == [TrainConfig.preset('tiny').weight_decay, 0.0]


def test_lr_schedule_shape():
    cfg = TrainConfig(max_steps=1000, warmup_steps=100, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, cfg) for s in range(1200)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[99] == pytest.approx(1e-3) and lrs[100] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:99], lrs[1:100]))                  # warmup rises
    assert all(a >= b for a, b in zip(lrs[100:1000], lrs[101:1001]))         # then falls
    assert lrs[550] == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-3)             # cosine midpoint
    assert lrs[1000] == pytest.approx(1e-4) and lrs[1199] == pytest.approx(1e-4)
    assert lr_at(0, TrainConfig(max_steps=10, warmup_steps=0, lr=1e-3, min_lr=0.0)) == pytest.approx(1e-3)


@pytest.mark.parametrize('max_norm', [0.01, 1.0, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    a, b = _net(), _net()
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    for net in (a, b): (50 * F.mse_loss(net(x), y)).backward()
    n_ours = clip_grad_norm_(list(a.parameters()), max_norm)
    n_ref = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
    torch.testing.assert_close(n_ours, n_ref)
    for p, q in zip(a.parameters(), b.parameters()): torch.testing.assert_close(p.grad, q.grad)


class _TinyLM(nn.Module):
    def __init__(self, V=40, d=8):
        super().__init__(); self.emb = nn.Embedding(V, d); self.mix = nn.Linear(d, d); self.out = nn.Linear(d, V)
    def forward(self, idx): return self.out(torch.relu(self.mix(self.emb(idx))))


@pytest.mark.parametrize('k', [2, 3, 6])
def test_gradient_accumulation_equals_big_batch(k):
    torch.manual_seed(0)
    lm = _TinyLM(); loss_fn = LanguageModelLoss(lm)
    x, y = torch.randint(0, 40, (6, 10)), torch.randint(0, 40, (6, 10))
    big = forward_backward(loss_fn, [(x, y)])
    ref = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    m = 6 // k
    small = forward_backward(loss_fn, [(x[i:i + m], y[i:i + m]) for i in range(0, 6, m)])
    torch.testing.assert_close(small, big)
    for p, g in zip(lm.parameters(), ref): torch.testing.assert_close(p.grad, g)


def test_train_config_presets_and_errors():
    assert TrainConfig.preset('gpu').tokens_per_step(1024) == 524_288
    assert TrainConfig.preset('cpu', lr=1e-3).lr == 1e-3
    assert TrainConfig.from_dict(json.loads(json.dumps(TrainConfig.preset('gpu').to_dict()))) == TrainConfig.preset('gpu')
    with pytest.raises(ValueError, match='Unknown TrainConfig preset'): TrainConfig.preset('nope')
    with pytest.raises(ValueError, match='Unknown TrainConfig field'): TrainConfig.preset('cpu', learning_rate=1)
    with pytest.raises(ValueError, match='warmup_steps'): TrainConfig(max_steps=10, warmup_steps=20)
    with pytest.raises(ValueError, match='min_lr'): TrainConfig(lr=1e-4, min_lr=1e-3)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_rotation(tmp_path):
    torch.manual_seed(0)
    lm = _TinyLM(); opt = torch.optim.AdamW(lm.parameters(), foreach=True)
    x, y = torch.randint(0, 40, (4, 10)), torch.randint(0, 40, (4, 10))
    for step in (1, 2, 3):
        forward_backward(LanguageModelLoss(lm), [(x, y)]); opt.step(); opt.zero_grad()
        save_checkpoint(tmp_path, lm, opt, step=step, train_cfg=TrainConfig.preset('tiny'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['latest', 'previous']     # no temp folders left behind
    # state.pt loads with weights_only=True (plain tensors and dicts only)
    state = torch.load(tmp_path / 'latest' / 'state.pt', weights_only=True)
    assert state['step'] == 3 and 'optimizer' in state and 'rng' in state
    lm2 = _TinyLM(); opt2 = torch.optim.AdamW(lm2.parameters(), foreach=True)
    ck = load_checkpoint(latest_checkpoint(tmp_path), lm2, opt2)
    assert ck['step'] == 3 and load_checkpoint(tmp_path / 'previous')['step'] == 2
    for p, q in zip(lm.parameters(), lm2.parameters()):
        assert torch.equal(p, q)
        for key in ('exp_avg', 'exp_avg_sq', 'step'): assert torch.equal(opt.state[p][key], opt2.state[q][key])


def test_checkpoint_crash_window_falls_back_to_previous(tmp_path):
    lm = _TinyLM()
    save_checkpoint(tmp_path, lm, step=1); save_checkpoint(tmp_path, lm, step=2)
    os.replace(tmp_path / 'latest', tmp_path / '.tmp-3-999')          # crash between the two renames
    assert latest_checkpoint(tmp_path) == tmp_path / 'previous'
    (tmp_path / 'previous' / 'state.pt').unlink()                       # an incomplete folder is never used
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match='not a complete checkpoint'): load_checkpoint(tmp_path / 'previous')
    save_checkpoint(tmp_path, lm, step=4)                                # the next save cleans up the leftovers
    assert not list(tmp_path.glob('.tmp-*')) and latest_checkpoint(tmp_path).name == 'latest'


def test_load_checkpoint_without_optimizer_state_cannot_resume(tmp_path):
    lm = _TinyLM(); save_checkpoint(tmp_path, lm, step=1)
    with pytest.raises(ValueError, match='no optimizer state'):
        load_checkpoint(tmp_path / 'latest', _TinyLM(), torch.optim.AdamW(_TinyLM().parameters()))


# ----------------------------------------------------------------------------- the training loop on real tokens
@pytest.fixture(scope='module')
def token_dir(tmp_path_factory):
    "Token files from three documents of the embedded corpus with a 512-token BPE tokenizer (the 'tiny' model's vocab)."
    from minillm.core import load_corpus
    from minillm.data import prepare_tokens
    from minillm.tokenizer import Tokenizer
    docs = load_corpus().select(range(3))
    tok = Tokenizer.train(docs['text'], vocab_size=512, show_progress=False)
    out = tmp_path_factory.mktemp('tokens') / 'tokens'
    prepare_tokens(docs, tok, out, val_fraction=0.34, seed=0)
    return out


def _run_with_tokens(path: Path, token_dir: Path) -> RunDir:
    import shutil
    shutil.copytree(token_dir, path / 'tokens')
    return RunDir(path)


def _tiny():
    from minillm.model import ModelConfig
    return ModelConfig.preset('tiny')


def test_train_end_to_end(tmp_path, token_dir):
    run = _run_with_tokens(tmp_path / 'run', token_dir)
    cfg = TrainConfig.preset('tiny', max_steps=30, eval_interval=10, checkpoint_interval=10, log_interval=5, lr=3e-3, warmup_steps=3)
    model = train(run, _tiny(), cfg)
    records = run.read_metrics(stage='train')
    train_rec = [r for r in records if 'train_loss' in r]
    val_rec = [r for r in records if 'val_loss' in r]
    assert [r['step'] for r in train_rec] == [5, 10, 15, 20, 25, 30] and [r['step'] for r in val_rec] == [10, 20, 30]
    assert {'lr', 'grad_norm', 'tokens', 'tokens_per_s'} <= set(train_rec[0]) and 'mfu' not in train_rec[0]   # no MFU on CPU
    assert train_rec[-1]['tokens'] == 30 * cfg.tokens_per_step(64)
    assert val_rec[-1]['val_loss'] < val_rec[0]['val_loss'] < math.log(512)        # it learns
    assert run.file('loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    report = run.file('report.md').read_text()
    assert '## Training' in report and 'loss.png' in report and 'validation loss' in report
    # the checkpoint holds the final model, and load_model accepts the run, checkpoints/ or the folder itself
    ckpt = latest_checkpoint(run.path)
    assert json.loads((ckpt / 'config.json').read_text())['step'] == 30
    for source in (run, run.path, run.file('checkpoints'), ckpt):
        loaded = load_model(source)
        assert not loaded.training
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()): assert torch.equal(a, b), k
    # re-running a finished run does no work and changes nothing
    before = run.file('metrics.jsonl').read_text()
    train(run, _tiny(), cfg)
    assert run.file('metrics.jsonl').read_text() == before


def test_train_with_gradient_accumulation(tmp_path, token_dir):
    "grad_accum micro-batches per step: tokens are counted per optimizer step and the run still learns."
    run = _run_with_tokens(tmp_path / 'run', token_dir)
    train(run, _tiny(), TrainConfig.preset('tiny', batch_size=4, grad_accum=3, max_steps=12, log_interval=1, lr=3e-3))
    rec = [r for r in run.read_metrics() if 'train_loss' in r]
    assert [r['tokens'] for r in rec] == [(i + 1) * 4 * 3 * 64 for i in range(12)]
    assert rec[-1]['train_loss'] < rec[0]['train_loss']


def test_train_errors_are_clear(tmp_path, token_dir):
    from minillm.model import ModelConfig
    with pytest.raises(FileNotFoundError, match='tokenize a corpus'): train(tmp_path / 'empty', _tiny(), TrainConfig.preset('tiny'))
    run = _run_with_tokens(tmp_path / 'run', token_dir)
    with pytest.raises(ValueError, match='vocab'): train(run, ModelConfig.preset('tiny', vocab_size=100), TrainConfig.preset('tiny'))
    train(run, _tiny(), TrainConfig.preset('tiny', max_steps=2))
    with pytest.raises(ValueError, match='different model config'):
        train(run, ModelConfig.preset('tiny', n_layers=1), TrainConfig.preset('tiny', max_steps=4))
    with pytest.raises(FileNotFoundError, match='No checkpoint'): load_model(tmp_path / 'empty')


def test_nan_stops_training_and_keeps_the_last_checkpoint(tmp_path, token_dir):
    run = _run_with_tokens(tmp_path / 'run', token_dir)
    train(run, _tiny(), TrainConfig.preset('tiny', max_steps=4, checkpoint_interval=4))
    ckpt = run.file('checkpoints') / 'latest'
    before = {f: (ckpt / f).read_bytes() for f in ('model.safetensors', 'config.json', 'state.pt')}
    absurd = TrainConfig.preset('tiny', max_steps=12, lr=1e12, min_lr=0.0, warmup_steps=0, checkpoint_interval=4)
    with pytest.raises(FloatingPointError, match='diverged at step 6.*loss nan.*last good checkpoint'):
        train(run, _tiny(), absurd)
    # step 5's update blew the weights up, step 6's loss is NaN: nothing was applied or written, step 4 is untouched
    assert latest_checkpoint(run.path) == ckpt
    assert {f: (ckpt / f).read_bytes() for f in before} == before
    model = load_model(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


CHILD = '''
import sys
from minillm.model import ModelConfig
from minillm.train import TrainConfig, train
train(sys.argv[1], ModelConfig.preset('tiny'), TrainConfig.preset('tiny', max_steps=int(sys.argv[2]), checkpoint_interval=10,
      eval_interval=20, log_interval=1, batch_size=8, lr=3e-3, warmup_steps=5))
'''


def _child(run: RunDir, steps: int) -> subprocess.Popen:
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    return subprocess.Popen([sys.executable, '-c', CHILD, str(run.path), str(steps)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _history(run: RunDir) -> dict:
    "Every logged value that must not depend on interruptions (all but timings), keyed by (step, field)."
    out = {}
    for r in run.read_metrics(stage='train'):
        for k in ('train_loss', 'lr', 'grad_norm', 'tokens', 'val_loss'):
            if k in r:
                assert (r['step'], k) not in out, f'duplicate record for step {r["step"]}'
                out[r['step'], k] = r[k]
    return out


def test_resume_after_kill_9_is_bit_exact(tmp_path, token_dir):
    steps = 120
    straight = _run_with_tokens(tmp_path / 'straight', token_dir)
    p = _child(straight, steps); _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err.decode()[-3000:]

    killed = _run_with_tokens(tmp_path / 'killed', token_dir)
    p = _child(killed, steps)
    ckpt_config = killed.file('checkpoints') / 'latest' / 'config.json'
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:             # wait for a checkpoint past step 30
        try:
            if json.loads(ckpt_config.read_text())['step'] >= 30: break
        except (FileNotFoundError, json.JSONDecodeError, KeyError): pass
        time.sleep(0.005)
    assert p.poll() is None, 'the child finished before it could be killed: raise `steps`'
    os.kill(p.pid, signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL
    done_at_kill = max(r['step'] for r in killed.read_metrics() if 'train_loss' in r)
    saved_at_kill = json.loads((latest_checkpoint(killed.path) / 'config.json').read_text())['step']
    assert 30 <= saved_at_kill <= done_at_kill < steps

    p = _child(killed, steps); _, err = p.communicate(timeout=600)    # resume
    assert p.returncode == 0, err.decode()[-3000:]
    a, b = _history(straight), _history(killed)
    assert a == b                                                      # every loss, lr and grad norm, bit for bit
    assert len([k for k in a if k[1] == 'train_loss']) == steps
    wa = load_model(straight).state_dict(); wb = load_model(killed).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)                  # and the final weights
