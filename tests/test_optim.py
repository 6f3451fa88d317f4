"""Float32 Muon: the update torch.optim.Muon makes, computed without bfloat16."""

import torch

from depthlens.training.optim import Float32Muon, orthogonalise


def test_newton_schulz_flattens_the_spectrum():
    torch.manual_seed(0)
    for shape in [(48, 20), (20, 48)]:
        singular = torch.linalg.svdvals(orthogonalise(torch.randn(*shape) * torch.logspace(-1, 0, shape[1])))
        assert singular.min() > 0.5 and singular.max() < 1.3


def test_update_matches_torch_muon_up_to_bfloat16_rounding():
    torch.manual_seed(1)
    ours, theirs = torch.nn.Parameter(torch.zeros(64, 32)), torch.nn.Parameter(torch.zeros(64, 32))
    mine, reference = Float32Muon([ours], lr=0.01), torch.optim.Muon([theirs], lr=0.01, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grad = torch.randn(64, 32)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()
