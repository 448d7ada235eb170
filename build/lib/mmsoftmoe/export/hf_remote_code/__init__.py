"""Remote code of the `hf` export: copied into every export folder by transformers' `save_pretrained`."""
