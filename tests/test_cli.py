"""The `sft-nb` command, run as a user types it: `python -m sft_nb.cli ...` (the console script runs the same `cli`)
in a subprocess, checking exit status, output and the files left behind."""
import json, os, socket, subprocess, sys, tomllib, zipfile
from pathlib import Path
import pytest
from sft_nb.tiny import save_tiny, save_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}
FAST = ['--report_to', 'none', '--use_cpu', 'true', '--gradient_checkpointing', 'false', '--save_strategy', 'no']

def start(*args, cwd, stdin=None, env=None) -> tuple:
    "Start `sft-nb args` in `cwd`; most of a short command is importing torch, on one core, so tests start several at once"
    p = subprocess.Popen([sys.executable, '-m', 'sft_nb.cli', *map(str, args)], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**ENV, **(env or {})})
    return p, stdin

def finish(started:tuple, code:int=0) -> subprocess.CompletedProcess:
    "Wait for a command `start`ed; check its exit status"
    p, stdin = started
    out, err = p.communicate(stdin, timeout=600)
    assert p.returncode == code, f"exit {p.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)

def sft_nb(*args, cwd, stdin=None, code=0, env=None): return finish(start(*args, cwd=cwd, stdin=stdin, env=env), code)

def error_line(r) -> str:
    "A user error: no traceback, and the message as the last line of stderr"
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith('sft-nb: error: '), r.stderr[-3000:]
    return line

def snapshot(folder:Path) -> dict:
    "Every file under `folder` with its bytes"
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "A tiny model (hidden size 32, the demo's is 64) and conversations, as a user's local files"
    d = tmp_path_factory.mktemp('tiny')
    save_tiny(d/'model', hidden_size=32)
    save_tiny_dataset(d/'data', n=256)
    return d

