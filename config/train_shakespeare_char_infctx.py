# Character-level RWKV-4 on tiny shakespeare trained on samples of 1024 characters, 8x what it sees at once: each sample
# runs in 8 segments of 128 that carry the state, with the exact full-length gradient (bptt='full') in the memory of
# one segment. The eval prints the val loss carrying the state over 1024 characters and, beside it, the same tokens
# with the state reset every 128: the difference is what the longer context is worth.
# python train.py config/train_shakespeare_char_infctx.py
out_dir = 'out-shakespeare-char-infctx'
eval_interval = 250
eval_iters = 20
log_interval = 25
always_save_checkpoint = False  # checkpoint at an eval only when val improves (the end of the run always saves)

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 2  # 2 x 1024 characters: the quick start's 2,048 tokens per iteration
block_size = 128  # the segment: what the model sees at once
ctx_len = 1024  # the sample: 8 segments
bptt = 'full'

model_type = 'rwkv'
n_layer = 4
n_embd = 128

learning_rate = 2e-3  # the quick start's schedule
max_iters = 2000
lr_decay_iters = 2000
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100
weight_decay = 0.1

device = 'auto'
compile = False
