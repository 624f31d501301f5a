"""Tests for minillm.model: the pieces against PyTorch, causality, the KV cache, parameter/FLOP accounting and Hugging Face Llama interop."""
import json, math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from minillm.model import (MODEL_PRESETS, KVCache, ModelConfig, RMSNorm, Transformer, apply_rope, causal_mask, config_from_hf,
                           count_params, ffn_dim, flops_per_token, hf_llama_config, load_hf_llama, naive_attention, rope_cache,
                           save_hf_llama)


def _tiny(**kw) -> ModelConfig:
    return ModelConfig.preset('tiny', **kw)


def _model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(_tiny(**kw))
    with torch.no_grad():                                   # non-trivial norm gains and logits of a few units, so mix-ups show
        for n, p in m.named_parameters():
            if n.endswith('norm.weight'): p.uniform_(0.5, 1.5)
            else: p.mul_(5)
    return m.eval()


# ----------------------------------------------------------------------------- config
def test_presets_and_round_trip():
    for name in MODEL_PRESETS:
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cpu = ModelConfig.preset('cpu')
    assert (cpu.n_layers, cpu.d_model, cpu.n_heads, cpu.context_length, cpu.vocab_size) == (4, 256, 4, 256, 8192)
    small = ModelConfig.preset('gpt2-small')
    assert (small.n_layers, small.d_model, small.n_heads, small.context_length, small.vocab_size) == (12, 768, 12, 1024, 50304)
    assert ModelConfig.preset('cpu', vocab_size=1000).vocab_size == 1000
    assert ffn_dim(768) == 2048 and ffn_dim(4096) == 11008


@pytest.mark.parametrize('kw, message', [
    (dict(d_model=250, n_heads=4), 'not divisible by n_heads'),
    (dict(n_heads=4, n_kv_heads=3), 'not divisible by n_kv_heads'),
    (dict(d_model=12, n_heads=4), 'odd'),
    (dict(n_layers=0), 'positive integer'),
    (dict(vocab_size=1.5), 'positive integer'),
    (dict(norm_eps=0.0), 'must be positive'),
    (dict(kernels='cuda'), 'choose one of'),
])
def test_config_errors(kw, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')): ModelConfig(**kw)


def test_preset_errors():
    with pytest.raises(ValueError, match='Unknown ModelConfig preset'): ModelConfig.preset('gpt5')
    with pytest.raises(ValueError, match='Unknown ModelConfig field'): ModelConfig.preset('tiny', n_head=2)
    with pytest.raises(ValueError, match='Unknown ModelConfig field'): Transformer.from_config({'d_model': 64, 'layers': 2})


# ----------------------------------------------------------------------------- pieces
def test_rms_norm_matches_torch():
    x = torch.randn(3, 7, 32) * 4 + 2
    ours = RMSNorm(32, eps=1e-6)
    with torch.no_grad(): ours.weight.normal_()
    ref = nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad(): ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * ours.weight)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 40), n=st.integers(0, 40), shift=st.integers(0, 20), seed=st.integers(0, 2**16))
def test_rope_depends_only_on_relative_position(m, n, shift, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    cos, sin = (t.double() for t in rope_cache(16, 64))
    def score(i, j): return (apply_rope(q, cos[i], sin[i]) * apply_rope(k, cos[j], sin[j])).sum()
    torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=1e-5, rtol=1e-5)   # the tables are float32
    torch.testing.assert_close(apply_rope(q, cos[m], sin[m]).norm(), q.norm(), atol=1e-5, rtol=1e-5)


def test_rope_matches_complex_rotation():
    hd, T, base = 32, 20, 500000.0
    cos, sin = rope_cache(hd, T, base)
    x = torch.randn(2, 3, T, hd, dtype=torch.float64)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    z = torch.complex(x[..., :hd // 2], x[..., hd // 2:]) * torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(apply_rope(x, cos.double(), sin.double()), torch.cat([z.real, z.imag], -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('H, Hkv, Tq, Tk', [(4, 4, 9, 9), (4, 2, 9, 9), (6, 1, 5, 5), (4, 4, 1, 9), (4, 2, 3, 9)])
def test_naive_attention_matches_sdpa(H, Hkv, Tq, Tk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, H, Tq, 8), torch.randn(2, Hkv, Tk, 8), torch.randn(2, Hkv, Tk, 8)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(Tq, Tk), enable_gqa=H != Hkv)
    torch.testing.assert_close(naive_attention(q, k, v), ref, atol=1e-5, rtol=1e-5)
    if Tq == Tk:
        torch.testing.assert_close(naive_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv),
                                   atol=1e-5, rtol=1e-5)


