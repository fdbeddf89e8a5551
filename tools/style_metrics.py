"""Measure the house-style figures of issue 17 on this checkout.

Usage: python tools/style_metrics.py [--json]

- long lines: lines of the exported package (sft_nb/*.py, not the generated _modidx.py) over 100 and over 120 chars;
  nbdev wraps the `__all__` it writes at 120 characters and then prefixes `__all__ = `, so those are counted apart
- multi-statement lines: lines on which two or more simple statements start (`a; b`, `if x: a; b`);
  a compound header with one statement after it (`if x: return y`) is one statement, as nbdev and fastcore write it
- export cells: lines per `#| export` cell across nbs/*.ipynb, median and max
- markdown cells: characters per markdown cell in the module notebooks, median
- tests: code lines in tests/*.py against code lines of non-export cells in the module notebooks
"""
import ast, json, re, statistics, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPORT_RE = re.compile(r'^\s*#\|\s*export(s)?\b', re.M)


def package_files():
    "The exported modules, without nbdev's generated index"
    return sorted(p for p in (ROOT/'sft_nb').glob('*.py') if p.name != '_modidx.py')


def multi_statement_lines(src):
    "Line numbers where two or more simple statements start"
    counts = {}
    for node in ast.walk(ast.parse(src)):
        simple = isinstance(node, ast.stmt) and not hasattr(node, 'body')
        if simple:
            counts[node.lineno] = counts.get(node.lineno, 0) + 1
    return sorted(line for line, n in counts.items() if n > 1)


def module_notebooks():
    "The numbered notebooks that export a module"
    return sorted(p for p in (ROOT/'nbs').glob('[0-9]*.ipynb'))


def cells(path):
    return json.loads(path.read_text())['cells']


def source(cell):
    return ''.join(cell['source'])


def code_lines(text):
    "Lines that are neither blank, comments nor nbdev directives"
    lines = (line.strip() for line in text.splitlines())
    return sum(1 for line in lines if line and not line.startswith('#'))


def python_only(text):
    "A code cell without IPython magics and shell escapes, which `ast` can't parse"
    keep = ('' if line.lstrip().startswith(('%', '!')) else line for line in text.splitlines())
    return '\n'.join(keep)


def measure():
    lines = [line for p in package_files() for line in p.read_text().splitlines()]
    multi = {p.name: multi_statement_lines(p.read_text()) for p in package_files()}
    export_cells = [len(source(c).splitlines()) for nb in module_notebooks() for c in cells(nb)
                    if c['cell_type'] == 'code' and EXPORT_RE.search(source(c))]
    markdown = [len(source(c)) for nb in module_notebooks() for c in cells(nb) if c['cell_type'] == 'markdown']
    nb_tests = sum(code_lines(source(c)) for nb in module_notebooks() for c in cells(nb)
                   if c['cell_type'] == 'code' and not EXPORT_RE.search(source(c)))
    py_tests = sum(code_lines(p.read_text()) for p in (ROOT/'tests').glob('*.py'))
    nb_code = [source(c) for nb in module_notebooks() for c in cells(nb) if c['cell_type'] == 'code']
    nb_lines = [line for text in nb_code for line in text.splitlines()]
    nb_multi = sum(len(multi_statement_lines(python_only(text))) for text in nb_code)
    return {
        'package_lines': len(lines),
        'lines_over_100_pct': round(100*sum(len(line) > 100 for line in lines)/len(lines), 1),
        'lines_over_120': sum(len(line) > 120 and not line.startswith('__all__ = ') for line in lines),
        'generated_all_lines_over_120': sum(len(line) > 120 and line.startswith('__all__ = ') for line in lines),
        'multi_statement_lines': sum(len(v) for v in multi.values()),
        'export_cells': len(export_cells),
        'export_cell_lines_median': statistics.median(export_cells),
        'export_cell_lines_max': max(export_cells),
        'markdown_chars_median': statistics.median(markdown),
        'notebook_code_lines': len(nb_lines),
        'notebook_lines_over_100_pct': round(100*sum(len(line) > 100 for line in nb_lines)/len(nb_lines), 1),
        'notebook_lines_over_120': sum(len(line) > 120 for line in nb_lines),
        'notebook_multi_statement_lines': nb_multi,
        'test_code_lines_tests_py': py_tests,
        'test_code_lines_notebooks': nb_tests,
        'test_code_in_tests_py_pct': round(100*py_tests/(py_tests + nb_tests), 1),
        'multi_statement_where': {k: v for k, v in multi.items() if v},
    }


if __name__ == '__main__':
    m = measure()
    if '--json' in sys.argv:
        print(json.dumps(m, indent=1))
    else:
        where = m.pop('multi_statement_where')
        for k, v in m.items():
            print(f'{k:32} {v}')
        for name, found in where.items():
            print(f'  multi-statement lines in {name}: {found}')
