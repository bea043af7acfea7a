"""What this machine computes fast, and the "auto" choices made from it.

`detect` is the one place the library looks at the hardware: the CPU's model name and
instruction-set flags from the cpuinfo text (Linux `/proc/cpuinfo`, or a text/path
given to it) and the GPUs TensorFlow sees. Everything else here is a pure function of
the resulting `MachineFeatures`, so tests feed `detect` fake cpuinfo texts and GPU
capabilities and exercise the real choices:

- `resolve_precision`: `TrainConfig.precision="auto"` -> "mixed_bfloat16" where bfloat16
  runs natively (AVX512-BF16 or AMX-BF16 CPUs, GPUs of compute capability >= 8.0, TPUs),
  except on CPUs for models with depthwise convolutions, else "float32"; an explicit
  "mixed_bfloat16" without native bfloat16 gets a warning.
- `resolve_batch_norm`: `ModelConfig.batch_norm="auto"` -> the implementation of
  `AUTO_BATCH_NORM` for the machine's CPU class.

Reference: docs/SCALING.md, "CPU classes and the auto choices".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

CPUINFO_PATH = "/proc/cpuinfo"

# CPU classes, fastest bfloat16 path first (`MachineFeatures.cpu_class`).
CPU_CLASSES = ("amx_bf16", "avx512_bf16", "avx512", "avx2", "other")

# ModelConfig.batch_norm="auto" per CPU class: the one table to change when a
# measurement says otherwise (docs/SCALING.md, "BatchNorm per CPU class").
AUTO_BATCH_NORM = {
    # Not measured; the same oneDNN kernels as avx512_bf16 plus AMX tiles for matmuls.
    "amx_bf16": "fused",
    # Measured (Zen 4, benchmarks/RESULTS.md): SOKD step +17 % float32, +61 % bfloat16.
    "avx512_bf16": "fused",
    # Not measured; its float32 kernels are those of avx512_bf16.
    "avx512": "fused",
    # Issue #17's Zen 3 (AVX2 only) run: fused vs stock 32.5 vs 30.2 images/s for SOKD,
    # 46.9 vs 47.4 for KD, 68.3 vs 72.5 for vanilla. Mixed; SOKD, the product's step,
    # is faster fused, so fused stays until a quiet side-by-side run says otherwise.
    "avx2": "fused",
    # Not measured (older x86, ARM, other): fused, which is also cuDNN's path on GPUs.
    "other": "fused",
}

# Issue #17's report, restated in the warning (measured there, not here).
BF16_WITHOUT_NATIVE_SUPPORT = (
    "issue #17 reports training steps 5-6x slower than float32 on an AVX2-only AMD Zen 3"
)


@dataclasses.dataclass(frozen=True)
class MachineFeatures:
    """CPU instruction sets and GPUs that decide the fast path.

    Attributes:
      model_name: the CPU's model name ("unknown" when the cpuinfo text has none).
      cpu_family, cpu_model: x86's "cpu family" and "model" numbers (None elsewhere). A
        virtual machine often shows only "AMD EPYC" as the name; these tell the
        generations apart (AMD family 25 = Zen 3 / Zen 4, 26 = Zen 5).
      avx2: AVX2 (with FMA on every CPU that has it).
      avx512f: AVX-512 Foundation.
      avx512_bf16: AVX512-BF16 (bfloat16 dot products: Cooper Lake, Sapphire Rapids,
        AMD Zen 4 and later).
      amx_bf16: AMX-BF16 tiles (Sapphire Rapids and later).
      avx512_vnni: AVX512-VNNI or AVX-VNNI (int8 dot products; what full-integer LiteRT
        kernels use on x86).
      gpu: TensorFlow sees at least one GPU.
      gpu_bf16: every GPU TensorFlow sees has compute capability >= 8.0 (Ampere and
        later: native bfloat16).
    """

    model_name: str = "unknown"
    cpu_family: int | None = None
    cpu_model: int | None = None
    avx2: bool = False
    avx512f: bool = False
    avx512_bf16: bool = False
    amx_bf16: bool = False
    avx512_vnni: bool = False
    gpu: bool = False
    gpu_bf16: bool = False

    @property
    def native_bf16(self) -> bool:
        """Whether the device that trains (a GPU when there is one) computes bfloat16 natively."""
        if self.gpu:
            return self.gpu_bf16
        return self.avx512_bf16 or self.amx_bf16

    @property
    def cpu_class(self) -> str:
        """One of `CPU_CLASSES`: the CPU's fastest bfloat16/float32 path."""
        if self.amx_bf16:
            return "amx_bf16"
        if self.avx512_bf16:
            return "avx512_bf16"
        if self.avx512f:
            return "avx512"
        if self.avx2:
            return "avx2"
        return "other"

    @property
    def cpu_name(self) -> str:
        """The model name with x86's family and model numbers when known:
        "AMD EPYC (family 26, model 2)"."""
        if self.cpu_family is None:
            return self.model_name
        model = "" if self.cpu_model is None else f", model {self.cpu_model}"
        return f"{self.model_name} (family {self.cpu_family}{model})"

    def isa_flags(self) -> dict[str, bool]:
        """The flags as printed by the benchmarks: {"AVX2": True, "AVX-512F": ...}."""
        return {
            "AVX2": self.avx2,
            "AVX-512F": self.avx512f,
            "AVX512-BF16": self.avx512_bf16,
            "AMX-BF16": self.amx_bf16,
            "VNNI": self.avx512_vnni,
        }

    def describe(self, *, with_gpu: bool = True) -> str:
        """One line: model name, ISA flags and (unless `with_gpu=False`) GPUs."""
        flags = ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in self.isa_flags().items())
        if not with_gpu:
            return f"{self.cpu_name}; {flags}"
        gpu = "none" if not self.gpu else ("bf16-native" if self.gpu_bf16 else "no native bf16")
        return f"{self.cpu_name}; {flags}; GPU {gpu}"

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), cpu_class=self.cpu_class, cpu_name=self.cpu_name)


