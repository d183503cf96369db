# Evaluate the pretrained gpt2-xl (1558M parameters) on OpenWebText, eval only (nanoGPT's table):
# python train.py config/eval_gpt2_xl.py
init_from = 'gpt2-xl'
dataset = 'openwebtext'
batch_size = 8
eval_iters = 500  # use more iterations to get a good estimate
eval_only = True
wandb_log = False
