"""Beyond one process (issue 22): FSDP2 and DeepSpeed ZeRO-2/3 through the real `accelerate launch`, and two simulated
nodes through `torchrun --nnodes 2`, two CPU processes over gloo, against one plain process. Full fine-tuning and
LoRA: a checkpointed run, a run killed after its checkpoint and resumed (same losses, token counters and final
weights as the whole run), and a final save that `verify_saved` accepts and that reloads to the same logits as the
live sharded model. Also: the chunked LM head under ZeRO-3 against the full-logits fallback, ZeRO-3 with a saved LM
head (LoRA's modules_to_save) and with gradient accumulation, FSDP2 sharded checkpoints, the warning when an FSDP
profile runs as DDP, and the data split, dataset preparation and saves of two nodes.

Each FSDP2 scenario launches 3 runs of 6 steps on the tiny model, plus one plain run per adapter shared by all. The
DeepSpeed tests share one launch that runs all 15 of their trainings in turn (`ds_runs`): a launch (imports, process
group) costs far more than 6 steps of the tiny model. Measured on this 2-core machine, under load from other jobs:
FSDP2 scenarios about 3 to 4.5 minutes each, the DeepSpeed launch about 2 (all DeepSpeed tests, with their plain
references, about 4), the sharded-checkpoint test 3.3, the DDP warning 0.9, the two-node tests 1.7 and 0.8."""
import json, os, signal, subprocess, sys
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from sft_nb.tiny import save_tiny, tiny_dataset

HERE = Path(__file__).parent
SCRIPT = HERE/'distributed_script.py'
ROOT = HERE.parent

# sft_nb's fsdp2 profile (TRL's) with what a 2-process CPU test changes: 2 processes, no bf16 autocast.
FSDP2_CPU = {'distributed_type': 'FSDP', 'num_processes': 2, 'mixed_precision': 'no'}

def _config(tmp:Path, profile:str, changes:dict) -> Path:
    import yaml
    from sft_nb.cli import accelerate_config_path
    cfg = yaml.safe_load(accelerate_config_path(profile).read_text())
    for k, v in changes.items(): cfg[k] = {**cfg[k], **v} if isinstance(v, dict) else v
    path = tmp/f'{profile}.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return path

def _run(out:Path, *flags, config:Path|None=None, port:int=0, check=True):
    "Run the script in one plain process, or through `accelerate launch --config_file config`"
    launcher = [sys.executable]
    if config is not None:
        launcher = [sys.executable, '-m', 'accelerate.commands.launch', '--config_file', str(config),
                    '--main_process_port', str(port)]
    paths = [str(ROOT), os.environ.get('SFT_NB_DEEPSPEED_PATH', ''), os.environ.get('PYTHONPATH', '')]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'PYTHONPATH': os.pathsep.join(paths)}
    r = subprocess.run([*launcher, str(SCRIPT), str(out), *flags], capture_output=True, text=True, timeout=600,
                       env=env)
    if check: assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    return r

def _record(path, rank=0): return json.loads(Path(f"{path}.rank{rank}").read_text())
def _losses(rec): return {h['step']: h['loss'] for h in rec['log'] if 'loss' in h}
def _last(rec, k): return [h[k] for h in rec['log'] if k in h][-1]

def _weights(d:Path) -> dict:
    f = d/'adapter_model.safetensors'
    return load_file(str(f if f.exists() else d/'model.safetensors'))

def _reload_logits(out:Path, lora:bool) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    final = out/'final'
    if lora:
        from peft import PeftModel
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out/'base'), final)
    else: model = AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad(): return model.eval()(input_ids=torch.tensor([list(range(3, 40))])).logits.float()

def _check_saved(out:Path, ref:dict, lora:bool, head:bool=False):
    "verify_saved passed, the reload gives the live model's logits, the weights are the plain run's (and a saved head)"
    verified = json.loads((out/'verified.json').read_text())
    w = _weights(out/'final')
    assert set(w) == set(ref) == set(verified) and all(v.numel() for v in w.values())
    if lora: assert all('lora_' in k or (head and 'lm_head' in k) for k in w), sorted(w)
    for k in ref: torch.testing.assert_close(w[k], ref[k], rtol=1e-3, atol=1e-4)  # Adam on 2 ranks vs 1: sums differ in order
    torch.testing.assert_close(_reload_logits(out, lora), torch.load(out/'live_logits.pt'), rtol=0, atol=1e-5)
    return w

