# GPT-2 small's size on OpenWebText (nanoGPT's train_gpt2.py: about 0.5M tokens per step, 12 x 1024
# x 40 micro-batches), read as the `tokens` dataset. Prepare first:
#     pip install datasets==5.2.0; python data.py prepare --source=openwebtext
#     torchrun --standalone --nproc_per_node=8 train.py configs/openwebtext_gpt2_small.py
#     python train.py configs/openwebtext_gpt2_small.py --gradient_accumulation_steps=40   # one GPU
# --router_mode=always gives the dense hybrid; --wm_kind=none --n_positions=1024
# --router_mode=always a plain causal transformer of the same size (the GPT-2 baseline).
dataset = "tokens"
data_dir = "data/openwebtext"
data_len = 1024
out_dir = "out/openwebtext_gpt2_small"
n_layer = 12
n_embd = 768
n_head = 12
window = 1024
dropout = 0.0
batch_size = 12
gradient_accumulation_steps = 40
max_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 1000
eval_batches = 20
log_interval = 10
ckpt_interval = 1000
dtype = "bfloat16"
compile = True
