"""Triton kernels against PyTorch references: forward, gradients, gradcheck, fallbacks, and a short training run.

On a machine without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before triton is
imported), in fp32/fp16 with small shapes. bf16 checks need a GPU: `pytest --cuda tests/test_kernels.py`.
"""
import gzip, json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')
import torch.nn.functional as F
from minillm import kernels as K

needs_triton = pytest.mark.skipif(not K.triton_available('cuda' if torch.cuda.is_available() else 'cpu'),
                                  reason='triton is not installed (pip install triton) or cannot run here')
DEV = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def compare(fn, ref, inputs, atol, rtol, seed=0):
    "fn and ref agree on outputs and on the gradients of every floating-point input."
    torch.manual_seed(seed)
    a = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    b = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    ya, yb = fn(*a), ref(*b)
    ya, yb = (ya,) if torch.is_tensor(ya) else ya, (yb,) if torch.is_tensor(yb) else yb
    for u, v in zip(ya, yb):
        assert u.dtype == v.dtype and u.shape == v.shape
        torch.testing.assert_close(u, v, atol=atol, rtol=rtol)
    gs = [torch.randn_like(u) for u in ya]
    torch.autograd.backward(ya, gs); torch.autograd.backward(yb, gs)
    for u, v in zip(a, b):
        if u.requires_grad: torch.testing.assert_close(u.grad, v.grad, atol=atol * 10, rtol=rtol * 10)


def randn(*shape, dtype=torch.float32, scale=1.0): return (torch.randn(*shape) * scale).to(DEV, dtype)


# ---------------------------------------------------------------- row-wise and elementwise kernels
@needs_triton
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('shape', [(1, 1), (37, 100), (2, 3, 257), (5, 1000)])
def test_rms_norm(shape, dtype):
    x, w = randn(*shape, dtype=dtype), (torch.rand(shape[-1]) + 0.5).to(DEV, dtype)
    compare(lambda x, w: K.rms_norm(x, w, 1e-5), lambda x, w: K.rms_norm_ref(x, w, 1e-5), [x, w], **TOL[dtype])


@needs_triton
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('shape', [(1, 2), (3, 19, 77), (8, 1025)])
def test_softmax(shape, dtype):
    x = randn(*shape, dtype=dtype, scale=4)
    compare(K.softmax, lambda x: torch.softmax(x.float(), -1).to(dtype), [x], **TOL[dtype])


@needs_triton
def test_softmax_extreme_values():
    x = torch.tensor([[1e4, 1e4, -1e4], [-1e30, 0.0, 0.0]], device=DEV)
    torch.testing.assert_close(K.softmax(x), torch.softmax(x, -1))


@needs_triton
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('shape', [(7,), (5, 333), (2, 3, 1000)])
def test_swiglu(shape, dtype):
    compare(K.swiglu, K.swiglu_ref, [randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)], **TOL[dtype])


def _rope_tables(T, D):
    inv = 10000.0 ** (-torch.arange(0, D, 2).float() / D)
    ang = torch.outer(torch.arange(T).float(), inv)
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(DEV), ang.sin().to(DEV)


@needs_triton
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('B,H,H_KV,T,D', [(1, 1, 1, 1, 2), (2, 4, 2, 11, 16), (1, 3, 1, 33, 24)])
def test_rope_both_layouts(B, H, H_KV, T, D, dtype):
    cos, sin = _rope_tables(T, D)
    q, k = randn(B, H, T, D, dtype=dtype), randn(B, H_KV, T, D, dtype=dtype)
    compare(lambda q, k: K.apply_rope(q, k, cos, sin), lambda q, k: K.apply_rope_ref(q, k, cos, sin), [q, k], **TOL[dtype])
    qt, kt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()          # (B, T, H, D)
    c, s = cos[:, None], sin[:, None]
    compare(lambda q, k: K.apply_rope(q, k, c, s), lambda q, k: K.apply_rope_ref(q, k, c, s), [qt, kt], **TOL[dtype])


