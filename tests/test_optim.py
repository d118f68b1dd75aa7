import torch
from torch import nn

from tunelab.train.optim import build_optimizer, build_schedule


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
    sched = build_schedule(opt, "linear", total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.5 and lrs[1] == 1.0
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert sched.get_last_lr()[0] == 0.0


def _lrs(name, total=10, warmup=2):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_schedule(opt, name, total_steps=total, warmup_steps=warmup)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_cosine_and_constant_schedules():
    import math

    cos = _lrs("cosine")
    assert cos[:2] == [0.5, 1.0]
    assert math.isclose(cos[6], 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(cos[1:], cos[2:]))
    assert _lrs("constant")[1:] == [1.0] * 9


def test_adafactor_steps_and_keeps_factored_state():
    net = nn.Linear(8, 4)
    opt = build_optimizer(net, 1e-2, 0.0, kind="adafactor")
    assert isinstance(opt, torch.optim.Adafactor)
    before = net.weight.detach().clone()
    net(torch.randn(3, 8)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, net.weight)
    state = opt.state[net.weight]
    assert state["row_var"].numel() + state["col_var"].numel() < net.weight.numel()
