"""Which CPU kernels change their float results with the thread count and the kernel path.

Runs the same small computations (the operations a pruning run is made of) in a child
process per setting and compares each output bitwise with the machine's default:
``OMP_NUM_THREADS=1``, ``ATEN_CPU_CAPABILITY`` (PyTorch's own vectorised kernels:
elementwise, reductions, softmax) and ``MKL_ENABLE_INSTRUCTIONS`` (matrix products). A
diagnostic for results/README.md ("noise"), not a test.

    python scripts/kernel_paths.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "ATEN_CPU_CAPABILITY=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "MKL_ENABLE_INSTRUCTIONS=SSE4_2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "MKL_ENABLE_INSTRUCTIONS=AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "all of them (an old CPU, 1 thread)": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default",
                                           "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}

PROBE = r"""
import hashlib, json, torch
import torch.nn.functional as F
g = torch.Generator().manual_seed(0)
a = torch.randn(512, 576, generator=g); b = torch.randn(576, 1536, generator=g)
x = torch.randn(4, 9, 128, 64, generator=g)
ops = {
    "matmul float32": lambda: a @ b,
    "matmul float64": lambda: a.double() @ b.double(),
    "sum over 576 (float32)": lambda: a.sum(1),
    "exp (float32)": lambda: a.exp(),
    "silu (float32)": lambda: F.silu(a),
    "softmax (float32)": lambda: torch.softmax(a, -1),
    "rms norm (float32)": lambda: a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6),
    "sdpa causal (float32)": lambda: F.scaled_dot_product_attention(x, x, x, is_causal=True),
    "eigh float64": lambda: torch.linalg.eigh((a.double().T @ a.double())[:128, :128])[1].abs(),
    "cholesky solve float64": lambda: torch.cholesky_solve(torch.ones(128, 1, dtype=torch.float64),
        torch.linalg.cholesky((a.double().T @ a.double())[:128, :128] + torch.eye(128, dtype=torch.float64))),
}
out = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(), "ops": {}}
for name, op in ops.items():
    t = op().contiguous()
    out["ops"][name] = hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
print(json.dumps(out))
"""


def probe(env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the comparison here")
    args = parser.parse_args()
    base = probe({})
    rows = {}
    print(f"default: capability {base['capability']}, {base['threads']} threads")
    for name, env in SETTINGS.items():
        got = probe(env)
        changed = [op for op, digest in got["ops"].items() if digest != base["ops"][op]]
        rows[name] = {"capability": got["capability"], "threads": got["threads"], "changed": changed}
        print(f"{name:38s} capability {got['capability']:8s} threads {got['threads']}: "
              f"{', '.join(changed) if changed else 'no output changes'}")
    if args.json:
        from prunebench.harness.cache import atomic_write_json

        atomic_write_json(args.json, {"default": base, "settings": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
