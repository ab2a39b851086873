"""The resource profiler: known memory and busy time come back within 10 %, exit codes pass through,
no GPU gives nulls, FLARE's GPU figures, and Ctrl-C ends the whole child tree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from noisy_student_nnunet.cli import main
from noisy_student_nnunet.profiling import NvmlReader, flare_gpu_max_mb, open_gpu_reader, profile_command

ALLOC_MB = 200  # per process; the child and its own child each hold this much
BUSY_S = 3.0

CHILD = textwrap.dedent(
    f"""
    import json, os, subprocess, sys, time
    import numpy as np
    import psutil
    report, role = sys.argv[1], sys.argv[2]
    baseline = psutil.Process().memory_info().rss
    if role == "parent":  # a process tree: the parent starts a grandchild doing the same
        grandchild = subprocess.Popen([sys.executable, __file__, report + ".grandchild", "grandchild"])
    block = np.ones({ALLOC_MB} * 2**20 // 8)  # written, so resident
    block[::4096] += 1.0
    deadline = float(os.environ["LAUNCHED_AT"]) + {BUSY_S}
    n = 0
    while time.time() < deadline:  # keep a CPU busy until BUSY_S after launch
        n += 1
    if role == "parent":
        grandchild.wait()
    with open(report, "w") as handle:
        json.dump({{"baseline_rss_mb": baseline / 2**20, "cpu_time_s": time.process_time(), "end": time.time()}},
                  handle)
    """
)


def test_known_memory_and_busy_time_within_10_percent(tmp_path):
    script, report = tmp_path / "child.py", tmp_path / "child.json"
    script.write_text(CHILD)
    launched_at = time.time()
    env = dict(os.environ, LAUNCHED_AT=repr(launched_at))
    result = profile_command([sys.executable, str(script), str(report), "parent"], interval=0.1, gpu=False, env=env)
    assert result.exit_code == 0
    parent = json.loads(report.read_text())
    grandchild = json.loads((tmp_path / "child.json.grandchild").read_text())
    summary = result.summary()

    # busy for BUSY_S after launch, longer only when the machine is so loaded that starting up took longer
    lifetime = parent["end"] - launched_at
    assert lifetime >= BUSY_S
    assert summary["wall_time_s"] == pytest.approx(lifetime, rel=0.10)
    # the whole tree's RSS: both processes' baselines and both blocks
    expected_tree = parent["baseline_rss_mb"] + grandchild["baseline_rss_mb"] + 2 * ALLOC_MB
    assert summary["peak_rss_tree_mb"] == pytest.approx(expected_tree, rel=0.10)
    expected_largest = max(parent["baseline_rss_mb"], grandchild["baseline_rss_mb"]) + ALLOC_MB
    assert summary["peak_rss_largest_process_mb"] == pytest.approx(expected_largest, rel=0.10)
    assert max(result.samples["n_processes"]) == 2
    # the tree's CPU time is the two processes' own (how much they got depends on other load on the
    # machine), and the sampled tree CPU % integrates to it
    own_cpu_s = parent["cpu_time_s"] + grandchild["cpu_time_s"]
    assert summary["tree_cpu_time_s"] == pytest.approx(own_cpu_s, rel=0.10, abs=0.1)
    sampled_cpu_s = sum(result.samples["tree_cpu_percent"]) * 0.1 / 100
    assert sampled_cpu_s == pytest.approx(own_cpu_s, rel=0.25, abs=0.2)
    # FLARE's areas: sum(samples) * interval
    n = summary["n_samples"]
    assert n == pytest.approx(lifetime / 0.1, rel=0.15)
    assert summary["cpu_utilisation_area_percent_s"] == pytest.approx(
        sum(result.samples["cpu_utilisation_percent"]) * 0.1
    )
    assert all(0 <= u <= 100 for u in result.samples["cpu_utilisation_percent"])
    # machine-wide used RAM moves with every other process, so no bound against its baseline holds under
    # foreign load (CI once saw the peak 3 MB below it); it does always contain the tree's own memory
    assert summary["system_ram_used_peak_mb"] == max(result.samples["system_ram_used_mb"])
    assert summary["system_ram_used_peak_mb"] >= summary["peak_rss_tree_mb"]
    assert summary["sampler_cpu_time_s"] < 0.1 * BUSY_S  # the sampler stays light

    plot = tmp_path / "prof.png"
    result.plot(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_exit_code_passes_through_and_json_is_written(tmp_path, capsys):
    out, plot = tmp_path / "prof.json", tmp_path / "prof.png"
    code = main(["profile", "-o", str(out), "--plot", str(plot), "--interval", "0.05",
                 "--", sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(3)"])
    assert code == 3
    data = json.loads(out.read_text())
    assert data["exit_code"] == 3 and data["interrupted"] is None
    assert data["command"][1:] == ["-c", "import sys, time; time.sleep(0.3); sys.exit(3)"]
    assert len(data["samples"]["t"]) == data["n_samples"] >= 3
    assert plot.exists()
    assert "wall time" in capsys.readouterr().err
    # killed by a signal: 128 + N, as a shell reports it
    killed = profile_command([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                             gpu=False)
    assert killed.exit_code == 128 + signal.SIGKILL
    # a command that does not exist is a one-line error
    assert main(["profile", "--", str(tmp_path / "no-such-program")]) == 2
    assert "command not found" in capsys.readouterr().err
    assert main(["profile"]) == 2


def test_no_gpu_gives_null_not_zero(tmp_path):
    out = tmp_path / "prof.json"
    assert main(["profile", "--no-gpu", "-o", str(out), "--", sys.executable, "-c", "pass"]) == 0
    data = json.loads(out.read_text())
    for key in ("gpu_memory_peak_mb", "gpu_memory_flare_max_mb", "gpu_memory_flare_tolerated_mb",
                "gpu_memory_area_mb_s", "gpu_memory_area_tolerated_mb_s", "gpu_tree_memory_peak_mb", "gpu_backend"):
        assert key in data and data[key] is None, key
    assert data["samples"]["gpu_device_used_mb"] is None
    if open_gpu_reader() is None:  # this machine has no GPU: the default detection gives nulls too
        auto = profile_command([sys.executable, "-c", "pass"]).to_dict()
        assert auto["gpu_memory_peak_mb"] is None and auto["gpu_backend"] is None


def test_gpu_memory_comes_from_nvidia_ml_py():
    """NVML is read through nvidia-ml-py (a dependency, importable everywhere); without an NVIDIA driver or device
    there is no reader (no GPU numbers) and no crash; with one, the device's memory reads back."""
    import pynvml

    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        has_nvml = True
    except pynvml.NVMLError:
        has_nvml = False
    reader = open_gpu_reader()
    if not has_nvml:
        assert reader is None
        with pytest.raises(pynvml.NVMLError):
            NvmlReader(0)
        return
    try:
        assert reader is not None and reader.backend == "pynvml" and reader.name
        assert reader.device_used_mb() >= 0
        per_process = reader.process_used_mb()
        assert per_process is None or all(isinstance(pid, int) for pid in per_process)
    finally:
        reader.close()


class FakeGpu:
    """Stands in for NVML: 3000 MB used on the device, 1000 MB of it by the profiled command."""

    backend, name, index = "fake", "Fake GPU", 0

    def device_used_mb(self) -> float:
        return 3000.0

    def process_used_mb(self) -> dict[int, float]:
        ours = {p.pid: 1000.0 for p in psutil.Process().children()}  # the profiled command
        return {**ours, 999_999_999: 500.0}  # and some other process on the device

    def close(self) -> None:
        pass


def test_flare_gpu_figures():
    result = profile_command([sys.executable, "-c", "import time; time.sleep(0.5)"], interval=0.1, gpu_reader=FakeGpu())
    s = result.summary()
    n = s["n_samples"]
    assert n >= 4
    assert s["gpu_backend"] == "fake"
    assert s["gpu_memory_peak_mb"] == 3000.0 and s["gpu_memory_flare_max_mb"] == 3000.0
    assert s["gpu_memory_flare_tolerated_mb"] == 3000.0 - 2048.0
    assert s["gpu_memory_area_mb_s"] == pytest.approx(3000.0 * n * 0.1)
    assert s["gpu_memory_area_tolerated_mb_s"] == pytest.approx(952.0 * n * 0.1)
    assert s["gpu_tree_memory_peak_mb"] == 1000.0  # the other process's 500 MB is not ours
    # FLARE's maximum ignores values seen in at most 2 % of the samples (spikes)
    assert flare_gpu_max_mb([100.0] * 99 + [5000.0]) == 100.0
    assert flare_gpu_max_mb([100.0] * 90 + [300.0] * 10) == 300.0
    assert flare_gpu_max_mb([1.0, 2.0, 3.0]) == 3.0


TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(sys.argv[1], "w") as handle:
        handle.write(str(grandchild.pid))
    time.sleep(60)
    """
)


def test_ctrl_c_ends_the_whole_child_tree(tmp_path):
    script, pid_file, out = tmp_path / "tree.py", tmp_path / "pid", tmp_path / "prof.json"
    script.write_text(TREE)
    profiler = subprocess.Popen(
        [sys.executable, "-c", "import sys; from noisy_student_nnunet.cli import main; sys.exit(main())",
         "profile", "-o", str(out), "--no-gpu", "--", sys.executable, str(script), str(pid_file)],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            assert profiler.poll() is None, profiler.stderr.read().decode()
            time.sleep(0.05)
        grandchild = psutil.Process(int(pid_file.read_text()))
        profiler.send_signal(signal.SIGINT)
        assert profiler.wait(timeout=10) == 130
    finally:
        if profiler.poll() is None:
            profiler.kill()
    try:
        grandchild.wait(timeout=5)  # reaped by init once killed
    except psutil.TimeoutExpired:
        pytest.fail("the grandchild survived Ctrl-C")
    except psutil.NoSuchProcess:
        pass
    data = json.loads(out.read_text())
    assert data["interrupted"] == "SIGINT"


def test_peak_is_the_childs_own_not_the_forking_parents(tmp_path):
    """The child's peak RSS is its own even when the profiling process is large: ``ru_maxrss`` would report
    the parent's high-water mark, which Linux carries across fork and exec."""
    ballast = np.ones(600 * 2**20 // 8)  # this process: 600 MB resident
    ballast[::4096] += 1.0
    result = profile_command([sys.executable, "-c", "import time; time.sleep(0.5)"], interval=0.05, gpu=False)
    assert result.exit_code == 0
    summary = result.summary()
    assert summary["peak_rss_largest_process_mb"] < 200
    assert summary["peak_rss_tree_mb"] < 200
    del ballast
