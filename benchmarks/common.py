"""Device and sync shared by the benchmark files."""
import torch

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")


def sync():
    """Wait for queued device work so a timed call includes it."""
    if GPU:
        torch.cuda.synchronize()
