"""Train the tiny model with SFTTrainer under a distributed engine (FSDP2, DeepSpeed), for tests/test_distributed.py.
Started by the real launcher (`accelerate launch --config_file X tests/distributed_script.py OUT ...`), one process
per rank; the same script also runs as one plain process for the reference run.

python distributed_script.py OUT_DIR [--lora] [--max_steps N] [--save_steps N] [--kill_at STEP] [--resume] [--record FILE]
python distributed_script.py --jobs JOBS.json

`--jobs` runs several trainings one after another in the same launched processes (a JSON list of argument lists, each
as the first form takes them): a launch costs most of a DeepSpeed test's time (imports, process group), a training of
6 steps on the tiny model a few seconds. In a job `--kill_at` raises instead of SIGKILL (the launch must go on); the
next job, a new trainer with its own model, resumes from what the killed one left on disk.
"""
import argparse, functools, json, logging, os, resource, signal, sys
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
from transformers import TrainerCallback
from sft_nb import SFTConfig, SFTTrainer
import sft_nb.loss
from sft_nb.save import verify_saved
from sft_nb.tiny import tiny_dataset

p = argparse.ArgumentParser()
p.add_argument('out', nargs='?')
p.add_argument('--jobs', default='', help='a JSON file: a list of argument lists, run in turn in this process')
p.add_argument('--lora', action='store_true')
p.add_argument('--save_head', action='store_true', help="LoRA with modules_to_save=['lm_head']")
p.add_argument('--max_steps', type=int, default=6)
p.add_argument('--save_steps', type=int, default=3)
p.add_argument('--per_device', type=int, default=4)
p.add_argument('--grad_accum', type=int, default=1)
p.add_argument('--kill_at', type=int, default=0)
p.add_argument('--resume', action='store_true')
p.add_argument('--record', default='')
p.add_argument('--as_accelerate_does', action='store_true', help='FSDP on CPU: leave it DDP, as accelerate does')
p.add_argument('--data_file', default='', help='a JSON-lines file loaded with load_dataset (default: tiny_dataset)')
p.add_argument('--save_on_each_node', action='store_true')
p.add_argument('--full_logits', action='store_true', help="the loss's fallback: the model's full [B, T, V] logits")
p.add_argument('--trl', action='store_true', help="TRL 1.16's SFTTrainer and SFTConfig (bench/bench_scale.py)")
p.add_argument('--zero_stage', type=int, default=0, help="DeepSpeed: this ZeRO stage instead of the launch profile's")
torch.set_num_threads(1)

def fsdp_on_cpu():
    """accelerate 1.15 turns `distributed_type: FSDP` into FSDP only on accelerators: with `cpu=True` the state stays
    MULTI_CPU and the model is silently wrapped in DDP. Tests only: route the CPU run to FSDP, which is the one line
    that differs from a GPU run; everything after it (fully_shard, sharded checkpoints, the gathered save) is unchanged."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    init = AcceleratorState.__init__
    def patched(self, *args, fsdp_plugin=None, **kw):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kw)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            PartialState._shared_state['distributed_type'] = DistributedType.FSDP  # re-read by every state
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
    AcceleratorState.__init__ = patched

def count_preparations() -> list:
    """The cache files of the `datasets` maps this process computes (not those it loads from a cache): a process that
    waited for its node's first one to prepare the data computes none"""
    from datasets import Dataset
    computed = []
    map_single = Dataset._map_single
    @functools.wraps(map_single)  # datasets reads its signature
    def counting(*args, **kw):
        computed.append(kw.get('cache_file_name'))
        yield from map_single(*args, **kw)
    Dataset._map_single = staticmethod(counting)
    return computed

COMPUTED_MAPS = count_preparations()

class Killed(Exception): "A job's simulated hard kill"

class Kill(TrainerCallback):
    "At a step, SIGKILL this process (the run dies as under a scheduler's hard kill), or raise Killed in a job"
    def __init__(self, at:int, hard:bool): self.at, self.hard = at, hard
    def on_step_end(self, args, state, control, **kw):
        if not self.at or state.global_step != self.at: return
        if self.hard: os.kill(os.getpid(), signal.SIGKILL)
        raise Killed(f'killed at step {self.at}')

class Warnings(logging.StreamHandler):
    """sft_nb's warnings during one job (a launch of several jobs shares its stderr), kept, and printed to stderr as
    Python prints them when a logger has no handler"""
    def __init__(self):
        super().__init__(sys.stderr)
        self.setLevel(logging.WARNING)
        self.lines = []
    def emit(self, record):
        self.lines.append(record.getMessage())
        super().emit(record)

def set_zero_stage(stage:int):
    "The environment accelerate's zero2 / zero3 profiles give the processes, for this stage"
    os.environ['ACCELERATE_DEEPSPEED_ZERO_STAGE'] = str(stage)
    os.environ['ACCELERATE_DEEPSPEED_ZERO3_INIT'] = str(stage == 3).lower()
    os.environ['ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL'] = str(stage == 3).lower()

def engine(trainer) -> str:
    "What wraps the model: fsdp2 (its parameters DTensors), deepspeed, ddp or none"
    wrapped = trainer.model_wrapped
    if trainer.accelerator.is_fsdp2 and type(wrapped).__name__.startswith('FSDP'): return 'fsdp2'
    if trainer.is_deepspeed_enabled and type(wrapped).__name__ == 'DeepSpeedEngine': return 'deepspeed'
    return type(wrapped).__name__

