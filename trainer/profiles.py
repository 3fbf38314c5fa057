"""Hardware profiles (hardware_profiles/*.toml) and training presets (presets/*.toml), and their merge. Torch-free.

A profile describes one GPU: its usable memory, a system-RAM hint, bf16 and fp8 support, and the preset it
suggests per flavour. A preset is a partial job spec for one flavour and VRAM tier, with a `[preset]` table of
metadata (label, description, tier, the profile it was sized on) that is not part of the spec.

One merge order (DESIGN.md): defaults < hardware profile < preset < the user's edits. The profile contributes
`lowvram.vram_gib` (the memory `auto` plans for) and its optional `[defaults]` table.

    >>> from trainer.profiles import apply_layers, get_preset, get_profile
    >>> job = apply_layers({"model": {"source": "..."}}, get_profile("rtx-3060ti-8gb"),
    ...                    get_preset("flux2-klein-base-9b-8gb"), {"lora": {"rank": 32}})
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.spec import JobSpec, SpecError, deep_merge

ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = ROOT / "hardware_profiles"
PRESETS_DIR = ROOT / "presets"
# A GPU whose name matches a profile is that profile only if its memory is within this share of the profile's
# (the RTX 3060 exists with 8 and 12 GB).
VRAM_MATCH_SHARE = 0.10
# An unknown GPU gets its own profile: a desktop and the driver keep about this share of the memory.
UNKNOWN_USABLE_SHARE = 0.95


class ProfileError(SpecError):
    """A profile or preset file that cannot be read, or a name that names none; says which file and why."""


@dataclass(frozen=True)
class Profile:
    name: str  # the file's stem, e.g. "rtx-3060ti-8gb"
    label: str
    vram_gib: float  # usable memory, what the estimator judges against; 0: no GPU
    total_vram_gib: float  # the card's memory as nvidia-smi reports it, for detection
    ram_gib_hint: float  # system RAM the suggested presets need, first run included
    bf16: bool
    fp8: bool  # fp8 tensor cores (Ada, Hopper, Blackwell); fp8 *storage* with bf16 compute works on any GPU
    match: tuple[str, ...] = ()  # substrings of the NVML device name, case-insensitive
    presets: dict[str, dict[str, str]] = field(default_factory=dict)  # family -> flavour -> preset name
    defaults: dict[str, Any] = field(default_factory=dict)  # a partial spec merged with the profile
    path: Path | None = None

    def layer(self) -> dict[str, Any]:
        """What the profile adds to a job: its [defaults] and, with a GPU, the memory `auto` plans for."""
        gpu = {"lowvram": {"vram_gib": self.vram_gib}} if self.vram_gib > 0 else {}
        return deep_merge(self.defaults, gpu)

    def preset_for(self, family: str, flavour: str) -> str | None:
        return self.presets.get(family, {}).get(flavour)


@dataclass(frozen=True)
class Preset:
    name: str  # the file's stem, e.g. "flux2-klein-base-9b-8gb"
    label: str
    description: str
    tier_gib: int  # the VRAM class it is sized for: 8, 12, 16, 24, 48, 80
    profile: str  # the smallest profile of the tier: the tests estimate the preset there
    spec: dict[str, Any]  # the partial job spec (every table but [preset])
    path: Path | None = None

    @property
    def family(self) -> str:
        return self.spec.get("model", {}).get("family", "")

    @property
    def flavour(self) -> str:
        return self.spec.get("model", {}).get("flavour", "")


# ------------------------------------------------------------------------------------------ reading files


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError([f"not valid TOML: {exc}"], str(path)) from None
    except OSError as exc:
        raise ProfileError([f"cannot read the file: {exc.strerror}"], str(path)) from None


def _take(table: dict[str, Any], key: str, kind: type | tuple[type, ...], problems: list[str], where: str,
          default: Any = None) -> Any:  # noqa: ANN401 - whatever the file holds, checked against `kind`
    """table[key] if it has the type `kind`; a problem naming `where.key` otherwise."""
    if key not in table:
        if default is None:
            problems.append(f"{where}.{key}: required but missing")
        return default
    value = table[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        problems.append(f"{where}.{key}: expected a number, got {value!r}")
        return default
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        problems.append(f"{where}.{key}: expected {names}, got {value!r}")
        return default
    return value


def _unknown(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> list[str]:
    return [f"{where}{'.' if where else ''}{key}: unknown key; allowed: {', '.join(allowed)}"
            for key in table if key not in allowed]


_PROFILE_KEYS = ("label", "vram_gib", "total_vram_gib", "ram_gib_hint", "bf16", "fp8", "match")


def load_profile(path: str | Path) -> Profile:
    """One hardware profile file; every problem in it is reported at once, naming the file."""
    path = Path(path)
    data = _read_toml(path)
    problems = _unknown(data, ("profile", "presets", "defaults"), "")
    table = data.get("profile")
    if not isinstance(table, dict):
        raise ProfileError(["[profile]: required table missing", *problems], str(path))
    problems += _unknown(table, _PROFILE_KEYS, "profile")
    number = (int, float)
    values = {
        "label": _take(table, "label", str, problems, "profile"),
        "vram_gib": float(_take(table, "vram_gib", number, problems, "profile", 0.0)),
        "total_vram_gib": float(_take(table, "total_vram_gib", number, problems, "profile", 0.0)),
        "ram_gib_hint": float(_take(table, "ram_gib_hint", number, problems, "profile", 0.0)),
        "bf16": _take(table, "bf16", bool, problems, "profile"),
        "fp8": _take(table, "fp8", bool, problems, "profile"),
        "match": tuple(_take(table, "match", list, problems, "profile", [])),
    }
    if values["vram_gib"] < 0 or values["vram_gib"] > max(values["total_vram_gib"], 0.0):
        problems.append(f"profile.vram_gib: {values['vram_gib']} must be between 0 and total_vram_gib "
                        f"({values['total_vram_gib']})")
    presets = data.get("presets", {})
    if not isinstance(presets, dict) or not all(
            isinstance(flavours, dict) and all(isinstance(v, str) for v in flavours.values())
            for flavours in presets.values()):
        problems.append('presets: expected tables of flavour = "preset name" per family, e.g. [presets.flux2]')
        presets = {}
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        problems.append("defaults: expected a table (a partial job spec)")
        defaults = {}
    problems += _unknown(defaults, tuple(JobSpec.model_fields), "defaults")
    if problems:
        raise ProfileError(problems, str(path))
    return Profile(name=path.stem, presets=presets, defaults=defaults, path=path, **values)


def load_preset(path: str | Path) -> Preset:
    """One preset file: a [preset] table of metadata and the partial job spec; problems name the file."""
    path = Path(path)
    data = _read_toml(path)
    meta = data.get("preset")
    if not isinstance(meta, dict):
        raise ProfileError(["[preset]: required table missing (label, description, tier_gib, profile)"], str(path))
    problems = _unknown(meta, ("label", "description", "tier_gib", "profile"), "preset")
    values = {
        "label": _take(meta, "label", str, problems, "preset"),
        "description": _take(meta, "description", str, problems, "preset", ""),
        "tier_gib": _take(meta, "tier_gib", int, problems, "preset"),
        "profile": _take(meta, "profile", str, problems, "preset"),
    }
    spec = {key: value for key, value in data.items() if key != "preset"}
    problems += _unknown(spec, tuple(JobSpec.model_fields), "")
    model = spec.get("model", {})
    if not (isinstance(model, dict) and model.get("family") and model.get("flavour")):
        problems.append("model: a preset names the family and flavour it is for")
    if problems:
        raise ProfileError(problems, str(path))
    return Preset(name=path.stem, spec=spec, path=path, **values)


# ------------------------------------------------------------------------------------------ the API


def list_profiles(directory: str | Path | None = None) -> list[Profile]:
    """Every profile, smallest GPU first (no GPU at the start)."""
    folder = Path(directory) if directory else PROFILES_DIR
    profiles = [load_profile(path) for path in sorted(folder.glob("*.toml"))]
    return sorted(profiles, key=lambda p: (p.vram_gib, p.name))


def get_profile(name: str, directory: str | Path | None = None) -> Profile:
    for profile in list_profiles(directory):
        if profile.name == name:
            return profile
    known = ", ".join(p.name for p in list_profiles(directory))
    raise ProfileError([f"unknown hardware profile '{name}'; known: {known}"])


def list_presets(family: str | None = None, flavour: str | None = None,
                 directory: str | Path | None = None) -> list[Preset]:
    """The presets, optionally of one family and flavour; by family, flavour and tier."""
    folder = Path(directory) if directory else PRESETS_DIR
    presets = [load_preset(path) for path in sorted(folder.glob("*.toml"))]
    chosen = [p for p in presets
              if (family is None or p.family == family) and (flavour is None or p.flavour == flavour)]
    return sorted(chosen, key=lambda p: (p.family, p.flavour, p.tier_gib, p.name))


def get_preset(name: str, directory: str | Path | None = None) -> Preset:
    folder = Path(directory) if directory else PRESETS_DIR
    path = folder / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(folder.glob("*.toml")))
        raise ProfileError([f"unknown preset '{name}'; known: {known}"])
    return load_preset(path)


def find_preset(value: str) -> Preset:
    """A preset by its name in presets/ (the file name without .toml) or by the path of a preset file."""
    path = Path(value).expanduser()
    if path.suffix == ".toml" or path.is_file() or len(path.parts) > 1:
        if not path.is_file():
            raise ProfileError([f"--preset: file '{path}' does not exist; give a preset's name or the path of a "
                                "preset file"])
        return load_preset(path)
    return get_preset(value)


def apply_layers(defaults: dict[str, Any], profile: Profile | str | None = None, preset: Preset | str | None = None,
                 edits: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job as a plain dict: defaults < hardware profile < preset < the user's edits (later layers win, tables
    merge key by key). Validate the result with trainer.spec.parse_spec."""
    layers: list[dict[str, Any]] = []
    if profile is not None:
        layers.append((get_profile(profile) if isinstance(profile, str) else profile).layer())
    if preset is not None:
        layers.append((get_preset(preset) if isinstance(preset, str) else preset).spec)
    return deep_merge(defaults, *layers, edits or {})