def test_causal_mask_by_hand():
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(3, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


# ----------------------------------------------------------------------------- the model
@settings(max_examples=15, deadline=None)
@given(t=st.integers(1, 63), seed=st.integers(0, 1000))
def test_future_tokens_do_not_change_past_logits(t, seed):
    m = _model(n_kv_heads=2)
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 512, (1, 64), generator=g)
    b = a.clone(); b[:, t:] = torch.randint(0, 512, (1, 64 - t), generator=g)
    with torch.no_grad(): torch.testing.assert_close(m(a)[:, :t], m(b)[:, :t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kw', [{}, dict(n_kv_heads=1), dict(n_kv_heads=2, tie_embeddings=False)])
def test_kv_cache_in_chunks_equals_full_forward(kw):
    m = _model(**kw)
    idx = torch.randint(0, 512, (3, 40))
    with torch.no_grad():
        full = m(idx)
        cache = m.new_cache(batch_size=3, max_len=40)
        parts = [m(idx[:, a:b], cache) for a, b in [(0, 1), (1, 17), (17, 18), (18, 19), (19, 33), (33, 40)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 40


def test_kv_cache_errors():
    m = _model()
    cache = m.new_cache(batch_size=1, max_len=8)
    m(torch.zeros(1, 8, dtype=torch.long), cache)
    with pytest.raises(ValueError, match='full'): m(torch.zeros(1, 1, dtype=torch.long), cache)
    cache.reset()
    with pytest.raises(ValueError, match='batch size 1'): m(torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match='context_length'): KVCache(m.cfg, 1, max_len=65)
    with pytest.raises(ValueError, match='context_length=64'): m(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match='batch dimension'): m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match='integer token ids'): m(torch.zeros(1, 5))


def test_state_dict_is_weights_only_and_safetensors_ready(tmp_path):
    from safetensors.torch import load_file, save_file
    for tie in (True, False):
        m = _model(tie_embeddings=tie)
        sd = m.state_dict()
        assert not any('rope' in k for k in sd) and ('lm_head.weight' in sd) == (not tie)
        save_file(sd, tmp_path / 'w.safetensors')                       # no shared tensors, so this works directly
        m2 = Transformer.from_config(m.cfg.to_dict())
        m2.load_state_dict(load_file(tmp_path / 'w.safetensors'))
        idx = torch.randint(0, 512, (1, 10))
        with torch.no_grad(): assert torch.equal(m(idx), m2.eval()(idx))


def test_initialisation():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1000, context_length=32, d_model=256, n_layers=8, n_heads=4)
    m = Transformer(cfg)
    assert abs(m.tok_emb.weight.std().item() - 0.02) < 1e-3
    assert abs(m.blocks[0].attn.wqkv.weight.std().item() - 0.02) < 1e-3
    for b in m.blocks:
        assert abs(b.attn.wo.weight.std().item() - 0.02 / math.sqrt(16)) < 5e-4
        assert abs(b.ffn.w_down.weight.std().item() - 0.02 / math.sqrt(16)) < 5e-4
        assert torch.equal(b.attn_norm.weight, torch.ones(256))
    idx, targets = torch.randint(0, 1000, (4, 32)), torch.randint(0, 1000, (4, 32))
    with torch.no_grad(): loss = F.cross_entropy(m(idx).flatten(0, 1), targets.flatten())
    assert abs(loss.item() - math.log(1000)) < 0.1     # logits of std ~0.3 at init add about var/2 = 0.05 to ln(V)


def test_backward_reaches_every_parameter():
    m = _model(n_kv_heads=2, tie_embeddings=False).train()
    idx = torch.randint(0, 512, (2, 16))
    F.cross_entropy(m(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    for n, p in m.named_parameters(): assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_bfloat16_model_runs():
    m = _model().to(torch.bfloat16)
    out = m(torch.randint(0, 512, (1, 12)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ----------------------------------------------------------------------------- accounting
@pytest.mark.parametrize('name', list(MODEL_PRESETS))
def test_count_params_matches_the_module(name):
    cfg = ModelConfig.preset(name)
    with torch.device('meta'): m = Transformer(cfg)
    assert m.num_params() == count_params(cfg)
    assert m.num_params(embeddings=False) == count_params(cfg, embeddings=False)


def test_published_sizes():
    assert count_params(ModelConfig.preset('llama2-7b')) == 6_738_415_616      # Llama-2-7B: 6.74B
    assert count_params(ModelConfig.preset('llama3-1b')) == 1_235_814_400      # Llama-3.2-1B: 1.24B
    assert abs(count_params(ModelConfig.preset('gpt2-small')) / 124_439_808 - 1) < 0.01   # GPT-2 small: 124M (other details differ)


@pytest.mark.parametrize('kw', [{}, dict(n_kv_heads=1, tie_embeddings=False)])
def test_flops_per_token_matches_flop_counter(kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = _tiny(**kw)
    m = Transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 64))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
    # 6N counts the norm gains too (6 FLOPs each per token), which are not matmuls
    norm_flops = 6 * (2 * cfg.n_layers + 1) * cfg.d_model * idx.numel()
    assert flops_per_token(cfg, 64) * idx.numel() - norm_flops == counter.get_total_flops()


def test_flops_by_hand():
    assert flops_per_token(ModelConfig.preset('gpt2-small'), 1024) == 6 * (12 * (12 * 768**2 + 2 * 768) + 768 + 50304 * 768) + 12 * 12 * 768 * 1024
    assert abs(flops_per_token(ModelConfig.preset('llama2-7b'), 4096) / 1e9 - 46.09) < 0.01


# ----------------------------------------------------------------------------- Hugging Face interop
HF_CASES = [dict(), dict(n_kv_heads=2, tie_embeddings=False, rope_theta=500000.0), dict(n_kv_heads=1, norm_eps=1e-6)]


@pytest.mark.parametrize('kw', HF_CASES)
@pytest.mark.parametrize('attn', ['sdpa', 'eager'])
def test_logits_match_transformers(tmp_path, kw, attn):
    transformers = pytest.importorskip('transformers')
    ours = _model(**kw)
    save_hf_llama(ours, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32, attn_implementation=attn).eval()
    idx = torch.randint(0, ours.cfg.vocab_size, (2, ours.cfg.context_length))
    with torch.no_grad(): diff = (hf(idx).logits - ours(idx)).abs().max().item()
    assert diff < 1e-4
    back = load_hf_llama(tmp_path)
    assert back.cfg == ours.cfg
    with torch.no_grad(): assert torch.equal(back(idx), ours(idx))


def test_load_a_checkpoint_written_by_transformers(tmp_path):
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
                                      num_key_value_heads=2, max_position_embeddings=48, rms_norm_eps=1e-6, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith('norm.weight'): p.uniform_(0.5, 1.5)
            else: p.mul_(5)
    hf.save_pretrained(tmp_path)
    ours = load_hf_llama(tmp_path)
    assert (ours.cfg.n_layers, ours.cfg.n_kv_heads, ours.cfg.d_ff, ours.cfg.norm_eps) == (3, 2, 160, 1e-6)
    idx = torch.randint(0, 300, (2, 48))
    with torch.no_grad(): assert (hf(idx).logits - ours(idx)).abs().max().item() < 1e-4


def test_hf_config_round_trip_and_errors(tmp_path):
    cfg = _tiny(n_kv_heads=2, tie_embeddings=False)
    hf = hf_llama_config(cfg)
    assert config_from_hf(hf) == cfg and hf['rope_parameters']['rope_theta'] == hf['rope_theta'] == cfg.rope_theta
    with pytest.raises(ValueError, match='not supported'): config_from_hf({**hf, 'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}, 'rope_parameters': None})
    with pytest.raises(ValueError, match="not 'llama'"): config_from_hf({**hf, 'model_type': 'gpt2'})
    with pytest.raises(FileNotFoundError, match='config.json'): load_hf_llama(tmp_path / 'missing')
    save_hf_llama(_model(), tmp_path / 'm')
    (tmp_path / 'm' / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='model.safetensors'): load_hf_llama(tmp_path / 'm')
    save_hf_llama(_model(), tmp_path / 'm2')
    conf = json.loads((tmp_path / 'm2' / 'config.json').read_text())
    (tmp_path / 'm2' / 'config.json').write_text(json.dumps({**conf, 'num_hidden_layers': 3}))
    with pytest.raises(ValueError, match='does not match its config.json'): load_hf_llama(tmp_path / 'm2')
