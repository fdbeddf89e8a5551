__version__ = "0.0.1"
"Supervised fine-tuning of causal language models: a literate, drop-in TRL `SFTTrainer`."

# Public names load on first use, so `import sft_nb` stays cheap (no torch/transformers import).
_LAZY = {
    'SFTConfig': 'config', 'ModelConfig': 'config', 'ScriptArguments': 'config', 'DatasetMixtureConfig': 'config',
    'parse_args': 'config',
}

def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

def __dir__(): return sorted(list(globals()) + list(_LAZY))
__all__ = list(_LAZY)