def parse_cpuinfo(text: str) -> MachineFeatures:
    """The CPU part of `MachineFeatures` from a `/proc/cpuinfo` text (first processor).

    x86 kernels list instruction sets on a `flags` line (`avx2`, `avx512f`,
    `avx512_bf16`, `amx_bf16`, `avx512_vnni`, `avx_vnni`); other architectures have a
    `Features` line without any of them, which gives the "other" CPU class.
    """
    model_name, flags, numbers = "unknown", set(), {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model_name == "unknown":
            model_name = " ".join(value.split()) or "unknown"
        elif key in ("cpu family", "model") and key not in numbers and value.strip().isdigit():
            numbers[key] = int(value)
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return MachineFeatures(
        model_name=model_name,
        cpu_family=numbers.get("cpu family"),
        cpu_model=numbers.get("model"),
        avx2="avx2" in flags,
        avx512f="avx512f" in flags,
        avx512_bf16="avx512_bf16" in flags,
        amx_bf16="amx_bf16" in flags,
        avx512_vnni=bool(flags & {"avx512_vnni", "avx_vnni"}),
    )


def _tensorflow_gpu_capabilities() -> list[tuple[int, int]]:
    import tensorflow as tf

    capabilities = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capabilities.append(tuple(details.get("compute_capability") or (0, 0)))
    return capabilities


def detect(
    cpuinfo_path: str = CPUINFO_PATH,
    *,
    cpuinfo_text: str | None = None,
    gpu_compute_capabilities: list[tuple[int, int]] | None = None,
) -> MachineFeatures:
    """Detects the machine's CPU features and GPUs.

    Args:
      cpuinfo_path: the cpuinfo file (Linux's by default); a missing or unreadable file
        gives an "unknown" CPU without any flag (macOS, Windows), so "auto" means float32.
      cpuinfo_text: the cpuinfo text itself (wins over `cpuinfo_path`).
      gpu_compute_capabilities: (major, minor) per GPU; None = ask TensorFlow
        (`tf.config.list_physical_devices("GPU")`), [] = no GPU.

    Returns:
      The machine's `MachineFeatures`.
    """
    if cpuinfo_text is None:
        try:
            with open(cpuinfo_path) as f:
                cpuinfo_text = f.read()
        except OSError:
            cpuinfo_text = ""
    features = parse_cpuinfo(cpuinfo_text)
    if gpu_compute_capabilities is None:
        gpu_compute_capabilities = _tensorflow_gpu_capabilities()
    capabilities = [tuple(c) for c in gpu_compute_capabilities]
    return dataclasses.replace(
        features,
        gpu=bool(capabilities),
        gpu_bf16=bool(capabilities) and all(c >= (8, 0) for c in capabilities),
    )


# oneDNN's names for an ISA cap (`ONEDNN_MAX_CPU_ISA`), lowest first, and the features
# each one leaves visible to oneDNN.
ONEDNN_ISAS = {
    "AVX2": ("avx2",),
    "AVX2_VNNI": ("avx2", "avx512_vnni"),
    "AVX512_CORE": ("avx2", "avx512f"),
    "AVX512_CORE_VNNI": ("avx2", "avx512f", "avx512_vnni"),
    "AVX512_CORE_BF16": ("avx2", "avx512f", "avx512_vnni", "avx512_bf16"),
    "AVX512_CORE_AMX": ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"),
}


def capped(features: MachineFeatures, onednn_isa: str) -> MachineFeatures:
    """`features` as oneDNN sees them under `ONEDNN_MAX_CPU_ISA=onednn_isa`.

    The benchmarks cap oneDNN to emulate an older CPU class on a newer machine; the
    "auto" choices must then be those of the emulated class.

    Raises:
      ValueError: an ISA name not in `ONEDNN_ISAS`.
    """
    if onednn_isa not in ONEDNN_ISAS:
        raise ValueError(f"unknown oneDNN ISA {onednn_isa!r}; choose one of {list(ONEDNN_ISAS)}")
    kept = ONEDNN_ISAS[onednn_isa]
    flags = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")
    return dataclasses.replace(
        features, **{flag: getattr(features, flag) and flag in kept for flag in flags}
    )


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    """A resolved `TrainConfig.precision`.

    Attributes:
      requested: the configured value ("auto" or a Keras policy name).
      policy: the Keras dtype policy to set.
      message: one line for the console ("" = nothing worth saying).
      warning: `message` warns of a slow choice.
    """

    requested: str
    policy: str
    message: str = ""
    warning: bool = False


def _cpu_words(features: MachineFeatures) -> str:
    if features.amx_bf16:
        return f"CPU: {features.cpu_name}, AMX-BF16"
    if features.avx512_bf16:
        return f"CPU: {features.cpu_name}, AVX512-BF16"
    return f"CPU: {features.cpu_name}, no AVX512-BF16"


def _device_words(features: MachineFeatures, strategy: str) -> str:
    if strategy == "tpu":
        return "TPU"
    if features.gpu:
        native = "native bfloat16" if features.gpu_bf16 else "no native bfloat16"
        return f"GPU: {native}"
    return _cpu_words(features)


def resolve_precision(
    requested: str, features: MachineFeatures, *, strategy: str = "default",
    bf16_slow_models: Callable[[], Mapping[str, Sequence[str]]] | None = None,
) -> PrecisionChoice:
    """Resolves `TrainConfig.precision` on a machine.

    "auto" gives "mixed_bfloat16" when the training device computes bfloat16 natively
    (`MachineFeatures.native_bf16`, or a TPU strategy), else "float32": bfloat16 emulated
    in float32 is far slower than float32 itself, and "auto" must never be slower than
    float32. On a CPU it also gives "float32" when a model of the run has layers that
    train slower in bfloat16 there (`bf16_slow_models`, from
    `sokd_tf.models.specs.bf16_slow_layers`: depthwise convolutions). An explicit
    "mixed_bfloat16" without native support is honoured with a warning. Every other value
    is returned as it is.

    Args:
      requested: "auto" or a Keras policy name (`sokd_tf.config.PRECISIONS`).
      features: the machine (`detect()`).
      strategy: `TrainConfig.strategy` ("tpu" trains in bfloat16 natively).
      bf16_slow_models: returns model description (e.g. "student 'mobilenetv2'") -> its
        layer classes that are slow in bfloat16 on CPUs; called only when "auto" would
        otherwise pick bfloat16 on a CPU (finding out may build the models).

    Returns:
      The `PrecisionChoice`.
    """
    native = strategy == "tpu" or features.native_bf16
    device = _device_words(features, strategy)
    if requested == "auto":
        on_cpu = strategy != "tpu" and not features.gpu
        slow = {}
        if native and on_cpu and bf16_slow_models is not None:
            slow = {name: layers for name, layers in bf16_slow_models().items() if layers}
        if slow:
            named = "; ".join(f"{name} has {', '.join(layers)}" for name, layers in slow.items())
            return PrecisionChoice(
                requested, "float32",
                f"precision auto -> float32 ({device}, but {named}: slower in bfloat16 than "
                f"in float32 on CPUs)",
            )
        policy = "mixed_bfloat16" if native else "float32"
        return PrecisionChoice(requested, policy, f"precision auto -> {policy} ({device})")
    if requested == "mixed_bfloat16" and not native:
        message = (
            f"warning: precision mixed_bfloat16 without native bfloat16 ({device}): "
            f"{BF16_WITHOUT_NATIVE_SUPPORT}; use --precision=auto or float32"
        )
        return PrecisionChoice(requested, requested, message, warning=True)
    return PrecisionChoice(requested, requested)


def resolve_batch_norm(requested: str, features: MachineFeatures) -> str:
    """Resolves `ModelConfig.batch_norm`: "auto" -> `AUTO_BATCH_NORM[cpu_class]`.

    With a GPU "auto" is "fused": TensorFlow's fused kernel is cuDNN's there (not
    measured in this project).
    """
    if requested != "auto":
        return requested
    if features.gpu:
        return "fused"
    return AUTO_BATCH_NORM[features.cpu_class]
