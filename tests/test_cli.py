"""The `minillm` command line: every verb on one shared tiny run, and the errors a user sees.

The tiny main job (`minillm run --preset tiny`: pretraining, evaluation, SFT, DPO) is built once per test session, even
when the tests are spread over xdist workers; tests that write into a run work on their own copy of it.
"""
import contextlib, fcntl, io, json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

from minillm.cli import build_parser, chat_session, main
from minillm.core import RunDir

VERBS = ['tokenizer', 'data', 'train', 'generate', 'eval', 'webdata', 'scaling', 'sft', 'reward', 'dpo', 'rlhf', 'grpo', 'judge', 'chat', 'run']


def cli(*args) -> tuple[int, str, str]:
    "Run `minillm ARGS` in this process: (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def sections(run: Path) -> dict:
    "The report sections of a run, by title."
    return json.loads((run / 'report.json').read_text())


@pytest.fixture(scope='session')
def base_run(tmp_path_factory) -> Path:
    "A finished `minillm run --preset tiny`, built once per session (shared by xdist workers); do not write into it."
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'): root = root.parent    # the session's folder, shared by the workers
    run = root / 'cli_tiny_run'
    with open(root / 'cli_tiny_run.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / 'cli_tiny_run.done').exists():
            shutil.rmtree(run, ignore_errors=True)
            code, out, err = cli('run', '--run', run, '--preset', 'tiny', '--device', 'cpu')
            assert code == 0, err
            (root / 'cli_tiny_run.done').write_text('ok')
    return run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    "A private copy of the finished tiny run."
    return Path(shutil.copytree(base_run, tmp_path / 'run'))


def test_help_lists_every_verb():
    text = build_parser().format_help()
    for verb in VERBS: assert f'\n    {verb} ' in text or f'\n    {verb}\n' in text, verb
    res = subprocess.run([sys.executable, '-c', 'from minillm.cli import main; main()', '--help'], capture_output=True, text=True)
    assert res.returncode == 0 and all(v in res.stdout for v in VERBS)


def test_main_job_report(base_run):
    titles = list(sections(base_run))
    for t in ['Tokenizer', 'Data', 'Samples', 'Evaluation', 'Supervised fine-tuning', 'DPO', 'Summary']: assert t in titles, titles
    assert titles[-1] == 'Summary'
    results = json.loads((base_run / 'eval_results.json').read_text())
    held = results['tasks']['heldout']
    assert held['n'] > 1000 and held['kind'] == 'perplexity'
    assert 1 < held['scores']['ppl'] < held['chance']['ppl']                      # trained: better than the uniform model
    assert (base_run / 'eval_results.png').stat().st_size > 1000
    sft = json.loads((base_run / 'sft' / 'meta.json').read_text())['results']
    assert sft['after']['response_loss'] < sft['before']['response_loss']
    assert (base_run / 'dpo' / 'model.safetensors').exists()
    summary = sections(base_run)['Summary']
    assert f"perplexity {held['scores']['ppl']:.1f}" in summary and 'SFT | held-out response loss' in summary
    assert {r.get('stage') for r in RunDir(base_run).read_metrics()} >= {'train', 'sft', 'dpo'}


def test_main_job_resumes(run):
    done = [run / 'eval_results.json', run / 'sft' / 'model.safetensors', run / 'dpo' / 'model.safetensors', run / 'tokenizer.json']
    stamps = [p.stat().st_mtime_ns for p in done]
    before = sections(run)
    code, out, err = cli('run', '--run', run, '--device', 'cpu')
    assert code == 0, err
    assert [p.stat().st_mtime_ns for p in done] == stamps                        # nothing retrained or re-evaluated
    after = sections(run)
    assert list(after) == list(before)
    for t in ('Evaluation', 'Supervised fine-tuning', 'DPO'): assert after[t] == before[t]
    code, out, err = cli('run', '--run', run, '--preset', 'cpu')
    assert code == 2 and 'other settings' in err


def test_eval_verb(run, tmp_path):
    task = tmp_path / 'colours.jsonl'
    rows = [('The sky is', [' blue', ' green'], 0), ('Snow is', [' hot', ' cold'], 1), ('Grass is', [' green', ' red'], 0)]
    task.write_text(''.join(json.dumps({'query': q, 'choices': c, 'gold': g}) + '\n' for q, c, g in rows))
    code, out, err = cli('eval', '--run', run, '--tasks', f'heldout,{task}', '--methods', 'acc,acc_norm', '--heldout-tokens', 2000, '--device', 'cpu')
    assert code == 0, err
    results = json.loads((run / 'eval_results.json').read_text())
    assert list(results['tasks']) == ['heldout', 'colours']
    assert results['tasks']['heldout']['n'] == 2000
    assert list(results['tasks']['colours']['scores']) == ['acc', 'acc_norm'] and results['tasks']['colours']['n'] == 3
    assert '| colours | 3 | acc |' in out and '| colours | 3 | acc |' in (run / 'eval_results.md').read_text()
    assert '| colours | 3 | acc_norm |' in sections(run)['Evaluation'] and '| letter |' not in sections(run)['Evaluation']


def test_eval_bad_tasks(run):
    before = (run / 'eval_results.json').read_bytes()
    code, out, err = cli('eval', '--run', run, '--tasks', 'hellaswag,colla')
    assert code == 2 and "Unknown task 'colla'" in err and "did you mean 'copa'" in err
    for t in ('mmlu', 'hellaswag', 'wikitext2', 'heldout'): assert t in err
    assert err.startswith('minillm: error:') and len(err.splitlines()) == 1
    code, out, err = cli('eval', '--run', run, '--tasks', 'heldout', '--methods', 'accuracy')
    assert code == 2 and 'Unknown scoring method' in err
    assert (run / 'eval_results.json').read_bytes() == before                    # a failed evaluation writes nothing


@pytest.mark.parametrize('verb', [['eval'], ['sft'], ['dpo'], ['reward'], ['rlhf'], ['grpo'], ['judge'], ['chat', '--message', 'hi'], ['generate', '--prompt', 'Hi']])
def test_missing_run_dir(verb, tmp_path):
    missing = tmp_path / 'no_such_run'
    code, out, err = cli(verb[0], '--run', missing, *verb[1:])
    assert code == 2 and 'does not exist' in err and str(missing) in err
    assert not missing.exists()                                                  # the failed command did not create it


def test_malformed_records(run, tmp_path):
    bad_sft = tmp_path / 'instructions.jsonl'
    bad_sft.write_text('{"instruction": "Say hi.", "output": "Hi!"}\n{"instruction": "Say bye.", "output": 3}\n')
    code, out, err = cli('sft', '--run', run, '--data', bad_sft, '--force')
    assert code == 2 and f'{bad_sft} line 2' in err and "'output' must be a string" in err
    bad_pairs = tmp_path / 'pairs.jsonl'
    bad_pairs.write_text('{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}\n{"prompt": "Hi?", "chosen": "Hello!"}\n')
    for verb in ('dpo', 'reward'):
        code, out, err = cli(verb, '--run', run, '--data', bad_pairs)
        assert code == 2 and f'{bad_pairs} line 2' in err, err
    broken = tmp_path / 'broken.jsonl'
    broken.write_text('{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}\n{"prompt": \n')
    code, out, err = cli('dpo', '--run', run, '--data', broken, '--force')
    assert code == 2 and f'{broken} line 2: not valid JSON' in err
    assert not (run / 'reward').exists()                                         # nothing half-trained left behind


def test_finished_stage_needs_force(run):
    code, out, err = cli('sft', '--run', run, '--device', 'cpu')
    assert code == 0 and 'already trained' in out and 'held-out response loss' in out
    code, out, err = cli('dpo', '--run', run, '--beta', 0.5)
    assert code == 2 and 'pass --force' in err and '--beta' in err


def test_dpo_variant(run):
    code, out, err = cli('dpo', '--run', run, '--loss', 'ipo', '--beta', 0.5, '--out', 'ipo', '--set', 'steps=12', '--device', 'cpu')
    assert code == 0, err
    assert out.startswith('IPO (beta 0.5): 12 steps')
    meta = json.loads((run / 'ipo' / 'meta.json').read_text())
    assert meta['config']['loss_type'] == 'ipo' and meta['config']['beta'] == 0.5 and meta['config']['steps'] == 12
    assert sections(run)['ipo'].startswith('IPO with beta 0.5, 12 steps')
    code, out, err = cli('dpo', '--run', run, '--set', 'nonsense=1', '--force')
    assert code == 2 and 'Unknown DPOConfig field' in err


def test_reward_rlhf_grpo_judge(run):
    code, out, err = cli('reward', '--run', run, '--device', 'cpu')
    assert code == 0 and out.startswith('Reward model: held-out accuracy'), err
    assert 'Reward model' in sections(run) and (run / 'reward' / 'model.safetensors').exists()
    code, out, err = cli('rlhf', '--run', run, '--device', 'cpu')
    assert code == 0 and out.startswith('PPO (KL coefficient 0.2, adaptive)'), err
    code, out, err = cli('rlhf', '--run', run, '--no-kl', '--out', 'ppo_nokl', '--set', 'steps=6', '--device', 'cpu')
    assert code == 0 and out.startswith('PPO (KL coefficient 0.0)'), err
    cfg = json.loads((run / 'ppo_nokl' / 'meta.json').read_text())['config']
    assert cfg['kl_coef'] == 0 and not cfg['kl_target'] and cfg['steps'] == 6
    assert 'KL coefficient 0.0 (fixed)' in sections(run)['ppo_nokl']
    code, out, err = cli('grpo', '--run', run, '--set', 'sft_steps=30', 'steps=10', '--device', 'cpu')
    assert code == 0 and out.startswith('GRPO on arithmetic: held-out accuracy sft'), err
    assert 'GRPO on arithmetic' in sections(run)
    code, out, err = cli('judge', '--run', run, '--prompts', 8, '--device', 'cpu')
    assert code == 0, err
    judged = json.loads((run / 'judge.json').read_text())
    assert judged['models'] == ['base', 'sft', 'dpo', 'ppo', 'grpo'] and judged['baseline'] == 'sft'
    for m in judged['models']: assert any(line.split()[0] == m for line in out.splitlines()[1:]), (m, out)
    assert '| grpo |' in sections(run)['Judging']


def test_chat(base_run, monkeypatch):
    code, out, err = cli('chat', '--run', base_run, '--message', 'Write a sentence about the sea.', '--seed', 0, '--max-tokens', 16, '--device', 'cpu')
    assert code == 0, err
    again = cli('chat', '--run', base_run, '--message', 'Write a sentence about the sea.', '--seed', 0, '--max-tokens', 16, '--device', 'cpu')[1]
    assert out == again and out.endswith('\n')                                    # seeded: the same answer twice
    monkeypatch.setattr(sys, 'stdin', io.StringIO('Hello!\n\nName a colour.\n/quit\nnever read\n'))
    code, out, err = cli('chat', '--run', base_run, '--seed', 1, '--max-tokens', 8, '--device', 'cpu')
    assert code == 0 and out.strip(), (out, err)
    said = []                                                                    # the loop behind it: one reply per message read
    history = chat_session(RunDir(base_run), ['Hello!', '', '/reset', 'Name a colour.', '/quit', 'never read'], write=said.append, seed=0, max_tokens=8, device='cpu')
    assert len(said) == 3 and said[1] == '(conversation reset)'
    assert history[0] == {'role': 'user', 'content': 'Name a colour.'} and len(history) <= 2
    system = chat_session(RunDir(base_run), ['Hi.'] * 6, write=said.append, system='Be brief.', seed=0, max_tokens=30, device='cpu')
    assert system[0]['role'] == 'system' and system[1]['role'] == 'user'         # long chats drop the oldest turns, never the system message
    code, out, err = cli('chat', '--run', base_run, '--message', 'word ' * 200, '--device', 'cpu')
    assert code == 2 and 'too long' in err
    code, out, err = cli('chat', '--run', base_run, '--stage', 'ppo', '--message', 'hi')
    assert code == 2 and 'no chat checkpoint' in err


def test_webdata(tmp_path):
    pages = tmp_path / 'pages'; pages.mkdir()
    text = ('A lighthouse is a tower that carries a bright lamp and a lens. Its job is to warn ships away from rocks and to mark the entrance of a harbour. '
            'For most of its history the light came from burning oil, and a keeper had to climb the stairs every evening to trim the wicks. '
            'The great step forward was the Fresnel lens, invented in France in the 1820s. Instead of one thick piece of glass it uses many thin rings, '
            'so that a small flame can be seen more than twenty miles away. Each lighthouse flashes in its own pattern, and sailors use these patterns '
            'to tell one coast from another at night. Today most lights are electric and run without a keeper.')
    page = f'<html><body><nav>Home | About</nav><article><p>{text} Call us on (555) 010-4477.</p></article></body></html>'
    (pages / 'a.html').write_text(page); (pages / 'b.html').write_text(page)
    (pages / 'spam.html').write_text('<html><body>' + '<p>Buy cheap deals now!</p>' * 50 + '</body></html>')
    code, out, err = cli('webdata', '--input', pages, '--out', tmp_path / 'out', '--num-proc', 1, '--no-compress')
    assert code == 0, err
    docs = [json.loads(line) for line in (tmp_path / 'out' / 'clean.jsonl').read_text().splitlines()]
    assert len(docs) == 1 and '|||PHONE_NUMBER|||' in docs[0]['text'] and 'lighthouse' in docs[0]['text']
    funnel = json.loads((tmp_path / 'out' / 'funnel.json').read_text())
    assert funnel['docs_in'] == 3 and funnel['docs_out'] == 1
    stages = {r['stage']: r for r in funnel['stages']}
    assert stages['exact_dedup']['removed'] == {'exact_dedup:duplicate': 1} and '1 out' in out and 'exact_dedup:duplicate 1' in out
    code, out, err = cli('webdata', '--input', tmp_path / 'nothing', '--out', tmp_path / 'out2')
    assert code == 2 and 'does not exist' in err


def test_scaling_fit(tmp_path):
    from minillm.scaling import HOFFMANN_2022, synthetic_isoflops
    syn = synthetic_isoflops([1e18, 1e19, 1e20], n_per_budget=7, noise=0.002, seed=1)
    records = [{'N': n, 'D': t, 'budget': c, 'loss': l} for n, t, c, l in zip(*(syn[k].tolist() for k in ('N', 'D', 'C', 'loss')))]
    (tmp_path / 'runs.json').write_text(json.dumps(records))
    code, out, err = cli('scaling', 'fit', '--data', tmp_path / 'runs.json', '--out', tmp_path / 'fit', '--n-boot', 10, '--starts', 8)
    assert code == 0, err
    fit = json.loads((tmp_path / 'fit' / 'scaling_fit.json').read_text())['fits']['all']
    a_true = HOFFMANN_2022['beta'] / (HOFFMANN_2022['alpha'] + HOFFMANN_2022['beta'])
    assert abs(fit['approach2']['N_opt']['exponent'] - a_true) < 0.03
    assert abs(fit['approach3']['alpha'] - HOFFMANN_2022['alpha']) < 0.05 and (tmp_path / 'fit' / 'scaling_fit.png').exists()
    assert 'IsoFLOP profiles: N_opt ~ C^' in out
    (tmp_path / 'bad.csv').write_text('size,loss\n1,2\n')
    code, out, err = cli('scaling', 'fit', '--data', tmp_path / 'bad.csv')
    assert code == 2 and 'needs columns' in err


def test_scaling_sweep(tmp_path):
    run = tmp_path / 'sweep_run'
    code, out, err = cli('scaling', 'sweep', '--run', run, '--preset', 'tiny', '--archs', 'transformer,lstm')
    assert code == 0, err
    for arch in ('transformer', 'lstm'):
        res = json.loads((run / 'scaling' / f'scaling_{arch}.json').read_text())
        assert len(res['runs']) >= 6 and (run / 'scaling' / f'scaling_{arch}.png').exists()
        assert f'](scaling/scaling_{arch}.png)' in sections(run)[f'Scaling sweep ({arch})']
        assert out.count(f'{arch}: {len(res["runs"])} runs') == 1
    assert 'Scaling: architectures compared' in sections(run) and (run / 'scaling' / 'scaling_comparison.png').exists()
    code, out, err = cli('scaling', 'sweep', '--run', run, '--preset', 'tiny', '--archs', 'rnn')
    assert code == 2 and "Unknown architecture(s) ['rnn']" in err
