# A language model small enough for a laptop CPU: a few minutes on the pydoc corpus, one token per
# byte. Prepare the data first:  python data.py prepare --source=pydoc --encoding=bytes
#     python train.py configs/text_tiny.py                         # CRAM
#     python train.py configs/text_tiny.py --router_mode=always    # the dense hybrid
dataset = "tokens"           # the token-file dataset; the folder decides what text it is
data_dir = "data/pydoc"
data_len = 128
out_dir = "out/text_tiny"
n_layer = 2
n_embd = 64
n_head = 4
window = 128
batch_size = 16
max_iters = 1500
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
eval_interval = 250
eval_batches = 8
log_interval = 50
ckpt_interval = 250
