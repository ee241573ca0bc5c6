# GRPO-style RL on a laptop CPU after DPO (or SFT): about 5 minutes on 2 cores.
# Arithmetic + harder LongArithmetic (3-5 digit operands) prompts, 8 samples each.
# python -m scripts.chat_rl configs/cpu_rl.py
num_iterations = 40
prompts_per_step = 8
num_samples = 8
max_new_tokens = 48
device_batch_size = 16
init_lr_frac = 0.2
spelling_examples = 0
eval_every = 20
eval_tasks = "arithmetic,long_arithmetic"
eval_problems = 50
eval_samples = 4
eval_k = 4
save_every = 10
