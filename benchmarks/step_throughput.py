"""Images/s of one training step: vanilla, KD, DML and SOKD, against a PyTorch reference.

WRN-40-2 -> WRN-40-1 by default, any teacher -> student pair with `--teacher` /
`--student` (the CLI's model specs: a zoo name such as `resnet32x4`,
`keras.applications.NAME`, or a `.keras` file; `sokd_tf.models.specs`), 32x32x3 random
images, 100 classes. Every configuration
(batch, method, precision, XLA) runs in its own process, so its dtype policy, XLA
state and peak memory are its own. The timed step is exactly what `Model.fit` runs
(`make_train_function()` of the compiled distiller); warm-up steps (tracing,
compilation) are excluded. A timed window is kept only when other processes used at
most `--max_other_load` CPUs meanwhile (read from /proc/stat); otherwise it is retried,
up to 3x `--repeats` windows. (The PyTorch reference applies the same rule and also
keeps a window only when its own CPU use reaches 90 % of its threads.) The PyTorch
reference knows only the WRN-40-2 -> WRN-40-1 pair: for any other pair it is skipped,
and the output says so.

In the same run it measures the machine's practical peak (a large float32 and bfloat16
matmul on the same threads) and runs the PyTorch reference, `benchmarks/torch_reference.py`
(the authors' steps restated in PyTorch; it asserts the authors' parameter counts before
timing), in its own virtual environment (`.bench_venv`, created on first use with
`pip install torch==2.13.0 numpy` unless `--no-install`; torch is never a dependency of
this project), with the same methods and teacher BatchNorm modes.

The header, the report and the JSON name the CPU (model, AVX2, AVX-512F, AVX512-BF16,
AMX-BF16, VNNI flags, class; `sokd_tf.runtime.cpu.detect`) and the ISA oneDNN
dispatches to. `--onednn_max_cpu_isa=AVX2` caps oneDNN in both frameworks' processes
(`ONEDNN_MAX_CPU_ISA`/`DNNL_MAX_CPU_ISA`, set before TensorFlow or torch is imported;
torch's own vectorised kernels and MKL are capped too, `ATEN_CPU_CAPABILITY`,
`MKL_ENABLE_INSTRUCTIONS`): the closest EMULATION of an AVX2-only CPU on an AVX-512 one,
labelled so in every output. Caches, memory bandwidth and TensorFlow's Eigen kernels
stay the host's. The "auto" choices (`--precisions=auto`, `--batch_norm=library`) are then
resolved for the emulated CPU class.

`--onednn_kernels` times nothing: it lists, per configuration, the oneDNN kernels
(primitive, implementation and ISA, data type, calls per step) one training step runs,
from `ONEDNN_VERBOSE=1`; ops TensorFlow runs in Eigen do not appear there.

`--op_profile` shows where each method's step spends its time: TensorFlow's profiler
(framework op stats) and torch.profiler on the PyTorch reference, both summed per op
category (conv forward, backward-data, backward-weights, BN forward/backward, ReLU,
element-wise, optimizer update, other) in ms per step, side by side. Use
`--inter_threads=1` for TensorFlow op times that add up to the step's wall time (with
two inter-op threads two ops can run at once and their times overlap). Under a profiler
both steps run somewhat slower; the shares, not the rates, are the point.

Usage (from the repository root):
  python benchmarks/step_throughput.py --batch=64 [--batch=128] \
      [--teacher=wrn_40_2 --student=wrn_40_1] [--methods=vanilla,kd,dml,sokd] [--precisions=float32,mixed_bfloat16,auto] \
      [--jit=off,on] [--batch_norm=library,fused,stock] [--onednn_max_cpu_isa=AVX2] \
      [--steps=5] [--repeats=5] [--rounds=1] [--markdown=benchmarks/out.md] [--json=out.json]
  python benchmarks/step_throughput.py --op_profile --methods=vanilla,kd,sokd \
      --precisions=float32 --batch_norm=fused --inter_threads=1 [--onednn_max_cpu_isa=AVX2]

FLOPs per image (forward + backward, 2 FLOPs per multiply-add) are counted from the
Keras models (Conv2D, grouped ones included, DepthwiseConv2D and Dense layers): a trained
network costs 3x its forward pass (forward, input gradient, weight gradient), a frozen
one 1x (KD's teacher; SOKD's teacher trunk and head).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TORCH_SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "torch_reference.py")
DEFAULT_BENCH_VENV = os.path.join(REPO_ROOT, ".bench_venv")
METHODS = ("vanilla", "kd", "dml", "sokd")
# Ablation only (not in the default list): SOKD computing the teacher trunk twice.
ABLATIONS = ("sokd_recompute",)
# "auto": the library's choice on this machine (or on the emulated CPU class).
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16", "auto")
# "library": `ModelConfig.batch_norm="auto"` resolved for this machine (what the
# pipelines train with); "fused" / "stock": that implementation, whatever the machine.
BATCH_NORM_CHOICES = ("library", "fused", "stock")
# oneDNN ISA caps (`ONEDNN_MAX_CPU_ISA`) -> torch's ATen capability and MKL's cap.
ISA_CAPS = {
    "AVX2": ("avx2", "AVX2"),
    "AVX2_VNNI": ("avx2", "AVX2"),
    "AVX512_CORE": ("avx512", "AVX512"),
    "AVX512_CORE_VNNI": ("avx512", "AVX512"),
    "AVX512_CORE_BF16": ("avx512", "AVX512"),
}
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 100
# The pair the PyTorch reference (and the issue's figures) describe; the default.
TEACHER, STUDENT = "wrn_40_2", "wrn_40_1"
# The issue's figures (GFLOP per image per training step) for that pair, for comparison.
ISSUE_GFLOP_PER_IMAGE = {"vanilla": 0.50, "kd": 1.15, "sokd": 1.81}


# --- worker side (one configuration per process) ----------------------------------------


def _forward_macs(model) -> int:
    """Multiply-adds of one forward pass of one image through Conv2D/DepthwiseConv2D/Dense
    layers (a grouped Conv2D's kernel holds `channels_in / groups` input channels)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += _forward_macs(layer)
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            # Each output channel reads one input channel through a kh x kw window.
            _, height, width, channels_out = layer.output.shape
            kernel_h, kernel_w = layer.kernel.shape[:2]
            total += height * width * channels_out * kernel_h * kernel_w
        elif isinstance(layer, keras.layers.Conv2D):
            _, height, width, channels_out = layer.output.shape
            kernel_h, kernel_w, channels_in, _ = layer.kernel.shape
            total += height * width * channels_out * kernel_h * kernel_w * channels_in
        elif isinstance(layer, keras.layers.Dense):
            total += layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)


