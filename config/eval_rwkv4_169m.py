# Evaluate the pretrained RWKV-4-Pile-169M (L12, D768) on OpenWebText, eval only:
# python train.py config/eval_rwkv4_169m.py
# RWKV-4 Pile models read the GPT-NeoX-20B tokenizer, so both splits must be tokenized with it (the GPT-2
# tokenized data/openwebtext would make the loss meaningless; train.py refuses the mismatch).
init_from = 'RWKV/rwkv-4-169m-pile'
dataset = 'openwebtext_neox'
batch_size = 8
eval_iters = 500  # use more iterations to get a good estimate
eval_only = True
wandb_log = False
