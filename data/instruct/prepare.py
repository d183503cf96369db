"""
Instruction data with a loss mask: each record of a local .jsonl / .json / .parquet (or a hub dataset) becomes
prompt tokens, response tokens and <|endoftext|>, and a mask beside the tokens says which ones train.py learns
(the response and its end; the prompt is context only). Records with a "text" field instead are learned whole.

$ python data/instruct/prepare.py --source=chat.jsonl --tokenizer=neox --out_dir=data/chat
  with lines like {"prompt": "User: What is RWKV?\\n\\nAssistant:", "response": " An RNN that trains like a ..."}

The prompt template is the data's own (RWKV World models read "User: ...\\n\\nAssistant: ..."): this script adds
nothing between prompt and response. Writes train.bin / val.bin (uint16 tokens, as every dataset here),
train.mask.bin / val.mask.bin (uint8 per token: 1 = a target the loss counts) and meta.json; every val_every-th
record goes to val.
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: configurator, tokenizer, data
from configurator import ConfigError, Option, parse_config, run_script  # noqa: E402
from data.common import documents, warn_small_splits, write_split  # noqa: E402
from files import atomic_path, write_text  # noqa: E402
from tokenizer import get_codec, spec_for, vocab_size  # noqa: E402

OPTIONS = dict(
    source=Option('', "a local .jsonl / .json / .parquet of records with 'prompt' and 'response' (or 'text')"),
    hub=Option('', "instead of source: a Hugging Face dataset name with those columns (its train split)"),
    tokenizer=Option('gpt2', "'gpt2', 'neox', or a path to a tokenizer.json (it needs an <|endoftext|> token)"),
    out_dir=Option('', "where the files go; '' = data/instruct"),
    val_every=Option(20, "every val_every-th record goes to val", '>= 2'),
    max_docs=Option(0, "0 = all; a small number for a quick look", '>= 0'),
)


def record_tokens(record, encode, eot, i):
    """(tokens, mask) of one record: prompt (mask 0) + response + eot (mask 1), or text + eot (all 1)."""
    if isinstance(record.get('prompt'), str) and isinstance(record.get('response'), str):
        prompt, response = encode(record['prompt']), encode(record['response']) + [eot]
        return prompt + response, [0] * len(prompt) + [1] * len(response)
    if isinstance(record.get('text'), str):
        ids = encode(record['text']) + [eot]
        return ids, [1] * len(ids)
    raise ConfigError(f"record {i} has neither 'prompt' and 'response' strings nor a 'text' string (it has "
                      f"{sorted(record)[:6]}); give each record those fields")


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    if bool(cfg.source) == bool(cfg.hub):
        raise ConfigError("give exactly one of --source=<local file> and --hub=<dataset name>")
    try:
        spec = spec_for(cfg.tokenizer)
        encode, _, eot = get_codec(spec)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if eot is None:
        raise ConfigError(f"tokenizer {cfg.tokenizer} has no <|endoftext|> token to end each record with")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(__file__).resolve().parent
    records = documents(cfg.source, cfg.hub)
    if cfg.max_docs:
        records = records.take(cfg.max_docs)
    parts = {'train': ([], []), 'val': ([], [])}
    try:
        for i, record in enumerate(records):
            ids, mask = record_tokens(record, encode, eot, i)
            split = parts['val' if i % cfg.val_every == 0 else 'train']
            split[0].extend(ids)
            split[1].extend(mask)
    except ConfigError:
        raise
    except Exception as e:  # the datasets / pyarrow readers' errors for a malformed file
        raise ConfigError(f"could not read {cfg.source or cfg.hub} ({type(e).__name__}: {str(e)[:200]})") from e
    counts = {split: len(ids) for split, (ids, _) in parts.items()}
    if not all(sum(mask) for _, mask in parts.values()):
        raise ConfigError(f"{cfg.source or cfg.hub} gave train {counts['train']:,} and val {counts['val']:,} tokens "
                          f"with nothing to learn in one split (records 0, {cfg.val_every}, ... go to val); give more "
                          f"records or another --val_every")
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, (ids, mask) in parts.items():
        write_split(np.array(ids, dtype=np.int64), out_dir, split)
        with atomic_path(out_dir / f'{split}.mask.bin') as tmp:
            np.array(mask, dtype=np.uint8).tofile(tmp)
    meta = {**spec, 'vocab_size': vocab_size(spec), 'train_tokens': counts['train'], 'val_tokens': counts['val'],
            'source': cfg.source or cfg.hub, 'mask': True}
    write_text(out_dir / 'meta.json', json.dumps(meta, indent=1))
    learned = {split: sum(mask) for split, (_, mask) in parts.items()}
    print(f"{out_dir}: train {counts['train']:,} tokens ({learned['train']:,} learned), val {counts['val']:,} "
          f"({learned['val']:,} learned)")
    warn_small_splits(counts, f"; a smaller --val_every (now {cfg.val_every}) sends more records to val")


if __name__ == '__main__':
    run_script(main)
