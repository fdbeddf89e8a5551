"""Execute the notebooks and save their outputs, so the docs site shows results; or check the saved ones.

    python tools/run_notebooks.py                 # run every notebook in nbs/, save outputs, nbdev-clean
    python tools/run_notebooks.py nbs/05_packing.ipynb
    python tools/run_notebooks.py --check nbs/05_packing.ipynb   # exit 1 if a saved output no longer matches

Each notebook runs in its own process, the way `nbdev-test` runs it (cells flagged with `tst_flags` are skipped and
keep the outputs they had, e.g. from a GPU run). Outputs are made reproducible before they are saved: progress bars
are off, temporary folders read `/tmp/…`, and object addresses are masked. A cell whose output can't be reproduced
(timings, memory) starts with the comment `# output varies` and is not checked.
"""
import json, os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
VARIES = '# output varies'
QUIET = {'TQDM_DISABLE': '1', 'HF_DATASETS_DISABLE_PROGRESS_BARS': '1', 'HF_HUB_DISABLE_PROGRESS_BARS': '1',
         'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}
TMP_RE = re.compile(r'/tmp/(?:pytest-of-[\w-]+/)?[\w.-]*tmp[\w.-]*')
ADDRESS_RE = re.compile(r' at 0x[0-9a-f]{6,}')
SITE_RE = re.compile(r'\S*/site-packages/')
# bitsandbytes' note about an optional package, and DeepSpeed's choice of accelerator, printed on import where
# they are installed: noise on every page, and on no page where they are not
NOISE_RE = re.compile(r'^(?:Failed to load CPU gemm_4bit_forward from kernels-community'
                      r'|\[[\d\- :,]+\] \[\w+\] \[real_accelerator\.py:\d+:\w+\]).*\n?', re.M)
NUMBER_RE = re.compile(r'-?\d+\.\d+(?:e[-+]?\d+)?')
# what a run measures rather than computes: Trainer's runtimes and rates, and durations anywhere
TIMING_RE = re.compile(r"""('\w*(?:runtime|per_second|_time|total_flos)'\s*:\s*)'?[-\d.e+]+'?|\b\d+(?:\.\d+)?\s?(?:ms|µs|s)\b""")

_RUN = """
import sys
from nbdev.config import get_config
from nbdev.test import test_nb
ok, secs = test_nb(sys.argv[1], skip_flags=get_config().tst_flags.split(), force_flags=sys.argv[2].split(), save=True)
sys.exit(0 if ok else 1)
"""


def notebooks():
    "Every notebook under nbs/ except generated and hidden folders"
    return sorted(p for p in NBS.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(NBS).parts))


def scrub_text(text:str) -> str:
    "Mask what differs between machines and runs: temporary folders, install paths, object addresses"
    text = NOISE_RE.sub('', text)
    return ADDRESS_RE.sub(' at 0x…', SITE_RE.sub('…/site-packages/', TMP_RE.sub('/tmp/…', text)))


def _is_progress(output:dict) -> bool:
    "A progress bar that slipped through: carriage returns or a tqdm rate"
    text = ''.join(output.get('text', ''))
    return output.get('output_type') == 'stream' and ('\r' in text or ' it/s]' in text or 's/it]' in text)


def scrub_outputs(nb:dict) -> dict:
    "Drop progress bars and widgets, and mask temporary paths, in every output of `nb`"
    for cell in nb['cells']:
        if cell['cell_type'] != 'code':
            continue
        kept = []
        for output in cell.get('outputs', []):
            if _is_progress(output):
                continue
            data = output.get('data', {})
            data.pop('application/vnd.jupyter.widget-view+json', None)
            for key in ('text/plain', 'text/html', 'text/markdown'):
                if key in data:
                    data[key] = scrub_text(''.join(data[key])).splitlines(True)
            if 'text' in output:
                output['text'] = scrub_text(''.join(output['text'])).splitlines(True)
            if output.get('text') or data:
                kept.append(output)
        cell['outputs'] = kept
    return nb


