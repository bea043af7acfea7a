"""Stage discovery and peer cut points of any functional Keras model, from its graph alone.

No naming convention is assumed. Three notions, all computed from the layer graph of a
single-input, single-output functional (or Sequential) model:

- **Cut point**: a tensor that *separates* the graph: every path from the image input to
  the logits passes through it. Exactly then the sub-graph after it can be run from that
  tensor alone, which is what a SOKD peer needs. A skip connection that starts before a
  tensor and ends after it makes that tensor no cut point. Cut points are totally
  ordered along the network.
- **Stage**: the standard CNN notion, the layers that run at one spatial resolution.
  Walking the cut points in order, a new stage starts where the resolution (height x
  width) drops below every resolution seen before (padding that transiently enlarges a
  feature map is not a new stage).
- **Stage output**: the last *block output* at the stage's resolution, i.e. the last cut
  point that closes a block of two or more layers with weights between it and the
  previous cut point, one of them a convolution or dense layer (a residual block, an
  inverted-residual block, a squeeze-and-excitation gate),
  extended over directly following weight-free, shape-preserving layers (the ReLU after
  a post-activation ResNet's Add). The next stage's pre-activation or expansion layers,
  which also run at the old resolution, are therefore not part of it: for our WRN the
  stage outputs are `group1`, `group2`, `group3`. A stage without such a block (a plain
  chain) ends at its last cut point at the stage resolution.

The peer's default cut is the penultimate stage output. Only top-level tensors are
candidates: a nested model counts as one layer.

Reference: docs/METHOD.md, "Roles" (the peer branches from the penultimate stage);
arXiv 2111.11747, Sec. 3.
"""

from __future__ import annotations

import dataclasses
import re

import keras

from sokd_tf.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class CutPoint:
    """One tensor that separates the graph.

    Attributes:
      name: name of the layer (or operation) that produces the tensor.
      shape: the tensor's shape without the batch axis, e.g. `(16, 16, 32)`.
      position: index of the producing node in the graph's topological order.
      closes_block: the layers since the previous cut point form a block (two or more
        layers, at least one convolution or dense layer).
    """

    name: str
    shape: tuple
    position: int
    closes_block: bool


