"""Reference numbers for the GRPO loss: TRL's GRPOTrainer formulas, written out in torch.

Writes fixtures/grpo/loss.json: fixed per-token log-probs (policy, old, reference), masks and
rewards, and for every scale_rewards mode the advantages, and for every loss_type × beta the
accumulated loss over two micro-batches, its gradient with respect to the policy log-probs,
the mean KL and the clip fractions. `tests/tests/grpo_train.rs` checks ours against it.

    /root/refenv/bin/python scripts/make_grpo_fixtures.py
"""
import json
import pathlib

import torch

torch.manual_seed(7)
G = 4  # completions per prompt
P = 2  # prompts
B = G * P
T = 6  # max completion length (the padded width)
ACCUM = 2  # micro-batches per generation batch, B / ACCUM sequences each
EPS_LOW, EPS_HIGH = 0.2, 0.28

logps = -torch.rand(B, T, dtype=torch.float64) * 3.0
# old log-probs far enough from the policy's that both clip bounds are hit
old = logps + torch.randn(B, T, dtype=torch.float64) * 0.5
ref = logps + torch.randn(B, T, dtype=torch.float64) * 0.2
lengths = torch.tensor([6, 3, 1, 5, 6, 2, 4, 0])  # the last completion is fully masked (truncated)
mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)  # group 2 has zero std


def advantages(r, scale):
    # GRPOTrainer._generate_and_score_completions
    grouped = r.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G)
    adv = r - mean
    if scale in ("group", "none"):
        std = grouped.std(dim=1).repeat_interleave(G)  # unbiased, as torch.std
    else:
        std = r.std().expand_as(r)
    if scale != "none":
        adv = adv / (std + 1e-4)
    return adv


def micro_loss(lp, old_lp, ref_lp, m, adv, loss_type, beta, total_active):
    # GRPOTrainer._compute_loss for one micro-batch
    coef_1 = torch.exp(lp - old_lp)
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    l1 = coef_1 * adv.unsqueeze(1)
    l2 = coef_2 * adv.unsqueeze(1)
    per_token = -torch.min(l1, l2)
    if beta != 0.0:
        kl = torch.exp(ref_lp - lp) - (ref_lp - lp) - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / ACCUM
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0) / ACCUM
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (per_token.size(0) * T) / ACCUM
    elif loss_type == "dapo":
        loss = (per_token * m).sum() / total_active
    return loss


def masked_mean(x, m):
    return float((x * m).sum() / m.sum().clamp(min=1.0))


out = {
    "group_size": G,
    "max_completion_len": T,
    "grad_accum": ACCUM,
    "epsilon_low": EPS_LOW,
    "epsilon_high": EPS_HIGH,
    "lengths": lengths.tolist(),
    "logps": logps.tolist(),
    "old": old.tolist(),
    "ref": ref.tolist(),
    "rewards": rewards.tolist(),
    "advantages": {s: advantages(rewards, s).tolist() for s in ("group", "batch", "none")},
    "cases": [],
}
adv = advantages(rewards, "group")
ratio = torch.exp(logps - old)
kl_tok = torch.exp(ref - logps) - (ref - logps) - 1
a = adv.unsqueeze(1).expand(B, T)
out["kl_mean"] = masked_mean(kl_tok, mask)
out["clip_low"] = masked_mean(((ratio < 1 - EPS_LOW) & (a < 0)).to(torch.float64), mask)
out["clip_high"] = masked_mean(((ratio > 1 + EPS_HIGH) & (a > 0)).to(torch.float64), mask)
total_active = mask.sum()
half = B // ACCUM
for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
    for beta in (0.0, 0.04):
        lp = logps.clone().requires_grad_(True)
        total = 0.0
        for k in range(ACCUM):
            s = slice(k * half, (k + 1) * half)
            total = total + micro_loss(lp[s], old[s], ref[s], mask[s], adv[s], loss_type, beta, total_active)
        total.backward()
        out["cases"].append(
            {"loss_type": loss_type, "beta": beta, "loss": float(total.detach()), "grad": (lp.grad * mask).tolist()}
        )
path = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "grpo" / "loss.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {path}")