def execute(path:Path, dest:Path, force_flags:str='') -> str|None:
    "Run the notebook at `path` in a fresh process and write it, with outputs, to `dest`; what failed, if it did"
    if dest != path:
        dest.write_text(path.read_text())
    env = {**os.environ, **QUIET}
    r = subprocess.run([sys.executable, '-c', _RUN, str(dest), force_flags], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return f"{path.relative_to(ROOT)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-12000:]}"
    nb = scrub_outputs(json.loads(dest.read_text()))
    dest.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    return None


def _comparable(output:dict):
    "What must match in an output: its kind and its text (images only by presence: PNG bytes vary by platform)"
    data = output.get('data', {})
    text = ''.join(output.get('text', '')) or ''.join(data.get('text/html', data.get('text/plain', '')))
    kinds = sorted(k for k in data if k.startswith('image/'))
    return output.get('output_type'), kinds, text


def _timeless(text:str) -> str:
    return TIMING_RE.sub(lambda m: (m.group(1) or '') + '…', text)


def _same_text(saved:str, fresh:str) -> bool:
    "Equal, except timings, and floats that differ by under 1% (another CPU sums in another order)"
    saved, fresh = _timeless(saved), _timeless(fresh)
    if NUMBER_RE.sub('#', saved) != NUMBER_RE.sub('#', fresh):
        return False
    pairs = zip(NUMBER_RE.findall(saved), NUMBER_RE.findall(fresh))
    return all(abs(float(a) - float(b)) <= 0.01 * max(abs(float(a)), abs(float(b))) + 1e-9 for a, b in pairs)


def _first_difference(saved:list, fresh:list) -> str:
    "The first line that differs between two cells' outputs, or how their kinds and counts differ"
    if [x[:2] for x in saved] != [y[:2] for y in fresh]:
        return f"saved outputs {[x[:2] for x in saved]} but it now gives {[y[:2] for y in fresh]}"
    for x, y in zip(saved, fresh):
        for n, (a, b) in enumerate(zip(x[2].splitlines() + [''], y[2].splitlines() + [''])):
            if not _same_text(a, b):
                return f"output line {n + 1} was {a[:400]!r} and is now {b[:400]!r}"
    return "outputs differ"


def differences(saved_nb:dict, fresh_nb:dict) -> list[str]:
    """Cells whose saved outputs no longer match what they compute now: printed text, results and displays (stderr
    holds warnings and logs that change with library versions; cells marked `# output varies` are not compared)"""
    found = []
    for i, (saved, fresh) in enumerate(zip(saved_nb['cells'], fresh_nb['cells'])):
        source = ''.join(saved['source'])
        if saved['cell_type'] != 'code' or VARIES in source:
            continue
        a = [_comparable(o) for o in saved.get('outputs', []) if o.get('name') != 'stderr']
        b = [_comparable(o) for o in fresh.get('outputs', []) if o.get('name') != 'stderr']
        same = len(a) == len(b) and all(x[:2] == y[:2] and _same_text(x[2], y[2]) for x, y in zip(a, b))
        if not same:
            found.append(f"cell {i} ({source.splitlines()[0][:60] if source else ''}): {_first_difference(a, b)}")
    return found


def check(path:Path, force_flags:str='') -> list[str]:
    "Run a copy of `path` and list the cells whose saved outputs differ from what they compute now"
    dest = path.parent/f'.check-{path.name}'  # beside it: cells read files relative to their notebook
    try:
        failed = execute(path, dest, force_flags)
        if failed:
            return [failed]
        return differences(json.loads(path.read_text()), json.loads(dest.read_text()))
    finally:
        dest.unlink(missing_ok=True)


def main(args):
    checking = '--check' in args
    paths = [Path(a).resolve() for a in args if a != '--check'] or notebooks()
    failed = []
    for path in paths:
        if checking:
            problems = check(path)
            failed += problems
            print(f"{path.relative_to(ROOT)}: {'ok' if not problems else chr(10).join(problems)}")
        else:
            problem = execute(path, path)
            failed += [problem] if problem else []
            print(problem or f"{path.relative_to(ROOT)}: saved")
    if not checking:
        subprocess.run([sys.executable, '-c', 'from nbdev.clean import nbdev_clean; nbdev_clean()'], cwd=ROOT, check=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
