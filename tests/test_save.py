"Crash safety (processes killed mid-save), full / LoRA / merged round trips, rotation, disk faults, and pushes to a local Hub server"
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest, torch, transformers
from huggingface_hub import ModelCard
from transformers.trainer_utils import get_last_checkpoint

from sft_nb.tiny import tiny_model, tiny_tokenizer, save_tiny
from sft_nb import save as S
from sft_nb import checkpoints as C

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer

transformers.logging.set_verbosity_error()
IDS = torch.tensor([[5, 17, 42, 9, 3, 77]])

def logits(m):
    m.eval()
    with torch.no_grad(): return m(IDS).logits

# A trainer script run in a child process (so it can be killed, or pointed at a local Hub before import).
TRAIN = """
import os, sys, time, json, torch, transformers
from pathlib import Path
from transformers import Trainer, TrainingArguments, DataCollatorForLanguageModeling
from sft_nb.tiny import tiny_model, tiny_tokenizer, tiny_dataset
from sft_nb.checkpoints import CrashSafeSaveMixin
transformers.logging.set_verbosity_error()
torch.manual_seed(0)
class T(CrashSafeSaveMixin, Trainer): pass
tok = tiny_tokenizer()
texts = tiny_dataset('text', n=32).map(lambda r: tok(r['text']), remove_columns=['text'])
def make_trainer(out, model=None, eval_dataset=None, **kw):
    kw = {'max_steps': 6, 'save_steps': 2, 'per_device_train_batch_size': 8, 'learning_rate': 1e-2, 'report_to': [], 'use_cpu': True,
          'logging_steps': 1, **kw}
    return T(model=model or tiny_model(tokenizer=tok), args=TrainingArguments(str(out), **kw), train_dataset=texts,
             processing_class=tok, data_collator=DataCollatorForLanguageModeling(tok, mlm=False), eval_dataset=eval_dataset)
def lora_model():
    from peft import LoraConfig, get_peft_model
    base = transformers.AutoModelForCausalLM.from_pretrained(os.environ['BASE'])
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], task_type='CAUSAL_LM'))
"""

