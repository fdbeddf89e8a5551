"Every notebook in nbs/ is a test: run each one, in its own process, the way `nbdev-test` does (same skip flags)."
import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'

def _notebooks():
    return sorted(p for p in NBS.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(NBS).parts))

_RUN = """
import sys
from nbdev.config import get_config
from nbdev.test import test_nb
ok, secs = test_nb(sys.argv[1], skip_flags=get_config().tst_flags.split(), force_flags=sys.argv[2].split())
print(f"{sys.argv[1]}: {'ok' if ok else 'FAILED'} in {secs:.1f}s")
sys.exit(0 if ok else 1)
"""

@pytest.mark.parametrize('nb', _notebooks(), ids=lambda p: str(p.relative_to(NBS)))
def test_notebook(nb):
    "Run every cell not flagged with one of `tst_flags` (set SFT_NB_TEST_FLAGS='slow gpu' to run those too)"
    r = subprocess.run([sys.executable, '-c', _RUN, str(nb), os.environ.get('SFT_NB_TEST_FLAGS', '')],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"{nb.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-12000:]}"
