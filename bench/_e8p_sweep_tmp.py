import sys

import torch

sys.path.insert(0, "bench"); sys.path.insert(0, ".")
from kernels import graph_time_us, n_copies

from rsq.kernels import triton_e8p as T
from rsq.quant.e8p import codes_to_int16

s = torch.tensor([[0.01]], device="cuda")
for n, k in ((14336, 4096), (4096, 14336), (4096, 4096)):
    cs = [codes_to_int16(torch.randint(0, 65536, (n, k // 8), device="cuda")) for _ in range(n_copies(n * k // 4))]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    res = []
    for bn in (4, 8, 16, 32):
        for bc in (32, 64, 128):
            for nw in (2, 4, 8):
                cfg = dict(BLOCK_N=bn, BLOCK_C=bc, num_warps=nw)
                try:
                    t = graph_time_us([lambda c=c: T.gemv(x, c, s, config=cfg) for c in cs], replays=5)
                except Exception:
                    t = float("nan")
                res.append((t, bn, bc, nw))
    res.sort()
    print(n, k, "default", T.gemv_config(n), "best", res[:4], flush=True)
