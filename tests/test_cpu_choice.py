"""The machine's "auto" choices: CPU detection from cpuinfo texts, precision and BatchNorm.

Detection is mocked at its boundary only (fake cpuinfo texts and GPU capabilities are
handed to `cpu.detect`); the choices and `setup_runtime` run for real.
"""

import keras
import pytest

from sokd_tf import config as config_lib
from sokd_tf import models
from sokd_tf.errors import ConfigError
from sokd_tf.models.fused_batch_norm import FusedBatchNormalization
from sokd_tf.runtime import cpu
from sokd_tf.runtime import strategy as strategy_lib
from sokd_tf.stages import fit

_COMMON_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx "
    "fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good "
    "nopl nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid "
    "sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm"
)


def _cpuinfo(model_name: str, extra_flags: str, family: int, model: int,
             processors: int = 2) -> str:
    block = (
        "processor\t: {n}\nvendor_id\t: whatever\n"
        f"cpu family\t: {family}\nmodel\t\t: {model}\n"
        f"model name\t: {model_name}\nstepping\t: 1\ncpu MHz\t\t: 2450.000\n"
        f"flags\t\t: {_COMMON_FLAGS} {extra_flags}\nbogomips\t: 4900.00\n\n"
    )
    return "".join(block.format(n=n) for n in range(processors))


# AVX2/FMA, no AVX-512, no BF16: the machine of issue #17.
ZEN3 = _cpuinfo("AMD EPYC 7B13", "avx2 bmi1 bmi2 sha_ni clzero xsaveopt vaes vpclmulqdq", 25, 1)
# AVX-512 with AVX512-BF16 and VNNI: the machine of benchmarks/RESULTS.md.
ZEN4 = _cpuinfo(
    "AMD EPYC 9B14",
    "avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni "
    "avx512_bitalg avx512_vpopcntdq", 25, 17,
)
# Intel Sapphire Rapids: AVX512-BF16 and the AMX tiles.
SAPPHIRE_RAPIDS = _cpuinfo(
    "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
    "avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni avx_vnni "
    "avx512_fp16 amx_bf16 amx_tile amx_int8", 6, 143,
)
# AVX-512 without BF16 (Skylake-SP).
SKYLAKE = _cpuinfo("Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz", "avx2 avx512f avx512dq avx512bw",
                   6, 85)
# An ARM server: a `Features` line without any x86 instruction set.
GRAVITON = (
    "processor\t: 0\nBogoMIPS\t: 2100.00\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16 i8mm\n"
    "CPU implementer\t: 0x41\n\n"
)


def _machine(text, gpus=()):
    return cpu.detect(cpuinfo_text=text, gpu_compute_capabilities=list(gpus))


@pytest.mark.parametrize(
    "text, model_name, flags, cpu_class",
    [
        (ZEN3, "AMD EPYC 7B13", (True, False, False, False, False), "avx2"),
        (ZEN4, "AMD EPYC 9B14", (True, True, True, False, True), "avx512_bf16"),
        (SAPPHIRE_RAPIDS, "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
         (True, True, True, True, True), "amx_bf16"),
        (SKYLAKE, "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz",
         (True, True, False, False, False), "avx512"),
        (GRAVITON, "unknown", (False, False, False, False, False), "other"),
        ("", "unknown", (False, False, False, False, False), "other"),
    ],
)
def test_detection_from_cpuinfo_texts(text, model_name, flags, cpu_class):
    machine = _machine(text)
    assert machine.model_name == model_name
    assert (machine.avx2, machine.avx512f, machine.avx512_bf16, machine.amx_bf16,
            machine.avx512_vnni) == flags
    assert machine.cpu_class == cpu_class
    assert not machine.gpu and not machine.gpu_bf16


def test_detection_reads_the_given_path_and_survives_a_missing_one(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN4)
    assert cpu.detect(str(path), gpu_compute_capabilities=[]) == _machine(ZEN4)
    missing = cpu.detect(str(tmp_path / "absent"), gpu_compute_capabilities=[])
    assert missing == cpu.MachineFeatures()
    assert missing.cpu_class == "other"


