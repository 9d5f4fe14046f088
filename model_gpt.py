"""GPT: the control model every HST variant is measured against.

GPT-2 (Radford et al. 2019) as nanoGPT builds it: learned absolute positions, pre-LN blocks of causal
self-attention and a 4x GELU MLP, a final LayerNorm, and an unembedding tied to the token embedding.
Width and depth are the shared Config fields, so `--model=gpt` trains the same size as any variant. It has no
drafter of its own: speculative decoding proposes drafts by prompt lookup and verifies them like any variant.

Longer notes: docs/README.md
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

import core


@dataclass
class Config(core.Config):
    pass


class Model(core.LM):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(core.Block(config.d_model, config.n_heads, config.bias, config.dropout)
                                    for _ in range(config.n_layers))
        self.ln_f = core.LayerNorm(config.d_model, config.bias)
        self.lm_head = core.Unembedding(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(core.init_weights)
        core.scale_residual_projections(self, config.n_layers)

    def forward(self, idx, targets=None, cache=None, start_pos=0):
        B, T = idx.shape
        core.check_context(self.config, start_pos, T)
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, D)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i], start_pos)
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None if targets is None else core.lm_loss(logits, targets)
        return core.Output(logits=logits, loss=loss, hidden=x)


if __name__ == "__main__":
    import math
    torch.manual_seed(0)
    model = core.build_model("gpt", vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    print(f"gpt self-test: {model.num_params():,} parameters at d_model=64, n_layers=2")
    idx = torch.randint(0, 512, (2, 32))
    out = model(idx, targets=torch.randint(0, 512, (2, 32)))
    assert out.logits.shape == (2, 32, 512)
    print(f"loss at init {out.loss.item():.3f} (ln V = {math.log(512):.3f})")
    assert abs(out.loss.item() - math.log(512)) < 0.5
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = idx[:, :-1], idx[:, 1:]
    for step in range(60):
        loss = model(x, targets=y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"loss after 60 steps on one batch {loss.item():.3f}")
    assert loss.item() < 0.5, "the model failed to overfit one batch"
    model.eval()
    prompt = idx[:1, :8]
    cached = model.generate(prompt, 16, temperature=0)
    uncached = model.generate(prompt, 16, temperature=0, use_cache=False)
    speculative = model.generate(prompt, 16, temperature=0, speculative=True)
    assert torch.equal(cached, uncached) and torch.equal(cached, speculative)
    print("greedy cached == uncached == speculative: ok")
    # full-size parameter count at the shared defaults, for the table in the README
    print(f"default config: {core.build_model('gpt').num_params():,} parameters")