def _build(method: str, teacher_bn_mode: dict[str, str], batch_norm: str,
           teacher_spec: str = TEACHER, student_spec: str = STUDENT):
    """The distiller of `method` for the pair `teacher_spec` -> `student_spec` (model specs,
    built by `sokd_tf.models.specs.build_model`; BN `batch_norm` where the spec has a
    choice) and its training GFLOP per image."""
    from sokd_tf import distillers
    from sokd_tf.models import peer as peer_lib
    from sokd_tf.models import specs

    def build(spec, role, name):
        # DML's peer is built from the teacher's spec, in the teacher's role (as the CLI).
        return specs.build_model(spec, IMAGE_SHAPE, NUM_CLASSES, role=role, name=name,
                                 batch_norm=batch_norm, require_graph=method.startswith("sokd")
                                 and role == "teacher")

    student = build(student_spec, "student", "student")
    student_macs = _forward_macs(student)
    if method == "vanilla":
        trainer = distillers.VanillaTrainer(student)
        macs = 3 * student_macs
    elif method == "kd":
        teacher = build(teacher_spec, "teacher", "teacher")
        trainer = distillers.KnowledgeDistiller(
            teacher, student, teacher_bn_mode=teacher_bn_mode["kd"]
        )
        macs = 3 * student_macs + _forward_macs(teacher)
    elif method == "dml":
        peer = build(teacher_spec, "teacher", "peer")
        trainer = distillers.MutualLearner(peer, student)
        macs = 3 * student_macs + 3 * _forward_macs(peer)
    else:
        teacher = build(teacher_spec, "teacher", "teacher")
        peer = peer_lib.build_peer(teacher)
        distiller_class = (
            _recomputing_sokd_class() if method == "sokd_recompute"
            else distillers.SemiOnlineDistiller
        )
        trainer = distiller_class(
            teacher, peer, student, teacher_bn_mode=teacher_bn_mode["sokd"]
        )
        macs = 3 * student_macs + _forward_macs(teacher) + 3 * _forward_macs(peer)
    return trainer, 2 * macs / 1e9


def _recomputing_sokd_class():
    """SOKD as a naive port would write it: teacher logits and peer features from two
    separate teacher calls, so stem..group2 run twice (what `build_teacher_trunk` avoids).
    FLOPs are still counted for the single pass: the gap is the lever."""
    import keras
    import tensorflow as tf

    from sokd_tf import distillers, losses, models

    class RecomputingSemiOnlineDistiller(distillers.SemiOnlineDistiller):
        def __init__(self, teacher, *args, **kwargs):
            super().__init__(teacher, *args, **kwargs)
            stage = models.penultimate_stage(teacher)
            self.teacher_features = keras.Model(
                teacher.inputs[0], teacher.get_layer(stage).output
            )

        def forward(self, images, labels, training):
            teacher_training = self.teacher_training and training
            teacher_logits = self.teacher(images, training=teacher_training)
            teacher_features = self.teacher_features(images, training=teacher_training)
            peer_logits = self.peer(tf.stop_gradient(teacher_features), training=training)
            student_logits = self.student(images, training=training)
            terms = losses.sokd_loss_terms(
                teacher_logits, peer_logits, student_logits, labels, self.temperature
            )
            return terms, {"peer": peer_logits, "student": student_logits}

    return RecomputingSemiOnlineDistiller


def _machine(args):
    """This machine's features as the library sees them, capped like oneDNN when asked."""
    from sokd_tf.runtime import cpu

    features = cpu.detect()
    if args.onednn_max_cpu_isa:
        features = cpu.capped(features, args.onednn_max_cpu_isa)
    return features


