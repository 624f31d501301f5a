"""Run every chapter notebook through nbdev's test machinery, honouring the `#| slow` / `#| cuda` flags."""
from pathlib import Path

import pytest
from nbdev import test as nbdev_test

NBS = Path(__file__).resolve().parents[1] / 'nbs'
NOTEBOOKS = sorted(p for p in NBS.glob('[0-9]*.ipynb'))


def test_notebooks_found():
    assert NOTEBOOKS, f'no chapter notebooks found in {NBS}'


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb, skip_flags):
    ok, seconds = nbdev_test.test_nb(nb, skip_flags=skip_flags, showerr=True)
    assert ok, f'{nb.name} failed (see the traceback above); run `nbdev-test {nb}` to reproduce'
