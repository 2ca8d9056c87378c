"""Fréchet distance of two feature sets in PyTorch (float64): ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2·sqrtm(Σ₁Σ₂)), with
sqrtm(Σ₁Σ₂) traced as Σ √λ of Σ₁^½Σ₂Σ₁^½ (eigh) — the peer of train/classify_trainer.cpp's Jacobi version.
usage: torch_frechet.py IN_SAFETENSORS  (tensors a [n, D], b [m, D]); prints the distance."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpt2 import read_safetensors  # noqa: E402

t = read_safetensors(sys.argv[1])
a, b = t["a"].double(), t["b"].double()
m1, m2 = a.mean(0), b.mean(0)
c1, c2 = torch.cov(a.T), torch.cov(b.T)
w, V = torch.linalg.eigh(c1)
s = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
e = torch.linalg.eigvalsh(s @ c2 @ s).clamp(min=0)
print(float(((m1 - m2) ** 2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * e.sqrt().sum()))
