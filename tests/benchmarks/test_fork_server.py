"""benchmarks/fork_server.py: each call in a fresh fork of one server; what a call does to its process
(keep state, raise, die, hang, print) comes back as a result or an error, and the next call still works."""
import importlib
import os

from svi_kernels._entry import load

fork_server = importlib.import_module(load("microbench").__package__ + ".fork_server")

_SEEN = []  # what this process has been asked: a fork of the server starts with it empty


def remember(request):
    _SEEN.append(request)
    return {"pid": os.getpid(), "seen": list(_SEEN)}


def test_each_call_runs_in_a_fresh_fork_of_the_server():
    with fork_server.ForkServer(f"{__name__}:remember") as server:
        first, second = server.call("a", 60), server.call("b", 60)
        assert first["seen"] == ["a"] and second["seen"] == ["b"]  # nothing carried over from the first call
        assert len({first["pid"], second["pid"], server.proc.pid, os.getpid()}) == 4


def test_results_and_errors_come_back_one_per_call():
    with fork_server.ForkServer("math:sqrt") as server:
        assert server.call(16.0, 60) == 4.0
        failed = server.call(-1.0, 60)
        assert failed["error"] == "ValueError: math domain error" and "Traceback" in failed["traceback"]
        assert server.call(2.25, 60) == 1.5


def test_a_child_killed_by_a_signal_is_an_error_and_the_server_goes_on():
    with fork_server.ForkServer("signal:raise_signal") as server:
        assert server.call(9, 60) == {"error": "the process ended without a result (signal 9)"}
        assert server.proc.poll() is None


def test_a_child_s_prints_do_not_reach_the_results(capfd):
    with fork_server.ForkServer("builtins:print") as server:
        assert server.call("not a result", 60) is None  # print's return value, then the next call's
        assert server.call("again", 60) is None
    assert "not a result" in capfd.readouterr().err


def test_a_call_past_its_time_is_an_error_and_stops_the_server():
    server = fork_server.ForkServer("time:sleep")
    assert server.call(0.0, 60) is None
    assert "no result within" in server.call(60.0, 0.5)["error"]
    assert server.proc.poll() is not None
    assert "has exited" in server.call(0.0, 60)["error"]
