"""Stand-in for ``meta_init`` of diggerdu/MetaInit, for testing ``benchmarks/vs_reference.py``.

Same call shape as the upstream module (``metainit(model, criterion, x_size, y_size, ...)``,
noise batches moved with ``.cuda()``, one ``print`` at the end of every step), with a trivial
body. Written for these tests; not the upstream code.
"""

import torch


def metainit(model, criterion, x_size, y_size, lr=0.1, momentum=0.9, steps=500, eps=1e-5):
    for i in range(steps):
        x = torch.randn(*x_size).cuda()
        y = torch.randint(0, y_size, (x_size[0],)).cuda()
        loss = criterion(model(x), y)
        torch.autograd.grad(loss, list(model.parameters()))
        print(f"{i}/GQ = {loss.item():.2f}")
