# A small model that trains in minutes on a laptop CPU (2 cores): depth 4 (width 256), 256-token context.
# python -m scripts.base_train configs/cpu.py
depth = 4
max_seq_len = 256
device_batch_size = 16
total_batch_size = 8192
num_iterations = 600
eval_every = 100
eval_tokens = 131072
sample_every = 300
save_every = 200
embedding_lr = 0.2
unembedding_lr = 0.004
matrix_lr = 0.02
warmup_ratio = 0.0
warmdown_ratio = 0.4
