"""Under pytest-xdist (`-n 2`) each worker and the CLIs it starts compute on one thread: two workers on two
cores, instead of four threads fighting over them."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
