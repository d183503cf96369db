# RWKV-4 ~130M (L12-D768, the size of RWKV-4-Pile-169M minus its larger vocabulary) on OpenWebText, one node of
# 8 GPUs, ~300B tokens like GPT-2 124M:
# torchrun --standalone --nproc_per_node=8 train.py config/train_rwkv.py
wandb_log = False
wandb_project = 'owt'
wandb_run_name = 'rwkv-130m'

dataset = 'openwebtext'
# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520 tokens per iteration
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

model_type = 'rwkv'
n_layer = 12
n_embd = 768
wkv_backend = 'auto'  # the CUDA kernel when it builds

# 600k iterations * 491,520 tokens = ~300B tokens
max_iters = 600000
lr_decay_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
beta2 = 0.99  # RWKV-LM trains with betas (0.9, 0.99)
weight_decay = 1e-1

eval_interval = 1000
eval_iters = 200
log_interval = 10
compile = True
