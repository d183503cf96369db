# State tuning (RWKV-PEFT's): learn only each layer's initial WKV state of a trained RWKV-5/6/7, every weight frozen;
# the result is a small file (export.py --format=state) that runs the base .pth (sample.py --init_state=...).
# The base here is the quick start's RWKV-7:
# python train.py config/train_shakespeare_char.py --rwkv_version=7 --head_size=32 --out_dir=out-char-v7
# python export.py --out_dir=out-char-v7 --format=pth --dest=rwkv7-shakespeare.pth
# python train.py config/finetune_state.py
out_dir = 'out-finetune-state'
init_from = 'rwkv7-shakespeare.pth'
finetune = 'state'
eval_interval = 100
eval_iters = 20
log_interval = 25
always_save_checkpoint = False

dataset = 'shakespeare_char'  # the task: any char dataset of the base model's vocabulary
gradient_accumulation_steps = 1
batch_size = 16
block_size = 128

learning_rate = 5e-2  # a few thousand parameters, each a state entry: a high rate
max_iters = 500
lr_decay_iters = 500
min_lr = 5e-3
warmup_iters = 0
weight_decay = 0.0
device = 'auto'
compile = False