def test_gpus_decide_bfloat16_when_present():
    ampere = _machine(ZEN3, gpus=[(8, 0)])
    assert ampere.gpu and ampere.gpu_bf16 and ampere.native_bf16
    # A T4 trains, not the CPU: its missing bfloat16 wins over the CPU's AVX512-BF16.
    turing = _machine(ZEN4, gpus=[(7, 5)])
    assert turing.gpu and not turing.gpu_bf16 and not turing.native_bf16
    mixed = _machine(ZEN4, gpus=[(8, 6), (7, 0)])
    assert not mixed.gpu_bf16


def test_describe_names_the_model_and_every_flag():
    line = _machine(ZEN3).describe()
    assert line == (
        "AMD EPYC 7B13 (family 25, model 1); AVX2 yes, AVX-512F no, AVX512-BF16 no, AMX-BF16 no, "
        "VNNI no; GPU none"
    )
    # The family and model tell generations apart where a VM shows only "AMD EPYC".
    zen5 = _machine(ZEN4.replace("AMD EPYC 9B14", "AMD EPYC").replace("family\t: 25", "family\t: 26")
                    .replace("model\t\t: 17", "model\t\t: 2"))
    assert (zen5.model_name, zen5.cpu_family, zen5.cpu_model) == ("AMD EPYC", 26, 2)
    assert zen5.cpu_name == "AMD EPYC (family 26, model 2)"
    assert zen5.to_dict()["cpu_name"] == "AMD EPYC (family 26, model 2)"
    graviton = _machine(GRAVITON)
    assert graviton.cpu_family is None and graviton.cpu_name == graviton.model_name
    assert _machine(ZEN4).to_dict()["cpu_class"] == "avx512_bf16"


@pytest.mark.parametrize(
    "text, gpus, strategy, policy, message",
    [
        (ZEN3, (), "default", "float32",
         "precision auto -> float32 (CPU: AMD EPYC 7B13 (family 25, model 1), no AVX512-BF16)"),
        (SKYLAKE, (), "default", "float32",
         "precision auto -> float32 (CPU: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz (family 6, model 85), no AVX512-BF16)"),
        (GRAVITON, (), "default", "float32",
         "precision auto -> float32 (CPU: unknown, no AVX512-BF16)"),
        (ZEN4, (), "default", "mixed_bfloat16",
         "precision auto -> mixed_bfloat16 (CPU: AMD EPYC 9B14 (family 25, model 17), AVX512-BF16)"),
        (SAPPHIRE_RAPIDS, (), "default", "mixed_bfloat16",
         "precision auto -> mixed_bfloat16 (CPU: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (family 6, model 143), AMX-BF16)"),
        (ZEN3, ((8, 0),), "mirrored", "mixed_bfloat16",
         "precision auto -> mixed_bfloat16 (GPU: native bfloat16)"),
        (ZEN4, ((7, 5),), "default", "float32",
         "precision auto -> float32 (GPU: no native bfloat16)"),
        (ZEN3, (), "tpu", "mixed_bfloat16", "precision auto -> mixed_bfloat16 (TPU)"),
    ],
)
def test_auto_precision(text, gpus, strategy, policy, message):
    choice = cpu.resolve_precision("auto", _machine(text, gpus), strategy=strategy)
    assert (choice.requested, choice.policy, choice.message, choice.warning) == (
        "auto", policy, message, False)


def test_explicit_bfloat16_without_native_support_warns_with_the_reported_slowdown():
    choice = cpu.resolve_precision("mixed_bfloat16", _machine(ZEN3))
    assert choice.policy == "mixed_bfloat16" and choice.warning
    assert choice.message == (
        "warning: precision mixed_bfloat16 without native bfloat16 (CPU: AMD EPYC 7B13 (family 25, model 1), "
        "no AVX512-BF16): issue #17 reports training steps 5-6x slower than float32 on an "
        "AVX2-only AMD Zen 3; use --precision=auto or float32"
    )
    assert "\n" not in choice.message
    for machine in (_machine(ZEN4), _machine(SAPPHIRE_RAPIDS), _machine(ZEN3, [(9, 0)])):
        quiet = cpu.resolve_precision("mixed_bfloat16", machine)
        assert (quiet.policy, quiet.message, quiet.warning) == ("mixed_bfloat16", "", False)
    for requested in ("float32", "mixed_float16"):
        kept = cpu.resolve_precision(requested, _machine(ZEN3))
        assert (kept.policy, kept.message, kept.warning) == (requested, "", False)


