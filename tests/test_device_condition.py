"""Health that predicts trouble, read from fixture trees of real boards' /sys and /etc."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.hardware.condition import (
    DeviceCondition,
    NvmlReader,
    WarningTracker,
    read_condition,
    read_only_folders,
    read_throttled,
)
from agent.hardware.detect import detect

FIXTURES = Path(__file__).parent / "fixtures" / "hw"


def condition_of(tree: str, folders: dict[str, str] | None = None) -> DeviceCondition:
    root = FIXTURES / tree
    machine = "aarch64" if "jetson" in tree or "raspberry" in tree else "x86_64"
    return read_condition(detect(root, machine), folders or {}, root=root)


def test_a_throttled_pi_4_warns_about_its_power_supply() -> None:
    """get_throttled 0x50005: under-voltage and throttled now, and both since boot; the
    clock at 600 of 1,500 MHz."""
    condition = condition_of("raspberry-pi-4-throttled")
    assert condition.throttled_now == ("under_voltage", "throttled")
    assert condition.throttled_since_boot == ("under_voltage", "throttled")
    assert (condition.cpu_mhz, condition.cpu_max_mhz) == (600.0, 1500.0)
    codes = [w.code for w in condition.warnings()]
    assert codes == ["under_voltage_now", "throttled_now"]
    document = condition.to_dict()
    assert document["throttled"] == {
        "now": ["under_voltage", "throttled"],
        "since_boot": ["under_voltage", "throttled"],
    }
    assert "storage" not in document  # an SD card reports no wear


def test_a_healthy_pi_5_has_no_warning() -> None:
    """The Pi 5's firmware node (under axi) reads 0: flags reported, none set."""
    condition = condition_of("raspberry-pi-5")
    assert condition.throttled_now == ()
    assert condition.warnings() == []
    assert condition.to_dict()["throttled"] == {"now": [], "since_boot": []}
    assert condition.cpu_mhz == 2400.0


def test_a_jetson_orin_in_a_low_power_mode_with_a_worn_emmc() -> None:
    """nvpmodel mode 1 (7W), the GPU at 306 of 625 MHz; an eMMC at up to 100 % of its
    rated life with pre-EOL 'warning'."""
    condition = condition_of("jetson-orin-nano-jp6-7w")
    assert (condition.power_mode, condition.power_mode_id) == ("7W", 1)
    assert (condition.gpu_mhz, condition.gpu_max_mhz) == (306.0, 624.8)
    assert condition.throttled_now is None  # not a Raspberry Pi
    assert [w.code for w in condition.warnings()] == ["storage_pre_eol", "storage_worn"]
    assert condition.to_dict()["storage"] == {
        "mmcblk0": {"life_used_percent": 100, "pre_eol": "warning"}
    }
    assert condition.to_dict()["power_mode"] == {"name": "7W", "id": 1}


def test_boards_without_these_files_report_nothing_alarming() -> None:
    """An x86 box and a container: no throttling section, no power mode, no warnings."""
    for tree in ("x86-nvidia", "bare-container", "raspberry-pi-4"):
        condition = condition_of(tree)
        assert condition.warnings() == [], tree
        assert "power_mode" not in condition.to_dict()


def test_free_space_of_the_folders(tmp_path: Path) -> None:
    """Free space per folder (a folder not created yet counts its nearest ancestor)."""
    condition = condition_of("bare-container", {"state_dir": str(tmp_path / "not" / "yet")})
    free = condition.free_mb["state_dir"]
    assert free is not None
    assert free > 0


@pytest.mark.parametrize(
    ("text", "now", "since"),
    [
        ("0", (), ()),
        ("0x80008", ("soft_temperature_limit",), ("soft_temperature_limit",)),
        ("20000", (), ("frequency_capped",)),
    ],
)
def test_throttled_bits(
    tmp_path: Path, text: str, now: tuple[str, ...], since: tuple[str, ...]
) -> None:
    """The bits as vcgencmd documents them, with or without 0x; garbage means unknown."""
    node = tmp_path / "sys/devices/platform/soc/soc:firmware/get_throttled"
    node.parent.mkdir(parents=True)
    node.write_text(text + "\n")
    assert read_throttled(tmp_path) == (now, since)
    node.write_text("not hex\n")
    assert read_throttled(tmp_path) == (None, ())


def test_nvml_missing_is_no_figure() -> None:
    """Without nvidia-ml-py or a driver, NVML gives no figure and is not asked again."""
    reader = NvmlReader()
    first = reader.read()
    if first is not None:  # a machine with an NVIDIA GPU and NVML: real figures
        assert first.memory_total_mb > 0
        return
    assert reader.read() is None


def test_a_warning_is_news_once_and_its_clearing_too() -> None:
    """The tracker reports a warning when it turns on, not on every reading, and its code
    when it clears (what the daemon logs as device_warning / device_warning_cleared)."""
    tracker = WarningTracker()
    throttled = condition_of("raspberry-pi-4-throttled").warnings()
    new, cleared = tracker.update(throttled)
    assert [w.code for w in new] == ["under_voltage_now", "throttled_now"]
    assert cleared == []
    assert tracker.update(throttled) == ([], [])
    assert tracker.update([]) == ([], ["throttled_now", "under_voltage_now"])


def test_read_only_folders_from_the_mount_table(tmp_path: Path) -> None:
    """A folder is read-only when the mount it is on (the longest mount point above it, the
    last one mounted there) says ``ro``, or ``emergency_ro`` (ext4 after an error, which
    statvfs still reports writable); octal escapes in mount points are undone."""
    spaced = tmp_path / "with space"
    (spaced / "state").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "sd").mkdir()
    escaped = str(spaced).replace(" ", "\\040")
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "\n".join(
            [
                "/dev/root / ext4 rw,relatime 0 0",
                f"tmpfs {escaped} tmpfs ro,relatime 0 0",
                f"/dev/loop0 {tmp_path}/sd ext4 ro,relatime 0 0",
                f"/dev/loop1 {tmp_path}/sd ext4 rw,relatime 0 0",
                f"/dev/loop2 {tmp_path}/models ext4 rw,errors=remount-ro,emergency_ro 0 0",
                "",
            ]
        )
    )
    folders = {
        "state_dir": str(spaced / "state" / "not-yet"),
        "models_dir": str(tmp_path / "models"),
        "other": str(tmp_path / "sd"),
    }
    assert read_only_folders(folders, str(mounts)) == ("state_dir", "models_dir")
    condition = DeviceCondition(free_mb={"state_dir": 500.0}, read_only=("state_dir",))
    assert condition.warnings()[0].code == "state_dir_read_only"
    assert condition.to_dict()["read_only"] == ["state_dir"]
    assert read_only_folders(folders, str(tmp_path / "no-such-table")) == ()
