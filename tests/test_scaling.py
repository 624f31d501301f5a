"""Tests for minillm.scaling: compute accounting against published numbers, every fitter on synthetic data with known
parameters, the published refits (Epoch AI, mlfoundations) when ../shared/data is present, file loading, and the sweep."""
import csv, json, math

import numpy as np
import pytest
import torch

from minillm.core import SHARED_DATA, RunDir
from minillm.scaling import (ARCHS, EPOCH_2024, EPOCH_2024_STDERR, HOFFMANN_2022, SWEEP_PRESETS, LSTMConfig, LSTMLM,
                             achieved_mfu, arch_spec, attention_flops_per_token, bootstrap, chinchilla_approach1,
                             chinchilla_approach2, chinchilla_loss, compute_optimal, fit_chinchilla, fit_isoflop,
                             fit_overtraining, fit_power_law, fit_scaling, grow_size, huber_objective, inference_optimal,
                             load_epoch_chinchilla, load_mlfoundations, load_runs, lstm_flops_per_token, lstm_params,
                             lstm_size, overtraining_penalty, power_law, run_sweep, run_sweeps, sweep_data,
                             synthetic_isoflops, tokens_per_param, train_lm, training_cost, training_flops,
                             transformer_size)

A_TRUE = HOFFMANN_2022['beta'] / (HOFFMANN_2022['alpha'] + HOFFMANN_2022['beta'])
needs_data = pytest.mark.skipif(SHARED_DATA is None or not (SHARED_DATA / 'scaling').exists(),
                                reason='../shared/data/scaling is not present (published scaling data)')


# ----------------------------------------------------------------------------- compute accounting
def test_llama3_405b_back_of_envelope():
    r = training_cost(training_flops(405e9, 15.6e12), 'H100', flops_per_gpu=400e12, usd_per_gpu_hour=2.0)
    assert r['flops'] == pytest.approx(3.8e25, rel=0.01)
    assert r['gpu_hours'] == pytest.approx(26e6, rel=0.03)
    assert r['usd'] == pytest.approx(52e6, rel=0.03)
    assert 0.38 <= r['mfu'] <= 0.43


@pytest.mark.parametrize('n,hours,co2', [(7, 184_320, 31.22), (70, 1_720_320, 291.42)])
def test_llama2_gpu_hours_and_co2(n, hours, co2):
    r = training_cost(training_flops(n * 1e9, 2e12), 'A100', mfu=0.4)
    assert r['gpu_hours'] == pytest.approx(hours, rel=0.15) and r['t_co2'] == pytest.approx(co2, rel=0.15)
    assert 0.35 < achieved_mfu(r['flops'], hours, 'A100') < 0.5


def test_attention_term_matches_flop_counter_and_model():
    from torch.utils.flop_counter import FlopCounterMode
    from minillm.model import ModelConfig, count_params, flops_per_token, naive_attention
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as fc: naive_attention(q, k, v).sum().backward()
    assert fc.get_total_flops() == attention_flops_per_token(1, 16, 16) * 16
    cfg = ModelConfig.preset('tiny')
    n = count_params(cfg, embeddings=False) + cfg.vocab_size * cfg.d_model
    assert training_flops(n, 1, cfg.n_layers, cfg.d_model, cfg.context_length) == flops_per_token(cfg)


def test_cost_errors():
    with pytest.raises(ValueError, match='Unknown GPU'): training_cost(1e20, 'TPU9')
    with pytest.raises(ValueError, match='positive'): training_cost(1e20, 'H100', mfu=0)


# ----------------------------------------------------------------------------- fitters on synthetic data
def test_power_law_exact_and_noisy():
    x = np.geomspace(1e6, 1e9, 10)
    fit = fit_power_law(x, 3.0 * x ** -0.076)
    assert fit['exponent'] == pytest.approx(-0.076, abs=1e-12) and fit['coef'] == pytest.approx(3.0, rel=1e-9)
    assert power_law(1e7, fit) == pytest.approx(3.0 * 1e7 ** -0.076)
    noisy = fit_power_law(x, 3.0 * x ** -0.3 * np.exp(np.random.default_rng(0).normal(0, 0.01, x.size)))
    assert noisy['exponent'] == pytest.approx(-0.3, abs=0.02)
    with pytest.raises(ValueError, match='positive'): fit_power_law([1, 2, 3], [1, 0, 2])
    with pytest.raises(ValueError, match='two distinct'): fit_power_law([2, 2], [1, 3])


