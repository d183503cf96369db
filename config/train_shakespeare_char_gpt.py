# The GPT twin of train_shakespeare_char.py: same data, context, batch, width, depth and iterations, for a
# head-to-head on the CPU.
# python train.py config/train_shakespeare_char_gpt.py
out_dir = 'out-shakespeare-char-gpt'
eval_interval = 250
eval_iters = 20
log_interval = 25
always_save_checkpoint = False

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 16
block_size = 128

model_type = 'gpt'
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # too few iterations to overfit

learning_rate = 2e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100
weight_decay = 0.1

device = 'auto'
compile = False