def run_py(code, env=None, timeout=300, **kw):
    env = {**os.environ, 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.run([sys.executable, '-c', TRAIN + textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout, **kw)

def spawn(code, env=None):
    env = {**os.environ, 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.Popen([sys.executable, '-c', TRAIN + textwrap.dedent(code)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def wait_for(pred, proc, timeout=120):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None: pytest.fail(f"child exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail('timed out waiting for the child')
        time.sleep(0.02)

@pytest.fixture(scope='module')
def base(tmp_path_factory): return save_tiny(tmp_path_factory.mktemp('base')/'tiny')

# ---------------------------------------------------------------- crash safety

def test_kill_during_checkpoint_keeps_previous(tmp_path):
    "SIGKILL while checkpoint-4 is being written: checkpoint-2 stays complete and loadable, and training resumes from it"
    out = tmp_path/'run'
    proc = spawn(f"""
    orig = T._save_rng_state
    def slow(self, d):
        orig(self, d)
        if self.state.global_step == 4: print('IN_SAVE', flush=True); time.sleep(60)
    T._save_rng_state = slow
    make_trainer({str(out)!r}).train()
    """)
    wait_for(lambda: (out/'_tmp-checkpoint-4'/'checkpoint-4'/'rng_state.pth').exists(), proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out/'checkpoint-4').exists()
    assert get_last_checkpoint(str(out)) == str(out/'checkpoint-2')
    ck = out/'checkpoint-2'
    S.verify_saved(ck)
    assert json.loads((ck/'trainer_state.json').read_text())['global_step'] == 2
    transformers.AutoModelForCausalLM.from_pretrained(ck)
    r = run_py(f"""
    tr = make_trainer({str(out)!r})
    tr.train(resume_from_checkpoint=True)
    print(json.dumps({{'step': tr.state.global_step, 'dirs': sorted(p.name for p in Path({str(out)!r}).iterdir())}}))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['step'] == 6
    assert res['dirs'] == ['checkpoint-2', 'checkpoint-4', 'checkpoint-6']  # the killed save's temp folder was cleaned

def test_kill_during_background_flush_keeps_checkpoint(tmp_path):
    "SIGKILL after checkpoint-2 is renamed into place but before its flush finished: the kernel keeps it, resume uses it"
    out = tmp_path/'run'
    proc = spawn(f"""
    import sft_nb.checkpoints as C
    from transformers import TrainerCallback
    def stuck(path, walk=True): time.sleep(60)  # the flush never finishes
    C._fsync_strict = stuck
    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw): os.kill(os.getpid(), 9)
    tr = make_trainer({str(out)!r})
    tr.add_callback(Kill())
    tr.train()
    """)
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    ck = out/'checkpoint-2'
    manifest = json.loads((ck/'_manifest.json').read_text())
    assert manifest['durable'] is False and S.torn_because(ck) is None  # not flushed, but whole: same boot
    r = run_py(f"""
    tr = make_trainer({str(out)!r})
    tr.train(resume_from_checkpoint=True)
    print(json.dumps({{'step': tr.state.global_step, 'dirs': sorted(p.name for p in Path({str(out)!r}).iterdir())}}))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['step'] == 6 and res['dirs'] == ['checkpoint-2', 'checkpoint-4', 'checkpoint-6']
    assert all(json.loads((out/d/'_manifest.json').read_text())['durable'] for d in res['dirs'])  # checkpoint-2: at resume

def test_torn_checkpoint_on_resume_falls_back(tmp_path, caplog):
    "A power loss tore the newest checkpoint (not flushed, written before a restart): resume takes the one before, says so"
    ns = {}
    exec(TRAIN, ns)
    out = tmp_path/'run'
    tr = ns['make_trainer'](out)
    tr.train()
    losses = {h['step']: h['loss'] for h in tr.state.log_history if 'loss' in h}
    ck = out/'checkpoint-6'
    manifest = json.loads((ck/'_manifest.json').read_text())
    (ck/'_manifest.json').write_text(json.dumps({**manifest, 'durable': False, 'boot_id': 'before the power loss'}))
    resumed = ns['make_trainer'](out, max_steps=8)
    with caplog.at_level('WARNING', logger='sft_nb.checkpoints'):
        resumed.train(resume_from_checkpoint=True)
    assert (f"{ck} may be torn (the machine restarted before its flush to disk finished): "
            "resuming from checkpoint-4 instead.") in caplog.text
    again = {h['step']: h['loss'] for h in resumed.state.log_history if 'loss' in h}
    for step in (5, 6): assert again[step] == pytest.approx(losses[step], rel=1e-5), step  # retrained from step 4
    assert S.torn_because(ck) is None and json.loads((ck/'_manifest.json').read_text())['durable']  # rewritten
    last = out/'checkpoint-8'
    torn = {**json.loads((last/'_manifest.json').read_text()), 'durable': False, 'boot_id': 'before the power loss'}
    (last/'_manifest.json').write_text(json.dumps(torn))
    with pytest.raises(ValueError, match=f"Cannot resume from {last}: the machine restarted before its flush"):
        ns['make_trainer'](out, max_steps=10).train(resume_from_checkpoint=str(last))  # a path given: refused

def test_background_flush_error_surfaces_and_rotation_keeps_last_durable(tmp_path, monkeypatch, caplog):
    "The flush of checkpoint-4 fails: the error is logged at once and raised by the next save; checkpoint-2 is not rotated"
    ns = {}
    exec(TRAIN, ns)
    fsync = C._fsync_strict
    def failing(path, walk=True):
        if path.name == 'checkpoint-4': raise OSError(5, 'Input/output error')
        fsync(path, walk)
    monkeypatch.setattr(C, '_fsync_strict', failing)
    out = tmp_path/'run'
    tr = ns['make_trainer'](out, save_total_limit=1)
    with pytest.raises(OSError, match=f"Flushing {out/'checkpoint-4'} to disk failed: .*Input/output error"):
        tr.train()
    assert f"Flushing {out/'checkpoint-4'} to disk failed" in caplog.text  # logged when it happened
    assert sorted(p.name for p in out.iterdir()) == ['checkpoint-2', 'checkpoint-4']  # no checkpoint-6
    assert S.is_durable(out/'checkpoint-2') and not S.is_durable(out/'checkpoint-4')
    S.verify_saved(out/'checkpoint-4')  # in place and complete, only not confirmed on disk

def test_kill_during_final_save_keeps_previous(tmp_path):
    "SIGKILL in the middle of `save_model`: the previous save in the folder still loads, with its own logits"
    tok = tiny_tokenizer()
    first = tiny_model(tokenizer=tok, seed=1)
    S.save_model(first, tmp_path/'final', tok)
    proc = spawn(f"""
    import sft_nb.save as S
    orig = S._write_weights
    def slow(*a, **k):
        orig(*a, **k)
        print('WROTE', flush=True)
        time.sleep(60)
    S._write_weights = slow
    S.save_model(tiny_model(tokenizer=tok, seed=2), {str(tmp_path/'final')!r}, tok)
    """)
    wait_for(lambda: any((p/'model.safetensors').exists() for p in tmp_path.glob('_tmp-final*')), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.equal(logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path/'final')), logits(first))

def test_kill_during_trainer_final_save_keeps_previous(tmp_path):
    "SIGKILL while the trainer's save_model stages its files: the previous final save in output_dir still loads, with its logits"
    out = tmp_path/'run'
    proc = spawn(f"""
    import sft_nb.checkpoints as C
    tr = make_trainer({str(out)!r}, max_steps=2, save_strategy='no')
    tr.train()
    tr.save_model()
    torch.save(tr.model.eval()(torch.tensor([[5, 17, 42, 9, 3, 77]])).logits.detach(), {str(tmp_path/'first.pt')!r})
    with torch.no_grad(): [p.add_(1.0) for p in tr.model.parameters()]
    orig = C._write_weights
    def slow(*a, **k):
        orig(*a, **k)
        print('WROTE', flush=True)
        time.sleep(60)
    C._write_weights = slow  # the trainer's save writes through sft_nb.checkpoints
    tr.save_model()
    """)
    wait_for(lambda: (tmp_path/'first.pt').exists() and (out/'_tmp-save'/'model.safetensors').exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    S.verify_saved(out)
    assert torch.allclose(logits(transformers.AutoModelForCausalLM.from_pretrained(out)), torch.load(tmp_path/'first.pt'), atol=1e-6)

def test_disk_full_during_checkpoint(tmp_path, monkeypatch):
    "An OSError (ENOSPC) while writing checkpoint-4 publishes nothing and leaves checkpoint-2 intact"
    ns = {}
    exec(TRAIN, ns)
    tr = ns['make_trainer'](tmp_path/'run', max_steps=4)
    orig = C._write_weights  # the trainer's save writes through sft_nb.checkpoints
    def full(model, path, *a, **k):
        if tr.state.global_step == 4:
            (Path(path)/'model.safetensors').write_bytes(b'\0' * 10)
            raise OSError(28, 'No space left on device')
        return orig(model, path, *a, **k)
    monkeypatch.setattr(C, '_write_weights', full)
    with pytest.raises(OSError, match='checkpoint-4 failed: no space left on the disk .it needs about .* is free.. Earlier checkpoints are untouched') as e:
        tr.train()
    assert e.value.errno == 28
    assert sorted(p.name for p in (tmp_path/'run').iterdir()) == ['checkpoint-2']  # no half-written folder left
    S.verify_saved(tmp_path/'run'/'checkpoint-2')

@pytest.fixture
def small_disk(tmp_path):
    "A real filesystem that can fill up: a tmpfs of a size the test chooses (needs root, as on CI)"
    mounted = []
    def mount(size_bytes):
        d = tmp_path/'disk'
        d.mkdir()
        r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size_bytes}', 'tmpfs', str(d)], capture_output=True, text=True)
        if r.returncode != 0: pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): the full-disk test needs root")
        mounted.append(d)
        return d
    yield mount
    for d in mounted: subprocess.run(['umount', '--lazy', str(d)])  # lazy: the trainer's dataloader may still hold a file open

def test_real_disk_full_during_checkpoint(tmp_path, small_disk):
    "safetensors and torch.save fail on a really full disk (not OSErrors): the previous checkpoint stays, no temp folder is left"
    ns = {}
    exec(TRAIN, ns)
    ns['make_trainer'](tmp_path/'probe', max_steps=2, save_steps=2).train()
    size = sum(f.stat().st_size for f in (tmp_path/'probe'/'checkpoint-2').rglob('*') if f.is_file())
    disk = small_disk(int(size * 1.6))
    tr = ns['make_trainer'](disk/'run', max_steps=6, save_steps=2)
    with pytest.raises(OSError, match='checkpoint-4 failed: no space left on the disk .it needs about') as e:
        tr.train()
    assert e.value.errno == 28
    assert sorted(p.name for p in (disk/'run').iterdir()) == ['checkpoint-2']
    S.verify_saved(disk/'run'/'checkpoint-2')
    assert transformers.AutoModelForCausalLM.from_pretrained(disk/'run'/'checkpoint-2') is not None

def test_real_disk_full_during_final_save(tmp_path, small_disk):
    "The trainer's final save on a full disk: an ENOSPC error naming the folder and the size, and no temp folder left"
    ns = {}
    exec(TRAIN, ns)
    disk = small_disk(256 * 1024)
    tr = ns['make_trainer'](disk/'run', max_steps=1, save_strategy='no')
    tr.train()
    with pytest.raises(OSError, match=f'Saving to {disk}/run failed: no space left on the disk') as e:
        tr.save_model()
    assert e.value.errno == 28
    assert [p.name for p in (disk/'run').iterdir() if p.name.startswith('_tmp')] == []

# ---------------------------------------------------------------- rotation

def test_trainer_rotation_keeps_best(tmp_path):
    "With eval each save and the first checkpoint the best, save_total_limit=1 keeps it and the newest; state points at final paths"
    ns = {}
    exec(TRAIN, ns)
    tr = ns['make_trainer'](tmp_path/'run', save_total_limit=1, eval_strategy='steps', eval_steps=2, metric_for_best_model='eval_loss',
                            greater_is_better=True, eval_dataset=ns['texts'].select(range(8)))  # loss falls: step 2 is "best"
    tr.train()
    assert sorted(p.name for p in (tmp_path/'run').iterdir()) == ['checkpoint-2', 'checkpoint-6']
    assert tr.state.best_model_checkpoint == str(tmp_path/'run'/'checkpoint-2')
    saved = json.loads((tmp_path/'run'/'checkpoint-2'/'trainer_state.json').read_text())
    assert saved['best_model_checkpoint'] == str(tmp_path/'run'/'checkpoint-2')

# ---------------------------------------------------------------- round trips

def test_lora_trainer_roundtrip_card_and_merged(tmp_path, base, monkeypatch):
    "A LoRA run: adapter-only checkpoints with a peft card, final adapter and merged model reload to the trainer's logits"
    from peft import AutoPeftModelForCausalLM
    ns = {}
    monkeypatch.setenv('BASE', str(base))
    exec(TRAIN, ns)
    tr = ns['make_trainer'](tmp_path/'run', model=ns['lora_model'](), max_steps=4, learning_rate=5e-2)
    tr.args.save_merged_model = True
    tr.card_info = {'dataset_name': 'trl-lib/Capybara', 'tags': ['math'], 'license': 'apache-2.0'}
    tr.train()
    ck = tmp_path/'run'/'checkpoint-4'
    assert (ck/'adapter_model.safetensors').exists() and not (ck/'model.safetensors').exists()
    assert not (ck/'merged').exists()  # merged only for the final save
    tr.save_model()
    out = tmp_path/'run'
    card = ModelCard.load(out/'README.md')
    assert card.data.library_name == 'peft' and card.data.base_model is None  # base is a local path
    assert card.data.tags == ['sft', 'sft_nb', 'lora', 'math'] and card.data.license == 'apache-2.0'
    assert 'AutoPeftModelForCausalLM.from_pretrained("./run")' in card.text and str(tmp_path) not in card.text
    assert 'final train loss' in card.text and 'lora_r | 4' in card.text and (out/'loss_curve.png').exists()
    want = logits(tr.model)
    assert torch.allclose(logits(AutoPeftModelForCausalLM.from_pretrained(out)), want, atol=1e-5)
    assert torch.allclose(logits(AutoPeftModelForCausalLM.from_pretrained(ck)), want, atol=1e-5)
    assert torch.allclose(logits(transformers.AutoModelForCausalLM.from_pretrained(out/'merged')), want, atol=1e-5)
    merged_card = ModelCard.load(out/'merged'/'README.md')
    assert merged_card.data.library_name == 'transformers' and 'sft_nb' in merged_card.data.tags
    assert 'AutoModelForCausalLM.from_pretrained("./run", subfolder="merged")' in merged_card.text
    assert transformers.AutoTokenizer.from_pretrained(out/'merged').chat_template == ns['tok'].chat_template
    assert not torch.allclose(logits(transformers.AutoModelForCausalLM.from_pretrained(base)), want, atol=1e-3)  # it did train

def test_qlora_save_merged_is_full_precision(tmp_path, base):
    "merged=True after QLoRA: the adapter merged into the base reloaded in full precision, not requantized into 4-bit weights"
    pytest.importorskip('bitsandbytes')
    from peft import LoraConfig
    from sft_nb.adapters import apply_peft, load_adapter
    from sft_nb.config import ModelConfig
    from sft_nb.models import load_model
    q = apply_peft(load_model(base, model_args=ModelConfig(load_in_4bit=True)), LoraConfig(r=4, target_modules='all-linear', init_lora_weights=False))
    out = S.save_model(q, tmp_path/'q', tiny_tokenizer(), merged=True)
    assert 'quantization_config' not in json.loads((out/'merged'/'config.json').read_text())
    merged = transformers.AutoModelForCausalLM.from_pretrained(out/'merged')
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear and merged.dtype == torch.float32
    assert torch.allclose(logits(merged), logits(load_adapter(out, is_trainable=False)), atol=1e-5)

# ---------------------------------------------------------------- the Hub

def hub_env(hub, tmp_path, xet=False, token=None):
    env = {'HF_ENDPOINT': hub.url, 'HF_HUB_OFFLINE': '0', 'TRANSFORMERS_OFFLINE': '0', 'HF_DATASETS_OFFLINE': '0',
           'HF_HUB_DISABLE_XET': '0' if xet else '1', 'HF_HOME': str(tmp_path/'hf_home'), 'HF_HUB_DISABLE_PROGRESS_BARS': '1'}
    env = {**{k: v for k, v in os.environ.items() if k != 'HF_TOKEN'}, **env}
    if token: env['HF_TOKEN'] = token
    return env

SECRET = 'hf_SECRET_test_token_123'

def test_push_lora_run_and_download(tmp_path, base):
    "hub_strategy=checkpoint: each save pushed (root + last-checkpoint/), then the final push; download gives the same logits"
    with HubServer() as hub:
        r = run_py(f"""
        tr = make_trainer({str(tmp_path/'run')!r}, model=lora_model(), max_steps=4, learning_rate=5e-2, push_to_hub=True,
                          hub_model_id='me/tiny-lora', hub_strategy='checkpoint', hub_token={SECRET!r}, hub_private_repo=True)
        tr.train()
        tr.push_to_hub(commit_message='End of training')
        torch.save(tr.model.eval()(torch.tensor([[5, 17, 42, 9, 3, 77]])).logits.detach(), {str(tmp_path/'want.pt')!r})
        from peft import AutoPeftModelForCausalLM
        got = AutoPeftModelForCausalLM.from_pretrained('me/tiny-lora', token={SECRET!r}).eval()(torch.tensor([[5, 17, 42, 9, 3, 77]])).logits
        torch.save(got.detach(), {str(tmp_path/'got.pt')!r})
        """, env=hub_env(hub, tmp_path) | {'BASE': str(base)})
        assert r.returncode == 0, r.stderr[-4000:]
        assert torch.allclose(torch.load(tmp_path/'got.pt'), torch.load(tmp_path/'want.pt'), atol=1e-6)
        repo = hub.state.repos['me/tiny-lora']
        files = repo.branches['main']
        assert repo.private
        assert {'adapter_model.safetensors', 'adapter_config.json', 'README.md', 'loss_curve.png', 'tokenizer.json'} <= set(files)
        assert 'last-checkpoint/optimizer.pt' in files and 'last-checkpoint/trainer_state.json' in files
        assert 'optimizer.pt' not in files and not any(f.startswith(('checkpoint-', '_')) for f in files)
        assert repo.messages[-1] == 'End of training' and 'Training in progress, step 2' in repo.messages
        card = files['README.md'].decode()
        assert 'library_name: peft' in card and 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-lora")' in card
        for name, data in files.items(): assert SECRET.encode() not in data, name
        for p in (tmp_path/'run').rglob('*'):
            if p.is_file(): assert SECRET.encode() not in p.read_bytes(), p
        assert SECRET not in r.stdout + r.stderr
        writes = [a for m, path, a in hub.state.requests if m in ('POST', 'PUT') and '/_lfs/' not in path]
        assert writes and all(a == f'Bearer {SECRET}' for a in writes)

def test_push_full_model_to_revision_and_download(tmp_path):
    with HubServer() as hub:
        r = run_py(f"""
        from sft_nb.hub import push_to_hub
        from sft_nb.save import save_model
        m = tiny_model(tokenizer=tok)
        save_model(m, {str(tmp_path/'m')!r}, tok, max_shard_size='100KB')
        info = push_to_hub({str(tmp_path/'m')!r}, 'me/full', token={SECRET!r}, revision='dev', commit_message='v1')
        got = transformers.AutoModelForCausalLM.from_pretrained('me/full', revision='dev').eval()
        x = torch.tensor([[5, 17, 42, 9, 3, 77]])
        assert torch.equal(got(x).logits, m.eval()(x).logits)
        print('OK', info.oid)
        """, env=hub_env(hub, tmp_path))
        assert r.returncode == 0, r.stderr[-4000:]
        dev = hub.files('me/full', 'dev')
        assert 'model.safetensors.index.json' in dev and hub.files('me/full', 'main') == {}
        assert 'AutoModelForCausalLM.from_pretrained("me/full")' in dev['README.md'].decode()  # the pushed card names the repo
        assert str(tmp_path) not in dev['README.md'].decode()
        paths = [path for _, path, _ in hub.state.requests]
        assert any(p.endswith('.git/info/lfs/objects/batch') for p in paths) and any(p.startswith('/_lfs/') for p in paths)
        assert not any('/xet-write-token/' in p for p in paths)  # HF_HUB_DISABLE_XET: the regular (LFS) path only

def test_push_retries_server_errors(tmp_path):
    with HubServer() as hub:
        hub.state.fail(2, 500, r'/commit/')
        r = run_py(f"""
        from sft_nb.hub import push_to_hub
        from sft_nb.save import save_model
        save_model(tiny_model(tokenizer=tok), {str(tmp_path/'m')!r}, tok)
        push_to_hub({str(tmp_path/'m')!r}, 'me/flaky', token={SECRET!r}, wait=0.1)
        """, env=hub_env(hub, tmp_path))
        assert r.returncode == 0, r.stderr[-4000:]
        assert 'model.safetensors' in hub.files('me/flaky')
        assert sum(path.endswith('/commit/main') for _, path, _ in hub.state.requests) >= 3

def test_push_gives_up_with_clear_error_and_local_save_intact(tmp_path):
    with HubServer() as hub:
        hub.state.fail(100, 503, r'/commit/')
        r = run_py(f"""
        from sft_nb.hub import push_to_hub, PushError
        from sft_nb.save import save_model, verify_saved
        save_model(tiny_model(tokenizer=tok), {str(tmp_path/'m')!r}, tok)
        try: push_to_hub({str(tmp_path/'m')!r}, 'me/down', token={SECRET!r}, retries=2, wait=0.05)
        except PushError as e: print('PUSHERROR', e)
        verify_saved({str(tmp_path/'m')!r})
        """, env=hub_env(hub, tmp_path))
        assert r.returncode == 0, r.stderr[-4000:]
        assert 'PUSHERROR' in r.stdout and 'after 3 attempts' in r.stdout and 'The local save in' in r.stdout
        assert SECRET not in r.stdout + r.stderr

def test_push_without_token_fails_before_training(tmp_path):
    with HubServer() as hub:
        r = run_py(f"""
        try: make_trainer({str(tmp_path/'run')!r}, push_to_hub=True, hub_model_id='me/x')
        except ValueError as e: print('EARLY', e)
        """, env=hub_env(hub, tmp_path))
        assert r.returncode == 0, r.stderr[-4000:]
        assert 'EARLY' in r.stdout and 'no Hugging Face token' in r.stdout
        assert not hub.state.repos and not (tmp_path/'run').exists()

def test_xet_upload_and_download(tmp_path, base):
    """With hf_xet enabled (the default), huggingface_hub 2.x uploads through Xet: a write token, then xorbs and a shard to the
    CAS server (the test server decodes them back into files), then a commit naming the files by sha256. Download: resolve
    advertises the Xet hash, the client asks CAS for the file's reconstruction and fetches xorb byte ranges."""
    with HubServer() as hub:
        hub.state.xet = True
        r = run_py(f"""
        tr = make_trainer({str(tmp_path/'run')!r}, model=lora_model(), max_steps=2, learning_rate=5e-2, push_to_hub=True,
                          hub_model_id='me/xet', hub_token={SECRET!r}, save_strategy='no')
        tr.train()
        tr.push_to_hub()
        x = torch.tensor([[5, 17, 42, 9, 3, 77]])
        from peft import AutoPeftModelForCausalLM
        got = AutoPeftModelForCausalLM.from_pretrained('me/xet').eval()(x).logits
        assert torch.allclose(got, tr.model.eval()(x).logits, atol=1e-6)
        print('OK')
        """, env=hub_env(hub, tmp_path, xet=True) | {'BASE': str(base)})
        assert r.returncode == 0, r.stderr[-4000:]
        paths = [path for _, path, _ in hub.state.requests]
        assert hub.state.xorbs and hub.state.shards and '/api/models/me/xet/xet-write-token/main' in paths
        assert not any(p.endswith('/info/lfs/objects/batch') for p in paths)  # nothing went the LFS way
        assert any(p.startswith('/cas/v1/reconstructions/') for p in paths) and any(p.startswith('/cas/xorb/') for p in paths)
        assert 'adapter_model.safetensors' in hub.files('me/xet')

def test_xet_unavailable_reports_clearly(tmp_path):
    """A Hub that refuses Xet write tokens (501): the push fails with a clear PushError and the local save is intact."""
    with HubServer() as hub:
        r = run_py(f"""
        from sft_nb.hub import push_to_hub, PushError
        from sft_nb.save import save_model, verify_saved
        save_model(tiny_model(tokenizer=tok), {str(tmp_path/'m')!r}, tok)
        try: push_to_hub({str(tmp_path/'m')!r}, 'me/xet', token={SECRET!r}, retries=1, wait=0.05)
        except PushError as e: print('PUSHERROR', e)
        verify_saved({str(tmp_path/'m')!r})
        """, env=hub_env(hub, tmp_path, xet=True))
        assert r.returncode == 0, r.stderr[-4000:]
        assert 'PUSHERROR' in r.stdout and 'xet-write-token' in r.stdout
        assert any('/xet-write-token/' in path for _, path, _ in hub.state.requests)

@pytest.mark.parametrize('strategy', ['every_save', 'end'])
def test_hub_strategies(tmp_path, strategy):
    "every_save: a root commit per checkpoint and no checkpoint folder; end: nothing until push_to_hub"
    with HubServer() as hub:
        r = run_py(f"""
        tr = make_trainer({str(tmp_path/'run')!r}, max_steps=4, push_to_hub=True, hub_model_id='me/s', hub_strategy={strategy!r},
                          hub_token={SECRET!r}, hub_revision='exp', hub_always_push=True)  # else a save during a push is skipped
        tr.train()
        tr.push_to_hub()
        """, env=hub_env(hub, tmp_path))
        assert r.returncode == 0, r.stderr[-4000:]
        repo = hub.state.repos['me/s']
        want = ['Training in progress, step 2', 'Training in progress, step 4', 'End of training'] if strategy == 'every_save' else ['End of training']
        assert repo.messages == want
        files = hub.files('me/s', 'exp')
        assert 'model.safetensors' in files and not any(f.startswith('last-checkpoint') for f in files)
        assert 'optimizer.pt' not in files and hub.files('me/s', 'main') == {}
        assert 'library_name: transformers' in files['README.md'].decode()

def test_push_to_unreachable_hub(tmp_path):
    "Connection refused: retried, then a PushError naming the folder; nothing lost locally"
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]  # free, and nobody listens on it
    class Dead: url = f'http://127.0.0.1:{port}'
    r = run_py(f"""
    from sft_nb.hub import push_to_hub, PushError
    from sft_nb.save import save_model, verify_saved
    save_model(tiny_model(tokenizer=tok), {str(tmp_path/'m')!r}, tok)
    try: push_to_hub({str(tmp_path/'m')!r}, 'me/nowhere', token={SECRET!r}, retries=1, wait=0.05)
    except PushError as e: print('PUSHERROR', e)
    verify_saved({str(tmp_path/'m')!r})
    """, env=hub_env(Dead, tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    assert 'PUSHERROR' in r.stdout and 'after 2 attempts' in r.stdout and str(tmp_path/'m') in r.stdout

# Families whose saved names differ from their parameter names (transformers 5 converts on load and back on save)
def _renamed_families(vocab):
    small = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return {
        'qwen3_moe': transformers.Qwen3MoeConfig(**small, num_key_value_heads=2, moe_intermediate_size=16, num_experts=4,
                                                 num_experts_per_tok=2),
        'glm4_moe': transformers.Glm4MoeConfig(**small, num_key_value_heads=2, moe_intermediate_size=16, n_routed_experts=4,
                                               num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1),
        'gpt_neox': transformers.GPTNeoXConfig(**small),
        'nemotron_h': transformers.NemotronHConfig(**small, num_key_value_heads=2, hybrid_override_pattern='M*',
                                                   mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=1),
    }

@pytest.mark.parametrize('family', ['qwen3_moe', 'glm4_moe', 'gpt_neox', 'nemotron_h'])
def test_renamed_families_train_with_checkpoints_and_reload(tmp_path, family):
    "Checkpoints and the final save of models transformers renames on save are verified against what it writes"
    from datasets import load_dataset
    from sft_nb import SFTConfig, SFTTrainer
    from sft_nb.tiny import save_tiny_dataset
    tok = tiny_tokenizer()
    cfg = _renamed_families(len(tok))[family]
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    src = tmp_path/'base'
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(src)
    tok.save_pretrained(src)
    ds = load_dataset(str(save_tiny_dataset(tmp_path/'data', n=16)), split='train')
    args = SFTConfig(str(tmp_path/'run'), max_steps=2, save_steps=1, per_device_train_batch_size=4, report_to='none',
                     use_cpu=True, max_length=64, learning_rate=1e-3, logging_steps=1)
    trainer = SFTTrainer(model=str(src), args=args, train_dataset=ds)
    trainer.train()
    trainer.save_model()
    for ck in ('checkpoint-1', 'checkpoint-2'):
        S.verify_saved(tmp_path/'run'/ck, trainer.model)
    S.verify_saved(tmp_path/'run', trainer.model)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path/'run', dtype=trainer.model.dtype)
    torch.testing.assert_close(logits(back), logits(trainer.model))

def test_chat_template_from_a_path_on_gpt_neox(tmp_path):
    "GPT-NeoX (lm_head saved as embed_out) with a chat template taken from another tokenizer folder saves and reloads"
    from sft_nb import SFTConfig, SFTTrainer
    from sft_nb.tiny import tiny_dataset
    base_tok = tiny_tokenizer(chat_template=None)
    cfg = _renamed_families(len(base_tok))['gpt_neox']
    src = tmp_path/'neox'
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    base_tok.save_pretrained(src)
    chat_src = tmp_path/'chat-tok'
    tiny_tokenizer().save_pretrained(chat_src)
    args = SFTConfig(str(tmp_path/'run'), max_steps=2, save_steps=1, per_device_train_batch_size=4, report_to='none',
                     use_cpu=True, max_length=64, chat_template_path=str(chat_src))
    trainer = SFTTrainer(model=str(src), args=args, train_dataset=tiny_dataset('conversational', n=16))
    trainer.train()
    trainer.save_model()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path/'run')
    torch.testing.assert_close(logits(back), logits(trainer.model))

def test_lora_run_resumes_from_its_newest_checkpoint(tmp_path, base, caplog):
    """An SFTTrainer LoRA run resumes from its newest checkpoint: peft's adapter card, which the background flush
    replaces by sft_nb's after the manifest is written, does not make the checkpoint look torn"""
    from peft import LoraConfig
    from sft_nb import SFTConfig, SFTTrainer
    from sft_nb.tiny import tiny_dataset
    def trainer(steps):
        args = SFTConfig(output_dir=str(tmp_path/'run'), max_steps=steps, save_steps=2, logging_steps=1, report_to=[],
                         use_cpu=True, per_device_train_batch_size=2, learning_rate=1e-3, seed=0)
        return SFTTrainer(str(base), args=args, train_dataset=tiny_dataset(n=32), peft_config=LoraConfig(r=4))
    first = trainer(4)
    first.train()
    for ck in ('checkpoint-2', 'checkpoint-4'):
        assert (tmp_path/'run'/ck/'README.md').exists() and S.torn_because(tmp_path/'run'/ck) is None, ck
    again = trainer(6)
    with caplog.at_level('WARNING', logger='sft_nb.checkpoints'):
        again.train(resume_from_checkpoint=True)
    assert 'may be torn' not in caplog.text and again.state.global_step == 6
