"""Child processes of the bench commands (gpu-check's test slices and benchmark, the sanitizer runs), each
in its own process group so that it is killed with everything it started, and killed too when the command
that started it dies, however it dies."""
import os
import signal
import subprocess


def cores():
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (a container's, not the host's)
    except AttributeError:
        return os.cpu_count() or 1


def kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


def _prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()  # resolved here, in the parent: the child between fork and exec only calls it


def die_with_parent():
    """In the child before exec (Linux): SIGKILL when the process that started it dies, however it dies."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def start(command, **popen):
    """subprocess.Popen in a new process group that dies with this process."""
    return subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent, **popen)


def run_capped(command, timeout, capture=False, **popen):
    """Run `command` for at most `timeout` seconds; then (or when it ends) kill its whole group. Returns
    (its exit code, or None at the cap; its stdout and stderr together if `capture`, else None)."""
    if capture:
        popen.update(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process = start(command, **popen)
    try:
        output, _ = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        kill_group(process)
        output, _ = process.communicate()  # what it printed before the cap
        code = None
    finally:
        kill_group(process)  # also after a normal exit: nothing it started outlives it
    return code, output
