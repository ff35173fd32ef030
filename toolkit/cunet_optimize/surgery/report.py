"""PassReport: what one graph pass changed, in the numbers that matter for CU-Net."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx_graphsurgeon as gs

from cunet_optimize.onnx_tools.graph import tensor_bytes, tensor_info, to_model


@dataclass(frozen=True)
class GraphStats:
    nodes: int
    concats: int
    concat_bytes: int  # bytes of all Concat outputs at batch 1


def graph_stats(graph: gs.Graph) -> GraphStats:
    model = to_model(graph)
    concats = [n for n in model.graph.node if n.op_type == "Concat"]
    info = tensor_info(model, batch=1) if concats else {}
    concat_bytes = sum(tensor_bytes(*info.get(n.output[0], (None, None))) for n in concats)
    return GraphStats(len(model.graph.node), len(concats), int(concat_bytes))


@dataclass
class PassReport:
    name: str
    nodes_before: int
    nodes_after: int
    concats_before: int
    concats_after: int
    concat_bytes_before: int
    concat_bytes_after: int
    rewrites: int = 0  # how many patterns the pass rewrote (0: the graph is unchanged)
    notes: list[str] = field(default_factory=list)
    verification: dict | None = None  # filled by run_surgery: ORT before vs after

    @classmethod
    def from_stats(cls, name: str, before: GraphStats, after: GraphStats, rewrites: int, notes: list[str]) -> "PassReport":
        return cls(
            name,
            before.nodes,
            after.nodes,
            before.concats,
            after.concats,
            before.concat_bytes,
            after.concat_bytes,
            rewrites,
            list(notes),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        mb = 1e6
        return (
            f"{self.name}: {self.rewrites} rewrite(s); nodes {self.nodes_before} -> {self.nodes_after}, "
            f"Concat {self.concats_before} -> {self.concats_after}, "
            f"Concat outputs {self.concat_bytes_before / mb:.2f} -> {self.concat_bytes_after / mb:.2f} MB (batch 1)"
        )


class PassRecorder:
    """Measures the graph before a pass and builds its PassReport afterwards."""

    def __init__(self, name: str, graph: gs.Graph):
        self.name = name
        self.before = graph_stats(graph)
        self.notes: list[str] = []
        self.rewrites = 0

    def note(self, text: str) -> None:
        self.notes.append(text)

    def finish(self, graph: gs.Graph) -> PassReport:
        # a pass that rewrote nothing left the graph as it found it: measuring it again (an export
        # and shape inference of the whole graph) would only give the numbers taken before
        after = self.before if self.rewrites == 0 else graph_stats(graph)
        return PassReport.from_stats(self.name, self.before, after, self.rewrites, self.notes)
