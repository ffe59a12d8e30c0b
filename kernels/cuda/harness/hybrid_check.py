#!/usr/bin/env python3
"""Check and benchmark the hybrid training kernels (kernels/cuda/hybrid.cu): forward AND backward
of the sparse gated FFN  h = relu(x Wg^T) * (x Wu^T), y = h WdT, l1_sum = sum |h|.

Correctness: y, l1_sum, dx, dWg, dWu, dWdT against fp32 torch autograd (bf16 inputs upcast), on
fresh inputs per case (shared/design/anchors.md §3 generator, imported from twell_check.py),
every output poisoned (NaN) first; max|err| / max|ref| per tensor and per row.
Timing: dense torch bf16 autograd fwd+bwd (cuBLAS) vs hybrid fwd+bwd, CUDA-event medians, side by
side in one process, 4 layers rotated. Memory: saved-for-backward bytes and peak-allocation deltas.

    python3 hybrid_check.py --cubins DIR [--quick] [--skip-bench]
"""
import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import twell_check as tc  # noqa: E402  (ctypes loader, launch helpers, generator, TwELL gate)

P, I, launch = tc.P, tc.I, tc.launch
ST_GATE_SPILL, ST_NNZ_OVER = 1, 2
BLK, SEG = 32, 16


class Hybrid:
    """Workspace + launch sequence of the hybrid FFN forward/backward for fixed N, D, H."""

    def __init__(self, tmod, hmod, N, D, H, cap=None, tw=32, spill_cap=None, wgmma=None):
        self.tmod, self.hmod, self.N, self.D, self.H, self.twd = tmod, hmod, N, D, H, tw
        self.ntiles = (H + 255) // 256
        spill_cap = spill_cap if spill_cap is not None else max(64, N * self.ntiles // 64)
        self.gate = tc.Twell(tmod, N, D, H, tw=tw, chunk=1 << 20, spill_cap=spill_cap, slot_cap=1, wgmma=wgmma)
        # the Twell object's decode/plan buffers are unused here; drop the big ones
        self.gate.part = None
        dev = "cuda"
        self.nblk = (N + BLK - 1) // BLK
        self.nseg = (self.nblk + SEG - 1) // SEG
        self.row_cnt = torch.empty(N, dtype=torch.int32, device=dev)
        self.row_ptr = torch.empty(N + 1, dtype=torch.int32, device=dev)
        self.blkcnt = torch.empty(self.nblk * H, dtype=torch.uint8, device=dev)
        self.boff = torch.empty(self.nblk * H, dtype=torch.int16, device=dev)
        self.segoff = torch.empty(self.nseg * H, dtype=torch.int32, device=dev)
        self.unit_cnt = torch.empty(H, dtype=torch.int32, device=dev)
        self.unit_ptr = torch.empty(H + 1, dtype=torch.int32, device=dev)
        self.uorder = torch.empty(H, dtype=torch.int32, device=dev)
        self.hctrl = torch.zeros(16, dtype=torch.int32, device=dev)
        self.l1_tok = torch.empty(N, dtype=torch.float32, device=dev)
        self.l1 = torch.empty(1, dtype=torch.float32, device=dev)
        self.rec = None
        self.alloc(cap if cap is not None else max(1024, N * 64))
        self.grows = 0
        self.gate_grows = 0

    def alloc(self, cap):
        dev = "cuda"
        self.cap = int(cap)
        self.ecol = torch.empty(self.cap, dtype=torch.int32, device=dev)
        self.eg = torch.empty(self.cap, dtype=torch.int16, device=dev)
        self.eu = torch.empty(self.cap, dtype=torch.float32, device=dev)
        self.csc = torch.empty(self.cap, dtype=torch.int32, device=dev)
        self.rec = None

    def release_fwd_workspace(self):
        """Drop the forward-only scratch (TwELL tiles, spill, counting-sort tables): in a model
        one such workspace serves every layer; only the pool + pointers live until backward."""
        self.gate = None
        self.blkcnt = self.boff = self.segoff = self.row_cnt = self.unit_cnt = self.l1_tok = None

    def saved_bytes(self):
        """Bytes kept from forward to backward: the pool (used part) + pointers + order."""
        nnz = int(self.hctrl[1].item())
        return nnz * (4 + 2 + 4 + 4) + 4 * (self.N + 1 + self.H + 1 + self.H)

    def forward(self, x, Wg, Wu, WdT, y, skip_gate=False, ev=None):
        N, D, H, nt, tw = self.N, self.D, self.H, self.ntiles, self.twd
        g, m = self.gate, self.hmod
        if not skip_gate:
            g.gate(x, Wg)
        smem = H * 4
        launch(m.fn("hyb_count", smem), (self.nblk,), 256, smem,
               [P(g.twell), P(g.spill), I(N), I(H), I(nt), I(tw), P(self.row_cnt), P(self.blkcnt)])
        launch(m.fn("hyb_segscan"), ((H + 255) // 256, self.nseg), 256, 0,
               [P(self.blkcnt), P(self.boff), P(self.segoff), I(self.nblk), I(H)])
        launch(m.fn("hyb_unitscan"), ((H + 255) // 256,), 256, 0,
               [P(self.segoff), P(self.unit_cnt), I(self.nseg), I(H)])
        launch(m.fn("hyb_scan"), (1,), 1024, 0,
               [P(self.row_cnt), P(self.row_ptr), P(self.unit_cnt), P(self.unit_ptr), P(self.uorder), I(N), I(H),
                I(self.cap), P(g.ctrl), P(self.hctrl)])
        launch(m.fn("hyb_fill", smem), (self.nblk,), 256, smem,
               [P(g.twell), P(g.spill), I(N), I(H), I(nt), I(tw), P(self.row_ptr), P(self.unit_ptr), P(self.boff),
                P(self.segoff), P(self.hctrl), P(self.ecol), P(self.eg), P(self.csc)])
        if ev is not None:
            ev.record()
        launch(m.fn("hyb_fwd" if D <= 2048 else "hyb_fwd_wide"), (N,), 256, D * 2,
               [P(x), P(Wu), P(WdT), P(self.row_ptr), P(self.ecol), P(self.eg), P(self.eu), P(y), P(self.l1_tok),
                P(self.hctrl), I(D)])
        launch(m.fn("hyb_l1"), (1,), 1024, 0, [P(self.l1_tok), I(N), P(self.l1), P(self.hctrl)])
        return self.l1

    def status(self):
        torch.cuda.synchronize()
        st, nnz, gsp = self.hctrl[:3].tolist()
        return st, nnz, gsp

    def forward_exact(self, x, Wg, Wu, WdT, y):
        """Forward, then check the status word; grow the pool / the gate's spill buffer and rerun
        until exact (one host sync). Returns (l1, nnz)."""
        for _ in range(4):
            l1 = self.forward(x, Wg, Wu, WdT, y)
            st, nnz, gsp = self.status()
            if st == 0:
                return l1, nnz
            if st & ST_GATE_SPILL:
                self.gate_grows += 1
                cap = self.N * self.ntiles
                self.gate.spill_cap = cap
                self.gate.spill = torch.empty(cap * 256, dtype=torch.int32, device="cuda")
            if st & ST_NNZ_OVER:
                self.grows += 1
                self.alloc(max(nnz, 1))
        raise RuntimeError("hybrid forward did not converge")

    def backward(self, x, dy, dl1, Wg, Wu, WdT, dx, dWg, dWu, dWdT):
        N, D, H, m = self.N, self.D, self.H, self.hmod
        if self.rec is None:
            self.rec = torch.empty(self.cap * 4, dtype=torch.float32, device="cuda")
        launch(m.fn("hyb_bwd_tok" if D <= 2048 else "hyb_bwd_tok_wide"), (N,), 256, D * 2,
               [P(dy), P(dl1), P(Wg), P(Wu), P(WdT), P(self.row_ptr), P(self.ecol), P(self.eg), P(self.eu),
                P(self.rec), P(dx), P(self.hctrl), I(D)])
        nsl = (D + 255) // 256
        launch(m.fn("hyb_bwd_w"), (nsl * H,), 128, 0,
               [P(x), P(dy), P(self.unit_ptr), P(self.uorder), P(self.csc), P(self.rec), P(dWg), P(dWu), P(dWdT),
                P(self.hctrl), I(D), I(H)])


# ----------------------------------------------------------------------------------------------
def reference(x, Wg, Wu, WdT, dy, dl1, kmask):
    """fp32 autograd on the bf16 inputs. h = bf16(relu(g)) * u: the gate value is stored as bf16 by
    both dense bf16 torch and the kernels (straight-through: d/dg is exact). The ReLU mask is fp32
    g > 0, except where the kernel's fp32 accumulation landed on the other side of 0 (|g| tiny):
    there the kernel's decision is taken, and those flips are counted and bounded."""
    xf = x.float().requires_grad_()
    wg = Wg.float().requires_grad_()
    wu = Wu.float().requires_grad_()
    wd = WdT.float().requires_grad_()
    g = xf @ wg.T
    gd = g.detach()
    flips = kmask != (gd > 0)
    nflip = int(flips.sum().item())
    gflip = gd[flips].abs().max().item() if nflip else 0.0
    gr = g * kmask
    gb = gr + (gr.detach().bfloat16().float() - gr.detach())
    h = gb * (xf @ wu.T)
    y = h @ wd
    l1 = h.abs().sum()
    dx, dwg, dwu, dwd = torch.autograd.grad([y, l1], [xf, wg, wu, wd], [dy.float(), dl1.float().view(())])
    nnz = int((gd > 0).sum().item())
    return y.detach(), l1.item(), dx, dwg, dwu, dwd, nnz, nflip, gflip / gd.abs().max().item()


def relerr(out, ref, tol, name):
    out = out.float()
    finite = bool(torch.isfinite(out).all().item())
    err = (out - ref).abs()
    m = ref.abs().max().item()
    rel = err.max().item() / max(m, 1e-30)
    rowmax = ref.abs().max(1).values.clamp_min(1e-3 * m + 1e-30)
    rowrel = err.max(1).values / rowmax
    bad = int((rowrel > 2 * tol).sum().item())
    ok = finite and rel <= tol and bad == 0
    return ok, f"{name} {rel:.1e}/{rowrel.max().item():.1e}{'' if bad == 0 else f' BAD ROWS {bad}'}" \
               f"{'' if finite else ' NONFINITE'}"


def check(tmod, hmod, name, N, D, H, s, heavy=True, seed=1, force_full=0, hot_units=0, cap=None, wgmma=None,
          tol=1e-2, l1tol=1e-3):
    x, Wg, Wu, WdT = tc.make_layer(N, D, H, s, seed, heavy)
    if force_full:  # the first tokens fire on every unit (rows far over any fixed ELL width)
        x[:force_full, D - 2] = 60.0
    if hot_units:  # units active in (nearly) every token: heavy transposed rows
        Wg[:hot_units, D - 3] = 40.0
    gen = torch.Generator(device="cuda").manual_seed(seed + 7)
    dy = torch.randn(N, D, generator=gen, device="cuda").to(torch.bfloat16)
    dl1 = torch.full((1,), 0.37, dtype=torch.float32, device="cuda")
    hy = Hybrid(tmod, hmod, N, D, H, cap=cap, wgmma=wgmma)
    nan = float("nan")
    y = torch.full((N, D), nan, dtype=torch.bfloat16, device="cuda")
    dx = torch.full((N, D), nan, dtype=torch.bfloat16, device="cuda")
    dW = [torch.full((H, D), nan, dtype=torch.bfloat16, device="cuda") for _ in range(3)]
    hy.eu.fill_(nan)
    hy.ecol.fill_(-1)
    hy.csc.fill_(-1)
    hy.l1.fill_(nan)
    l1, nnz = hy.forward_exact(x, Wg, Wu, WdT, y)
    hy.rec = torch.full((hy.cap * 4,), nan, dtype=torch.float32, device="cuda")
    hy.backward(x, dy, dl1, Wg, Wu, WdT, dx, *dW)
    torch.cuda.synchronize()
    l1v = l1.item()
    # second fwd+bwd on the same buffers, poisoned again: same bits (deterministic)
    y2 = torch.full_like(y, nan)
    dx2 = torch.full_like(dx, nan)
    dW2 = [torch.full_like(w, nan) for w in dW]
    hy.forward(x, Wg, Wu, WdT, y2)
    hy.backward(x, dy, dl1, Wg, Wu, WdT, dx2, *dW2)
    torch.cuda.synchronize()
    det = bool(torch.equal(y, y2) and torch.equal(dx, dx2) and all(torch.equal(a, b) for a, b in zip(dW, dW2))
               and hy.l1.item() == l1v)
    nnzk = int(hy.row_ptr[-1].item())
    rows = torch.repeat_interleave(torch.arange(N, device="cuda"), hy.row_ptr.diff().long())
    kmask = torch.zeros(N, H, dtype=torch.bool, device="cuda")
    kmask[rows, hy.ecol[:nnzk].long()] = True
    del rows
    ry, rl1, rdx, rdwg, rdwu, rdwd, rnnz, nflip, gflip = reference(x, Wg, Wu, WdT, dy, dl1, kmask)
    del kmask
    res = [relerr(y, ry, tol, "y"), relerr(dx, rdx, tol, "dx"), relerr(dW[0], rdwg, tol, "dWg"),
           relerr(dW[1], rdwu, tol, "dWu"), relerr(dW[2], rdwd, tol, "dWdT")]
    l1rel = abs(l1v - rl1) / max(abs(rl1), 1e-30)
    ok = all(r[0] for r in res) and l1rel <= l1tol and det and gflip < 1e-5
    cnt = hy.row_ptr.diff().float()
    ucnt = hy.unit_ptr.diff()
    print(f"  {name:34s} N={N:6d} D={D} H={H} nnz/tok {cnt.mean():6.1f} max {cnt.max():5.0f} unit max "
          f"{ucnt.max().item():6d} nnz {nnz} (fp32 ref {rnnz}; {nflip} flips at |g| <= {gflip:.0e} max|g|) grows {hy.grows}/{hy.gate_grows} gspill {hy.hctrl[2].item()}"
          f" | {' '.join(r[1] for r in res)} l1 {l1rel:.1e} det {'yes' if det else 'NO'} {'OK' if ok else 'FAIL'}",
          flush=True)
    del hy
    torch.cuda.empty_cache()
    return ok


# ----------------------------------------------------------------------------------------------
def median_ms(fn, reps, nl=4):
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i in range(3):
        fn(i % nl)
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(ev):
        a.record()
        fn(i % nl)
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def dense_fb(x, Wg, Wu, WdT, dy, dl1=None):
    g = x @ Wg.T
    h = torch.relu(g) * (x @ Wu.T)
    y = h @ WdT
    if dl1 is None:
        return torch.autograd.grad(y, [x, Wg, Wu, WdT], dy)
    return torch.autograd.grad([y, h.abs().sum()], [x, Wg, Wu, WdT], [dy, dl1.view(())])


def mem_dense(x, Wg, Wu, WdT, dy):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    g = x @ Wg.T
    h = torch.relu(g) * (x @ Wu.T)
    y = h @ WdT
    del g, h
    torch.cuda.synchronize()
    saved = torch.cuda.memory_allocated() - base - y.numel() * 2
    grads = torch.autograd.grad(y, [x, Wg, Wu, WdT], dy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del grads, y
    return saved, peak


def mem_hybrid(tmod, hmod, x, Wg, Wu, WdT, dy, dl1, cap, release=False):
    N, D = x.shape
    H = Wg.shape[0]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    hy = Hybrid(tmod, hmod, N, D, H, cap=cap)
    y = torch.empty(N, D, dtype=torch.bfloat16, device="cuda")
    hy.forward_exact(x, Wg, Wu, WdT, y)
    saved = hy.saved_bytes()
    ws = torch.cuda.memory_allocated() - base - y.numel() * 2
    if release:
        hy.release_fwd_workspace()
    dx = torch.empty_like(x)
    dW = [torch.empty_like(Wg) for _ in range(3)]
    hy.backward(x, dy, dl1, Wg, Wu, WdT, dx, *dW)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del hy, dx, dW, y
    return saved, ws, peak


def bench(tmod, hmod, N, s, reps, D=2048, H=5632, heavy=True, label=""):
    layers = []
    for i in range(4):
        x, Wg, Wu, WdT = tc.make_layer(N, D, H, s, 100 + i, heavy)
        gen = torch.Generator(device="cuda").manual_seed(200 + i)
        dy = torch.randn(N, D, generator=gen, device="cuda").to(torch.bfloat16)
        layers.append((x, Wg, Wu, WdT, dy))
    dl1 = torch.full((1,), 1e-4, dtype=torch.float32, device="cuda")
    dl1b = dl1.to(torch.bfloat16)
    # size the pool from one exact forward (a trainer sizes it from the previous step's count)
    hys = []
    nnzs = []
    for i in range(4):
        x, Wg, Wu, WdT, dy = layers[i]
        hy = Hybrid(tmod, hmod, N, D, H)
        y = torch.empty(N, D, dtype=torch.bfloat16, device="cuda")
        _, nnz = hy.forward_exact(x, Wg, Wu, WdT, y)
        hy.alloc(int(nnz * 1.1) + 1024)
        hy.forward_exact(x, Wg, Wu, WdT, y)
        hys.append(hy)
        nnzs.append(nnz)
    ys = [torch.empty(N, D, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    dxs = [torch.empty(N, D, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    dWs = [[torch.empty(H, D, dtype=torch.bfloat16, device="cuda") for _ in range(3)] for _ in range(4)]
    dlay = [tuple(t.detach().requires_grad_() for t in L[:4]) + (L[4],) for L in layers]

    def dense(i):
        x, Wg, Wu, WdT, dy = dlay[i]
        dense_fb(x, Wg, Wu, WdT, dy)

    def dense_l1(i):
        x, Wg, Wu, WdT, dy = dlay[i]
        dense_fb(x, Wg, Wu, WdT, dy, dl1b)

    def gate_only(i):
        x, Wg, Wu, WdT, dy = layers[i]
        torch.relu(x @ Wg.T)

    def hfwd(i):
        x, Wg, Wu, WdT, dy = layers[i]
        hys[i].forward(x, Wg, Wu, WdT, ys[i])

    def hbwd(i):
        x, Wg, Wu, WdT, dy = layers[i]
        hys[i].backward(x, dy, dl1, Wg, Wu, WdT, dxs[i], *dWs[i])

    def hfb(i):
        hfwd(i)
        hbwd(i)

    def hgate(i):
        x, Wg, Wu, WdT, dy = layers[i]
        hys[i].gate.gate(x, Wg)

    td = median_ms(dense, reps)
    tdl = median_ms(dense_l1, reps)
    tg = median_ms(gate_only, reps)
    th = median_ms(hfb, reps)
    thf = median_ms(hfwd, reps)
    thb = median_ms(hbwd, reps)
    thg = median_ms(hgate, reps)
    td2 = median_ms(dense, reps)  # spread of the baseline
    for i in range(4):
        assert hys[i].status()[0] == 0
    # per-stage breakdown of layer 0 (events between launches)
    x, Wg, Wu, WdT, dy = layers[0]
    hy = hys[0]
    stages = {}
    evs = []
    m = hy.hmod
    for _ in range(20):
        e = [torch.cuda.Event(enable_timing=True) for _ in range(6)]
        e[0].record()
        hy.gate.gate(x, Wg)
        e[1].record()
        hy.forward(x, Wg, Wu, WdT, ys[0], skip_gate=True, ev=e[2])
        e[3].record()
        launch(m.fn("hyb_bwd_tok"), (N,), 256, D * 2,
               [P(dy), P(dl1), P(Wg), P(Wu), P(WdT), P(hy.row_ptr), P(hy.ecol), P(hy.eg), P(hy.eu), P(hy.rec),
                P(dxs[0]), P(hy.hctrl), I(D)])
        e[4].record()
        launch(m.fn("hyb_bwd_w"), (((D + 255) // 256) * H,), 128, 0,
               [P(x), P(dy), P(hy.unit_ptr), P(hy.uorder), P(hy.csc), P(hy.rec), P(dWs[0][0]), P(dWs[0][1]),
                P(dWs[0][2]), P(hy.hctrl), I(D), I(H)])
        e[5].record()
        evs.append(e)
    torch.cuda.synchronize()
    for e in evs:
        for k, nm in enumerate(["gate", "csr", "fwd", "bwd_tok", "bwd_w"]):
            stages.setdefault(nm, []).append(e[k].elapsed_time(e[k + 1]))
    st = {k: statistics.median(v) for k, v in stages.items()}
    assert hy.status()[0] == 0
    nnz = nnzs[0]
    # memory (layer 0)
    x, Wg, Wu, WdT, dy = dlay[0]
    dsaved, dpeak = mem_dense(x, Wg, Wu, WdT, dy)
    x, Wg, Wu, WdT, dy = layers[0]
    hsaved, hws, hpeak = mem_hybrid(tmod, hmod, x, Wg, Wu, WdT, dy, dl1, int(nnz * 1.1) + 1024)
    _, _, hpeak2 = mem_hybrid(tmod, hmod, x, Wg, Wu, WdT, dy, dl1, int(nnz * 1.1) + 1024, release=True)
    MB = 2 ** 20
    cnt = hys[0].row_ptr.diff().float()
    row = (f"{N:6d} {label or f'{100*s:.1f}%':>11s} {cnt.mean():5.1f} {cnt.max():5.0f} {td:7.3f} {td2:7.3f} {tdl:7.3f} "
           f"{tg:6.3f} | {thf:6.3f} {thb:6.3f} {th:6.3f} | {td/th:5.2f}x {tdl/th:5.2f}x | gate {st['gate']:.3f} "
           f"csr {st['csr']:.3f} fwd {st['fwd']:.3f} bwd_tok {st['bwd_tok']:.3f} bwd_w {st['bwd_w']:.3f} | mem saved "
           f"{dsaved/MB:6.1f} -> {hsaved/MB:5.2f} MiB ({dsaved/max(hsaved,1):5.0f}x), peak {dpeak/MB:6.1f} -> "
           f"{hpeak/MB:6.1f} MiB ({dpeak/hpeak:4.1f}x; fwd workspace+saved {hws/MB:.1f}); fwd workspace released "
           f"before bwd: peak {hpeak2/MB:6.1f} MiB ({dpeak/hpeak2:4.1f}x)")
    print(row, flush=True)
    kb = nnz * 2 * D / 1e9  # GB per gathered D-row per active
    print(f"        row gathers: fwd {2*kb:.2f} GB at {2*kb/st['fwd']:.2f} TB/s, bwd_tok {3*kb:.2f} GB at "
          f"{3*kb/st['bwd_tok']:.2f} TB/s, bwd_w {2*kb:.2f} GB at {2*kb/st['bwd_w']:.2f} TB/s; gate "
          f"{2*N*D*H/st['gate']/1e9:.0f} TFLOP/s; floor at 7 TB/s + cuBLAS gate: {7*kb/7 + tg:.3f} ms", flush=True)
    del layers, hys, ys, dxs, dWs, dlay
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cubins", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    props = torch.cuda.get_device_properties(0)
    cc = torch.cuda.get_device_capability(0)
    print(f"GPU: {props.name}  SMs {props.multi_processor_count}  cc {cc}  torch {torch.__version__}", flush=True)
    arch = "sm_90a" if cc == (9, 0) else "sm_80"
    tmod = tc.Module(os.path.join(args.cubins, f"twell.{arch}.cubin"))
    hmod = tc.Module(os.path.join(args.cubins, f"hybrid.{arch}.cubin"))
    allok = True
    D, H = 2048, 5632
    if not args.skip_check:
        print("== correctness vs fp32 autograd (tolerance per tensor: max|err|/max|ref| <= 1e-2; every row <= 2e-2 "
              "of max(row max|ref|, 1e-3 max|ref|); l1_sum rel <= 1e-3; dl1 = 0.37; repeat run bit-identical)")
        print("   columns: tensor overall/worst-row error")
        cases = [
            ("99.5% heavy-tailed (realistic)", 16384, D, H, 0.995, {}),
            ("99% heavy-tailed", 4096, D, H, 0.99, {}),
            ("90% heavy-tailed (gate spills)", 2048, D, H, 0.90, {}),
            ("99.5% uniform actives", 4096, D, H, 0.995, dict(heavy=False)),
            ("rows of all H units, N=1000", 1000, D, H, 0.995, dict(force_full=9)),
            ("hot units (every token), N=3000", 3000, D, H, 0.995, dict(hot_units=5)),
            ("pool too small -> grows", 4096, D, H, 0.99, dict(cap=1000)),
            ("mma.sync gate (sm_80 path)", 4096, D, H, 0.995, dict(wgmma=False)),
            ("N=777 D=1024 H=5000", 777, 1024, 5000, 0.99, {}),
            ("N=1", 1, D, H, 0.995, {}),
            ("N=8", 8, D, H, 0.995, {}),
            ("N=100 D=4096 (wide)", 100, 4096, H, 0.99, {}),
        ]
        if args.quick:
            cases = cases[:2] + cases[9:10]
        for name, N, d, h, s, kw in cases:
            try:
                ok = check(tmod, hmod, name, N, d, h, s, **kw)
            except Exception as e:  # noqa: BLE001
                import traceback
                traceback.print_exc()
                print(f"  {name}: EXCEPTION {e}", flush=True)
                ok = False
            allok &= ok
        print("correctness:", "ALL OK" if allok else "FAILURES", flush=True)
    if args.skip_bench:
        return
    print("== timing (ms, medians of CUDA events; dense = torch bf16 autograd fwd+bwd, cuBLAS; 4 layers rotated)")
    hdr = (f"{'N':>6s} {'sparsity':>11s} {'nnz':>5s} {'max':>5s} {'dense':>7s} {'dense2':>7s} {'d+L1':>7s} "
           f"{'gate':>6s} | {'h fwd':>6s} {'h bwd':>6s} {'h f+b':>6s} | {'d/h':>6s} {'dL1/h':>6s} | stages, memory")
    print(hdr, flush=True)
    rows = [hdr]
    reps = 20 if args.quick else 40
    plan = [(16384, 0.995, {}), (16384, 0.99, {}), (16384, 0.995, dict(heavy=False, label="99.5% unif")),
            (4096, 0.995, {}), (4096, 0.99, {})]
    if args.quick:
        plan = plan[:1]
    for N, s, kw in plan:
        try:
            rows.append(bench(tmod, hmod, N, s, reps, **kw))
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            print(f"bench N={N} s={s}: EXCEPTION {e}", flush=True)
    print(f"== summary on {props.name}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
