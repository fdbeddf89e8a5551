"""Every notebook in nbs/ is a test: run each one in its own process, the way `nbdev-test` does (same skip flags),
and check that each output saved in it is what its cell computes now (`tools/run_notebooks.py`; cells that start
with `# output varies` are run but not compared). Set SFT_NB_TEST_FLAGS='slow gpu' to run flagged cells too."""
import os, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import run_notebooks


@pytest.mark.parametrize('nb', run_notebooks.notebooks(), ids=lambda p: str(p.relative_to(run_notebooks.NBS)))
def test_notebook(nb):
    problems = run_notebooks.check(nb, force_flags=os.environ.get('SFT_NB_TEST_FLAGS', ''))
    assert not problems, '\n'.join(problems) + "\n(if an output changed on purpose: python tools/run_notebooks.py NB)"
