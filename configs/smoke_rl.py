# RL for `speedrun.sh --smoke-test`: 2 steps of 2 prompts x 4 samples, 8 held-out problems.
num_iterations = 2
prompts_per_step = 2
num_samples = 4
max_new_tokens = 32
device_batch_size = 8
arithmetic_examples = 16
long_arithmetic_examples = 16
spelling_examples = 16
eval_every = -1
eval_tasks = "arithmetic"
eval_problems = 8
eval_samples = 2
eval_k = 2
