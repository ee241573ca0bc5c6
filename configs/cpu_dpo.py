# DPO on a laptop CPU after configs/cpu_sft.py: a few minutes on 2 cores (the DPO helper's measured
# settings: held-out preference accuracy 50% -> 73%, reward margin 0 -> 0.22 on chatsft d4).
# python -m scripts.chat_dpo configs/cpu_dpo.py
device_batch_size = 8
target_pairs_per_step = 16
num_iterations = 30
init_lr_frac = 0.2
arithmetic_pairs = 1000
multiple_choice_pairs = 1000
eval_every = 10
eval_pairs = 100
save_every = 10
