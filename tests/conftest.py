import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# Small test models gain nothing from threads, and OpenMP spinning on a shared machine
# slows two-thread runs by orders of magnitude when the other core is busy.
torch.set_num_threads(1)
