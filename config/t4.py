# One Colab T4 (16 GB, fp16 + GradScaler, 8-bit AdamW), at the defaults of the original HST Colab training scripts.
# python train.py config/t4.py --model=v6 --mode=chunk
data_dir = "data/fineweb-edu"
out_dir = "out-t4"
d_model = 768
n_layers = 16
n_heads = 12
max_seq_len = 512
batch_size = 1
gradient_accumulation_steps = 16
learning_rate = 2e-4
warmup_iters = 2000
max_iters = 100000
save_interval = 5000
eval_interval = 1000
eval_iters = 50
log_interval = 50
optimizer = "adamw8bit"
dtype = "auto"
