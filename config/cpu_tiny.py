# A small model that trains in minutes on 2 CPU cores (150 steps of 1,024 tokens), on the offline built-in corpus:
# python prepare_data.py --corpus=stdlib --max_tokens=4000000
# python train.py config/cpu_tiny.py
# any model the same way (--model=v6 --mode=chunk), any text: --data_dir=data/<name> after prepare_data.py --input
data_dir = "data/stdlib"
out_dir = "out"
d_model = 128
n_layers = 4
n_heads = 4
max_seq_len = 128
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 2e-3
warmup_iters = 15
max_iters = 150
eval_interval = 50
eval_iters = 5
log_interval = 10
save_interval = 150
optimizer = "adamw"
device = "cpu"