def _machine_busy_s() -> float:
    """CPU-seconds all processes have used so far (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(args) -> dict:
    """Times one configuration; returns its record."""
    import numpy as np
    import tensorflow as tf

    if args.intra_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_threads)
    if args.inter_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_threads)
    import keras

    from sokd_tf import distillers
    from sokd_tf.config import TrainConfig
    from sokd_tf.runtime import cpu
    from sokd_tf.runtime import strategy as strategy_lib

    machine = _machine(args)
    from sokd_tf.models import specs

    slow = functools.partial(specs.bf16_slow_models, student=args.student, teacher=args.teacher)
    precision = cpu.resolve_precision(args.precision, machine, bf16_slow_models=slow).policy
    batch_norm = cpu.resolve_batch_norm(
        "auto" if args.batch_norm == "library" else args.batch_norm, machine
    )
    record = {
        "teacher": args.teacher, "student": args.student,
        "method": args.method, "precision": args.precision, "jit": args.jit,
        "batch": args.batch, "batch_norm": args.batch_norm, "batch_norm_used": batch_norm,
        "precision_used": precision, "cpu_class": machine.cpu_class,
        "onednn_max_cpu_isa": args.onednn_max_cpu_isa or None,
    }
    if args.onednn_max_cpu_isa and precision == "mixed_bfloat16" and not machine.avx512_bf16:
        # TensorFlow sends bfloat16 ops to oneDNN by the host CPU's own flags, and a
        # capped oneDNN cannot create bfloat16 primitives: the step aborts ("could not
        # create a primitive descriptor"). A real AVX2 CPU runs them in Eigen instead.
        return dict(record, skipped="bfloat16 cannot run under a oneDNN cap without "
                    "AVX512-BF16 (TensorFlow routes it to oneDNN by the host's flags)")
    strategy_lib.set_precision(precision)
    keras.utils.set_random_seed(0)
    rss_runtime = _peak_rss_mib()
    trainer, gflop_per_image = _build(
        args.method, {"kd": args.kd_teacher_bn, "sokd": args.sokd_teacher_bn}, batch_norm,
        args.teacher, args.student,
    )
    trainer.compile(
        optimizer=distillers.make_optimizer(TrainConfig(), 391),
        jit_compile=args.jit == "on",
    )
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, *IMAGE_SHAPE)).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, args.batch).astype("int32")
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    trainer.make_train_function()
    train_function = trainer.train_function

    def run(steps):
        for _ in range(steps):
            logs = train_function(iterator)
        # The step's outputs only exist once the step has run: this waits for it.
        if hasattr(logs, "get_value"):
            logs = logs.get_value()
        return float(keras.ops.convert_to_numpy(logs["loss"]))

    start = time.perf_counter()
    run(args.warmup)
    warmup_s = time.perf_counter() - start
    threads = args.intra_threads or os.cpu_count()
    rates, cpu_use, other_load, per_cpu_second, tries = [], [], [], [], 0
    while len(rates) < args.repeats and tries < 3 * args.repeats:
        tries += 1
        busy = _machine_busy_s()
        wall, cpu = time.perf_counter(), time.process_time()
        loss = run(args.steps)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        others = max(0.0, _machine_busy_s() - busy - cpu) / wall
        cpu_use.append(round(cpu / wall, 2))
        other_load.append(round(others, 2))
        per_cpu_second.append(args.batch * args.steps / cpu)
        quiet = others <= args.max_other_load
        if quiet and cpu / wall >= args.min_cpu_use * min(threads, os.cpu_count()):
            rates.append(args.batch * args.steps / wall)
    if args.profile_dir:
        record["op_profile"] = _profile_steps(run, args.steps, args.profile_dir,
                                              trainer.optimizer.name)
    return {
        **record,
        "images_per_s_median": round(statistics.median(rates), 1) if rates else None,
        "images_per_s_min": round(min(rates), 1) if rates else None,
        "images_per_s_max": round(max(rates), 1) if rates else None,
        "cpu_use_per_window": cpu_use,
        "other_processes_cpus_per_window": other_load,
        # Load-insensitive efficiency: images per CPU-second of this process.
        "images_per_cpu_s_median": round(statistics.median(per_cpu_second), 1),
        "contended": len(rates) < args.repeats,
        "gflop_per_image": round(gflop_per_image, 4),
        "warmup_s": round(warmup_s, 1),
        "final_loss_finite": bool(np.isfinite(loss)),
        "rss_after_import_mib": round(rss_runtime),
        "peak_rss_mib": round(_peak_rss_mib()),
        "threads": {"intra": args.intra_threads, "inter": args.inter_threads},
    }


# Op categories of `--op_profile`, in table order; torch_reference.py sorts PyTorch's ops
# into the same ones.
OP_CATEGORIES = ("conv forward", "conv backward-data", "conv backward-weights",
                 "conv backward (both)", "batch norm forward", "batch norm backward", "ReLU",
                 "element-wise", "optimizer update", "other")


_ELEMENT_WISE_OPS = ("addv2", "addn", "add", "mul", "sub", "realdiv", "pad", "slice", "tile",
                     "square", "neg", "biasadd", "biasaddgrad")


def tf_op_category(op_type: str, op_name: str, optimizer_name: str) -> str | None:
    """The `OP_CATEGORIES` entry of one TensorFlow op (None for the profiler's IDLE).

    `op_type` is the kernel's type (oneDNN's `_MklNative...` included), `op_name` its graph
    name, whose scope names the optimizer for the update's ops.
    """
    kind = op_type.lower()
    if kind == "idle":
        return None
    if f"/{optimizer_name}/" in f"/{op_name}/":
        return "optimizer update"
    if "conv" in kind:
        if "backpropinput" in kind:
            return "conv backward-data"
        if "backpropfilter" in kind:
            return "conv backward-weights"
        return "conv forward"
    if "batchnorm" in kind:
        return "batch norm backward" if "grad" in kind else "batch norm forward"
    if "relu" in kind:
        return "ReLU"
    if kind.removeprefix("_mklnative").removeprefix("_mkl") in _ELEMENT_WISE_OPS:
        return "element-wise"
    return "other"


def _profile_steps(run, steps: int, directory: str, optimizer_name: str) -> dict:
    """Per-category op time (ms per step) of `steps` training steps under TF's profiler."""
    import glob

    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as profiler_plugin

    tf.profiler.experimental.start(directory)
    wall = time.perf_counter()
    run(steps)
    wall = time.perf_counter() - wall
    tf.profiler.experimental.stop()
    planes = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    data, _ = profiler_plugin.xspace_to_tools_data(planes, "framework_op_stats", {})
    table = json.loads(data)[0]
    columns = [column["id"] for column in table["cols"]]
    totals = dict.fromkeys(OP_CATEGORIES, 0.0)
    for row in table["rows"]:
        cells = dict(zip(columns, (cell.get("v") for cell in row["c"])))
        category = tf_op_category(cells["type"], cells["operation"], optimizer_name)
        if category:
            totals[category] += cells["total_self_time"] / 1000 / steps  # us -> ms per step
    return {"ms_per_step": {k: round(v, 2) for k, v in totals.items()},
            "profiled_wall_ms_per_step": round(1000 * wall / steps, 1)}


