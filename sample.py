"""
Sample from a model trained with train.py (GPT or RWKV, read from the checkpoint).

$ python sample.py --out_dir=out-shakespeare-char
$ python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --mode=parallel --temperature=0
$ python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt
$ python sample.py --init_from=RWKV/rwkv-4-169m-pile --start="The Eiffel tower is" --stop_at_eot=True
$ python sample.py --init_from=gpt2 --start="Hello, I'm a language model,"

mode: 'rnn' (RWKV only: the prompt in parallel mode carrying state, then one RNN step per token),
'parallel' (RWKV: the whole sequence again for every token; GPT: the prompt at once, then one step per token with
its KV cache), 'auto' (rnn for RWKV, parallel for GPT).
"""
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from tokenizer import get_codec
from train import (ConfigError, load_latest_checkpoint, load_pretrained, model_from_checkpoint, parse_config,
                   resolve_device, resolve_dtype)

DEFAULTS = dict(
    init_from='resume',  # 'resume' (out_dir/ckpt.pt), gpt2*, RWKV/rwkv-4-*-pile, a Hugging Face directory, a .pth
    out_dir='out',  # the directory with ckpt.pt
    start='\n',  # the prompt, or FILE:path to read it from a file
    num_samples=3,
    max_new_tokens=500,
    temperature=0.8,  # 1.0 = the model's distribution, lower = more conservative, 0 = greedy
    top_k=200,  # sample only among the top_k most likely tokens; 0 = all
    top_p=1.0,  # nucleus sampling: only the most likely tokens that make up top_p of the probability; 1.0 = all
    seed=1337,
    device='auto',
    dtype='auto',
    mode='auto',  # 'auto' | 'rnn' | 'parallel'
    stop_at_eot=False,  # stop a sample at <|endoftext|> (BPE tokenizers)
)


def main(argv):
    c = parse_config(DEFAULTS, argv)
    if c['max_new_tokens'] <= 0:
        raise ConfigError(f"max_new_tokens must be positive, got {c['max_new_tokens']}")
    if c['num_samples'] <= 0:
        raise ConfigError(f"num_samples must be positive, got {c['num_samples']}")
    if c['temperature'] < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {c['temperature']}")
    if not 0 < c['top_p'] <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {c['top_p']}")
    if c['top_k'] < 0:
        raise ConfigError(f"top_k must be >= 0 (0 = no limit), got {c['top_k']}")
    if c['mode'] not in ('auto', 'rnn', 'parallel'):
        raise ConfigError(f"mode must be 'auto', 'rnn' or 'parallel', got '{c['mode']}'")
    device = resolve_device(c['device'])
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    dtype = resolve_dtype(c['dtype'], device_type)
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

    if c['init_from'] == 'resume':
        ckpt = load_latest_checkpoint(c['out_dir'], device)[0]
        model, model_type = model_from_checkpoint(ckpt), ckpt['model_type']
        spec = ckpt.get('tokenizer', {'tokenizer': 'gpt2'})
    else:
        model, model_type, spec = load_pretrained(c['init_from'])
    mode = c['mode'] if c['mode'] != 'auto' else ('rnn' if model_type == 'rwkv' else 'parallel')
    if mode == 'rnn' and model_type != 'rwkv':
        raise ConfigError("mode='rnn' needs an RWKV model; this checkpoint is a GPT: use --mode=parallel")
    model.eval().to(device)
    encode, decode, eot = get_codec(spec)

    start = c['start']
    if start.startswith('FILE:'):
        path = Path(start[len('FILE:'):])
        if not path.is_file():
            raise ConfigError(f"prompt file {path} not found")
        start = path.read_text(encoding='utf-8')
    try:
        ids = encode(start)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if not ids:
        raise ConfigError("the prompt is empty; give at least one token with --start")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]  # (1, T)

    torch.manual_seed(c['seed'])
    top_k = c['top_k'] or None
    kwargs = {'mode': mode} if model_type == 'rwkv' else {}
    with torch.no_grad(), ctx:
        for _ in range(c['num_samples']):
            # stream: print each new piece of text as its token arrives (decoding the whole continuation each
            # time, so multi-token characters come out whole)
            out, shown = list(ids), decode(ids)
            print(shown, end='', flush=True)

            def on_token(token):
                nonlocal shown
                out.append(token)
                text = decode(out)
                if not text.endswith('\ufffd'):  # wait for the rest of a split UTF-8 character
                    print(text[len(shown):], end='', flush=True)
                    shown = text
            model.generate(x, c['max_new_tokens'], temperature=c['temperature'], top_k=top_k, top_p=c['top_p'],
                           on_token=on_token, stop_token=eot if c['stop_at_eot'] else None, **kwargs)
            print(decode(out)[len(shown):])
            print('---------------')


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"sample.py: error: {e}")
