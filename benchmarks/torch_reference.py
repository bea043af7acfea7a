"""PyTorch statement of the authors' training steps, timed beside sokd_tf's.

An independent PyTorch re-statement of what the official SOKD code
(https://github.com/swlzq/Semi-Online-KD) trains, so that `benchmarks/step_throughput.py`
can time sokd_tf against it on the same machine and threads:

- pre-activation CIFAR Wide-ResNets (stem conv 16; groups of 16k, 32k, 64k channels,
  strides 1, 2, 2; final BN -> ReLU -> global average pool -> linear), a WRN-40-2
  teacher and a WRN-40-1 student by default;
- the peer (the paper's knowledge bridge module): a freshly initialised copy of the
  teacher's last group + final BN + linear, fed by the teacher's gradient-stopped
  group-2 output;
- one SGD step (momentum 0.9, no Nesterov, coupled weight decay 5e-4, one parameter
  group per trained role at lr 0.1) of each method:
  `vanilla` (student CE), `kd` (0.1 CE + 0.9 T^2 KL(teacher || student), T = 4),
  `dml` (a WRN-40-2 peer from scratch and the student, each CE + KL(other || self) at
  T = 1), `sokd` (the five SOKD terms, docs/METHOD.md, "Objective").

Teacher BatchNorm as sokd_tf names it: `frozen` = eval mode, `official` = train mode
(batch statistics, running statistics moving) with no teacher parameter optimised;
defaults KD `frozen`, SOKD `official` (docs/METHOD.md, "Teacher BatchNorm").

Before timing, `self_check()` asserts the trainable-parameter counts of the authors'
models (WRN-40-2 2,255,156 and WRN-40-1 569,780 at 100 classes, the WRN-40-2 peer
1,720,036, and the other CIFAR WRNs), a hand-computed softened KL, and the direction of
knowledge flow of one SOKD step; a failed check stops the run.

Needs torch and numpy only, and runs in the benchmark's own virtual environment
(`.bench_venv`, created by step_throughput.py); torch is never a dependency of sokd_tf.

Usage: python benchmarks/torch_reference.py [--batch=64] [--steps=5] [--repeats=5]
           [--threads=N] [--methods=vanilla,kd,dml,sokd] [--self_check]
Prints one JSON line: the checks, parameter counts and, per method, the median/min/max
images/s over the kept timed windows with each window's CPU use. With `--profile` it
times nothing and gives, per method, the self CPU time per op category of `--steps`
steps under torch.profiler (what `step_throughput.py --op_profile` sets beside
TensorFlow's profile).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("vanilla", "kd", "dml", "sokd")
TEACHER_BN_MODES = ("official", "frozen")
TEACHER, STUDENT = (40, 2), (40, 1)
TEMPERATURE = 4.0
KD_WEIGHTS = (0.1, 0.9)  # student/ce, student/kd_from_teacher
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4

# Trainable parameters of the authors' PyTorch models (BN gamma/beta counted, running
# statistics not; 3-channel input): (depth, width) -> classes -> (network, peer).
REFERENCE_PARAMETER_COUNTS = {
    (16, 1): {100: (180_916, 138_148), 10: (175_066, 132_298)},
    (16, 2): {100: (703_284, 538_340), 10: (691_674, 526_730)},
    (40, 1): {100: (569_780, 434_084), 10: (563_930, 428_234)},
    (40, 2): {100: (2_255_156, 1_720_036), 10: (2_243_546, 1_708_426)},
    (28, 10): {100: (36_536_884, 27_927_780), 10: (36_479_194, 27_870_090)},
}


# --- models ------------------------------------------------------------------------------


class PreActBasicBlock(nn.Module):
    """BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> conv3x3, plus the shortcut.

    When the channel count changes the shortcut is a 1x1 convolution of the
    pre-activated input, otherwise the raw input itself (as the official WRN).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.projection = None
        if in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        residual = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        shortcut = x if self.projection is None else self.projection(activated)
        return shortcut + residual


