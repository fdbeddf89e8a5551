"""Vision-language SFT: sft_nb vs TRL 1.16 on the same work, in one run (CPU).

Each library's `SFTTrainer` trains the same tiny LLaVA (saved once, loaded from its folder) on the same N image
conversations (PNG files on disk, as `datasets.Image` holds them, two sizes, one in eight rows without an image),
assistant-only loss, batch 8, STEPS steps. Each run is a fresh process, with no dataset cache left from an earlier
run; the runs are interleaved (TRL, sft_nb, floor, TRL, ...) and the best of REPEATS counts. Measured for each:

- time to the first step: from the trainer's construction to the end of its first optimizer step (sft_nb tokenizes
  and checks every row up front and caches it; TRL does its work per batch); the process's CPU seconds over the same
  span are printed too, a steadier measure on a loaded machine (both libraries compute with 2 threads);
- training throughput: steps per second after the first;
- peak memory: the largest resident set size of the process while that trainer runs.

The floor is a plain loop: the model and processor loaded with `from_pretrained`, batches made by the processor
from the same rows (no masks, no checks), AdamW.

Run: `python bench/bench_vision.py` (N=2000, about 5 minutes on 2 cores) or `python bench/bench_vision.py 400`.
Writes bench/results/vision.json.
"""
import json, os, platform, resource, statistics, subprocess, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import machine  # noqa: E402
os.environ.setdefault('HF_HUB_OFFLINE', '1')

N = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 2000
STEPS, BATCH, REPEATS = 20, 8, 3
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

def _fresh_data(folder:Path):
    "The saved dataset, with the cache files an earlier run's `map` left beside it removed"
    from datasets import load_from_disk
    for f in (folder/'data').glob('cache-*.arrow'): f.unlink()
    return load_from_disk(str(folder/'data'))

def run_floor(folder:Path) -> dict:
    "A plain loop: from_pretrained, the processor on the same rows' messages and images, AdamW"
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    ds = _fresh_data(folder)
    marks = []
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(str(folder/'model'))
    proc = AutoProcessor.from_pretrained(str(folder/'model'))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for s in range(STEPS):
        rows = ds[s * BATCH:(s + 1) * BATCH]
        msgs = [[{'role': 'user', 'content': [{'type': 'image'}] * len(im) + [{'type': 'text', 'text': m[0]['content']}]},
                 {'role': 'assistant', 'content': [{'type': 'text', 'text': m[1]['content']}]}]
                for m, im in zip(rows['messages'], rows['images'])]
        texts = proc.apply_chat_template(msgs, tokenize=False)
        images = [[x.convert('RGB') for x in im] for im in rows['images']]
        batch = proc(text=texts, images=[x for x in images if x] and images, padding=True, return_tensors='pt')
        batch['labels'] = batch['input_ids'].masked_fill(batch['attention_mask'] == 0, -100)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        marks.append(time.perf_counter())
    return {'first_step_s': marks[0] - start, 'steps_per_s': (len(marks) - 1) / (marks[-1] - marks[0]),
            'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

def run_one(lib_name:str, folder:Path) -> dict:
    "Train with one library in this process; time to first step, throughput, peak RSS"
    import torch, transformers
    from transformers import TrainerCallback
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    if lib_name == 'floor': return run_floor(folder)
    lib = __import__(lib_name)
    marks = []
    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw): begin.append(time.perf_counter())
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())
            cpu.append(time.process_time())
    begin, cpu = [], []
    ds = _fresh_data(folder)
    args = lib.SFTConfig(output_dir=str(folder/lib_name), report_to=[], max_steps=STEPS,
                         per_device_train_batch_size=BATCH, learning_rate=1e-3, save_strategy='no',
                         logging_steps=STEPS, assistant_only_loss=True, bf16=False, use_cpu=True,
                         dataloader_num_workers=0, seed=0)
    start, start_cpu = time.perf_counter(), time.process_time()
    t = lib.SFTTrainer(str(folder/'model'), args=args, train_dataset=ds, callbacks=[Clock()])
    built = time.perf_counter()
    t.train()
    return {'first_step_s': marks[0] - start, 'first_step_cpu_s': cpu[0] - start_cpu,
            'construct_s': built - start, 'train_begin_s': begin[0] - start,
            'steps_per_s': (len(marks) - 1) / (marks[-1] - marks[0]),
            'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

ROWS = (('first_step_s', 'time to first step', 'min', '<= 0.5x TRL', 0.5),
        ('peak_rss_mb', 'peak MiB', 'min', '<= 1.0x TRL', 1.0),
        ('steps_per_s', 'steps per second', 'max', '>= 1.2x TRL', 1.2))

def main():
    from datasets import disable_progress_bars
    from sft_nb.vision import save_tiny_vlm
    disable_progress_bars()
    folder = Path(tempfile.mkdtemp())
    save_tiny_vlm(folder/'model', 'llava')
    make_data(folder, N)
    runs = {'trl': [], 'sft_nb': [], 'floor': []}
    for rep in range(REPEATS):
        for lib in runs:
            out = subprocess.run([sys.executable, __file__, '--one', lib, str(folder)], capture_output=True, text=True)
            if out.returncode: raise SystemExit(f"{lib} failed:\n{out.stderr[-3000:]}")
            runs[lib].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rep, lib, runs[lib][-1], flush=True)
    pick = {'min': min, 'max': max}
    print(f"\n## {N} image conversations, tiny LLaVA, batch {BATCH}, {STEPS} steps, CPU, best of {REPEATS}")
    print(f"{'':20} {'TRL':>9} {'sft_nb':>9} {'floor':>9} {'vs TRL':>8} {'vs floor':>9}  target")
    rows = []
    for key, metric, how, target, bound in ROWS:
        a, b, f = (pick[how](r[key] for r in runs[lib]) for lib in ('trl', 'sft_nb', 'floor'))
        met = b / a <= bound if how == 'min' else b / a >= bound
        print(f"{metric:20} {a:9.2f} {b:9.2f} {f:9.2f} {b / a:7.2f}x {b / f:8.2f}x  {target} {'met' if met else 'NOT met'}")
        rows.append({'workload': f"{N} image conversations, tiny LLaVA, batch {BATCH}, {STEPS} steps",
                     'metric': metric, 'sft_nb': b, 'trl': a, 'floor': f, 'floor_name': 'plain loop',
                     'ratio_vs_trl': b / a, 'ratio_vs_floor': b / f, 'target': target, 'met': met})
    build = min(r['construct_s'] for r in runs['sft_nb'])
    print(f"(sft_nb's trainer construction, best: {build:.2f} s; TRL's: {min(r['construct_s'] for r in runs['trl']):.2f} s)")
    cpu = [statistics.median(r['first_step_cpu_s'] for r in runs[lib]) for lib in ('trl', 'sft_nb')]
    print(f"(CPU seconds to the first step, median: TRL {cpu[0]:.2f}, sft_nb {cpu[1]:.2f}, {cpu[1] / cpu[0]:.2f}x)")
    out = Path(__file__).parent/'results'
    out.mkdir(exist_ok=True)
    res = {'bench': 'vision', 'machine': machine(), 'command': f"python bench/bench_vision.py {N}", 'rows': rows}
    (out/'vision.json').write_text(json.dumps(res, indent=1) + '\n')

if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--one': print(json.dumps(run_one(sys.argv[2], Path(sys.argv[3]))))
    else: main()
