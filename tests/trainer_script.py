"""Train the tiny model with SFTTrainer, for tests that need a separate process (kill, signals, accelerate launch).

python trainer_script.py OUT_DIR [--max_steps N] [--kill_at STEP] [--signal_at STEP --signal TERM|INT] [--resume] [--record FILE]
                           [--per_device B] [--ga G] [--save_steps N] [--save_strategy steps|no] [--data DIR]
"""
import argparse, json, os, signal
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
from transformers import TrainerCallback
from sft_nb import SFTConfig, SFTTrainer
from sft_nb.tiny import tiny_dataset

p = argparse.ArgumentParser()
p.add_argument('out')
p.add_argument('--max_steps', type=int, default=12)
p.add_argument('--kill_at', type=int, default=0)
p.add_argument('--signal_at', type=int, default=0)
p.add_argument('--signal', default='TERM')
p.add_argument('--resume', action='store_true')
p.add_argument('--record', default='')
p.add_argument('--per_device', type=int, default=8)
p.add_argument('--ga', type=int, default=1)
p.add_argument('--save_steps', type=int, default=4)
p.add_argument('--save_strategy', default='steps')
p.add_argument('--data', default='')
a = p.parse_args()
torch.set_num_threads(1)

class Hooks(TrainerCallback):
    "Record what each rank trained on; kill or signal this process at a given step"
    def __init__(self): self.seen = []
    def on_step_end(self, args, state, control, **kw):
        if a.kill_at and state.global_step == a.kill_at: os.kill(os.getpid(), signal.SIGKILL)
        if a.signal_at and state.global_step == a.signal_at: os.kill(os.getpid(), getattr(signal, f'SIG{a.signal}'))

hooks = Hooks()
model_dir = os.path.join(a.out, 'base')  # written by the test before launch, so every rank finds it

args = SFTConfig(output_dir=os.path.join(a.out, 'run'), max_steps=a.max_steps, per_device_train_batch_size=a.per_device,
                 gradient_accumulation_steps=a.ga, learning_rate=3e-3, lr_scheduler_type='constant', logging_steps=1,
                 save_strategy=a.save_strategy, save_steps=a.save_steps, gradient_checkpointing=False, report_to='none',
                 use_cpu=True, seed=0, data_seed=0, assistant_only_loss=True, dataloader_drop_last=True)
if a.data:  # a dataset on disk: rank 0 tokenizes it first and writes the cache, the other ranks should load that cache
    from datasets import load_dataset
    data = load_dataset(a.data, split='train', cache_dir=os.path.join(a.out, 'hf_cache'))
else: data = tiny_dataset(n=256)
trainer = SFTTrainer(model=model_dir, args=args, train_dataset=data, callbacks=[hooks])
orig = trainer.compute_loss
def recording_compute_loss(model, inputs, *args_, **kw):
    hooks.seen.append(inputs['input_ids'][:, :64].tolist())
    return orig(model, inputs, *args_, **kw)
trainer.compute_loss = recording_compute_loss
try:
    trainer.train(resume_from_checkpoint=True if a.resume else None)
finally:
    if a.record:
        with open(f"{a.record}.rank{trainer.args.process_index}", "w") as f:
            json.dump({'seen': hooks.seen, 'log': trainer.state.log_history, 'step': trainer.state.global_step,
                       'cache_files': [c['filename'] for c in getattr(trainer.train_dataset, 'cache_files', [])]}, f)
trainer.save_model(os.path.join(a.out, 'final'))
