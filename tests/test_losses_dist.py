"""ITC across two real processes (gloo on CPU) equals ITC on the concatenated batch.

Two processes are started with torch.multiprocessing (fork) and talk over a free
localhost port. Each worker holds rows ``[rank * B, (rank + 1) * B)`` of one global
batch. Features are ``inputs @ weight`` with a weight shared by the ranks, and the test
all-reduces the weight gradient the way DDP does (sum, then divide by the world size),
so the scale convention of each mode is checked end to end:

* ``local_loss=False``: loss on every rank == global loss; d loss / d local features ==
  the matching rows of the single-process gradient; DDP-averaged weight gradient ==
  single-process gradient / world size.
* ``local_loss=True, gather_with_grad=True``: mean of the per-rank losses == global loss;
  d loss / d local features == world size x the matching rows; DDP-averaged weight
  gradient == single-process gradient.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mrplip_core.losses import ITCLoss

WORLD_SIZE = 2
PER_RANK = 3
IN_DIM, DIM = 5, 4
MODES = {
    "global": {"local_loss": False, "gather_with_grad": False},
    "local_with_grad": {"local_loss": True, "gather_with_grad": True},
}


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(WORLD_SIZE * PER_RANK, IN_DIM, generator=generator)
    texts = torch.randn(WORLD_SIZE * PER_RANK, DIM, generator=generator)
    weight = torch.randn(IN_DIM, DIM, generator=generator)
    return images, texts, weight


def _step(loss: ITCLoss, images, texts, weight) -> dict[str, torch.Tensor]:
    weight = weight.clone().requires_grad_()
    image_features = (images @ weight).detach().requires_grad_()
    text_features = texts.clone().requires_grad_()
    value = loss(image_features, text_features)["itc"]
    # chain rule by hand so the feature gradient is observable: d/dW = images^T d/dfeatures
    value.backward()
    weight_grad = images.T @ image_features.grad
    return {
        "loss": value.detach(),
        "image_grad": image_features.grad,
        "text_grad": text_features.grad,
        "weight_grad": weight_grad,
        "scale_grad": loss.logit_scale.log_scale.grad.clone(),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        images, texts, weight = _global_batch()
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results = {}
        for mode, kwargs in MODES.items():
            result = _step(ITCLoss(**kwargs), images[mine], texts[mine], weight)
            # what DDP does with parameter gradients: all-reduce sum, divide by world size
            ddp_grad = result["weight_grad"].clone()
            dist.all_reduce(ddp_grad)
            result["ddp_weight_grad"] = ddp_grad / WORLD_SIZE
            results[mode] = result
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("itc_dist")
    # fork: the children inherit the imported torch (spawn re-imports it: ~5 s per child
    # on 2 busy cores); they set one thread each before any op, as DataLoader workers do
    mp.start_processes(
        _worker,
        args=(_free_port(), str(out_dir)),
        nprocs=WORLD_SIZE,
        join=True,
        start_method="fork",
    )
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single() -> dict[str, torch.Tensor]:
    images, texts, weight = _global_batch()
    return _step(ITCLoss(), images, texts, weight)


@pytest.mark.timeout(120)
def test_itc_global_mode_equals_single_process(two_rank_results, single) -> None:
    for rank, results in enumerate(two_rank_results):
        got = results["global"]
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.testing.assert_close(got["loss"], single["loss"])
        torch.testing.assert_close(got["image_grad"], single["image_grad"][mine])
        torch.testing.assert_close(got["text_grad"], single["text_grad"][mine])
        torch.testing.assert_close(got["scale_grad"], single["scale_grad"])
        torch.testing.assert_close(got["ddp_weight_grad"], single["weight_grad"] / WORLD_SIZE)


@pytest.mark.timeout(120)
def test_itc_local_mode_with_grad_equals_single_process(two_rank_results, single) -> None:
    mean_loss = sum(r["local_with_grad"]["loss"] for r in two_rank_results) / WORLD_SIZE
    torch.testing.assert_close(mean_loss, single["loss"])
    mean_scale_grad = sum(r["local_with_grad"]["scale_grad"] for r in two_rank_results) / WORLD_SIZE
    torch.testing.assert_close(mean_scale_grad, single["scale_grad"])
    for rank, results in enumerate(two_rank_results):
        got = results["local_with_grad"]
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.testing.assert_close(got["image_grad"], WORLD_SIZE * single["image_grad"][mine])
        torch.testing.assert_close(got["text_grad"], WORLD_SIZE * single["text_grad"][mine])
        torch.testing.assert_close(got["ddp_weight_grad"], single["weight_grad"])