def run_peak_worker(args) -> dict:
    """Practical matmul peak (GFLOP/s) in float32 and bfloat16 on the same threads."""
    import tensorflow as tf

    if args.intra_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_threads)
    size = args.matmul_size
    out = {}
    dtypes = ["float32", "bfloat16"]
    if args.onednn_max_cpu_isa and not _machine(args).avx512_bf16:
        # A oneDNN capped below AVX512_CORE_BF16 cannot create a bfloat16 matmul (the
        # process aborts), as in the bfloat16 step rows.
        dtypes.remove("bfloat16")
        out["bfloat16"] = None
    for dtype in dtypes:
        a = tf.random.normal((size, size), dtype="float32")
        a = tf.cast(a, dtype)
        b = tf.cast(tf.random.normal((size, size), dtype="float32"), dtype)
        matmul = tf.function(lambda a, b: tf.linalg.matmul(a, b))
        matmul(a, b).numpy()
        best = 0.0
        for _ in range(args.repeats * 2):
            start = time.perf_counter()
            for _ in range(3):
                result = matmul(a, b)
            result.numpy()
            best = max(best, 3 * 2 * size**3 / (time.perf_counter() - start) / 1e9)
        out[dtype] = round(best, 1)
    out["machine"] = _machine(args).to_dict()
    return out


def run_onednn_probe() -> None:
    """One small convolution under TensorFlow, for `ONEDNN_VERBOSE=1` to name its ISA."""
    import tensorflow as tf

    images = tf.ones((2, 8, 8, 16))
    kernel = tf.ones((3, 3, 16, 16))
    tf.nn.conv2d(images, kernel, 1, "SAME").numpy()


# --- driver side ----------------------------------------------------------------------


def _child_env(args, framework: str) -> dict:
    """The environment of a child process: the ISA cap when asked, set before any import."""
    env = dict(os.environ)
    isa = args.onednn_max_cpu_isa
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = env["DNNL_MAX_CPU_ISA"] = isa
        if framework == "torch":
            aten, mkl = ISA_CAPS[isa]
            env["ATEN_CPU_CAPABILITY"] = aten
            env["MKL_ENABLE_INSTRUCTIONS"] = mkl
    return env


def _emulation_label(args) -> str:
    if not args.onednn_max_cpu_isa:
        return ""
    return (f"EMULATION: oneDNN capped to {args.onednn_max_cpu_isa} in both frameworks "
            f"(ONEDNN_MAX_CPU_ISA; torch also ATEN_CPU_CAPABILITY and MKL_ENABLE_INSTRUCTIONS) "
            f"on a CPU that has more; caches, memory and Eigen kernels are this machine's")


def _onednn_isa(args) -> str | None:
    """The ISA oneDNN reports in a TensorFlow child (ONEDNN_VERBOSE=1), e.g. "Intel AVX2"."""
    env = dict(_child_env(args, "tensorflow"), ONEDNN_VERBOSE="1")
    command = [sys.executable, os.path.abspath(__file__), "--onednn_probe"]
    process = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                             timeout=600)
    for line in process.stdout.splitlines():
        if line.startswith("onednn_verbose") and ",isa:" in line:
            return line.split(",isa:", 1)[1].strip()
    return None


