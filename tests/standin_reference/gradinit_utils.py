"""Stand-in for ``gradinit_utils`` of zhuchen03/gradinit, for testing ``benchmarks/vs_reference.py``.

Same call shape as the upstream module (``gradinit(net, dataloader, args)``, a ``RescaleAdam``
class whose ``step(is_constraint=...)`` ends every iteration, batches moved with ``.cuda()``,
a checkpoint saved with ``torch.save`` at the end), with a trivial body: one gradient step per
iteration. Written for these tests; not the upstream code.
"""

import torch
import torch.nn.functional as F


class RescaleAdam(torch.optim.SGD):
    def __init__(self, params, lr=1e-3):
        super().__init__(params, lr=lr)

    def step(self, closure=None, is_constraint=False):
        return super().step(closure)


def gradinit(net, dataloader, args):
    opt = RescaleAdam(net.parameters(), lr=args.gradinit_lr)
    data = iter(dataloader)
    for _ in range(args.gradinit_iters):
        try:
            x, y = next(data)
        except StopIteration:
            data = iter(dataloader)
            x, y = next(data)
        x, y = x.cuda(), y.cuda()
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        norm = sum(float(p.grad.norm() ** 2) for p in net.parameters()) ** 0.5
        opt.step(is_constraint=norm > args.gradinit_gamma)
    torch.save(net.state_dict(), f"{args.expname}.pth")