_PLAIN = {}

def _plain(factory, lora:bool, *flags) -> Path:
    """The reference: one plain process, 8 rows a step (= 2 ranks x 4); run once per session for each set of flags,
    shared by the engines"""
    key = (lora, *flags)
    if key not in _PLAIN:
        tmp = factory.mktemp('plain')
        save_tiny(tmp/'plain'/'base')
        _run(tmp/'plain', *(['--lora'] if lora else []), *flags, '--per_device', '8', '--record', str(tmp/'plain.json'))
        _PLAIN[key] = tmp
    return _PLAIN[key]

def _scenario(tmp:Path, factory, config:Path, port:int, lora:bool, engine:str):
    "Three launches: the whole run, one SIGKILLed after its step-3 checkpoint, its resume; checked by `_compare`"
    for name in ('whole', 'killed'): save_tiny(tmp/name/'base')
    extra = ['--lora'] if lora else []
    _run(tmp/'whole', *extra, '--record', str(tmp/'whole.json'), config=config, port=port)
    r = _run(tmp/'killed', *extra, '--kill_at', '4', config=config, port=port + 1, check=False)
    assert r.returncode != 0 and not (tmp/'killed'/'final').exists(), r.stderr[-3000:]
    assert sorted(p.name for p in (tmp/'killed'/'run').glob('checkpoint-*')) == ['checkpoint-3']
    _run(tmp/'killed', *extra, '--resume', '--record', str(tmp/'resumed.json'), config=config, port=port + 2)
    _compare(tmp, _plain(factory, lora), lora, engine)

def _compare(tmp:Path, ptmp:Path, lora:bool, engine:str):
    """The whole run and the resumed one (in `tmp`) against the plain one (in `ptmp`): the same losses, token counters
    and final weights; each final save verified and reloading to the live model's logits"""
    plain, whole, resumed = _record(ptmp/'plain.json'), _record(tmp/'whole.json'), _record(tmp/'resumed.json')
    for rec in (whole, resumed): assert rec['engine'] == engine and rec['world'] == 2, rec['engine']
    assert whole['head_blocker'] is None  # the chunked, label-only LM head is kept (ZeRO-3: gathered once a step)
    assert set(_losses(plain)) == set(_losses(whole)) == set(_losses(resumed)) == set(range(1, 7))
    for step, loss in _losses(plain).items():  # two ranks of 4 rows = one process of 8 rows
        assert _losses(whole)[step] == pytest.approx(loss, rel=1e-4), step
        assert _losses(resumed)[step] == pytest.approx(_losses(whole)[step], rel=1e-5), step
    for k in ('num_tokens', 'num_trained_tokens'):
        assert _last(resumed, k) == _last(whole, k) == _last(plain, k), k
    ref = _weights(ptmp/'plain'/'final')
    w_whole = _check_saved(tmp/'whole', ref, lora)
    w_resumed = _check_saved(tmp/'killed', ref, lora)
    for k in w_whole: torch.testing.assert_close(w_resumed[k], w_whole[k], rtol=1e-5, atol=1e-6)

SLOW = pytest.mark.slow

@pytest.mark.parametrize('adapter', ['full', pytest.param('lora', marks=SLOW)])
def test_fsdp2_two_processes_resume_and_save(tmp_path, tmp_path_factory, adapter):
    config = _config(tmp_path, 'fsdp2', FSDP2_CPU)
    port = {'full': 29611, 'lora': 29621}[adapter]
    _scenario(tmp_path, tmp_path_factory, config, port, adapter == 'lora', engine='fsdp2')

@SLOW
def test_fsdp2_sharded_checkpoints_resume_and_save(tmp_path, tmp_path_factory):
    """`fsdp_state_dict_type: SHARDED_STATE_DICT`: each checkpoint holds every rank's shards (torch.distributed.checkpoint),
    a resume from them continues to the uninterrupted run's losses and weights, and the final save, which transformers
    leaves empty under this type, holds the gathered full model (sft_nb's `save_gathered_if_sharded`)."""
    sharded = {**FSDP2_CPU, 'fsdp_config': {'fsdp_state_dict_type': 'SHARDED_STATE_DICT'}}
    config = _config(tmp_path, 'fsdp2', sharded)
    _scenario(tmp_path, tmp_path_factory, config, 29681, False, engine='fsdp2')
    checkpoint = tmp_path/'killed'/'run'/'checkpoint-3'
    assert sorted(p.name for p in (checkpoint/'pytorch_model_fsdp_0').glob('*.distcp')) == ['__0_0.distcp', '__1_0.distcp']
    assert not (checkpoint/'model.safetensors').exists()  # shards only: no rank gathered the model

