# TinyStories-style training on a CPU from a local text file (one story per line), e.g. a slice of TinyStories saved
# earlier or stories of your own; the model of the shakespeare_char quick start, on BPE tokens:
# python data/tinystories/prepare.py --source=stories.txt --out_dir=data/tinystories_local
# python train.py config/train_tinystories_cpu.py
# Add --model_type=gpt --n_head=4, or --attn_layers=[2] --n_head=4 --attn_window=128, for the twins.
out_dir = 'out-tinystories-cpu'
eval_interval = 250
eval_iters = 20
log_interval = 25
always_save_checkpoint = False

data_dir = 'data/tinystories_local'
gradient_accumulation_steps = 1
batch_size = 16
block_size = 256  # BPE tokens: one or two short stories

model_type = 'rwkv'
n_layer = 4
n_embd = 128

learning_rate = 2e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100
weight_decay = 0.1

device = 'auto'
compile = False
