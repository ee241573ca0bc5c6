# Two 24-26 GB GPUs (e.g. 2 x RTX 3090/4090): a d20 model with a smaller micro-batch and more accumulation.
# torchrun --nproc_per_node=2 -m scripts.base_train -- configs/dual_gpu/stable_26gb.py
depth = 20
max_seq_len = 2048
device_batch_size = 8
total_batch_size = 524288
target_param_data_ratio = 20
eval_every = 500
eval_tokens = 4194304
sample_every = 2000
save_every = 1000