def _run_child(command, env=None, timeout_s=1800):
    """Runs a child process; returns its last JSON line."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        env=env,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


_RSS_WRAPPER = (
    "import json, resource, runpy, sys; script = sys.argv[1]; sys.argv = sys.argv[1:]; "
    "runpy.run_path(script, run_name='__main__'); "
    "print(json.dumps({'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))"
)


def _run_torch_reference(python, script, batch, args, threads):
    """The PyTorch reference's JSON plus its process's peak RSS (via a runpy wrapper)."""
    methods = [m for m in args.methods.split(",") if m in METHODS]
    command = [python, "-c", _RSS_WRAPPER, script, f"--batch={batch}", f"--steps={args.steps}",
               f"--repeats={args.repeats}", f"--warmup={args.warmup}", f"--threads={threads}",
               f"--methods={','.join(methods)}", f"--kd_teacher_bn={args.kd_teacher_bn}",
               f"--sokd_teacher_bn={args.sokd_teacher_bn}",
               f"--max_other_load={args.max_other_load}"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                             env=_child_env(args, "torch"))
    if process.returncode != 0:
        raise RuntimeError(f"PyTorch reference failed:\n{process.stderr[-3000:]}")
    lines = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    return dict(lines[-2], peak_rss_mib=round(lines[-1]["peak_rss_mib"]))


def _ensure_bench_venv(venv: str, install: bool) -> str | None:
    python = os.path.join(venv, "bin", "python")
    if os.path.exists(python):
        probe = subprocess.run([python, "-c", "import torch"], capture_output=True)
        if probe.returncode == 0:
            return python
    if not install:
        return None
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "torch==2.13.0", "numpy"], check=True
    )
    return python


def _worker_command(args, method, precision, jit, batch, batch_norm):
    command = [
        sys.executable, os.path.abspath(__file__), "--worker",
        f"--method={method}", f"--precision={precision}", f"--jit={jit}", f"--batch={batch}",
        f"--steps={args.steps}", f"--repeats={args.repeats}", f"--warmup={args.warmup}",
        f"--kd_teacher_bn={args.kd_teacher_bn}", f"--sokd_teacher_bn={args.sokd_teacher_bn}",
        f"--min_cpu_use={args.min_cpu_use}", f"--max_other_load={args.max_other_load}",
        f"--batch_norm={batch_norm}", f"--teacher={args.teacher}", f"--student={args.student}",
    ]
    if args.intra_threads:
        command.append(f"--intra_threads={args.intra_threads}")
    if args.inter_threads:
        command.append(f"--inter_threads={args.inter_threads}")
    if args.onednn_max_cpu_isa:
        command.append(f"--onednn_max_cpu_isa={args.onednn_max_cpu_isa}")
    if args.profile_dir:
        command.append(f"--profile_dir={args.profile_dir}")
    return command


def _fmt(value, pattern="{:.1f}"):
    return "n/a" if value is None else pattern.format(value)


def _config_key(record) -> tuple:
    return (record["batch"], record["method"], record["precision"], record["jit"],
            record["batch_norm"])


def combine_rounds(records, torch_rounds) -> list[dict]:
    """One record per configuration from its rounds, with its ratio to PyTorch.

    `records` are the workers' records (a "round" each, from 1); `torch_rounds` maps batch
    -> one {method: images/s} per round. A combined record carries images/s as the median
    of the rounds' medians (min/max over every round's windows) and `x_torch` as the median
    of the per-round ratios (TensorFlow's rate over the same round's PyTorch rate) with
    `x_torch_min`/`x_torch_max`; None where PyTorch did not run the method.
    """
    grouped: dict[tuple, list[dict]] = {}
    for record in records:
        grouped.setdefault(_config_key(record), []).append(record)
    combined = []
    for key, rounds in grouped.items():
        first = dict(rounds[0])
        first.pop("round", None)
        timed = [r for r in rounds if r.get("images_per_s_median")]
        ratios = []
        for r in timed:
            per_round = torch_rounds.get(r["batch"], [])
            index = r.get("round", 1) - 1
            torch_rate = per_round[index].get(r["method"]) if index < len(per_round) else None
            if torch_rate:
                ratios.append(r["images_per_s_median"] / torch_rate)
        if timed:
            first.update(
                images_per_s_median=round(statistics.median(r["images_per_s_median"] for r in timed), 1),
                images_per_s_min=min(r["images_per_s_min"] for r in timed),
                images_per_s_max=max(r["images_per_s_max"] for r in timed),
                cpu_use_per_window=[u for r in timed for u in r["cpu_use_per_window"]],
                peak_rss_mib=max(r["peak_rss_mib"] for r in timed),
            )
        first.update(
            rounds=len(rounds),
            x_torch=statistics.median(ratios) if ratios else None,
            x_torch_min=min(ratios) if ratios else None,
            x_torch_max=max(ratios) if ratios else None,
        )
        combined.append(first)
    return combined


def _table(records, peak) -> str:
    lines = [
        "| batch | method | precision (used) | XLA | BN (used) | images/s median (min-max) | x PyTorch fp32 "
        "| GFLOP/img | GFLOP/s | % fp32 peak | % bf16 peak | peak RSS MiB | CPU use |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        precision = r["precision"]
        if r.get("precision_used", precision) != precision:
            precision = f"{precision} ({r['precision_used']})"
        batch_norm = r["batch_norm"]
        if r.get("batch_norm_used", batch_norm) != batch_norm:
            batch_norm = f"{batch_norm} ({r['batch_norm_used']})"
        if "skipped" in r:
            lines.append(f"| {r['batch']} | {r['method']} | {precision} | {r['jit']} | "
                         f"{batch_norm} | skipped: {r['skipped']} |" + " |" * 7)
            continue
        rate = r["images_per_s_median"]
        achieved = rate * r["gflop_per_image"] if rate else None
        lines.append(
            f"| {r['batch']} | {r['method']} | {precision} | {r['jit']} | "
            f"{batch_norm} | "
            f"{_fmt(rate)} ({_fmt(r['images_per_s_min'])}-{_fmt(r['images_per_s_max'])}) | "
            f"{_ratio_cell(r)} | "
            f"{r['gflop_per_image']:.3f} | {_fmt(achieved)} | "
            f"{_fmt(100 * achieved / peak['float32'] if achieved else None, '{:.0f}')} | "
            f"{_fmt(100 * achieved / peak['bfloat16'] if achieved and peak['bfloat16'] else None, '{:.0f}')} | "
            f"{r['peak_rss_mib']} | {max(r['cpu_use_per_window'], default=0):.2f} |"
        )
    return "\n".join(lines)


def _ratio_cell(record) -> str:
    """"1.08" for one round, "1.08 (0.88-1.37)" over several; "n/a" without PyTorch."""
    if record.get("x_torch") is None:
        return "n/a"
    cell = f"{record['x_torch']:.2f}"
    if record.get("rounds", 1) > 1:
        cell += f" ({record['x_torch_min']:.2f}-{record['x_torch_max']:.2f})"
    return cell


def _ratios(records, flop_ratio) -> str:
    lines = []
    keyed = {
        (r["batch"], r["method"], r["precision"], r["jit"], r["batch_norm"]): r for r in records
    }
    for (batch, method, precision, jit, batch_norm), sokd in sorted(keyed.items()):
        kd = keyed.get((batch, "kd", precision, jit, batch_norm))
        if method != "sokd" or not kd or not kd.get("images_per_s_median"):
            continue
        if not sokd.get("images_per_s_median"):
            continue
        time_ratio = kd["images_per_s_median"] / sokd["images_per_s_median"]
        verdict = "within" if time_ratio <= flop_ratio else "ABOVE"
        lines.append(
            f"- batch {batch}, {precision}, XLA {jit}, BN {batch_norm}: SOKD/KD step time "
            f"{time_ratio:.3f} vs FLOP ratio {flop_ratio:.3f} ({verdict} the FLOP ratio)"
        )
    return "\n".join(lines)


def _cpu_line(machine: dict, onednn_isa: str | None) -> str:
    """"CPU: model; AVX2 yes, ...; class avx512_bf16; oneDNN ISA ..." from a machine record."""
    flags = {"AVX2": "avx2", "AVX-512F": "avx512f", "AVX512-BF16": "avx512_bf16",
             "AMX-BF16": "amx_bf16", "VNNI": "avx512_vnni"}
    described = ", ".join(f"{name} {'yes' if machine[key] else 'no'}" for name, key in flags.items())
    gpu = "GPU yes" if machine["gpu"] else "no GPU"
    return (f"CPU: {machine.get('cpu_name', machine['model_name'])}; {described} (as the library's auto choices see "
            f"them); class {machine['cpu_class']}; {gpu}; oneDNN ISA in TensorFlow: "
            f"{onednn_isa or 'not reported'}")


def kernel_census(verbose_output: str, steps: int) -> list[tuple[str, str, str, str, float]]:
    """oneDNN primitives a process executed, from its `ONEDNN_VERBOSE=1` output.

    Returns rows (primitive, implementation, propagation, source data type, calls per
    step), most frequent first; the implementation names the kernel family and ISA
    (`brg_conv_fwd:avx2` = JIT brgemm AVX2, `ref:any` = reference C++). Ops TensorFlow
    runs in Eigen do not appear. The per-call times oneDNN prints are ignored.
    """
    counts: dict[tuple[str, str, str, str], int] = {}
    for line in verbose_output.splitlines():
        fields = line.split(",")
        if not line.startswith("onednn_verbose") or "exec" not in fields:
            continue
        at = fields.index("exec")
        primitive, implementation, propagation = fields[at + 2 : at + 5]
        descriptor = fields[at + 5] if len(fields) > at + 5 else ""
        source = descriptor.split(" ")[0].split(":")
        dtype = source[1] if len(source) > 1 else ""
        key = (primitive, implementation, propagation, dtype)
        counts[key] = counts.get(key, 0) + 1
    rows = [(*key, round(count / steps, 1)) for key, count in counts.items()]
    return sorted(rows, key=lambda row: -row[-1])


def run_kernel_census(args) -> None:
    """`--onednn_kernels`: which oneDNN kernels one training step runs, per configuration."""
    emulation = _emulation_label(args)
    print(f"# oneDNN kernels per training step{'; ' + emulation if emulation else ''}",
          flush=True)
    census_args = argparse.Namespace(**vars(args))
    census_args.steps, census_args.repeats, census_args.warmup = 1, 1, 1
    census_args.max_other_load = 1e9
    out = []
    for batch in args.batch:
        for method in args.methods.split(","):
            for precision in args.precisions.split(","):
                for batch_norm in args.batch_norm.split(","):
                    command = _worker_command(census_args, method, precision, "off", batch,
                                              batch_norm)
                    env = dict(_child_env(args, "tensorflow"), ONEDNN_VERBOSE="1")
                    process = subprocess.run(command, capture_output=True, text=True,
                                             cwd=REPO_ROOT, env=env, timeout=1800)
                    records = [json.loads(line) for line in process.stdout.splitlines()
                               if line.startswith("{")]
                    record = records[-1] if records else {"error": process.stderr[-2000:]}
                    rows = kernel_census(process.stdout, steps=2)
                    print(f"\n## batch {batch}, {method}, precision {precision} "
                          f"(used {record.get('precision_used')}), BN {batch_norm} "
                          f"(used {record.get('batch_norm_used')})"
                          + (f": {record['skipped']}" if "skipped" in record else ""))
                    if "error" in record:
                        print(f"failed: {record['error']}")
                    print("| primitive | implementation | propagation | src type | calls/step |")
                    print("|---|---|---|---|---:|")
                    for row in rows:
                        print("| " + " | ".join(str(cell) for cell in row) + " |")
                    out.append({"batch": batch, "method": method, "precision": precision,
                                "batch_norm": batch_norm, "record": record,
                                "kernels": [list(row) for row in rows]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"emulation": emulation or None, "configurations": out}, f, indent=1)


def run_op_profile(args) -> None:
    """`--op_profile`: per-category op time of each method's step, both frameworks."""
    import tempfile

    emulation = _emulation_label(args)
    batch = args.batch[0]
    precision = args.precisions.split(",")[0]
    batch_norm = args.batch_norm.split(",")[0]
    torch_python = None if args.no_torch else _ensure_bench_venv(args.bench_venv, args.install)
    threads = args.intra_threads or os.cpu_count()
    lines = [f"# op profile, batch {batch}, {_pair(args)}, precision {precision}, BN "
             f"{batch_norm}, TensorFlow threads intra={args.intra_threads or 'default'} "
             f"inter={args.inter_threads or 'default'}" + (f"; {emulation}" if emulation else "")]
    out = []
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as directory:
            profile_args = argparse.Namespace(**vars(args))
            profile_args.profile_dir = directory
            profile_args.max_other_load = 1e9  # the timing here is the profiler's
            record = _run_child(
                _worker_command(profile_args, method, precision, "off", batch, batch_norm),
                env=_child_env(args, "tensorflow"))
        torch_profile = None
        if torch_python and _is_reference_pair(args) and method in METHODS:
            command = [torch_python, args.torch_script, f"--batch={batch}",
                       f"--steps={args.steps}", f"--warmup={args.warmup}", f"--threads={threads}",
                       f"--methods={method}", f"--kd_teacher_bn={args.kd_teacher_bn}",
                       f"--sokd_teacher_bn={args.sokd_teacher_bn}", "--profile"]
            process = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                                     env=_child_env(args, "torch"))
            if process.returncode != 0:
                raise RuntimeError(f"PyTorch profile failed:\n{process.stderr[-3000:]}")
            torch_profile = json.loads(process.stdout.strip().splitlines()[-1])["profiles"][method]
        out.append({"method": method, "tensorflow": record, "torch": torch_profile})
        lines += ["", op_profile_table(method, record, torch_profile)]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"emulation": emulation or None, "profiles": out}, f, indent=1)


