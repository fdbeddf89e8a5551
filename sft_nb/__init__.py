"""Supervised fine-tuning of causal language models: a literate, drop-in TRL `SFTTrainer`.

`from sft_nb import SFTConfig, SFTTrainer` works like `from trl import SFTConfig, SFTTrainer`. Every public name the
library's notebooks export is importable from here; `sft_nb.tiny` (test fixtures) and the `sft-nb` command's
modules (`sft_nb.cli`, `sft_nb.preview`, `sft_nb.trained`) are imported by their module name.
"""
__version__ = "0.0.1"

# The names are read from nbdev's generated index, not kept by hand, and each module loads on first use, so
# `import sft_nb` stays cheap (no torch or transformers import).
_NOT_REEXPORTED = ('tiny', 'cli', 'preview', 'trained')


def _public_names() -> dict:
    "Map each public name the notebooks export to its module, from nbdev's `_modidx` (a literal dict)"
    from ._modidx import d
    names = {}
    for module, symbols in d['syms'].items():
        short = module.split('.', 1)[1]
        if short in _NOT_REEXPORTED:
            continue
        for symbol in symbols:
            name = symbol[len(module) + 1:]
            if '.' not in name and not name.startswith('_'):
                names.setdefault(name, short)
    return names


_LAZY = _public_names()
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
