"""Entry points that train: `sft.py` (`dfactory-hf train`, examples/sft_llada2.py) and the shipped demo recipe."""
