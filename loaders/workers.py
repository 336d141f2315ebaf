"""Setup of DataLoader worker processes: SIGINT and SIGTERM belong to the main process.

A terminal sends SIGINT to every process of the foreground job, and a scheduler preempting a job (Slurm, Kubernetes)
sends SIGTERM to every process of it, DataLoader workers included. A worker that takes either signal dies, and the
main process then fails with "DataLoader worker ... is killed by signal" (torch checks its workers on SIGCHLD) or
"exited unexpectedly" before it can finish the step and save a checkpoint. Workers therefore leave both signals to
the main process: it decides what they mean and shuts its workers down itself (they also exit on their own once
the main process is gone).

SIGINT is ignored. SIGTERM is also how the DataLoader ends a worker that does not exit when asked
(``Process.terminate``), so a worker still dies of a SIGTERM that its main process sends: a thread waits for the
signal (``sigwaitinfo`` names the sender) and lets it take its default course only when the main process sent it.
Where ``sigwaitinfo`` is missing (macOS) SIGTERM is ignored like SIGINT.
"""
import functools
import os
import signal
import threading


def worker_init():
    """The ``worker_init_fn`` of every loader of the project; call it in the main process, whose pid it keeps."""
    return functools.partial(_leave_signals_to, os.getpid())


def _leave_signals_to(main_pid: int, worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, 'sigwaitinfo'):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    # blocked here, before the worker starts any other thread: threads inherit the mask, so every SIGTERM
    # waits for the thread below instead of ending the process
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from, args=(main_pid,), name='sigterm-from-main', daemon=True).start()


def _end_on_sigterm_from(main_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_pid:
        pass  # the job's SIGTERM: the main process saves and then shuts this worker down
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    signal.raise_signal(signal.SIGTERM)  # default action: the worker ends as terminate() expects