@pytest.mark.parametrize('C', [1e19, 5.76e23, 1e26])
def test_compute_optimal_is_the_minimum_along_the_isoflop_line(C):
    n, d = compute_optimal(C, HOFFMANN_2022)
    assert 6 * n * d == pytest.approx(C)
    for f in (0.9, 1.1):   # any other split of the same compute is worse
        assert chinchilla_loss(n * f, C / (6 * n * f), HOFFMANN_2022) > chinchilla_loss(n, d, HOFFMANN_2022)
    assert tokens_per_param(C, HOFFMANN_2022) == pytest.approx(d / n)


def test_approach1_recovers_exponents():
    sizes, toks = np.geomspace(1e7, 1e10, 30), np.geomspace(1e8, 2e12, 50)
    N, D = np.repeat(sizes, toks.size), np.tile(toks, sizes.size)
    r = chinchilla_approach1(N, D, chinchilla_loss(N, D, HOFFMANN_2022))
    assert r['N_opt']['exponent'] == pytest.approx(A_TRUE, abs=0.02)
    assert r['D_opt']['exponent'] == pytest.approx(1 - A_TRUE, abs=0.02)
    with pytest.raises(ValueError, match='at least 3'): chinchilla_approach1(N[:100], D[:100], np.ones(100))


def test_approach2_recovers_exponents_and_optima():
    s = synthetic_isoflops([1e18, 1e19, 1e20, 1e21], n_per_budget=7)
    r = chinchilla_approach2(s['C'], s['N'], s['loss'])
    assert r['N_opt']['exponent'] == pytest.approx(A_TRUE, abs=0.002)
    assert r['N_opt']['exponent'] + r['D_opt']['exponent'] == pytest.approx(1.0)
    for p in r['profiles']: assert p['N_opt'] == pytest.approx(compute_optimal(p['flops'], HOFFMANN_2022)[0], rel=0.03)
    # given D explicitly (another FLOP convention) the tokens at the optimum are read off the profile
    r2 = chinchilla_approach2(s['C'], s['N'], s['loss'], D=s['D'] * 0.5)
    assert r2['D_opt']['coef'] == pytest.approx(0.5 * r['D_opt']['coef'], rel=1e-6)
    wide = synthetic_isoflops([1e18, 1e19, 1e20], n_per_budget=11, spread=30)
    assert chinchilla_approach2(wide['C'], wide['N'], wide['loss'], window=5)['N_opt']['exponent'] == pytest.approx(A_TRUE, abs=2e-3)


def test_isoflop_errors():
    with pytest.raises(ValueError, match='no minimum'): fit_isoflop([1, 2, 4], [3.0, 2.9, 2.5])
    with pytest.raises(ValueError, match='at least 3'): fit_isoflop([1, 2], [3.0, 2.0])
    with pytest.raises(ValueError, match='outside'): fit_isoflop([1, 2, 4, 8], [5.0, 4.0, 3.01, 2.02])
    with pytest.raises(ValueError, match='at least 2 budgets'): chinchilla_approach2([1, 1, 1], [1, 2, 3], [3, 2, 3])


def test_huber_gradient_matches_finite_differences():
    s = synthetic_isoflops([1e18, 1e20], n_per_budget=5, noise=0.01)
    args = (np.log(s['N']), np.log(s['D']), np.log(s['loss']), 0.05)
    theta = np.array([5.5, 6.5, 0.4, 0.3, 0.3])
    f, g = huber_objective(theta, *args)
    num = [(huber_objective(theta + h, *args)[0] - huber_objective(theta - h, *args)[0]) / 2e-6 for h in np.eye(5) * 1e-6]
    np.testing.assert_allclose(g, num, rtol=1e-4, atol=1e-8)


def test_approach3_recovers_parameters():
    s = synthetic_isoflops(np.geomspace(1e18, 1e21, 5), n_per_budget=9, spread=6, noise=0.003, seed=2)
    p = fit_chinchilla(s['N'], s['D'], s['loss'], n_starts=16)
    for k in ('E', 'alpha', 'beta'): assert p[k] == pytest.approx(HOFFMANN_2022[k], rel=0.05)
    assert p['beta'] / (p['alpha'] + p['beta']) == pytest.approx(A_TRUE, abs=0.02)
    with pytest.raises(ValueError, match='more than 5'): fit_chinchilla(s['N'][:4], s['D'][:4], s['loss'][:4])


