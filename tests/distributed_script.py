"""Train the tiny model with SFTTrainer under a distributed engine (FSDP2, DeepSpeed), for tests/test_distributed.py.
Started by the real launcher (`accelerate launch --config_file X tests/distributed_script.py OUT ...`), one process
per rank; the same script also runs as one plain process for the reference run.

python distributed_script.py OUT_DIR [--lora] [--max_steps N] [--save_steps N] [--kill_at STEP] [--resume] [--record FILE]
"""
import argparse, json, os, resource, signal
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
from transformers import TrainerCallback
from sft_nb import SFTConfig, SFTTrainer
import sft_nb.loss
from sft_nb.save import verify_saved
from sft_nb.tiny import tiny_dataset

p = argparse.ArgumentParser()
p.add_argument('out')
p.add_argument('--lora', action='store_true')
p.add_argument('--max_steps', type=int, default=6)
p.add_argument('--save_steps', type=int, default=3)
p.add_argument('--per_device', type=int, default=4)
p.add_argument('--kill_at', type=int, default=0)
p.add_argument('--resume', action='store_true')
p.add_argument('--record', default='')
p.add_argument('--as_accelerate_does', action='store_true', help='FSDP on CPU: leave it DDP, as accelerate does')
p.add_argument('--data_file', default='', help='a JSON-lines file loaded with load_dataset (default: tiny_dataset)')
p.add_argument('--save_on_each_node', action='store_true')
p.add_argument('--full_logits', action='store_true', help="the loss's fallback: the model's full [B, T, V] logits")
a = p.parse_args()
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

if a.full_logits:
    sft_nb.loss.fused_head_blocker = lambda model: 'the test asked for full logits (--full_logits)'

if os.environ.get('ACCELERATE_USE_FSDP', 'false').lower() == 'true' and not a.as_accelerate_does: fsdp_on_cpu()

class Kill(TrainerCallback):
    "SIGKILL this process at a step: the run dies as under a scheduler's hard kill, mid-training"
    def on_step_end(self, args, state, control, **kw):
        if a.kill_at and state.global_step == a.kill_at: os.kill(os.getpid(), signal.SIGKILL)

# use_cpu=True makes accelerate skip DeepSpeed; without it, on a machine with no GPU, DeepSpeed's CPU accelerator runs,
# and ddp_backend='gloo' names the backend accelerate would otherwise leave unset (then it counts one process).
deepspeed = os.environ.get('ACCELERATE_USE_DEEPSPEED', 'false').lower() == 'true'
peft_config = None
if a.lora:
    from peft import LoraConfig
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules='all-linear')
args = SFTConfig(output_dir=os.path.join(a.out, 'run'), max_steps=a.max_steps, per_device_train_batch_size=a.per_device,
                 learning_rate=3e-3, lr_scheduler_type='constant', logging_steps=1, save_strategy='steps',
                 save_steps=a.save_steps, gradient_checkpointing=False, report_to='none', use_cpu=not deepspeed, ddp_backend='gloo' if deepspeed else None, seed=0,
                 data_seed=0, assistant_only_loss=True, dataloader_drop_last=True, max_length=64,
                 save_on_each_node=a.save_on_each_node)
if a.data_file:
    from datasets import load_dataset
    train_dataset = load_dataset('json', data_files=a.data_file, split='train')
else: train_dataset = tiny_dataset(n=128)
trainer = SFTTrainer(model=os.path.join(a.out, 'base'), args=args, train_dataset=train_dataset,
                     peft_config=peft_config, callbacks=[Kill()])
rows = []  # the rows of each batch this rank trained on (their input_ids), to check how data is split
collate = trainer.data_collator
def recording_collator(features):
    rows.append([list(f['input_ids']) for f in features])
    return collate(features)
trainer.data_collator = recording_collator

def engine(trainer) -> str:
    "What wraps the model: fsdp2 (its parameters DTensors), deepspeed, ddp or none"
    wrapped = trainer.model_wrapped
    if trainer.accelerator.is_fsdp2 and type(wrapped).__name__.startswith('FSDP'): return 'fsdp2'
    if trainer.is_deepspeed_enabled and type(wrapped).__name__ == 'DeepSpeedEngine': return 'deepspeed'
    return type(wrapped).__name__

def rss_mib() -> float:
    "This process's resident memory now, MiB"
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20

before_train = rss_mib()
try:
    trainer.train(resume_from_checkpoint=True if a.resume else None)
finally:
    if a.record:
        with open(f"{a.record}.rank{trainer.args.process_index}", "w") as f:
            json.dump({'log': trainer.state.log_history, 'step': trainer.state.global_step,
                       'engine': engine(trainer),
                       'head_blocker': sft_nb.loss.fused_head_blocker(trainer.model_wrapped),
                       'world': trainer.args.world_size, 'rows': rows, 'node': os.environ.get('GROUP_RANK'),
                       'local_rank': trainer.args.local_process_index, 'rss_before_train_mib': before_train,
                       'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
final = os.path.join(a.out, 'final')
trainer.save_model(final)
# The saved folder must reload to the model that trained: the live (sharded) model's logits, computed on every rank since
# a sharded forward is collective, kept for the test to compare with a reload in a plain process.
trainer.model.eval()
with torch.no_grad(): live = trainer.model(input_ids=torch.tensor([list(range(3, 40))])).logits.float()
trainer.accelerator.wait_for_everyone()
if trainer.args.process_index == 0:
    torch.save(live, os.path.join(a.out, 'live_logits.pt'))
    with open(os.path.join(a.out, 'verified.json'), 'w') as f: json.dump(verify_saved(final), f)
