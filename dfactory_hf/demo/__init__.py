"""The CPU demo's pieces, kept out of the generic package: the generated arithmetic task with its answer
extraction (`arithmetic.py`, whose `exact_match` the demo passes as `DiffusionTrainer(answer_scorer=...)`) and the
builder of the shipped character tokenizer (`tokenizer.py`, `DEMO_TOKENIZER_PATH`)."""
