"""Vision-language SFT: sft_nb vs TRL 1.16 on the same work, in one run (CPU).

Each library's `SFTTrainer` trains the same tiny LLaVA (saved once, loaded from its folder) on the same N image
conversations (PNG files on disk, as `datasets.Image` holds them, two sizes, one in eight rows without an image),
assistant-only loss, batch 8, STEPS steps. Measured for each:

- time to the first step: from the trainer's construction to the end of its first optimizer step (sft_nb tokenizes
  and checks every row up front and caches it; TRL does its work per batch);
- training throughput: steps per second after the first, and input tokens per second;
- peak memory: the largest resident set size of the process while that trainer runs (each in its own process).

Run: `python bench/bench_vision.py` (N=2000, about 3 minutes on 2 cores) or `python bench/bench_vision.py 400`.
"""
import json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')

N = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 2000
STEPS, BATCH = 20, 8
COLOURS = {'red': (255, 0, 0), 'green': (0, 255, 0), 'blue': (0, 0, 255), 'white': (255, 255, 255)}

def make_data(folder:Path, n:int):
    "N conversations about PNG files on disk; every eighth row has no image"
    from PIL import Image
    from datasets import Dataset, Image as ImageFeature, List
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % 4]
        path = folder/f"{i}.png"
        Image.new('RGB', (16 + 8 * (i % 2), 16), COLOURS[name]).save(path)
        rows.append({'images': [] if i % 8 == 7 else [str(path)],
                     'messages': [{'role': 'user', 'content': 'Which colour is this picture?'},
                                  {'role': 'assistant', 'content': f"It is {name}."}]})
    ds = Dataset.from_list(rows).cast_column('images', List(ImageFeature()))
    ds.save_to_disk(str(folder/'data'))

def run_one(lib_name:str, folder:Path) -> dict:
    "Train with one library in this process; time to first step, throughput, peak RSS"
    import torch, transformers
    from datasets import load_from_disk
    from transformers import TrainerCallback
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    lib = __import__(lib_name)
    marks = []
    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw): marks.append(time.perf_counter())
    ds = load_from_disk(str(folder/'data'))
    args = lib.SFTConfig(output_dir=str(folder/lib_name), report_to=[], max_steps=STEPS,
                         per_device_train_batch_size=BATCH, learning_rate=1e-3, save_strategy='no', logging_steps=STEPS, assistant_only_loss=True,
                         bf16=False, use_cpu=True, dataloader_num_workers=0, seed=0)
    start = time.perf_counter()
    t = lib.SFTTrainer(str(folder/'model'), args=args, train_dataset=ds, callbacks=[Clock()])
    t.train()
    steps_per_s = (len(marks) - 1) / (marks[-1] - marks[0])
    tokens = t.state.log_history[-1].get('num_tokens') or 0
    return {'first_step_s': marks[0] - start, 'steps_per_s': steps_per_s,
            'tokens_per_s': tokens / (marks[-1] - start) if tokens else None,
            'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

def main():
    from datasets import disable_progress_bars
    from sft_nb.vision import save_tiny_vlm
    disable_progress_bars()
    folder = Path(tempfile.mkdtemp())
    save_tiny_vlm(folder/'model', 'llava')
    make_data(folder, N)
    res = {}
    for lib in ('trl', 'sft_nb'):
        out = subprocess.run([sys.executable, __file__, '--one', lib, str(folder)], capture_output=True, text=True)
        if out.returncode: raise SystemExit(f"{lib} failed:\n{out.stderr[-3000:]}")
        res[lib] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n## {N} image conversations, tiny LLaVA, batch {BATCH}, {STEPS} steps, CPU")
    print(f"{'':16} {'TRL':>10} {'sft_nb':>10} {'ratio':>8}")
    for k, better in (('first_step_s', 'lower'), ('steps_per_s', 'higher'), ('peak_rss_mb', 'lower')):
        a, b = res['trl'][k], res['sft_nb'][k]
        print(f"{k:16} {a:10.2f} {b:10.2f} {b / a:7.2f}x  ({better} is better)")

if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--one': print(json.dumps(run_one(sys.argv[2], Path(sys.argv[3]))))
    else: main()
