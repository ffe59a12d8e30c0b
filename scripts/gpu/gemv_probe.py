"""Where PyTorch eager decode time goes at the 1.5b shape, batch 1 (diagnostic):
bf16 F.linear on one token over 28 distinct weight sets (as in a decode step) vs the same
weight reused, synchronised per call and in a stream of calls; and one decode step's FFN
block captured in a CUDA graph."""
import time
import torch
import torch.nn.functional as F

dev, dt = "cuda", torch.bfloat16
D, H, L = 2048, 5632, 28
ws = [(torch.randn(H, D, device=dev, dtype=dt) * 0.02, torch.randn(H, D, device=dev, dtype=dt) * 0.02,
       torch.randn(D, H, device=dev, dtype=dt) * 0.02) for _ in range(L)]
x = torch.randn(1, D, device=dev, dtype=dt)


def ffn(x, w):
    g, u, d = w
    return F.linear(F.relu(F.linear(x, g)) * F.linear(x, u), d)


def timeit(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3 / n


print("one FFN, same weights, synced each: %.3f ms" % timeit(lambda: (ffn(x, ws[0]), torch.cuda.synchronize())))
print("28 FFNs, distinct weights, one sync: %.3f ms" % timeit(lambda: [ffn(x, w) for w in ws]))
print("28 gate GEMVs only, distinct weights: %.3f ms" % timeit(lambda: [F.linear(x, w[0]) for w in ws]))
print("28 x 5 elementwise ops on [1, H]: %.3f ms" % timeit(lambda: [torch.relu(x) * x + x for _ in range(L * 2)]))
g = torch.cuda.CUDAGraph()
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(3):
        [ffn(x, w) for w in ws]
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(g):
    out = [ffn(x, w) for w in ws]
print("28 FFNs as one CUDA graph: %.3f ms" % timeit(lambda: g.replay()))
