# A small model that trains in about 10 minutes on a 2-core laptop CPU: depth 4 (width 256),
# 256-token context, 8192 tokens per step. Pair it with a small vocab (tok_train --vocab_size=8192).
# python -m scripts.base_train configs/cpu.py
depth = 4
max_seq_len = 256
device_batch_size = 16
total_batch_size = 8192
num_iterations = 250
eval_every = 50
eval_tokens = 131072
sample_every = 125
save_every = 50
warmup_ratio = 0.0
warmdown_ratio = 0.4
