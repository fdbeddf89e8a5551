"""After training, as a user runs it: `sft-nb export` (GGUF) and `sft-nb merge` in a subprocess, and an
`SFTTrainer` run whose sample answers reach the log, TensorBoard and the model card (issue 23)."""
import os, subprocess, sys
from pathlib import Path
import pytest
from sft_nb.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1',
       'TOKENIZERS_PARALLELISM': 'false'}

def sft_nb(*args, code=0) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, '-m', 'sft_nb.cli', *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert r.returncode == code, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r

def test_export_gguf_command(tmp_path):
    "Both tiny families, Q8_0: a file beside the model, the check printed and in the card; bad input is exit 2"
    for arch in ('llama', 'qwen2'):
        model = save_tiny(tmp_path/arch, arch=arch)
        (model/'README.md').write_text("# tiny\n\n## Framework versions\n\n| | |\n")
        r = sft_nb('export', model, '--gguf', 'q8_0')
        assert (model/'model-q8_0.gguf').is_file()
        assert 'greedy answers agree on 100%' in r.stdout, r.stdout
        assert '| model-q8_0.gguf | Q8_0 |' in (model/'README.md').read_text()
    r = sft_nb('export', tmp_path/'missing', '--gguf', 'f16', code=2)
    assert 'is not a folder' in r.stderr and 'Traceback' not in r.stderr
