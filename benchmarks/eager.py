"""The eager "reference-style" SAE passes that performance.md's baseline measured, for side-by-side timing."""
import torch
import torch.nn.functional as F


def eager_edit(x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale):
    """F.linear encode + ReLU + torch.topk + ablation mask + dense decode, with the error added back."""
    tok = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x
    pre = torch.relu(F.linear(tok - b_dec, W_enc, b_enc))
    vals, idx = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter_(1, idx, vals)
    sel = f[:, feat]
    f2 = f.clone()
    f2[:, feat] = torch.where(sel > tau, sel * scale, sel)
    out = tok + (f2 - f) @ W_dec
    if x.dim() == 4:
        b, c, h, w = x.shape
        out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)
    return out


def eager_train_loss(x, W_enc, b_enc, b_dec, W_dec, k):
    """F.linear + torch.topk + embedding_bag decode; autograd gives a dense [N, M] backward."""
    pre = torch.relu(F.linear(x - b_dec, W_enc, b_enc))
    vals, idx = pre.topk(k, dim=-1)
    x_hat = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum") + b_dec
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
