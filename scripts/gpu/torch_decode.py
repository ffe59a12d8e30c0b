"""PyTorch eager baseline for `bench generate`: greedy KV-cache decoding of a Llama with a
dense ReLU-gated FFN at a config's shape (random bf16 weights), tokens/s at each batch.

    python3 scripts/gpu/torch_decode.py --layers 28 --batch 1,32
"""
import argparse
import time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=28)
p.add_argument("--d", type=int, default=2048)
p.add_argument("--h", type=int, default=5632)
p.add_argument("--heads", type=int, default=32)
p.add_argument("--vocab", type=int, default=49152)
p.add_argument("--batch", default="1,32")
p.add_argument("--prompt", type=int, default=128)
p.add_argument("--new", type=int, default=128)
p.add_argument("--ffn", default="dense", choices=["dense", "none", "graph"],
               help="none: skip the FFN (diagnostic); graph: dense, each decode step a CUDA graph")
a = p.parse_args()
dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
hd = a.d // a.heads


def w(*s):
    return (torch.randn(*s, device=dev) * 0.02).to(dt)


embed = w(a.vocab, a.d)
layers = [dict(qkv=w(3 * a.d, a.d), o=w(a.d, a.d), g=w(a.h, a.d), u=w(a.h, a.d), dn=w(a.d, a.h),
               n1=torch.ones(a.d, device=dev, dtype=dt), n2=torch.ones(a.d, device=dev, dtype=dt))
          for _ in range(a.layers)]
inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
ang = torch.outer(torch.arange(4096, device=dev).float(), inv)
cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)


def rope(x, pos):
    c, s = cos[pos:pos + x.shape[2]], sin[pos:pos + x.shape[2]]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * c + torch.cat([-x2, x1], -1) * s


def norm(x, wt):
    xf = x.float()
    return wt * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)


@torch.no_grad()
def step(tok, cache, pos):
    b, t = tok.shape
    x = embed[tok]
    for l, L in enumerate(layers):
        q, k, v = F.linear(norm(x, L["n1"]), L["qkv"]).view(b, t, 3, a.heads, hd).permute(2, 0, 3, 1, 4)
        q, k = rope(q, pos), rope(k, pos)
        kc, vc = cache[l]
        kc[:, :, pos:pos + t] = k
        vc[:, :, pos:pos + t] = v
        y = F.scaled_dot_product_attention(q, kc[:, :, :pos + t], vc[:, :, :pos + t], is_causal=(pos == 0))
        x = x + F.linear(y.transpose(1, 2).reshape(b, t, a.d), L["o"])
        if a.ffn != "none":
            hx = norm(x, L["n2"])
            x = x + F.linear(F.relu(F.linear(hx, L["g"])) * F.linear(hx, L["u"]), L["dn"])
    return (x[:, -1] @ embed.T).argmax(-1, keepdim=True)


print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, L {a.layers} D {a.d} H {a.h}")
for b in [int(s) for s in a.batch.split(",")]:
    cache = [(torch.zeros(b, a.heads, a.prompt + a.new, hd, device=dev, dtype=dt),
              torch.zeros(b, a.heads, a.prompt + a.new, hd, device=dev, dtype=dt)) for _ in layers]
    prompt = torch.randint(a.vocab, (b, a.prompt), device=dev)
    # Full-length untimed runs first (a process's first seconds of eager decoding are slow).
    for _ in range(2):
        nxt = step(prompt, cache, 0)
        for i in range(a.new - 1):
            nxt = step(nxt, cache, a.prompt + i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    nxt = step(prompt, cache, 0)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    if a.ffn == "graph":
        # One decode step at a fixed position captured once, replayed: launch cost removed.
        tok = nxt.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step(tok, cache, a.prompt)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = step(tok, cache, a.prompt)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for i in range(a.new - 1):
            g.replay()
    else:
        for i in range(a.new - 1):
            nxt = step(nxt, cache, a.prompt + i)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    ms = (t2 - t1) * 1e3 / (a.new - 1)
    print(f"batch {b:>3} torch {a.ffn}: prefill {(t1 - t0) * 1e3:.2f} ms | decode {ms:.3f} ms/step = {b * 1e3 / ms:.1f} tokens/s")
