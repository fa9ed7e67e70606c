"""fp32 master copies of the low-precision parameters a stage trains (stage 2 `train: full` on a
bf16 or fp16 model).

AdamW updating bf16 weights in place rounds away every update smaller than half a bf16 step of the
weight (2^-8 of the power of two below it): an AdamW step is at most about the lr, so at stage 2's
lr (1e-4, cosine down to 1e-5) every update of a weight of magnitude >= 2^-5 (0.031; half a step
there is 1.2e-4) is lost, step after step, and smaller weights lose theirs as the lr decays. Here
the optimizer steps fp32 copies instead,
and the model's bf16 / fp16 weights are set from them after every step: the usual mixed-precision
master weights. fp32 parameters (the HLA parameters, LoRA, any parameter of an fp32 model) are
stepped as they are, with no copy.

Memory: 4 bytes per low-precision trained parameter on their device (Wan2.1-1.3B's 30 blocks:
4 x 1536^2 x 2 + 2 x 1536 x 8960 = 46.4 M a block, 1.39 B: 5.6 GB), and the AdamW moments in fp32 too.
"""

from __future__ import annotations

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeights:
    """params: name -> the model's trained Parameter. `opt` maps the same names to what the
    optimizer steps and checkpoints hold: an fp32 master (a Parameter off the model) for each
    bf16 / fp16 parameter, the parameter itself otherwise."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.masters = {n: nn.Parameter(p.detach().float().clone()) for n, p in params.items() if p.dtype in LOW_PRECISION}
        self.opt = {n: self.masters.get(n, p) for n, p in params.items()}

    def grads_to_masters(self) -> None:
        """Move the model parameters' gradients (summed over the step's inputs and processes) to
        their masters, in fp32; the model parameters' gradients are dropped."""
        for n, master in self.masters.items():
            p = self.params[n]
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def to_model(self) -> None:
        """Set the model's low-precision parameters from their masters (rounded to their dtype)."""
        for n, master in self.masters.items():
            self.params[n].copy_(master)
