"""The memory a run may use and RAM-backed folders, read from a fake /proc and /sys/fs/cgroup (cgroup v1 and v2)."""

from __future__ import annotations

from pathlib import Path

from sftune.host.memory import available_memory_bytes, cgroup_headroom, is_ram_backed

GIB = 2**30


def fake_proc(root: Path, cgroup: str, mem_available_kib: int = 16 * 2**20, mountinfo: str = "") -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    (proc / "meminfo").write_text(f"MemTotal: 24000000 kB\nMemAvailable: {mem_available_kib} kB\n")
    return proc


def fake_cgroup(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_cgroup_v2_limit_on_a_parent_counts_and_inactive_page_cache_is_free(tmp_path):
    proc = fake_proc(tmp_path, "0::/job.slice/step/task\n")
    root = tmp_path / "cgroup"
    fake_cgroup(root / "job.slice", {"memory.max": str(3 * GIB), "memory.current": str(2 * GIB),
                                     "memory.stat": f"anon 1\ninactive_file {GIB // 2}\n"})  # fmt: skip
    fake_cgroup(root / "job.slice" / "step" / "task", {"memory.max": "max", "memory.current": str(GIB)})
    assert cgroup_headroom(proc, root) == 3 * GIB - 2 * GIB + GIB // 2
    assert available_memory_bytes(proc, root) == 3 * GIB - 2 * GIB + GIB // 2  # below MemAvailable's 16 GiB


def test_cgroup_v1_container_sees_its_own_cgroup_at_the_mount_root(tmp_path):
    proc = fake_proc(tmp_path, "4:memory:/docker/abc123\n3:cpu:/docker/abc123\n")
    root = tmp_path / "cgroup"
    v1 = {
        "memory.limit_in_bytes": str(4 * GIB),
        "memory.usage_in_bytes": str(GIB),
        "memory.stat": "total_inactive_file 0\n",
    }
    fake_cgroup(root / "memory", v1)  # no docker/abc123 folder inside the container
    assert cgroup_headroom(proc, root) == 3 * GIB


def test_no_limit_means_mem_available(tmp_path):
    proc = fake_proc(tmp_path, "4:memory:/\n", mem_available_kib=2 * 2**20)
    root = tmp_path / "cgroup"
    fake_cgroup(root / "memory", {"memory.limit_in_bytes": str(2**63 - 4096), "memory.usage_in_bytes": str(GIB)})
    assert cgroup_headroom(proc, root) is None
    assert available_memory_bytes(proc, root) == 2 * GIB
    assert available_memory_bytes(tmp_path / "nothing", root) is None  # not Linux: nothing known


def test_ram_backed_folders_are_found_by_their_longest_mount_point(tmp_path):
    mountinfo = (
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "30 22 0:26 / /dev/shm rw,nosuid shared:2 - tmpfs tmpfs rw\n"
        "31 30 253:2 / /dev/shm/disk rw shared:3 - ext4 /dev/vdb rw\n"
    )
    proc = fake_proc(tmp_path, "0::/\n", mountinfo=mountinfo)
    assert is_ram_backed(Path("/dev/shm/run"), proc)
    assert not is_ram_backed(Path("/dev/shm/disk/run"), proc)
    assert not is_ram_backed(Path("/work/runs"), proc)
