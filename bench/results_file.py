"""Write a benchmark's results to bench/results/<name>.json in the schema bench/table.py reads."""
import json, os, platform


def machine(threads=None, extra=''):
    "CPU model, cores and the library versions the numbers depend on (then `extra`, e.g. another library's)"
    import torch, transformers, trl
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),
               platform.processor())
    cores = f"{os.cpu_count()} cores" + (f" ({threads} torch threads)" if threads else '')
    base = f"{cpu}, {cores}, torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    return f"{base}, {extra}" if extra else base


def row(workload, metric, sft_nb, trl=None, floor=None, floor_name=None, target='', met=None, **extra):
    "One row: the ratios are sft_nb / TRL and sft_nb / floor (below 1 means less time or memory than they take)"
    return {'workload': workload, 'metric': metric, 'sft_nb': sft_nb, 'trl': trl, 'floor': floor,
            'floor_name': floor_name, 'ratio_vs_trl': None if trl is None else round(sft_nb / trl, 3),
            'ratio_vs_floor': None if floor is None else round(sft_nb / floor, 3), 'target': target, 'met': met,
            **extra}


def write(name, command, rows, threads=None, loads=None):
    "bench/results/<name>.json, with the machine and the load average seen while measuring"
    out = {'bench': name, 'machine': machine(threads), 'command': command, 'rows': rows}
    if loads:
        out['load_average'] = [round(min(loads), 2), round(max(loads), 2)]
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f'{name}.json'), 'w') as f:
        json.dump(out, f, indent=1)
    return out
