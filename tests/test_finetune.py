"""The shipped adapters: each file matches its recorded sha256 and recipe, and the merge
is bit-exact whatever order the rank sum is added in (why the merged weights' digest is
the same on every machine). Merging the real adapters into SmolLM2 and checking the
shipped digest is in test_real_model.py."""

from __future__ import annotations

import torch

from cachesvc_lab import finetune


def test_every_recipe_has_a_shipped_adapter_that_matches():
    for name in finetune.RECIPES:
        recipe, meta = finetune.shipped(name)
        assert recipe == finetune.RECIPES[name] and len(meta["weights_digest"]) == 32


def test_the_merge_does_not_depend_on_summation_order():
    gen = torch.Generator().manual_seed(0)
    rank, rows, cols = 16, 96, 80
    a = (torch.randn(rank, cols, generator=gen) * 0.05).to(torch.bfloat16)
    b = (torch.randn(rows, rank, generator=gen) * 1e-3).to(torch.bfloat16)
    weight = torch.randn(rows, cols, generator=gen)
    by_matmul = (weight.double() + (b.double() @ a.double()) * 2.0).float()
    backwards = torch.zeros(rows, cols, dtype=torch.float64)
    for r in reversed(range(rank)):                  # another order, no BLAS
        backwards += b.double()[:, r:r + 1] * a.double()[r:r + 1, :]
    by_loop = (weight.double() + backwards * 2.0).float()
    assert torch.equal(by_matmul, by_loop)
    # the same in fp32 is not order-independent: that is why the merge runs in float64
    assert not torch.equal((b.float() @ a.float()), sum(b.float()[:, r:r + 1] * a.float()[r:r + 1, :]
                                                        for r in reversed(range(rank))))


def test_seeded_task_data_is_the_same_in_every_process():
    """Training, profiling and demo data come from seeded generators; a set of names once
    made them depend on PYTHONHASHSEED (so on the process)."""
    import os
    import subprocess
    import sys
    code = ("from cachesvc_lab import tasks; import hashlib; "
            "print(hashlib.sha256(repr(tasks.dataset('train', 8, 25, 0)).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(digests) == 1