def zero_stage(trainer) -> int|None:
    "The ZeRO stage DeepSpeed's engine runs (None: no DeepSpeed)"
    if not trainer.is_deepspeed_enabled: return None
    return trainer.model_wrapped.zero_optimization_stage()

def checkpoints(folder:str) -> list:
    "The checkpoints in a run's folder"
    if not os.path.isdir(folder): return []
    return sorted(c for c in os.listdir(folder) if c.startswith('checkpoint-'))

def cache_files(dataset) -> list:
    "The files a prepared dataset reads (none when it is in memory)"
    return sorted(f['filename'] for f in getattr(dataset, 'cache_files', []))

def rss_mib() -> float:
    "This process's resident memory now, MiB"
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20

def train(a, hard_kill:bool):
    "One training run as the flags `a` say: train, record, save, reload check"
    # use_cpu=True makes accelerate skip DeepSpeed; without it, on a machine with no GPU, DeepSpeed's CPU accelerator
    # runs, and ddp_backend='gloo' names the backend accelerate would otherwise leave unset (then it counts one
    # process).
    deepspeed = os.environ.get('ACCELERATE_USE_DEEPSPEED', 'false').lower() == 'true'
    if a.zero_stage: set_zero_stage(a.zero_stage)
    blocker = sft_nb.loss.fused_head_blocker
    if a.full_logits: sft_nb.loss.fused_head_blocker = lambda model: 'the test asked for full logits (--full_logits)'
    sft_nb.loss._logged.clear()  # each job logs its own once-per-model-class warnings
    warnings = Warnings()
    logging.getLogger('sft_nb').addHandler(warnings)
    peft_config = None
    if a.lora or a.save_head:
        from peft import LoraConfig
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules='all-linear',
                                 modules_to_save=['lm_head'] if a.save_head else None)
    Config, Trainer, precision = (SFTConfig, SFTTrainer, {})
    if a.trl:  # TRL's SFTConfig asks for bf16 by default, which a CPU run must turn off; sft_nb's picks fp32 there
        import trl
        Config, Trainer, precision = (trl.SFTConfig, trl.SFTTrainer, {'bf16': False})
    args = Config(output_dir=os.path.join(a.out, 'run'), max_steps=a.max_steps,
                  per_device_train_batch_size=a.per_device, gradient_accumulation_steps=a.grad_accum,
                  learning_rate=3e-3, lr_scheduler_type='constant', logging_steps=1, save_strategy='steps',
                  save_steps=a.save_steps, gradient_checkpointing=False, report_to='none', use_cpu=not deepspeed,
                  ddp_backend='gloo' if deepspeed else None, seed=0, data_seed=0, assistant_only_loss=True,
                  dataloader_drop_last=True, max_length=64, save_on_each_node=a.save_on_each_node, **precision)
    if a.data_file:
        from datasets import load_dataset
        train_dataset = load_dataset('json', data_files=a.data_file, split='train')
    else: train_dataset = tiny_dataset(n=128)
    trainer = Trainer(model=os.path.join(a.out, 'base'), args=args, train_dataset=train_dataset,
                      peft_config=peft_config, callbacks=[Kill(a.kill_at, hard_kill)])
    rows = []  # the rows of each batch this rank trained on (their input_ids), to check how data is split
    collate = trainer.data_collator
    def recording_collator(features):
        rows.append([list(f['input_ids']) for f in features])
        return collate(features)
    trainer.data_collator = recording_collator
    before_train = rss_mib()
    killed = False
    try:
        trainer.train(resume_from_checkpoint=True if a.resume else None)
    except Killed:
        killed = True
    finally:
        logging.getLogger('sft_nb').removeHandler(warnings)
        if a.record:
            with open(f"{a.record}.rank{trainer.args.process_index}", "w") as f:
                json.dump({'log': trainer.state.log_history, 'step': trainer.state.global_step,
                           'engine': engine(trainer),
                           'head_blocker': sft_nb.loss.fused_head_blocker(trainer.model_wrapped),
                           'world': trainer.args.world_size, 'rows': rows, 'node': os.environ.get('GROUP_RANK'),
                           'local_rank': trainer.args.local_process_index, 'rss_before_train_mib': before_train,
                           'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                           'warnings': warnings.lines, 'killed': killed, 'zero_stage': zero_stage(trainer),
                           'checkpoints': checkpoints(args.output_dir),
                           'saved': os.path.exists(os.path.join(a.out, 'final')),
                           'computed_maps': COMPUTED_MAPS, 'train_cache_files': cache_files(trainer.train_dataset)}, f)
        sft_nb.loss.fused_head_blocker = blocker
    if killed: return
    final = os.path.join(a.out, 'final')
    trainer.save_model(final)
    # The saved folder must reload to the model that trained: the live (sharded) model's logits, computed on every rank
    # since a sharded forward is collective, kept for the test to compare with a reload in a plain process.
    trainer.model.eval()
    with torch.no_grad(): live = trainer.model(input_ids=torch.tensor([list(range(3, 40))])).logits.float()
    trainer.accelerator.wait_for_everyone()
    if trainer.args.process_index == 0:
        torch.save(live, os.path.join(a.out, 'live_logits.pt'))
        with open(os.path.join(a.out, 'verified.json'), 'w') as f: json.dump(verify_saved(final), f)

a = p.parse_args()
if os.environ.get('ACCELERATE_USE_FSDP', 'false').lower() == 'true' and not a.as_accelerate_does: fsdp_on_cpu()
if a.jobs:
    with open(a.jobs) as f: jobs = json.load(f)
    for job in jobs: train(p.parse_args(job), hard_kill=False)
else: train(a, hard_kill=True)
