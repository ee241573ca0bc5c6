# Supervised fine-tuning on a laptop CPU after configs/cpu_mid.py: a few minutes on 2 cores.
# python -m scripts.chat_sft configs/cpu_sft.py
device_batch_size = 16
target_examples_per_step = 32
num_iterations = 100
init_lr_frac = 0.2
eval_every = 50
eval_examples = 200
eval_problems = 20
save_every = 50
