# LoRA: low-rank adapters on every matrix of the blocks of a trained model, the rest frozen; export.py merges them
# into plain weights (any format). The base here is the quick start's RWKV-4 as an official .pth:
# python export.py --out_dir=out-shakespeare-char --format=pth --dest=rwkv-shakespeare.pth
# python train.py config/finetune_lora.py
out_dir = 'out-finetune-lora'
init_from = 'rwkv-shakespeare.pth'
finetune = 'lora'
lora_r = 8
lora_alpha = 16.0
eval_interval = 100
eval_iters = 20
log_interval = 25
always_save_checkpoint = False

dataset = 'shakespeare_char'  # the task: any char dataset of the base model's vocabulary
gradient_accumulation_steps = 1
batch_size = 16
block_size = 128

learning_rate = 2e-3
max_iters = 500
lr_decay_iters = 500
min_lr = 2e-4
warmup_iters = 20
weight_decay = 0.0
device = 'auto'
compile = False
