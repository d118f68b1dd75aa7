import torch
from torch import nn

from tunelab.train.optim import build_optimizer, linear_schedule


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.classifier = nn.Linear(4, 2)


def test_decay_groups_and_head_lr():
    net = Net()
    opt = build_optimizer(net, lr=1e-3, weight_decay=0.1, head_lr=1e-2, head_names=("classifier",))
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_id[id(net.body.weight)]["weight_decay"] == 0.1 and by_id[id(net.body.weight)]["lr"] == 1e-3
    assert by_id[id(net.body.bias)]["weight_decay"] == 0.0
    assert by_id[id(net.LayerNorm.weight)]["weight_decay"] == 0.0
    assert by_id[id(net.classifier.weight)]["lr"] == 1e-2
    assert sum(len(g["params"]) for g in opt.param_groups) == 6


def test_linear_warmup_then_decay():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = linear_schedule(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.5 and lrs[1] == 1.0
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert sched.get_last_lr()[0] == 0.0