def op_profile_table(method: str, record: dict, torch_profile: dict | None) -> str:
    """Markdown table of one method's op time per category, TensorFlow beside PyTorch."""
    tf_ms = record["op_profile"]["ms_per_step"]
    torch_ms = (torch_profile or {}).get("ms_per_step", {})
    tf_ms = dict(tf_ms, **{"conv backward (both)": tf_ms["conv backward-data"]
                           + tf_ms["conv backward-weights"]})
    lines = [f"{method}: step wall time under the profiler, TensorFlow "
             f"{record['op_profile']['profiled_wall_ms_per_step']} ms, PyTorch "
             f"{_fmt((torch_profile or {}).get('profiled_wall_ms_per_step'))} ms",
             "", "| op category | TensorFlow ms/step | PyTorch ms/step | TF / PyTorch |",
             "|---|---:|---:|---:|"]
    for category in OP_CATEGORIES:
        mine, theirs = tf_ms.get(category), torch_ms.get(category)
        if category in ("conv backward-data", "conv backward-weights"):
            theirs = None  # PyTorch's convolution_backward computes both in one op
        ratio = mine / theirs if mine is not None and theirs else None
        lines.append(f"| {category} | {_fmt(mine)} | {_fmt(theirs)} | {_fmt(ratio, '{:.2f}')} |")
    total_tf = sum(v for k, v in tf_ms.items() if k != "conv backward (both)")
    total_torch = sum(torch_ms.values()) if torch_ms else None
    lines.append(f"| all ops | {_fmt(total_tf)} | {_fmt(total_torch)} | "
                 f"{_fmt(total_tf / total_torch if total_torch else None, '{:.2f}')} |")
    return "\n".join(lines)