@needs_triton
def test_rope_matches_the_model():
    from minillm import model as M
    cos, sin = M.rope_cache(16, 12)
    x = torch.randn(2, 3, 12, 16)
    torch.testing.assert_close(K.rope(x, cos, sin), M.apply_rope(x, cos, sin))


# ---------------------------------------------------------------- losses
@needs_triton
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('M,V', [(1, 2), (26, 1000), (3, 50257)])   # 50257 > one vocabulary tile: the online LSE rescales
def test_cross_entropy(M, V, dtype):
    logits = randn(M, V, dtype=dtype, scale=3)
    t = torch.randint(0, V, (M,), device=DEV)
    if M > 2: t[1] = -100                                            # an ignored position
    compare(lambda l: K.cross_entropy(l, t), lambda l: K.cross_entropy_ref(l, t), [logits],
            atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=1e-4 if dtype == torch.float32 else 2e-3)


@needs_triton
def test_cross_entropy_large_logits_and_batch_shape():
    logits = randn(2, 5, 300) * 1000                                 # exp would overflow without the running max
    t = torch.randint(0, 300, (2, 5), device=DEV)
    compare(lambda l: K.cross_entropy(l, t), lambda l: K.cross_entropy_ref(l, t), [logits], atol=1e-3, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize('chunk', [None, 1, 5, 64])
def test_linear_cross_entropy(chunk):
    h, W = randn(2, 13, 24), randn(1000, 24, scale=0.3)
    t = torch.randint(0, 1000, (2, 13), device=DEV); t[0, :4] = -100
    compare(lambda h, W: K.linear_cross_entropy(h, W, t, chunk_size=chunk), lambda h, W: K.linear_cross_entropy_ref(h, W, t),
            [h, W], atol=1e-5, rtol=1e-4)


@needs_triton
def test_linear_cross_entropy_without_grad_and_fp16():
    h, W = randn(10, 32), randn(300, 32, scale=0.3)
    t = torch.randint(0, 300, (10,), device=DEV)
    with torch.no_grad():
        torch.testing.assert_close(K.linear_cross_entropy(h, W, t), K.linear_cross_entropy_ref(h, W, t))
    compare(lambda h, W: K.linear_cross_entropy(h, W, t, chunk_size=4), lambda h, W: K.linear_cross_entropy_ref(h, W, t),
            [h.half(), W.half()], atol=2e-3, rtol=2e-3)


def test_chunk_rule():
    from minillm.train import lce_chunk_rows
    assert lce_chunk_rows(8192, 50257, 768) == 128                   # logits chunk about the size of h
    assert lce_chunk_rows(4096, 8192, 256) == 512                    # small vocabulary: at least 2^22 logits
    assert lce_chunk_rows(3, 50257, 768) == 4                        # never much more than the rows there are


# ---------------------------------------------------------------- FlashAttention
@needs_triton
@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('B,H,H_KV,T,D', [(1, 1, 1, 1, 16), (2, 4, 2, 100, 32), (1, 2, 2, 37, 24), (1, 2, 1, 130, 64)])
def test_attention(B, H, H_KV, T, D, causal):
    q, k, v = randn(B, H, T, D), randn(B, H_KV, T, D), randn(B, H_KV, T, D)
    compare(lambda q, k, v: K.attention(q, k, v, causal), lambda q, k, v: K.attention_ref(q, k, v, causal), [q, k, v],
            atol=1e-4, rtol=1e-4)


@needs_triton
def test_attention_fp16_and_model_gqa_convention():
    q, k, v = randn(1, 4, 70, 32, dtype=torch.float16), randn(1, 2, 70, 32, dtype=torch.float16), randn(1, 2, 70, 32, dtype=torch.float16)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True).half()
    torch.testing.assert_close(K.attention(q, k, v), ref, atol=3e-3, rtol=1e-2)