def graph_model(model: keras.Model, what: str = "the model") -> keras.Model:
    """`model` as a functional graph: itself, or a functional view of a Sequential model.

    The view shares the layers (and weights) of `model`.

    Raises:
      ConfigError: a subclassed model (no layer graph), or not exactly one input and one
        output.
    """
    if isinstance(model, keras.Sequential):
        if not getattr(model, "built", False) or not model.inputs:
            raise ConfigError(f"{_label(what, model)} is an unbuilt Sequential model; "
                              "give it an Input so its graph exists")
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    if getattr(model, "_nodes_by_depth", None) is None:
        raise ConfigError(
            f"{_label(what, model)} is a subclassed keras.Model ({type(model).__name__}) "
            "without a layer graph; the SOKD peer is cut from the teacher's graph, so it needs "
            "a functional or Sequential model (KD, DML and vanilla training accept "
            "subclassed models)"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConfigError(
            f"{_label(what, model)} has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs; expected one image input and one logits output"
        )
    return model


class ModelGraph:
    """Topologically ordered view of a functional model's top-level graph.

    Args:
      model: functional or Sequential model with one input and one output.
      what: how error messages call the model ("teacher", ...).
    """

    def __init__(self, model: keras.Model, what: str = "the model"):
        self.model = graph_model(model, what)
        self.what = what
        # Keras keeps a functional model's nodes grouped by depth (longest path to an
        # output); deepest first is a topological order. No public API exposes the graph.
        by_depth = self.model._nodes_by_depth
        self.nodes = [
            node
            for depth in sorted(by_depth, reverse=True)
            for node in by_depth[depth]
            if node.operation is not None and not node.is_input
        ]
        self.input = self.model.inputs[0]
        self.output = self.model.outputs[0]
        self._producer = {id(self.input): -1}
        self._tensors = {id(self.input): self.input}
        for position, node in enumerate(self.nodes):
            for tensor in node.outputs:
                self._producer[id(tensor)] = position
                self._tensors[id(tensor)] = tensor
        self._consumers: dict[int, list[int]] = {key: [] for key in self._producer}
        for position, node in enumerate(self.nodes):
            for tensor in node.input_tensors:
                if id(tensor) not in self._producer:
                    raise ConfigError(
                        f"{_label(what, self.model)}: layer {node.operation.name!r} reads a "
                        "tensor that is not computed from the model input"
                    )
                self._consumers[id(tensor)].append(position)
        self.cut_points = self._find_cut_points()

    def position_of(self, tensor) -> int:
        """Topological position of the node producing `tensor` (-1 for the input)."""
        return self._producer[id(tensor)]

    def producer(self, tensor):
        """The graph node that computes `tensor`; None for the model input."""
        position = self._producer[id(tensor)]
        return None if position < 0 else self.nodes[position]

    def name_of(self, tensor) -> str:
        """Name of the layer/operation producing `tensor` (the input layer for the input)."""
        position = self._producer[id(tensor)]
        if position < 0:
            return tensor._keras_history.operation.name
        return self.nodes[position].operation.name

    def _find_cut_points(self) -> list[CutPoint]:
        # A tensor separates the graph iff, in a topological order, it is the only tensor
        # alive right after it is produced (produced so far and still needed later).
        # That test does not depend on which topological order is used.
        count = len(self.nodes)
        last_use = {}
        for key, consumers in self._consumers.items():
            last_use[key] = max(consumers, default=self._producer[key])
        last_use[id(self.output)] = count
        alive = [0] * (count + 2)  # alive[i + 1]: tensors alive right after node i
        for key, produced in self._producer.items():
            if last_use[key] > produced:
                alive[produced + 1] += 1
                alive[last_use[key] + 1] -= 1
        running = 0
        for index in range(len(alive)):
            running += alive[index]
            alive[index] = running
        points = []
        previous = -1
        for position, node in enumerate(self.nodes):
            if len(node.outputs) != 1 or alive[position + 1] != 1:
                continue
            tensor = node.outputs[0]
            if tensor is self.output or last_use[id(tensor)] <= position:
                continue
            between = self.nodes[previous + 1 : position + 1]
            closes_block = len(between) >= 2 and any(_has_kernel(n.operation) for n in between)
            points.append(CutPoint(
                name=node.operation.name,
                shape=tuple(tensor.shape[1:]),
                position=position,
                closes_block=closes_block,
            ))
            previous = position
        return points

    def tensor(self, name: str):
        """The output tensor of the layer/operation `name`.

        Raises:
          ConfigError: no such layer in the top-level graph, or it is used more than once.
        """
        matches = [node for node in self.nodes if node.operation.name == name]
        if not matches:
            raise ConfigError(
                f"{_label(self.what, self.model)} has no layer {name!r} in its top-level graph; "
                f"valid cut points: {self.suggestions()}"
            )
        if len(matches) > 1 or len(matches[0].outputs) != 1:
            raise ConfigError(
                f"layer {name!r} of {_label(self.what, self.model)} is called more than once or "
                f"has several outputs, so it names no single tensor; valid cut points: "
                f"{self.suggestions()}"
            )
        return matches[0].outputs[0]

    def crossings(self, tensor) -> list[tuple[str, str]]:
        """`(source, reader)` layer pairs of the connections that bypass `tensor`.

        `reader` runs after `tensor` (it depends on it) but also reads the output of
        `source`, which does not depend on `tensor`. Empty iff `tensor` is a cut point.
        """
        start = self._producer[id(tensor)]
        downstream = {id(tensor)}
        pairs = []
        for node in self.nodes[start + 1 :]:
            inputs = node.input_tensors
            if not any(id(t) in downstream for t in inputs):
                continue
            for t in inputs:
                if id(t) not in downstream:
                    pairs.append((self.name_of(t), node.operation.name))
            downstream.update(id(t) for t in node.outputs)
        if id(self.output) not in downstream:
            pairs.append((self.name_of(tensor), "(the output does not depend on it)"))
        return list(dict.fromkeys(pairs))

    def stage_outputs(self) -> list[CutPoint]:
        """The cut point that ends each stage, in forward order (see the module doc)."""
        stages: list[list[CutPoint]] = []
        resolutions: list[int] = []
        smallest = _resolution(tuple(self.input.shape[1:]))
        if smallest is None:
            return []
        stages.append([])
        resolutions.append(smallest)
        for point in self.cut_points:
            resolution = _resolution(point.shape)
            if resolution is None:
                continue
            if resolution < smallest:
                smallest = resolution
                stages.append([])
                resolutions.append(resolution)
            if resolution == resolutions[-1]:
                stages[-1].append(point)
        outputs = []
        for points in stages:
            if not points:
                continue
            blocks = [i for i, point in enumerate(points) if point.closes_block]
            if not blocks:
                outputs.append(points[-1])
                continue
            index = blocks[-1]
            while (index + 1 < len(points)
                   and points[index + 1].position == points[index].position + 1
                   and points[index + 1].shape == points[index].shape
                   and not _has_weights(self.nodes[points[index + 1].position].operation)):
                index += 1
            outputs.append(points[index])
        return outputs

    def suggestions(self, near: int | None = None) -> list[str]:
        """Stage outputs plus, when `near` is a node position, the cut points around it."""
        names = [point.name for point in self.stage_outputs()]
        if near is not None:
            before = [p.name for p in self.cut_points if p.position < near][-1:]
            after = [p.name for p in self.cut_points if p.position > near][:1]
            names = before + after + [n for n in names if n not in before + after]
        if not names:
            names = [point.name for point in self.cut_points]
        return names


def _label(what: str, model: keras.Model) -> str:
    """How messages name a model: `what` plus the model's name unless `what` has it."""
    return what if repr(model.name) in what else f"{what} {model.name!r}"


def _has_weights(operation) -> bool:
    return bool(getattr(operation, "weights", None))


def _has_kernel(operation) -> bool:
    """Whether the layer (or a layer nested in it) has a convolution or dense kernel.

    Keras names every such variable `...kernel` (`kernel`, `depthwise_kernel`,
    `pointwise_kernel`); BatchNormalization or Normalization statistics are not kernels.
    Trainable flags are not used: freezing a teacher must not move its stages.
    """
    return any(v.path.rsplit("/", 1)[-1].endswith("kernel")
               for v in getattr(operation, "weights", None) or [])


def _resolution(shape: tuple) -> int | None:
    """height x width of a `[H, W, C]` feature map (channels last); None otherwise."""
    if len(shape) != 3 or shape[0] is None or shape[1] is None:
        return None
    return int(shape[0]) * int(shape[1])


def cut_points(model: keras.Model) -> list[str]:
    """Names of the layers whose outputs separate `model`'s graph, in forward order."""
    return [point.name for point in ModelGraph(model).cut_points]


def stage_outputs(model: keras.Model) -> list[str]:
    """Names of the layers that end each stage of `model`, in forward order.

    For WRN: `["group1", "group2", "group3"]`.
    """
    return [point.name for point in ModelGraph(model).stage_outputs()]


_NAMED_GROUP = re.compile(r"^group(\d+)$")


def penultimate_stage_output(model: keras.Model, what: str = "the model") -> str:
    """The default peer cut: the output of the second-to-last stage (`group2` for WRN).

    A model that names its stages as sokd_tf's own builders do (top-level layers
    `group1` .. `groupN`, N >= 2) is cut at its named `group{N-1}`: the name states the
    author's stage boundaries. Any other graph is cut where discovery puts it.

    Raises:
      ConfigError: a subclassed model, or fewer than two stages (the message lists the
        valid cut points to choose from explicitly).
    """
    graph = ModelGraph(model, what)
    named = sorted(
        (int(match.group(1)), layer.name) for layer in graph.model.layers
        if (match := _NAMED_GROUP.match(layer.name))
    )
    if len(named) >= 2 and [index for index, _ in named] == list(range(1, len(named) + 1)):
        return named[-2][1]
    outputs = graph.stage_outputs()
    if len(outputs) < 2:
        raise ConfigError(
            f"{_label(what, graph.model)} has {len(outputs)} spatial stage(s) (stage outputs: "
            f"{[p.name for p in outputs]}), too few to branch a peer from the penultimate one; "
            f"name the cut layer (from_layer / --peer_from) among the valid cut points "
            f"{[p.name for p in graph.cut_points]}"
        )
    return outputs[-2].name


def cut_tensor(model: keras.Model, name: str | None = None, what: str = "the model"):
    """Resolves a peer cut: `(functional model, layer name, tensor)`.

    Args:
      model: functional or Sequential model.
      name: layer whose output the peer starts from; None = `penultimate_stage_output`.
      what: how error messages call the model.

    Raises:
      ConfigError: unknown layer, or a layer whose output does not separate the graph
        (the message names the crossing connections and suggests valid cut points).
    """
    graph = ModelGraph(model, what)
    if name is None:
        name = penultimate_stage_output(graph.model, what)
    tensor = graph.tensor(name)
    crossings = graph.crossings(tensor)
    if crossings:
        described = ", ".join(f"{reader!r} reads {source!r}" for source, reader in crossings[:6])
        raise ConfigError(
            f"cannot cut {_label(what, graph.model)} at {name!r}: its output does not separate "
            f"the graph; connections bypass it ({described}); valid cut points near it: "
            f"{graph.suggestions(graph.position_of(tensor))}"
        )
    if tensor is graph.output:
        raise ConfigError(f"cannot cut {_label(what, graph.model)} at its output {name!r}; "
                          f"valid cut points: {graph.suggestions()}")
    return graph.model, name, tensor
