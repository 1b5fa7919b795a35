"""A rank dying mid-prune: the others fail with one line naming it, the checkpoint resumes.

Two ``curvprune run`` processes join a gloo group through the ``env://`` variables (as under
``torchrun``, without the launcher, which would kill the survivor itself). Rank 1 exits hard at
the start of the second pruning step, after rank 0 checkpointed the first; rank 0 then meets a
broken connection in its next collective and must say, in one line, that rank 1 stopped
responding and how to resume. Resuming in one process must give the masks of an uninterrupted
run: the checkpoint holds the model and masks, not the (sharded) estimator state, which every
step rebuilds from fresh gradients on however many ranks resume it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from curvprune.testing.distributed import free_port

CONFIG = """
[model]
name = "digits-mlp"
[data]
name = "digits"
batch_size = 64
[train]
epochs = 0
[prune]
sparsity = 0.8
loss_samples = 64
gradient_chunk = 16
[estimator]
name = "woodfisher"
algorithm = "gram"
block_size = 32
num_grads = 128
[scorer]
name = "obs"
[schedule]
name = "oneshot"
steps = 3
[mask]
name = "global"
[finetune]
epochs = 0
[run]
progress = false
checkpoint_every = 1
"""

#: ``curvprune``, except that rank 1 exits (as if killed) when its second pruning step starts
_DIE_AT_STEP_2 = """
import os, sys
from curvprune.pipeline import steps
from curvprune.cli import main
calls = []
original = steps.StepRunner.step
def step(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2 and os.environ.get("RANK") == "1":
        os._exit(9)
    return original(self, *args, **kwargs)
steps.StepRunner.step = step
sys.exit(main(sys.argv[1:]))
"""


def _rank(rank: int, port: int, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _DIE_AT_STEP_2, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _masks(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "masks.safetensors")


def test_a_rank_dying_mid_prune_is_named_and_the_run_resumes_on_one_rank(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    reference = subprocess.run(
        [sys.executable, "-c", _DIE_AT_STEP_2, "run", str(config), "--out", str(out), "--name",
         "ref", "--quiet"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert reference.returncode == 0, reference.stderr[-2000:]

    port = free_port()
    ranks = [_rank(r, port, "run", str(config), "--out", str(out), "--name", "cut", "--quiet")
             for r in (0, 1)]
    outputs = [p.communicate(timeout=240) for p in ranks]
    assert ranks[1].returncode == 9
    assert ranks[0].returncode != 0
    errors = [line for line in outputs[0][1].splitlines() if line.startswith("curvprune run")]
    assert len(errors) == 1, outputs[0][1][-3000:]
    assert errors[0].startswith("curvprune run [rank 0/2]: error: rank 1 stopped responding "
                                "in a collective (Connection reset by peer)"), errors[0]
    partial = out / "cut.partial"
    assert f"curvprune run --resume {partial}" in errors[0]
    assert not (out / "cut").exists()

    resumed = subprocess.run(
        [sys.executable, "-c", _DIE_AT_STEP_2, "run", "--resume", str(partial), "--quiet"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got, ref = _masks(out / "cut"), _masks(out / "ref")
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
