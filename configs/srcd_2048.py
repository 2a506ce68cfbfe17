# SRCD at the paper's length: N = 2048 tokens, its ratios (5% queries, 70% of them from a pool of
# 100, the rest novel: a floor of 1.5%), on a CPU. Batch 4 keeps the default's 8192 tokens a step.
#     python train.py configs/srcd_2048.py
dataset = "srcd"
srcd_len = 2048
window = 2048
batch_size = 4
max_iters = 1500
out_dir = "out/srcd_2048"
