# GRPO-style RL on a laptop CPU after DPO (or SFT): about 6 minutes on 2 cores.
# python -m scripts.chat_rl configs/cpu_rl.py
num_iterations = 30
prompts_per_step = 8
num_samples = 8
max_new_tokens = 48
device_batch_size = 16
eval_every = 15
eval_tasks = "arithmetic,long_arithmetic"
eval_problems = 50
eval_samples = 4
eval_k = 4
save_every = 10
