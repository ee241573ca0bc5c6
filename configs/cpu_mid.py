# Mid-training on a laptop CPU after configs/cpu.py: about 5 minutes on 2 cores.
# python -m scripts.mid_train configs/cpu_mid.py
device_batch_size = 16
target_examples_per_step = 32
num_iterations = 150
eval_every = 50
eval_examples = 200
save_every = 50
