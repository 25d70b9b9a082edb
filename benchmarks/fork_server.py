"""Run a function in a fresh process per call, without paying the imports each time.

A server process (``python -c``, so independent of the caller's ``__main__``) imports the function's
module once, runs nothing else (no thread, no CUDA context), and forks a child per request: each call
starts from the same clean process, as a fresh interpreter would, with torch already imported. Requests
and results are JSON, one line each; a child's own prints go to stderr so they cannot corrupt them.
"""
from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import traceback
from typing import Optional


def _package_root(module: str) -> Optional[str]:
    """The sys.path entry that makes ``module`` importable (a checkout's root, or site-packages); None for
    a built-in module."""
    top = importlib.import_module(module.split(".")[0])
    where = getattr(top, "__file__", None)
    if where is None:
        return None
    return os.path.dirname(os.path.dirname(os.path.abspath(where))) if os.path.basename(where) == "__init__.py" \
        else os.path.dirname(os.path.abspath(where))


class ForkServer:
    """``ForkServer("pkg.mod:fn").call(request)`` returns ``fn(request)`` computed in a fresh fork, or
    ``{"error": ...}`` when it raised, died or took longer than ``timeout_s`` (the server is then gone)."""

    def __init__(self, target: str, preload: tuple = ()):
        module, _, fn = target.partition(":")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in [_package_root(module), env.get("PYTHONPATH")] if p)
        # this file by its path: importing it through its package could import much more (svi_kernels)
        here = os.path.abspath(__file__)
        code = (f"import importlib.util as u; s = u.spec_from_file_location('fork_server', {here!r}); "
                f"m = u.module_from_spec(s); s.loader.exec_module(m); m._serve({module!r}, {fn!r}, {tuple(preload)!r})")
        # its own session: a timed-out call kills the server and the child it forked, nothing else
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, start_new_session=True)

    def call(self, request: dict, timeout_s: float) -> dict:
        if self.proc.poll() is not None:
            return {"error": f"the fork server has exited (code {self.proc.returncode})"}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self._kill()
            return {"error": f"no result within {timeout_s:.0f} s" if not ready else "the fork server died"}
        return json.loads(line)

    def close(self) -> None:
        """Ends the server (it exits when its input closes, between calls)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self._kill()

    def _kill(self) -> None:
        """The server and the child it forked (its own session) end now."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _run_child(fn, request: dict, out_fd: int) -> None:
    os.dup2(2, 1)  # the child's prints must not reach the server's stdout (the results channel)
    try:
        result = fn(request)
    except BaseException as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    try:
        text = json.dumps(result)
    except (TypeError, ValueError) as exc:
        text = json.dumps({"error": f"the result is not JSON: {exc}"})
    with os.fdopen(out_fd, "w") as fh:
        fh.write(text)


def _serve(module: str, fn_name: str, preload: tuple) -> None:
    fn = getattr(importlib.import_module(module), fn_name)
    for name in preload:
        importlib.import_module(name)
    results = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                _run_child(fn, request, w)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r) as fh:
            text = fh.read()
        _pid, status = os.waitpid(pid, 0)
        if not text:
            how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exit code {os.WEXITSTATUS(status)}")
            text = json.dumps({"error": f"the process ended without a result ({how})"})
        results.write(text + "\n")
        results.flush()
