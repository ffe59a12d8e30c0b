#!/usr/bin/env python3
"""Check and benchmark the TwELL inference kernels (kernels/cuda/twell.cu) against torch.

Loads the cubins with ctypes on libcuda, launches on torch's current stream, checks every
output element against an fp32 torch reference (max|err| / max|ref|, globally and per row)
and times dense torch (cuBLAS) against the TwELL path with CUDA events, medians over repeats,
side by side in one process. Inputs follow shared/design/anchors.md §3 (heavy-tailed actives
per token, per-neuron bias, exact per-token shift, 4 layers rotated).

    python3 twell_check.py --cubins DIR [--quick]
"""
import argparse
import ctypes
import math
import os
import statistics
import sys
import time

import torch

TILE = 256
CTRL_INTS = 8

# ----------------------------------------------------------------------------------------------
# libcuda through ctypes
_cu = ctypes.CDLL("libcuda.so.1")


def _ck(res, what):
    if res != 0:
        name = ctypes.c_char_p()
        _cu.cuGetErrorName(res, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: {res} {name.value}")


class Module:
    def __init__(self, path):
        data = open(path, "rb").read()
        self._buf = ctypes.create_string_buffer(data, len(data))
        self.mod = ctypes.c_void_p()
        _ck(_cu.cuModuleLoadData(ctypes.byref(self.mod), self._buf), f"cuModuleLoadData({path})")
        self.funcs = {}

    def fn(self, name, smem=0):
        if name not in self.funcs:
            f = ctypes.c_void_p()
            _ck(_cu.cuModuleGetFunction(ctypes.byref(f), self.mod, name.encode()), f"get {name}")
            if smem > 48 * 1024:
                _ck(_cu.cuFuncSetAttribute(f, 8, ctypes.c_int(smem)), f"smem attr {name}")
            self.funcs[name] = f
        return self.funcs[name]


def P(v):
    return ctypes.c_uint64(v.data_ptr() if isinstance(v, torch.Tensor) else v)


def I(v):
    return ctypes.c_int32(int(v))


def launch(f, grid, block, smem, args):
    arr = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    g = tuple(grid) + (1,) * (3 - len(grid))
    _ck(_cu.cuLaunchKernel(f, g[0], g[1], g[2], block, 1, 1, smem, stream, arr, None), "cuLaunchKernel")


def memset0(t):
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    _ck(_cu.cuMemsetD32Async(ctypes.c_uint64(t.data_ptr()), ctypes.c_uint32(0), ctypes.c_size_t(t.numel()), stream),
        "memset")


GEMM_SMEM = 4 * (128 * 32 * 2 + 256 * 32 * 2)
WGMMA_SMEM = 4 * (128 * 64 * 2 + 256 * 64 * 2) + 1024


class Tmap(ctypes.Structure):
    _fields_ = [("w", ctypes.c_uint64 * 16)]


_tmaps = {}


def tmap(t, rows, cols, box_rows):
    """2-D bf16 tensor map, 128-B swizzle, box {64, box_rows}; OOB rows read as zero."""
    key = (t.data_ptr(), rows, cols, box_rows)
    if key not in _tmaps:
        raw = ctypes.create_string_buffer(128 + 64)
        addr = (ctypes.addressof(raw) + 63) & ~63
        dims = (ctypes.c_uint64 * 2)(cols, rows)
        strides = (ctypes.c_uint64 * 1)(cols * 2)
        box = (ctypes.c_uint32 * 2)(64, box_rows)
        es = (ctypes.c_uint32 * 2)(1, 1)
        _ck(_cu.cuTensorMapEncodeTiled(ctypes.c_void_p(addr), 9, 2, ctypes.c_void_p(t.data_ptr()), dims, strides, box, es,
                                       0, 3, 2, 0), "cuTensorMapEncodeTiled")
        m = Tmap.from_buffer_copy(ctypes.string_at(addr, 128))
        _tmaps[key] = (m, t)
    return _tmaps[key][0]


class Twell:
    """Buffers and launch sequence of one TwELL FFN forward for fixed N, D, H."""

    def __init__(self, mod, N, D, H, tw=32, chunk=128, spill_cap=None, slot_cap=8192, gated=True, sms=None,
                 wgmma=None, skinny_max=16):
        sms = sms or torch.cuda.get_device_properties(0).multi_processor_count
        self.wgmma = (torch.cuda.get_device_capability(0) == (9, 0)) if wgmma is None else wgmma
        self.mod, self.N, self.D, self.H, self.tw, self.chunk, self.gated = mod, N, D, H, tw, chunk, gated
        self.ntiles = (H + TILE - 1) // TILE
        dev = "cuda"
        self.twell = torch.empty(N * self.ntiles * tw, dtype=torch.int32, device=dev)
        self.spill_cap = spill_cap if spill_cap is not None else N * self.ntiles  # worst case: always exact
        self.spill = torch.empty(max(1, self.spill_cap) * TILE, dtype=torch.int32, device=dev)
        self.ctrl = torch.zeros(CTRL_INTS, dtype=torch.int32, device=dev)
        self.tokinfo = torch.empty(N * 4, dtype=torch.int32, device=dev)
        self.slot_cap = slot_cap
        self.items = torch.empty(slot_cap * 4, dtype=torch.int32, device=dev)
        self.part = torch.empty(slot_cap * D, dtype=torch.float32, device=dev)
        self.arrive = torch.zeros(slot_cap, dtype=torch.int32, device=dev)
        self.skinny = N <= skinny_max  # decode: skinny gate + pack; above: the tiled GEMM
        if self.skinny:
            self.G = torch.empty(N, self.ntiles * TILE, dtype=torch.bfloat16, device=dev)
        self.grid_ud = max(1, min(sms * 8, N * 16))

    def gate(self, x, W):
        N, D, H = self.N, self.D, self.H
        if self.skinny:
            launch(self.mod.fn("twell_gate_skinny"), ((self.ntiles * TILE) // 32, (N + 63) // 64), 128, 0,
                   [P(x), P(W), P(self.G), I(N), I(D), I(H), I(self.ntiles * TILE), P(self.ctrl)])
            warps = N * self.ntiles
            launch(self.mod.fn(f"twell_pack_tw{self.tw}"), ((warps + 7) // 8,), 256, 0,
                   [P(self.G), I(self.ntiles * TILE), P(self.twell), P(self.spill), I(self.spill_cap), P(self.ctrl),
                    I(N), I(self.ntiles)])
        elif self.wgmma:
            launch(self.mod.fn(f"twell_gate_wgmma_tw{self.tw}", WGMMA_SMEM), (self.ntiles, (N + 127) // 128), 384,
                   WGMMA_SMEM,
                   [tmap(x, N, D, 128), tmap(W, H, D, 256), P(self.twell), P(self.spill), I(self.spill_cap),
                    P(self.ctrl), I(N), I(D), I(H)])
        else:
            launch(self.mod.fn(f"twell_gate_gemm_tw{self.tw}", GEMM_SMEM), (self.ntiles, (N + 127) // 128), 256,
                   GEMM_SMEM,
                   [P(x), P(W), P(self.twell), P(self.spill), I(self.spill_cap), P(self.ctrl), I(N), I(D), I(H)])

    def updown(self, x, Wu, WdT, y, standalone=False):
        N, D = self.N, self.D
        if standalone:  # timing without the gate kernel that normally zeroes ctrl[2..4]
            memset0(self.ctrl[2:5])
        launch(self.mod.fn("twell_plan"), ((N + 7) // 8,), 256, 0,
               [P(self.twell), I(N), I(self.ntiles), I(self.tw), I(self.chunk), P(self.tokinfo), P(self.items),
                I(self.slot_cap), P(self.ctrl)])
        name = ("twell_updown_gated" if self.gated else "twell_down") + ("" if D <= 2048 else "_wide")
        launch(self.mod.fn(name), (self.grid_ud,), 256, D * 2,
               [P(x), P(self.twell), P(self.spill), P(Wu), P(WdT), P(y), P(self.tokinfo), P(self.items), P(self.part),
                P(self.arrive), P(self.ctrl), I(N), I(D), I(self.ntiles), I(self.tw), I(self.chunk)])

    def forward(self, x, Wg, Wu, WdT, y):
        """Gated: y = (relu(x Wg^T) * x Wu^T) WdT. Non-gated: y = relu(x Wg^T) WdT (Wg plays W1)."""
        self.gate(x, Wg)
        self.updown(x, Wu, WdT, y)

    def unpack(self):
        """Dense [N, ntiles*256] fp32 from the TwELL (+ spill) buffers, with torch ops."""
        N, nt, tw = self.N, self.ntiles, self.tw
        words = self.twell.view(N, nt, tw)
        cnt = words[:, :, 0].long()
        dense = torch.zeros(N, nt * TILE, dtype=torch.float32, device="cuda")
        rows = torch.arange(N, device="cuda").view(N, 1, 1).expand(N, nt, tw - 1)
        slotpos = torch.arange(tw - 1, device="cuda").view(1, 1, -1)
        ok = (slotpos < cnt.unsqueeze(-1)) & (cnt.unsqueeze(-1) <= tw - 1)
        ent = words[:, :, 1:]
        self._scatter(dense, rows[ok], ent[ok])
        spilled = (cnt > tw - 1).nonzero()
        nspill = spilled.shape[0]
        if nspill:
            slots = words[spilled[:, 0], spilled[:, 1], 1].long()
            if (slots < 0).any():
                raise RuntimeError("spill buffer full")
            e = self.spill.view(-1, TILE)[slots]  # [nspill, 256]
            c = cnt[spilled[:, 0], spilled[:, 1]]
            m = torch.arange(TILE, device="cuda").view(1, -1) < c.view(-1, 1)
            r = spilled[:, 0].view(-1, 1).expand(-1, TILE)
            self._scatter(dense, r[m], e[m])
        return dense, cnt, nspill

    @staticmethod
    def _scatter(dense, rows, ent):
        ent = ent.long() & 0xFFFFFFFF
        col = ent & 0xFFFF
        val = ((ent >> 16).to(torch.int32) << 16).view(torch.float32)
        dense[rows, col] = val


# ----------------------------------------------------------------------------------------------
# inputs (anchors.md §3)
def make_layer(N, D, H, s, seed, heavy=True, dev="cuda"):
    gen = torch.Generator(device=dev).manual_seed(seed)
    wg = torch.randn(H, D - 3, generator=gen, device=dev)
    wg /= wg.norm(dim=1, keepdim=True)
    b = 0.5 * torch.randn(H, generator=gen, device=dev)
    Wg = torch.zeros(H, D, device=dev)
    Wg[:, : D - 3] = wg
    Wg[:, D - 3] = b
    Wg[:, D - 2] = 1.0
    # target actives per token
    if heavy:
        w = torch.exp(0.5 * torch.randn(N, generator=gen, device=dev))
        hv = torch.rand(N, generator=gen, device=dev) < 0.01
        w[hv] = 10.0
        w /= w.mean()
    else:
        w = torch.ones(N, device=dev)
    k = ((1.0 - s) * H * w).clamp(0.05, H - 1.0)
    # solve sum_j Phi(t + b_j) = k by bisection (bf16 b as stored)
    bb = Wg[:, D - 3].to(torch.bfloat16).float()
    lo = torch.full((N,), -12.0, device=dev)
    hi = torch.full((N,), 12.0, device=dev)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        f = torch.special.ndtr(mid.view(-1, 1) + bb.view(1, -1)).sum(1)
        big = f > k
        hi = torch.where(big, mid, hi)
        lo = torch.where(big, lo, mid)
    t = 0.5 * (lo + hi)
    x = torch.zeros(N, D, device=dev)
    x[:, : D - 3] = torch.randn(N, D - 3, generator=gen, device=dev)
    x[:, D - 3] = 1.0
    x[:, D - 2] = t
    Wu = torch.randn(H, D, generator=gen, device=dev) / math.sqrt(D)
    WdT = torch.randn(H, D, generator=gen, device=dev) / math.sqrt(H)
    bf = torch.bfloat16
    return x.to(bf), Wg.to(bf), Wu.to(bf), WdT.to(bf)


def reference(x, Wg, Wu, WdT, gated=True):
    xf = x.float()
    if gated:
        g = torch.relu(xf @ Wg.float().T)
        h = g * (xf @ Wu.float().T)
    else:
        g = torch.relu(xf @ Wg.float().T)
        h = g
    return h @ WdT.float(), g


def dense_torch(x, Wg, Wu, WdT):
    return (torch.relu(x @ Wg.T) * (x @ Wu.T)) @ WdT


# ----------------------------------------------------------------------------------------------
def check(mod, name, N, D, H, s, tw, chunk, heavy=True, gated=True, seed=1, force_full=0, slot_cap=8192,
          spill_cap=None, tol=1e-2, wgmma=None, skinny_max=16):
    x, Wg, Wu, WdT = make_layer(N, D, H, s, seed, heavy)
    if force_full:
        # make the first `force_full` tokens fire on every unit of tile 0 (all 256 active)
        x[:force_full, D - 2] = 60.0
    tw_ = Twell(mod, N, D, H, tw=tw, chunk=chunk, gated=gated, slot_cap=slot_cap, spill_cap=spill_cap, wgmma=wgmma,
                skinny_max=skinny_max)
    y = torch.full((N, D), float("nan"), dtype=torch.bfloat16, device="cuda")
    tw_.twell.fill_(-0x55555556)
    tw_.forward(x, Wg, Wu, WdT, y)
    torch.cuda.synchronize()
    # second forward on the same buffers (self-resetting control words), output poisoned again
    y.fill_(float("nan"))
    tw_.twell.fill_(-0x55555556)
    tw_.forward(x, Wg, Wu, WdT, y)
    torch.cuda.synchronize()
    ref, gref = reference(x, Wg, Wu, WdT, gated)
    ctrl = tw_.ctrl.tolist()
    ctrl[0], ctrl[1] = ctrl[6], ctrl[5]  # this forward's spill use and status
    if ctrl[1] != 0:
        print(f"  {name:34s} N={N:6d} status {ctrl[1]} (spill buffer full: {ctrl[0]} tiles wanted, cap "
              f"{tw_.spill_cap}) -> caller must fall back", flush=True)
        return False
    dense, cnt, nspill = tw_.unpack()
    gd = dense[:, :H]
    # TwELL contents: values vs relu(g) fp32 (bf16 rounding), support mismatches only near 0
    gerr = (gd - gref).abs().max().item() / max(gref.abs().max().item(), 1e-30)
    supp_bad = ((gd > 0) != (gref > 0)) & (gref.abs() > 1e-3 * gref.abs().max())
    nnz = (gref > 0).sum(1).float()
    err = (y.float() - ref).abs()
    finite = torch.isfinite(y.float()).all().item()
    rel = err.max().item() / max(ref.abs().max().item(), 1e-30)
    rowrel = (err.max(1).values / ref.abs().max(1).values.clamp_min(1e-30))
    zero_rows = ref.abs().max(1).values == 0
    rowrel = torch.where(zero_rows, err.max(1).values, rowrel)
    bad_rows = (rowrel > 2 * tol).sum().item()
    tile_max = cnt.max().item()
    ok = finite and rel <= tol and bad_rows == 0 and gerr <= 1e-2 and supp_bad.sum().item() == 0 and ctrl[1] == 0
    print(f"  {name:34s} N={N:6d} H={H:5d} tw={tw:3d} nnz/tok mean {nnz.mean():7.1f} max {nnz.max():6.0f} "
          f"tile max {tile_max:3d} spilled {nspill:6d} extra {ctrl[2]:5d} | err {rel:.2e} rows>{2*tol:g}: {bad_rows} "
          f"g err {gerr:.1e} supp {supp_bad.sum().item()} status {ctrl[1]} {'OK' if ok else 'FAIL'}", flush=True)
    return ok


def median_ms(fn, reps, nlayers):
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i in range(3):
        fn(i % nlayers)
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(ev):
        a.record()
        fn(i % nlayers)
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def bench(mod, N, s, tw, chunk, reps, D=2048, H=5632, heavy=True, graph=False, label="", wgmma=None, skinny_max=16):
    layers = [make_layer(N, D, H, s, 100 + i, heavy) for i in range(4)]
    tws = [Twell(mod, N, D, H, tw=tw, chunk=chunk, wgmma=wgmma, skinny_max=skinny_max) for _ in range(4)]
    ys = [torch.empty(N, D, dtype=torch.bfloat16, device="cuda") for _ in range(4)]

    def dense(i):
        x, Wg, Wu, WdT = layers[i]
        ys[i] = dense_torch(x, Wg, Wu, WdT)

    def gate_only(i):
        x, Wg, Wu, WdT = layers[i]
        torch.relu(x @ Wg.T)

    def sparse(i):
        x, Wg, Wu, WdT = layers[i]
        tws[i].forward(x, Wg, Wu, WdT, ys[i])

    def sparse_gate(i):
        x, Wg, Wu, WdT = layers[i]
        tws[i].gate(x, Wg)

    def sparse_ud(i):
        x, Wg, Wu, WdT = layers[i]
        tws[i].updown(x, Wu, WdT, ys[i], standalone=True)

    if graph:
        # capture each layer's call in a CUDA graph (launch gaps out of the numbers)
        def mk(fn):
            gs = []
            for i in range(4):
                fn(i)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn(i)
                gs.append(g)
            return lambda i: gs[i].replay()

        try:
            dense_fn, sparse_fn = mk(dense), mk(sparse)
            gate_fn, sg_fn, su_fn = mk(gate_only), mk(sparse_gate), mk(sparse_ud)
        except Exception as e:  # noqa: BLE001
            print("   graph capture failed:", e)
            dense_fn, sparse_fn, gate_fn, sg_fn, su_fn = dense, sparse, gate_only, sparse_gate, sparse_ud
    else:
        dense_fn, sparse_fn, gate_fn, sg_fn, su_fn = dense, sparse, gate_only, sparse_gate, sparse_ud
    td = median_ms(dense_fn, reps, 4)
    ts = median_ms(sparse_fn, reps, 4)
    tg = median_ms(gate_fn, reps, 4)
    tsg = median_ms(sg_fn, reps, 4)
    # updown timed alone (twell buffers stay valid between calls)
    tsu = median_ms(su_fn, reps, 4)
    sparse(0)
    torch.cuda.synchronize()
    nnz = tws[0].tokinfo.view(N, 4)[:, 0].float()
    gather_gbs = nnz.sum().item() * 4 * D / (tsu * 1e-3) / 1e9  # Wu + WdT rows, bf16
    gate_tfs = 2.0 * N * D * H / (tsg * 1e-3) / 1e12
    row = (f"{N:6d} {label or f'{100*s:.1f}%':>12s} {nnz.mean():6.1f} {nnz.max():5.0f}  {td:8.4f} {tg:8.4f}  "
           f"{ts:8.4f} {tsg:8.4f} {tsu:8.4f}  {td/ts:6.2f}x  {gate_tfs:5.0f} {gather_gbs:6.0f}")
    print(row, flush=True)
    del layers, tws, ys
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cubins", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    props = torch.cuda.get_device_properties(0)
    cc = torch.cuda.get_device_capability(0)
    print(f"GPU: {props.name}  SMs {props.multi_processor_count}  cc {cc}  torch {torch.__version__}", flush=True)
    arch = "sm_90a" if cc == (9, 0) else "sm_80"
    mod = Module(os.path.join(args.cubins, f"twell.{arch}.cubin"))
    allok = True
    print("== correctness (tolerance: max|err|/max|ref| <= 1e-2 overall, <= 2e-2 on every row; fp32 reference)")
    D, H = 2048, 5632
    cases = [
        ("99.5% heavy-tailed (realistic)", 16384, D, H, 0.995, 32, 128, {}),
        ("99.5% mma.sync gate (sm_80 path)", 4096, D, H, 0.995, 32, 128, dict(wgmma=False)),
        ("95% mma.sync gate tw64", 2048, D, H, 0.95, 64, 512, dict(wgmma=False)),
        ("N=1000 H=1000 mma.sync gate", 1000, D, 1000, 0.99, 32, 64, dict(wgmma=False)),
        ("99% heavy-tailed", 4096, D, H, 0.99, 32, 128, {}),
        ("95% heavy-tailed tw32 (spills)", 4096, D, H, 0.95, 32, 512, {}),
        ("95% heavy-tailed tw128", 4096, D, H, 0.95, 128, 512, {}),
        ("90% heavy-tailed tw128", 2048, D, H, 0.90, 128, 1024, {}),
        ("99.5% uniform actives", 4096, D, H, 0.995, 32, 128, dict(heavy=False)),
        ("full tiles (256 active)", 1000, D, H, 0.995, 32, 64, dict(force_full=7)),
        ("N=1000 (not % 256), H=1000", 1000, D, 1000, 0.99, 32, 64, {}),
        ("H=5000 (not % 256), D=1024", 777, 1024, 5000, 0.99, 32, 64, {}),
        ("N=1 decode", 1, D, H, 0.995, 32, 8, {}),
        ("N=8 decode", 8, D, H, 0.995, 32, 8, {}),
        ("N=64 decode (gemm path)", 64, D, H, 0.995, 32, 8, {}),
        ("N=64 decode (skinny path)", 64, D, H, 0.995, 32, 8, dict(skinny_max=64)),
        ("N=16 decode (skinny path)", 16, D, H, 0.995, 32, 8, {}),
        ("N=64 decode, heavy token", 64, D, H, 0.995, 32, 8, dict(force_full=1)),
        ("N=65 (gemm, 1 row tile)", 65, D, H, 0.99, 32, 16, {}),
        ("spill buffer too small -> status", 1000, D, H, 0.95, 32, 256, dict(spill_cap=4)),
        ("part slots exhausted -> unsplit", 2048, D, H, 0.99, 32, 8, dict(slot_cap=64)),
        ("non-gated 99.5%", 4096, D, H, 0.995, 32, 128, dict(gated=False)),
        ("non-gated N=8 decode", 8, D, H, 0.995, 32, 8, dict(gated=False)),
    ]
    if args.quick:
        cases = cases[:3]
    for name, N, d, h, s, tw, ch, kw in cases:
        try:
            ok = check(mod, name, N, d, h, s, tw, ch, **kw)
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: EXCEPTION {e}", flush=True)
            ok = False
        if "status" in name:
            # expected: status flags the full spill buffer; that is the detection, not a pass
            print("    (expected status=1 and FAIL: the caller sees the full spill buffer)")
        else:
            allok &= ok
    print("correctness:", "ALL OK" if allok else "FAILURES", flush=True)
    if args.skip_bench:
        return
    print("== timing (ms, medians; dense = torch bf16 cuBLAS 3 GEMMs + relu*mul; 4 layers rotated)")
    hdr = (f"{'N':>6s} {'sparsity':>12s} {'nnz':>6s} {'max':>5s}  {'dense':>8s} {'gate':>8s}  "
           f"{'twell':>8s} {'tw gate':>8s} {'tw ud':>8s}  {'dense/tw':>7s}  {'TF/s':>5s} {'ud GB/s':>6s}")
    print(hdr, flush=True)
    rows = [hdr]
    reps = 30 if args.quick else 50
    plan = [
        (16384, 0.995, 32, 128, {}),
        (16384, 0.995, 32, 128, dict(heavy=False, label="99.5% unif")),
        (16384, 0.995, 32, 128, dict(wgmma=False, label="99.5% mma.sync")),
        (16384, 0.99, 32, 128, {}),
        (16384, 0.95, 64, 512, {}),
        (16384, 0.90, 128, 1024, {}),
        (4096, 0.995, 32, 128, {}),
        (4096, 0.99, 32, 128, {}),
        (64, 0.995, 32, 8, dict(graph=True, label="99.5% graph")),
        (8, 0.995, 32, 8, dict(graph=True, label="99.5% graph")),
        (1, 0.995, 32, 8, dict(graph=True, label="99.5% graph")),
    ]
    if args.quick:
        plan = plan[:1]
    for N, s, tw, ch, kw in plan:
        try:
            rows.append(bench(mod, N, s, tw, ch, reps, **kw))
        except Exception as e:  # noqa: BLE001
            print(f"bench N={N} s={s}: EXCEPTION {e}", flush=True)
    print(f"== summary on {props.name}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
