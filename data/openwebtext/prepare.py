"""
OpenWebText (Gokaslan & Cohen 2019, Skylion007/openwebtext on the Hugging Face hub), tokenized: writes train.bin and
val.bin (uint16 token ids, one <|endoftext|> after every document) and meta.json (tokenizer, token counts).

$ python data/openwebtext/prepare.py                      # GPT-2 BPE -> data/openwebtext/
$ python data/openwebtext/prepare.py --tokenizer=neox     # GPT-NeoX-20B (RWKV-4 Pile models) -> data/openwebtext_neox/
$ python data/openwebtext/prepare.py --source=docs.jsonl --out_dir=/tmp/mine   # a local jsonl / parquet / txt file

The dataset is streamed (nothing is held in memory or fully downloaded first) and tokenized by a process pool.
Every val_every-th document is held out for validation (2000: 0.05%, nanoGPT's split), and both splits are tokenized
with the same tokenizer, so a model evaluated on val reads the text it was trained to read.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: configurator, tokenizer, data
from configurator import parse_config, run_script  # noqa: E402
from data.common import DOCUMENT_OPTIONS, prepare_documents  # noqa: E402


def main(argv):
    prepare_documents(parse_config(DOCUMENT_OPTIONS, argv, __doc__), 'Skylion007/openwebtext', 'openwebtext')


if __name__ == '__main__':
    run_script(main)