def recipe(path:Path, tiny:Path, **kw) -> Path:
    cfg = dict(model_name_or_path=str(tiny/'model'), dataset_name=str(tiny/'data'), max_steps=2, per_device_train_batch_size=4,
               learning_rate=3e-3, report_to='none', use_cpu=True, gradient_checkpointing=False, save_strategy='no',
               assistant_only_loss=True, max_length=128, logging_steps=1) | kw
    path.write_text(''.join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    return path


def test_help_answers_without_torch(tmp_path):
    "`--help` (and each command's) lists --config and the commands first, and never imports torch or transformers"
    r = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'sft_nb.cli', '--help'], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {line.split('|')[-1].strip().split('.')[0] for line in r.stderr.splitlines() if line.startswith('import time:')}
    assert 'sft_nb' in imported and not {'torch', 'transformers', 'datasets', 'accelerate'} & imported
    out = r.stdout
    assert out.startswith('usage: sft-nb') and out.index('--config') < out.index('commands:') < out.index('--learning_rate')
    for cmd in ('train', 'demo', 'preview', 'chat', 'generate', 'merge', 'env'): assert f"\n  {cmd} " in out, cmd
    code = ("import sys\nfrom sft_nb.cli import main\n"
            "for argv in (['-h'], ['help'], ['chat', '--help'], ['generate', '-h'], ['merge', '--help'], ['env', '--help'], ['preview', '--help']):\n"
            "    try: main(argv)\n    except SystemExit as e: assert e.code == 0, argv\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'usage: sft-nb chat' in r.stdout and 'usage: sft-nb merge' in r.stdout and 'usage: sft-nb preview' in r.stdout


def test_console_script_runs_the_demo_and_a_rerun_keeps_the_users_files(tmp_path):
    """The function pyproject.toml names for `sft-nb`, run as its console wrapper runs it (`sys.exit(f())`): the demo trains,
    exit 0. A second demo over the first one's folder replaces what the demo wrote; a file the user added there survives."""
    target = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['scripts']['sft-nb']
    module, func = target.split(':')
    code = f"import sys; from {module} import {func}; sys.argv = ['sft-nb', 'demo', '--max_steps', '2']; sys.exit({func}())"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert '2 steps; model saved to sft_nb_demo' in r.stdout
    demo = tmp_path/'sft_nb_demo'
    assert (demo/'model.safetensors').exists() and (demo/'tiny-model'/'config.json').exists()
    (demo/'notes.txt').write_text('mine')
    first = (demo/'model.safetensors').stat().st_mtime_ns
    sft_nb('demo', '--max_steps', '1', cwd=tmp_path)
    assert (demo/'notes.txt').read_text() == 'mine' and (demo/'model.safetensors').stat().st_mtime_ns != first
    assert 'notes.txt' not in json.loads((demo/'.sft_nb_demo.json').read_text())['written']


def test_a_users_model_is_never_the_demo(tmp_path, tiny):
    "`--model-name-or-path X --dataset-name Y` and `--model_name_or_path=X` train the user's model (hidden size 32), not the demo's"
    spellings = {'dashes': ['--model-name-or-path', tiny/'model', '--dataset-name', tiny/'data', '--max-steps', '1'],
                 'equals': [f"--model_name_or_path={tiny/'model'}", f"--dataset_name={tiny/'data'}", '--max_steps=1']}
    runs = {k: start(*flags, '--output_dir', k, *FAST, cwd=tmp_path) for k, flags in spellings.items()}
    for k, p in runs.items():
        r = finish(p)
        assert 'demo' not in r.stdout and not (tmp_path/k/'tiny-model').exists()
        assert json.loads((tmp_path/k/'config.json').read_text())['hidden_size'] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ['dashes', 'equals']


def test_no_model_is_an_error_not_the_demo(tmp_path, tiny):
    "Options without a model are the user's run missing its model: exit 2, naming the fix, writing nothing"
    runs = [start('--output_dir', 'out', '--max_steps', '2', cwd=tmp_path), start('demo', '--model_name_or_path', tiny/'model', cwd=tmp_path)]
    assert 'No model' in error_line(finish(runs[0], 2))
    assert 'run `sft-nb train' in error_line(finish(runs[1], 2))
    assert not list(tmp_path.iterdir())


def test_no_command_deletes_what_it_did_not_create(tmp_path, tiny):
    """A folder holding a user's file, another run's checkpoint and a `tiny-model/` (what the old demo took for its own and
    deleted) survives every command pointed at it, byte for byte; each refuses it in one line, naming it."""
    out = tmp_path/'out'
    (out/'checkpoint-7').mkdir(parents=True)
    (out/'checkpoint-7'/'trainer_state.json').write_text('{"global_step": 7}')
    (out/'notes.txt').write_text('mine')
    save_tiny(out/'tiny-model')
    before = snapshot(out)
    runs = [start('demo', '--output_dir', out, '--max_steps', '1', cwd=tmp_path),
            start('--model-name-or-path', tiny/'model', '--dataset-name', tiny/'data', '--output_dir', out, *FAST, cwd=tmp_path),
            start('--config', recipe(tmp_path/'r.yaml', tiny, output_dir=str(out), num_processes=1), cwd=tmp_path),
            start('merge', tiny/'model', out, cwd=tmp_path)]
    assert f"{out} is not empty and was not made by `sft-nb demo`" in error_line(finish(runs[0], 2))
    assert f"{out} already holds a training run (checkpoint-7)" in error_line(finish(runs[1], 2))
    r = finish(runs[2], 2)  # `num_processes` in the YAML: through `accelerate launch`, whose training process says why
    assert 'accelerate launch --num_processes 1' in r.stderr and 'already holds a training run' in r.stderr and 'Traceback' not in r.stderr
    assert 'holds no adapter_config.json' in error_line(finish(runs[3], 2))
    assert snapshot(out) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def _losses(run:Path) -> dict:
    state = json.loads((run/'checkpoint-4'/'trainer_state.json').read_text())
    return {h['step']: h['loss'] for h in state['log_history'] if 'loss' in h}

def test_num_processes_2_matches_one_process(tmp_path, tiny):
    """`sft-nb --config r.yaml --num_processes 2` starts two ranks through `accelerate launch` (gloo on CPU); with half the
    batch per rank, the losses equal one process's, and one model is written"""
    r = recipe(tmp_path/'r.yaml', tiny, max_steps=4, save_strategy='steps', save_steps=4)
    one = start('--config', r, '--output_dir', 'one', '--per_device_train_batch_size', '8', cwd=tmp_path)
    two = start('--config', r, '--output_dir', 'two', '--per_device_train_batch_size', '4', '--num_processes', '2',
                '--main_process_port', _free_port(), cwd=tmp_path)
    finish(one)
    two = finish(two)
    assert 'accelerate launch --num_processes 2' in two.stderr and two.stdout.count('model saved to two') == 1
    ckpt = {p.name for p in (tmp_path/'two'/'checkpoint-4').iterdir()}
    assert {'rng_state_0.pth', 'rng_state_1.pth'} <= ckpt  # one per rank: two processes trained
    one, dist = _losses(tmp_path/'one'), _losses(tmp_path/'two')
    assert set(one) == set(dist) == {1, 2, 3, 4}
    for step in one: assert dist[step] == pytest.approx(one[step], rel=1e-4), step
    files = sorted(p.name for p in (tmp_path/'two').iterdir())
    assert files.count('model.safetensors') == 1 and not [f for f in files if 'rank' in f or f.startswith('_tmp')], files


def test_preview_loads_no_weights(tmp_path, tiny):
    "`sft-nb preview` works from a model folder without weights: rows with trained tokens marked, counts, truncation, packing"
    model = tmp_path/'model'
    save_tiny(model)
    (model/'model.safetensors').unlink()
    r = sft_nb('preview', '--config', recipe(tmp_path/'r.yaml', tiny, model_name_or_path=str(model), max_length=96),
               '--rows', '2', '--packing', 'true', cwd=tmp_path)
    out = r.stdout
    assert '256 rows previewed (conversational format); tokens per row: min' in out
    assert 'truncation to max_length=96 (keep_start)' in out and 'packing (on; bfd into rows of 96)' in out
    assert out.count('--- row ') == 2 and out.count('⟦') >= 2
    assert not (tmp_path/'out').exists() and not (tmp_path/'trainer_output').exists()


@pytest.fixture(scope='module')
def lora(tiny, tmp_path_factory):
    "An adapter trained with `sft-nb --use_peft true`, and its merge by `sft-nb merge`"
    d = tmp_path_factory.mktemp('lora')
    sft_nb('--model_name_or_path', tiny/'model', '--dataset_name', tiny/'data', '--output_dir', 'adapter', '--use_peft', 'true',
           '--lora_r', '8', '--learning_rate', '2e-2', '--max_steps', '3', '--assistant_only_loss', 'true', *FAST, cwd=d)
    r = sft_nb('merge', 'adapter', 'merged', cwd=d)
    assert 'saved to merged' in r.stdout
    return d

def test_merge_writes_a_full_model(lora, tiny):
    from safetensors.torch import load_file
    assert (lora/'adapter'/'adapter_config.json').exists() and not (lora/'merged'/'adapter_config.json').exists()
    merged, base = load_file(lora/'merged'/'model.safetensors'), load_file(tiny/'model'/'model.safetensors')
    assert merged.keys() == base.keys()
    assert any(not (merged[k] == base[k]).all() for k in base)  # the adapter's update is in the weights
    r = sft_nb('merge', 'adapter', 'merged', cwd=lora, code=2)
    assert 'already exists and is not empty' in error_line(r)

def test_generate_and_chat(lora):
    "Adapter folder and merged folder answer alike; `chat` answers each stdin line, its first answer as `generate`'s"
    ask = ['--prompt', 'What is 2 + 3?', '--max_new_tokens', '8', '--min_new_tokens', '8']
    runs = [start('generate', 'adapter', *ask, cwd=lora), start('generate', 'merged', *ask, cwd=lora),
            start('chat', 'merged', '--max_new_tokens', '8', '--min_new_tokens', '8', cwd=lora, stdin='What is 2 + 3?\nReverse: abc\n')]
    a, m, c = (finish(p).stdout for p in runs)
    assert a == m and a.strip()
    assert c.startswith(m) and len(c) > len(m)  # the first answer is generate's; a second one follows


def test_env(tmp_path):
    out = sft_nb('env', cwd=tmp_path).stdout
    for pkg in ('sft_nb', 'Python', 'torch', 'transformers', 'peft', 'datasets', 'accelerate', 'CUDA'): assert f"- {pkg}" in out, pkg


def test_user_errors_are_one_line_exit_2(tmp_path, tiny):
    "Each mistake: exit 2, one line saying what and where, no traceback; `--debug` shows the traceback; `train --help` lists all"
    bad, ok, missing = tmp_path/'bad.yaml', recipe(tmp_path/'ok.yaml', tiny), tmp_path/'missing.yaml'
    bad.write_text("output_dir: o\nlearning_rate: 1e-4\nmax_steps: [3\n")
    corrupt = tmp_path/'corrupt.jsonl'
    corrupt.write_text('{"text": "a b"}\n{"text": "c d"\n{"text": "e f"}\n')
    typo, wrong = recipe(tmp_path/'typo.yaml', tiny, lerning_rate=1e-3), recipe(tmp_path/'wrong.yaml', tiny, max_steps='two')
    cases = [(['--config', typo], f"Unknown option `lerning_rate` in the config file {typo}. Did you mean `learning_rate`?"),
             (['--config', ok, '--lerning-rate', '1'], "Unknown option `lerning_rate` in the command line. Did you mean `learning_rate`?"),
             (['--config', wrong], f"`max_steps` in {wrong} must be a whole number, got 'two'"),
             (['--config', ok, '--learning_rate', 'fast'], "On the command line, `--learning_rate`: invalid float value: 'fast'"),
             (['--config', missing], f"Config file {missing} does not exist."),
             (['--config', bad], f"{bad}, line 4: not valid YAML"),
             (['--config', ok, '--dataset_train_split', 'dev'], "Split 'dev' is not in the dataset (it has ['train'])"),
             (['--config', ok, '--accelerate_config', 'zero4'], "accelerate_config 'zero4' is neither a file nor one of sft_nb's profiles"),
             (['--config', ok, '--dataset_name', corrupt], f"Dataset file {corrupt}, line 2, column 15: Expecting ',' delimiter")]
    runs = [start(*argv, cwd=tmp_path) for argv, _ in cases]
    debug, full_help = start('--config', missing, '--debug', cwd=tmp_path), start('train', '--help', cwd=tmp_path)
    for (argv, msg), p in zip(cases, runs): assert msg in error_line(finish(p, 2)), argv
    r = finish(debug, 1)
    assert 'Traceback' in r.stderr and 'FileNotFoundError' in r.stderr
    out = finish(full_help).stdout  # every option, after the short help
    assert out.startswith('usage: sft-nb') and '--lora_target_modules' in out and '--dataset_text_field' in out


def test_resume_from_checkpoint_true(tmp_path, tiny):
    "`--resume_from_checkpoint true` continues the last checkpoint, as `trainer.train(resume_from_checkpoint=True)` does"
    r = recipe(tmp_path/'r.yaml', tiny, save_strategy='steps', save_steps=2, output_dir='run')
    sft_nb('--config', r, cwd=tmp_path)
    out = sft_nb('--config', r, '--max_steps', '3', '--resume_from_checkpoint', 'true', cwd=tmp_path).stdout
    assert 'over 3 steps' in out
    state = json.loads((tmp_path/'run'/'checkpoint-3'/'trainer_state.json').read_text())
    assert [h['step'] for h in state['log_history'] if 'loss' in h] == [1, 2, 3]


RECIPES = ROOT/'recipes'

def test_tiny_recipe_trains(tmp_path):
    """recipes/tiny-cpu.yaml, with the inputs its comment says to make, trains (a few steps here); as with `trl sft`, a default
    config written by `accelerate config` sends the run through `accelerate launch`"""
    save_tiny(tmp_path/'tiny'/'model')
    save_tiny_dataset(tmp_path/'tiny'/'data', n=512)
    hf_home = tmp_path/'hf_home'
    (hf_home/'accelerate').mkdir(parents=True)
    (hf_home/'accelerate'/'default_config.yaml').write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: 'no'\nnum_machines: 1\nnum_processes: 1\nuse_cpu: true\n")
    r = sft_nb('--config', RECIPES/'tiny-cpu.yaml', '--max_steps', '3', cwd=tmp_path, env={'HF_HOME': str(hf_home)})
    assert '3 steps; model saved to tiny-cpu-sft' in r.stdout and (tmp_path/'tiny-cpu-sft'/'model.safetensors').exists()
    assert 'sft-nb: accelerate launch' in r.stderr


def test_accelerate_profiles_ship_in_the_wheel(tmp_path):
    "The accelerate profiles are package data: a built wheel holds all seven, each a valid accelerate config"
    from accelerate.commands.config.config_args import load_config_from_file
    from sft_nb.cli import ACCELERATE_PROFILES, accelerate_config_path
    for name in ACCELERATE_PROFILES: assert load_config_from_file(str(accelerate_config_path(name))).num_processes == 8
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-w', str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    names = zipfile.ZipFile(next(tmp_path.glob('sft_nb-*.whl'))).namelist()
    assert {f'sft_nb/accelerate_configs/{n}.yaml' for n in ACCELERATE_PROFILES} <= set(names)
