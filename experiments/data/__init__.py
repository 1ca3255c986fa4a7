"""Data: corpora through Hugging Face datasets, tokenisers, packing and the Lightning DataModule."""
