"""Profiles: the schema refuses what it cannot trust, the shipped profiles carry chips.md's
figures, and HAL_SIM_PROFILES adds and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

import hal
from hal.errors import HalError
from hal_sim.profile import PROFILE_DIR, ProfileError, load_profile

#: The profile names the issue asks for, and one per domestic vendor besides.
REQUIRED = (
    "h100", "h800", "h20", "a100", "b200", "ascend-910b", "ascend-910c", "ascend-950", "mi300x", "mi355x",
    "gaudi3", "mtt-s4000", "kunlunxin-p800",
)
VENDORS = ("hygon-", "biren-", "metax-", "enflame-", "iluvatar-")

SHIPPED = sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))

#: Figures as shared/reference/chips.md gives them (written by hand from its table), with
#: whether chips.md marks them secondary. (profile, dotted key) -> (value, secondary).
CHIPS_MD = {
    ("h100", "memory.capacity_gib"): (80, False),
    ("h100", "memory.bandwidth_gbps"): (3350, False),
    ("h100", "peak_tflops.float8_e4m3fn"): (1979, False),
    ("h100", "peak_tflops.float8_e5m2"): (1979, False),
    ("h100", "peak_tflops.bfloat16"): (989, False),
    ("h100", "interconnect.kind"): ("nvlink", False),
    ("h100", "interconnect.bandwidth_gbps"): (900, False),
    ("h800", "memory.capacity_gib"): (80, True),
    ("h800", "peak_tflops.float8_e4m3fn"): (1979, True),
    ("h800", "peak_tflops.bfloat16"): (989, True),
    ("h800", "interconnect.bandwidth_gbps"): (400, True),
    ("h20", "peak_tflops.float16"): (148, True),
    ("h20", "memory.capacity_gib"): (96, True),
    ("h20", "memory.bandwidth_gbps"): (4000, True),
    ("h20", "interconnect.bandwidth_gbps"): (900, True),
    ("a100", "peak_tflops.bfloat16"): (312, False),
    ("a100", "memory.capacity_gib"): (80, False),
    ("a100", "memory.bandwidth_gbps"): (2000, False),
    ("a100", "interconnect.bandwidth_gbps"): (600, False),
    ("b200", "peak_tflops.float8_e4m3fn"): (4500, False),
    ("b200", "peak_tflops.bfloat16"): (2250, False),
    ("b200", "interconnect.bandwidth_gbps"): (1800, False),
    ("b200", "memory.capacity_gib"): (180, True),  # "180-192 GB", sources differ
    ("ascend-910b", "peak_tflops.float16"): (320, True),
    ("ascend-910b", "memory.capacity_gib"): (64, True),
    ("ascend-910b", "interconnect.kind"): ("hccs", True),
    ("ascend-910c", "peak_tflops.bfloat16"): (780, True),
    ("ascend-910c", "memory.capacity_gib"): (128, True),
    ("ascend-910c", "memory.bandwidth_gbps"): (3200, True),
    ("ascend-910c", "interconnect.bandwidth_gbps"): (784, True),
    ("ascend-950", "peak_tflops.float8_e4m3fn"): (1000, True),
    ("ascend-950", "memory.capacity_gib"): (128, True),
    ("ascend-950", "e8m0_encoding"): ("cann-zero", False),
    ("mi300x", "memory.capacity_gib"): (192, False),
    ("mi300x", "memory.bandwidth_gbps"): (5300, False),
    ("mi300x", "peak_tflops.float8_e4m3fnuz"): (2600, True),
    ("mi300x", "interconnect.bandwidth_gbps"): (896, True),
    ("mi355x", "memory.capacity_gib"): (288, True),
    ("mi355x", "memory.bandwidth_gbps"): (8000, True),
    ("mi355x", "peak_tflops.float8_e4m3fn"): (5000, True),
    ("gaudi3", "peak_tflops.float8_e4m3fn"): (1835, False),
    ("gaudi3", "peak_tflops.bfloat16"): (1835, False),
    ("gaudi3", "memory.capacity_gib"): (128, False),
    ("gaudi3", "memory.bandwidth_gbps"): (3670, False),
    ("gaudi3", "interconnect.kind"): ("roce", False),
    ("gaudi3", "interconnect.links"): (24, False),
    ("mtt-s4000", "peak_tflops.bfloat16"): (100, True),
    ("mtt-s4000", "memory.capacity_gib"): (48, True),
    ("mtt-s4000", "memory.bandwidth_gbps"): (768, True),
    ("mtt-s4000", "interconnect.kind"): ("mtlink", True),
    ("mtt-s4000", "interconnect.bandwidth_gbps"): (240, True),
}

#: FP8 formats each chip computes per chips.md (native), and those it must not compute.
CHIPS_MD_FP8 = {
    "h100": {"float8_e4m3fn", "float8_e5m2"},
    "h800": {"float8_e4m3fn", "float8_e5m2"},
    "h20": {"float8_e4m3fn", "float8_e5m2"},
    "a100": set(),
    "b200": {"float8_e4m3fn", "float8_e5m2"},
    "ascend-910b": set(),
    "ascend-910c": set(),
    "ascend-950": {"float8_e4m3fn", "float8_e5m2"},
    "mi300x": {"float8_e4m3fnuz", "float8_e5m2fnuz"},
    "mi355x": {"float8_e4m3fn", "float8_e5m2"},
    "gaudi3": {"float8_e4m3fn", "float8_e5m2"},
    "mtt-s4000": set(),
    "kunlunxin-p800": set(),
}
FP8 = {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"}


def _write(tmp_path: Path, text: str, name: str = "acme-x1") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


BASE = """\
schema = 1
vendor = "Acme"
model = "X1"
kind = "npu"

