"""Tests for minillm.judge: win rates, length-controlled win rates, Bradley-Terry with bootstrap intervals, Elo and pairwise games."""
import math, random

import pytest
import torch

from minillm.judge import bootstrap_bt, bradley_terry, elo, judge_report, length_controlled_win_rates, pairwise_games, win_rate


def test_win_rate():
    assert win_rate([1, 0, 0.5, 1]) == pytest.approx(0.625)
    with pytest.raises(ValueError): win_rate([])


def test_length_control_recovers_the_true_intercepts():
    g = torch.Generator().manual_seed(0)
    d_a, d_b = torch.randn(3000, generator=g) * 40 - 50, torch.randn(3000, generator=g) * 40 + 50
    s = torch.cat([d_a, d_b]).std()
    y_a = torch.bernoulli(torch.sigmoid(1.0 + 2.0 * torch.tanh(d_a / s)), generator=g)
    y_b = torch.bernoulli(torch.sigmoid(-0.5 + 2.0 * torch.tanh(d_b / s)), generator=g)
    lc = length_controlled_win_rates({'a': y_a.tolist(), 'b': y_b.tolist()}, {'a': d_a.tolist(), 'b': d_b.tolist()})
    assert lc['lc_win_rate']['a'] == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.04)
    assert lc['lc_win_rate']['b'] == pytest.approx(torch.sigmoid(torch.tensor(-0.5)).item(), abs=0.04)
    assert lc['length_slope'] == pytest.approx(2.0, abs=0.25)


def test_bradley_terry_recovers_ratings_and_bootstrap_covers_them():
    true = {'x': 1000, 'y': 1100, 'z': 1300}
    rng = random.Random(1)
    games = []
    for _ in range(800):
        gs = []
        for a, b in (('x', 'y'), ('y', 'z'), ('x', 'z')):
            p = 1 / (1 + 10 ** ((true[b] - true[a]) / 400))
            gs.append((a, b, 1.0 if rng.random() < p else 0.0))
        games.append(gs)
    bt = bootstrap_bt(games, ['x', 'y', 'z'], n_boot=30)
    for m, r in true.items():
        assert bt[m][0] == pytest.approx(r, abs=45) and bt[m][1] <= bt[m][0] <= bt[m][2]
    assert bt['x'] == (1000.0, 1000.0, 1000.0)                               # the first model anchors the scale
    e = elo([g for gs in games for g in gs])
    assert e['x'] < e['y'] < e['z']
    # soft outcomes: two equal players
    assert bradley_terry([('a', 'b', 0.5)] * 10)['b'] == pytest.approx(1000, abs=1)


def test_pairwise_games_and_report():
    scores = {'m1': [0.0, 1.0, 2.0], 'm2': [1.0, 1.0, 0.0]}
    g = pairwise_games(scores, 'rm')
    assert g[0][0][:2] == ('m1', 'm2') and g[0][0][2] == pytest.approx(1 / (1 + math.e))
    ge = pairwise_games({'m1': [1, 0, 1], 'm2': [0, 0, 1]}, 'exact')
    assert [gs[0][2] for gs in ge] == [1.0, 0.5, 0.5]
    rep = judge_report(scores, {'m1': [5, 6, 7], 'm2': [5, 5, 5]}, 'm2', 'rm', n_boot=10)
    assert rep['win_rate']['m1'] == pytest.approx((1 / (1 + math.e) + 0.5 + 1 / (1 + math.exp(-2))) / 3)
    assert set(rep) >= {'lc_win_rate', 'bradley_terry', 'elo', 'mean_length'}
