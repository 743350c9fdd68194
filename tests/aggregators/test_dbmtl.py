import torch

from lightning_mtl.aggregators import DBMTL


def _reference(jacobians, beta=0.9, beta_sigma=0.5, eps=1e-8):
    """DB-MTL as in LibMTL, written out on small tensors."""
    ema = torch.zeros_like(jacobians[0])
    out = []
    for t, jac in enumerate(jacobians, start=1):
        beta_t = beta / t**beta_sigma
        ema = beta_t * ema + (1 - beta_t) * jac
        norms = torch.stack([row.norm() for row in ema])
        alpha = norms.max() / (norms + eps)
        out.append(sum(alpha[i] * ema[i] for i in range(ema.shape[0])))
    return out


def test_matches_hand_written_steps():
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([[1.0], [5.0], [0.2]], dtype=torch.float64)
    jacobians = [torch.randn(3, 7, generator=gen, dtype=torch.float64) * scales for _ in range(4)]
    agg = DBMTL()
    for got, expected in zip([agg(j) for j in jacobians], _reference(jacobians)):
        torch.testing.assert_close(got, expected)
    assert int(agg.num_steps) == 4


def test_flags_buffers_and_balanced_norms():
    assert DBMTL.uses_log_losses is True
    agg = DBMTL()
    assert agg.grad_ema.numel() == 0
    jac = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    d = agg(jac)
    # both tasks contribute with the largest (EMA) norm: 0.1 * 3 each
    torch.testing.assert_close(d, torch.tensor([0.3, 0.3]), rtol=1e-6, atol=1e-6)
    assert agg.state_dict()["grad_ema"].shape == (2, 2)
