"The package's shape: a cheap, documented `import sft_nb`, one module per public name, and the house style kept."
import importlib, subprocess, sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import style_metrics


def test_import_is_cheap_and_documented():
    code = ("import sys, sft_nb\n"
            "assert sft_nb.__doc__.startswith('Supervised fine-tuning'), sft_nb.__doc__\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "print(sft_nb.__version__)\n")
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == importlib.import_module('sft_nb').__version__


def test_trl_names_at_top_level():
    import sft_nb
    trl_names = ['SFTConfig', 'SFTTrainer', 'ModelConfig', 'ScriptArguments', 'DatasetMixtureConfig',
                 'get_peft_config', 'get_quantization_config', 'clone_chat_template',
                 'DataCollatorForLanguageModeling']
    for name in trl_names:
        assert name in sft_nb.__all__, name
    assert sft_nb.SFTTrainer.__module__ == 'sft_nb.trainer'


def test_every_exported_name_resolves_to_its_module():
    import sft_nb
    for name in sft_nb.__all__:
        obj = getattr(sft_nb, name)
        module = importlib.import_module(f'sft_nb.{sft_nb._LAZY[name]}')
        assert getattr(module, name) is obj, name


def test_a_name_per_thing():
    "No public name is defined in two modules, so `sft_nb.X` is never ambiguous"
    from sft_nb._modidx import d
    defined = Counter()
    for module, symbols in d['syms'].items():
        for symbol in symbols:
            name = symbol[len(module) + 1:]
            if '.' not in name and not name.startswith('_'):
                defined[name] += 1
    twice = sorted(name for name, n in defined.items() if n > 1)
    assert not twice, f"defined in more than one module: {twice}"


def test_house_style():
    "One statement per line, no line over 120 characters, short export cells (issue 17's targets)"
    m = style_metrics.measure()
    assert m['multi_statement_lines'] == 0, m['multi_statement_where']
    assert m['notebook_multi_statement_lines'] == 0
    assert m['lines_over_120'] == 0
    assert m['notebook_lines_over_120'] == 0
    assert m['lines_over_100_pct'] < 8
    assert m['export_cell_lines_max'] <= 60
    assert m['export_cell_lines_median'] <= 12
