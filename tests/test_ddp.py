"""DistributedDataParallel: training a gatedrnn model on 2 CPU processes (gloo, loopback only) gives the same
parameters as training it in one process on the same global batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gatedrnn

STEPS, T, GLOBAL_BATCH, I, H = 3, 6, 8, 4, 8

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = gatedrnn.LSTM(I, H, num_layers=2, bidirectional=True)
        self.gru = gatedrnn.GRU(2 * H, H)
        self.head = nn.Linear(H, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        out, _ = self.gru(out)
        return self.head(out[-1])


def _data():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(T, GLOBAL_BATCH, I, generator=g, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, 2, generator=g, dtype=torch.float64))


def _train(model, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _worker(rank, world, init_file, result_file):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Model().double()
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = _data()
        share = GLOBAL_BATCH // world
        _train(ddp, x[:, rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
        if rank == 0:
            torch.save(model.state_dict(), result_file)
        dist.barrier()  # no rank tears gloo down while another still uses it
    finally:
        dist.destroy_process_group()


def test_ddp_on_two_processes_matches_one_process(tmp_path):
    result_file = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(result_file)), nprocs=2, join=True)
    distributed = torch.load(result_file)

    torch.manual_seed(0)
    model = Model().double()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, *_data())
    for name, value in model.state_dict().items():
        assert not torch.equal(value, initial[name]), f"{name} did not train"
        torch.testing.assert_close(distributed[name], value, atol=1e-12, rtol=1e-10, msg=name)