def test_fsdp_profile_run_as_ddp_says_so(tmp_path):
    "On CPU accelerate runs an FSDP profile as DDP without a word; sft_nb's trainer warns that nothing is sharded"
    save_tiny(tmp_path/'ddp'/'base')
    config = _config(tmp_path, 'fsdp2', FSDP2_CPU)
    r = _run(tmp_path/'ddp', '--as_accelerate_does', '--max_steps', '1', '--save_steps', '10',
             '--record', str(tmp_path/'ddp.json'), config=config, port=29691)
    assert _record(tmp_path/'ddp.json')['engine'] == 'DistributedDataParallel'
    assert r.stderr.count('accelerate was asked for FSDP but runs MULTI_CPU') == 2  # once per process

def _two_nodes(tmp:Path, *flags, port:int) -> list:
    """Two `torchrun --nnodes 2 --nproc_per_node 1` invocations on 127.0.0.1, one per simulated node; each node has its
    own folder (the model, the run, the saves) and its own datasets cache, as node-local disks would"""
    procs = []
    for node in (0, 1):
        out = tmp/f'node{node}'
        save_tiny(out/'base')
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'PYTHONPATH': str(ROOT),
               'HF_DATASETS_CACHE': str(out/'datasets')}
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1',
               '--node_rank', str(node), '--master_addr', '127.0.0.1', '--master_port', str(port),
               str(SCRIPT), str(out), *flags]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outs = [p.communicate(timeout=600) for p in procs]
    failed = [f'node {i}:\n{e[-4000:]}' for i, (p, (o, e)) in enumerate(zip(procs, outs)) if p.returncode]
    assert not failed, '\n'.join(failed)
    return [tmp/'node0', tmp/'node1']

@pytest.mark.parametrize('each_node', [False, True])
def test_two_nodes_simulated(tmp_path, tmp_path_factory, each_node):
    """Two nodes of one process each: global ranks 0 and 1, each its node's local main; each rank trains on its own
    half of every global batch (no row twice, none lost: the losses are one process's with the whole batch); each node
    prepares the dataset itself, into its own cache; the model and its card are written once (node 0), or once per
    node with `save_on_each_node`."""
    data = tmp_path/'train.jsonl'
    tiny_dataset(n=128).to_json(str(data))
    extra = ['--save_on_each_node'] if each_node else []
    rec = tmp_path/'rec.json'
    nodes = _two_nodes(tmp_path, '--data_file', str(data), '--record', str(rec), *extra,
                       port=29701 + each_node)
    r0, r1 = _record(rec, 0), _record(rec, 1)
    assert (r0['node'], r1['node'], r0['local_rank'], r1['local_rank'], r0['world']) == ('0', '1', 0, 0, 2)
    trained = r0['rows'][:6] + r1['rows'][:6]  # the batches of the 6 steps (accelerate collates one more ahead)
    assert len(trained) == 12 and all(len(b) == 4 for b in trained)
    seen = [tuple(row) for b in trained for row in b]
    assert len(set(seen)) == len(seen) == 48  # 6 steps x 2 ranks x 4 rows, none twice
    plain = _record(_plain(tmp_path_factory, False)/'plain.json')
    for step, loss in _losses(plain).items(): assert _losses(r0)[step] == pytest.approx(loss, rel=1e-4), step
    caches = [sorted(p.name for p in (n/'datasets').rglob('cache-*.arrow')) for n in nodes]
    # each node prepared the dataset into its own cache (the fingerprints differ: each loads its own tokenizer copy)
    assert len(caches[0]) == len(caches[1]) >= 1, caches
    for node in nodes:
        written = (node/'final'/'model.safetensors').exists(), (node/'final'/'README.md').exists()
        assert written == ((True, True) if node.name == 'node0' or each_node else (False, False)), (node, written)
    assert _last(r0, 'num_tokens') == _last(plain, 'num_tokens')