@needs_triton
def test_attention_falls_back_for_a_kv_cache():
    q, k = randn(1, 2, 3, 16), randn(1, 2, 10, 16)                   # 3 new queries against 10 cached keys
    torch.testing.assert_close(K.attention(q, k, k, causal=False), F.scaled_dot_product_attention(q, k, k))


# ---------------------------------------------------------------- gradcheck (float64, finite differences)
@needs_triton
def test_gradcheck_all_functions():
    d = dict(dtype=torch.float64, device=DEV, requires_grad=True)
    x, w, u = torch.randn(5, 7, **d), torch.randn(7, **d), torch.randn(5, 7, **d)
    t = torch.randint(0, 7, (5,), device=DEV)
    gc = lambda f, inp: torch.autograd.gradcheck(f, inp, fast_mode=True)
    assert gc(lambda x, w: K.RMSNormFunction.apply(x, w, 1e-6), (x, w))
    assert gc(K.SoftmaxFunction.apply, (x,))
    assert gc(K.SwiGLUFunction.apply, (x, u))
    assert gc(lambda x: K.CrossEntropyFunction.apply(x, t, -100), (x,))
    h, W = torch.randn(5, 3, **d), torch.randn(7, 3, **d)
    assert gc(lambda h, W: K.linear_cross_entropy(h, W, t, chunk_size=2), (h, W))
    cos, sin = (c.double() for c in _rope_tables(5, 8))
    assert gc(lambda q: K.rope(q, cos, sin), (torch.randn(1, 2, 5, 8, **d),))
    q, k, v = torch.randn(1, 2, 9, 16, **d), torch.randn(1, 1, 9, 16, **d), torch.randn(1, 1, 9, 16, **d)
    assert gc(lambda q, k, v: K.FlashAttentionFunction.apply(q, k, v, True), (q, k, v))


# ---------------------------------------------------------------- fallbacks
def test_bf16_falls_back_under_the_interpreter():
    if not K.INTERPRET: pytest.skip('only meaningful under the Triton interpreter')
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert not K._use_triton(x)
    torch.testing.assert_close(K.rms_norm(x, torch.ones(8, dtype=torch.bfloat16)), K.rms_norm_ref(x, torch.ones(8, dtype=torch.bfloat16)))


def test_without_triton_everything_falls_back():
    code = r'''
import sys; sys.modules['triton'] = None                      # makes `import triton` fail
import torch
from minillm import kernels as K
assert not K.HAS_TRITON and not K.triton_available('cpu')
x = torch.randn(3, 10, requires_grad=True)
torch.testing.assert_close(K.rms_norm(x, torch.ones(10)), K.rms_norm_ref(x, torch.ones(10)))
torch.testing.assert_close(K.softmax(x), torch.softmax(x, -1))
torch.testing.assert_close(K.swiglu(x, x), K.swiglu_ref(x, x))
t = torch.tensor([1, 2, 3])
torch.testing.assert_close(K.cross_entropy(x, t), torch.nn.functional.cross_entropy(x, t))
torch.testing.assert_close(K.linear_cross_entropy(x, torch.randn(5, 10) * 0 + 1, t), torch.tensor(5.0).log())
q = torch.randn(1, 2, 6, 8)
torch.testing.assert_close(K.attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
K.cross_entropy(x, t).backward()
print('fallback ok')
'''
    root = Path(K.__file__).resolve().parents[1]
    env = {**os.environ, 'PYTHONPATH': f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and 'fallback ok' in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------- a short training run, both ways
def _grad_fn_names(t):
    "Names of every autograd node behind tensor t."
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        n = todo.pop()
        if n is None or n in seen: continue
        seen.add(n); names.add(type(n).__name__)
        todo.extend(f for f, _ in n.next_functions)
    return names


def _train(M, kernels, cfg_kernels, steps=3):
    from minillm.core import DEFAULT_CORPUS
    with gzip.open(DEFAULT_CORPUS, 'rt', encoding='utf-8') as f: text = json.loads(f.readline())['text']
    data = torch.tensor(list(text[:20_000].encode('utf-8')))
    cfg = M.ModelConfig.preset('tiny', vocab_size=256, context_length=32, kernels=cfg_kernels)
    torch.manual_seed(0)
    model = M.Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses, names = [], set()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (4,), generator=g)
        x = torch.stack([data[s:s + 33] for s in starts.tolist()])    # (4, 33)
        logits = model(x[:, :-1])
        loss = (K.cross_entropy if kernels == 'triton' else K.cross_entropy_ref)(logits, x[:, 1:])
        names |= _grad_fn_names(loss)
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
    return losses, names