def test_capping_onednn_emulates_the_lower_cpu_class():
    zen4 = _machine(ZEN4)
    as_avx2 = cpu.capped(zen4, "AVX2")
    assert as_avx2.cpu_class == "avx2" and as_avx2.model_name == zen4.model_name
    assert cpu.resolve_precision("auto", as_avx2).policy == "float32"
    assert cpu.capped(_machine(SAPPHIRE_RAPIDS), "AVX512_CORE_BF16").cpu_class == "avx512_bf16"
    assert cpu.capped(zen4, "AVX512_CORE").cpu_class == "avx512"
    # A cap never adds what the CPU lacks.
    assert cpu.capped(_machine(ZEN3), "AVX512_CORE_AMX") == _machine(ZEN3)
    with pytest.raises(ValueError, match="AVX3"):
        cpu.capped(zen4, "AVX3")


def test_auto_batch_norm_is_fused_on_every_cpu_class_today_and_explicit_wins():
    assert set(cpu.AUTO_BATCH_NORM) == set(cpu.CPU_CLASSES)
    for text in (ZEN3, ZEN4, SAPPHIRE_RAPIDS, SKYLAKE, GRAVITON):
        assert cpu.resolve_batch_norm("auto", _machine(text)) == "fused"
        assert cpu.resolve_batch_norm("stock", _machine(text)) == "stock"
    assert cpu.resolve_batch_norm("auto", _machine(ZEN3, [(8, 0)])) == "fused"


def test_a_flipped_auto_table_reaches_the_builders(monkeypatch):
    """One table entry decides "auto" for a CPU class, and the builders follow it."""
    monkeypatch.setitem(cpu.AUTO_BATCH_NORM, "avx2", "stock")
    kind = cpu.resolve_batch_norm("auto", _machine(ZEN3))
    assert kind == "stock"
    assert cpu.resolve_batch_norm("auto", _machine(ZEN4)) == "fused"
    model = models.build("wrn_10_1", (8, 8, 1), 3, batch_norm=kind)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 7
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in norms)


def _config(precision, batch_norm="auto"):
    return config_lib.resolve(None, {
        "train.precision": precision, "model.batch_norm": batch_norm,
        "data.deterministic": False,
    })


@pytest.fixture
def fresh_console():
    fit.print_once.cache_clear()
    yield
    fit.print_once.cache_clear()
    strategy_lib.set_precision("float32")


def test_setup_runtime_resolves_sets_and_prints_once(fresh_console, capsys):
    machine = _machine(ZEN4)
    for _ in range(2):  # a run's teacher and distillation stages
        strategy, choices = fit.setup_runtime(_config("auto"), machine=machine)
    assert keras.config.dtype_policy().name == "mixed_bfloat16"
    assert choices == fit.RuntimeChoices("mixed_bfloat16", "fused", machine)
    record = choices.record()
    assert (record["precision_used"], record["batch_norm_used"]) == ("mixed_bfloat16", "fused")
    assert record["machine"]["model_name"] == "AMD EPYC 9B14"
    assert strategy is not None
    out, err = capsys.readouterr()
    assert out.splitlines() == ["precision auto -> mixed_bfloat16 (CPU: AMD EPYC 9B14 (family 25, model 17), AVX512-BF16)"]
    assert err == ""

    _, choices = fit.setup_runtime(_config("auto", "stock"), machine=_machine(ZEN3))
    assert keras.config.dtype_policy().name == "float32"
    assert (choices.precision, choices.batch_norm) == ("float32", "stock")
    assert capsys.readouterr().out.strip() == (
        "precision auto -> float32 (CPU: AMD EPYC 7B13 (family 25, model 1), no AVX512-BF16)")