def test_one_node_two_processes_prepare_once(tmp_path):
    """Two processes on one node (`torchrun --nproc_per_node 2`) share its datasets cache: the second waits for the
    node's first (its local main) to prepare the dataset, then loads that preparation from the cache. Had it not
    waited, it would have found no cache and computed its own: only the first computes any map."""
    data = tmp_path/'train.jsonl'
    tiny_dataset(n=128).to_json(str(data))
    out, rec = tmp_path/'node', tmp_path/'rec.json'
    save_tiny(out/'base')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'PYTHONPATH': str(ROOT),
           'HF_DATASETS_CACHE': str(tmp_path/'datasets')}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', '2',
           '--master_port', '29711', str(SCRIPT), str(out), '--data_file', str(data), '--record', str(rec),
           '--max_steps', '2', '--save_steps', '10']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-6000:]
    r0, r1 = _record(rec, 0), _record(rec, 1)
    assert (r0['local_rank'], r1['local_rank'], r0['world']) == (0, 1, 2)
    assert r0['computed_maps'] and r1['computed_maps'] == []
    files = r0['train_cache_files']
    assert files and files == r1['train_cache_files'], (files, r1['train_cache_files'])
    assert all(f.startswith(str(tmp_path/'datasets')) and Path(f).exists() for f in files)
    assert set(files) <= set(r0['computed_maps'])  # the dataset rank 1 trains on is what rank 0 computed

# DeepSpeed on CPU: its CPU accelerator with gloo, the Trainer's torch AdamW as a client optimizer. The profile is
# sft_nb's (TRL's) zero3 with 2 processes and no bf16; ZeRO-3 keeps zero3_init_flag and the 16-bit gathered save.
def _need_deepspeed():
    """DeepSpeed, from the dev or `deepspeed` extra, or only for the launched processes from SFT_NB_DEEPSPEED_PATH (a
    folder from `pip install --target`)"""
    import importlib.util
    found = importlib.util.find_spec('deepspeed') is not None
    found = found or (Path(os.environ.get('SFT_NB_DEEPSPEED_PATH', '/nonexistent'))/'deepspeed').is_dir()
    if not found:
        pytest.skip('deepspeed is not installed: pip install -e ".[dev]" (or "sft_nb[deepspeed]"; tested: deepspeed '
                    '0.19.8), or SFT_NB_DEEPSPEED_PATH=a `pip install --target` folder.')

DS_CPU = {'num_processes': 2, 'mixed_precision': 'no'}

def _ds_jobs(tmp:Path) -> list:
    """Every DeepSpeed run of the tests below, as jobs of one launch (a launch is most of a run's time): for ZeRO-3 and
    ZeRO-2 (the environment the zero2 profile sets), full and LoRA, a whole run, one killed after its step-3 checkpoint
    and its resume; for ZeRO-3 also the full-logits fallback, LoRA with a trained and saved LM head
    (modules_to_save), and gradient accumulation (2 rows x 2 micro-batches a rank)"""
    jobs = []
    for stage in (3, 2):
        for adapter in ('full', 'lora'):
            d = tmp/f'zero{stage}-{adapter}'
            flags = ['--zero_stage', str(stage), *(['--lora'] if adapter == 'lora' else [])]
            jobs += [[str(d/'whole'), *flags, '--record', str(d/'whole.json')],
                     [str(d/'killed'), *flags, '--kill_at', '4', '--record', str(d/'killed.json')],
                     [str(d/'killed'), *flags, '--resume', '--record', str(d/'resumed.json')]]
    zero3 = ['--zero_stage', '3']
    jobs += [[str(tmp/'full_logits'), *zero3, '--full_logits', '--record', str(tmp/'full_logits.json')],
             [str(tmp/'save_head'), *zero3, '--save_head', '--record', str(tmp/'save_head.json')],
             [str(tmp/'accum'), *zero3, '--per_device', '2', '--grad_accum', '2', '--record', str(tmp/'accum.json')]]
    return jobs

@pytest.fixture(scope='module')
def ds_runs(tmp_path_factory) -> Path:
    "The folder of the one DeepSpeed launch's runs (see `_ds_jobs`), launched once for the tests that ask for it"
    _need_deepspeed()
    tmp = tmp_path_factory.mktemp('deepspeed')
    jobs = _ds_jobs(tmp)
    for job in jobs: save_tiny(Path(job[0])/'base')
    (tmp/'jobs.json').write_text(json.dumps(jobs))
    config = _config(tmp, 'zero3', DS_CPU)
    r = _run(tmp, '--jobs', str(tmp/'jobs.json'), config=config, port=29631)
    (tmp/'log.txt').write_text(r.stdout + r.stderr)
    return tmp

