"""Data: the demo tokenizer, generated arithmetic conversations, preprocessing, collators and samplers."""
