"""Find (and fix) notebook cells that break `nbdev-docs`.

nbdev renders the API docs by running, in a fresh process, every export cell and every cell that contains an
`import` (or calls `show_doc`), and nothing else. A cell it runs that reads a name only a skipped cell defines fails
there, though the notebook runs fine top to bottom. This finds such cells statically, and `--fix` moves their
imports into a cell of their own (the rest of the cell then no longer runs during the docs build).

    python tools/docs_cells.py            # list the problem cells; exit 1 if any
    python tools/docs_cells.py --fix      # split them
"""
import ast, builtins, json, re, sys, uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRECTIVE_RE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*)$')
SHOW_DIRECTIVES = {'export', 'exports', 'exporti', 'exec_doc'}
ALWAYS_THERE = set(dir(builtins)) | {'show_doc', 'get_ipython', 'display', '__file__', '_', '__name__'}


def notebooks():
    nbs = ROOT/'nbs'
    return sorted(p for p in nbs.rglob('*.ipynb') if not any(s.startswith(('_', '.')) for s in p.relative_to(nbs).parts))


def directives(source:str) -> dict:
    "The `#| name: value` lines at the top of a cell"
    found = {}
    for line in source.splitlines():
        m = DIRECTIVE_RE.match(line)
        if not m:
            break
        found[m.group(1)] = m.group(2).strip()
    return found


def _python(source:str) -> str:
    "The cell without IPython magics and shell escapes"
    return '\n'.join('' if line.lstrip().startswith(('%', '!')) else line for line in source.splitlines())


def parse(source:str):
    try:
        return ast.parse(_python(source))
    except SyntaxError:
        return None


def docs_runs(cell:dict) -> bool:
    "Whether nbdev's `exec_show_docs` runs this cell (mirrors nbdev.processors._do_eval)"
    source = ''.join(cell['source'])
    if cell['cell_type'] != 'code' or not source.strip() or 'nbdev_export()' in source:
        return False
    tree = parse(source)
    if tree is None:
        return False
    found = directives(source)
    if found.get('eval', '').lower() == 'false':
        return False
    if found.keys() & SHOW_DIRECTIVES:
        return True
    nodes = list(ast.walk(tree))
    if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes):
        return True
    return any(isinstance(n, ast.Call) and getattr(n.func, 'id', None) == 'show_doc' for n in nodes)


def star_names(module:str) -> set:
    "What `from module import *` binds"
    import importlib
    if str(ROOT) not in sys.path:  # run as a script from tools/: the notebooks' `from sft_nb.x import *`
        sys.path.insert(0, str(ROOT))
    mod = importlib.import_module(module)
    return set(getattr(mod, '__all__', None) or [n for n in dir(mod) if not n.startswith('_')])


def defined(tree) -> set:
    "Every name a cell binds, at any depth"
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, ast.ImportFrom) and n.names[0].name == '*':
            names |= star_names(n.module)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split('.')[0] for a in n.names}
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
        elif isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name:
            names.add(n.name)
    return names


def used(tree) -> set:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _imports(node) -> bool:
    return isinstance(node, (ast.Import, ast.ImportFrom))


def _setup(node) -> bool:
    "An import, or `os.environ[KEY] = 'constant'`, which must run before the imports that read it"
    if _imports(node):
        return True
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.value, ast.Constant)):
        return False
    target = node.targets[0]
    return isinstance(target, ast.Subscript) and ast.unparse(target.value) == 'os.environ'


def mixed(cell:dict) -> bool:
    "A cell nbdev-docs runs only for its imports, but which holds other code too"
    source = ''.join(cell['source'])
    if not docs_runs(cell) or directives(source).keys() & SHOW_DIRECTIVES:
        return False
    tree = parse(source)
    if any(isinstance(n, ast.Call) and getattr(n.func, 'id', None) == 'show_doc' for n in ast.walk(tree)):
        return False
    return not all(_setup(n) for n in tree.body)


def problems(nb:dict) -> list[tuple[int, str]]:
    """Cells nbdev-docs runs that may need what a skipped cell made: any cell it runs for its imports that holds
    other code (names, files, state), and any it runs that reads a name no earlier run cell defines"""
    available = set(ALWAYS_THERE)
    found = []
    for i, cell in enumerate(nb['cells']):
        if not docs_runs(cell):
            continue
        source = ''.join(cell['source'])
        tree = parse(source)
        exported = directives(source).keys() & SHOW_DIRECTIVES  # run in order by the library too
        missing = set() if exported else used(tree) - defined(tree) - available
        if mixed(cell) or missing:
            found.append((i, f"imports mixed with other code{f', reads {sorted(missing)}' if missing else ''}"))
        available |= defined(tree)
    return found


def split_imports(cell:dict) -> tuple[dict, dict]:
    "An import-only cell (same directives, no export) and the cell without its top-level imports"
    source = ''.join(cell['source'])
    lines = source.splitlines()
    tree = parse(source)
    imports = [n for n in tree.body if _setup(n)]
    taken = {i for n in imports for i in range(n.lineno - 1, n.end_lineno)}
    heads = [l for l in lines if DIRECTIVE_RE.match(l) and not DIRECTIVE_RE.match(l).group(1).startswith('export')]
    head_count = len(directives(source))
    import_lines = [lines[i] for i in sorted(taken)]
    rest = [l for i, l in enumerate(lines) if i not in taken]
    import_cell = dict(cell_type='code', execution_count=None, id=uuid.uuid4().hex[:8], metadata={}, outputs=[],
                       source='\n'.join(heads + import_lines).splitlines(True))
    while len(rest) > head_count and not rest[head_count].strip():
        rest.pop(head_count)
    cell = {**cell, 'source': '\n'.join(rest).splitlines(True)}
    return import_cell, cell


def fix(path:Path) -> int:
    "Split the problem cells of one notebook; return how many were split"
    nb = json.loads(path.read_text())
    done = 0
    for i, why in reversed(problems(nb)):
        cell = nb['cells'][i]
        tree = parse(''.join(cell['source']))
        nested = [n for top in tree.body if not _setup(top) for n in ast.walk(top) if _imports(n)]
        if nested or not mixed(cell):
            print(f"{path.name} cell {i}: {why}; imports inside blocks: fix by hand")
            continue
        nb['cells'][i:i + 1] = split_imports(cell)
        done += 1
    if done:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    return done


def main(args):
    paths = [Path(a).resolve() for a in args if not a.startswith("--")] or notebooks()
    if '--fix' in args:
        for path in paths:
            fix(path)
    bad = [(p, i, m) for p in paths for i, m in problems(json.loads(p.read_text()))]
    for path, i, why in bad:
        print(f"{path.relative_to(ROOT)} cell {i}: {why}")
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