[[formats]]
level = "native"
formats = ["float32"]
source = "unverified: test"
"""


class TestShippedProfiles:
    def test_the_required_profiles_ship(self):
        assert set(REQUIRED) <= set(SHIPPED)
        for prefix in VENDORS:
            assert any(name.startswith(prefix) for name in SHIPPED), prefix

    @pytest.mark.parametrize("name", SHIPPED)
    def test_each_loads(self, name):
        profile = load_profile(PROFILE_DIR / f"{name}.toml", shipped=True)
        assert profile.name == name
        assert profile.vendor and profile.model and profile.kind in ("gpu", "npu")
        assert profile.levels()  # every profile declares formats

    @pytest.mark.parametrize("name", SHIPPED)
    def test_only_chips_md_figures_are_verified(self, name):
        """A figure marked verified must come from chips.md and not be secondary there."""
        profile = load_profile(PROFILE_DIR / f"{name}.toml")
        sources = [(g.source, g.verified) for g in profile.formats]
        sources += [(s.source, s.verified) for s in profile.scaled]
        for table in (profile.memory, profile.interconnect, profile.software, profile.peak_tflops):
            sources += [(f.source, f.verified) for f in table.values()]
        if profile.e8m0_encoding:
            sources.append((profile.e8m0_encoding.source, profile.e8m0_encoding.verified))
        for source, verified in sources:
            if verified:
                assert "chips.md" in source and "secondary" not in source, source
            if source.startswith("unverified"):
                assert not verified, source

    @pytest.mark.parametrize(("name", "key"), sorted(CHIPS_MD))
    def test_figures_match_chips_md(self, name, key):
        value, secondary = CHIPS_MD[(name, key)]
        figure = load_profile(PROFILE_DIR / f"{name}.toml").figure(key)
        assert figure is not None, f"{name} lacks {key}, which chips.md gives"
        assert figure.value == value
        assert "chips.md" in figure.source
        if secondary:
            assert not figure.verified

    @pytest.mark.parametrize("name", sorted(CHIPS_MD_FP8))
    def test_fp8_compute_matches_chips_md(self, name):
        levels = load_profile(PROFILE_DIR / f"{name}.toml").levels()
        native = {f.value for f, level in levels.items() if level.value in ("native", "emulated")} & FP8
        assert native == CHIPS_MD_FP8[name]

    def test_launch_overhead_is_declared_and_marked(self):
        for name in SHIPPED:
            figure = load_profile(PROFILE_DIR / f"{name}.toml").figure("software.launch_overhead_us")
            assert figure is not None and figure.value > 0
            assert not figure.verified  # no chip's launch cost is in chips.md


class TestSchemaRefusals:
    def test_a_valid_minimal_profile_loads(self, tmp_path):
        profile = load_profile(_write(tmp_path, BASE))
        assert profile.name == "acme-x1" and profile.memory == {} and profile.e8m0_encoding is None

    def test_a_figure_without_a_source(self, tmp_path):
        path = _write(tmp_path, BASE + "[memory]\ncapacity_gib = {value = 64}\n")
        with pytest.raises(ProfileError, match="has no source") as info:
            load_profile(path)
        assert info.value.key == "memory.capacity_gib"
        assert info.value.path == path
        assert str(path) in str(info.value) and "source =" in str(info.value)
        assert isinstance(info.value, HalError)

    def test_a_bare_figure(self, tmp_path):
        path = _write(tmp_path, BASE + "[memory]\ncapacity_gib = 64\n")
        with pytest.raises(ProfileError, match=r"is the number 64 with no source.*capacity_gib = \{value = 64"):
            load_profile(path)

    def test_a_format_group_without_a_source(self, tmp_path):
        text = BASE.replace('source = "unverified: test"\n', "")
        with pytest.raises(ProfileError, match="formats\\[0\\]: has no source"):
            load_profile(_write(tmp_path, text))

    def test_an_unknown_key(self, tmp_path):
        with pytest.raises(ProfileError, match="memory.capacity_gb: unknown key; use one of capacity_gib") as info:
            load_profile(_write(tmp_path, BASE + '[memory]\ncapacity_gb = {value = 1, source = "x"}\n'))
        assert info.value.key == "memory.capacity_gb"

    def test_a_top_level_key_written_inside_a_table(self, tmp_path):
        text = BASE + 'e8m0_encoding = {value = "ocp", source = "x"}\n'
        with pytest.raises(ProfileError, match="move e8m0_encoding above the first table"):
            load_profile(_write(tmp_path, text))

    @pytest.mark.parametrize(
        ("section", "match"),
        [
            ('[memory]\ncapacity_gib = {value = -1, source = "x"}', "memory.capacity_gib.value: is -1, not positive"),
            ('[memory]\ncapacity_gib = {value = "80 GB", source = "x"}', "not a number"),
            ('[peak_tflops]\nfloat9 = {value = 1, source = "x"}', "'float9' is not a number format"),
            ('[interconnect]\nkind = {value = "warp", source = "x"}', "use one of nvlink"),
            ('[interconnect]\nlinks = {value = 1.5, source = "x"}', "not a positive integer"),
            ('[software]\nopsets = {value = [21, 13], source = "x"}', r"write \[min, max\]"),
            ('[software]\nunsupported_ops = {value = ["ai.onnx:Relu"], source = "x"}', "is not an operator"),
            ('[software]\nmaturity = {value = "stable", source = ""}', "not a non-empty string"),
            ('[memory]\nbandwidth_gbps = {value = 1, source = "x", verified = "yes"}', "write true or false"),
            ('e8m0_encoding = {value = "ieee", source = "x"}', "use one of ocp, cann-zero"),
        ],
    )
    def test_bad_values(self, tmp_path, section, match):
        text = BASE.replace("kind = \"npu\"\n", "kind = \"npu\"\n" + section + "\n") if section.startswith("e8m0") else (
            BASE + section + "\n"
        )
        with pytest.raises(ProfileError, match=match):
            load_profile(_write(tmp_path, text))

    def test_a_format_given_two_levels(self, tmp_path):
        text = BASE + '[[formats]]\nlevel = "storage"\nformats = ["float32"]\nsource = "x"\n'
        with pytest.raises(ProfileError, match="float32 is already in formats\\[0\\]"):
            load_profile(_write(tmp_path, text))

    def test_a_bad_level(self, tmp_path):
        with pytest.raises(ProfileError, match="formats\\[0\\].level: is 'fast'; use one of native"):
            load_profile(_write(tmp_path, BASE.replace('"native"', '"fast"')))

    def test_missing_required_keys_and_schema(self, tmp_path):
        with pytest.raises(ProfileError, match="vendor: missing"):
            load_profile(_write(tmp_path, BASE.replace('vendor = "Acme"\n', "")))
        with pytest.raises(ProfileError, match="schema: is 2; this hal-sim reads schema 1"):
            load_profile(_write(tmp_path, BASE.replace("schema = 1", "schema = 2")))

    def test_bad_toml_and_bad_file_names(self, tmp_path):
        with pytest.raises(ProfileError, match="is not valid TOML"):
            load_profile(_write(tmp_path, BASE + "[memory\n"))
        with pytest.raises(ProfileError, match="is not a profile name"):
            load_profile(_write(tmp_path, BASE, name="Acme X1"))


class TestUserProfiles:
    def test_a_user_profile_adds_a_device(self, sim, profile_dir):
        directory = profile_dir(acme_x1="BASE\n")
        devices = {d.id: d for d in sim(HAL_SIM_DEVICES="acme-x1,h100", HAL_SIM_PROFILES=str(directory))}
        acme = devices["sim:acme-x1:0"]
        assert acme.available and acme.vendor == "Acme"
        assert dict(acme.details)["profile"] == str(directory / "acme-x1.toml")
        assert "profile_overrides" not in dict(acme.details)
        assert devices["sim:h100:0"].available

    def test_a_user_profile_overrides_a_shipped_one_and_says_so(self, sim, profile_dir):
        text = "BASE\n[memory]\ncapacity_gib = {value = 1, source = \"unverified: mine\"}\n"
        other = profile_dir(h100=text)
        empty = other.parent / "empty"
        empty.mkdir()
        # several directories, os.pathsep-separated
        import os

        (device,) = [
            d for d in sim(HAL_SIM_DEVICES="h100", HAL_SIM_PROFILES=f"{empty}{os.pathsep}{other}")
            if d.backend == "sim"
        ]
        assert device.capabilities.memory.capacity_bytes == 2**30
        details = dict(device.details)
        assert details["profile"] == str(other / "h100.toml")
        assert str(PROFILE_DIR / "h100.toml") in details["profile_overrides"]

    def test_a_bad_user_profile_is_an_unavailable_device_and_hides_nothing(self, sim, profile_dir):
        directory = profile_dir(acme_x1="BASE\n[memory]\ncapacity_gib = 64\n")
        devices = {d.id: d for d in sim(HAL_SIM_DEVICES="acme-x1,h100", HAL_SIM_PROFILES=str(directory))}
        bad = devices["sim:acme-x1:0"]
        assert not bad.available
        assert str(directory / "acme-x1.toml") in bad.reason and "memory.capacity_gib" in bad.reason
        assert "source" in bad.reason
        assert devices["sim:h100:0"].available
        with pytest.raises(hal.errors.UnavailableDeviceError, match="capacity_gib"):
            hal.compile(_add_model()).to("sim:acme-x1:0", strict=True)


def _add_model():
    from hal.testing import models

    return models.add()
