"""The shipped character-level tokenizer of the CPU demo (`dfactory_hf/assets/tokenizer/`).

Regenerate the committed files (they are deterministic, so a rerun leaves git clean):

    python -m dfactory_hf.demo.tokenizer                  # writes dfactory_hf/assets/tokenizer/
    python -m dfactory_hf.demo.tokenizer --output /tmp/tok

Load it with `load_demo_tokenizer()` or `AutoTokenizer.from_pretrained(DEMO_TOKENIZER_PATH)`;
nothing is fetched from the Hub.

Why characters: a tiny model (~1M parameters) learns 2-digit arithmetic in a few thousand CPU
steps only when every digit is its own token (REFERENCE section 7). The price is length: every
character is a token, so a GSM8K-style problem is ~100-200 tokens instead of ~60 with BPE.

Vocabulary (103 ids, all below the tiny model's `vocab_size` of 128):

    id  token            role
     0  <|pad|>          pad_token: row padding only, distinct from EOS
     1  <|endoftext|>    eos_token: ends a response, also the block fill
     2  <|mask|>         mask_token: the diffusion [MASK], x_t's masked positions
     3  <|unk|>          unk_token: any character outside printable ASCII and newline
     4  <|system|>       opens a system turn
     5  <|user|>         opens a user turn
     6  <|assistant|>    opens an assistant turn
     7  "\\n"
     8  " " ... 102 "~"  printable ASCII in code-point order (id = ord(c) - 24)

No BOS is added and `add_special_tokens=True` adds nothing: the training code appends EOS.
Characters are looked up one at a time (a BPE model without merges and without pre-tokenizer),
so the tokens of a prefix of a string are a prefix of the string's tokens, unless the cut
falls inside the literal text of a special token such as "<|user|>".

Chat template: each turn is its role token followed by its content, verbatim. An assistant turn
that is not the last message is closed by EOS (as the model produced it); the last message is
followed by nothing. So for a conversation ending with the assistant's answer

    render(messages[:-1], add_generation_prompt=True) == "...<|assistant|>"
    render(messages) == render(messages[:-1], add_generation_prompt=True) + answer_content

e.g. '<|user|>What is 37 + 48?<|assistant|>37 + 48 = 85. The answer is 85.'
A system message, if any, renders as '<|system|>' + content in front of the first user turn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

DEMO_TOKENIZER_PATH = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
UNK_TOKEN = "<|unk|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

# The order fixes the ids: specials first, then "\n", then printable ASCII.
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, MASK_TOKEN, UNK_TOKEN, *ROLE_TOKENS.values()]
CHARACTERS = ["\n"] + [chr(code) for code in range(ord(" "), ord("~") + 1)]
MAX_VOCAB_SIZE = 128

# Every tag strips the whitespace around it (`{%-`, `-%}`), so the template's own line breaks
# never reach the render: the output is role tokens, contents and EOS only.
CHAT_TEMPLATE = """\
{%- for message in messages -%}
    {%- if message['role'] not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('unknown role ' + message['role'] + '; use system, user or assistant') -}}
    {%- endif -%}
    {{- '<|' + message['role'] + '|>' + message['content'] -}}
    {%- if message['role'] == 'assistant' and not loop.last -%}
        {{- eos_token -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
{%- endif -%}
"""


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer in memory (ids as in the module docstring)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    if len(vocab) > MAX_VOCAB_SIZE:
        raise ValueError(f"vocabulary size ({len(vocab)}) must be <= {MAX_VOCAB_SIZE}; drop tokens")
    # BPE with no merges = one token per character; unknown characters become one <|unk|> each.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN, fuse_unk=False))
    backend.decoder = decoders.Fuse()  # concatenate tokens, no spaces in between
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        # The default clean-up would turn "85 ." into "85." and break decode(encode(text)) == text.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def save_demo_tokenizer(output_dir: str | Path = DEMO_TOKENIZER_PATH) -> Path:
    """Build the tokenizer and `save_pretrained` it to `output_dir`; returns the directory."""
    output_dir = Path(output_dir)
    build_demo_tokenizer().save_pretrained(output_dir)
    return output_dir


def load_demo_tokenizer() -> PreTrainedTokenizerBase:
    """The shipped tokenizer, loaded offline with `AutoTokenizer` from the package assets."""
    if not (DEMO_TOKENIZER_PATH / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {DEMO_TOKENIZER_PATH}; regenerate it with `python -m dfactory_hf.demo.tokenizer`"
        )
    return AutoTokenizer.from_pretrained(DEMO_TOKENIZER_PATH)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(DEMO_TOKENIZER_PATH), help="directory to write (default: the assets)")
    args = parser.parse_args(argv)
    output_dir = save_demo_tokenizer(args.output)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    print(f"wrote {output_dir} ({len(tokenizer)} tokens)")
    for token in SPECIAL_TOKENS:
        print(f"  {tokenizer.convert_tokens_to_ids(token):3d}  {token}")
    example = [{"role": "user", "content": "What is 37 + 48?"}, {"role": "assistant", "content": "85"}]
    print("  chat template:", repr(tokenizer.apply_chat_template(example, tokenize=False)))


if __name__ == "__main__":
    main()
