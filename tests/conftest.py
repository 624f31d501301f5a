"""Test options: `pytest --slow` adds slow tests and `#| slow` notebook cells; `pytest --cuda` adds GPU ones.

The default run spreads tests over two processes (pytest-xdist, see pyproject.toml); each then uses one thread for
PyTorch and OpenMP so that the two processes do not fight over the cores (`pytest -n 0` runs them in one process).
"""
import os

os.environ['IN_TEST'] = '1'   # the whole suite is a test run: notebooks shrink their demos (minillm.core.IN_TEST)
if os.environ.get('PYTEST_XDIST_WORKER'):
    for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'): os.environ.setdefault(var, '1')

import pytest

FLAGS = ('slow', 'cuda')


def pytest_addoption(parser):
    for flag in FLAGS:
        parser.addoption(f'--{flag}', action='store_true', help=f'also run tests and notebook cells flagged {flag}')


def pytest_configure(config):
    config.enabled_flags = {f for f in FLAGS if config.getoption(f'--{f}')}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for flag in FLAGS:
            if flag in item.keywords and flag not in config.enabled_flags:
                item.add_marker(pytest.mark.skip(reason=f'flagged {flag}: run with pytest --{flag}'))


@pytest.fixture
def skip_flags(request):
    "The notebook cell flags to skip in this run."
    return [f for f in FLAGS if f not in request.config.enabled_flags]