def _pair(args) -> str:
    return f"teacher {args.teacher} -> student {args.student}"


def _is_reference_pair(args) -> bool:
    return (args.teacher, args.student) == (TEACHER, STUDENT)


def _torch_skip_note(args) -> str:
    """Why the PyTorch reference does not run for this pair; "" when it does."""
    if _is_reference_pair(args):
        return ""
    return (f"PyTorch reference skipped: it restates only {TEACHER} -> {STUDENT}, not "
            f"{args.teacher} -> {args.student} (the 'x PyTorch fp32' column is n/a)")


def run_driver(args) -> None:
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
    methods = args.methods.split(",")
    precisions = args.precisions.split(",")
    jits = args.jit.split(",")
    print(f"# step_throughput {started}; {_pair(args)}; load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs", flush=True)
    emulation = _emulation_label(args)
    if emulation:
        print(f"# {emulation}", flush=True)

    peak_command = [sys.executable, os.path.abspath(__file__), "--peak",
                    f"--repeats={args.repeats}", f"--matmul_size={args.matmul_size}"]
    if args.intra_threads:
        peak_command.append(f"--intra_threads={args.intra_threads}")
    if args.onednn_max_cpu_isa:
        peak_command.append(f"--onednn_max_cpu_isa={args.onednn_max_cpu_isa}")
    peak = _run_child(peak_command, env=_child_env(args, "tensorflow"))
    machine = peak.pop("machine")
    onednn_isa = _onednn_isa(args)
    cpu_line = _cpu_line(machine, onednn_isa)
    print(f"# {cpu_line}", flush=True)
    print(f"matmul peak (TF, {args.matmul_size}^2): float32 {peak['float32']} GFLOP/s, "
          f"bfloat16 {_fmt(peak['bfloat16'])} GFLOP/s", flush=True)

    torch_note = _torch_skip_note(args)
    torch_python = None
    if not torch_note and not args.no_torch:
        torch_python = _ensure_bench_venv(args.bench_venv, args.install)
    if torch_note:
        print(torch_note, flush=True)
    elif not (torch_python and os.path.exists(args.torch_script)):
        print("PyTorch reference skipped (no --torch_script or bench venv)", flush=True)
    run_torch = bool(not torch_note and torch_python and os.path.exists(args.torch_script))

    torch_raw, records = {}, []  # torch_raw: batch -> one output per round
    for round_index in range(args.rounds):
        if run_torch:
            threads = args.intra_threads or os.cpu_count()
            for batch in args.batch:
                output = _run_torch_reference(torch_python, args.torch_script, batch, args, threads)
                torch_raw.setdefault(batch, []).append(output)
                print(f"PyTorch batch {batch}, round {round_index + 1}: {json.dumps(output)}",
                      flush=True)
        for batch in args.batch:
            for method in methods:
                for precision in precisions:
                    for jit in jits:
                        for batch_norm in args.batch_norm.split(","):
                            record = _run_child(
                                _worker_command(args, method, precision, jit, batch, batch_norm),
                                env=_child_env(args, "tensorflow"),
                            )
                            record["round"] = round_index + 1
                            records.append(record)
                            print(json.dumps(record), flush=True)
    torch_rounds = {
        batch: [{method: values["images_per_s_median"] for method, values in output["methods"].items()}
                for output in outputs]
        for batch, outputs in torch_raw.items()
    }

    flops = {r["method"]: r["gflop_per_image"] for r in records if "gflop_per_image" in r}
    flop_ratio = flops["sokd"] / flops["kd"] if "sokd" in flops and "kd" in flops else 1.57
    end_load = os.getloadavg()
    issue = f" (issue: {ISSUE_GFLOP_PER_IMAGE})" if _is_reference_pair(args) else ""
    report = [
        cpu_line + ".",
        *([emulation + "."] if emulation else []),
        f"Models: {_pair(args)}; 32x32x3 random images, {NUM_CLASSES} classes.",
        *([torch_note] if torch_note else []),
        f"Run {started} to {time.strftime('%H:%M UTC', time.gmtime())}; load average at start "
        f"{load[0]:.2f}, at end {end_load[0]:.2f}; {os.cpu_count()} CPUs; "
        f"threads intra={args.intra_threads or 'default'} inter={args.inter_threads or 'default'}.",
        f"Measured matmul peak: float32 {peak['float32']} GFLOP/s, bfloat16 "
        f"{_fmt(peak['bfloat16'])} GFLOP/s.",
        "Counted GFLOP per image (this run): "
        + ", ".join(f"{m} {v:.3f}" for m, v in flops.items())
        + f"{issue}.",
        f"Teacher BN: KD {args.kd_teacher_bn}, SOKD {args.sokd_teacher_bn} (the PyTorch "
        "reference runs the same modes: frozen = eval mode, official = train mode).",
        "",
    ]
    for batch, outputs in torch_raw.items():
        for round_index, raw in enumerate(outputs):
            rates = ", ".join(
                f"{method} {values['images_per_s_median']} ({values['images_per_s_min']}-"
                f"{values['images_per_s_max']})" for method, values in raw["methods"].items()
            )
            in_round = f", round {round_index + 1}" if args.rounds > 1 else ""
            report.append(f"PyTorch reference ({raw['framework']}, ATen CPU capability "
                          f"{raw.get('cpu_capability', 'not reported')}, batch {batch}{in_round}, "
                          f"parameter-count self-check {raw['self_check']}): {rates} images/s; "
                          f"peak RSS {raw['peak_rss_mib']} MiB.")
    combined = combine_rounds(records, torch_rounds)
    if args.rounds > 1:
        report += ["", f"Over {args.rounds} rounds (each a fresh process per framework and "
                   "config): images/s is the median of the rounds' medians (min-max over every "
                   "kept window); x PyTorch is the median of the rounds' ratios (min-max over "
                   "rounds), each round's TensorFlow rate over that round's PyTorch rate."]
    report += ["", _table(combined, peak), "", _ratios(combined, flop_ratio)]
    text = "\n".join(report)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "onednn_isa": onednn_isa,
                       "emulation": emulation or None, "peak": peak, "rounds": args.rounds,
                       "torch": {batch: outputs[0] if args.rounds == 1 else outputs
                                 for batch, outputs in torch_raw.items()},
                       "records": records}, f, indent=1)


