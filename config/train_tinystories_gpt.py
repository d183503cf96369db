# GPT-2 ~26M non-embedding (L8-D512, 8 heads) on TinyStories (Eldan & Li 2023), the dataset MicroRWKV trains on; one GPU, ~1.3B tokens
# (about three passes over its ~470M GPT-2 tokens); the GPT twin of train_tinystories_rwkv.py.
# python data/tinystories/prepare.py   (needs the Hugging Face hub once)
# python train.py config/train_tinystories_gpt.py
out_dir = 'out-tinystories-gpt'
wandb_log = False
wandb_project = 'tinystories'
wandb_run_name = 'gpt-l8-d512'

dataset = 'tinystories'
# 32 batch size * 512 block size * 4 gradaccum = 65,536 tokens per iteration
batch_size = 32
block_size = 512  # a story is ~200 tokens: 512 holds two or three
gradient_accumulation_steps = 4

model_type = 'gpt'
n_layer = 8
n_embd = 512
n_head = 8
bias = False

# 20k iterations * 65,536 tokens = ~1.3B tokens
max_iters = 20000
lr_decay_iters = 20000
learning_rate = 1e-3  # small models take a higher learning rate than GPT-2 124M's 6e-4
min_lr = 1e-4
warmup_iters = 1000
beta2 = 0.99  # the same as the RWKV twin: one difference at a time
weight_decay = 1e-1

eval_interval = 500
eval_iters = 100
log_interval = 50
compile = True
