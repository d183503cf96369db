"""
OpenWebText tokenized with GPT-NeoX-20B (the RWKV-4 Pile models' tokenizer), both splits, for
config/eval_rwkv4_*.py: the same as `python data/openwebtext/prepare.py --tokenizer=neox`, whose options it takes.

$ python data/openwebtext_neox/prepare.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: configurator, tokenizer, data
from configurator import ConfigError, Option, parse_config  # noqa: E402
from data.common import DOCUMENT_OPTIONS, prepare_documents  # noqa: E402

OPTIONS = {**DOCUMENT_OPTIONS, 'tokenizer': Option('neox', "GPT-NeoX-20B, as the RWKV-4 Pile models read")}

if __name__ == '__main__':
    try:
        prepare_documents(parse_config(OPTIONS, sys.argv[1:], __doc__), 'Skylion007/openwebtext', 'openwebtext')
    except ConfigError as e:
        sys.exit(f"prepare.py: error: {e}")