def _gib(value: float) -> float:
    return value / 1024**3


def _match(name: str, total_gib: float, profiles: list[Profile]) -> Profile | None:
    """The profile whose longest pattern is in the NVML name and whose memory agrees."""
    lowered = name.lower()
    best: tuple[int, Profile] | None = None
    for profile in profiles:
        if profile.total_vram_gib <= 0 or abs(total_gib - profile.total_vram_gib) > \
                VRAM_MATCH_SHARE * profile.total_vram_gib:
            continue
        for pattern in profile.match:
            if pattern.lower() in lowered and (best is None or len(pattern) > best[0]):
                best = (len(pattern), profile)
    return best[1] if best else None


def detect_profile(nvml: Any = None, directory: str | Path | None = None) -> Profile | None:  # noqa: ANN401
    """The profile of the first NVIDIA GPU (NVML, no torch), None without one. A GPU no profile names gets a
    profile of its own: 95 % of its memory usable, the presets of the largest known profile it can hold.
    `nvml`: the pynvml module (tests pass a stand-in)."""
    if nvml is None:
        try:
            import pynvml as nvml  # nvidia-ml-py
        except ImportError:
            return None
    try:
        nvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVMLError or a missing library: no NVIDIA GPU here
        return None
    try:
        if nvml.nvmlDeviceGetCount() < 1:
            return None
        handle = nvml.nvmlDeviceGetHandleByIndex(0)
        name = nvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        total = _gib(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    except Exception:  # noqa: BLE001 - a driver that answers init but not queries
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110 - shutting down is best effort
            pass
    profiles = [p for p in list_profiles(directory) if p.vram_gib > 0]
    found = _match(name, total, profiles)
    if found is not None:
        return found
    smaller = [p for p in profiles if p.total_vram_gib <= total * (1 + VRAM_MATCH_SHARE)]
    nearest = max(smaller, key=lambda p: p.vram_gib) if smaller else None
    return Profile(name="detected", label=f"{name} ({total:.0f} GB, no profile)",
                   vram_gib=round(total * UNKNOWN_USABLE_SHARE, 1), total_vram_gib=round(total, 1),
                   ram_gib_hint=nearest.ram_gib_hint if nearest else 32.0, bf16=(major, minor) >= (8, 0),
                   fp8=(major, minor) >= (8, 9), presets=nearest.presets if nearest else {})


def gpu_vram_gib(value: str, directory: str | Path | None = None) -> tuple[float | None, str]:
    """`--gpu`: a profile name, "detect", or a number of GiB -> (usable GiB or None for no GPU, what it was)."""
    try:
        return float(value), f"{float(value):g} GiB"
    except ValueError:
        pass
    profile = detect_profile(directory=directory) if value == "detect" else get_profile(value, directory)
    if profile is None:
        return None, "no NVIDIA GPU detected"
    return (profile.vram_gib or None), f"{profile.label} ({profile.name})"
