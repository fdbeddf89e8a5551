"""SFTTrainer with `eval_answer_*` set, for tests/test_after_training.py: under DDP (started by the real launcher,
`accelerate launch --config_file X tests/answers_ddp_script.py OUT`, two CPU processes over gloo) or as one plain
process. Each rank records its answer rounds and the "Sample answers" messages it logged.

python answers_ddp_script.py OUT_DIR [--per_device N]
"""
import argparse, json, logging, os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
from sft_nb import SFTConfig, SFTTrainer
from sft_nb.answers import EvalAnswersCallback
from sft_nb.tiny import tiny_dataset

p = argparse.ArgumentParser()
p.add_argument('out')
p.add_argument('--per_device', type=int, default=4)
a = p.parse_args()
torch.set_num_threads(1)

class Keep(logging.Handler):
    "The messages this process logs about sample answers"
    def __init__(self):
        super().__init__()
        self.messages = []
    def emit(self, record): self.messages.append(record.getMessage())

keep = Keep()
answers_logger = logging.getLogger('sft_nb.answers')
answers_logger.addHandler(keep)
answers_logger.setLevel(logging.INFO)
args = SFTConfig(os.path.join(a.out, 'run'), max_steps=4, per_device_train_batch_size=a.per_device,
                 learning_rate=3e-3, lr_scheduler_type='constant', eval_strategy='steps', eval_steps=2,
                 logging_steps=2, report_to='none', save_strategy='no', use_cpu=True, seed=0, data_seed=0,
                 dataloader_drop_last=True, eval_answer_count=3, eval_answer_max_new_tokens=8,
                 eval_answer_metrics=['contains'])
trainer = SFTTrainer(os.path.join(a.out, 'base'), args, train_dataset=tiny_dataset('conversational', 64),
                     eval_dataset=tiny_dataset('conversational', 8, seed=7))
trainer.train()
trainer.save_model()
cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, EvalAnswersCallback))
record = dict(world=trainer.args.world_size, history=cb.history, log_history=trainer.state.log_history,
              logged=[m for m in keep.messages if m.startswith('Sample answers')])
with open(os.path.join(a.out, f'record.rank{trainer.args.process_index}.json'), 'w') as f: json.dump(record, f)
