"""Hugging Face <-> Megatron conversion (`focusft convert import-hf / export-hf`).

hf_config.py   HF config.json <-> ModelPreset (the families and features we support).
state_dict.py  the one name table and the fused layouts (QKV per query group, gate|up).
hf_files.py    reading and checking safetensors directories; writing them aside, then renaming.
commands.py    the import and export procedures (collective under torchrun).
"""
