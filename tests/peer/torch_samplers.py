"""The samplers of infer/diffusion_sampler.cpp written again in PyTorch (float64) from their papers (DDPM's
posterior, DDIM's update, the reverse VE SDE, EDM's Algorithm 2 with churn, Euler/midpoint/Heun on the flow ODE),
driven by the exact denoiser of Gaussian data N(mu, Sigma) and a recorded noise stream consumed in the same order
(starting noise first, then each step's draws). Writes each case's trajectory (x after each step).
usage: torch_samplers.py IN_JSON OUT_JSON
  IN: a list of cases {"objective", "sampler", "steps", "eta", "churn", "rho", "sigma_min", "sigma_max",
       "mu": [P], "sigma": [[P]], "B", "noise": [...]}
"""
import json
import math
import sys

import torch

dt = torch.float64
betas = torch.linspace(1e-4, 0.02, 1000, dtype=dt)
abar = torch.cumprod(1 - betas, 0)


def sample(cfg):
    mu = torch.tensor(cfg["mu"], dtype=dt)
    S = torch.tensor(cfg["sigma"], dtype=dt)
    P, B = mu.numel(), cfg["B"]
    noise = torch.tensor(cfg["noise"], dtype=dt)
    pos = [0]
    obj = cfg["objective"]

    def draw():
        z = noise[pos[0]:pos[0] + B * P].reshape(B, P)
        pos[0] += B * P
        return z

    def interp(level):  # a, s of x_t = a x0 + s eps
        if obj == "ddpm":
            return abar[int(level)].sqrt(), (1 - abar[int(level)]).sqrt()
        if obj in ("ve", "edm"):
            return 1.0, level
        if obj == "flow":
            return 1 - level, level
        h = math.pi / 2
        return math.cos(h * level), math.sin(h * level)

    def posterior(x, level):  # E[x0 | x_t], E[eps | x_t] for Gaussian data
        a, s = interp(level)
        M = a * a * S + s * s * torch.eye(P, dtype=dt)
        r = torch.linalg.solve(M, (x - a * mu).T).T
        return mu + a * r @ S.T, s * r

    def velocity(x, t):
        x0, e = posterior(x, t)
        if obj == "flow":
            return e - x0
        h = math.pi / 2
        return -h * math.sin(h * t) * x0 + h * math.cos(h * t) * e

    name, N = cfg["sampler"], cfg["steps"]
    traj = []
    if name in ("ddpm", "ddim"):
        tau = [i * 1000 // N for i in range(N)]
        x = draw()
        for i in range(N - 1, -1, -1):
            t = tau[i]
            x0, e = posterior(x, t)
            ab = abar[t]
            abp = abar[tau[i - 1]] if i > 0 else torch.tensor(1.0, dtype=dt)
            if i == 0:
                x = x0
            elif name == "ddpm":
                z = draw()
                alpha = ab / abp
                beta = 1 - alpha
                mean = abp.sqrt() * beta / (1 - ab) * x0 + alpha.sqrt() * (1 - abp) / (1 - ab) * x
                x = mean + (beta * (1 - abp) / (1 - ab)).sqrt() * z
            else:
                eta = cfg["eta"]
                z = draw() if eta > 0 else 0
                sig = eta * ((1 - abp) / (1 - ab)).sqrt() * (1 - ab / abp).sqrt()
                x = abp.sqrt() * x0 + (1 - abp - sig ** 2).clamp(min=0).sqrt() * e + sig * z
            traj.append(x.clone())
    elif name in ("euler-maruyama", "edm-euler", "edm-heun"):
        rho, smin, smax = cfg["rho"], cfg["sigma_min"], cfg["sigma_max"]
        sig = [(smax ** (1 / rho) + (i / (N - 1) if N > 1 else 0) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
               for i in range(N)] + [0.0]
        x = draw() * sig[0]
        for i in range(N):
            si, sn = sig[i], sig[i + 1]
            if name == "euler-maruyama":
                D, _ = posterior(x, si)
                score = (D - x) / si ** 2
                z = draw() if sn > 0 else 0
                x = x + (si ** 2 - sn ** 2) * score + (math.sqrt(si ** 2 - sn ** 2) * z if sn > 0 else 0)
                traj.append(x.clone())
                continue
            gamma = min(cfg["churn"] / N, math.sqrt(2) - 1) if cfg["churn"] > 0 else 0
            sh = si * (1 + gamma)
            xh = x + math.sqrt(sh ** 2 - si ** 2) * draw() if gamma > 0 else x
            d = (xh - posterior(xh, sh)[0]) / sh
            xn = xh + (sn - sh) * d
            if name == "edm-heun" and sn > 0:
                d2 = (xn - posterior(xn, sn)[0]) / sn
                xn = xh + (sn - sh) * 0.5 * (d + d2)
            x = xn
            traj.append(x.clone())
    else:
        x = draw()
        for i in range(N):
            t0, t1 = 1 - i / N, 1 - (i + 1) / N
            h = t1 - t0
            v = velocity(x, t0)
            if name == "flow-euler":
                x = x + h * v
            elif name == "flow-midpoint":
                x = x + h * velocity(x + 0.5 * h * v, t0 + 0.5 * h)
            else:
                x = x + 0.5 * h * (v + velocity(x + h * v, t1))
            traj.append(x.clone())
    assert pos[0] == noise.numel(), f"noise consumed {pos[0]} of {noise.numel()}"
    return {"trajectory": [t.reshape(-1).tolist() for t in traj]}


json.dump([sample(c) for c in json.load(open(sys.argv[1]))], open(sys.argv[2], "w"))
