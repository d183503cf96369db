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
from pathlib import Path

import torch

from checkpoint import load_latest_checkpoint, model_from_checkpoint
from configurator import ConfigError, Option, parse_config, run_script
from hardware import DEVICE, DTYPES, autocast_context, resolve_device, resolve_dtype
from interop import load_pretrained, load_state
from lora import merge_lora
from tokenizer import get_codec

OPTIONS = dict(
    init_from=Option('resume', "'resume' (the newest checkpoint in out_dir), gpt2*, RWKV/rwkv-4-*-pile, a Hugging "
                               "Face directory or an official RWKV .pth (version 4-7)"),
    out_dir=Option('out', "the directory with the checkpoints (init_from='resume')"),
    start=Option('\n', "the prompt, or FILE:path to read it from a file"),
    num_samples=Option(3, "samples to draw", '>= 1'),
    max_new_tokens=Option(500, "tokens generated per sample", '>= 1'),
    temperature=Option(0.8, "1.0 = the model's distribution, lower = more conservative, 0 = greedy", '>= 0'),
    top_k=Option(200, "sample only among the top_k most likely tokens; 0 = all", '>= 0'),
    top_p=Option(1.0, "nucleus sampling: only the most likely tokens that make up top_p of the probability; 1.0 = all",
                 '(0, 1]'),
    seed=Option(1337, "seeds the sampling", '>= 0'),
    device=Option('auto', "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...", DEVICE),
    dtype=Option('auto', "'auto' (bf16 / fp16 on GPUs, fp32 on the CPU), 'float32', 'bfloat16', 'float16'", DTYPES),
    mode=Option('auto', "'auto' (rnn for RWKV, parallel for GPT), 'rnn' or 'parallel'", ('auto', 'rnn', 'parallel')),
    stop_at_eot=Option(False, "stop a sample at <|endoftext|> (BPE tokenizers)"),
    init_state=Option('', "RWKV-5/6/7: start every sample from this learned initial state (export.py --format=state "
                          "of a train.py --finetune=state run); '' = the model's own"),
    quantize=Option('', "'' (as loaded), or quantize the weights for CPU inference: int8, q8_0, q5_1, q4_0, int4 "
                        "(quantize.py)", ('', 'int8', 'q8_0', 'q5_1', 'q4_0', 'int4')),
)


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    device = resolve_device(cfg.device)
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    dtype = resolve_dtype(cfg.dtype, device_type)
    ctx = autocast_context(device_type, dtype)

    if cfg.init_from == 'resume':
        ckpt = load_latest_checkpoint(cfg.out_dir, device)[0]
        model, model_type = merge_lora(model_from_checkpoint(ckpt)), ckpt['model_type']  # LoRA: folded in
        spec = ckpt.get('tokenizer', {'tokenizer': 'gpt2'})
    else:
        model, model_type, spec = load_pretrained(cfg.init_from)
    if cfg.init_state:
        try:
            load_state(model, cfg.init_state)
        except (OSError, ValueError) as e:
            raise ConfigError(str(e) if isinstance(e, ValueError) else f"cannot read {cfg.init_state}: {e}") from e
    mode = cfg.mode if cfg.mode != 'auto' else ('rnn' if model_type == 'rwkv' else 'parallel')
    if mode == 'rnn' and model_type != 'rwkv':
        raise ConfigError("mode='rnn' needs an RWKV model; this checkpoint is a GPT: use --mode=parallel")
    if cfg.quantize:
        if device != 'cpu':
            raise ConfigError(f"--quantize is CPU inference; use --device=cpu (got {device})")
        if getattr(model, 'quantized', None):
            raise ConfigError(f"{cfg.init_from} is quantized already ({model.quantized[0]}); drop --quantize")
        model.quantize_(cfg.quantize)
    elif getattr(model, 'quantized', None) and device != 'cpu':
        raise ConfigError(f"{cfg.init_from} is a quantized model, which runs on the CPU: use --device=cpu")
    model.eval().to(device)
    encode, decode, eot = get_codec(spec)

    start = cfg.start
    if start.startswith('FILE:'):
        path = Path(start[len('FILE:'):])
        if not path.is_file():
            raise ConfigError(f"prompt file {path} not found")
        try:
            start = path.read_text(encoding='utf-8')
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompt file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as "
                              f"UTF-8") from e
    try:
        ids = encode(start)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if not ids:
        raise ConfigError("the prompt is empty; give at least one token with --start")
    if max(ids) >= model.config.vocab_size:
        raise ConfigError(f"the prompt's token {max(ids)} is outside the model's {model.config.vocab_size}-token "
                          f"vocabulary: the tokenizer ({spec.get('tokenizer')}) is not the model's")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]  # (1, T)

    num_samples = cfg.num_samples
    if cfg.temperature == 0 and num_samples > 1:
        print(f"note: temperature=0 is greedy, so the {num_samples} samples would be the same text: drawing one",
              file=sys.stderr)
        num_samples = 1
    torch.manual_seed(cfg.seed)
    top_k = cfg.top_k or None
    kwargs = {'mode': mode} if model_type == 'rwkv' else {}
    with torch.no_grad(), ctx:
        for _ in range(num_samples):
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
            try:
                model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=top_k, top_p=cfg.top_p,
                               on_token=on_token, stop_token=eot if cfg.stop_at_eot else None, **kwargs)
            except ValueError as e:  # the model's logits are not finite
                print(flush=True)
                raise ConfigError(f"{cfg.init_from if cfg.init_from != 'resume' else cfg.out_dir}: {e}") from e
            print(decode(out)[len(shown):])
            print('---------------')


if __name__ == '__main__':
    run_script(main)
