# A language model small enough for a laptop CPU: a few minutes on the pydoc corpus, one token per
# byte. Prepare the data first:  python data.py prepare --source=pydoc --encoding=bytes
#     python train.py configs/text_tiny.py                         # CRAM
#     python train.py configs/text_tiny.py --router_mode=always    # the dense hybrid
dataset = "openwebtext"      # the token-file dataset; the folder decides what text it is
data_dir = "data/pydoc"
data_len = 256
out_dir = "out/text_tiny"
n_layer = 4
n_embd = 128
n_head = 4
window = 256
batch_size = 16
max_iters = 2000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
eval_interval = 200
eval_batches = 8
log_interval = 50
ckpt_interval = 500