@needs_triton
def test_training_with_triton_kernels_matches_pytorch():
    from minillm import model as M
    ref, _ = _train(M, 'torch', 'torch')
    losses, names = _train(M, 'triton', 'triton')
    used = {'RMSNormFunctionBackward', 'RoPEFunctionBackward', 'FlashAttentionFunctionBackward',
            'SwiGLUFunctionBackward', 'CrossEntropyFunctionBackward'}
    assert used <= names, f'kernels not used: {used - names}'
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), atol=1e-4, rtol=1e-4)
    assert losses[-1] < losses[0] - 0.3


# ---------------------------------------------------------------- bf16 on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize('name', ['rms_norm', 'softmax', 'swiglu', 'rope', 'cross_entropy', 'linear_cross_entropy', 'attention'])
def test_bf16_on_gpu(name):
    if not torch.cuda.is_available() or not K.triton_available('cuda'): pytest.skip('needs a CUDA GPU with triton')
    bf = torch.bfloat16
    torch.manual_seed(0)
    tol = TOL[bf]
    if name == 'rms_norm':
        compare(K.rms_norm, K.rms_norm_ref, [randn(64, 1000, dtype=bf), (torch.rand(1000) + 0.5).to(DEV, bf)], **tol)
    elif name == 'softmax':
        compare(K.softmax, lambda x: torch.softmax(x.float(), -1).to(bf), [randn(64, 3000, dtype=bf, scale=3)], **tol)
    elif name == 'swiglu':
        compare(K.swiglu, K.swiglu_ref, [randn(64, 1000, dtype=bf), randn(64, 1000, dtype=bf)], **tol)
    elif name == 'rope':
        cos, sin = _rope_tables(300, 64)
        compare(lambda q, k: K.apply_rope(q, k, cos, sin), lambda q, k: K.apply_rope_ref(q, k, cos, sin),
                [randn(2, 4, 300, 64, dtype=bf), randn(2, 2, 300, 64, dtype=bf)], **tol)
    elif name == 'cross_entropy':
        t = torch.randint(0, 50257, (64,), device=DEV)
        compare(lambda l: K.cross_entropy(l, t), lambda l: K.cross_entropy_ref(l, t), [randn(64, 50257, dtype=bf, scale=3)], atol=1e-2, rtol=1e-2)
    elif name == 'linear_cross_entropy':
        t = torch.randint(0, 50257, (256,), device=DEV)
        compare(lambda h, W: K.linear_cross_entropy(h, W, t), lambda h, W: K.linear_cross_entropy_ref(h, W, t),
                [randn(256, 768, dtype=bf), randn(50257, 768, dtype=bf, scale=0.05)], atol=2e-2, rtol=2e-2)
    else:
        for D in (64, 128):
            q, k, v = (randn(2, 4, 1000, D, dtype=bf) for _ in range(3))
            compare(K.attention, lambda q, k, v: F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(bf),
                    [q, k, v], **tol)


def test_language_model_loss_runs_this_modules_fused_loss_for_triton_models():
    from minillm.model import ModelConfig, Transformer
    from minillm.train import LanguageModelLoss, linear_cross_entropy
    assert LanguageModelLoss(Transformer(ModelConfig.preset('tiny', kernels='triton'))).fused_loss is K.linear_cross_entropy
    assert LanguageModelLoss(Transformer(ModelConfig.preset('tiny'))).fused_loss is linear_cross_entropy