def _spec_error(spec: str) -> str:
    """The library's own message for a model spec it cannot resolve; "" when it can."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from sokd_tf.errors import ConfigError
    from sokd_tf.models import specs

    try:
        specs.spec_kind(spec)
    except ConfigError as error:
        return str(error)
    return ""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, action="append",
                        help="global batch size; repeat the flag for several (default 64)")
    parser.add_argument("--teacher", default=TEACHER,
                        help="teacher (and DML peer) model spec, as the CLI's --teacher: a zoo "
                        "name, keras.applications.NAME or a .keras file")
    parser.add_argument("--student", default=STUDENT,
                        help="student model spec, as the CLI's --student")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"any of {METHODS + ABLATIONS}")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--jit", default="off,on", help="XLA settings to time: off,on")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per config")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times the whole comparison (PyTorch, then every config, each in "
                             "a fresh process) is run; the table gives medians over rounds "
                             "and each ratio's range, since one process can be ~20%% off")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--min_cpu_use", type=float, default=0.0,
                        help="keep a timed window only above this CPU use per thread")
    parser.add_argument("--max_other_load", type=float, default=0.25,
                        help="keep a timed window only when other processes used at most "
                        "this many CPUs meanwhile (from /proc/stat)")
    parser.add_argument("--intra_threads", type=int, default=0, help="0 = TF default")
    parser.add_argument("--inter_threads", type=int, default=0, help="0 = TF default")
    parser.add_argument("--kd_teacher_bn", default="frozen", choices=("official", "frozen"))
    parser.add_argument("--sokd_teacher_bn", default="official", choices=("official", "frozen"))
    parser.add_argument("--batch_norm", default="library",
                        help="comma list of BN implementations: library (model.batch_norm="
                        "auto resolved for this CPU class), stock (Keras' layer), fused "
                        "(FusedBatchNormalization)")
    parser.add_argument("--onednn_max_cpu_isa", default="", choices=("",) + tuple(ISA_CAPS),
                        help="cap oneDNN (both frameworks) to this ISA: an emulation of an "
                        "older CPU class, labelled as such (e.g. AVX2)")
    parser.add_argument("--matmul_size", type=int, default=2048)
    parser.add_argument("--torch_script", default=DEFAULT_TORCH_SCRIPT,
                        help="PyTorch reference script (default benchmarks/torch_reference.py)")
    parser.add_argument("--bench_venv", default=DEFAULT_BENCH_VENV)
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="do not create the bench venv / install torch")
    parser.add_argument("--no-torch", dest="no_torch", action="store_true")
    parser.add_argument("--markdown", default="", help="write the report here")
    parser.add_argument("--json", default="", help="write all records here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--onednn_probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--onednn_kernels", action="store_true",
                        help="time nothing: list the oneDNN kernels (ISA, implementation) one "
                        "training step of each configuration runs (ONEDNN_VERBOSE=1)")
    parser.add_argument("--op_profile", action="store_true",
                        help="where the step's time goes: per op category (conv forward / "
                        "backward, BN, ReLU, element-wise, optimizer), TensorFlow's profiler "
                        "beside torch.profiler on the PyTorch reference, per method")
    parser.add_argument("--profile_dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS + ABLATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch = args.batch or [64]
    if not (args.worker or args.peak or args.onednn_probe):  # children get checked specs
        for role in ("teacher", "student"):
            error = _spec_error(getattr(args, role))
            if error:
                parser.error(f"--{role}: {error}")
    unknown = sorted(set(args.batch_norm.split(",")) - set(BATCH_NORM_CHOICES))
    if unknown:
        parser.error(f"unknown --batch_norm {unknown}; choose from {list(BATCH_NORM_CHOICES)}")
    unknown = sorted(set(args.precisions.split(",")) - set(PRECISIONS))
    if unknown:
        parser.error(f"unknown --precisions {unknown}; choose from {list(PRECISIONS)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.op_profile and (len(args.batch) > 1 or "," in args.precisions
                            or "," in args.batch_norm):
        parser.error("--op_profile profiles one configuration per method: give one --batch, "
                     "one --precisions and one --batch_norm")
    return args


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    sys.path.insert(0, REPO_ROOT)
    if args.worker:
        args.batch = args.batch[0]
        print(json.dumps(run_worker(args)), flush=True)
    elif args.peak:
        print(json.dumps(run_peak_worker(args)), flush=True)
    elif args.onednn_probe:
        run_onednn_probe()
    elif args.onednn_kernels:
        run_kernel_census(args)
    elif args.op_profile:
        run_op_profile(args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
