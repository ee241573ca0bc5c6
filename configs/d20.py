# nanochat's speedrun scale: one node of 8 x 80 GB GPUs (H100/A100), about 560M parameters.
# torchrun --nproc_per_node=8 -m scripts.base_train -- configs/d20.py
depth = 20
max_seq_len = 2048
device_batch_size = 32
total_batch_size = 524288
target_param_data_ratio = 20
eval_every = 250
eval_tokens = 10485760
sample_every = 2000
save_every = 2000
