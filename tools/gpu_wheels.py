"""Fill `.whl/` with the wheels `tools/gpu_check.sh` installs on a GPU machine that can't reach a package registry.

The GPU machines this project borrows (see README, "Checks on a GPU") run their own image: Python 3.12, CUDA 13 and a CUDA
build of torch, but no bitsandbytes, datasets, trl or nbdev, and other versions of transformers, peft and huggingface_hub than
CI tests. This carries, at the versions installed here (the ones CI tests), every distribution `sft_nb[dev]` needs except
torch, the CUDA libraries, and the large compiled packages the image already has (`IMAGE_HAS`).

bitsandbytes ships one library per CUDA and ROCm version (43 MB); only its CPU library and the CUDA 13 ones are kept, which
makes the whole folder about 45 MiB, under the 64 MiB the device tool carries.

    python tools/gpu_wheels.py              # wheels for the GPU image (CPython 3.12, manylinux x86-64)
    python tools/gpu_wheels.py --python 3.11 --dest /tmp/whl   # for trying the install on this machine
"""
import argparse, importlib.metadata as md, re, shutil, subprocess, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# Compiled packages the image has (KINDS.md of the device tool); carrying them would cost 100+ MB.
IMAGE_HAS = {'numpy', 'pyarrow', 'pandas', 'matplotlib', 'contourpy', 'fonttools', 'kiwisolver', 'pillow', 'psutil', 'pyyaml',
             'markupsafe', 'grpcio', 'protobuf', 'hf-xet', 'xxhash', 'tensorboard', 'tensorboard-data-server', 'sympy', 'networkx'}
NEVER = {'torch', 'triton', 'sft-nb'}
KEEP_BNB = re.compile(r'libbitsandbytes_(cpu|cuda13\d)\.so$')

def norm(name): return re.sub(r'[-_.]+', '-', name).lower()

def closure(root='sft-nb', extras=('dev',)) -> dict[str, str]:
    "name -> installed version of everything `root[extras]` needs, read from this environment's metadata"
    dists = {norm(d.metadata['Name']): d for d in md.distributions()}
    seen, todo = {}, [(root, set(extras))]
    while todo:
        name, ex = todo.pop()
        if name in seen or name not in dists: continue
        seen[name] = dists[name].version
        for r in dists[name].requires or []:
            req = Requirement(r)
            if req.marker is None or any(req.marker.evaluate({'extra': e}) for e in ex | {''}): todo.append((norm(req.name), set()))
    return seen

def wanted() -> list[str]:
    return sorted(f'{n}=={v}' for n, v in closure().items()
                  if n not in IMAGE_HAS | NEVER and not n.startswith('nvidia-'))

def slim_bitsandbytes(whl:Path) -> None:
    "Drop every bitsandbytes library but the CPU and CUDA 13 ones (and their RECORD lines)"
    tmp = whl.with_suffix('.tmp')
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_DEFLATED) as dst:
        dropped = {i.filename for i in src.infolist() if i.filename.endswith('.so') and not KEEP_BNB.search(i.filename)}
        for i in src.infolist():
            if i.filename in dropped: continue
            data = src.read(i.filename)
            if i.filename.endswith('.dist-info/RECORD'):
                data = b''.join(l for l in data.splitlines(keepends=True) if l.split(b',')[0].decode() not in dropped)
            dst.writestr(i, data)
    tmp.replace(whl)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--python', default='3.12', help='Python version of the machine the wheels are for')
    p.add_argument('--dest', default=str(ROOT/'.whl'))
    a = p.parse_args()
    dest = Path(a.dest)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    abi = 'cp' + a.python.replace('.', '')
    plat = [x for t in ('manylinux_2_28_x86_64', 'manylinux_2_24_x86_64', 'manylinux_2_17_x86_64', 'manylinux2014_x86_64', 'any')
            for x in ('--platform', t)]
    reqs = wanted()
    subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:', '-d', str(dest),
                    '--python-version', a.python, '--implementation', 'cp', '--abi', abi, '--abi', 'abi3', '--abi', 'none', *plat, *reqs],
                   check=True)
    for whl in dest.glob('bitsandbytes-*.whl'): slim_bitsandbytes(whl)
    total = sum(f.stat().st_size for f in dest.iterdir())
    print(f"{len(reqs)} wheels, {total/2**20:.1f} MiB in {dest}")
    if total > 60 * 2**20: sys.exit("Over 60 MiB: the device tool carries at most 64 MiB with the working tree. Add big ones to IMAGE_HAS.")

if __name__ == '__main__': main()
