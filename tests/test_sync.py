"The package is what the notebooks export, and the notebooks are clean: checked on a copy, so the tree is never changed."
import shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _copy_project(dst):
    shutil.copy(ROOT/'pyproject.toml', dst)
    shutil.copytree(ROOT/'nbs', dst/'nbs', ignore=shutil.ignore_patterns('_site', '.quarto', '*.ipynb_checkpoints'))
    shutil.copytree(ROOT/'sft_nb', dst/'sft_nb', ignore=shutil.ignore_patterns('__pycache__'))

def _run(dst, cmd):
    r = subprocess.run([sys.executable, '-c', cmd], cwd=dst, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def test_package_in_sync_with_notebooks(tmp_path):
    _copy_project(tmp_path)
    _run(tmp_path, "from nbdev.doclinks import nbdev_export; nbdev_export()")
    stale = [p.name for p in sorted((tmp_path/'sft_nb').glob('*.py'))
             if not (ROOT/'sft_nb'/p.name).exists() or (ROOT/'sft_nb'/p.name).read_text() != p.read_text()]
    assert not stale, f"sft_nb/ is out of sync with nbs/ for {stale}: run `nbdev-export` and commit the result."

def test_notebooks_clean(tmp_path):
    _copy_project(tmp_path)
    _run(tmp_path, "from nbdev.clean import nbdev_clean; nbdev_clean()")
    dirty = [str(p.relative_to(tmp_path/'nbs')) for p in sorted((tmp_path/'nbs').rglob('*.ipynb'))
             if p.read_text() != (ROOT/'nbs'/p.relative_to(tmp_path/'nbs')).read_text()]
    assert not dirty, f"notebooks not clean: {dirty}: run `nbdev-clean` and commit the result."

def test_readme_is_generated_from_index():
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'make_readme.py'), '--check'])
    assert r.returncode == 0, "README.md is stale: run `python tools/make_readme.py` (it renders nbs/index.ipynb) and commit it."
