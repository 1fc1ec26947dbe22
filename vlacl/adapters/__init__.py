"""LoRA adapters: reading PEFT adapter directories, streaming merges into a base model, composition.

Importing this package is cheap; the modules that need torch import it themselves.
"""
