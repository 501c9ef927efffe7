"""The embedded default models (HF checkpoints in sub-folders) and the script that trains them."""
