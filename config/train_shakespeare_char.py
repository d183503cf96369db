# Character-level RWKV-4 on tiny shakespeare: the CPU quick start (4-6 minutes on 2 cores, best val loss ~1.48).
# python train.py config/train_shakespeare_char.py
out_dir = 'out-shakespeare-char'
eval_interval = 250  # small data: evaluate often to see the (little) overfitting
eval_iters = 20
log_interval = 25
always_save_checkpoint = False  # checkpoint at an eval only when val improves (the end of the run always saves)

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 16
block_size = 128  # characters of context

model_type = 'rwkv'
n_layer = 4
n_embd = 128

learning_rate = 2e-3  # small models take a high learning rate
max_iters = 2000
lr_decay_iters = 2000  # make equal to max_iters usually
min_lr = 2e-4  # learning_rate / 10
beta2 = 0.99  # a little higher than GPT-2's 0.95: few tokens per iteration
warmup_iters = 100
weight_decay = 0.1

device = 'auto'
compile = False  # compiling takes longer than this whole run on a CPU