@pytest.mark.parametrize('stage, adapter', [(3, 'full'), (3, 'lora'), (2, 'full'), (2, 'lora')])
def test_deepspeed_two_processes_resume_and_save(ds_runs, tmp_path_factory, stage, adapter):
    """ZeRO-2 and ZeRO-3, full and LoRA: the losses, token counters and saved weights of one plain process; a run killed
    after its checkpoint resumes to the whole run's; the final saves (LoRA: non-empty adapters under ZeRO-3, the TRL
    failure) pass `verify_saved` and reload to the live model's logits. The kill is an exception in the launch's job
    (the FSDP2 tests SIGKILL): the resume is a new trainer and model that read only what the killed run left on disk."""
    tmp = ds_runs/f'zero{stage}-{adapter}'
    killed = _record(tmp/'killed.json')
    assert killed['killed'] and killed['step'] == 4 and killed['zero_stage'] == stage
    assert killed['checkpoints'] == ['checkpoint-3'] and not killed['saved']  # what the resume found on disk
    assert _record(tmp/'whole.json')['zero_stage'] == _record(tmp/'resumed.json')['zero_stage'] == stage
    _compare(tmp, _plain(tmp_path_factory, adapter == 'lora'), adapter == 'lora', engine='deepspeed')

def test_zero3_chunked_head_equals_full_logits(ds_runs):
    """Under ZeRO-3 the chunked, label-only LM head gathers the head's weight once a step (DeepSpeed's
    GatheredParameters) and hands its gradient back through DeepSpeed's own backward: the losses and the trained
    weights are those of the full-logits fallback, and only the fallback says in the log that it builds full logits."""
    chunked, full = _record(ds_runs/'zero3-full'/'whole.json'), _record(ds_runs/'full_logits.json')
    assert chunked['engine'] == full['engine'] == 'deepspeed' and chunked['zero_stage'] == full['zero_stage'] == 3
    assert chunked['head_blocker'] is None and full['head_blocker'] is not None
    assert not any('computes full logits' in w for w in chunked['warnings'])
    assert any('computes full logits' in w for w in full['warnings'])
    assert set(_losses(chunked)) == set(_losses(full)) == set(range(1, 7))
    for step, loss in _losses(full).items(): assert _losses(chunked)[step] == pytest.approx(loss, rel=1e-5), step
    w, ref = _weights(ds_runs/'zero3-full'/'whole'/'final'), _weights(ds_runs/'full_logits'/'final')
    assert set(w) == set(ref)
    for k in ref: torch.testing.assert_close(w[k], ref[k], rtol=1e-3, atol=1e-4)  # Adam: near-0 grads amplify

def _against_plain(run:Path, ptmp:Path, lora:bool, head:bool=False):
    "A run's losses, token counters and saved weights are the plain run's; its save verified and reloading right"
    rec, plain = _record(f'{run}.json'), _record(ptmp/'plain.json')
    assert rec['engine'] == 'deepspeed' and rec['zero_stage'] == 3 and rec['world'] == 2
    assert rec['head_blocker'] is None
    assert set(_losses(rec)) == set(_losses(plain)) == set(range(1, 7))
    for step, loss in _losses(plain).items(): assert _losses(rec)[step] == pytest.approx(loss, rel=1e-4), step
    for k in ('num_tokens', 'num_trained_tokens'): assert _last(rec, k) == _last(plain, k), k
    return _check_saved(run, _weights(ptmp/'plain'/'final'), lora, head)

def test_zero3_lora_with_saved_lm_head(ds_runs, tmp_path_factory):
    """LoRA with `modules_to_save=['lm_head']` under ZeRO-3: the head's trainable copy keeps the chunked loss (its
    weight gathered once a step), trains as in one plain process, and is saved whole (not ZeRO-3's empty shard)"""
    w = _against_plain(ds_runs/'save_head', _plain(tmp_path_factory, True, '--save_head'), lora=True, head=True)
    heads = [k for k in w if 'lm_head' in k]
    assert heads and all(w[k].shape == (384, 64) for k in heads), {k: w[k].shape for k in heads}

def test_zero3_gradient_accumulation(ds_runs, tmp_path_factory):
    """ZeRO-3 with 2 micro-batches of 2 rows a rank and step: the losses and weights of one plain process taking the
    same 8 rows at once (the loss is normalised by the tokens of the whole accumulated, global batch)"""
    _against_plain(ds_runs/'accum', _plain(tmp_path_factory, False), lora=False)
