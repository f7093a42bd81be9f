"""Collectives over a real 2-process gloo group: gathered SimCLR negatives give the full-batch
loss and gradients; alone, every helper is a no-op."""

import os
import socket

import torch
import torch.multiprocessing as mp

from sept.training import distributed
from sept.training.simclr import nt_xent_loss

WORLD = 2
ROWS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * ROWS, 6, generator=generator), torch.randn(WORLD * ROWS, 6, generator=generator)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    os.environ.pop("SUBMITIT_EXECUTOR", None)
    info = distributed.init_distributed()
    try:
        z1, z2 = _full_batch()
        local1 = z1[rank * ROWS : (rank + 1) * ROWS].clone().requires_grad_()
        local2 = z2[rank * ROWS : (rank + 1) * ROWS].clone().requires_grad_()
        keys1, keys2 = distributed.all_gather_with_grad(local1), distributed.all_gather_with_grad(local2)
        loss = nt_xent_loss(local1, local2, keys1, keys2, distributed.get_rank() * ROWS, 0.2)
        loss.backward()
        check = distributed.all_reduce_sum(torch.tensor([float(rank + 1)]))
        torch.save(
            {
                "info": (info.rank, info.world_size, info.backend),
                "loss": loss.detach(),
                "grad1": local1.grad,
                "grad2": local2.grad,
                "keys_shape": tuple(keys1.shape),
                "check": check.item(),
                "flags": distributed.all_reduce_max_flags([rank, 1 - rank, 0]),
                "objects": distributed.gather_objects({"rank": rank}),
                "main": distributed.is_main_process(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        distributed.destroy_distributed()


def test_gathered_negatives_match_the_full_batch(tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    z1, z2 = _full_batch()
    z1.requires_grad_(), z2.requires_grad_()
    full = nt_xent_loss(z1, z2, z1, z2, 0, 0.2)
    full.backward()

    assert [r["info"] for r in results] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert [r["main"] for r in results] == [True, False]
    assert all(r["keys_shape"] == (WORLD * ROWS, 6) for r in results)
    assert all(r["check"] == 3.0 for r in results)
    assert all(r["flags"] == [1, 1, 0] for r in results)  # the stop/ran-out vote of the trainer
    assert results[1]["objects"] == [{"rank": 0}, {"rank": 1}]
    assert torch.allclose(sum(r["loss"] for r in results) / WORLD, full.detach(), atol=1e-6)
    # DDP averages gradients over ranks: rank r's gradient / world is the full batch's for its rows.
    for rank, r in enumerate(results):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        assert torch.allclose(r["grad1"] / WORLD, z1.grad[rows], atol=1e-6)
        assert torch.allclose(r["grad2"] / WORLD, z2.grad[rows], atol=1e-6)


def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    assert not distributed.is_initialized()
    t = torch.arange(3.0)
    assert distributed.all_gather_with_grad(t) is t
    assert distributed.all_reduce_sum(torch.tensor([1.0])).item() == 1.0
    assert distributed.gather_objects("x") == ["x"]
    assert distributed.broadcast_object(5) == 5
    assert distributed.all_reduce_max_flags([2, 0]) == [2, 0]
    assert distributed.node_info()["hostname"] == socket.gethostname()


def test_nccl_only_for_ranks_on_a_gpu():
    assert distributed.backend_for(False) == "gloo"  # a CPU run on a GPU node too
    assert distributed.backend_for(True) == ("nccl" if torch.cuda.is_available() else "gloo")