def test_bootstrap_standard_error_and_coverage():
    x = np.random.default_rng(1).normal(5, 3, 900)
    bs = bootstrap(lambda i: {'mean': x[i].mean()}, len(x), n_boot=400)
    assert bs['mean']['std'] == pytest.approx(3 / 30, rel=0.15)                       # sigma / sqrt(n)
    assert bs['mean']['hi'] - bs['mean']['lo'] == pytest.approx(2 * 1.645 * 0.1, rel=0.2) and bs['mean']['lo'] < x.mean() < bs['mean']['hi']
    s = synthetic_isoflops([1e18, 1e19, 1e20], n_per_budget=7, noise=0.005, seed=3)
    ci = bootstrap(lambda i: {'a': chinchilla_approach2(s['C'][i], s['N'][i], s['loss'][i])['N_opt']['exponent']},
                   len(s['N']), n_boot=150, groups=s['C'])
    assert ci['a']['lo'] < A_TRUE < ci['a']['hi']
    def only_full(i):   # fails on every resample that repeats a row, i.e. on all of them
        if len(set(i)) < len(i): raise ValueError('degenerate resample')
        return {'m': 1.0}
    with pytest.raises(ValueError, match='could be fitted'): bootstrap(only_full, 50, n_boot=5)


def test_overtraining_penalty_and_inference_optimum():
    p = {'E': 1.8, 'A': 170.0, 'B': 290.0, 'alpha': 0.27, 'beta': 0.27, 'eta': 0.27}
    m_star = (p['B'] / p['A']) ** (1 / p['eta'])
    assert overtraining_penalty(m_star, p) == pytest.approx(1.0)
    C = 1e21
    for m in (20, 640):
        n = math.sqrt(C / (6 * m)); n0 = math.sqrt(C / (6 * m_star))
        ratio = (chinchilla_loss(n, m * n, p) - p['E']) / (chinchilla_loss(n0, m_star * n0, p) - p['E'])
        assert overtraining_penalty(m, p) == pytest.approx(ratio)
    n_c, d_c = compute_optimal(1e21, p)
    target = float(chinchilla_loss(n_c, d_c, p))
    assert inference_optimal(target, 0, p)['N'] == pytest.approx(n_c, rel=1e-3)
    served = inference_optimal(target, 1e13, p)
    assert served['N'] < n_c and served['tokens_per_param'] > d_c / n_c
    assert float(chinchilla_loss(served['N'], served['D'], p)) == pytest.approx(target)
    with pytest.raises(ValueError, match='irreducible'): inference_optimal(1.0, 0, p)


def test_fit_overtraining_recovers_a_shared_exponent():
    p = {'E': 1.9, 'A': 150.0, 'B': 250.0, 'alpha': 0.28, 'beta': 0.28}
    N = np.array([1e7, 8e7, 1.5e8, 4e8, 1e7, 8e7])
    D = N * np.array([20, 20, 20, 20, 320, 320])
    r = fit_overtraining(N, D, chinchilla_loss(N, D, p))
    assert r['eta'] == pytest.approx(0.28, abs=1e-3) and r['E'] == pytest.approx(1.9, abs=0.01)


# ----------------------------------------------------------------------------- published data
@needs_data
def test_epoch_ai_refit_reproduced():
    ep = load_epoch_chinchilla()
    assert len(ep['N']) == 240
    fit = fit_chinchilla(ep['N'], ep['D'], ep['loss'], n_starts=16)
    for k, v in EPOCH_2024.items(): assert abs(fit[k] - v) < 0.25 * EPOCH_2024_STDERR[k], k
    assert 15 < tokens_per_param(5.76e23, fit) < 25
    published = json.loads((SHARED_DATA / 'scaling' / 'epoch_chinchilla' / 'fitted_params.json').read_text())
    assert published['epoch2024']['B'] == EPOCH_2024['B'] and published['hoffmann2022']['E'] == HOFFMANN_2022['E']


