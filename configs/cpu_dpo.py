# DPO on a laptop CPU after configs/cpu_sft.py: a few minutes on 2 cores.
# python -m scripts.chat_dpo configs/cpu_dpo.py
device_batch_size = 8
target_pairs_per_step = 32
num_iterations = 60
arithmetic_pairs = 1000
multiple_choice_pairs = 1000
eval_every = 20
eval_pairs = 200
save_every = 20
