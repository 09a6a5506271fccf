"""Shared helpers: seeding, logging, timing."""
import os
import random
import time

import numpy as np
import torch

SEED = 1234


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


class TrainLog:
    """Writes the loss curve to models/logs/<name>.log and echoes it."""

    def __init__(self, path: str):
        self.f = open(path, "w", encoding="utf-8")
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()

    def elapsed(self) -> float:
        return time.time() - self.t0

    def close(self) -> None:
        self.f.close()
