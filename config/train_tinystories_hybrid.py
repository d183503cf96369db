# An RWKV-4 + attention hybrid (L8-D512; blocks 3 and 7 are windowed grouped-query attention) on TinyStories, the
# dataset MicroRWKV trains on; one GPU, ~1.3B tokens. The hybrid twin of train_tinystories_rwkv.py: only the model
# lines differ.
# python data/tinystories/prepare.py   (needs the Hugging Face hub once)
# python train.py config/train_tinystories_hybrid.py
out_dir = 'out-tinystories-hybrid'
wandb_log = False
wandb_project = 'tinystories'
wandb_run_name = 'hybrid-l8-d512'

dataset = 'tinystories'
# 32 batch size * 512 block size * 4 gradaccum = 65,536 tokens per iteration
batch_size = 32
block_size = 512  # a story is ~200 tokens: 512 holds two or three
gradient_accumulation_steps = 4

model_type = 'rwkv'
n_layer = 8
n_embd = 512
attn_layers = [3, 7]  # one block in four (Jamba: one in eight); the RNN blocks before them carry word order
n_head = 8
attn_window = 256  # constant memory in generation: a 256-entry ring buffer per attention layer
attn_kv_heads = 2  # 4 query heads per K/V head: the cache is a quarter of multi-head attention's

# 20k iterations * 65,536 tokens = ~1.3B tokens
max_iters = 20000
lr_decay_iters = 20000
learning_rate = 1e-3  # small models take a higher learning rate than GPT-2 124M's 6e-4
min_lr = 1e-4
warmup_iters = 1000
beta2 = 0.99  # RWKV-LM trains with betas (0.9, 0.99)
weight_decay = 1e-1

eval_interval = 500
eval_iters = 100
log_interval = 50
compile = True