@needs_data
def test_mlfoundations_predictions_reproduced():
    d = load_mlfoundations()
    assert len(d['N']) == 104 and set(d['dataset']) == {'c4_original', 'rpj', 'rw_original'}
    small = ('d=96_l=8_h=4', 'd=512_l=8_h=4', 'd=576_l=24_h=8', 'd=1024_l=24_h=8')
    r = d['dataset'] == 'rpj'
    fit_rows = r & (((d['M'] == 20) & np.isin(d['model'], small)) | ((d['M'] == 320) & (d['model'] == small[0])))
    p = fit_overtraining(d['N'][fit_rows], d['D'][fit_rows], d['loss'][fit_rows])
    err = lambda model, m: abs(chinchilla_loss(d['N'][i := np.nonzero(r & (d['model'] == model) & (d['M'] == m))[0][0]],
                                               d['D'][i], p) / d['loss'][i] - 1) * 100
    assert err('open_lm_1b', 640) == pytest.approx(0.7103, abs=1e-3)
    assert err('open_lm_7b', 20) == pytest.approx(0.7320, abs=1e-3)


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='not found'): load_epoch_chinchilla(tmp_path / 'nope')


# ----------------------------------------------------------------------------- files of runs
def test_load_runs_formats(tmp_path):
    s = synthetic_isoflops([1e18, 1e19], n_per_budget=4)
    recs = [{'Model Size': n, 'Training FLOP': c, 'loss': l} for n, c, l in zip(s['N'], s['C'], s['loss'])]
    with open(tmp_path / 'a.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0])); w.writeheader(); w.writerows(recs)
    (tmp_path / 'b.json').write_text(json.dumps({'runs': [{'N': n, 'D': d, 'loss': l, 'arch': 'x'} for n, d, l in
                                                          zip(s['N'], s['D'], s['loss'])]}))
    a, b = load_runs(tmp_path / 'a.csv'), load_runs(tmp_path / 'b.json')
    np.testing.assert_allclose(a['D'], s['D']); np.testing.assert_allclose(b['C'], s['C'])
    assert list(b['arch']) == ['x'] * 8
    (tmp_path / 'c.json').write_text(json.dumps([{'N': 1, 'D': 'many', 'loss': 2}]))
    with pytest.raises(ValueError, match='non-number'): load_runs(tmp_path / 'c.json')
    (tmp_path / 'd.txt').write_text('x')
    with pytest.raises(ValueError, match='.json or .csv'): load_runs(tmp_path / 'd.txt')
    (tmp_path / 'e.json').write_text(json.dumps([{'N': -1, 'D': 2, 'loss': 2}]))
    with pytest.raises(ValueError, match='positive'): load_runs(tmp_path / 'e.json')


def test_fit_scaling_writes_results(tmp_path):
    s = synthetic_isoflops([1e18, 1e19, 1e20, 1e21], n_per_budget=6, noise=0.002, seed=4)
    (tmp_path / 'runs.json').write_text(json.dumps([{'N': n, 'D': d, 'budget': c, 'loss': l}
                                                    for n, d, c, l in zip(s['N'], s['D'], s['C'], s['loss'])]))
    out = fit_scaling(tmp_path / 'runs.json', out_dir=tmp_path / 'out', n_boot=20, n_starts=16)
    f = out['fits']['all']
    assert f['approach2']['N_opt']['exponent'] == pytest.approx(A_TRUE, abs=0.02)
    assert f['approach3']['a'] == pytest.approx(A_TRUE, abs=0.02)
    assert json.loads((tmp_path / 'out' / 'scaling_fit.json').read_text())['n_runs'] == 24
    assert (tmp_path / 'out' / 'scaling_fit.png').stat().st_size > 1000
    (tmp_path / 'two.json').write_text(json.dumps([{'N': 1e6, 'D': 1e8, 'loss': 3.0}, {'N': 2e6, 'D': 1e8, 'loss': 2.9}]))
    with pytest.raises(ValueError, match='too few runs'): fit_scaling(tmp_path / 'two.json')


# ----------------------------------------------------------------------------- models and the sweep
def test_lstm_shapes_params_and_flops():
    cfg = LSTMConfig(vocab_size=50, context_length=8, d_model=16, n_layers=2)
    m = LSTMLM(cfg)
    assert m(torch.randint(0, 50, (2, 8))).shape == (2, 8, 50)
    assert lstm_params(cfg) == m.num_params() and lstm_params(cfg, False) == m.num_params(False)
    assert lstm_flops_per_token(cfg) == 6 * (2 * 4 * 16 * 32 + 50 * 16)
    with pytest.raises(ValueError, match='positive integer'): LSTMConfig(d_model=0)


def test_sizes_and_growth():
    t = transformer_size(48)
    assert t['d_model'] % t['n_heads'] == 0 and t['d_model'] // t['n_heads'] >= 16
    spec = arch_spec('transformer', t, 512, 64)
    assert spec['config']['tie_embeddings'] is False and spec['N'] > 0
    grown = grow_size('transformer', t, 4 * spec['N'], 512, 64)
    assert grown['config']['n_layers'] == 2 and 3 < grown['N'] / spec['N'] < 5
    assert arch_spec('lstm', lstm_size(32), 512, 64)['N'] == lstm_params(LSTMConfig(vocab_size=512, d_model=32), False)
    with pytest.raises(ValueError, match='Unknown arch'): arch_spec('rnn', {}, 10, 10)
    with pytest.raises(ValueError, match='dicts'): arch_spec('lstm', 'tiny', 10, 10)


@pytest.fixture(scope='module')
def sweep_run(tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp('sweep'))
    sweep_data(run, vocab_size=300, max_docs=6)
    return run


def test_train_lm_reproduces_train(sweep_run, tmp_path):
    from minillm.data import load_tokens
    from minillm.model import ModelConfig, Transformer
    from minillm.train import TrainConfig, train
    tc = TrainConfig(batch_size=2, max_steps=4, warmup_steps=1, eval_interval=4, eval_steps=2, checkpoint_interval=4, device='cpu')
    cfg = ModelConfig.from_dict({**transformer_size(16), 'vocab_size': 300, 'context_length': 16, 'tie_embeddings': False})
    ref = RunDir(tmp_path / 'ref'); (ref.path / 'tokens').symlink_to(sweep_run.file('tokens').resolve(), target_is_directory=True)
    train(ref, cfg, tc)
    val = [r['val_loss'] for r in ref.read_metrics(stage='train') if 'val_loss' in r][-1]
    tokens = sweep_run.file('tokens')
    ours = train_lm(lambda: Transformer(cfg), load_tokens(tokens / 'train.bin'), load_tokens(tokens / 'val.bin'), tc, 16)
    assert ours['val_loss'] == pytest.approx(val, abs=1e-5)


def test_run_sweep_argument_errors(sweep_run):
    sizes = [transformer_size(d) for d in (4, 8, 16)]
    with pytest.raises(ValueError, match='Unknown arch'): run_sweep(sweep_run, [1e8, 2e8], sizes, arch='gru')
    with pytest.raises(ValueError, match='2 distinct'): run_sweep(sweep_run, [1e8], sizes)
    with pytest.raises(ValueError, match='3 model sizes'): run_sweep(sweep_run, [1e8, 2e8], sizes[:2])
    with pytest.raises(ValueError, match='vocab_size'): run_sweep(sweep_run, [1e8, 2e8], sizes, vocab_size=400, max_docs=6)


def test_tiny_sweep_end_to_end(sweep_run):
    settings = {**SWEEP_PRESETS['tiny']}
    sizes = settings.pop('sizes')
    out = run_sweep(sweep_run, sizes=sizes['lstm'], arch='lstm', **settings)
    assert len(out['runs']) + len(out['skipped']) == 9
    saved = sweep_run.load_json('scaling_lstm.json')
    assert saved['runs'] == json.loads(json.dumps(out['runs'])) and sweep_run.file('scaling_lstm.png').exists()
    assert 'approach2' in out or 'error' in out
    again = run_sweep(sweep_run, sizes=sizes['lstm'], arch='lstm', **settings)   # every run is cached: same numbers, no training
    assert [r['loss'] for r in again['runs']] == [r['loss'] for r in out['runs']]
    assert [r['seconds'] for r in again['runs']] == [r['seconds'] for r in out['runs']]


@pytest.mark.slow
def test_small_sweep_predicts_its_check_run(tmp_path):
    out = run_sweeps(tmp_path, 'small')
    for arch in ARCHS:
        e = out[arch]['extrapolation']
        assert e['relative_error'] < 0.1, (arch, e)
        assert math.isfinite(out[arch]['bootstrap']['a']['estimate'])
    assert out['comparison']['transformer']['slope'] < out['comparison']['lstm']['slope']   # Transformers scale better
