# Evaluate the pretrained gpt2-medium (350M parameters) on OpenWebText, eval only (nanoGPT's table):
# python train.py config/eval_gpt2_medium.py
init_from = 'gpt2-medium'
dataset = 'openwebtext'
batch_size = 8
eval_iters = 500  # use more iterations to get a good estimate
eval_only = True
wandb_log = False
