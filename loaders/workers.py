"""Setup of DataLoader worker processes: Ctrl-C belongs to the main process.

A terminal sends SIGINT to every process of the foreground job, DataLoader workers included. A worker that
takes it dies (torch's worker loop swallows the KeyboardInterrupt and exits), and the main process then fails
with "DataLoader worker exited unexpectedly" before it can finish the step and save a checkpoint. Workers
therefore ignore SIGINT: the main process decides what Ctrl-C means and shuts its workers down itself (they
also exit on their own once the main process is gone).
"""
import signal


def ignore_interrupts(worker_id: int) -> None:
    """``worker_init_fn`` for every loader of the project."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