def test_setup_runtime_warns_on_stderr_for_emulated_bfloat16(fresh_console, capsys):
    _, choices = fit.setup_runtime(_config("mixed_bfloat16"), machine=_machine(ZEN3))
    assert choices.precision == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "mixed_bfloat16"
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and "5-6x slower than float32" in err
    fit.setup_runtime(_config("float32"), machine=_machine(ZEN3))
    assert capsys.readouterr() == ("", "")


def test_auto_is_the_default_and_must_be_resolved_before_it_is_set():
    assert config_lib.TrainConfig().precision == "auto"
    assert config_lib.ModelConfig().batch_norm == "auto"
    with pytest.raises(ConfigError, match="auto.*resolve_precision"):
        strategy_lib.set_precision("auto")
    with pytest.raises(ConfigError, match="resolve_batch_norm"):
        models.build("wrn_10_1", (8, 8, 1), 3, batch_norm="auto")


def test_depthwise_models_keep_auto_in_float32_on_bf16_cpus_only():
    def slow():
        return {"student 'mobilenetv2'": ("DepthwiseConv2D",)}

    choice = cpu.resolve_precision("auto", _machine(ZEN4), bf16_slow_models=slow)
    assert (choice.policy, choice.message) == ("float32", (
        "precision auto -> float32 (CPU: AMD EPYC 9B14 (family 25, model 17), AVX512-BF16, but student "
        "'mobilenetv2' has DepthwiseConv2D: slower in bfloat16 than in float32 on CPUs)"))
    # A GPU or TPU trains them in bfloat16; no slow layers, or an explicit choice, as before.
    assert cpu.resolve_precision("auto", _machine(ZEN4, [(8, 0)]), bf16_slow_models=slow).policy == "mixed_bfloat16"
    assert cpu.resolve_precision("auto", _machine(ZEN3), strategy="tpu", bf16_slow_models=slow).policy == "mixed_bfloat16"
    assert cpu.resolve_precision("auto", _machine(ZEN4), bf16_slow_models=lambda: {"student 'x'": ()}).policy == "mixed_bfloat16"
    assert cpu.resolve_precision("mixed_bfloat16", _machine(ZEN4), bf16_slow_models=slow).policy == "mixed_bfloat16"

    def must_not_be_asked():
        raise AssertionError("the models are looked at only where bfloat16 would be chosen")

    for text in (ZEN3, SKYLAKE):  # float32 anyway: no model is built to find out
        assert cpu.resolve_precision("auto", _machine(text), bf16_slow_models=must_not_be_asked).policy == "float32"


def test_bf16_slow_layers_of_zoo_applications_and_files(tmp_path):
    from sokd_tf.models import specs

    assert specs.bf16_slow_layers("mobilenetv2") == ("DepthwiseConv2D",)
    assert specs.bf16_slow_layers("shufflenetv2") == ("DepthwiseConv2D",)
    assert specs.bf16_slow_layers("wrn_16_1") == ()
    assert specs.bf16_slow_layers("resnet8") == ()
    assert specs.bf16_slow_layers("keras.applications.MobileNetV3Small") == ("DepthwiseConv2D",)
    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.SeparableConv2D(4, 3, name="user_sep")(inputs)
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(hidden))
    path = str(tmp_path / "user.keras")
    keras.Model(inputs, outputs).save(path)
    assert specs.bf16_slow_layers(path) == ("SeparableConv2D",)
    assert specs.bf16_slow_layers(str(tmp_path / "missing.keras")) == ()


def test_setup_runtime_keeps_a_mobilenet_student_in_float32_on_a_bf16_cpu(fresh_console, capsys):
    config = config_lib.resolve(None, {
        "train.precision": "auto", "model.student": "mobilenetv2", "model.teacher": "resnet8",
        "data.deterministic": False,
    })
    _, choices = fit.setup_runtime(config, machine=_machine(ZEN4))
    assert choices.precision == "float32" and keras.config.dtype_policy().name == "float32"
    assert "student 'mobilenetv2' has DepthwiseConv2D" in capsys.readouterr().out
