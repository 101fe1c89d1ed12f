"""`python -m dfactory_hf.trainer` prints the argument reference table of the README."""

from .config import arguments_markdown_table

print(arguments_markdown_table())
