# Seconds on any machine: checks that the whole path runs, not that the model learns much.
# python -m scripts.base_train configs/smoke.py
depth = 2
max_seq_len = 64
device_batch_size = 4
total_batch_size = 512
num_iterations = 10
eval_every = 5
eval_tokens = 2048
sample_every = 10
save_every = 5
