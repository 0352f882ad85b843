"""Tokenizers from an HF folder, a GGUF file or a sentencepiece `.model` file."""

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """An HF tokenizer (with its chat template, when the source carries one).

    path: a folder with tokenizer files, a `.gguf` file (vocabulary, merges and chat template
    are read from its metadata) or a sentencepiece `.model` file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer source not found: {path}")
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if path.suffix == ".model":
        from transformers import LlamaTokenizer

        return LlamaTokenizer(vocab_file=str(path))
    return AutoTokenizer.from_pretrained(str(path))
