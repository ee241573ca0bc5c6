# DPO for `speedrun.sh --smoke-test`: 8 training pairs, a few steps, seconds on a CPU.
device_batch_size = 4
target_pairs_per_step = 4
num_iterations = 2
arithmetic_pairs = 8
multiple_choice_pairs = 0
eval_every = 2
eval_pairs = 8
