"""The process-group backend is chosen identically on every rank (a mismatch hangs the rendezvous)."""

from rsq.distributed import choose_backend


def test_ranks_sharing_one_gpu_all_use_gloo():
    # two ranks on one GPU: NCCL refuses a duplicate device, so every rank must pick gloo; the old
    # rule (nccl when device_count > local_rank) gave rank 0 nccl and rank 1 gloo, and hung
    assert {choose_backend("cuda", local_world=2, gpus=1) for _ in range(2)} == {"gloo"}


def test_one_gpu_per_rank_uses_nccl_and_cpu_uses_gloo():
    assert choose_backend("cuda", local_world=2, gpus=2) == "nccl"
    assert choose_backend("cuda", local_world=4, gpus=8) == "nccl"
    assert choose_backend("cpu", local_world=2, gpus=0) == "gloo"
    assert choose_backend("cuda", local_world=2, gpus=1, override="nccl") == "nccl"