def make_group(num_blocks: int, in_channels: int, out_channels: int, stride: int):
    """A group of pre-activation blocks; only the first one changes shape."""
    blocks = [PreActBasicBlock(in_channels, out_channels, stride)]
    blocks += [PreActBasicBlock(out_channels, out_channels, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ClassifierHead(nn.Module):
    """Final BN -> ReLU -> global average pool -> linear: `[b, c, h, w]` -> logits."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1), 1))


def initialise(module: nn.Module) -> nn.Module:
    """The official initialisation: conv He-normal over fan-out, BN (1, 0), linear bias 0.

    Linear weights keep PyTorch's default (uniform +-1/sqrt(fan_in)); BN running
    statistics start at (0, 1).
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
            layer.reset_running_stats()
        elif isinstance(layer, nn.Linear):
            nn.init.zeros_(layer.bias)
    return module


class WideResNet(nn.Module):
    """CIFAR WRN-depth-width; `forward` returns (group-2 output, logits)."""

    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        self.blocks_per_group = (depth - 4) // 6
        self.widths = (16 * width, 32 * width, 64 * width)
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, padding=1, bias=False)
        self.group1 = make_group(self.blocks_per_group, 16, self.widths[0], 1)
        self.group2 = make_group(self.blocks_per_group, self.widths[0], self.widths[1], 2)
        self.group3 = make_group(self.blocks_per_group, self.widths[1], self.widths[2], 2)
        self.head = ClassifierHead(self.widths[2], num_classes)
        initialise(self)

    def forward(self, images):
        penultimate = self.group2(self.group1(self.stem(images)))
        return penultimate, self.head(self.group3(penultimate))

    def make_peer(self) -> nn.Sequential:
        """A fresh copy of everything after group 2: group 3 + head, new random weights."""
        peer = nn.Sequential(
            make_group(self.blocks_per_group, self.widths[1], self.widths[2], 2),
            ClassifierHead(self.widths[2], self.num_classes),
        )
        return initialise(peer)


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --- losses ------------------------------------------------------------------------------


def softened_kl(target_logits, learner_logits, temperature: float):
    """T^2 * KL(softmax(target / T) || softmax(learner / T)), batch mean; target detached.

    Target first, learner second (as sokd_tf's `losses.softened_kl`); the value is the
    official `F.kl_div(log_softmax(learner / T), softmax(target / T), "batchmean") * T^2`.
    """
    target = F.log_softmax(target_logits.detach() / temperature, dim=1)
    learner = F.log_softmax(learner_logits / temperature, dim=1)
    kl = F.kl_div(learner, target, reduction="batchmean", log_target=True)
    return kl * temperature**2


def sokd_terms(teacher_logits, peer_logits, student_logits, labels, temperature):
    """The five SOKD terms (batch means), every target detached."""
    return {
        "peer/ce": F.cross_entropy(peer_logits, labels),
        "peer/kd_from_teacher": softened_kl(teacher_logits, peer_logits, temperature),
        "peer/ml_from_student": softened_kl(student_logits, peer_logits, temperature),
        "student/ce": F.cross_entropy(student_logits, labels),
        "student/ml_from_peer": softened_kl(peer_logits, student_logits, temperature),
    }


# --- the steps ---------------------------------------------------------------------------


def freeze(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def build_roles(method: str, num_classes: int, teacher=TEACHER, student=STUDENT) -> dict:
    """The networks of `method`: role -> module (the teacher frozen, the others trained)."""
    roles = {"student": WideResNet(*student, num_classes)}
    if method in ("kd", "sokd"):
        roles["teacher"] = freeze(WideResNet(*teacher, num_classes))
    if method == "sokd":
        roles["peer"] = roles["teacher"].make_peer()
    elif method == "dml":
        roles["peer"] = WideResNet(*teacher, num_classes)  # from scratch, trained
    return roles


def make_optimizer(roles: dict) -> torch.optim.SGD:
    """One SGD, a parameter group per trained role (the official code's two groups)."""
    groups = [{"params": list(roles[role].parameters()), "lr": LEARNING_RATE}
              for role in ("student", "peer") if role in roles]
    return torch.optim.SGD(groups, lr=LEARNING_RATE, momentum=MOMENTUM,
                           weight_decay=WEIGHT_DECAY, nesterov=False)


def make_step(method: str, roles: dict, *, kd_teacher_bn="frozen", sokd_teacher_bn="official"):
    """A function `(images, labels) -> loss` running one training step of `method`."""
    optimizer = make_optimizer(roles)
    student, teacher, peer = roles["student"], roles.get("teacher"), roles.get("peer")

    def loss_of(images, labels):
        student.train()
        if method == "vanilla":
            return F.cross_entropy(student(images)[1], labels)
        if method == "kd":
            teacher.train(kd_teacher_bn == "official")
            with torch.no_grad():
                teacher_logits = teacher(images)[1]
            student_logits = student(images)[1]
            return (KD_WEIGHTS[0] * F.cross_entropy(student_logits, labels)
                    + KD_WEIGHTS[1] * softened_kl(teacher_logits, student_logits, TEMPERATURE))
        if method == "dml":
            peer.train()
            peer_logits, student_logits = peer(images)[1], student(images)[1]
            return (F.cross_entropy(peer_logits, labels)
                    + softened_kl(student_logits, peer_logits, 1.0)
                    + F.cross_entropy(student_logits, labels)
                    + softened_kl(peer_logits, student_logits, 1.0))
        teacher.train(sokd_teacher_bn == "official")
        peer.train()
        with torch.no_grad():  # the teacher is frozen; one trunk pass gives both outputs
            teacher_features, teacher_logits = teacher(images)
        peer_logits = peer(teacher_features.detach())
        student_logits = student(images)[1]
        terms = sokd_terms(teacher_logits, peer_logits, student_logits, labels, TEMPERATURE)
        return sum(terms.values())

    def step(images, labels):
        loss = loss_of(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # one backward pass; peer and student step from the same state
        optimizer.step()
        return loss.detach()

    return step


# --- self-check --------------------------------------------------------------------------


def check_parameter_counts() -> dict:
    """Asserts every reference count; returns the WRN-40-2 / WRN-40-1 ones."""
    for (depth, width), per_classes in REFERENCE_PARAMETER_COUNTS.items():
        for num_classes, (network_count, peer_count) in per_classes.items():
            network = WideResNet(depth, width, num_classes)
            counts = (trainable_parameters(network), trainable_parameters(network.make_peer()))
            if counts != (network_count, peer_count):
                raise AssertionError(
                    f"WRN-{depth}-{width}, {num_classes} classes: (network, peer) parameters "
                    f"{counts}, the authors' models have {(network_count, peer_count)}"
                )
    teacher_count, peer_count = REFERENCE_PARAMETER_COUNTS[TEACHER][100]
    return {"teacher": teacher_count, "peer": peer_count,
            "student": REFERENCE_PARAMETER_COUNTS[STUDENT][100][0]}


def check_softened_kl() -> None:
    """Target [0, 0], learner [2 ln 3, 0], T = 2: 0.5753641 (swapped: 0.5232481)."""
    target = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    learner = torch.tensor([[2 * math.log(3.0), 0.0]], dtype=torch.float64)
    for value, expected in ((softened_kl(target, learner, 2.0), 0.5753641),
                            (softened_kl(learner, target, 2.0), 0.5232481)):
        if abs(float(value) - expected) > 1e-7:
            raise AssertionError(f"softened_kl gave {float(value):.7f}, expected {expected}")


def check_sokd_step() -> None:
    """One small SOKD step: knowledge flows only where the method says.

    The `student/*` terms reach no peer parameter and the `peer/*` terms no student
    parameter; the step moves peer and student and no teacher weight; the teacher's BN
    running statistics move in `official` mode only.
    """
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    labels = torch.tensor([0, 1, 2, 3])
    for bn_mode in TEACHER_BN_MODES:
        roles = build_roles("sokd", 10, teacher=(16, 1), student=(10, 1))
        teacher, peer, student = roles["teacher"], roles["peer"], roles["student"]
        teacher.train(bn_mode == "official")
        with torch.no_grad():
            features, teacher_logits = teacher(images)
        terms = sokd_terms(teacher_logits, peer(features), student(images)[1], labels, 4.0)
        for prefix, other in (("student/", peer), ("peer/", student)):
            loss = sum(value for name, value in terms.items() if name.startswith(prefix))
            reached = torch.autograd.grad(loss, list(other.parameters()), retain_graph=True,
                                          allow_unused=True)
            if any(g is not None and bool(g.abs().sum() > 0) for g in reached):
                raise AssertionError(f"the {prefix[:-1]} terms reach the other network")
        before = {name: {k: v.clone() for k, v in module.state_dict().items()}
                  for name, module in roles.items()}
        make_step("sokd", roles, sokd_teacher_bn=bn_mode)(images, labels)
        for name, module in roles.items():
            for key, value in module.state_dict().items():
                moved = not torch.equal(before[name][key], value)
                statistic = key.endswith(("running_mean", "running_var", "num_batches_tracked"))
                if name == "teacher" and moved and not (statistic and bn_mode == "official"):
                    raise AssertionError(f"teacher {key} changed ({bn_mode} BN)")
            if name != "teacher" and all(
                torch.equal(before[name][k], v) for k, v in module.state_dict().items()
                if not k.endswith("num_batches_tracked")
            ):
                raise AssertionError(f"the SOKD step left the {name} unchanged")
        running = [k for k in before["teacher"] if k.endswith("running_mean")]
        statistics_moved = any(
            not torch.equal(before["teacher"][k], teacher.state_dict()[k]) for k in running
        )
        if statistics_moved != (bn_mode == "official"):
            raise AssertionError(f"teacher BN statistics moved={statistics_moved} in {bn_mode} mode")


def self_check() -> dict:
    """Runs every check (raises AssertionError on the first failure); returns the counts."""
    counts = check_parameter_counts()
    check_softened_kl()
    check_sokd_step()
    return counts


# --- timing ------------------------------------------------------------------------------


def machine_busy_s() -> float:
    """CPU-seconds all processes have used so far (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def warmed_up_step(method: str, args):
    """`(roles, step, images, labels)` of `method`, after `--warmup` untimed steps."""
    torch.manual_seed(args.seed)
    roles = build_roles(method, args.num_classes)
    step = make_step(method, roles, kd_teacher_bn=args.kd_teacher_bn,
                     sokd_teacher_bn=args.sokd_teacher_bn)
    images = torch.randn(args.batch, 3, 32, 32)
    labels = torch.randint(0, args.num_classes, (args.batch,))
    for _ in range(args.warmup):
        step(images, labels)
    return roles, step, images, labels


def time_method(method: str, args) -> dict:
    """Images/s of `method`'s step over timed windows on a quiet machine."""
    roles, step, images, labels = warmed_up_step(method, args)
    threads = min(args.threads, os.cpu_count() or args.threads)
    rates, cpu_use, other_load = [], [], []
    for _ in range(3 * args.repeats):
        if len(rates) == args.repeats:
            break
        busy, wall, cpu = machine_busy_s(), time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            loss = step(images, labels)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        others = max(0.0, machine_busy_s() - busy - cpu) / wall
        cpu_use.append(round(cpu / wall, 2))
        other_load.append(round(others, 2))
        if cpu / wall >= args.min_cpu_use * threads and others <= args.max_other_load:
            rates.append(args.batch * args.steps / wall)
    return {
        "images_per_s_median": round(statistics.median(rates), 1) if rates else None,
        "images_per_s_min": round(min(rates), 1) if rates else None,
        "images_per_s_max": round(max(rates), 1) if rates else None,
        "cpu_use_per_window": cpu_use,
        "other_processes_cpus_per_window": other_load,
        "contended": len(rates) < args.repeats,
        "final_loss_finite": bool(torch.isfinite(loss)),
        "trainable_parameters": {role: trainable_parameters(m) for role, m in roles.items()},
    }


# The op categories of `step_throughput.py --op_profile` (its OP_CATEGORIES), as PyTorch's
# ops fall into them; convolution_backward computes the data and weight gradients together.
_TORCH_CATEGORIES = (
    ("conv forward", ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution",
                      "aten::conv2d", "aten::_convolution_mode", "aten::thnn_conv2d")),
    ("conv backward (both)", ("aten::convolution_backward",)),
    ("batch norm forward", ("aten::native_batch_norm", "aten::batch_norm",
                            "aten::_batch_norm_impl_index", "aten::_native_batch_norm_legit")),
    ("batch norm backward", ("aten::native_batch_norm_backward",)),
    ("ReLU", ("aten::relu", "aten::relu_", "aten::clamp_min", "aten::clamp_min_",
              "aten::threshold_backward")),
    ("element-wise", ("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::sub",
                      "aten::sub_", "aten::div", "aten::div_", "aten::neg", "aten::pad",
                      "aten::constant_pad_nd", "aten::slice", "aten::copy_", "aten::fill_",
                      "aten::zero_")),
)


def torch_op_category(name: str, in_optimizer: bool) -> str:
    """The op category of one profiled PyTorch op (its profiler name, e.g. aten::add_)."""
    if in_optimizer:
        return "optimizer update"
    for category, names in _TORCH_CATEGORIES:
        if name in names:
            return category
    return "other"


def profile_method(method: str, args) -> dict:
    """Per-category self CPU time (ms per step) of `method`'s step under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    _, step, images, labels = warmed_up_step(method, args)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        wall = time.perf_counter()
        for _ in range(args.steps):
            step(images, labels)
        wall = time.perf_counter() - wall
    totals: dict[str, float] = {}
    for event in profiler.events():
        parent, in_optimizer = event.cpu_parent, event.name.startswith("Optimizer.")
        while parent is not None and not in_optimizer:
            in_optimizer = parent.name.startswith("Optimizer.")
            parent = parent.cpu_parent
        if event.name.startswith("Optimizer.") or event.name.startswith("ProfilerStep"):
            category = "optimizer update" if in_optimizer else "other"
        else:
            category = torch_op_category(event.name, in_optimizer)
        totals[category] = totals.get(category, 0.0) + event.self_cpu_time_total / 1000 / args.steps
    return {"ms_per_step": {k: round(v, 2) for k, v in totals.items()},
            "profiled_wall_ms_per_step": round(1000 * wall / args.steps, 1)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="kept timed windows per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"any of {METHODS}")
    parser.add_argument("--kd_teacher_bn", default="frozen", choices=TEACHER_BN_MODES)
    parser.add_argument("--sokd_teacher_bn", default="official", choices=TEACHER_BN_MODES)
    parser.add_argument("--min_cpu_use", type=float, default=0.9,
                        help="keep a window only when this process used at least this "
                        "fraction of its threads")
    parser.add_argument("--max_other_load", type=float, default=0.25,
                        help="keep a window only when other processes used at most this "
                        "many CPUs meanwhile (from /proc/stat)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--self_check", action="store_true", help="only run the checks")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, profile --steps steps per method: self CPU "
                        "time per op category (step_throughput.py --op_profile reads it)")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"framework": f"torch {torch.__version__}", "threads": args.threads,
              "batch": args.batch, "params": self_check(), "self_check": "passed"}
    # The vectorised-kernel level ATen dispatches to ("AVX2", "AVX512", ...): shows
    # whether an ISA cap (ATEN_CPU_CAPABILITY) took effect.
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    if capability is not None:
        result["cpu_capability"] = capability()
    if args.profile:
        result["profiles"] = {method: profile_method(method, args) for method in args.methods}
    elif not args.self_check:
        result["teacher_bn"] = {"kd": args.kd_teacher_bn, "sokd": args.sokd_teacher_bn}
        result["methods"] = {method: time_method(method, args) for method in args.methods}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
