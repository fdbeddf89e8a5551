"""Write README.md from nbs/index.ipynb without Quarto.

`nbdev-readme` renders the README through Quarto, which can't be installed where there is no access to its download
site. This does the same for our index notebook: markdown cells as they are, code cells fenced, `#| hide` cells dropped,
directives stripped. `python tools/make_readme.py` writes it; `--check` exits 1 if README.md is stale.
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _directives(src):
    lines = src.splitlines()
    n = next((i for i, l in enumerate(lines) if not l.startswith('#|')), len(lines))
    return {l[2:].strip().split(':')[0].strip() for l in lines[:n]}, '\n'.join(lines[n:]).strip()

def readme(nb=ROOT/'nbs'/'index.ipynb') -> str:
    out = []
    for c in json.loads(Path(nb).read_text())['cells']:
        dirs, body = _directives(''.join(c['source']))
        if 'hide' in dirs or not body: continue
        out.append(body if c['cell_type'] == 'markdown' else f"```python\n{body}\n```")
    return "\n\n".join(out) + "\n"

if __name__ == '__main__':
    text, dest = readme(), ROOT/'README.md'
    if '--check' in sys.argv: sys.exit(0 if dest.exists() and dest.read_text() == text else 1)
    dest.write_text(text)
