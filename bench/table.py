"""One Markdown table of every benchmark result in bench/results/*.json, and the machine they ran on.

    python bench/table.py                  # print the table
    python bench/table.py --check README.md  # exit 1 if README's table block differs from the results
    python bench/table.py --write nbs/index.ipynb  # put the table into the notebook's block (then make_readme)

The block in a Markdown file (or a notebook's markdown cell) sits between `<!-- bench-table -->` and
`<!-- /bench-table -->`; `--check` compares what is between them with this script's output (whitespace at the ends
of the block ignored), so the published figures are the measured ones.
"""
import difflib, glob, json, os, sys

START, END = '<!-- bench-table -->', '<!-- /bench-table -->'
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def _value(x, metric):
    "A measured value with its unit, from the metric's name"
    if x is None:
        return '–'
    if 'MiB' in metric:
        return f"{x:,.0f} MiB"
    if 'per second' in metric:  # a rate, not a duration
        return f"{x:.1f} {metric.removesuffix(' per second')}/s"
    if 'second' in metric or metric.startswith('time'):
        return f"{x:.3f} s" if x < 1 else f"{x:.2f} s" if x < 10 else f"{x:.1f} s"
    return f"{x:.4g}"


def _ratio(r):
    return '–' if r is None else f"{r:.2f}x"


def _vs_trl(row):
    m = row['metric']
    if row.get('trl') is None:
        return f"{_value(row['sft_nb'], m)} (TRL: –)"
    return f"{_value(row['sft_nb'], m)} vs {_value(row['trl'], m)} (**{_ratio(row.get('ratio_vs_trl'))}**)"


def _vs_floor(row):
    if row.get('floor') is None:
        return '–'
    out = (f"**{_ratio(row.get('ratio_vs_floor'))}** of {row.get('floor_name') or 'floor'} "
           f"({_value(row['floor'], row['metric'])})")
    if row.get('floor_with_offsets') is not None:  # the tokenizer's call that also works out character offsets
        out += (f"; {_ratio(row.get('ratio_vs_floor_with_offsets'))} of it with offsets "
                f"({_value(row['floor_with_offsets'], row['metric'])})")
    return out


def load(folder=RESULTS):
    "Every results file, sorted by benchmark name"
    out = []
    for path in sorted(glob.glob(os.path.join(folder, '*.json'))):
        with open(path) as f:
            res = json.load(f)
        for k in ('bench', 'machine', 'command', 'rows'):
            if k not in res:
                raise ValueError(f"{path} has no '{k}': see the results schema in bench/table.py's callers")
        out.append(res)
    return out


def table(results):
    "The Markdown table and, under it, the machine line(s) and how to rerun"
    lines = ['| what | benchmark | sft_nb vs TRL 1.16 | sft_nb vs the floor | target | met |',
             '|---|---|---|---|---|---|']
    for res in results:
        for row in res['rows']:
            met = 'yes' if row.get('met') else '**no**'
            lines.append(f"| {row['workload']} | `{res['command']}`: {row['metric']} | {_vs_trl(row)} "
                         f"| {_vs_floor(row)} | {row.get('target', '')} | {met} |")
    machines = sorted({res['machine'] for res in results})
    lines.append('')
    if len(machines) == 1:
        lines.append(f"Machine: {machines[0]}.")
    else:
        for res in results:
            lines.append(f"Machine for `{res['command']}`: {res['machine']}.")
    loads = [f"`{res['command']}` {lo}-{hi}" for res in results if res.get('load_average')
             for lo, hi in [res['load_average']]]
    if loads:
        lines.append(f"Load average (1 min) while measured: {', '.join(loads)}.")
    return '\n'.join(lines)


def block(text, where):
    "What sits between the table markers in `text`"
    if START not in text or END not in text:
        raise SystemExit(f"{where} has no table block: put `{START}` and `{END}` around it")
    return text.split(START, 1)[1].split(END, 1)[0]


def check(path, want):
    "0 if `path`'s table block is `want`, else 1 with a diff"
    with open(path) as f:
        text = f.read()
    if path.endswith('.ipynb'):
        cells = json.loads(text)['cells']
        text = '\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
    have = block(text, path).strip()
    if have == want.strip():
        return 0
    diff = difflib.unified_diff(have.splitlines(), want.strip().splitlines(), f"{path} (table block)",
                                'bench/results', lineterm='')
    print('\n'.join(diff))
    print(f"\n{path}'s benchmark table differs from bench/results: paste `python bench/table.py`'s output "
          f"between {START} and {END}.")
    return 1


def write(path, want):
    "Replace the table block of a notebook's markdown cell (or of a Markdown file) with `want`"
    with open(path) as f:
        text = f.read()
    new = lambda t: t.split(START, 1)[0] + START + '\n' + want.strip() + '\n' + END + t.split(END, 1)[1]
    if not path.endswith('.ipynb'):
        block(text, path)
        with open(path, 'w') as f:
            f.write(new(text))
        return
    nb = json.loads(text)
    cells = [c for c in nb['cells'] if c['cell_type'] == 'markdown' and START in ''.join(c['source'])]
    if not cells:
        raise SystemExit(f"{path} has no markdown cell with `{START}` ... `{END}`")
    src = new(''.join(cells[0]['source']))
    cells[0]['source'] = src.splitlines(keepends=True)
    with open(path, 'w') as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write('\n')


if __name__ == '__main__':
    md = table(load())
    if '--write' in sys.argv:
        sys.exit(write(sys.argv[sys.argv.index('--write') + 1], md))
    if '--check' in sys.argv:
        sys.exit(check(sys.argv[sys.argv.index('--check') + 1], md))
    print(md)
