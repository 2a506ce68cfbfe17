# A language model where attention pays on a CPU: CPython's standard library source, one token per
# byte, context 512; 2 layers, 64 wide, 4000 steps of 16 x 512 bytes (~53 minutes on one thread
# with attention on every token). Prepare the data first (offline, 12 MB):
#     python data.py prepare --source=stdlib --encoding=bytes
#     python train.py configs/text_stdlib.py --router_mode=always    # the dense hybrid
#     python train.py configs/text_stdlib.py --router_mode=never     # recurrent only
dataset = "tokens"
data_dir = "data/stdlib"
data_len = 512
out_dir = "out/text_stdlib"
n_layer = 2
n_embd = 64
batch_size = 16
max_iters = 4000
eval_interval = 250
eval_batches = 16
log_interval = 100
ckpt_interval = 250
