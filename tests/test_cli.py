"The `sft-nb` console script as pip installs it."
import os, subprocess, sys, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_console_script_exits_zero(tmp_path):
    "The function pyproject.toml names for `sft-nb`, run as its console wrapper runs it (`sys.exit(f())`), trains and exits 0"
    target = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['scripts']['sft-nb']
    module, func = target.split(':')
    code = f"import sys; from {module} import {func}; sys.argv = ['sft-nb', '--output_dir', {str(tmp_path/'demo')!r}, '--max_steps', '2']; sys.exit({func}())"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONPATH': str(ROOT)})
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert 'trained 2 steps; model saved to' in r.stdout and (tmp_path/'demo'/'model.safetensors').exists()
