__version__ = "0.0.1"
"Supervised fine-tuning of causal language models: a literate, drop-in TRL `SFTTrainer`."

# Public names load on first use, so `import sft_nb` stays cheap (no torch/transformers import).
_LAZY = {
    'SFTConfig': 'config', 'ModelConfig': 'config', 'ScriptArguments': 'config', 'DatasetMixtureConfig': 'config',
    'DatasetConfig': 'config', 'parse_args': 'config',
    'load_model': 'models', 'load_tokenizer': 'models', 'prepare_tokenizer': 'models', 'get_quantization_config': 'models',
    'clone_chat_template': 'models',
    'get_peft_config': 'adapters', 'apply_peft': 'adapters', 'merge_adapters': 'adapters', 'load_adapter': 'adapters',
    'prepare_dataset': 'data', 'show_trained': 'data',
    'pack_dataset': 'packing', 'DataCollatorForLanguageModeling': 'packing',
    'sft_loss': 'loss',
    'save_model': 'save', 'verify_saved': 'save', 'model_card': 'save', 'write_model_card': 'save', 'push_to_hub': 'save',
    'PushError': 'save', 'CrashSafeSaveMixin': 'save',
    'SFTLossMixin': 'loss', 'TokenCounter': 'loss', 'DataFormatError': 'data',
    'SFTTrainer': 'trainer',
}

def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

def __dir__(): return sorted(list(globals()) + list(_LAZY))
__all__ = list(_LAZY)
