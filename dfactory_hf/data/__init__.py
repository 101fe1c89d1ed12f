"""Data: file loading, preprocessing, collators and samplers (the demo's task and tokenizer live in `demo/`)."""
